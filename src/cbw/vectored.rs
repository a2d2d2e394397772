//! Live I/O on buffers a frontend owns (guest memory of a vhost-user client): the
//! frontend does the system call, the engine applies every rule of a live write first.

use super::Device;
use crate::error::{Error, Result};

impl Device {
    /// Reads `len` bytes of the live image at `offset` with `read`, which gets the source
    /// file and reads that range from it into buffers of the caller's own (a frontend's
    /// vectored read into guest memory, without a bounce buffer). The range must lie
    /// inside the device; a failure counts as a source error.
    pub fn read_live_with(
        &self,
        offset: u64,
        len: u64,
        read: impl FnOnce(&std::fs::File) -> std::io::Result<()>,
    ) -> Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        read(self.source.file())
            .map_err(|e| self.source_io_error("reading", offset, len, e))
            .inspect_err(|e| self.note_source_error(e))
    }

    /// Writes `len` bytes at `offset` of the live image with `write`, which gets the
    /// source file and writes that range to it from buffers of the caller's own. Every
    /// rule of [`Device::write_live`] applies first (bitmaps marked, old data copied while
    /// an access needs it, under the gate); the range must lie inside the device.
    pub fn write_live_with(
        &self,
        offset: u64,
        len: u64,
        write: impl FnOnce(&std::fs::File) -> std::io::Result<()>,
    ) -> Result<()> {
        if len == 0 {
            return self.check_range(offset, 0);
        }
        // Under the gate: a resize changes the size only while holding it exclusively.
        let gate = self.gate();
        self.check_range(offset, len)?;
        self.before_change(&gate, offset, len)?;
        write(self.source.file())
            .map_err(|e| self.source_io_error("writing", offset, len, e))
            .inspect_err(|e| self.note_source_error(e))
    }

    fn source_io_error(&self, what: &str, offset: u64, len: u64, e: std::io::Error) -> Error {
        Error::io(
            format!(
                "{what} source {} at {offset}+{len}",
                self.source.path().display()
            ),
            e,
        )
    }
}

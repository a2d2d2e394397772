//! Fleecing files: one sparse file per device and access, as large as the source, that
//! receives the old data of clusters before the live image overwrites them.
//!
//! A cluster's data sits at the same offset as in the source. Discarding a cluster
//! punches a hole, so the file only ever holds what the backup has yet to read.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::secure_path::Dir;
use crate::sys;

/// A sparse fleecing file.
pub struct FleecingFile {
    file: File,
    /// The fleecing directory, held open: the file is created and removed under its fd.
    dir: Arc<Dir>,
    name: String,
    path: PathBuf,
    punch_works: AtomicBool,
}

impl FleecingFile {
    /// Creates `name` in `dir` (it must not exist) as a sparse file of `size` bytes,
    /// mode 0600.
    pub fn create(dir: &Arc<Dir>, name: &str, size: u64) -> Result<FleecingFile> {
        let path = dir.display_path(name);
        let file = dir
            .open(name, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::busy(format!(
                        "fleecing file {} already exists; remove it if no backup uses it",
                        path.display()
                    ))
                } else {
                    Error::io(format!("creating fleecing file {}", path.display()), e)
                }
            })?;
        let f = FleecingFile {
            file,
            dir: dir.clone(),
            name: name.to_string(),
            path,
            punch_works: AtomicBool::new(true),
        };
        if let Err(e) = f.file.set_len(size) {
            let _ = f.remove();
            return Err(Error::io(
                format!("sizing fleecing file {}", f.path.display()),
                e,
            ));
        }
        Ok(f)
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads old data back.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        sys::read_exact_at(&self.file, buf, offset)
            .context(|| format!("reading fleecing file {} at {offset}", self.path.display()))
    }

    /// Stores old data.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        sys::write_all_at(&self.file, buf, offset)
            .context(|| format!("writing fleecing file {} at {offset}", self.path.display()))
    }

    /// Releases the space of `[offset, offset+len)`. When the filesystem cannot punch
    /// holes the space stays allocated (logged once); the data is never read again.
    pub fn punch(&self, offset: u64, len: u64) {
        if len == 0 || !self.punch_works.load(Ordering::Relaxed) {
            return;
        }
        let mode = sys::FALLOC_PUNCH_HOLE | sys::FALLOC_KEEP_SIZE;
        if let Err(e) = sys::fallocate(&self.file, mode, offset, len) {
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                if self.punch_works.swap(false, Ordering::Relaxed) {
                    log::warn!(
                        "fleecing directory of {} cannot punch holes: discarded space is not released",
                        self.path.display()
                    );
                }
            } else {
                log::warn!(
                    "releasing space in fleecing file {} at {offset}+{len}: {e}",
                    self.path.display()
                );
            }
        }
    }

    /// Bytes allocated on disk.
    pub fn allocated_bytes(&self) -> u64 {
        sys::allocated_bytes(&self.file).unwrap_or(0)
    }

    /// Deletes the file.
    pub fn remove(&self) -> Result<()> {
        self.dir
            .remove(&self.name)
            .map_err(|e| Error::io(format!("removing fleecing file {}", self.path.display()), e))
    }
}

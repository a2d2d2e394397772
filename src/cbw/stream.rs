//! Snapshot reads sent straight from the source's page cache to a socket.
//!
//! A snapshot read ([`Device::read_snapshot`]) copies the data into a buffer without any
//! lock and checks afterwards that it was the point-in-time data; the buffer then goes to
//! the socket, a second copy. Here the kernel copies the source's pages into the socket
//! itself (`sendmsg` from a mapping of the source, `sys::FileMap`), so the check cannot
//! come after: once in the socket, the bytes cannot be taken back. So the check comes
//! first and holds while the kernel copies: for each lock unit, the device gate (shared)
//! and then the unit's stripe (shared, `try_read`: never waited for under the gate), the
//! access still current, every cluster still accessible and not copied, then a send that
//! does not block. A writer that must copy a cluster of the unit first takes its stripe
//! exclusively, so it waits for that copy into the socket (a few microseconds per unit);
//! a teardown waits too (gate). A write that broke the access no longer copies first:
//! the check after each send catches it and the read fails (the connection ends: part of
//! the reply is out).
//!
//! The kernel's copy may have to read a page from storage first (one not in the page
//! cache); the locks are then held for that read too. Who waits: a writer that must copy
//! a cluster of the same unit (it reads the same pages from storage for its copy), a
//! discard of the unit, a setup or teardown of the device. Never a write of another
//! unit, and never a write of a cluster already copied.
//!
//! At the first unit that does not pass (a copied or discarded cluster, a stripe or gate
//! in use, a socket that took less than all), the rest goes the ordinary way: read into
//! the caller's buffer, checked, and sent by the caller. The lock order is the one of
//! `cbw/mod.rs`: gate, then one stripe.

use std::io;
use std::sync::Arc;

use super::Device;
use crate::error::{Error, Result};
use crate::sys::Region;

impl Device {
    /// Sends the snapshot bytes `offset..offset + buf.len()` of access `access_id` as far
    /// as it can straight from the source's page cache through `send`, which takes a
    /// [`Region`] of the source and returns how many of its bytes went out without
    /// blocking (`sys::send_nonblocking`). Returns how many bytes went out that way; the
    /// rest, `buf[sent..]`, holds the point-in-time data for the caller to send.
    ///
    /// On an error nothing more should be sent: if `send` sent anything, the caller must
    /// end the connection (its reply is incomplete).
    pub fn stream_snapshot(
        &self,
        access_id: u64,
        offset: u64,
        buf: &mut [u8],
        send: &mut dyn FnMut(Region) -> io::Result<usize>,
    ) -> Result<usize> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        if let Some(map) = self.source.mapped() {
            pos = self.send_mapped(access_id, offset, end, &map, send)?;
        }
        let mut done = (pos - offset) as usize;
        let sent = done;
        while done < buf.len() {
            let n = self.read_snapshot(access_id, offset + done as u64, &mut buf[done..])?;
            if n == 0 {
                return Err(Error::new(
                    crate::error::Kind::PastEnd,
                    format!("read of snapshot/{} past its end", self.name),
                ));
            }
            done += n;
        }
        Ok(sent)
    }

    /// The sends from the mapping, lock unit by lock unit; returns where they stopped.
    fn send_mapped(
        &self,
        access_id: u64,
        offset: u64,
        end: u64,
        map: &crate::sys::FileMap,
        send: &mut dyn FnMut(Region) -> io::Result<usize>,
    ) -> Result<u64> {
        let access = {
            let gate = self.gate();
            self.current_access(&gate, access_id)?.clone()
        };
        if end > access.size {
            return Ok(offset);
        }
        let mut pos = offset;
        while pos < end {
            let unit = pos >> access.unit_shift;
            let unit_end = ((unit + 1) << access.unit_shift).min(end);
            let Some(region) = map.region(pos, (unit_end - pos) as usize) else {
                break;
            };
            let n = {
                let gate = self.gate();
                if !matches!(gate.access.as_ref(), Some(a) if Arc::ptr_eq(a, &access))
                    || access.is_broken()
                {
                    break;
                }
                let Ok(_stripe) = access.stripe(unit).try_read() else {
                    break;
                };
                let mut at = pos;
                while at < unit_end {
                    let c = self.cluster.index_of(at);
                    if !access.accessible.get(c.0) || access.copied.get(c.0) {
                        break;
                    }
                    at = self.cluster.start_of(c.next()).min(unit_end);
                }
                if at < unit_end {
                    break;
                }
                let n = send(region).map_err(|e| {
                    Error::io(format!("sending snapshot/{} at {pos}", self.name), e)
                })?;
                // A write that broke the access wrote the source without copying first,
                // maybe while the kernel copied: what went out may not be the snapshot.
                if access.is_broken() {
                    return Err(self.broken_error(&access));
                }
                n
            };
            pos += n as u64;
            if n < region.len() {
                break;
            }
        }
        Ok(pos)
    }
}

//! The copy loop of `fleecefs copy`: chunks of the dirty ranges in offset order, written
//! into DEST (zero blocks left as holes or punched), and per batch of at most
//! [`BATCH`] bytes the sync, verification and discard, in that order (a discarded range
//! can never be read again, so it must be durable in DEST first).

use std::fs::File;
use std::io;
use std::path::Path;

use super::dest::{Dest, Zeroed};
use super::progress::Progress;
use super::reader;
use super::summary::CopySummary;
use super::{BATCH, CHUNK};
use crate::error::{Error, IoContext, Kind, Result};
use crate::sys;

/// An I/O error on the snapshot or its dirty map, in the words of a backup.
pub(super) fn snapshot_error(name: &str, offset: Option<u64>, e: io::Error) -> Error {
    let at = offset
        .map(|o| format!(" at offset {o}"))
        .unwrap_or_default();
    match e.raw_os_error() {
        Some(libc::ENOENT) => Error::not_found(format!(
            "no backup access includes {name}; run fleecefs setup first"
        )),
        Some(libc::EACCES) if offset.is_some() => Error::new(
            Kind::Inaccessible,
            format!(
                "snapshot/{name}{at} is not readable (EACCES): the range was discarded \
                 by someone else, or is outside the dirty map"
            ),
        ),
        Some(libc::ESTALE) => Error::new(
            Kind::Stale,
            format!("the backup access of {name} ended during the copy (ESTALE)"),
        ),
        Some(libc::EIO) => Error::new(
            Kind::Broken,
            format!(
                "reading snapshot/{name}{at} failed (EIO): the backup access may be broken, \
                 see fleecefs status"
            ),
        ),
        Some(libc::ENOTCONN) | Some(libc::ECONNABORTED) => Error::io(
            format!("snapshot/{name}{at}: the fleecefs daemon is gone"),
            e,
        ),
        _ if offset.is_none() => Error::io(format!("opening snapshot/{name}"), e),
        _ => Error::io(format!("reading snapshot/{name}{at}"), e),
    }
}

/// Splits `[offset, offset+len)` into pieces of at most `piece` bytes.
pub fn pieces(offset: u64, len: u64, piece: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + len;
    (offset..end)
        .step_by(piece.max(1) as usize)
        .map(move |o| (o, piece.min(end - o)))
}

/// Whether every byte of `b` is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let mut it = b.chunks_exact(64);
    let whole = it
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0);
    whole && it.remainder().iter().all(|&x| x == 0)
}

/// Cuts `buf` into runs of whole `block`-sized blocks (the last may be shorter) that are
/// all zero or all not: `(start, len, zero)`, adjacent runs alternating.
pub fn zero_runs(buf: &[u8], block: usize) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, b) in buf.chunks(block.max(1)).enumerate() {
        let zero = is_zero(b);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 += b.len(),
            _ => runs.push((i * block, b.len(), zero)),
        }
    }
    runs
}

/// One copy in progress: reads chunks (in offset order), writes DEST, and at the end of
/// each batch syncs, verifies and discards (see the module documentation of `copy`).
pub(super) struct Copier<'a> {
    pub(super) name: &'a str,
    pub(super) snap: &'a File,
    pub(super) dest: Dest,
    pub(super) dest_path: &'a Path,
    /// Write-only handle of the snapshot for `--discard`.
    pub(super) discarder: Option<&'a File>,
    pub(super) verify: bool,
    /// Snapshot data re-read for verification.
    pub(super) sbuf: Vec<u8>,
    /// DEST data read back for verification.
    pub(super) vbuf: Vec<u8>,
    pub(super) progress: Progress,
    pub(super) s: CopySummary,
}

impl Copier<'_> {
    pub(super) fn run(
        &mut self,
        ranges: &[(u64, u64)],
        jobs: usize,
        pacer: Option<&reader::Pacer>,
    ) -> Result<()> {
        // Chunks in offset order; the last chunk of each batch ends it.
        let mut chunks: Vec<reader::Chunk> = Vec::new();
        let mut batch_end: Vec<Option<(u64, u64)>> = Vec::new();
        for &(off, len) in ranges {
            for (b_off, b_len) in pieces(off, len, BATCH) {
                for (c_off, c_len) in pieces(b_off, b_len, CHUNK as u64) {
                    chunks.push((c_off, c_len as usize));
                    batch_end.push(None);
                }
                if let Some(last) = batch_end.last_mut() {
                    *last = Some((b_off, b_len));
                }
            }
        }
        reader::for_each_chunk(self.snap, &chunks, jobs, pacer, |i, data| {
            let off = chunks[i].0;
            let data = data.map_err(|e| snapshot_error(self.name, Some(off), e))?;
            self.chunk(off, data)?;
            if let Some((b_off, b_len)) = batch_end[i] {
                self.end_batch(b_off, b_len)?;
            }
            Ok(())
        })?;
        self.dest.sync(true, self.dest_path)
    }

    fn end_batch(&mut self, off: u64, len: u64) -> Result<()> {
        if !self.verify && self.discarder.is_none() {
            return Ok(());
        }
        self.dest.sync(false, self.dest_path)?;
        if self.verify {
            self.verify(off, len)?;
        }
        if let Some(discarder) = self.discarder {
            sys::fallocate(
                discarder,
                sys::FALLOC_PUNCH_HOLE | sys::FALLOC_KEEP_SIZE,
                off,
                len,
            )
            .context(|| format!("discarding {off}+{len} on snapshot/{}", self.name))?;
            self.s.bytes_discarded += len;
        }
        Ok(())
    }

    fn chunk(&mut self, off: u64, buf: &[u8]) -> Result<()> {
        self.s.bytes_read += buf.len() as u64;
        for (start, n, zero) in zero_runs(buf, self.dest.zero_block()) {
            let at = off + start as u64;
            if zero {
                match self.dest.zero(at, n as u64, self.dest_path)? {
                    Zeroed::Skipped => self.s.bytes_skipped_zero += n as u64,
                    Zeroed::Written => self.s.bytes_written += n as u64,
                }
                continue;
            }
            self.dest
                .write(&buf[start..start + n], at, self.dest_path)?;
            self.s.bytes_written += n as u64;
        }
        self.progress.update(self.s.bytes_read);
        Ok(())
    }

    /// Compares `[off, off+len)` of DEST (re-read from the disk, through the backing
    /// chain of an overlay) with the snapshot.
    pub(super) fn verify(&mut self, off: u64, len: u64) -> Result<()> {
        if self.vbuf.is_empty() {
            self.vbuf = vec![0u8; CHUNK];
            self.sbuf = vec![0u8; CHUNK];
        }
        for (c_off, c_len) in pieces(off, len, CHUNK as u64) {
            let n = c_len as usize;
            sys::read_exact_at(self.snap, &mut self.sbuf[..n], c_off)
                .map_err(|e| snapshot_error(self.name, Some(c_off), e))?;
            self.dest
                .read_back(&mut self.vbuf[..n], c_off, self.dest_path)?;
            if self.sbuf[..n] != self.vbuf[..n] {
                let i = self.sbuf[..n]
                    .iter()
                    .zip(&self.vbuf[..n])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(Error::invalid(format!(
                    "verification failed: {} differs from snapshot/{} at offset {}",
                    self.dest_path.display(),
                    self.name,
                    c_off + i as u64
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 1000]));
        for i in [0, 63, 64, 999] {
            let mut b = vec![0u8; 1000];
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
        }
        let mut b = vec![0u8; 10 * 16];
        b[16] = 1; // block 1
        b[3 * 16 + 15] = 1; // block 3
        b[9 * 16] = 1; // block 9 (the last)
        assert_eq!(
            zero_runs(&b, 16),
            vec![
                (0, 16, true),
                (16, 16, false),
                (32, 16, true),
                (48, 16, false),
                (64, 80, true),
                (144, 16, false)
            ]
        );
        assert_eq!(zero_runs(&[0u8; 40], 16), vec![(0, 40, true)]);
        assert_eq!(zero_runs(&[5u8; 40], 16), vec![(0, 40, false)]);
        assert_eq!(zero_runs(&[], 16), vec![]);
    }

    #[test]
    fn range_pieces() {
        let p: Vec<_> = pieces(100, 250, 100).collect();
        assert_eq!(p, vec![(100, 100), (200, 100), (300, 50)]);
        assert_eq!(pieces(0, 0, 100).count(), 0);
        assert_eq!(pieces(5, 100, 100).collect::<Vec<_>>(), vec![(5, 100)]);
        // batches of a cluster-aligned range stay cluster-aligned
        for (o, _) in pieces(3 << 16, 1 << 30, BATCH) {
            assert_eq!(o % (64 << 20), 3 << 16);
        }
    }
}

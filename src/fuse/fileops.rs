//! The file operations of the namespace: the rules a FUSE request on a file follows,
//! apart from the translation (`mod.rs` only picks the call and sends its reply). Each
//! takes the node (and the access id of its handle) and returns a result or an `Error`
//! whose kind is the errno, so every rule is unit-tested without a mount:
//! - reads: page-cache (mapped) snapshot reads never stop short of the end, and none
//!   enters the cache while the snapshot is open read-write;
//! - writes: O_DSYNC / O_SYNC writes are synced on the source before the reply;
//! - SEEK_DATA / SEEK_HOLE: the source's map clipped to the device, the snapshot's
//!   accessibility map, a dirty map all data;
//! - fallocate: live modes go to the source, the snapshot takes only a discard;
//! - the handle counts of `open` and `release` (live handles; read-write snapshot
//!   handles).

use crate::error::{Error, Kind, Result};
use crate::sys;

use super::namespace::{is_a_directory, read_only, Namespace, Node};

/// How a write with open(2) `flags` is made durable before its reply: `Some(true)`:
/// fdatasync (O_DSYNC, also `RWF_DSYNC`), `Some(false)`: fsync (O_SYNC, also
/// `RWF_SYNC`), `None`: not at all. The kernel passes the file's open flags with every
/// write, plus O_DSYNC for `RWF_DSYNC` and O_SYNC for `RWF_SYNC` (`fuse_write_flags`),
/// and leaves the sync to the server for direct I/O. O_SYNC contains the O_DSYNC bit,
/// so it is tested first.
pub fn sync_of_write(flags: i32) -> Option<bool> {
    if flags & libc::O_SYNC == libc::O_SYNC {
        Some(false)
    } else if flags & libc::O_DSYNC != 0 {
        Some(true)
    } else {
        None
    }
}

impl Namespace {
    /// A read of `node` at `offset` into `buf`, for a handle of access `fh`. `cached`:
    /// a page-cache read (a mapping's fault or readahead; the kernel sends these
    /// without a lock owner), see [`Namespace::read_snapshot_cached`].
    pub fn read(
        &self,
        node: Node,
        fh: u64,
        offset: u64,
        buf: &mut [u8],
        cached: bool,
    ) -> Result<usize> {
        match node {
            Node::Live(i) => self.device(i)?.read_live(offset, buf),
            Node::Snap(i, _) if cached => self.read_snapshot_cached(i, fh, offset, buf),
            Node::Snap(i, _) => self.device(i)?.read_snapshot(fh, offset, buf),
            Node::Dirty(i, _) => self.read_dirty_map(i, fh, offset, buf),
            _ => Err(is_a_directory()),
        }
    }

    /// A snapshot read through the page cache. The kernel takes a short read as the end
    /// of the file and shrinks the file, after which even readable pages fault; so a
    /// read that would stop short of the end (inaccessible data follows) fails whole
    /// instead, and the kernel reads the faulting page alone, which succeeds when it is
    /// readable. While a handle of the snapshot is open read-write, no page enters the
    /// cache at all (the kernel drops the cached pages when such a handle is mapped): a
    /// shared writable mapping then never holds a page another mapping sees.
    pub fn read_snapshot_cached(
        &self,
        i: usize,
        fh: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let dev = self.device(i)?;
        let n = dev.read_snapshot(fh, offset, buf)?;
        // Checked after the read: a read-write open that overtook it is seen here, and
        // its mapping's invalidation waits for the page this read fills.
        if dev.rw_snapshot_open() {
            return Err(Error::new(
                Kind::Inaccessible,
                format!(
                    "snapshot/{} is open read-write: mapped reads are refused",
                    dev.name()
                ),
            ));
        }
        if n < buf.len() && offset + (n as u64) < dev.size() {
            return Err(Error::new(
                Kind::Inaccessible,
                format!(
                    "mapped read of snapshot/{} at {offset}+{} reaches inaccessible data",
                    dev.name(),
                    buf.len()
                ),
            ));
        }
        Ok(n)
    }

    /// A write of `data` at `offset` to `node`, opened with open(2) `flags`: live files
    /// only, synced before it returns as [`sync_of_write`] says.
    pub fn write(&self, node: Node, offset: u64, data: &[u8], flags: i32) -> Result<usize> {
        match node {
            Node::Live(i) => {
                let dev = self.device(i)?;
                let n = dev.write_live(offset, data)?;
                if let Some(data_only) = sync_of_write(flags) {
                    dev.sync_live(data_only)?;
                }
                Ok(n)
            }
            Node::Snap(..) | Node::Dirty(..) => Err(read_only()),
            _ => Err(is_a_directory()),
        }
    }

    /// SEEK_DATA (`data`) or SEEK_HOLE from `offset` in `node`: the offset found, or
    /// `None` (ENXIO: no data after `offset`, or `offset` at or past the end).
    pub fn seek(&self, node: Node, fh: u64, offset: u64, data: bool) -> Result<Option<u64>> {
        match node {
            Node::Live(i) => {
                // The source's own map, clipped to the device (a regular file may be
                // longer than the device until `resize`).
                let dev = self.device(i)?;
                let size = dev.size();
                if offset >= size {
                    return Ok(None);
                }
                dev.source().seek(offset, data).map(|r| match (r, data) {
                    (Some(d), true) => Some(d).filter(|&d| d < size),
                    (None, true) => None,
                    (h, false) => Some(h.unwrap_or(size).min(size)),
                })
            }
            Node::Snap(i, _) => self.device(i)?.seek_snapshot(fh, offset, data, u64::MAX),
            // All data.
            Node::Dirty(..) => self
                .attr(node)
                .map(|a| (offset < a.size).then_some(if data { offset } else { a.size })),
            _ => Err(is_a_directory()),
        }
    }

    /// `fallocate(mode)` on `node`: on a live file, the source's (punch, zero range,
    /// allocate); on the snapshot, only a discard (punch hole with keep size).
    pub fn fallocate(
        &self,
        node: Node,
        fh: u64,
        mode: i32,
        offset: u64,
        length: u64,
    ) -> Result<()> {
        match node {
            Node::Live(i) => self.device(i)?.fallocate_live(mode, offset, length),
            Node::Snap(i, _) if mode == sys::FALLOC_PUNCH_HOLE | sys::FALLOC_KEEP_SIZE => {
                self.device(i)?.discard_snapshot(fh, offset, length)
            }
            Node::Snap(..) | Node::Dirty(..) => Err(Error::new(
                Kind::Unsupported,
                format!(
                    "fallocate mode {mode:#x} is not supported on snapshot files and dirty maps (only punch hole with keep size, a discard)"
                ),
            )),
            _ => Err(is_a_directory()),
        }
    }

    /// `fsync` / `fdatasync` of `node`: the source of a live file; nothing to do for the
    /// others (snapshot data is never written through them).
    pub fn fsync(&self, node: Node, datasync: bool) -> Result<()> {
        match node {
            Node::Live(i) => self.device(i)?.sync_live(datasync),
            _ => Ok(()),
        }
    }

    /// The last close of a handle of inode `ino` opened with `flags`: pairs with the
    /// counts taken in [`Namespace::open`] (the node as numbered, whether its access or
    /// device is still there or not).
    pub fn release(&self, ino: u64, flags: i32) {
        match Node::from_ino(ino) {
            Some(Node::Live(i)) => {
                if let Ok(d) = self.device(i) {
                    d.handle_released();
                }
            }
            Some(Node::Snap(i, _)) if flags & libc::O_ACCMODE == libc::O_RDWR => {
                if let Ok(d) = self.device(i) {
                    d.count_rw_snapshot_handle(false);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use crate::fuse::test_support::{errno_of, one_device_engine};
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    const C: u64 = 64 << 10;
    const PUNCH: i32 = sys::FALLOC_PUNCH_HOLE | sys::FALLOC_KEEP_SIZE;

    /// A namespace over an engine with one device `d` of `size` bytes of 0x5a (image
    /// `DIR/d.img`), no mount.
    fn namespace(dir: &std::path::Path, size: u64) -> (Arc<Engine>, Namespace) {
        let img = dir.join("d.img");
        std::fs::write(&img, vec![0x5a; size as usize]).unwrap();
        let engine = one_device_engine(dir, &img);
        (engine.clone(), Namespace::new(engine, (0, 0)))
    }

    #[test]
    fn o_sync_is_an_fsync_o_dsync_an_fdatasync_and_plain_writes_sync_nothing() {
        assert_eq!(sync_of_write(libc::O_WRONLY), None);
        assert_eq!(sync_of_write(libc::O_RDWR | libc::O_DIRECT), None);
        assert_eq!(sync_of_write(libc::O_WRONLY | libc::O_DSYNC), Some(true));
        // O_SYNC includes the O_DSYNC bit: still a full fsync
        assert_eq!(sync_of_write(libc::O_WRONLY | libc::O_SYNC), Some(false));
        assert_eq!(sync_of_write(libc::O_SYNC | libc::O_DSYNC), Some(false));
    }

    #[test]
    fn writes_go_to_live_files_only_and_sync_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, ns) = namespace(dir.path(), 4 * C);
        for flags in [libc::O_WRONLY, libc::O_WRONLY | libc::O_DSYNC, libc::O_SYNC] {
            assert_eq!(ns.write(Node::Live(0), 100, b"abc", flags).unwrap(), 3);
        }
        let mut b = [0u8; 3];
        std::fs::File::open(dir.path().join("d.img"))
            .unwrap()
            .read_exact_at(&mut b, 100)
            .unwrap();
        assert_eq!(&b, b"abc");
        engine.setup("t", None, None).unwrap();
        let id = engine.active().unwrap().0;
        for node in [Node::Snap(0, id), Node::Dirty(0, id)] {
            assert_eq!(errno_of(ns.write(node, 0, b"x", libc::O_RDWR)), libc::EROFS);
        }
        assert_eq!(errno_of(ns.write(Node::LiveDir, 0, b"x", 0)), libc::EISDIR);
        engine.teardown("t", false).unwrap();
    }

    /// A mapped (cached) snapshot read never stops short of the end: it fails whole when
    /// inaccessible data follows, where a direct read returns what it could; and while
    /// the snapshot is open read-write, every mapped read is refused.
    #[test]
    fn cached_snapshot_reads_fail_whole_and_stop_while_open_read_write() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, ns) = namespace(dir.path(), 4 * C);
        engine.setup("t", None, None).unwrap();
        let id = engine.active().unwrap().0;
        let snap = Node::Snap(0, id);
        ns.fallocate(snap, id, PUNCH, 2 * C, C).unwrap();
        let mut buf = vec![0u8; 3 * C as usize];
        assert_eq!(
            ns.read(snap, id, 0, &mut buf, false).unwrap(),
            2 * C as usize
        );
        assert_eq!(errno_of(ns.read(snap, id, 0, &mut buf, true)), libc::EACCES);
        // the readable page alone, and a read that stops at the end of the file
        assert_eq!(ns.read(snap, id, C, &mut buf[..4096], true).unwrap(), 4096);
        assert_eq!(
            ns.read(snap, id, 3 * C, &mut buf, true).unwrap(),
            C as usize
        );
        assert!(buf[..C as usize].iter().all(|&b| b == 0x5a));

        let ino = snap.ino();
        ns.open(snap, libc::O_RDWR, true, false).unwrap();
        assert_eq!(
            errno_of(ns.read(snap, id, 0, &mut buf[..4096], true)),
            libc::EACCES
        );
        assert_eq!(ns.read(snap, id, 0, &mut buf[..4096], false).unwrap(), 4096);
        // a read-only open changes nothing; releasing the read-write one lifts the ban
        ns.open(snap, libc::O_RDONLY, true, false).unwrap();
        ns.release(ino, libc::O_RDONLY);
        assert_eq!(
            errno_of(ns.read(snap, id, 0, &mut buf[..4096], true)),
            libc::EACCES
        );
        ns.release(ino, libc::O_RDWR);
        assert_eq!(ns.read(snap, id, 0, &mut buf[..4096], true).unwrap(), 4096);
        engine.teardown("t", false).unwrap();
    }

    /// SEEK_DATA / SEEK_HOLE on a live file are the source's, clipped to the device: an
    /// image file longer than the device (grown outside, not yet `resize`d) shows
    /// neither data nor a hole past the device's end.
    #[test]
    fn live_seeks_are_clipped_to_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let size = 16 * C;
        let (_engine, ns) = namespace(dir.path(), size);
        let img = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("d.img"))
            .unwrap();
        // A hole from 2C to the device's end (where the filesystem keeps holes), and
        // data past it.
        sys::fallocate(&img, PUNCH, 2 * C, size - 2 * C).unwrap();
        img.write_all_at(b"past the end", size + 8 * C).unwrap();
        let raw = |offset: u64, data: bool| sys::seek_data_or_hole(&img, offset, data).unwrap();
        let live = Node::Live(0);
        for offset in [0, C, 3 * C, size - 1] {
            let want = raw(offset, true).filter(|&d| d < size);
            assert_eq!(
                ns.seek(live, 0, offset, true).unwrap(),
                want,
                "data {offset}"
            );
            let want = Some(raw(offset, false).unwrap_or(size).min(size));
            assert_eq!(
                ns.seek(live, 0, offset, false).unwrap(),
                want,
                "hole {offset}"
            );
        }
        // the hole after the data ends at the device's end, not the file's
        assert_eq!(
            ns.seek(live, 0, 3 * C, false).unwrap().map(|h| h <= size),
            Some(true)
        );
        assert_eq!(ns.seek(live, 0, size, true).unwrap(), None);
        assert_eq!(ns.seek(live, 0, size + 8 * C, false).unwrap(), None);
        assert_eq!(errno_of(ns.seek(Node::Root, 0, 0, true)), libc::EISDIR);
    }

    #[test]
    fn the_snapshot_takes_only_a_discard_and_the_dirty_map_no_fallocate() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, ns) = namespace(dir.path(), 4 * C);
        engine.setup("t", None, None).unwrap();
        let id = engine.active().unwrap().0;
        for mode in [0, sys::FALLOC_PUNCH_HOLE, libc::FALLOC_FL_ZERO_RANGE] {
            assert_eq!(
                errno_of(ns.fallocate(Node::Snap(0, id), id, mode, 0, C)),
                libc::EOPNOTSUPP,
                "mode {mode:#x}"
            );
        }
        assert_eq!(
            errno_of(ns.fallocate(Node::Dirty(0, id), id, PUNCH, 0, C)),
            libc::EOPNOTSUPP
        );
        ns.fallocate(Node::Snap(0, id), id, PUNCH, 0, C).unwrap();
        assert_eq!(
            errno_of(ns.read(Node::Snap(0, id), id, 0, &mut [0u8; 512], false)),
            libc::EACCES
        );
        assert_eq!(
            errno_of(ns.fallocate(Node::SnapDir, 0, PUNCH, 0, C)),
            libc::EISDIR
        );
        engine.teardown("t", false).unwrap();
    }
}

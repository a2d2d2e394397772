//! The FUSE adapter: translates kernel requests into engine calls and engine errors
//! into errnos. It owns no state of its own beyond the inode numbering.
//!
//! ```text
//! MOUNTPOINT/                 ino 1
//!   live/                     ino 2
//!     NAME                    ino 16 + i               read-write
//!   snapshot/                 ino 3
//!     NAME                    ino (A << 32) + 2*i      only during access A; direct I/O
//!     NAME.dirty              ino (A << 32) + 2*i + 1  only during access A; direct I/O
//! ```
//! Snapshot and dirty-map handles carry the access id in `fh`, so a handle opened during
//! one access never reads another access's snapshot (ESTALE instead). Their inode numbers
//! carry it too: every access has its own kernel inodes, so a mapping made during one
//! access never shares a page cache with another's, and `fstat` of an old handle (which
//! the kernel sends without the handle) fails with ESTALE.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::cbw::{Device, DeviceAccess};
use crate::engine::Engine;
use crate::error::{Error, Kind, Result};
use crate::sys;

const ROOT: u64 = 1;
const LIVE_DIR: u64 = 2;
const SNAP_DIR: u64 = 3;
const FIRST_FILE: u64 = 16;
/// Snapshot and dirty-map inode numbers are `access id << ACCESS_SHIFT` plus `2*i + k`.
const ACCESS_SHIFT: u32 = 32;
/// Largest read or write the kernel is allowed to send.
pub const MAX_IO: u32 = 1 << 20;
/// Attributes of fixed things (dirs, live files) may be cached briefly.
const TTL_STABLE: Duration = Duration::from_secs(1);
/// Snapshot entries come and go with accesses: never cached.
const TTL_NONE: Duration = Duration::ZERO;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    Root,
    LiveDir,
    SnapDir,
    Live(usize),
    /// Device index and access id.
    Snap(usize, u64),
    Dirty(usize, u64),
}

impl Node {
    fn from_ino(ino: u64, ndev: usize) -> Option<Node> {
        match ino {
            ROOT => Some(Node::Root),
            LIVE_DIR => Some(Node::LiveDir),
            SNAP_DIR => Some(Node::SnapDir),
            i if i >> ACCESS_SHIFT != 0 => {
                let (access, k) = (i >> ACCESS_SHIFT, i & ((1 << ACCESS_SHIFT) - 1));
                let dev = usize::try_from(k / 2).ok().filter(|&d| d < ndev)?;
                Some(if k % 2 == 0 {
                    Node::Snap(dev, access)
                } else {
                    Node::Dirty(dev, access)
                })
            }
            i if i >= FIRST_FILE => {
                let dev = usize::try_from(i - FIRST_FILE).ok().filter(|&d| d < ndev)?;
                Some(Node::Live(dev))
            }
            _ => None,
        }
    }

    fn ino(self) -> u64 {
        match self {
            Node::Root => ROOT,
            Node::LiveDir => LIVE_DIR,
            Node::SnapDir => SNAP_DIR,
            Node::Live(i) => FIRST_FILE + i as u64,
            Node::Snap(i, a) => (a << ACCESS_SHIFT) + 2 * i as u64,
            Node::Dirty(i, a) => (a << ACCESS_SHIFT) + 2 * i as u64 + 1,
        }
    }
}

thread_local! {
    /// One read buffer per FUSE worker thread: no allocation per request.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn errno(e: &Error) -> Errno {
    match e.kind() {
        Kind::Inaccessible | Kind::Stale | Kind::ReadOnly | Kind::PastEnd => {
            log::debug!("{}", crate::error::report(e))
        }
        _ => log::info!("request failed: {}", crate::error::report(e)),
    }
    Errno::from_i32(e.errno())
}

/// The filesystem served over FUSE.
pub struct FleeceFs {
    engine: Arc<Engine>,
    started: SystemTime,
    owner: (u32, u32),
    /// The kernel invalidates cached pages on FOPEN_DIRECT_IO writes
    /// (FUSE_DIRECT_IO_ALLOW_MMAP), so O_DIRECT opens of live files may use parallel
    /// direct writes without leaving other, cached, opens stale.
    coherent_direct_io: bool,
    /// `--live-cache`: buffered opens of live files use the kernel page cache (kept
    /// across opens) instead of direct I/O.
    live_cache: bool,
    /// Per device: open read-write handles of `snapshot/NAME`. While there are any, no
    /// snapshot page enters the page cache (see `read_snapshot_cached`).
    rw_snapshot_opens: Vec<AtomicU32>,
}

impl FleeceFs {
    /// A filesystem over `engine`; directories belong to the daemon's user. With
    /// `live_cache`, buffered opens of live files are page-cached (see `open`).
    pub fn new(engine: Arc<Engine>, live_cache: bool) -> FleeceFs {
        // SAFETY: getuid/getgid cannot fail.
        let owner = unsafe { (libc::getuid(), libc::getgid()) };
        let rw_snapshot_opens = engine.devices().iter().map(|_| AtomicU32::new(0)).collect();
        FleeceFs {
            rw_snapshot_opens,
            engine,
            started: SystemTime::now(),
            owner,
            coherent_direct_io: false,
            live_cache,
        }
    }

    fn node(&self, ino: INodeNo) -> Option<Node> {
        Node::from_ino(ino.0, self.engine.devices().len())
    }

    fn device(&self, i: usize) -> &Arc<Device> {
        &self.engine.devices()[i]
    }

    /// The access that currently exposes device `i`, if any.
    fn access_of(&self, i: usize) -> Option<Arc<DeviceAccess>> {
        self.device(i).access()
    }

    /// Access `id` of device `i`, if it is the current one.
    fn access_if(&self, i: usize, id: u64) -> Option<Arc<DeviceAccess>> {
        self.access_of(i).filter(|a| a.id() == id)
    }

    fn attr(&self, node: Node) -> Option<FileAttr> {
        let mut a = FileAttr {
            ino: INodeNo(node.ino()),
            size: 0,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: self.owner.0,
            gid: self.owner.1,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        let file = |a: &mut FileAttr, dev: &Device, size: u64, perm: u32| {
            let id = dev.source().identity();
            a.kind = FileType::RegularFile;
            a.nlink = 1;
            a.size = size;
            a.blocks = size.div_ceil(512);
            a.perm = perm as u16;
            a.uid = id.uid;
            a.gid = id.gid;
        };
        match node {
            Node::Root | Node::LiveDir | Node::SnapDir => {}
            Node::Live(i) => {
                let dev = self.device(i);
                file(&mut a, dev, dev.size(), dev.source().identity().mode);
                if let Some(now) = dev.source().now() {
                    (a.mtime, a.ctime, a.blocks) = (now.mtime, now.ctime, now.blocks);
                }
            }
            Node::Snap(i, id) => {
                let access = self.access_if(i, id)?;
                let dev = self.device(i);
                file(
                    &mut a,
                    dev,
                    dev.size(),
                    dev.source().identity().mode & !0o022,
                );
                // At most the bytes to read, and at most what the source holds plus what
                // was copied (data at setup is in one of the two): a sparse image's
                // snapshot looks sparse, so `cp` asks for its holes (SEEK_DATA).
                let held = dev.source().now().map_or(u64::MAX, |n| n.blocks * 512);
                let held = held.saturating_add(access.copied_bytes());
                a.blocks = access.dirty_map().dirty_bytes().min(held).div_ceil(512);
                (a.mtime, a.ctime) = (access.created(), access.created());
            }
            Node::Dirty(i, id) => {
                let access = self.access_if(i, id)?;
                let dev = self.device(i);
                file(
                    &mut a,
                    dev,
                    access.dirty_map().text_len(),
                    dev.source().identity().mode & 0o444,
                );
                (a.mtime, a.ctime) = (access.created(), access.created());
            }
        }
        Some(a)
    }

    /// A snapshot read through the page cache: a mapping's fault or readahead (the kernel
    /// sends these without a lock owner, direct reads with one). The kernel takes a short
    /// read as the end of the file and shrinks the file, after which even readable pages
    /// fault; so a read that would stop short of the end (inaccessible data follows)
    /// fails whole instead, and the kernel reads the faulting page alone, which succeeds
    /// when it is readable. While a handle of the snapshot is open read-write, no page
    /// enters the cache at all (the kernel drops the cached pages when such a handle is
    /// mapped): a shared writable mapping then never holds a page another mapping sees.
    fn read_snapshot_cached(
        &self,
        i: usize,
        access_id: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let dev = self.device(i);
        let n = dev.read_snapshot(access_id, offset, buf)?;
        // Checked after the read: a read-write open that overtook it is seen here, and
        // its mapping's invalidation waits for the page this read fills.
        if self.rw_snapshot_opens[i].load(Ordering::SeqCst) > 0 {
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

    fn ttl(node: Node) -> &'static Duration {
        match node {
            Node::Snap(..) | Node::Dirty(..) | Node::SnapDir => &TTL_NONE,
            _ => &TTL_STABLE,
        }
    }

    fn children(&self, dir: Node) -> Vec<(Node, String)> {
        match dir {
            Node::Root => vec![
                (Node::LiveDir, "live".into()),
                (Node::SnapDir, "snapshot".into()),
            ],
            Node::LiveDir => self
                .engine
                .devices()
                .iter()
                .enumerate()
                .map(|(i, d)| (Node::Live(i), d.name().to_string()))
                .collect(),
            Node::SnapDir => {
                let mut out = Vec::new();
                for (i, d) in self.engine.devices().iter().enumerate() {
                    if let Some(a) = d.access() {
                        out.push((Node::Snap(i, a.id()), d.name().to_string()));
                        out.push((Node::Dirty(i, a.id()), format!("{}.dirty", d.name())));
                    }
                }
                out
            }
            _ => Vec::new(),
        }
    }

    fn with_buf<R>(size: u32, f: impl FnOnce(&mut [u8]) -> R) -> R {
        READ_BUF.with(|b| {
            let mut b = b.borrow_mut();
            let size = (size as usize).min(16 << 20);
            if b.len() < size {
                b.resize(size, 0);
            }
            f(&mut b[..size])
        })
    }
}

/// O_DSYNC / O_SYNC semantics of one write: the kernel passes the file's open flags with
/// every write, plus O_DSYNC for `RWF_DSYNC` and O_SYNC for `RWF_SYNC` (`fuse_write_flags`),
/// and leaves the sync to the server for direct I/O. The source is synced before the
/// reply (fdatasync for O_DSYNC, fsync for O_SYNC), so the write is durable when it
/// returns. Plain writes pay nothing.
fn write_sync(dev: &Device, flags: OpenFlags) -> Result<()> {
    if flags.0 & libc::O_SYNC == libc::O_SYNC {
        dev.sync_live(false)
    } else if flags.0 & libc::O_DSYNC != 0 {
        dev.sync_live(true)
    } else {
        Ok(())
    }
}

/// A snapshot or dirty-map inode whose access has ended is stale; anything else unknown
/// does not exist.
fn stale_or_enoent(node: Node) -> Errno {
    match node {
        Node::Snap(..) | Node::Dirty(..) => Errno::ESTALE,
        _ => Errno::ENOENT,
    }
}

fn read_only() -> Errno {
    Errno::EROFS
}

impl Filesystem for FleeceFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        if let Err(max) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        self.coherent_direct_io = config
            .add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
            .is_ok();
        if !self.coherent_direct_io {
            log::info!("kernel without FUSE_DIRECT_IO_ALLOW_MMAP: O_DIRECT writes to live files are serialized per file");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(dir) = self.node(parent) else {
            return reply.error(Errno::ENOENT);
        };
        let name = name.to_string_lossy();
        let found = self
            .children(dir)
            .into_iter()
            .find(|(_, n)| *n == name)
            .and_then(|(node, _)| self.attr(node).map(|a| (node, a)));
        match found {
            Some((node, attr)) => reply.entry(Self::ttl(node), &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino).map(|n| (n, self.attr(n))) {
            Some((node, Some(attr))) => reply.attr(Self::ttl(node), &attr),
            // An inode of an ended access: only handles opened during it still reach it.
            Some((Node::Snap(..) | Node::Dirty(..), None)) => reply.error(Errno::ESTALE),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(node) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(attr) = self.attr(node) else {
            return reply.error(stale_or_enoent(node));
        };
        if let Some(s) = size {
            match node {
                Node::Live(_) if s == attr.size => {}
                Node::Live(i) => {
                    log::info!(
                        "refused to resize live/{} to {s}: devices have a fixed size",
                        self.device(i).name()
                    );
                    return reply.error(Errno::EPERM);
                }
                Node::Snap(..) | Node::Dirty(..) => return reply.error(read_only()),
                _ => return reply.error(Errno::EISDIR),
            }
        }
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        // Time updates (cp -p, rsync -t) are accepted and ignored: the source's times
        // belong to the source.
        reply.attr(Self::ttl(node), &attr)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writing = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        match self.node(ino) {
            Some(Node::Live(_)) => {
                // Direct I/O unless the page cache is asked for: reads and writes go
                // straight between the caller's buffer and the daemon, one copy fewer
                // than through the FUSE page cache (docs/performance.md). It needs a
                // kernel that keeps mmap coherent with direct writes; without one, or
                // with --live-cache, buffered opens are page-cached and write-through.
                // Every change to a live file goes through this mount and keeps that
                // cache coherent (writes fill it, fallocate and direct writes invalidate
                // it), so it survives open/close.
                let direct =
                    self.coherent_direct_io && (!self.live_cache || flags.0 & libc::O_DIRECT != 0);
                let f = if direct {
                    FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
                } else {
                    FopenFlags::FOPEN_KEEP_CACHE
                };
                reply.opened(FileHandle(0), f)
            }
            Some(Node::Snap(i, id)) | Some(Node::Dirty(i, id)) => {
                let is_dirty = matches!(self.node(ino), Some(Node::Dirty(..)));
                if is_dirty && writing {
                    return reply.error(read_only());
                }
                match self.access_if(i, id) {
                    // Snapshot data never changes during an access, but discards must
                    // turn into EACCES at once: no page cache for reads (mappings use it).
                    Some(a) => {
                        if !is_dirty && flags.0 & libc::O_ACCMODE == libc::O_RDWR {
                            self.rw_snapshot_opens[i].fetch_add(1, Ordering::SeqCst);
                        }
                        reply.opened(FileHandle(a.id()), FopenFlags::FOPEN_DIRECT_IO)
                    }
                    None => reply.error(Errno::ESTALE),
                }
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(node) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        Self::with_buf(size, |buf| {
            let r: Result<usize> = match node {
                Node::Live(i) => self.device(i).read_live(offset, buf),
                Node::Snap(i, _) if lock_owner.is_none() => {
                    self.read_snapshot_cached(i, fh.0, offset, buf)
                }
                Node::Snap(i, _) => self.device(i).read_snapshot(fh.0, offset, buf),
                Node::Dirty(i, _) => match self.access_of(i) {
                    Some(a) if a.id() == fh.0 => Ok(a.dirty_map().read_at(offset, buf)),
                    _ => Err(Error::new(
                        Kind::Stale,
                        "the backup access of this dirty map has ended",
                    )),
                },
                _ => return reply.error(Errno::EISDIR),
            };
            match r {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.node(ino) {
            Some(Node::Live(i)) => {
                let dev = self.device(i);
                match dev.write_live(offset, data).and_then(|n| {
                    write_sync(dev, flags)?;
                    Ok(n)
                }) {
                    Ok(n) => reply.written(n as u32),
                    Err(e) => reply.error(errno(&e)),
                }
            }
            Some(Node::Snap(..)) | Some(Node::Dirty(..)) => reply.error(read_only()),
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = match self.node(ino) {
            Some(Node::Live(i)) => self.device(i).fallocate_live(mode, offset, length),
            Some(Node::Snap(i, _)) if mode == sys::FALLOC_PUNCH_HOLE | sys::FALLOC_KEEP_SIZE => {
                self.device(i).discard_snapshot(fh.0, offset, length)
            }
            Some(Node::Snap(..)) | Some(Node::Dirty(..)) => return reply.error(Errno::EOPNOTSUPP),
            Some(_) => return reply.error(Errno::EISDIR),
            None => return reply.error(Errno::ENOENT),
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(Node::Snap(i, _)) = self.node(ino) {
            if flags.0 & libc::O_ACCMODE == libc::O_RDWR {
                let _ = self.rw_snapshot_opens[i].fetch_update(
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                    |n| n.checked_sub(1),
                );
            }
        }
        reply.ok()
    }

    /// SEEK_DATA and SEEK_HOLE (the kernel handles the other whences itself). Never
    /// ENOSYS: the kernel would then stop asking for every file of the mount.
    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return reply.error(Errno::EINVAL),
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        let r = match self.node(ino) {
            Some(Node::Live(i)) => {
                let dev = self.device(i);
                if offset >= dev.size() {
                    Ok(None)
                } else {
                    // The source's own map, clipped to the device.
                    let size = dev.size();
                    dev.source().seek(offset, data).map(|r| match (r, data) {
                        (Some(d), true) => Some(d).filter(|&d| d < size),
                        (None, true) => None,
                        (h, false) => Some(h.unwrap_or(size).min(size)),
                    })
                }
            }
            Some(Node::Snap(i, _)) => self.device(i).seek_snapshot(fh.0, offset, data),
            Some(node @ Node::Dirty(..)) => match self.attr(node) {
                // All data.
                Some(a) if offset < a.size => Ok(Some(if data { offset } else { a.size })),
                Some(_) => Ok(None),
                None => return reply.error(Errno::ESTALE),
            },
            Some(_) => return reply.error(Errno::EISDIR),
            None => return reply.error(Errno::ENOENT),
        };
        match r {
            Ok(Some(o)) => reply.offset(o as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.node(ino) {
            Some(Node::Live(i)) => match self.device(i).sync_live(datasync) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            },
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(dir) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if !matches!(dir, Node::Root | Node::LiveDir | Node::SnapDir) {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![
            (INodeNo(dir.ino()), FileType::Directory, ".".to_string()),
            (INodeNo(ROOT), FileType::Directory, "..".to_string()),
        ];
        for (node, name) in self.children(dir) {
            let kind = match node {
                Node::LiveDir | Node::SnapDir => FileType::Directory,
                _ => FileType::RegularFile,
            };
            entries.push((INodeNo(node.ino()), kind, name));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    /// The fleecing dir's filesystem: the space snapshots consume while an access runs
    /// (the images themselves have fixed sizes), so `df` and monitoring see what can fill.
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match sys::fs_space(self.engine.fleecing_dir()) {
            Ok((bsize, blocks, bfree, bavail, files, ffree)) => {
                let bsize = u32::try_from(bsize).unwrap_or(4096);
                reply.statfs(blocks, bfree, bavail, files, ffree, bsize, 255, bsize)
            }
            Err(e) => {
                log::info!(
                    "statfs of fleecing dir {} failed: {e}",
                    self.engine.fleecing_dir().display()
                );
                reply.error(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO)))
            }
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // ENOSYS, not ENODATA: the kernel then knows there are no extended attributes at
        // all and stops asking for `security.capability` before every write (which
        // doubled the FUSE round trips of small writes).
        reply.error(Errno::ENOSYS)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EPERM)
    }

    fn mknod(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _r: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM)
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EPERM)
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM)
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM)
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM)
    }
}

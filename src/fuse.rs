//! The FUSE adapter: translates kernel requests into engine calls and engine errors
//! into errnos. It owns no state of its own beyond the inode numbering.
//!
//! ```text
//! MOUNTPOINT/                 ino 1
//!   live/                     ino 2
//!     NAME                    ino 16 + 3*i   read-write, page cached
//!   snapshot/                 ino 3
//!     NAME                    ino 17 + 3*i   only during an access; direct I/O
//!     NAME.dirty              ino 18 + 3*i   only during an access; direct I/O
//! ```
//! Snapshot and dirty-map handles carry the access id in `fh`, so a handle opened during
//! one access never reads another access's snapshot (ESTALE instead).

use std::cell::RefCell;
use std::ffi::OsStr;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};

use crate::cbw::{Device, DeviceAccess};
use crate::engine::Engine;
use crate::error::{Error, Kind};
use crate::priority::BackupPool;
use crate::sys;

const ROOT: u64 = 1;
const LIVE_DIR: u64 = 2;
const SNAP_DIR: u64 = 3;
const FIRST_FILE: u64 = 16;
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
    Snap(usize),
    Dirty(usize),
}

impl Node {
    fn from_ino(ino: u64, ndev: usize) -> Option<Node> {
        match ino {
            ROOT => Some(Node::Root),
            LIVE_DIR => Some(Node::LiveDir),
            SNAP_DIR => Some(Node::SnapDir),
            i if i >= FIRST_FILE => {
                let k = i - FIRST_FILE;
                let dev = (k / 3) as usize;
                if dev >= ndev {
                    return None;
                }
                Some(match k % 3 {
                    0 => Node::Live(dev),
                    1 => Node::Snap(dev),
                    _ => Node::Dirty(dev),
                })
            }
            _ => None,
        }
    }

    fn ino(self) -> u64 {
        match self {
            Node::Root => ROOT,
            Node::LiveDir => LIVE_DIR,
            Node::SnapDir => SNAP_DIR,
            Node::Live(i) => FIRST_FILE + 3 * i as u64,
            Node::Snap(i) => FIRST_FILE + 3 * i as u64 + 1,
            Node::Dirty(i) => FIRST_FILE + 3 * i as u64 + 2,
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
    /// `--backup-priority low`: snapshot and dirty-map reads run (and reply) there,
    /// below the guest; `None`: on the worker that received them.
    backup_pool: Option<BackupPool>,
}

impl FleeceFs {
    /// A filesystem over `engine`; directories belong to the daemon's user. With
    /// `live_cache`, buffered opens of live files are page-cached (see `open`). With a
    /// `backup_pool`, snapshot and dirty-map reads are served there (`crate::priority`).
    pub fn new(
        engine: Arc<Engine>,
        live_cache: bool,
        backup_pool: Option<BackupPool>,
    ) -> FleeceFs {
        // SAFETY: getuid/getgid cannot fail.
        let owner = unsafe { (libc::getuid(), libc::getgid()) };
        FleeceFs {
            engine,
            started: SystemTime::now(),
            owner,
            coherent_direct_io: false,
            live_cache,
            backup_pool,
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
                if let Some((mtime, ctime)) = dev.source().times() {
                    (a.mtime, a.ctime) = (mtime, ctime);
                }
            }
            Node::Snap(i) => {
                let access = self.access_of(i)?;
                let dev = self.device(i);
                file(
                    &mut a,
                    dev,
                    dev.size(),
                    dev.source().identity().mode & !0o022,
                );
                a.blocks = access.dirty_map().dirty_bytes().div_ceil(512);
                (a.mtime, a.ctime) = (access.created(), access.created());
            }
            Node::Dirty(i) => {
                let access = self.access_of(i)?;
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

    fn ttl(node: Node) -> &'static Duration {
        match node {
            Node::Snap(_) | Node::Dirty(_) | Node::SnapDir => &TTL_NONE,
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
                    if d.access().is_some() {
                        out.push((Node::Snap(i), d.name().to_string()));
                        out.push((Node::Dirty(i), format!("{}.dirty", d.name())));
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

/// A snapshot or dirty-map read of access `access_id`, answered from the calling thread
/// (a FUSE worker, or a backup pool thread).
fn backup_read(dev: &Device, node: Node, access_id: u64, offset: u64, size: u32, reply: ReplyData) {
    FleeceFs::with_buf(size, |buf| {
        let r = match node {
            Node::Snap(_) => dev.read_snapshot(access_id, offset, buf),
            _ => match dev.access() {
                Some(a) if a.id() == access_id => Ok(a.dirty_map().read_at(offset, buf)),
                _ => Err(Error::new(
                    Kind::Stale,
                    "the backup access of this dirty map has ended",
                )),
            },
        };
        match r {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(errno(&e)),
        }
    })
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
        match self.node(ino).and_then(|n| self.attr(n).map(|a| (n, a))) {
            Some((node, attr)) => reply.attr(Self::ttl(node), &attr),
            None => reply.error(Errno::ENOENT),
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
            return reply.error(Errno::ENOENT);
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
                Node::Snap(_) | Node::Dirty(_) => return reply.error(read_only()),
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
            Some(Node::Snap(i)) | Some(Node::Dirty(i)) => {
                let is_dirty = matches!(self.node(ino), Some(Node::Dirty(_)));
                if is_dirty && writing {
                    return reply.error(read_only());
                }
                match self.access_of(i) {
                    // Snapshot data never changes during an access, but discards must
                    // turn into EACCES at once and a new access must not see old pages:
                    // no page cache.
                    Some(a) => reply.opened(FileHandle(a.id()), FopenFlags::FOPEN_DIRECT_IO),
                    None => reply.error(Errno::ENOENT),
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
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(node) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match node {
            Node::Live(i) => Self::with_buf(size, |buf| {
                match self.device(i).read_live(offset, buf) {
                    Ok(n) => reply.data(&buf[..n]),
                    Err(e) => reply.error(errno(&e)),
                }
            }),
            Node::Snap(i) | Node::Dirty(i) => {
                let dev = self.device(i).clone();
                let job = move || backup_read(&dev, node, fh.0, offset, size, reply);
                match &self.backup_pool {
                    Some(pool) => pool.submit(Box::new(job)),
                    None => job(),
                }
            }
            _ => reply.error(Errno::EISDIR),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.node(ino) {
            Some(Node::Live(i)) => match self.device(i).write_live(offset, data) {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(errno(&e)),
            },
            Some(Node::Snap(_)) | Some(Node::Dirty(_)) => reply.error(read_only()),
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
            Some(Node::Snap(i)) if mode == sys::FALLOC_PUNCH_HOLE | sys::FALLOC_KEEP_SIZE => {
                self.device(i).discard_snapshot(fh.0, offset, length)
            }
            Some(Node::Snap(_)) | Some(Node::Dirty(_)) => return reply.error(Errno::EOPNOTSUPP),
            Some(_) => return reply.error(Errno::EISDIR),
            None => return reply.error(Errno::ENOENT),
        };
        match r {
            Ok(()) => reply.ok(),
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

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let total: u64 = self.engine.devices().iter().map(|d| d.size()).sum();
        let files = 3 + 3 * self.engine.devices().len() as u64;
        reply.statfs(total.div_ceil(4096), 0, 0, files, 0, 4096, 255, 4096)
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

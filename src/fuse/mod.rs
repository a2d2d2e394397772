//! The FUSE adapter: translates kernel requests into calls of the namespace
//! (`namespace.rs`: inodes, attributes, entries, open policy) and the engine, and their
//! errors into errnos (one table, `error.rs`). It owns no state of its own.
//! `session.rs` mounts it.

pub mod namespace;
pub mod pool;
pub mod session;

use std::cell::RefCell;
use std::ffi::OsStr;
use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    BsdFileFlags, Errno, FileHandle, Filesystem, Generation, INodeNo, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::engine::Engine;
use crate::error::{Error, Kind, Result};
use crate::sys;
use namespace::{is_a_directory, not_permitted, read_only, Namespace, Node};
use pool::BackupPool;

/// Largest read or write the kernel is allowed to send.
pub const MAX_IO: u32 = 1 << 20;

thread_local! {
    /// One read buffer per FUSE worker thread: no allocation per request.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The errno of a failed request (the table is [`Error::errno`]). Refusals of the
/// namespace and the expected failures of snapshot reads are logged at debug level.
fn errno(e: &Error) -> Errno {
    match e.kind() {
        Kind::Inaccessible
        | Kind::Stale
        | Kind::ReadOnly
        | Kind::PastEnd
        | Kind::NotFound
        | Kind::IsDirectory
        | Kind::NotDirectory
        | Kind::NotPermitted
        | Kind::NotImplemented => log::debug!("{}", crate::error::report(e)),
        _ => log::info!("request failed: {}", crate::error::report(e)),
    }
    Errno::from_i32(e.errno())
}

/// The filesystem served over FUSE.
pub struct FleeceFs {
    ns: Arc<Namespace>,
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
    /// `backup_pool`, snapshot and dirty-map reads are served there (`pool.rs`).
    pub fn new(engine: Arc<Engine>, live_cache: bool, backup_pool: Option<BackupPool>) -> FleeceFs {
        FleeceFs {
            ns: Arc::new(Namespace::new(engine, sys::process_owner())),
            coherent_direct_io: false,
            live_cache,
            backup_pool,
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

/// A read of `node`, answered from the calling thread (a FUSE worker, or a backup pool
/// thread for snapshot and dirty-map reads).
fn serve_read(
    ns: &Namespace,
    node: Node,
    fh: FileHandle,
    offset: u64,
    size: u32,
    reply: ReplyData,
) {
    FleeceFs::with_buf(size, |buf| {
        let r: Result<usize> = match node {
            Node::Live(i) => ns.device(i).read_live(offset, buf),
            Node::Snap(i) => ns.device(i).read_snapshot(fh.0, offset, buf),
            Node::Dirty(i) => ns.read_dirty_map(i, fh.0, offset, buf),
            _ => Err(is_a_directory()),
        };
        match r {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(errno(&e)),
        }
    })
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
        let found = self
            .ns
            .node(parent)
            .and_then(|dir| self.ns.lookup(dir, &name.to_string_lossy()));
        match found {
            Ok((node, attr)) => reply.entry(node.ttl(), &attr, Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self
            .ns
            .node(ino)
            .and_then(|n| self.ns.attr(n).map(|a| (n, a)))
        {
            Ok((node, attr)) => reply.attr(node.ttl(), &attr),
            Err(e) => reply.error(errno(&e)),
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
        let checked = self.ns.node(ino).and_then(|node| {
            let attr = self.ns.attr(node)?;
            let owner_or_mode = mode.is_some() || uid.is_some() || gid.is_some();
            self.ns.check_setattr(node, &attr, size, owner_or_mode)?;
            Ok((node, attr))
        });
        match checked {
            Ok((node, attr)) => reply.attr(node.ttl(), &attr),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let opened = self.ns.node(ino).and_then(|node| {
            self.ns
                .open(node, flags.0, self.coherent_direct_io, self.live_cache)
        });
        match opened {
            Ok(o) => reply.opened(FileHandle(o.fh), o.flags),
            Err(e) => reply.error(errno(&e)),
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
        let node = match self.ns.node(ino) {
            Ok(node) => node,
            Err(e) => return reply.error(errno(&e)),
        };
        if let (Node::Snap(_) | Node::Dirty(_), Some(pool)) = (node, &self.backup_pool) {
            // A backup read: below the guest, on the pool, which replies (pool.rs).
            let ns = self.ns.clone();
            return pool.submit(Box::new(move || {
                serve_read(&ns, node, fh, offset, size, reply)
            }));
        }
        serve_read(&self.ns, node, fh, offset, size, reply)
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
        let r = self.ns.node(ino).and_then(|node| match node {
            Node::Live(i) => self.ns.device(i).write_live(offset, data),
            Node::Snap(_) | Node::Dirty(_) => Err(read_only()),
            _ => Err(is_a_directory()),
        });
        match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
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
        let r = self.ns.node(ino).and_then(|node| match node {
            Node::Live(i) => self.ns.device(i).fallocate_live(mode, offset, length),
            Node::Snap(i) if mode == sys::FALLOC_PUNCH_HOLE | sys::FALLOC_KEEP_SIZE => {
                self.ns.device(i).discard_snapshot(fh.0, offset, length)
            }
            Node::Snap(_) | Node::Dirty(_) => Err(Error::new(
                Kind::Unsupported,
                format!(
                    "fallocate mode {mode:#x} is not supported on snapshot files and dirty maps (only punch hole with keep size, a discard)"
                ),
            )),
            _ => Err(is_a_directory()),
        });
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
        let r = self.ns.node(ino).and_then(|node| match node {
            Node::Live(i) => self.ns.device(i).sync_live(datasync),
            _ => Ok(()),
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
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
        let entries = match self.ns.node(ino).and_then(|dir| self.ns.entries(dir)) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno(&e)),
        };
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (blocks, files) = self.ns.statfs();
        reply.statfs(blocks, 0, 0, files, 0, 4096, 255, 4096)
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(errno(&no_xattrs()))
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(errno(&no_xattrs()))
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
        reply.error(errno(&not_permitted()))
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
        reply.error(errno(&not_permitted()))
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(errno(&not_permitted()))
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(&not_permitted()))
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(&not_permitted()))
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
        reply.error(errno(&not_permitted()))
    }
}

/// Extended attributes are not implemented: ENOSYS, not ENODATA, so that the kernel
/// knows there are none at all and stops asking for `security.capability` before every
/// write (which doubled the FUSE round trips of small writes).
fn no_xattrs() -> Error {
    Error::new(
        Kind::NotImplemented,
        "fleecefs files have no extended attributes",
    )
}

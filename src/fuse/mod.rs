//! The FUSE adapter: translates kernel requests into calls of the namespace
//! (`namespace.rs`: inodes, attributes, entries, open policy; `fileops.rs`: the rules of
//! reads, writes, seeks, fallocate and handle counts) and the backup scheduler, and their
//! errors into errnos (one table, `error.rs`): each `Filesystem` method is a call and a
//! reply. `session.rs` mounts it.

pub mod fileops;
pub mod namespace;
pub mod session;

use std::cell::RefCell;
use std::ffi::OsStr;
use std::io;

use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    BsdFileFlags, Errno, FileHandle, Filesystem, Generation, INodeNo, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};

use crate::engine::Engine;
use crate::error::{Error, Kind};
use crate::sched::BackupScheduler;
use crate::sys;
use namespace::{not_permitted, Namespace, Node};

/// Largest read or write the kernel is allowed to send.
pub const MAX_IO: u32 = 1 << 20;

/// Tells the kernel about resized and removed devices and data changed by another
/// frontend ([`crate::engine::KernelCache`]).
pub struct KernelNotifier {
    notifier: fuser::Notifier,
    mountpoint: std::path::PathBuf,
}

impl KernelNotifier {
    /// A notifier for the session mounted at `mountpoint`.
    pub fn new(notifier: fuser::Notifier, mountpoint: std::path::PathBuf) -> KernelNotifier {
        KernelNotifier {
            notifier,
            mountpoint,
        }
    }
}

impl crate::engine::KernelCache for KernelNotifier {
    fn size_changed(&self, slot: usize, name: &str) {
        // Attributes and every cached page (offset 0, length 0: to the end). Not while a
        // planned restart drains (the kernel may wait for a read of those pages held at
        // the closed gate; the next worker drops every page and the attributes).
        let ino = INodeNo(Node::Live(slot).ino());
        let sent = crate::keeper::GATE.notify(|| self.notifier.inval_inode(ino, 0, 0));
        if let Some(Err(e)) = sent {
            // ENOENT: the kernel has no such inode cached, nothing to drop.
            if e.raw_os_error() != Some(libc::ENOENT) {
                log::warn!("invalidating the kernel's cache of live/{name}: {e}");
            }
        }
        // A getattr through the mount sets the kernel's own size at once (loop devices
        // read that directly, without asking). This thread is not a FUSE worker.
        let live = crate::layout::MountLayout::new(self.mountpoint.clone()).live(name);
        let _ = std::fs::metadata(live);
    }

    fn data_changed(&self, slot: usize, offset: u64, len: u64) {
        let ino = INodeNo(Node::Live(slot).ino());
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        if len == 0 {
            // A length of 0 would drop everything to the end.
            return;
        }
        // Not while a planned restart drains: the kernel may wait for a read of these
        // pages held at the closed gate (the next worker drops every page instead).
        let sent = crate::keeper::GATE.notify(|| self.notifier.inval_inode(ino, offset, len));
        if let Some(Err(e)) = sent {
            if e.raw_os_error() != Some(libc::ENOENT) {
                log::warn!("invalidating the kernel's pages of the live file in slot {slot}: {e}");
            }
        }
    }

    fn removed(&self, _slot: usize, name: &str) {
        let live_dir = INodeNo(Node::LiveDir.ino());
        if let Err(e) = self.notifier.inval_entry(live_dir, OsStr::new(name)) {
            if e.raw_os_error() != Some(libc::ENOENT) {
                log::warn!("invalidating the kernel's entry of live/{name}: {e}");
            }
        }
    }
}

thread_local! {
    /// One read buffer per FUSE worker thread: no allocation per request. Anonymous
    /// memory, so page-aligned, as the source's direct reads need
    /// (`Source::read_for_backup`).
    static READ_BUF: RefCell<Option<memmap2::MmapMut>> = const { RefCell::new(None) };
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
        // Debug too, as in the other frontends: the daemon's log has the info level, and
        // a broken access fails every snapshot read; source errors are logged (warning)
        // where they happen.
        _ => log::debug!("request failed: {}", crate::error::report(e)),
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
    /// Backup scheduling of the mount: snapshot and dirty-map reads run (and reply)
    /// there, below the guest (`--backup-priority low`), or on the worker that received
    /// them (`normal`); live requests are noted as the guest's.
    sched: Arc<BackupScheduler>,
    /// The keeper link of this worker: told what INIT negotiated.
    worker: Option<Arc<crate::keeper::Worker>>,
}

impl FleeceFs {
    /// A filesystem over `engine`; directories belong to the daemon's user. With
    /// `live_cache`, buffered opens of live files are page-cached (see `open`). Snapshot
    /// and dirty-map reads are scheduled by `sched` (`src/sched/`).
    pub fn new(engine: Arc<Engine>, live_cache: bool, sched: Arc<BackupScheduler>) -> FleeceFs {
        FleeceFs {
            ns: Arc::new(Namespace::new(engine, sys::process_owner())),
            coherent_direct_io: false,
            live_cache,
            sched,
            worker: None,
        }
    }

    /// Shows owners and modes as `policy` says (before the session starts).
    pub fn with_access_policy(mut self, policy: namespace::AccessPolicy) -> FleeceFs {
        if let Some(ns) = Arc::get_mut(&mut self.ns) {
            let engine = ns.engine_arc();
            *ns = Namespace::new(engine, sys::process_owner()).with_policy(policy);
        }
        self
    }

    /// Served by a keeper's worker: INIT's parameters are reported to the keeper.
    pub fn with_worker(mut self, worker: Arc<crate::keeper::Worker>) -> FleeceFs {
        self.worker = Some(worker);
        self
    }

    /// Set up for a connection whose INIT an earlier worker answered (see `init`).
    pub fn with_coherent_direct_io(mut self, coherent: bool) -> FleeceFs {
        self.coherent_direct_io = coherent;
        self
    }

    fn with_buf<R>(size: u32, f: impl FnOnce(&mut [u8]) -> R) -> R {
        READ_BUF.with(|b| {
            let mut b = b.borrow_mut();
            let size = (size as usize).min(16 << 20);
            if b.as_ref().is_some_and(|m| m.len() < size) {
                *b = None;
            }
            // Failing to map a few MiB is running out of memory, as a Vec's allocation
            // failure would be.
            let m = b.get_or_insert_with(|| {
                memmap2::MmapMut::map_anon(size.max(4096))
                    .expect("mapping a read buffer (out of memory)")
            });
            f(&mut m[..size])
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
    cached: bool,
    reply: ReplyData,
) {
    FleeceFs::with_buf(size, |buf| match ns.read(node, fh.0, offset, buf, cached) {
        Ok(n) => reply.data(&buf[..n]),
        Err(e) => reply.error(errno(&e)),
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
        if let Some(w) = &self.worker {
            w.record_init(
                self.coherent_direct_io,
                config
                    .capabilities()
                    .contains(fuser::InitFlags::FUSE_HAS_RESEND),
            );
        }
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
        let _pass = crate::keeper::GATE.enter();
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
        lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        #[cfg(feature = "fault-injection")]
        hold_read();
        let pass = crate::keeper::GATE.enter();
        let node = match self.ns.node(ino) {
            Ok(node) => node,
            Err(e) => return reply.error(errno(&e)),
        };
        // A page-cache read (a mapping's fault or readahead) comes without a lock owner.
        let cached = lock_owner.is_none();
        match node {
            Node::Live(_) => self.sched.note_guest(),
            Node::Snap(..) | Node::Dirty(..) if self.sched.pooled() => {
                // A backup read: below the guest, on the pool, which replies
                // (src/sched/); it stays inside the drain gate until then.
                let ns = self.ns.clone();
                return self.sched.run_backup_read(move || {
                    let _pass = pass;
                    serve_read(&ns, node, fh, offset, size, cached, reply)
                });
            }
            _ => {}
        }
        serve_read(&self.ns, node, fh, offset, size, cached, reply)
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
        let _pass = crate::keeper::GATE.enter();
        let r = self.ns.node(ino).and_then(|node| {
            if let Node::Live(_) = node {
                self.sched.note_guest();
            }
            self.ns.write(node, offset, data, flags.0)
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
        let _pass = crate::keeper::GATE.enter();
        let r = self
            .ns
            .node(ino)
            .and_then(|node| self.ns.fallocate(node, fh.0, mode, offset, length));
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
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
        let r = self
            .ns
            .node(ino)
            .and_then(|node| self.ns.seek(node, fh.0, offset, data));
        match r {
            Ok(Some(o)) => reply.offset(o as i64),
            Ok(None) => reply.error(Errno::ENXIO),
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
        self.ns.release(ino.0, flags.0);
        reply.ok()
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _pass = crate::keeper::GATE.enter();
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
        let _pass = crate::keeper::GATE.enter();
        let r = self
            .ns
            .node(ino)
            .and_then(|node| self.ns.fsync(node, datasync));
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
        match self.ns.statfs() {
            Ok((bsize, blocks, bfree, bavail, files, ffree)) => {
                let bsize = u32::try_from(bsize).unwrap_or(4096);
                reply.statfs(blocks, bfree, bavail, files, ffree, bsize, 255, bsize)
            }
            Err(e) => reply.error(errno(&e)),
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

/// Test-only fault injection: with `FLEECEFS_FAULT_FUSE_READ_HOLD=FILE`, a FUSE read
/// waits before the restart gate while FILE exists (at most 60 s), its pages locked in
/// the kernel meanwhile.
#[cfg(feature = "fault-injection")]
fn hold_read() {
    let Some(file) = std::env::var_os("FLEECEFS_FAULT_FUSE_READ_HOLD") else {
        return;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::path::Path::new(&file).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// What the unit tests of the namespace and of the file operations share.
#[cfg(test)]
mod test_support {
    use std::path::Path;
    use std::sync::Arc;

    use crate::cbw::Device;
    use crate::engine::{Engine, EngineConfig};
    use crate::error::Result;
    use crate::source::Source;
    use crate::units::ClusterSize;

    /// An engine over one device `d`, the image `img` (64 KiB clusters), its state under
    /// `dir/fleece`; no mount.
    pub(super) fn one_device_engine(dir: &Path, img: &Path) -> Arc<Engine> {
        let dev = Device::new(
            "d".into(),
            Source::open(img).unwrap(),
            ClusterSize::new(64 << 10).unwrap(),
        );
        let config = EngineConfig::new(dir.join("fleece"));
        Arc::new(Engine::new(vec![dev], config, None).unwrap())
    }

    /// The errno of `r`'s error, 0 on success.
    pub(super) fn errno_of<T>(r: Result<T>) -> i32 {
        r.map_or_else(|e| e.errno(), |_| 0)
    }
}

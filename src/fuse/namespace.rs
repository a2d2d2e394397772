//! The namespace the FUSE adapter serves: inode numbers, attributes, directory entries,
//! and the policy of what may be opened, written or changed. Every refusal is an
//! [`Error`] with a kind (not found, is a directory, read-only, not permitted ...);
//! `error.rs` turns kinds into errnos, so this module knows no errno.
//!
//! ```text
//! MOUNTPOINT/                 ino 1
//!   live/                     ino 2
//!     NAME                    ino 16 + i               read-write
//!   snapshot/                 ino 3
//!     NAME                    ino (A << 32) + 2*i      only during access A; direct I/O
//!     NAME.dirty              ino (A << 32) + 2*i + 1  only during access A; direct I/O
//! ```
//! `i` is the device's slot (`Engine::slots`, from the device record): stable while the
//! device is served and across daemon restarts, never reused for another device.
//! Snapshot and dirty-map handles carry the access id in `fh`, so a handle opened during
//! one access never reads another access's snapshot (ESTALE instead). Their inode numbers
//! carry it too: every access has its own kernel inodes, so a mapping made during one
//! access never shares a page cache with another's, and `fstat` of an old handle (which
//! the kernel sends without the handle) fails with ESTALE.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{FileAttr, FileType, FopenFlags, INodeNo};

use crate::cbw::{Device, DeviceAccess};
use crate::engine::Engine;
use crate::error::{Error, Kind, Result};
use crate::layout;

const ROOT: u64 = 1;
const LIVE_DIR: u64 = 2;
const SNAP_DIR: u64 = 3;
const FIRST_FILE: u64 = 16;
/// Snapshot and dirty-map inode numbers are `access id << ACCESS_SHIFT` plus `2*i + k`.
const ACCESS_SHIFT: u32 = 32;
/// Attributes of fixed things (dirs, live files) may be cached briefly.
const TTL_STABLE: Duration = Duration::from_secs(1);
/// Snapshot entries come and go with accesses: never cached.
const TTL_NONE: Duration = Duration::ZERO;

/// A node of the namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    /// The mount point.
    Root,
    /// `live/`.
    LiveDir,
    /// `snapshot/`.
    SnapDir,
    /// `live/NAME` of device `i`.
    Live(usize),
    /// `snapshot/NAME` of device `i` during access `A` (device index, access id).
    Snap(usize, u64),
    /// `snapshot/NAME.dirty` of device `i` during access `A`.
    Dirty(usize, u64),
}

impl Node {
    /// The node of inode number `ino` (whether its slot holds a device or not).
    pub fn from_ino(ino: u64) -> Option<Node> {
        match ino {
            ROOT => Some(Node::Root),
            LIVE_DIR => Some(Node::LiveDir),
            SNAP_DIR => Some(Node::SnapDir),
            i if i >> ACCESS_SHIFT != 0 => {
                let (access, k) = (i >> ACCESS_SHIFT, i & ((1 << ACCESS_SHIFT) - 1));
                let dev = usize::try_from(k / 2).ok()?;
                Some(if k % 2 == 0 {
                    Node::Snap(dev, access)
                } else {
                    Node::Dirty(dev, access)
                })
            }
            i if i >= FIRST_FILE => {
                let dev = usize::try_from(i - FIRST_FILE).ok()?;
                Some(Node::Live(dev))
            }
            _ => None,
        }
    }

    /// Its inode number.
    pub fn ino(self) -> u64 {
        match self {
            Node::Root => ROOT,
            Node::LiveDir => LIVE_DIR,
            Node::SnapDir => SNAP_DIR,
            Node::Live(i) => FIRST_FILE + i as u64,
            Node::Snap(i, a) => (a << ACCESS_SHIFT) + 2 * i as u64,
            Node::Dirty(i, a) => (a << ACCESS_SHIFT) + 2 * i as u64 + 1,
        }
    }

    /// Whether it is a directory.
    pub fn is_dir(self) -> bool {
        matches!(self, Node::Root | Node::LiveDir | Node::SnapDir)
    }

    /// How long the kernel may cache its attributes and entry.
    pub fn ttl(self) -> &'static Duration {
        match self {
            Node::Snap(..) | Node::Dirty(..) | Node::SnapDir => &TTL_NONE,
            _ => &TTL_STABLE,
        }
    }

    /// The file type of its directory entry.
    pub fn file_type(self) -> FileType {
        if self.is_dir() {
            FileType::Directory
        } else {
            FileType::RegularFile
        }
    }
}

/// The refusal for a file operation on a directory.
pub fn is_a_directory() -> Error {
    Error::new(
        Kind::IsDirectory,
        "the operation needs a file, not a directory",
    )
}

/// The refusal for a change to a snapshot or dirty map.
pub fn read_only() -> Error {
    Error::new(
        Kind::ReadOnly,
        "snapshot files and dirty maps are read-only",
    )
}

/// The refusal for creating, removing or renaming anything.
pub fn not_permitted() -> Error {
    Error::new(
        Kind::NotPermitted,
        "the files of a fleecefs mount cannot be created, removed or renamed",
    )
}

/// How a file is opened: the handle and the kernel's caching flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The file handle (the access id for snapshot files and dirty maps).
    pub fh: u64,
    /// Direct I/O or page cache.
    pub flags: FopenFlags,
}

/// Who may use a mount's files, and so which owner and mode they show
/// (`--allow-other`, `--mode`, `--uid`, `--gid`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccessPolicy {
    /// Other users may use the mount: a file's mode is then narrowed to what its
    /// source's mode and the source's directories let through
    /// ([`crate::source::Source::reach`]), so that the mount shows nobody a file they
    /// could not reach at its source.
    pub allow_other: bool,
    /// The permission bits of live files instead (snapshot files: without group and
    /// other write; dirty maps: read bits only).
    pub mode: Option<u32>,
    /// The owner of every file and directory instead of the source's.
    pub uid: Option<u32>,
    /// The group of every file and directory instead of the source's.
    pub gid: Option<u32>,
}

impl AccessPolicy {
    /// Whether directories keep the plain `0755` of the daemon's user: nothing asked.
    fn plain(&self) -> bool {
        !self.allow_other && self.mode.is_none() && self.uid.is_none() && self.gid.is_none()
    }
}

/// The `r-x` bits a directory needs so that every class with a bit in `file_modes`
/// reaches the files in it; its owner always has them.
pub fn dir_mode_for(file_modes: u32) -> u32 {
    0o500
        | if file_modes & 0o070 != 0 { 0o050 } else { 0 }
        | if file_modes & 0o007 != 0 { 0o005 } else { 0 }
}

/// The namespace of one mount over an engine.
pub struct Namespace {
    engine: Arc<Engine>,
    started: SystemTime,
    owner: (u32, u32),
    policy: AccessPolicy,
}

impl Namespace {
    /// The namespace over `engine`; directories belong to `owner` (uid, gid).
    pub fn new(engine: Arc<Engine>, owner: (u32, u32)) -> Namespace {
        Namespace {
            engine,
            started: SystemTime::now(),
            owner,
            policy: AccessPolicy::default(),
        }
    }

    /// Shows owners and modes as `policy` says.
    pub fn with_policy(mut self, policy: AccessPolicy) -> Namespace {
        self.policy = policy;
        self
    }

    /// The owner, group and permission bits a live file of `dev` shows.
    fn file_owner_mode(&self, dev: &Device) -> (u32, u32, u32) {
        let src = dev.source();
        let id = src.identity();
        let mode = match self.policy.mode {
            Some(m) => m & 0o777,
            None if self.policy.allow_other => id.mode & 0o777 & src.reach(),
            None => id.mode,
        };
        (
            self.policy.uid.unwrap_or(id.uid),
            self.policy.gid.unwrap_or(id.gid),
            mode,
        )
    }

    /// The owner, group and permission bits of the directories: the daemon's user and
    /// `0755`, unless a policy is given; then the devices' owner (when they all have the
    /// same) and `r-x` for the classes that may use some file.
    fn dir_owner_mode(&self) -> (u32, u32, u32) {
        if self.policy.plain() {
            return (self.owner.0, self.owner.1, 0o755);
        }
        let files: Vec<(u32, u32, u32)> = self
            .engine
            .devices()
            .iter()
            .map(|d| self.file_owner_mode(d))
            .collect();
        let common = |pick: fn(&(u32, u32, u32)) -> u32, default: u32| match files.first() {
            Some(f) if files.iter().all(|g| pick(g) == pick(f)) => pick(f),
            _ => default,
        };
        (
            self.policy
                .uid
                .unwrap_or_else(|| common(|f| f.0, self.owner.0)),
            self.policy
                .gid
                .unwrap_or_else(|| common(|f| f.1, self.owner.1)),
            dir_mode_for(files.iter().fold(0, |m, f| m | f.2)),
        )
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine, shared.
    pub fn engine_arc(&self) -> Arc<Engine> {
        self.engine.clone()
    }

    /// The node of `ino`, or NotFound (also for a slot whose device was removed).
    pub fn node(&self, ino: INodeNo) -> Result<Node> {
        let n =
            Node::from_ino(ino.0).ok_or_else(|| Error::not_found(format!("no inode {}", ino.0)))?;
        match n {
            Node::Live(i) | Node::Snap(i, _) | Node::Dirty(i, _) => self.device(i).map(|_| n),
            _ => Ok(n),
        }
    }

    /// The device of slot `i`; NotFound once it was removed (`fleecefs device remove`).
    pub fn device(&self, i: usize) -> Result<Arc<Device>> {
        self.engine
            .device(i)
            .ok_or_else(|| Error::not_found(format!("no device in slot {i} (removed)")))
    }

    /// The access that currently exposes device `i`, if any.
    pub fn access_of(&self, i: usize) -> Option<Arc<DeviceAccess>> {
        self.engine.device(i)?.access()
    }

    /// Access `id` of device `i` if it is the current one; Stale otherwise: only the
    /// handles and inodes of an access that has ended name it.
    pub fn access_if(&self, i: usize, id: u64) -> Result<Arc<DeviceAccess>> {
        self.access_of(i).filter(|a| a.id() == id).ok_or_else(|| {
            Error::new(
                Kind::Stale,
                format!(
                    "{}/{}: the backup access of this file has ended",
                    layout::SNAPSHOT_DIR,
                    self.engine
                        .device(i)
                        .map(|d| d.name().to_string())
                        .unwrap_or_default()
                ),
            )
        })
    }

    /// The attributes of `node`; Stale for snapshot files of an access that has ended.
    pub fn attr(&self, node: Node) -> Result<FileAttr> {
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
        // `perm` maps the live file's mode to this file's.
        let file = |a: &mut FileAttr, dev: &Device, size: u64, perm: fn(u32) -> u32| {
            let (uid, gid, mode) = self.file_owner_mode(dev);
            a.kind = FileType::RegularFile;
            a.nlink = 1;
            a.size = size;
            a.blocks = size.div_ceil(512);
            a.perm = perm(mode) as u16;
            a.uid = uid;
            a.gid = gid;
        };
        match node {
            Node::Root | Node::LiveDir | Node::SnapDir => {
                (a.uid, a.gid, a.perm) = {
                    let (u, g, m) = self.dir_owner_mode();
                    (u, g, m as u16)
                };
            }
            Node::Live(i) => {
                let dev = self.device(i)?;
                file(&mut a, &dev, dev.size(), |m| m);
                if let Some(now) = dev.source().now() {
                    (a.mtime, a.ctime, a.blocks) = (now.mtime, now.ctime, now.blocks);
                }
            }
            Node::Snap(i, id) => {
                let access = self.access_if(i, id)?;
                let dev = self.device(i)?;
                // The snapshot keeps the size of setup when the device is resized.
                file(&mut a, &dev, access.size(), |m| m & !0o022);
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
                let dev = self.device(i)?;
                file(&mut a, &dev, access.dirty_map().text_len(), |m| m & 0o444);
                (a.mtime, a.ctime) = (access.created(), access.created());
            }
        }
        Ok(a)
    }

    /// The entries of directory `dir` (without `.` and `..`).
    fn children(&self, dir: Node) -> Vec<(Node, String)> {
        match dir {
            Node::Root => vec![
                (Node::LiveDir, layout::LIVE_DIR.into()),
                (Node::SnapDir, layout::SNAPSHOT_DIR.into()),
            ],
            Node::LiveDir => self
                .engine
                .slots()
                .into_iter()
                .map(|(i, d)| (Node::Live(i), d.name().to_string()))
                .collect(),
            Node::SnapDir => {
                let mut out = Vec::new();
                for (i, d) in self.engine.slots() {
                    if let Some(a) = d.access() {
                        out.push((Node::Snap(i, a.id()), d.name().to_string()));
                        out.push((Node::Dirty(i, a.id()), layout::dirty_map_name(d.name())));
                    }
                }
                out
            }
            _ => Vec::new(),
        }
    }

    /// The node called `name` in `parent`, with its attributes.
    pub fn lookup(&self, parent: Node, name: &str) -> Result<(Node, FileAttr)> {
        self.children(parent)
            .into_iter()
            .find(|(_, n)| n == name)
            .and_then(|(node, _)| self.attr(node).ok().map(|a| (node, a)))
            .ok_or_else(|| Error::not_found(format!("no entry '{}'", name.escape_debug())))
    }

    /// The entries of directory `dir`, `.` and `..` first; NotDirectory for a file.
    pub fn entries(&self, dir: Node) -> Result<Vec<(INodeNo, FileType, String)>> {
        if !dir.is_dir() {
            return Err(Error::new(Kind::NotDirectory, "not a directory"));
        }
        let mut entries = vec![
            (INodeNo(dir.ino()), FileType::Directory, ".".to_string()),
            (INodeNo(ROOT), FileType::Directory, "..".to_string()),
        ];
        for (node, name) in self.children(dir) {
            entries.push((INodeNo(node.ino()), node.file_type(), name));
        }
        Ok(entries)
    }

    /// What `setattr` may change: times are accepted and ignored (the source's times
    /// belong to the source), the size only stays what it is, nothing else changes.
    pub fn check_setattr(
        &self,
        node: Node,
        attr: &FileAttr,
        size: Option<u64>,
        changes_owner_or_mode: bool,
    ) -> Result<()> {
        if let Some(s) = size {
            match node {
                Node::Live(_) if s == attr.size => {}
                Node::Live(i) => {
                    return Err(Error::new(
                        Kind::NotPermitted,
                        format!(
                            "refused to truncate live/{} to {s}: use 'fleecefs resize'",
                            self.device(i)?.name()
                        ),
                    ))
                }
                Node::Snap(..) | Node::Dirty(..) => return Err(read_only()),
                _ => return Err(is_a_directory()),
            }
        }
        if changes_owner_or_mode {
            return Err(Error::new(
                Kind::NotPermitted,
                "the owner and mode of fleecefs files are those of their source",
            ));
        }
        Ok(())
    }

    /// How `node` is opened with open(2) `flags`. `coherent_direct_io`: the kernel keeps
    /// mmap coherent with direct writes; `live_cache`: `--live-cache`.
    pub fn open(
        &self,
        node: Node,
        flags: i32,
        coherent_direct_io: bool,
        live_cache: bool,
    ) -> Result<Opened> {
        let writing = flags & libc::O_ACCMODE != libc::O_RDONLY;
        match node {
            Node::Live(i) => {
                // Counted (until `release`), so that `device remove` is refused while
                // it is open; EBUSY while a removal is under way. Noted: the kernel may
                // now hold pages of it, which a vhost-user-blk write must drop.
                self.engine.open_live(i)?.note_opened_through_mount();
                // Direct I/O unless the page cache is asked for: reads and writes go
                // straight between the caller's buffer and the daemon, one copy fewer
                // than through the FUSE page cache (docs/performance.md). It needs a
                // kernel that keeps mmap coherent with direct writes; without one, or
                // with --live-cache, buffered opens are page-cached and write-through.
                // Every change to a live file goes through this mount and keeps that
                // cache coherent (writes fill it, fallocate and direct writes invalidate
                // it), so it survives open/close.
                let direct = coherent_direct_io && (!live_cache || flags & libc::O_DIRECT != 0);
                let flags = if direct {
                    FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
                } else {
                    FopenFlags::FOPEN_KEEP_CACHE
                };
                Ok(Opened { fh: 0, flags })
            }
            Node::Snap(i, id) | Node::Dirty(i, id) => {
                if matches!(node, Node::Dirty(..)) && writing {
                    return Err(read_only());
                }
                // Snapshot data never changes during an access, but discards must turn
                // into EACCES at once: no page cache for reads (mappings use it, in the
                // access's own inode).
                let a = self.access_if(i, id)?;
                // Counted (until `release`): while the snapshot is open read-write, no
                // mapped read enters the page cache (`read_snapshot_cached`).
                if matches!(node, Node::Snap(..)) && flags & libc::O_ACCMODE == libc::O_RDWR {
                    if let Ok(d) = self.device(i) {
                        d.count_rw_snapshot_handle(true);
                    }
                }
                Ok(Opened {
                    fh: a.id(),
                    flags: FopenFlags::FOPEN_DIRECT_IO,
                })
            }
            _ => Err(is_a_directory()),
        }
    }

    /// Reads the dirty map of device `i` for the handle of access `fh`.
    pub fn read_dirty_map(&self, i: usize, fh: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        match self.access_of(i) {
            Some(a) if a.id() == fh => Ok(a.dirty_map().read_at(offset, buf)),
            _ => Err(Error::new(
                Kind::Stale,
                "the backup access of this dirty map has ended",
            )),
        }
    }

    /// `statfs`: the fleecing dir's filesystem, the space snapshots consume while an
    /// access runs (the images have fixed sizes), so `df` and monitoring see what can
    /// fill up: (block size, blocks, free, available, inodes, free inodes). Until the
    /// first setup creates the fleecing dir (or after it is removed), the filesystem of
    /// its nearest existing parent: the one it will be created on. `statfs` must not
    /// fail on a healthy mount (`df`, and programs that `fstatfs` an open `live/NAME`).
    pub fn statfs(&self) -> Result<(u64, u64, u64, u64, u64, u64)> {
        let dir = self.engine.fleecing_dir();
        let mut at = dir;
        loop {
            match crate::sys::fs_space(at) {
                Ok(space) => return Ok(space),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                    match at.parent() {
                        Some(parent) => at = parent,
                        None => return Err(Error::io(format!("statfs of {}", at.display()), e)),
                    }
                }
                Err(e) => {
                    return Err(Error::io(
                        format!("statfs of fleecing dir {}", dir.display()),
                        e,
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::test_support::{errno_of, one_device_engine};

    #[test]
    fn inode_numbers_round_trip() {
        for node in [
            Node::Root,
            Node::LiveDir,
            Node::SnapDir,
            Node::Live(0),
            Node::Snap(0, 1),
            Node::Dirty(0, 1),
            Node::Live(2),
            Node::Snap(2, 7),
            Node::Dirty(2, u64::from(u32::MAX)),
        ] {
            assert_eq!(Node::from_ino(node.ino()), Some(node));
        }
        assert_eq!(Node::Live(1).ino(), 17);
        assert_eq!(Node::from_ino(FIRST_FILE + 9), Some(Node::Live(9)));
        // every access has its own snapshot inodes
        assert_ne!(Node::Snap(0, 1).ino(), Node::Snap(0, 2).ino());
        assert_ne!(Node::Dirty(0, 1).ino(), Node::Snap(0, 2).ino());
        assert_eq!(Node::from_ino(0), None);
        assert_eq!(Node::from_ino(4), None);
    }

    /// Owners and modes under each access policy, without a mount: a 0644 image in a
    /// 0700 directory.
    #[test]
    fn modes_under_allow_other_and_explicit_ones() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private");
        std::fs::create_dir(&private).unwrap();
        let img = private.join("d.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let engine = one_device_engine(dir.path(), &img);
        let ns = |p: AccessPolicy| Namespace::new(engine.clone(), (0, 0)).with_policy(p);
        let perm = |ns: &Namespace, n: Node| ns.attr(n).map(|a| a.perm).unwrap();
        // Without a policy: the source's mode, directories 0755.
        let plain = ns(AccessPolicy::default());
        assert_eq!(perm(&plain, Node::Live(0)), 0o644);
        assert_eq!(perm(&plain, Node::LiveDir), 0o755);
        // --allow-other: only the owner class gets through the 0700 directory.
        let other = ns(AccessPolicy {
            allow_other: true,
            ..AccessPolicy::default()
        });
        assert_eq!(perm(&other, Node::Live(0)), 0o600);
        assert_eq!(perm(&other, Node::LiveDir), 0o500);
        // Explicit mode and owner.
        let explicit = ns(AccessPolicy {
            allow_other: true,
            mode: Some(0o640),
            uid: Some(7),
            gid: Some(8),
        });
        let a = explicit.attr(Node::Live(0)).unwrap();
        assert_eq!((a.perm, a.uid, a.gid), (0o640, 7, 8));
        let d = explicit.attr(Node::Root).unwrap();
        assert_eq!((d.perm, d.uid, d.gid), (0o550, 7, 8));
        assert_eq!(dir_mode_for(0o604), 0o505);
    }

    /// The errno of every refusal of the namespace, without a mount: an engine over one
    /// small image file, before and during an access.
    #[test]
    fn errnos_of_the_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let engine = one_device_engine(dir.path(), &img);
        let ns = Namespace::new(engine.clone(), (0, 0));
        let live = Node::Live(0);

        assert_eq!(errno_of(ns.node(INodeNo(99))), libc::ENOENT);
        assert_eq!(errno_of(ns.lookup(Node::Root, "nope")), libc::ENOENT);
        assert_eq!(ns.lookup(Node::Root, "live").unwrap().0, Node::LiveDir);
        assert_eq!(ns.lookup(Node::LiveDir, "d").unwrap().0, live);
        // Outside an access the snapshot files do not exist.
        assert_eq!(errno_of(ns.lookup(Node::SnapDir, "d")), libc::ENOENT);
        // An inode of an access that is not (or no longer) the current one is stale.
        assert_eq!(errno_of(ns.attr(Node::Snap(0, 1))), libc::ESTALE);
        assert_eq!(
            errno_of(ns.open(Node::Snap(0, 1), libc::O_RDONLY, true, false)),
            libc::ESTALE
        );
        assert_eq!(
            errno_of(ns.open(Node::LiveDir, libc::O_RDONLY, true, false)),
            libc::EISDIR
        );
        assert_eq!(errno_of(ns.entries(live)), libc::ENOTDIR);

        let attr = ns.attr(live).unwrap();
        assert_eq!(
            errno_of(ns.check_setattr(live, &attr, Some(attr.size), false)),
            0
        );
        assert_eq!(
            errno_of(ns.check_setattr(live, &attr, Some(1), false)),
            libc::EPERM
        );
        assert_eq!(
            errno_of(ns.check_setattr(live, &attr, None, true)),
            libc::EPERM
        );
        assert_eq!(
            errno_of(ns.check_setattr(Node::Snap(0, 1), &attr, Some(1), false)),
            libc::EROFS
        );
        assert_eq!(
            errno_of(ns.check_setattr(Node::Root, &attr, Some(1), false)),
            libc::EISDIR
        );

        // Direct I/O for live files unless --live-cache, or without a coherent kernel.
        let o = ns.open(live, libc::O_RDWR, true, false).unwrap();
        assert!(o.flags.contains(FopenFlags::FOPEN_DIRECT_IO));
        let o = ns.open(live, libc::O_RDWR, true, true).unwrap();
        assert_eq!(o.flags, FopenFlags::FOPEN_KEEP_CACHE);
        let o = ns
            .open(live, libc::O_RDWR | libc::O_DIRECT, true, true)
            .unwrap();
        assert!(o.flags.contains(FopenFlags::FOPEN_DIRECT_IO));
        let o = ns.open(live, libc::O_RDWR, false, false).unwrap();
        assert_eq!(o.flags, FopenFlags::FOPEN_KEEP_CACHE);

        engine.setup("t", None, None).unwrap();
        let id = engine.active().unwrap().0;
        let snap = ns
            .open(Node::Snap(0, id), libc::O_RDWR, true, false)
            .unwrap();
        assert_eq!((snap.fh, snap.flags), (id, FopenFlags::FOPEN_DIRECT_IO));
        assert_eq!(
            errno_of(ns.open(Node::Dirty(0, id), libc::O_WRONLY, true, false)),
            libc::EROFS
        );
        assert_eq!(
            ns.open(Node::Dirty(0, id), libc::O_RDONLY, true, false)
                .unwrap()
                .fh,
            id
        );
        let names: Vec<String> = ns
            .entries(Node::SnapDir)
            .unwrap()
            .into_iter()
            .map(|e| e.2)
            .collect();
        assert_eq!(names, [".", "..", "d", "d.dirty"]);
        let mut buf = [0u8; 64];
        assert!(ns.read_dirty_map(0, id, 0, &mut buf).unwrap() > 0);
        assert_eq!(
            errno_of(ns.read_dirty_map(0, id + 1, 0, &mut buf)),
            libc::ESTALE
        );
        engine.teardown("t", false).unwrap();
        assert_eq!(
            errno_of(ns.read_dirty_map(0, id, 0, &mut buf)),
            libc::ESTALE
        );
    }

    #[test]
    fn refusals_carry_the_kinds_of_their_errnos() {
        assert_eq!(is_a_directory().errno(), libc::EISDIR);
        assert_eq!(read_only().errno(), libc::EROFS);
        assert_eq!(not_permitted().errno(), libc::EPERM);
    }
}

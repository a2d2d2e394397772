//! The source of a device: the live disk image, a regular file or a block device.
//!
//! Owns the only file descriptor fleecefs writes the image through. All I/O is
//! positional (`pread`/`pwrite`), so any number of threads use it at once.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, IoContext, Result};
use crate::sys;

/// What the source is, and who owns it (live/snapshot files carry its owner and mode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Device number of the filesystem holding the source (or of the block device).
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// True for a block device.
    pub block_device: bool,
}

/// The permission bits of a file owned by `uid`:`gid` at `path` that its directories let
/// through, conservatively: a class keeps its bits only if every directory above the
/// file lets it search (`x`). Others need `o+x` everywhere; the file's group `o+x`, or
/// `g+x` on a directory of the same group; its owner `o+x`, or `u+x` on a directory it
/// owns. A directory that cannot be read for its mode lets nothing through.
pub fn reach(path: &Path, uid: u32, gid: u32) -> u32 {
    let Ok(real) = path.canonicalize() else {
        return 0;
    };
    let mut mask = 0o777;
    for dir in real.ancestors().skip(1) {
        let Ok(m) = std::fs::metadata(dir) else {
            return 0;
        };
        mask &= dir_lets_through(m.mode(), m.uid(), m.gid(), uid, gid);
    }
    mask
}

/// The classes of a file owned by `uid`:`gid` that a directory (mode `mode`, owned by
/// `duid`:`dgid`) lets search it, as permission bits.
pub fn dir_lets_through(mode: u32, duid: u32, dgid: u32, uid: u32, gid: u32) -> u32 {
    let other = mode & 0o001 != 0;
    let group = other || (dgid == gid && mode & 0o010 != 0);
    let owner = other || (duid == uid && mode & 0o100 != 0);
    (if owner { 0o700 } else { 0 })
        | (if group { 0o070 } else { 0 })
        | (if other { 0o007 } else { 0 })
}

/// `(dev, ino, block_device)` of the file at `path` as [`Identity`] records them, if it
/// can be looked up (same file checks before opening).
pub fn identity_of(path: &Path) -> Option<(u64, u64, bool)> {
    let meta = std::fs::metadata(path).ok()?;
    let block = meta.file_type().is_block_device();
    Some((
        if block { meta.rdev() } else { meta.dev() },
        meta.ino(),
        block,
    ))
}

/// How snapshot reads read the source (`mount --backup-read`).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum BackupRead {
    /// Through the page cache, like every other read of the source.
    #[default]
    Cached,
    /// With `O_DIRECT` where aligned: no CPU copy out of the page cache, and a backup of
    /// an image larger than memory does not evict what the guest has cached.
    Direct,
}

/// Alignment of offsets, lengths and buffers of direct reads: the page size, which every
/// logical block size fleecefs meets (512, 4096) divides.
pub const DIRECT_ALIGN: usize = 4096;

/// Refuses a source at `path` of type `ft` that is neither a regular file nor a block
/// device.
fn check_file_type(path: &Path, ft: std::fs::FileType) -> Result<()> {
    if ft.is_file() || ft.is_block_device() {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "source {} is not a regular file or block device",
        path.display()
    )))
}

/// Opens `file` again (the same inode, through `/proc/self/fd`) read-only with
/// `O_DIRECT`; `None` where the filesystem does not take it.
fn open_direct(file: &File, path: &Path) -> Option<File> {
    use std::os::fd::AsRawFd;
    let r = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()));
    match r {
        Ok(f) => Some(f),
        Err(e) => {
            log::warn!(
                "source {}: --backup-read direct: O_DIRECT is refused ({e}); snapshot reads \
                 go through the page cache",
                path.display()
            );
            None
        }
    }
}

/// What [`Source::now`] reports.
pub struct SourceNow {
    /// Modification time.
    pub mtime: std::time::SystemTime,
    /// Change time.
    pub ctime: std::time::SystemTime,
    /// Allocated 512-byte blocks (`st_blocks`).
    pub blocks: u64,
}

/// An open source image.
pub struct Source {
    file: File,
    /// The same file opened again with `O_DIRECT`, for backup reads (`None` where the
    /// filesystem refuses `O_DIRECT`). See [`Source::read_for_backup`].
    direct: Option<File>,
    /// Cleared when a direct read fails with EINVAL (alignment the device does not take).
    direct_ok: AtomicBool,
    /// Bytes read with `O_DIRECT` so far.
    direct_bytes: AtomicU64,
    path: PathBuf,
    /// Changed only by the engine while the device's gate is held exclusively.
    size: AtomicU64,
    identity: Identity,
    /// The permission bits the directories above the source let through ([`reach`]).
    reach: u32,
}

impl Source {
    /// Opens `path` read-write, snapshot reads through the page cache. It must be a
    /// non-empty regular file or block device.
    pub fn open(path: &Path) -> Result<Source> {
        Source::open_with(path, BackupRead::Cached)
    }

    /// Opens `path` read-write, with snapshot reads as `backup_read` says.
    pub fn open_with(path: &Path, backup_read: BackupRead) -> Result<Source> {
        let file = Source::open_file(path)?;
        Source::from_file(path, file, backup_read)
    }

    /// Opens `path` read-write and locks it (a regular file's OFD lock, a block device's
    /// `O_EXCL`), as [`Source::open_with`] does, for [`Source::from_file`] now or later
    /// (the keeper holds these files for every worker).
    pub fn open_file(path: &Path) -> Result<File> {
        let meta = std::fs::metadata(path)
            .context(|| format!("source {} cannot be opened", path.display()))?;
        let ft = meta.file_type();
        check_file_type(path, ft)?;
        let open = |flags: libc::c_int| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC | flags)
                .open(path)
        };
        let cannot_open = || format!("source {} cannot be opened read-write", path.display());
        let file = if ft.is_block_device() {
            // O_EXCL on a block device: refused (EBUSY) while it is mounted or opened
            // exclusively. A fleecefs killed a moment ago may still be exiting: wait for
            // it (bounded), found through the device opened without O_EXCL.
            let probe = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .context(|| format!("source {} cannot be opened", path.display()))?;
            crate::holders::open_excl_waiting_for_dying(&probe, || open(libc::O_EXCL)).map_err(
                |e| {
                    if e.raw_os_error() != Some(libc::EBUSY) {
                        return Error::io(cannot_open(), e);
                    }
                    let who = crate::holders::describe(&probe);
                    Error::busy(format!(
                        "source {} is in use: it is mounted or open exclusively{}",
                        path.display(),
                        if who.is_empty() {
                            " (no process has it open: a mounted filesystem, device-mapper, \
                             md or swap holds it)"
                                .to_string()
                        } else {
                            who
                        }
                    ))
                },
            )?
        } else {
            open(0).context(cannot_open)?
        };
        // A fleecefs killed a moment ago may still be exiting: wait for it (bounded).
        crate::holders::lock_waiting_for_dying(
            &file,
            || sys::lock_exclusive(&file),
            sys::is_lock_conflict,
        )
        .or_else(|e| {
            if sys::is_lock_conflict(&e) {
                Err(Error::busy(format!(
                    "source {} is in use: another process holds a lock on it \
                     (another fleecefs daemon, or QEMU){}",
                    path.display(),
                    crate::holders::describe(&file)
                )))
            } else {
                // A filesystem without locks (ENOLCK): serve, but say what is not guarded.
                log::warn!(
                    "cannot lock source {} ({e}): nothing stops another process from writing it",
                    path.display()
                );
                Ok(())
            }
        })?;
        Ok(file)
    }

    /// The source open as `file` (from [`Source::open_file`]; `path` for messages and
    /// reach), with snapshot reads as `backup_read` says. Nothing is looked up by path.
    pub fn from_file(path: &Path, file: File, backup_read: BackupRead) -> Result<Source> {
        let meta = file
            .metadata()
            .context(|| format!("stat of source {}", path.display()))?;
        let ft = meta.file_type();
        check_file_type(path, ft)?;
        let size = if ft.is_block_device() {
            sys::block_device_size(&file)
                .context(|| format!("size of block device {}", path.display()))?
        } else {
            meta.len()
        };
        if size == 0 {
            return Err(Error::invalid(format!(
                "source {} is empty (size 0)",
                path.display()
            )));
        }
        let identity = Identity {
            dev: if ft.is_block_device() {
                meta.rdev()
            } else {
                meta.dev()
            },
            ino: meta.ino(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            block_device: ft.is_block_device(),
        };
        let direct = match backup_read {
            BackupRead::Direct => open_direct(&file, path),
            BackupRead::Cached => None,
        };
        Ok(Source {
            file,
            direct_ok: AtomicBool::new(direct.is_some()),
            direct,
            direct_bytes: AtomicU64::new(0),
            path: path.to_path_buf(),
            size: AtomicU64::new(size),
            reach: reach(path, identity.uid, identity.gid),
            identity,
        })
    }

    /// The permission bits (`0o777` at most) that the directories above the source let
    /// through to the file's owner, group and others: what a user who is not root can
    /// reach of it by its path.
    pub fn reach(&self) -> u32 {
        self.reach
    }

    /// The path the source was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes served now. Changes only by `fleecefs resize`, with the device's
    /// gate held exclusively.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Records a new served size (the caller holds the device's gate exclusively).
    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release)
    }

    /// The size of the file or block device now (`fstat`, `BLKGETSIZE64`), which differs
    /// from [`Source::size`] after an `lvextend` or `truncate` until `fleecefs resize`.
    pub fn current_size(&self) -> Result<u64> {
        if self.identity.block_device {
            sys::block_device_size(&self.file)
                .context(|| format!("size of block device {}", self.path.display()))
        } else {
            self.file
                .metadata()
                .map(|m| m.len())
                .context(|| format!("stat of source {}", self.path.display()))
        }
    }

    /// Sets the length of a regular-file source (sparse when it grows) and syncs it.
    pub fn truncate_file(&self, size: u64) -> Result<()> {
        self.file
            .set_len(size)
            .and_then(|_| self.file.sync_all())
            .context(|| {
                format!(
                    "changing the size of source {} to {size} bytes",
                    self.path.display()
                )
            })
    }

    /// Owner, mode and identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The open file, for positional I/O.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Current modification time in nanoseconds since the epoch (identity checks).
    pub fn mtime_ns(&self) -> Result<i128> {
        let m = self
            .file
            .metadata()
            .context(|| format!("stat of source {}", self.path.display()))?;
        Ok(i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()))
    }

    /// Times and allocation of the source now, from one `fstat`: the live file shows
    /// them, so tools that compare times see every change and `du` sees what the source
    /// holds. A block device counts as fully allocated.
    pub fn now(&self) -> Option<SourceNow> {
        let m = self.file.metadata().ok()?;
        let at = |secs: i64, nsecs: i64| {
            std::time::UNIX_EPOCH
                + std::time::Duration::new(secs.max(0) as u64, nsecs.clamp(0, 999_999_999) as u32)
        };
        Some(SourceNow {
            mtime: at(m.mtime(), m.mtime_nsec()),
            ctime: at(m.ctime(), m.ctime_nsec()),
            blocks: if self.identity.block_device {
                self.size().div_ceil(512)
            } else {
                m.blocks()
            },
        })
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        sys::read_exact_at(&self.file, buf, offset)
            .context(|| format!("reading source {} at {offset}", self.path.display()))
    }

    /// Reads `buf.len()` bytes at `offset` for a backup (a snapshot read of clusters not
    /// copied): with `O_DIRECT` where offset, length and buffer are aligned, else through
    /// the page cache. A direct read costs the CPU no copy out of the page cache (the
    /// device, or the hypervisor, moves the data) and leaves the cache to the guest; the
    /// kernel writes back dirty cached pages of the range first, so it reads what a
    /// buffered read would.
    pub fn read_for_backup(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let done = self.read_direct_prefix(buf, offset);
        if done < buf.len() {
            self.read_at(&mut buf[done..], offset + done as u64)?;
        }
        Ok(())
    }

    /// Reads the longest aligned prefix of `buf` with `O_DIRECT`; returns how much it read
    /// (0 when not aligned, not possible, or failed: the caller reads the rest buffered,
    /// and reports any error that persists).
    fn read_direct_prefix(&self, buf: &mut [u8], offset: u64) -> usize {
        let Some(direct) = &self.direct else {
            return 0;
        };
        let len = buf.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        if len == 0
            || offset % DIRECT_ALIGN as u64 != 0
            || buf.as_ptr() as usize % DIRECT_ALIGN != 0
            || !self.direct_ok.load(Ordering::Relaxed)
        {
            return 0;
        }
        match std::os::unix::fs::FileExt::read_at(direct, &mut buf[..len], offset) {
            Ok(n) => {
                let n = n / DIRECT_ALIGN * DIRECT_ALIGN;
                self.direct_bytes.fetch_add(n as u64, Ordering::Relaxed);
                n
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                if self.direct_ok.swap(false, Ordering::Relaxed) {
                    log::warn!(
                        "source {}: --backup-read direct: a direct read failed ({e}); \
                         snapshot reads go through the page cache from now on",
                        self.path.display()
                    );
                }
                0
            }
            Err(_) => 0,
        }
    }

    /// Bytes snapshot reads have read with `O_DIRECT` (`--backup-read direct`).
    pub fn direct_read_bytes(&self) -> u64 {
        self.direct_bytes.load(Ordering::Relaxed)
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        sys::write_all_at(&self.file, buf, offset)
            .context(|| format!("writing source {} at {offset}", self.path.display()))
    }

    /// SEEK_DATA (`data`) or SEEK_HOLE on the source: where its next data (hole) at or
    /// after `offset` is; `None` when there is none. A block device is all data (it has
    /// no SEEK_HOLE: lseek answers EINVAL): data at `offset`, no hole before its end (the
    /// callers clip both to the device size).
    pub fn seek(&self, offset: u64, data: bool) -> Result<Option<u64>> {
        if self.identity.block_device {
            return Ok(data.then_some(offset));
        }
        sys::seek_data_or_hole(&self.file, offset, data).context(|| {
            format!(
                "lseek(SEEK_{}) on source {} at {offset}",
                if data { "DATA" } else { "HOLE" },
                self.path.display()
            )
        })
    }

    /// The granularity `fallocate` takes on this source: the logical block size of a
    /// block device (512 if it cannot be read), 1 for a regular file.
    pub fn logical_block_size(&self) -> u64 {
        if !self.identity.block_device {
            return 1;
        }
        sys::logical_block_size(&self.file).map_or(512, |b| b.max(1))
    }

    /// `fallocate(2)` on the source (punch hole, zero range, allocate).
    pub fn fallocate(&self, mode: i32, offset: u64, len: u64) -> Result<()> {
        sys::fallocate(&self.file, mode, offset, len).context(|| {
            format!(
                "fallocate(mode {mode:#x}) on source {} at {offset}+{len}",
                self.path.display()
            )
        })
    }

    /// Flushes the source to its storage (`fdatasync` when `data_only`).
    pub fn sync(&self, data_only: bool) -> Result<()> {
        let r = if data_only {
            self.file.sync_data()
        } else {
            self.file.sync_all()
        };
        r.context(|| format!("fsync of source {}", self.path.display()))
    }
}

#[cfg(test)]
mod reach_tests {
    use super::*;

    #[test]
    fn directories_let_classes_through() {
        // 0755 root dir: everyone.
        assert_eq!(dir_lets_through(0o755, 0, 0, 1000, 1000), 0o777);
        // 0700 root dir: nobody but an owner that is root.
        assert_eq!(dir_lets_through(0o700, 0, 0, 0, 0), 0o700);
        assert_eq!(dir_lets_through(0o700, 0, 0, 1000, 1000), 0);
        // 0750 dir of the file's group: owner (not the dir's) not through u+x.
        assert_eq!(dir_lets_through(0o750, 0, 50, 1000, 50), 0o070);
        assert_eq!(dir_lets_through(0o750, 1000, 50, 1000, 50), 0o770);
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("d");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("f"), b"x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
        let owner = (sys_uid(), sys_gid());
        let f = d.join("f");
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let above = reach(t.path(), owner.0, owner.1);
        assert_eq!(reach(&f, owner.0, owner.1), above);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(reach(&f, owner.0, owner.1), above & 0o700);
        assert_eq!(reach(&t.path().join("missing"), owner.0, owner.1), 0);
    }

    fn sys_uid() -> u32 {
        crate::sys::euid()
    }

    fn sys_gid() -> u32 {
        crate::sys::process_owner().1
    }
}

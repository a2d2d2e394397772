//! The state directory: the daemon lock, the record of fleecing files that exist, and
//! (in `bitmaps/`) the persistent dirty bitmaps.
//!
//! The fleecing record is written (and synced) *before* any fleecing file is created and
//! removed only after they are all deleted, so after a crash the next `mount` knows
//! exactly which leftovers to remove.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::secure_path::{open_in, open_trusted_dir, remove_in, rename_in, Dir, Missing};

/// Name of the daemon lock (holds the pid) inside the state directory.
pub const LOCK_FILE: &str = "fleecefs.lock";
const ACCESS_RECORD: &str = "access.json";
/// The id of the last access set up with this state directory (decimal).
const ACCESS_ID: &str = "access-id";
/// Name of the record of the served device set inside the state directory.
pub const DEVICE_RECORD: &str = "devices.json";
/// Name of the control socket inside the state directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Name of the directory of the persistent bitmaps inside the state directory.
pub const BITMAP_DIR: &str = "bitmaps";
/// Name of the default fleecing directory inside the state directory.
pub const FLEECING_DIR: &str = "fleecing";
/// Name of the daemon log inside the state directory (background daemons log here).
pub const LOG_FILE: &str = "fleecefs.log";

/// What the state directory remembers about an active access.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct AccessRecord {
    /// The access id (snapshot handles and inode numbers carry it; 0 in records written
    /// before it was recorded).
    #[serde(default)]
    pub id: u64,
    /// Target ID of the access.
    pub target: String,
    /// When it started (seconds since the epoch).
    pub started_at: u64,
    /// Device name and fleecing file path, for every device of the access.
    pub devices: Vec<(String, PathBuf)>,
}

/// One served device in the device record.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RecordedDevice {
    /// Device name.
    pub name: String,
    /// Absolute source path.
    pub path: PathBuf,
    /// Its slot: inode numbers and gate order derive from it.
    pub slot: usize,
    /// The served file's device number (the block device's own for a block device) and
    /// inode number, so a worker that has to open the source by its path again (the
    /// keeper does not hold it) refuses a path that names another file now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<(u64, u64)>,
    /// Its vhost-user-blk exports (`--vhost-user-blk`), served again by every later
    /// worker and by a `mount` that serves the recorded devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vhost_user_blk: Vec<RecordedExport>,
}

/// A vhost-user-blk export of a recorded device.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RecordedExport {
    /// The listening socket (absolute).
    pub socket: PathBuf,
    /// A read-only disk.
    #[serde(default)]
    pub read_only: bool,
}

/// The served device set (`devices.json`), so a restarted daemon serves the same set
/// under the same inode numbers.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct DeviceRecord {
    /// Format version (1).
    pub version: u32,
    /// The slot the next new device gets: slots are never given out twice.
    pub next_slot: usize,
    /// The devices served, in slot order.
    pub devices: Vec<RecordedDevice>,
}

/// Reads the device record of the state directory at `dir`, if there is one. Does not
/// need the lock (`mount` reads it before starting the daemon).
pub fn read_device_record(dir: &Path) -> Result<Option<DeviceRecord>> {
    let p = dir.join(DEVICE_RECORD);
    let Some(d) = open_trusted_dir(dir, "state directory", Missing::Allow)? else {
        return Ok(None);
    };
    match read_in(&d, DEVICE_RECORD) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::invalid(format!("device record {} is damaged: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(nofollow_error(format!("reading {}", p.display()), e)),
    }
}

/// The whole file `name` in `dir`, never through a symlink.
fn read_in(dir: &File, name: &str) -> std::io::Result<Vec<u8>> {
    let mut f = open_in(dir, name.as_ref(), libc::O_RDONLY, 0)?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// An I/O error of a file opened with `O_NOFOLLOW`; ELOOP says it is a symlink.
fn nofollow_error(context: String, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        Error::invalid(format!(
            "{context}: it is a symlink, which fleecefs never follows in its state directory (remove it)"
        ))
    } else {
        Error::io(context, e)
    }
}

/// An open, locked state directory.
pub struct StateDir {
    path: PathBuf,
    dir: File,
    _lock: File,
}

impl StateDir {
    /// Creates `path` if needed (mode 0700) and takes its lock. Fails if another daemon
    /// holds it, or if the directory or one above it is not trusted
    /// ([`crate::secure_path`]).
    pub fn open(path: &Path) -> Result<StateDir> {
        let dir = open_trusted_dir(path, "state directory", Missing::Create)?
            .ok_or_else(|| Error::not_found(format!("state directory {}", path.display())))?;
        let path = path
            .canonicalize()
            .context(|| format!("resolving state directory {}", path.display()))?;
        // Its subdirectories are never followed as symlinks either.
        for sub in [BITMAP_DIR, FLEECING_DIR] {
            if let Ok(Some(_)) = crate::secure_path::symlink_in(&dir, sub.as_ref()) {
                return Err(Error::invalid(format!(
                    "{} is a symlink, which fleecefs never follows in its state directory (remove it)",
                    path.join(sub).display()
                )));
            }
        }
        let lock_path = path.join(LOCK_FILE);
        let mut lock = open_in(
            &dir,
            LOCK_FILE.as_ref(),
            libc::O_RDWR | libc::O_CREAT,
            0o600,
        )
        .map_err(|e| nofollow_error(format!("opening {}", lock_path.display()), e))?;
        // A daemon killed a moment ago may still be exiting: wait for it (bounded).
        let locked = crate::holders::lock_waiting_for_dying(
            &lock,
            || crate::sys::try_flock(&lock, true),
            |e| e.raw_os_error() == Some(libc::EWOULDBLOCK),
        );
        if locked.is_err() {
            let mut holder = String::new();
            let _ = (&lock).read_to_string(&mut holder);
            return Err(Error::busy(format!(
                "state directory {} is in use by another fleecefs daemon (pid {})",
                path.display(),
                holder.trim()
            )));
        }
        lock.set_len(0)
            .context(|| format!("writing {}", lock_path.display()))?;
        let _ = writeln!(lock, "{}", std::process::id());
        Ok(StateDir {
            path,
            dir,
            _lock: lock,
        })
    }

    /// The state directory `path` (absolute, existing) under `lock`, an open file of its
    /// lock that another process of this mount (the keeper) holds locked.
    pub fn adopt(path: &Path, lock: File) -> Result<StateDir> {
        let dir = open_trusted_dir(path, "state directory", Missing::Fail)?
            .ok_or_else(|| Error::not_found(format!("state directory {}", path.display())))?;
        let path = path
            .canonicalize()
            .context(|| format!("resolving state directory {}", path.display()))?;
        Ok(StateDir {
            path,
            dir,
            _lock: lock,
        })
    }

    /// The fd of the lock file (open while this StateDir lives).
    pub fn lock_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self._lock)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The daemon log, opened under the directory's fd
    /// ([`crate::secure_path::open_log_in`]: appending, 0600, never through a symlink).
    pub fn open_log(&self) -> std::io::Result<File> {
        crate::secure_path::open_log_in(&self.dir, LOG_FILE.as_ref())
    }

    /// The control socket path.
    pub fn socket_path(&self) -> PathBuf {
        self.path.join(CONTROL_SOCKET)
    }

    /// Directory for persistent bitmaps (created on demand, mode 0700, and refused when
    /// it is a symlink or writable by another user).
    pub fn bitmap_dir(&self) -> Result<Dir> {
        let dir = self.path.join(BITMAP_DIR);
        let fd = crate::secure_path::subdir_in(&self.dir, BITMAP_DIR.as_ref(), &dir)?;
        Ok(Dir::new(fd, dir))
    }

    /// Records the served device set (atomically).
    pub fn record_devices(&self, record: &DeviceRecord) -> Result<()> {
        let text = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::invalid(format!("encoding device record: {e}")))?;
        write_atomic_in(&self.dir, &self.path, DEVICE_RECORD, &text)
    }

    /// Records an access and its fleecing files before they are created.
    pub fn record_access(&self, record: &AccessRecord) -> Result<()> {
        let text = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::invalid(format!("encoding access record: {e}")))?;
        write_atomic_in(&self.dir, &self.path, ACCESS_RECORD, &text)
    }

    /// The id of the last access set up with this state directory (0: none yet). A
    /// restarted daemon or worker gives out higher ones, so a snapshot handle of an
    /// earlier access never reads a later one.
    pub fn last_access_id(&self) -> Result<u64> {
        let p = self.path.join(ACCESS_ID);
        match read_in(&self.dir, ACCESS_ID) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).trim().parse().map_err(|_| {
                Error::invalid(format!(
                    "{} is damaged (not a number): remove it only when no snapshot file of this mount is open",
                    p.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(nofollow_error(format!("reading {}", p.display()), e)),
        }
    }

    /// Records `id` as the last access id (before the access is set up).
    pub fn record_access_id(&self, id: u64) -> Result<()> {
        write_atomic_in(
            &self.dir,
            &self.path,
            ACCESS_ID,
            format!("{id}\n").as_bytes(),
        )
    }

    /// Forgets the access record once its fleecing files are gone.
    pub fn clear_access(&self) -> Result<()> {
        let p = self.path.join(ACCESS_RECORD);
        remove_in(&self.dir, ACCESS_RECORD.as_ref())
            .and_then(|()| self.dir.sync_all())
            .context(|| format!("removing {}", p.display()))
    }

    /// The access record left by a daemon that did not shut down cleanly, if any.
    pub fn leftover_access(&self) -> Result<Option<AccessRecord>> {
        let p = self.path.join(ACCESS_RECORD);
        match read_in(&self.dir, ACCESS_RECORD) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(r) => Ok(Some(r)),
                Err(e) => {
                    log::warn!("ignoring damaged access record {}: {e}", p.display());
                    Ok(None)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(nofollow_error(format!("reading {}", p.display()), e)),
        }
    }

    /// Removes the fleecing files of a leftover access record and the record itself.
    /// Returns the files that were removed. Only what a fleecing file can be is removed:
    /// a regular file named `*.fleece` in a trusted directory; anything else the record
    /// names is left alone with a warning.
    pub fn remove_leftovers(&self, record: &AccessRecord) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for (_, path) in &record.devices {
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                log::warn!(
                    "access record names {}: not a fleecing file, left alone",
                    path.display()
                );
                continue;
            };
            if !name.as_encoded_bytes().ends_with(b".fleece") {
                log::warn!(
                    "access record names {}: not a fleecing file, left alone",
                    path.display()
                );
                continue;
            }
            let dir = match open_trusted_dir(parent, "fleecing directory", Missing::Allow) {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(e) => {
                    log::warn!(
                        "leftover fleecing file {} left alone: {}",
                        path.display(),
                        crate::error::report(&e)
                    );
                    continue;
                }
            };
            let gone = match open_in(&dir, name, libc::O_RDONLY, 0).and_then(|f| f.metadata()) {
                Ok(m) if m.is_file() => remove_in(&dir, name),
                Ok(_) => {
                    log::warn!(
                        "leftover fleecing file {} is not a regular file: left alone",
                        path.display()
                    );
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => Err(e),
            };
            match gone {
                Ok(()) => removed.push(path.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(nofollow_error(
                        format!("removing leftover fleecing file {}", path.display()),
                        e,
                    ))
                }
            }
        }
        self.clear_access()?;
        Ok(removed)
    }
}

/// Writes `bytes` to `name` in `dir` atomically: temp file, fsync, rename, fsync of the
/// directory, all under the directory's fd. The temp file is made anew (`O_EXCL`, never
/// through a symlink).
pub fn write_atomic(dir: &Dir, name: &str, bytes: &[u8]) -> Result<()> {
    write_atomic_in(dir.file(), dir.path(), name, bytes)
}

/// [`write_atomic`] of `name` in the open directory `dir` (at `dir_path`, for messages).
fn write_atomic_in(dir: &File, dir_path: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp_name = Path::new(name).with_extension("tmp").into_os_string();
    let tmp = dir_path.join(&tmp_name);
    // A leftover of a crash (or anything else under that name) goes first: the temp file
    // is always a new one.
    remove_in(dir, &tmp_name).context(|| format!("removing {}", tmp.display()))?;
    let mut f = open_in(
        dir,
        &tmp_name,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        0o600,
    )
    .map_err(|e| nofollow_error(format!("creating {}", tmp.display()), e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .context(|| format!("writing {}", tmp.display()))?;
    rename_in(dir, &tmp_name, name.as_ref()).context(|| {
        format!(
            "renaming {} to {}",
            tmp.display(),
            dir_path.join(name).display()
        )
    })?;
    dir.sync_all()
        .context(|| format!("syncing directory {}", dir_path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_record_roundtrips() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        let again = StateDir::open(dir.path());
        assert!(again.is_err());
        assert!(again.err().unwrap().to_string().contains("in use"));
        assert_eq!(s.leftover_access().unwrap(), None);
        let f = dir.path().join("x.fleece");
        std::fs::write(&f, b"old").unwrap();
        let rec = AccessRecord {
            id: 3,
            target: "t".into(),
            started_at: 1,
            devices: vec![("d".into(), f.clone())],
        };
        s.record_access(&rec).unwrap();
        assert_eq!(s.leftover_access().unwrap(), Some(rec.clone()));
        assert_eq!(s.remove_leftovers(&rec).unwrap(), vec![f.clone()]);
        assert!(!f.exists());
        assert_eq!(s.leftover_access().unwrap(), None);
        drop(s);
        assert!(StateDir::open(dir.path()).is_ok());
    }

    #[test]
    fn never_follows_a_symlink_nor_removes_what_is_not_a_fleecing_file() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let st = dir.path().join("st");
        std::fs::create_dir(&st).unwrap();
        symlink(&victim, st.join(LOCK_FILE)).unwrap();
        let e = StateDir::open(&st).err().unwrap().to_string();
        assert!(e.contains("symlink"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        std::fs::remove_file(st.join(LOCK_FILE)).unwrap();
        // A temp file planted as a symlink is replaced, not written through.
        symlink(&victim, st.join("devices.tmp")).unwrap();
        let s = StateDir::open(&st).unwrap();
        s.record_devices(&DeviceRecord::default()).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // An access record naming another file leaves that file alone.
        let rec = AccessRecord {
            id: 0,
            target: "t".into(),
            started_at: 1,
            devices: vec![("d".into(), victim.clone())],
        };
        s.record_access(&rec).unwrap();
        assert_eq!(s.remove_leftovers(&rec).unwrap(), Vec::<PathBuf>::new());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        drop(s);
        // A state directory its group may write is refused.
        std::fs::set_permissions(&st, std::fs::Permissions::from_mode(0o770)).unwrap();
        let e = StateDir::open(&st).err().unwrap().to_string();
        assert!(e.contains("writable by its group"), "{e}");
    }

    #[test]
    fn device_records_without_exports_read_as_before_and_exports_read_back() {
        let old = br#"{"version":1,"next_slot":2,"devices":[{"name":"a","path":"/i/a.img","slot":0},{"name":"b","path":"/i/b.img","slot":1,"file":[1,2]}]}"#;
        let r: DeviceRecord = serde_json::from_slice(old).unwrap();
        assert!(r.devices.iter().all(|d| d.vhost_user_blk.is_empty()));
        // A device without exports is written as before.
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains("vhost_user_blk"), "{text}");
        let mut r = r;
        r.devices[1].vhost_user_blk = vec![
            RecordedExport {
                socket: "/run/b.sock".into(),
                read_only: false,
            },
            RecordedExport {
                socket: "/run/b-ro.sock".into(),
                read_only: true,
            },
        ];
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<DeviceRecord>(&text).unwrap(), r);
        let no_ro: RecordedExport = serde_json::from_str(r#"{"socket":"/s"}"#).unwrap();
        assert!(!no_ro.read_only);
    }

    #[test]
    fn the_last_access_id_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        assert_eq!(s.last_access_id().unwrap(), 0);
        s.record_access_id(41).unwrap();
        assert_eq!(s.last_access_id().unwrap(), 41);
        // A record of an older version has no id: 0, "a new one".
        let old: AccessRecord =
            serde_json::from_str(r#"{"target":"t","started_at":1,"devices":[]}"#).unwrap();
        assert_eq!(old.id, 0);
    }
}

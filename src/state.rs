//! The state directory: the daemon lock, the record of fleecing files that exist, and
//! (in `bitmaps/`) the persistent dirty bitmaps.
//!
//! The fleecing record is written (and synced) *before* any fleecing file is created and
//! removed only after they are all deleted, so after a crash the next `mount` knows
//! exactly which leftovers to remove.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// Name of the daemon lock (holds the pid) inside the state directory.
pub const LOCK_FILE: &str = "fleecefs.lock";
const ACCESS_RECORD: &str = "access.json";
/// Name of the control socket inside the state directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Name of the daemon log inside the state directory (background daemons log here).
pub const LOG_FILE: &str = "fleecefs.log";

/// What the state directory remembers about an active access.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct AccessRecord {
    /// Target ID of the access.
    pub target: String,
    /// When it started (seconds since the epoch).
    pub started_at: u64,
    /// Device name and fleecing file path, for every device of the access.
    pub devices: Vec<(String, PathBuf)>,
}

/// An open, locked state directory.
pub struct StateDir {
    path: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Creates `path` if needed (mode 0700) and takes its lock. Fails if another daemon
    /// holds it.
    pub fn open(path: &Path) -> Result<StateDir> {
        let created = !path.exists();
        fs::create_dir_all(path)
            .context(|| format!("creating state directory {}", path.display()))?;
        let path = path
            .canonicalize()
            .context(|| format!("resolving state directory {}", path.display()))?;
        // Only a directory made here: the mode of an existing one is its owner's choice
        // (the socket and the files inside are 0600 either way).
        if created {
            let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o700));
        }
        let lock_path = path.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&lock_path)
            .context(|| format!("opening {}", lock_path.display()))?;
        if crate::sys::try_flock(&lock, true).is_err() {
            let holder = fs::read_to_string(&lock_path).unwrap_or_default();
            return Err(Error::busy(format!(
                "state directory {} is in use by another fleecefs daemon (pid {})",
                path.display(),
                holder.trim()
            )));
        }
        lock.set_len(0)
            .context(|| format!("writing {}", lock_path.display()))?;
        let _ = writeln!(lock, "{}", std::process::id());
        Ok(StateDir { path, _lock: lock })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The control socket path.
    pub fn socket_path(&self) -> PathBuf {
        self.path.join(CONTROL_SOCKET)
    }

    /// Directory for persistent bitmaps (created on demand).
    pub fn bitmap_dir(&self) -> Result<PathBuf> {
        let dir = self.path.join("bitmaps");
        fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// Records an access and its fleecing files before they are created.
    pub fn record_access(&self, record: &AccessRecord) -> Result<()> {
        let text = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::invalid(format!("encoding access record: {e}")))?;
        write_atomic(&self.path.join(ACCESS_RECORD), &text)
    }

    /// Forgets the access record once its fleecing files are gone.
    pub fn clear_access(&self) -> Result<()> {
        let p = self.path.join(ACCESS_RECORD);
        match fs::remove_file(&p) {
            Ok(()) => sync_dir(&self.path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {}", p.display()), e)),
        }
    }

    /// The access record left by a daemon that did not shut down cleanly, if any.
    pub fn leftover_access(&self) -> Result<Option<AccessRecord>> {
        let p = self.path.join(ACCESS_RECORD);
        match fs::read(&p) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(r) => Ok(Some(r)),
                Err(e) => {
                    log::warn!("ignoring damaged access record {}: {e}", p.display());
                    Ok(None)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", p.display()), e)),
        }
    }

    /// Removes the fleecing files of a leftover access record and the record itself.
    /// Returns the files that were removed.
    pub fn remove_leftovers(&self, record: &AccessRecord) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for (_, path) in &record.devices {
            match fs::remove_file(path) {
                Ok(()) => removed.push(path.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::io(
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

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).context(|| format!("renaming {} into place", tmp.display()))?;
    sync_dir(dir)
}

/// fsync of a directory, so that renames and unlinks in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .context(|| format!("syncing directory {}", dir.display()))
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
        fs::write(&f, b"old").unwrap();
        let rec = AccessRecord {
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
}

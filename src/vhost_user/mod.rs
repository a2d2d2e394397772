//! The vhost-user-blk frontend: serves devices to VMMs (QEMU, Cloud Hypervisor,
//! crosvm) as virtio-blk disks over vhost-user sockets, with the rust-vmm crates
//! (`vhost`, `vhost-user-backend`, `virtio-queue`, `vm-memory`).
//!
//! The VMM shares the guest's memory; requests are read and written in place with
//! `preadv`/`pwritev` on the guest's buffers (no bounce buffer) through the same engine
//! calls `live/NAME` uses (`request.rs`), so copy-before-write, dirty bitmaps, break
//! policies and fleecing limits apply unchanged. `backend.rs` is the virtio-blk device
//! (features, configuration space, queues).
//!
//! Per export one thread (`vhost-NAME`) accepts a VMM on the listening socket and serves
//! it until it disconnects, then accepts the next; the queues run on threads of their own
//! (one per queue). A VMM that reconnects after the worker restarted (`reconnect=1` on
//! QEMU's chardev) sets the queues up again and resubmits what was not completed.

mod backend;
#[cfg(test)]
mod hostile;
mod request;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::engine::Engine;
use crate::error::{Error, IoContext, Result};
use crate::sched::BackupScheduler;
use crate::sync::Recover;

pub use backend::BlkBackend;

/// Most queues an export offers (at most the number of CPUs).
const MAX_QUEUES: usize = 16;

/// `--vhost-user-blk NAME=SOCKET[,ro]`: one export as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExportSpec {
    /// The device served.
    pub name: String,
    /// The listening socket (absolute).
    pub socket: PathBuf,
    /// Whether the guest may only read.
    pub read_only: bool,
}

impl ExportSpec {
    /// Parses `NAME=SOCKET[,ro]`; a relative SOCKET is taken from the current directory.
    pub fn parse(s: &str) -> Result<ExportSpec> {
        let bad = |why: &str| {
            Error::invalid(format!(
                "--vhost-user-blk '{}': {why} (expected NAME=SOCKET or NAME=SOCKET,ro)",
                s.escape_debug()
            ))
        };
        let (name, rest) = s.split_once('=').ok_or_else(|| bad("no '='"))?;
        let (socket, read_only) = match rest.strip_suffix(",ro") {
            Some(p) => (p, true),
            None => (rest, false),
        };
        if name.is_empty() {
            return Err(bad("no device name"));
        }
        if socket.is_empty() {
            return Err(bad("no socket path"));
        }
        let socket = Path::new(socket);
        let socket = if socket.is_absolute() {
            socket.to_path_buf()
        } else {
            std::env::current_dir()
                .context(|| "reading the current directory".into())?
                .join(socket)
        };
        Ok(ExportSpec {
            name: name.to_string(),
            socket,
            read_only,
        })
    }
}

/// A served export and its counters (for `status`).
pub struct Export {
    /// Device name; also the disk's serial (`GET_ID`).
    pub name: String,
    /// The listening socket.
    pub socket: PathBuf,
    /// Read-only export.
    pub read_only: bool,
    /// Queues offered to the VMM.
    pub queues: usize,
    connected: AtomicBool,
    requests: AtomicU64,
    errors: AtomicU64,
    /// The backend of the connected VMM, if any (told about resizes).
    current: Mutex<Option<Arc<BlkBackend>>>,
    /// The mount's backup scheduler: every request is a guest request it paces backup
    /// reads around, as a `live/NAME` request is.
    sched: Arc<BackupScheduler>,
}

impl Export {
    fn count(&self, failed: bool) {
        self.sched.note_guest();
        self.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The export as `status` shows it.
    pub fn status(&self) -> ExportStatus {
        ExportStatus {
            device: self.name.clone(),
            socket: self.socket.clone(),
            read_only: self.read_only,
            connected: self.connected.load(Ordering::Relaxed),
            queues: self.queues,
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// One export in a `status` reply (`vhost_user_blk`, a list).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExportStatus {
    /// The device served.
    pub device: String,
    /// The listening socket.
    pub socket: PathBuf,
    /// A read-only export.
    pub read_only: bool,
    /// A VMM is connected.
    pub connected: bool,
    /// Queues offered.
    pub queues: usize,
    /// Requests completed.
    pub requests: u64,
    /// Requests that completed with IOERR or UNSUPP, or were malformed.
    pub errors: u64,
}

/// The exports this process serves (set once at start).
static EXPORTS: OnceLock<Vec<Arc<Export>>> = OnceLock::new();

/// Adds `vhost_user_blk` (every export's state) to a `status` reply.
pub fn add_status(v: &mut serde_json::Value) {
    if let (Some(exports), Some(obj)) = (EXPORTS.get(), v.as_object_mut()) {
        let list: Vec<ExportStatus> = exports.iter().map(|e| e.status()).collect();
        obj.insert(
            "vhost_user_blk".into(),
            serde_json::to_value(list).unwrap_or_default(),
        );
    }
}

/// Device `name` has a new size: every connected VMM of its exports is told that the
/// configuration space changed, and reads the new capacity from it.
pub fn size_changed(name: &str) {
    for e in EXPORTS
        .get()
        .into_iter()
        .flatten()
        .filter(|e| e.name == name)
    {
        if let Some(b) = e.current.lock().recover().clone() {
            b.config_changed();
        }
    }
}

/// Checks the exports against the devices served: known names, one socket each.
pub fn validate(specs: &[ExportSpec], devices: &[String]) -> Result<()> {
    for (i, s) in specs.iter().enumerate() {
        if !devices.contains(&s.name) {
            return Err(Error::invalid(format!(
                "--vhost-user-blk: unknown device '{}' (devices: {})",
                s.name.escape_debug(),
                devices.join(", ")
            )));
        }
        if specs[..i].iter().any(|o| o.socket == s.socket) {
            return Err(Error::invalid(format!(
                "--vhost-user-blk: socket {} is given twice",
                s.socket.display()
            )));
        }
        trusted_dir(&s.socket)?;
        if let Ok(m) = std::fs::symlink_metadata(&s.socket) {
            if !m.file_type().is_socket() {
                return Err(Error::invalid(format!(
                    "--vhost-user-blk: {} exists and is not a socket",
                    s.socket.display()
                )));
            }
        }
    }
    Ok(())
}

/// Checks that the directory of `socket` exists and only root can change what is in it
/// (the daemon replaces a leftover socket there).
fn trusted_dir(socket: &Path) -> Result<()> {
    let dir = socket.parent().ok_or_else(|| {
        Error::invalid(format!(
            "--vhost-user-blk: socket {} has no directory",
            socket.display()
        ))
    })?;
    crate::secure_path::open_trusted_dir(
        dir,
        "--vhost-user-blk socket directory",
        crate::secure_path::Missing::Fail,
    )
    .map(|_| ())
}

/// Creates the listening sockets (mode 0600; a leftover socket at the path is replaced).
/// Call while no other thread creates files: the umask is process-wide.
pub fn bind(specs: &[ExportSpec]) -> Result<Vec<UnixListener>> {
    specs
        .iter()
        .map(|s| crate::secure_path::bind_private_socket(&s.socket, "vhost-user-blk socket"))
        .collect()
}

/// The listeners of `specs` over `fds`, the sockets [`bind`] made (held by the keeper,
/// inherited by this worker), in the same order.
pub fn listeners_from(
    specs: &[ExportSpec],
    fds: Vec<std::os::fd::OwnedFd>,
) -> Result<Vec<UnixListener>> {
    if fds.len() != specs.len() {
        return Err(Error::invalid(format!(
            "the keeper handed over {} listening socket(s) for {} --vhost-user-blk export(s)",
            fds.len(),
            specs.len()
        )));
    }
    Ok(fds.into_iter().map(UnixListener::from).collect())
}

/// Removes the listening sockets (the mount ends; a worker restart keeps them).
pub fn remove_sockets(specs: &[ExportSpec]) {
    for s in specs {
        let _ = std::fs::remove_file(&s.socket);
    }
}

/// Serves every export on its listener, each from a thread of its own.
pub fn start(
    engine: &Arc<Engine>,
    sched: &Arc<BackupScheduler>,
    specs: &[ExportSpec],
    listeners: Vec<UnixListener>,
) -> Result<()> {
    let queues = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_QUEUES);
    let mut exports = Vec::new();
    for (s, l) in specs.iter().zip(listeners) {
        let export = Arc::new(Export {
            name: s.name.clone(),
            socket: s.socket.clone(),
            read_only: s.read_only,
            queues,
            connected: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            current: Mutex::new(None),
            sched: sched.clone(),
        });
        exports.push(export.clone());
        let engine = engine.clone();
        std::thread::Builder::new()
            .name(format!("vhost-{}", s.name))
            .spawn(move || serve(engine, export, l))
            .context(|| format!("starting the vhost-user-blk thread of {}", s.name))?;
    }
    let _ = EXPORTS.set(exports);
    Ok(())
}

/// Accepts one VMM after the other on `listener` and serves it until it disconnects.
fn serve(engine: Arc<Engine>, export: Arc<Export>, listener: UnixListener) {
    let mut listener = Listener::from(listener);
    loop {
        // Counted as an open handle of live/NAME while a VMM may use it, so that
        // `device remove` refuses it.
        let device = engine
            .device_index(&export.name)
            .and_then(|slot| engine.open_live(slot));
        let Some(device) = device else {
            log::warn!(
                "vhost-user-blk {}: the device is no longer served; {} stops",
                export.name,
                export.socket.display()
            );
            let _ = std::fs::remove_file(&export.socket);
            return;
        };
        let backend = Arc::new(BlkBackend::new(export.clone(), device.clone()));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let result =
            VhostUserDaemon::new(format!("vhost-{}-req", export.name), backend.clone(), mem)
                .map_err(|e| e.to_string())
                .and_then(|mut daemon| {
                    daemon.start(&mut listener).map_err(|e| e.to_string())?;
                    export.connected.store(true, Ordering::Relaxed);
                    *export.current.lock().recover() = Some(backend);
                    log::info!("vhost-user-blk {}: a VMM connected", export.name);
                    let r = daemon.wait();
                    *export.current.lock().recover() = None;
                    export.connected.store(false, Ordering::Relaxed);
                    log::info!(
                        "vhost-user-blk {}: the VMM disconnected ({r:?})",
                        export.name
                    );
                    Ok(())
                });
        device.handle_released();
        if let Err(e) = result {
            log::warn!("vhost-user-blk {}: {e}", export.name);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::BackupShare;

    /// A request of a VMM is a guest request for the backup scheduler, so backup reads
    /// are paced around a guest that only uses the vhost-user-blk export.
    #[test]
    fn every_request_is_noted_as_guest_activity() {
        let sched = Arc::new(BackupScheduler::with_pool(1, Some(BackupShare::Auto)).unwrap());
        let export = Export {
            name: "vm".into(),
            socket: PathBuf::from("/nonexistent/vm.sock"),
            read_only: false,
            queues: 1,
            connected: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            current: Mutex::new(None),
            sched: sched.clone(),
        };
        assert_eq!(sched.guest_requests(), 0);
        export.count(false);
        export.count(true);
        assert_eq!(sched.guest_requests(), 2);
        assert_eq!(export.status().requests, 2);
        sched.close();
    }
}

//! The vhost-user-blk frontend: serves devices to VMMs (QEMU, Cloud Hypervisor,
//! crosvm) as virtio-blk disks over vhost-user sockets, with the rust-vmm crates
//! (`vhost`, `vhost-user-backend`, `virtio-queue`, `vm-memory`).
//!
//! The VMM shares the guest's memory; requests are read and written in place with
//! `preadv`/`pwritev` on the guest's buffers (no bounce buffer) through the same engine
//! calls `live/NAME` uses (`request.rs`), so copy-before-write, dirty bitmaps, break
//! policies and fleecing limits apply unchanged. `backend.rs` is the virtio-blk device
//! (features, configuration space, queues); `inflight.rs` the inflight region, which
//! records the requests taken and not completed.
//!
//! Per export one thread (`vhost-NAME`) accepts a VMM on the listening socket and serves
//! it until it disconnects, then accepts the next; the queues run on threads of their own
//! (one per queue). A VMM that reconnects after the worker restarted (`reconnect=1` on
//! QEMU's chardev) sets the queues up again and hands back the inflight region; the new
//! worker resubmits the requests it records before it takes new ones.

mod backend;
mod exports;
#[cfg(test)]
mod hostile;
mod inflight;
mod request;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::engine::Engine;
use crate::error::{Error, IoContext, Kind, Result};
use crate::sched::BackupScheduler;
use crate::state::RecordedExport;
use crate::sync::Recover;

pub use backend::BlkBackend;
pub use exports::{add_devices, add_status, remove_device, size_changed, sockets, start};

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

    /// The name the keeper holds the listening socket under.
    pub fn held_name(&self) -> String {
        format!("vhost-user-blk:{}", self.socket.display())
    }

    /// The export as the device record keeps it: device name, export.
    pub fn record(&self) -> (String, RecordedExport) {
        (
            self.name.clone(),
            RecordedExport {
                socket: self.socket.clone(),
                read_only: self.read_only,
            },
        )
    }

    /// Every export the device record keeps, in device order.
    pub fn all_from_record(r: &crate::state::DeviceRecord) -> Vec<ExportSpec> {
        r.devices
            .iter()
            .flat_map(|d| {
                d.vhost_user_blk
                    .iter()
                    .map(|e| Self::from_record(&d.name, e))
            })
            .collect()
    }

    /// An export of device `name` from the device record.
    pub fn from_record(name: &str, e: &RecordedExport) -> ExportSpec {
        ExportSpec {
            name: name.to_string(),
            socket: e.socket.clone(),
            read_only: e.read_only,
        }
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
    /// The export is to end: its thread stops accepting and returns.
    stop: AtomicBool,
    /// Ends the connection of the VMM being served, if any.
    shutdown: Mutex<Option<ShutdownHandle>>,
    /// The export holds an open handle of `live/NAME` (from a VMM's connection until its
    /// end); the handle is opened and released under this mutex.
    holds_handle: Mutex<bool>,
}

impl Export {
    fn new(spec: &ExportSpec, queues: usize, sched: Arc<BackupScheduler>) -> Export {
        Export {
            name: spec.name.clone(),
            socket: spec.socket.clone(),
            read_only: spec.read_only,
            queues,
            connected: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            current: Mutex::new(None),
            sched,
            stop: AtomicBool::new(false),
            shutdown: Mutex::new(None),
            holds_handle: Mutex::new(false),
        }
    }

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

    /// Asks the export's thread to end, and ends the connection of its VMM.
    fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.shutdown.lock().recover().as_ref() {
            h.shutdown();
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
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
        if specs[..i].iter().any(|o| same_socket(&o.socket, &s.socket)) {
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

/// Whether two socket paths name one file (symlinks and `..` resolved): binding the second
/// would replace the first.
fn same_socket(a: &Path, b: &Path) -> bool {
    crate::secure_path::resolved(a) == crate::secure_path::resolved(b)
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

/// Creates the listening sockets (mode 0600; a leftover socket at the path is replaced),
/// each with the name the keeper holds it under ([`ExportSpec::held_name`]). Call while
/// no other thread creates files: the umask is process-wide.
pub fn bind(specs: &[ExportSpec]) -> Result<Vec<(String, std::os::fd::OwnedFd)>> {
    specs
        .iter()
        .map(|s| {
            crate::secure_path::bind_private_socket(&s.socket, "vhost-user-blk socket")
                .map(|l| (s.held_name(), l.into()))
        })
        .collect()
}

/// Removes the listening sockets (the mount ends; a worker restart keeps them).
pub fn remove_sockets(specs: &[ExportSpec]) {
    for s in specs {
        let _ = std::fs::remove_file(&s.socket);
    }
}

/// How long the accept loop waits for a VMM before it looks whether the export ends.
const ACCEPT_POLL: Duration = Duration::from_millis(200);

/// Accepts one VMM after the other on `listener` and serves it until it disconnects,
/// until the export is stopped ([`Export::request_stop`]) or its device is no longer
/// served.
fn serve(engine: Arc<Engine>, export: Arc<Export>, listener: UnixListener) {
    let mut listener = Listener::from(listener);
    while !export.stopping() {
        // SAFETY: the fd belongs to `listener`, which outlives this borrow.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(listener.as_raw_fd()) };
        match crate::sys::wait_readable(fd, ACCEPT_POLL) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                log::warn!("vhost-user-blk {}: waiting for a VMM: {e}", export.name);
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
        }
        if export.stopping() {
            break;
        }
        // Counted as an open handle of live/NAME while a VMM uses it, so that
        // `device remove` knows to end the connection first; opened and flagged under
        // the flag's mutex, so that a removal counts it exactly.
        let opened = {
            let mut holds = export.holds_handle.lock().recover();
            let d = engine
                .device_index(&export.name)
                .ok_or_else(|| Error::not_found("removed"))
                .and_then(|slot| engine.open_live(slot).map(|d| (slot, d)));
            *holds = d.is_ok();
            d
        };
        let (slot, device) = match opened {
            Ok(d) => d,
            Err(e) if e.kind() == Kind::Busy => {
                // `device remove` of the device is under way: the VMM is turned away (if
                // the removal is refused, the next connection is served).
                match listener.accept() {
                    Ok(Some(stream)) => {
                        drop(stream);
                        log::info!(
                            "vhost-user-blk {}: a VMM connected while the device is being removed; turned away",
                            export.name
                        );
                    }
                    // Nothing taken (an error, or the VMM gone): not again at once.
                    _ => std::thread::sleep(ACCEPT_POLL),
                }
                continue;
            }
            Err(_) => {
                log::warn!(
                    "vhost-user-blk {}: the device is no longer served; {} stops",
                    export.name,
                    export.socket.display()
                );
                let _ = std::fs::remove_file(&export.socket);
                return;
            }
        };
        let backend = Arc::new(BlkBackend::new(
            export.clone(),
            device.clone(),
            engine.clone(),
            slot,
        ));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let result =
            VhostUserDaemon::new(format!("vhost-{}-req", export.name), backend.clone(), mem)
                .map_err(|e| e.to_string())
                .and_then(|mut daemon| {
                    daemon.start(&mut listener).map_err(|e| e.to_string())?;
                    *export.shutdown.lock().recover() = daemon.shutdown_handle();
                    // Stopped while the VMM was being accepted: end it now.
                    if export.stopping() {
                        daemon.request_shutdown();
                    }
                    export.connected.store(true, Ordering::Relaxed);
                    *export.current.lock().recover() = Some(backend);
                    log::info!("vhost-user-blk {}: a VMM connected", export.name);
                    let r = daemon.wait();
                    *export.shutdown.lock().recover() = None;
                    *export.current.lock().recover() = None;
                    export.connected.store(false, Ordering::Relaxed);
                    log::info!(
                        "vhost-user-blk {}: the VMM disconnected ({r:?})",
                        export.name
                    );
                    Ok(())
                });
        {
            let mut holds = export.holds_handle.lock().recover();
            device.handle_released();
            *holds = false;
        }
        if let Err(e) = result {
            log::warn!("vhost-user-blk {}: {e}", export.name);
            std::thread::sleep(ACCEPT_POLL);
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
        let spec = ExportSpec {
            name: "vm".into(),
            socket: PathBuf::from("/nonexistent/vm.sock"),
            read_only: false,
        };
        let export = Export::new(&spec, 1, sched.clone());
        assert_eq!(sched.guest_requests(), 0);
        export.count(false);
        export.count(true);
        assert_eq!(sched.guest_requests(), 2);
        assert_eq!(export.status().requests, 2);
        sched.close();
    }
}

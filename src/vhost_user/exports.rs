//! The exports a worker serves and their life: started with the worker (the mount's, or
//! the device record's after a restart), added by `device add`, ended by `device
//! remove`, listed by `status`.
//!
//! The keeper holds every listening socket under its [`ExportSpec::held_name`]: those
//! `mount` made from the start (`MountSpec::held_fds`), those `device add` makes handed
//! over through the fd channel (`Worker::hold_fd`) before the command succeeds. A new
//! worker takes them back by name, so a VMM reconnects to the socket it knew.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use super::{same_socket, serve, trusted_dir, Export, ExportSpec, ExportStatus, MAX_QUEUES};
use crate::engine::{DeviceAddReport, DeviceRemoveReport, Engine};
use crate::error::{Error, IoContext, Result};
use crate::keeper::Worker;
use crate::sched::BackupScheduler;
use crate::sync::Recover;

/// One export being served.
struct Served {
    export: Arc<Export>,
    /// A copy of the listening socket (the thread has the other): to serve it again.
    listener: UnixListener,
    thread: Option<JoinHandle<()>>,
}

/// What the exports of this worker share.
struct Frontend {
    engine: Arc<Engine>,
    sched: Arc<BackupScheduler>,
    worker: Arc<Worker>,
    queues: usize,
    served: Mutex<Vec<Served>>,
}

/// Set once, when the worker starts serving.
static FRONTEND: OnceLock<Frontend> = OnceLock::new();

impl Frontend {
    fn served(&self) -> MutexGuard<'_, Vec<Served>> {
        self.served.lock().recover()
    }

    /// Serves `spec` on `listener` from a thread of its own.
    fn spawn(&self, spec: &ExportSpec, listener: UnixListener) -> Result<Served> {
        let export = Arc::new(Export::new(spec, self.queues, self.sched.clone()));
        let copy = listener
            .try_clone()
            .context(|| format!("duplicating {}", spec.socket.display()))?;
        let thread = self.thread(&export, listener)?;
        Ok(Served {
            export,
            listener: copy,
            thread: Some(thread),
        })
    }

    fn thread(&self, export: &Arc<Export>, listener: UnixListener) -> Result<JoinHandle<()>> {
        let engine = self.engine.clone();
        let e = export.clone();
        std::thread::Builder::new()
            .name(format!("vhost-{}", export.name))
            .spawn(move || serve(engine, e, listener))
            .context(|| format!("starting the vhost-user-blk thread of {}", export.name))
    }
}

/// Serves `specs` (the devices' exports this worker starts with) and keeps what
/// [`add_devices`] and [`remove_device`] need. Each listening socket is the one the
/// keeper holds under the export's name; `positional` are sockets an older keeper hands
/// over by position instead (in the order of `specs`). A socket the keeper does not hold
/// is made here and handed to it.
pub fn start(
    engine: &Arc<Engine>,
    sched: &Arc<BackupScheduler>,
    worker: &Arc<Worker>,
    specs: &[ExportSpec],
    positional: Vec<OwnedFd>,
) -> Result<()> {
    let queues = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_QUEUES);
    let frontend = Frontend {
        engine: engine.clone(),
        sched: sched.clone(),
        worker: worker.clone(),
        queues,
        served: Mutex::new(Vec::new()),
    };
    let mut positional: Vec<Option<OwnedFd>> = if positional.len() == specs.len() {
        positional.into_iter().map(Some).collect()
    } else {
        specs.iter().map(|_| None).collect()
    };
    for (spec, old) in specs.iter().zip(positional.iter_mut()) {
        let fd = match (worker.take_held_fd(&spec.held_name()), old.take()) {
            (Some(fd), _) | (None, Some(fd)) => fd,
            (None, None) => {
                log::warn!(
                    "vhost-user-blk {}: the keeper holds no socket at {}; making it again",
                    spec.name,
                    spec.socket.display()
                );
                // One export that cannot be served must not take the others (and the
                // mount) away.
                match bind_in_worker(spec) {
                    Ok(l) => {
                        if let Err(e) = hold(worker, spec, &l) {
                            log::warn!(
                                "{}; a worker's death ends this export",
                                crate::error::report(&e)
                            );
                        }
                        l.into()
                    }
                    Err(e) => {
                        log::error!(
                            "vhost-user-blk {} is not served: {}",
                            spec.name,
                            crate::error::report(&e)
                        );
                        continue;
                    }
                }
            }
        };
        let served = frontend.spawn(spec, UnixListener::from(fd))?;
        frontend.served().push(served);
    }
    let _ = FRONTEND.set(frontend);
    Ok(())
}

fn frontend() -> Result<&'static Frontend> {
    FRONTEND
        .get()
        .ok_or_else(|| Error::invalid("the vhost-user-blk frontend is not running"))
}

/// Makes the listening socket of `spec` in a running worker (mode 0600).
fn bind_in_worker(spec: &ExportSpec) -> Result<UnixListener> {
    crate::secure_path::bind_private_socket_in_daemon(&spec.socket, "vhost-user-blk socket")
}

fn hold(worker: &Worker, spec: &ExportSpec, l: &UnixListener) -> Result<()> {
    worker.hold_fd(&spec.held_name(), l.as_fd())
}

/// Checks the exports `device add` asks for: devices among those added, sockets in
/// trusted directories where no file is, none given twice or served already.
fn check_new(f: &Frontend, devices: &[(String, PathBuf)], exports: &[ExportSpec]) -> Result<()> {
    let recorded = f.engine.exports();
    for (i, s) in exports.iter().enumerate() {
        if !s.socket.is_absolute() {
            return Err(Error::invalid(format!(
                "--vhost-user-blk: socket path {} is not absolute",
                s.socket.display()
            )));
        }
        if !devices.iter().any(|(n, _)| n == &s.name) {
            let added: Vec<&str> = devices.iter().map(|(n, _)| n.as_str()).collect();
            return Err(Error::invalid(format!(
                "--vhost-user-blk: '{}' is not a device added by this command ({}); an export names one of them",
                s.name.escape_debug(),
                added.join(", ")
            )));
        }
        if exports[..i]
            .iter()
            .any(|o| same_socket(&o.socket, &s.socket))
        {
            return Err(Error::invalid(format!(
                "--vhost-user-blk: socket {} is given twice",
                s.socket.display()
            )));
        }
        let other = recorded
            .iter()
            .find(|(_, e)| same_socket(&e.socket, &s.socket))
            .map(|(n, _)| n.clone())
            .or_else(|| {
                f.served()
                    .iter()
                    .find(|o| same_socket(&o.export.socket, &s.socket))
                    .map(|o| o.export.name.clone())
            });
        if let Some(other) = other {
            return Err(Error::busy(format!(
                "--vhost-user-blk: socket {} is already the export of device '{other}'",
                s.socket.display()
            )));
        }
        trusted_dir(&s.socket)?;
        if std::fs::symlink_metadata(&s.socket).is_ok() {
            return Err(Error::busy(format!(
                "--vhost-user-blk: {} exists; remove it first if nothing uses it",
                s.socket.display()
            )));
        }
    }
    Ok(())
}

/// Undoes the sockets made for `device add` (the command failed).
fn undo(worker: &Worker, made: Vec<(ExportSpec, UnixListener, bool)>) {
    for (spec, l, held) in made {
        if held {
            if let Err(e) = worker.release_fd(&spec.held_name()) {
                log::warn!("{}", crate::error::report(&e));
            }
        }
        drop(l);
        let _ = std::fs::remove_file(&spec.socket);
    }
}

/// `fleecefs device add` with `--vhost-user-blk`: adds `devices` and serves `exports`
/// of them at once. All or nothing: the sockets are made and held by the keeper before
/// the devices are added (and recorded with their exports), removed again if that fails.
pub fn add_devices(
    devices: &[(String, PathBuf)],
    exports: &[ExportSpec],
) -> Result<DeviceAddReport> {
    let f = frontend()?;
    if exports.is_empty() {
        return f.engine.add_devices(devices);
    }
    check_new(f, devices, exports)?;
    let mut made: Vec<(ExportSpec, UnixListener, bool)> = Vec::new();
    for spec in exports {
        let l = match bind_in_worker(spec) {
            Ok(l) => l,
            Err(e) => {
                undo(&f.worker, made);
                return Err(e);
            }
        };
        let held = hold(&f.worker, spec, &l);
        made.push((spec.clone(), l, held.is_ok()));
        if let Err(e) = held {
            undo(&f.worker, made);
            return Err(e);
        }
    }
    let records: Vec<_> = exports.iter().map(ExportSpec::record).collect();
    let report = match f.engine.add_devices_with_exports(devices, &records) {
        Ok(r) => r,
        Err(e) => {
            undo(&f.worker, made);
            return Err(e);
        }
    };
    for (spec, l, _) in made {
        match f.spawn(&spec, l) {
            Ok(s) => f.served().push(s),
            // Recorded and held: the next worker serves it.
            Err(e) => log::error!("{}", crate::error::report(&e)),
        }
        log::info!(
            "vhost-user-blk {}: serving at {}{}",
            spec.name,
            spec.socket.display(),
            if spec.read_only { " (read-only)" } else { "" }
        );
    }
    Ok(report)
}

/// `fleecefs device remove`: ends the device's exports (a connected VMM sees the
/// connection end; the sockets are removed and the keeper closes its copies), then
/// removes the device. The engine marks the device as being removed first
/// ([`Engine::begin_removal`]: opens of `live/NAME` fail with EBUSY, and a VMM that
/// connects is turned away), then checks it, not counting the exports' own handles: a
/// refusal comes before the exports end, with nothing changed, and a removal that passed
/// the check goes through.
pub fn remove_device(engine: &Engine, name: &str) -> Result<DeviceRemoveReport> {
    let Some(f) = FRONTEND.get() else {
        return engine.remove_device(name);
    };
    let mut served = f.served();
    let mine: Vec<usize> = (0..served.len())
        .filter(|&i| served[i].export.name == name)
        .collect();
    if mine.is_empty() {
        drop(served);
        return engine.remove_device(name);
    }
    let removal = engine.begin_removal(name)?;
    // Counted after the mark: a connection's handle is opened and flagged under its
    // mutex, and no connection opens one from now on.
    let own = mine
        .iter()
        .filter(|&&i| *served[i].export.holds_handle.lock().recover())
        .count() as u64;
    removal.check(own)?;
    #[cfg(feature = "fault-injection")]
    hold_removal();
    for &i in &mine {
        served[i].export.request_stop();
    }
    for &i in &mine {
        if let Some(t) = served[i].thread.take() {
            let _ = t.join();
        }
    }
    let report = match removal.finish() {
        Ok(r) => r,
        Err(e) => {
            // Not expected (nothing could open the device since the check): serve again.
            for &i in &mine {
                let s = &mut served[i];
                s.export.stop.store(false, Ordering::SeqCst);
                let again = s
                    .listener
                    .try_clone()
                    .context(|| format!("duplicating {}", s.export.socket.display()))
                    .and_then(|l| f.thread(&s.export, l));
                match again {
                    Ok(t) => s.thread = Some(t),
                    Err(e) => log::error!("{}", crate::error::report(&e)),
                }
            }
            return Err(e);
        }
    };
    for i in mine.into_iter().rev() {
        let s = served.remove(i);
        let _ = std::fs::remove_file(&s.export.socket);
        let spec = ExportSpec {
            name: s.export.name.clone(),
            socket: s.export.socket.clone(),
            read_only: s.export.read_only,
        };
        if let Err(e) = f.worker.release_fd(&spec.held_name()) {
            log::warn!("{}", crate::error::report(&e));
        }
        log::info!(
            "vhost-user-blk {}: export at {} ended",
            name,
            spec.socket.display()
        );
    }
    drop(served);
    Ok(report)
}

/// Test-only fault injection: with `FLEECEFS_FAULT_REMOVE_HOLD=FILE`, `device remove` of
/// a device with exports creates FILE once the removal is checked, before the exports
/// end, and goes on when FILE is gone (at most 30 s later).
#[cfg(feature = "fault-injection")]
fn hold_removal() {
    let Some(file) = std::env::var_os("FLEECEFS_FAULT_REMOVE_HOLD") else {
        return;
    };
    let file = PathBuf::from(file);
    if let Err(e) = std::fs::write(&file, b"") {
        log::warn!("fault injection: creating {}: {e}", file.display());
        return;
    }
    log::info!(
        "fault injection: device remove waits for {} to go",
        file.display()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while file.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Adds `vhost_user_blk` (every export's state) to a `status` reply.
pub fn add_status(v: &mut serde_json::Value) {
    if let (Some(f), Some(obj)) = (FRONTEND.get(), v.as_object_mut()) {
        let list: Vec<ExportStatus> = f.served().iter().map(|s| s.export.status()).collect();
        obj.insert(
            "vhost_user_blk".into(),
            serde_json::to_value(list).unwrap_or_default(),
        );
    }
}

/// Device `name` has a new size: every connected VMM of its exports is told that the
/// configuration space changed, and reads the new capacity from it. Returns when each
/// has answered (when it asked to answer), with no lock of the exports held.
pub fn size_changed(name: &str) {
    let Some(f) = FRONTEND.get() else { return };
    // Taken out first: a VMM answers when it likes (or never), and nothing else that
    // needs the exports' locks (status, device add and remove) may wait for it.
    let connected: Vec<_> = f
        .served()
        .iter()
        .filter(|s| s.export.name == name)
        .filter_map(|s| s.export.current.lock().recover().clone())
        .collect();
    for b in connected {
        b.config_changed();
    }
}

/// The sockets of every export served now (the mount ends: they are removed).
pub fn sockets() -> Vec<PathBuf> {
    FRONTEND
        .get()
        .map(|f| f.served().iter().map(|s| s.export.socket.clone()).collect())
        .unwrap_or_default()
}

//! Serving, in a worker: recovery, engine, control socket, FUSE session, and the
//! shutdown in order.

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use super::plan::ServePlan;
use crate::cbw::Device;
use crate::control::client::FSNAME_PREFIX;
use crate::control::server;
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, IoContext, Result};
use crate::fuse::session::{self, SessionOptions};
use crate::keeper::Worker;
use crate::layout::MountLayout;
use crate::source::Source;
use crate::state::{DeviceRecord, StateDir, LOG_FILE};
use crate::sys;

/// The devices and exports this worker serves: the plan's for the first worker; after
/// a restart, the record's (which `device add`, `device remove` and `resize` keep
/// current), not the `--device` and `--vhost-user-blk` options the mount started with.
fn devices(state: &StateDir, plan: &ServePlan, worker: &Worker) -> Result<ServePlan> {
    let mut plan = plan.clone();
    if worker.restarted() {
        if let Some(r) = crate::state::read_device_record(state.path())? {
            plan.vhost_user_blk = crate::vhost_user::ExportSpec::all_from_record(&r);
            plan.devices = r.devices.into_iter().map(|d| (d.name, d.path)).collect();
            plan.explicit_devices = false;
        }
    }
    Ok(plan)
}

/// The slot of each device of `plan` (its recorded slot if the record has the same name
/// and source, else a new one) and the next free slot. With explicit `--device` options
/// that differ from the record, says what differs.
fn assign_slots(state: &StateDir, plan: &ServePlan, record: &DeviceRecord) -> (Vec<usize>, usize) {
    let mut next = record
        .devices
        .iter()
        .map(|d| d.slot + 1)
        .max()
        .unwrap_or(0)
        .max(record.next_slot);
    let mut slots = Vec::new();
    let (mut added, mut changed) = (Vec::new(), Vec::new());
    for (name, path) in &plan.devices {
        match record.devices.iter().find(|d| &d.name == name) {
            Some(r) if &r.path == path => slots.push(r.slot),
            other => {
                match other {
                    Some(r) => changed.push(format!(
                        "{name} is {} (was {})",
                        path.display(),
                        r.path.display()
                    )),
                    None => added.push(name.clone()),
                }
                slots.push(next);
                next += 1;
            }
        }
    }
    let removed: Vec<&str> = record
        .devices
        .iter()
        .filter(|r| !plan.devices.iter().any(|(n, _)| n == &r.name))
        .map(|r| r.name.as_str())
        .collect();
    if plan.explicit_devices
        && !record.devices.is_empty()
        && !(added.is_empty() && changed.is_empty() && removed.is_empty())
    {
        let mut parts = Vec::new();
        if !added.is_empty() {
            parts.push(format!("added {}", added.join(", ")));
        }
        if !removed.is_empty() {
            parts.push(format!("no longer served {}", removed.join(", ")));
        }
        if !changed.is_empty() {
            parts.push(changed.join(", "));
        }
        log::warn!(
            "the --device options differ from the device set last served ({}): {}",
            state.path().join(crate::state::DEVICE_RECORD).display(),
            parts.join("; ")
        );
    }
    (slots, next)
}

/// Refuses a source that a worker opened by its path (the keeper does not hold it: a
/// device added after the mount) when the path names another file than the one the
/// mount served: serving it would swap the disk under whoever uses the device.
fn same_file_as_served(
    record: &DeviceRecord,
    name: &str,
    path: &std::path::Path,
    source: &Source,
) -> Result<()> {
    let served = record
        .devices
        .iter()
        .find(|d| d.name == name && d.path == path)
        .and_then(|d| d.file);
    let now = (source.identity().dev, source.identity().ino);
    match served {
        Some(served) if served != now => Err(Error::invalid(format!(
            "{} is no longer the file this mount served (device {}, inode {}; now device {}, inode {}): it was renamed or replaced while served; put the file back, or 'fleecefs device remove' the device and add the file you mean",
            path.display(),
            served.0,
            served.1,
            now.0,
            now.1
        ))),
        _ => Ok(()),
    }
}

/// The options of `plan` as `status` shows them: flag values as written on the command
/// line.
fn mount_options(plan: &ServePlan) -> crate::engine::MountOptions {
    use clap::ValueEnum;
    let name = |v: Option<clap::builder::PossibleValue>| {
        v.map(|v| v.get_name().to_string()).unwrap_or_default()
    };
    crate::engine::MountOptions {
        cluster_size: plan.cluster.bytes(),
        backup_priority: name(plan.backup_priority.to_possible_value()),
        backup_share: plan.backup_share.map(|s| match s {
            crate::sched::BackupShare::Percent(p) => p.to_string(),
            crate::sched::BackupShare::Auto => "auto".to_string(),
        }),
        backup_read: name(plan.backup_read.to_possible_value()),
        fleecing_limit: plan.fleecing_limit,
        fleecing_dir: plan.fleecing_dir.clone(),
        crash_safe_bitmaps: match plan.crash_safe_bitmaps {
            crate::bitmap_file::CrashSafety::On => "on",
            crate::bitmap_file::CrashSafety::Sync => "sync",
            crate::bitmap_file::CrashSafety::Off => "off",
        }
        .to_string(),
        on_cbw_error: match plan.on_cbw_error {
            crate::cbw::OnCbwError::BreakSnapshot => "break-snapshot",
            crate::cbw::OnCbwError::BreakGuestWrite => "break-guest-write",
        }
        .to_string(),
        cbw_timeout_seconds: plan.cbw_timeout.map(|t| t.as_secs_f64()),
        cbw_buffer: plan.cbw_buffer,
        live_cache: plan.live_cache,
        threads: plan.threads,
    }
}

fn bind_socket(state: &StateDir) -> Result<UnixListener> {
    let path = state.socket_path();
    // We hold the state lock, so an existing socket is a leftover.
    let _ = fs::remove_file(&path);
    // The umask is process-wide; no other thread creates files at this point.
    let old = sys::set_umask(0o177);
    let l = UnixListener::bind(&path);
    sys::set_umask(old);
    l.context(|| format!("creating control socket {}", path.display()))
}

/// Recovery after an unclean stop: the access that did not end is noted (a restarted
/// worker brings it back broken) and its leftover fleecing files are removed.
fn recover(state: &StateDir, worker: &Worker) -> Result<()> {
    let Some(record) = state.leftover_access()? else {
        return Ok(());
    };
    worker.note_crashed_access(&record);
    match state.remove_leftovers(&record) {
        Ok(removed) => log::warn!(
            "recovered from an unclean shutdown: backup access '{}' did not end; removed {} leftover fleecing file(s){}{}",
            record.target,
            removed.len(),
            if removed.is_empty() { "" } else { ": " },
            removed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
        // A leftover that cannot be removed must not keep the images from being
        // served: the record stays, and the next setup tries again (or refuses).
        Err(e) => log::warn!(
            "{}; the record of backup access '{}' is kept and the next setup tries again",
            crate::error::report(&e),
            record.target
        ),
    }
    Ok(())
}

/// Serves `plan` on the connection the keeper handed `worker`, until the mount ends.
pub fn serve(plan: ServePlan, worker: Arc<Worker>) -> Result<()> {
    let signals = sys::block_signals(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]);
    let state = worker.state_dir()?;
    if worker.background() {
        crate::logger::tee_to_file(&state.path().join(LOG_FILE), state.open_log());
    }
    recover(&state, &worker)?;
    // What a keeper of an older fleecefs hands over by position follows the mount's plan.
    let mount_exports = plan.vhost_user_blk.clone();
    let mut plan = devices(&state, &plan, &worker)?;
    let record = crate::state::read_device_record(state.path())?.unwrap_or_default();
    let (slots, next_slot) = assign_slots(&state, &plan, &record);
    let mut devices = Vec::new();
    let mut skipped = Vec::new();
    for ((name, path), slot) in plan.devices.iter().zip(slots) {
        // The keeper's open file when it holds one: what the mount served, whatever the
        // path names now.
        let source = match worker.take_source(name) {
            Some((held, file)) if &held == path => Source::from_file(path, file, plan.backup_read),
            _ => Source::open_with(path, plan.backup_read).and_then(|source| {
                if worker.restarted() {
                    same_file_as_served(&record, name, path, &source)?;
                }
                Ok(source)
            }),
        };
        match source {
            Ok(source) => devices.push((slot, Device::new(name.clone(), source, plan.cluster))),
            // After a restart, a device that cannot be served must not take the others
            // away: it is left out (and stays in the record, for the next worker).
            Err(e) if worker.restarted() => {
                log::error!(
                    "device '{name}' is not served: {}",
                    crate::error::report(&e)
                );
                skipped.push(name.clone());
            }
            Err(e) => return Err(e),
        }
    }
    let config = EngineConfig {
        fleecing_dir: plan.fleecing_dir.clone(),
        on_cbw_error: plan.on_cbw_error,
        cbw_timeout: plan.cbw_timeout,
        fleecing_limit: plan.fleecing_limit,
        crash_safe_bitmaps: plan.crash_safe_bitmaps,
        cbw_buffer: plan.cbw_buffer,
        backup_read: plan.backup_read,
    };
    let nbd_config = plan.nbd()?;
    // The keeper holds the listening sockets (bound before it mounted): NBD's, then the
    // vhost-user-blk exports'.
    let mut held = worker.take_listen_fds();
    // The exports' sockets are held by name (`Worker::take_held_fd`); a keeper of an
    // older fleecefs hands them over after NBD's, in the order of the plan.
    let vhost_positional = held.split_off(nbd_config.listen.len().min(held.len()));
    if !vhost_positional.is_empty() {
        plan.vhost_user_blk = mount_exports;
    }
    let nbd_listeners = crate::nbd::server::listeners_from(&nbd_config.listen, held)?;
    let listener = bind_socket(&state)?;
    let socket_path = state.socket_path();
    let exports: Vec<_> = plan
        .vhost_user_blk
        .iter()
        .map(crate::vhost_user::ExportSpec::record)
        .collect();
    let engine = match Engine::with_slots(devices, next_slot, config, Some(state)).and_then(|e| {
        if skipped.is_empty() {
            e.save_device_record(&exports)?;
        }
        Ok(e)
    }) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            let _ = fs::remove_file(&socket_path);
            return Err(e);
        }
    };
    engine.set_mount_options(mount_options(&plan));
    worker.restore_broken_access(&engine);
    // One backup scheduler for the mount, shared by every frontend that serves it.
    let backup = match crate::sched::BackupScheduler::start(plan.backup_priority, plan.backup_share)
    {
        Ok(b) => Arc::new(b),
        Err(e) => {
            let _ = fs::remove_file(&socket_path);
            return Err(Error::io("starting the backup read pool", e));
        }
    };
    // The exports of devices not served (left out after a restart) wait in the keeper.
    let (vhost_specs, unserved): (Vec<_>, Vec<_>) = plan
        .vhost_user_blk
        .iter()
        .cloned()
        .partition(|s| engine.device_index(&s.name).is_some());
    for s in &unserved {
        log::error!(
            "vhost-user-blk export {} of device '{}' is not served: the device is not",
            s.socket.display(),
            s.name
        );
    }
    crate::vhost_user::start(&engine, &backup, &worker, &vhost_specs, vhost_positional)?;
    let nbd = if nbd_config.listen.is_empty() {
        None
    } else {
        Some(Arc::new(crate::nbd::NbdServer::start(
            engine.clone(),
            backup.clone(),
            nbd_config,
            nbd_listeners,
        )?))
    };
    {
        let engine = engine.clone();
        let layout = MountLayout::new(plan.mountpoint.clone());
        let worker = worker.clone();
        let extra: Option<server::StatusExtra> = nbd.clone().map(|n| {
            Box::new(move |v: &mut serde_json::Value| {
                if let Some(obj) = v.as_object_mut() {
                    obj.insert(
                        "nbd".into(),
                        serde_json::to_value(n.status()).unwrap_or_default(),
                    );
                }
            }) as server::StatusExtra
        });
        std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || server::serve(listener, engine, layout, worker, extra))
            .context(|| "starting the control thread".into())?;
    }

    let session_options = SessionOptions {
        fsname: format!("{FSNAME_PREFIX}{}", plan.state_dir.display()),
        allow_other: plan.allow_other,
        access: plan.access,
        threads: plan.threads,
        live_cache: plan.live_cache,
        backup: backup.clone(),
    };
    let session = session::mount(engine.clone(), &plan.mountpoint, &session_options, &worker)
        .map_err(|e| {
            let _ = fs::remove_file(&socket_path);
            Error::io(format!("mounting {}", plan.mountpoint.display()), e)
        })?;
    // The session and the NBD server hold the scheduler now; it is closed (its queue
    // drained) when the session has ended, before the shutdown.
    drop(session_options);
    let resend_fd = session.as_fd().try_clone_to_owned().ok();
    let fuse_thread = session::spawn(session).context(|| "starting the FUSE session".into())?;
    if let Some(fd) = &resend_fd {
        worker.resend(fd.as_fd());
    }
    drop(resend_fd);
    if worker.negotiated().is_some() {
        drop_live_pages(&engine);
    }
    // Serving means answering: one lookup through the kernel.
    let live = MountLayout::new(plan.mountpoint.clone()).live_dir();
    let connection = fs::metadata(&live)
        .map(|m| sys::dev_minor(m.dev()))
        .map_err(|e| {
            // Do not leave a mount behind that nobody will serve once this process exits.
            sys::force_unmount(&plan.mountpoint, None);
            let _ = fs::remove_file(&socket_path);
            Error::io(
                format!("checking the new mount at {}", plan.mountpoint.display()),
                e,
            )
        })?;
    log::info!(
        "serving {} device(s) at {} (cluster size {}, {} threads)",
        plan.devices.len(),
        plan.mountpoint.display(),
        plan.cluster,
        plan.threads
    );
    worker.ready(connection);
    {
        let mountpoint = plan.mountpoint.clone();
        let engine = engine.clone();
        let worker = worker.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                // The signals are blocked in every thread: only this one receives them.
                if let Some(sig) = sys::wait_signal(&signals) {
                    if worker.fd_store() {
                        worker.stop_keeping_connection(&engine);
                    }
                    log::info!("signal {sig}: unmounting {}", mountpoint.display());
                    sys::force_unmount(&mountpoint, Some(connection));
                }
            })
            .context(|| "starting the signal thread".into())?;
    }
    let result = fuse_thread.join();
    log::info!("{} unmounted, shutting down", plan.mountpoint.display());
    if let Some(n) = &nbd {
        n.stop();
        crate::nbd::server::remove_sockets(&plan.nbd_listen);
    }
    backup.close();
    engine.shutdown();
    let _ = fs::remove_file(&socket_path);
    crate::vhost_user::remove_sockets(&plan.vhost_user_blk);
    for socket in crate::vhost_user::sockets() {
        let _ = fs::remove_file(socket);
    }
    match result {
        Ok(Ok(())) => {
            worker.unmounted();
            Ok(())
        }
        Ok(Err(e)) => Err(Error::io("FUSE session ended with an error", e)),
        Err(_) => Err(Error::invalid("FUSE session thread panicked")),
    }
}

/// A worker that took the mount over has the kernel drop the pages it holds of every live
/// file, from a thread of its own (the kernel may wait for reads this worker serves): the
/// worker before may have changed data without telling it (a VM's write just before its
/// death, or while it handed over).
fn drop_live_pages(engine: &Arc<Engine>) {
    let engine = engine.clone();
    let spawned = std::thread::Builder::new()
        .name("live-pages".into())
        .spawn(move || {
            for (slot, d) in engine.slots() {
                engine.changed_elsewhere(slot, &d, 0, d.size());
            }
        });
    if let Err(e) = spawned {
        log::warn!("dropping the kernel's pages of the live files: {e}");
    }
}

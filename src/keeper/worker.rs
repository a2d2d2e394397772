//! The worker's side of the link to its keeper: the inherited fds and plan, the reports,
//! the takeover of a connection an earlier worker served, and planned restarts.

use std::fs::File;
use std::io::Write;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;

use super::fdchannel::FdChannel;
use super::{
    now_ms, Binary, LastRestart, Negotiated, Report, WorkerPlan, DRAIN_TIMEOUT, EXIT_HANDOVER, GATE,
};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::state::{AccessRecord, StateDir};
use crate::sync::Recover;
use crate::sys;

/// A worker's link to its keeper: what the keeper handed over, and the report pipe.
/// Made once per worker by [`worker_init`] and passed to whoever needs it.
pub struct Worker {
    plan: WorkerPlan<()>,
    report: Mutex<File>,
    fuse_fds: Mutex<Vec<File>>,
    listen_fds: Mutex<Vec<File>>,
    /// The sources the keeper holds: name, (path, file).
    sources: Mutex<Vec<(String, (PathBuf, File))>>,
    /// The named fds the keeper held when this worker started, not taken yet.
    held_fds: Mutex<Vec<(String, OwnedFd)>>,
    /// The channel to hand the keeper more fds.
    fd_channel: Option<FdChannel>,
    crashed_access: Mutex<Option<AccessRecord>>,
    served_ms: Mutex<Option<u64>>,
    /// The kernel can resend (FUSE_HAS_RESEND), as negotiated at INIT.
    has_resend: AtomicBool,
}

/// Takes the plan and the fds the keeper handed this process (`fleecefs worker`): the
/// link to the keeper, and what to serve.
pub fn worker_init<S: DeserializeOwned>() -> Result<(Arc<Worker>, S)> {
    let plan: WorkerPlan<S> = WorkerPlan::inherited()?;
    let take = |fd: i32| {
        // SAFETY: the keeper passed these fds to this process and nothing else owns them.
        unsafe { sys::inherited_file(fd) }.map_err(|e| Error::io(format!("inherited fd {fd}"), e))
    };
    let report = take(plan.report_fd)?;
    let fuse_fds = plan
        .fuse_fds
        .iter()
        .map(|&fd| take(fd))
        .collect::<Result<Vec<_>>>()?;
    let listen_fds = plan
        .listen_fds
        .iter()
        .map(|&fd| take(fd))
        .collect::<Result<Vec<_>>>()?;
    let sources = plan
        .sources
        .iter()
        .map(|s| Ok((s.name.clone(), (s.path.clone(), take(s.fd)?))))
        .collect::<Result<Vec<_>>>()?;
    let held_fds = plan
        .held_fds
        .iter()
        .map(|h| Ok((h.name.clone(), OwnedFd::from(take(h.fd)?))))
        .collect::<Result<Vec<_>>>()?;
    let fd_channel = match plan.fd_channel {
        Some(fd) => Some(FdChannel::new(OwnedFd::from(take(fd)?))),
        None => None,
    };
    #[cfg(feature = "fault-injection")]
    if let Some(from) = std::env::var("FLEECEFS_FAULT_WORKER_DIE_FROM")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        if plan.restarts >= from {
            log::error!("fault injection: worker {} dies at start", plan.restarts);
            std::process::exit(3);
        }
    }
    let (plan, serve) = plan.split();
    let resend = plan.negotiated.is_some_and(|n| n.has_resend);
    let w = Worker {
        plan,
        report: Mutex::new(report),
        fuse_fds: Mutex::new(fuse_fds),
        listen_fds: Mutex::new(listen_fds),
        sources: Mutex::new(sources),
        held_fds: Mutex::new(held_fds),
        fd_channel,
        crashed_access: Mutex::new(None),
        served_ms: Mutex::new(None),
        has_resend: AtomicBool::new(resend),
    };
    Ok((Arc::new(w), serve))
}

impl<S> WorkerPlan<S> {
    /// The keeper's part of the plan, and what to serve.
    fn split(self) -> (WorkerPlan<()>, S) {
        let WorkerPlan {
            keeper_pid,
            keeper_binary,
            mountpoint,
            state_dir,
            fuse_fds,
            listen_fds,
            sources,
            held_fds,
            report_fd,
            fd_channel,
            lock_fd,
            restarts,
            last_restart,
            negotiated,
            background,
            fd_store,
            serve,
        } = self;
        let plan = WorkerPlan {
            keeper_pid,
            keeper_binary,
            mountpoint,
            state_dir,
            fuse_fds,
            listen_fds,
            sources,
            held_fds,
            report_fd,
            fd_channel,
            lock_fd,
            restarts,
            last_restart,
            negotiated,
            background,
            fd_store,
            serve: (),
        };
        (plan, serve)
    }
}

/// The keeper fields of a `status` reply.
#[derive(serde::Serialize, Debug, Clone)]
pub struct KeeperStatus {
    /// The keeper's pid (also the daemon's `pid`: the process that mounted).
    pub keeper_pid: u32,
    /// This worker's pid.
    pub worker_pid: u32,
    /// Workers started before this one.
    pub worker_restarts: u64,
    /// The last restart, with the writers' pause once this worker served.
    pub last_restart: Option<LastRestart>,
}

impl Worker {
    /// Takes the `/dev/fuse` fds inherited from the keeper (the session fd first, then
    /// its clones); empty the second time.
    pub fn take_fuse_fds(&self) -> Vec<OwnedFd> {
        std::mem::take(&mut *self.fuse_fds.lock().recover())
            .into_iter()
            .map(OwnedFd::from)
            .collect()
    }

    /// Takes the source of device `name` that the keeper holds, with the path it was
    /// opened at; `None` if the keeper holds none (a device added since the mount).
    pub fn take_source(&self, name: &str) -> Option<(PathBuf, File)> {
        let mut held = self.sources.lock().recover();
        let i = held.iter().position(|(n, _)| n == name)?;
        Some(held.remove(i).1)
    }

    /// Device `name` is no longer served: the keeper closes the source it holds.
    pub fn device_removed(&self, name: &str) {
        self.report(&Report::DeviceRemoved {
            name: name.to_string(),
        });
    }

    /// Takes the listening sockets the keeper holds for the frontends, in the order the
    /// daemon bound them; empty the second time.
    pub fn take_listen_fds(&self) -> Vec<OwnedFd> {
        std::mem::take(&mut *self.listen_fds.lock().recover())
            .into_iter()
            .map(OwnedFd::from)
            .collect()
    }

    /// Takes the fd the keeper holds under `name` (see [`Worker::hold_fd`]), as it held
    /// it when this worker started; `None` if it held none (or it was taken before). The
    /// keeper keeps its own copy.
    pub fn take_held_fd(&self, name: &str) -> Option<OwnedFd> {
        let mut held = self.held_fds.lock().recover();
        let i = held.iter().position(|(n, _)| n == name)?;
        Some(held.remove(i).1)
    }

    /// Hands `fd` to the keeper to hold under `name` for the life of the mount (replacing
    /// what it held under that name): every later worker gets it back from
    /// [`Worker::take_held_fd`]. Returns once the keeper holds it.
    pub fn hold_fd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
        self.channel()?.hold(name, fd)
    }

    /// The keeper closes the fd it holds under `name` (nothing if it holds none).
    pub fn release_fd(&self, name: &str) -> Result<()> {
        self.channel()?.release(name)
    }

    fn channel(&self) -> Result<&FdChannel> {
        self.fd_channel.as_ref().ok_or_else(|| {
            Error::invalid(
                "the keeper of this mount is from an older fleecefs and cannot hold fds for its workers: unmount and mount again",
            )
        })
    }

    /// What an earlier worker's INIT negotiated, or `None` for the first worker (which
    /// answers INIT itself).
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.plan.negotiated
    }

    /// The mount point the keeper mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.plan.mountpoint
    }

    /// Whether the worker logs to the state directory's log file (a background mount).
    pub fn background(&self) -> bool {
        self.plan.background
    }

    /// Whether the fds are in systemd's file descriptor store.
    pub fn fd_store(&self) -> bool {
        self.plan.fd_store
    }

    /// Whether an earlier worker served this mount.
    pub fn restarted(&self) -> bool {
        self.plan.negotiated.is_some()
    }

    /// The state directory, under the lock the keeper holds.
    pub fn state_dir(&self) -> Result<StateDir> {
        // SAFETY: the keeper passed the lock fd to this process; nothing else owns it.
        let lock = unsafe { sys::inherited_file(self.plan.lock_fd) }
            .map_err(|e| Error::io("inherited state directory lock", e))?;
        StateDir::adopt(&self.plan.state_dir, lock)
    }

    fn report(&self, r: &Report) {
        let mut f = self.report.lock().recover();
        let _ = writeln!(f, "{}", r.line(std::process::id()));
    }

    /// Called by recovery for an access that did not end. After a worker death, that
    /// access comes back broken (see [`Worker::restore_broken_access`]).
    pub fn note_crashed_access(&self, record: &AccessRecord) {
        if self.restarted() {
            *self.crashed_access.lock().recover() = Some(record.clone());
        }
    }

    /// An access that was active when the previous worker died is set up again and
    /// broken at once ("daemon restarted"): its copies in memory are lost, so its
    /// snapshot cannot be trusted. Reads get EIO, `teardown --success` fails, and the
    /// bitmaps keep every change (recovery ORed each background into its bitmap).
    pub fn restore_broken_access(&self, engine: &Engine) {
        let Some(record) = self.crashed_access.lock().recover().take() else {
            return;
        };
        let target = record.target;
        let devices: Vec<String> = record.devices.into_iter().map(|(n, _)| n).collect();
        match engine.restore_broken(&target, &devices, record.id, "daemon restarted") {
            Ok(_) => {
                log::warn!(
                    "backup access '{target}' was active when the worker died: it is broken (daemon restarted); tear it down"
                );
            }
            Err(e) => log::error!(
                "cannot restore the broken backup access '{target}': {}",
                crate::error::report(&e)
            ),
        }
    }

    /// Records what INIT negotiated (the first worker's `FleeceFs::init`).
    pub fn record_init(&self, coherent_direct_io: bool, has_resend: bool) {
        #[cfg(feature = "fault-injection")]
        let has_resend = has_resend && std::env::var_os("FLEECEFS_FAULT_NO_RESEND").is_none();
        self.has_resend.store(has_resend, Ordering::Relaxed);
        self.report(&Report::Init(Negotiated {
            coherent_direct_io,
            has_resend,
        }));
    }

    /// After a takeover: asks the kernel to resend what the dead worker had read but not
    /// answered. Call once the session threads run.
    pub fn resend(&self, session_fd: BorrowedFd<'_>) {
        if !self.restarted() {
            return;
        }
        let Ok(owned) = session_fd.try_clone_to_owned() else {
            log::error!("cannot duplicate the FUSE fd to send FUSE_NOTIFY_RESEND");
            return;
        };
        match sys::fuse_notify_resend(&File::from(owned)) {
            Ok(()) => log::info!("FUSE_NOTIFY_RESEND sent: unanswered requests are read again"),
            Err(e) => {
                log::error!("FUSE_NOTIFY_RESEND failed: {e}; requests of the dead worker may hang")
            }
        }
    }

    /// The worker serves: tells the keeper (which tells `mount`), and a background worker
    /// leaves the terminal.
    pub fn ready(&self, connection: u32) {
        let now = now_ms();
        *self.served_ms.lock().recover() = Some(now);
        if let Some(l) = &self.plan.last_restart {
            // A death (not a planned restart) is a warning, with the pause writers saw.
            let planned = l.reason.starts_with("planned restart")
                || l.reason.starts_with("service restarted");
            let level = if planned {
                log::Level::Info
            } else {
                log::Level::Warn
            };
            log::log!(
                level,
                "worker {} serving after a restart ({}): writers paused {} ms",
                std::process::id(),
                l.reason,
                now.saturating_sub(l.at_ms)
            );
        }
        self.report(&Report::Ready { connection });
        if self.plan.background {
            crate::logger::stop_tee();
            sys::redirect_stdio_to_null();
        }
    }

    /// The FUSE session ended with the unmount, and the worker has shut down: the mount
    /// is over (the keeper does not start another worker).
    pub fn unmounted(&self) {
        self.report(&Report::Unmounted);
    }

    /// The keeper fields of `status`.
    pub fn status(&self) -> KeeperStatus {
        let mut last = self.plan.last_restart.clone();
        if let (Some(l), Some(served)) = (&mut last, *self.served_ms.lock().recover()) {
            l.pause_ms = Some(served.saturating_sub(l.at_ms));
        }
        KeeperStatus {
            keeper_pid: self.plan.keeper_pid,
            worker_pid: std::process::id(),
            worker_restarts: self.plan.restarts,
            last_restart: last,
        }
    }

    /// The control request `restart`: drain, flush, hand over to a worker started from
    /// `binary`, and exit. `deliver` writes the reply; after a successful reply the
    /// process exits.
    pub fn handle_restart(
        &self,
        engine: &Engine,
        binary: Option<String>,
        force: bool,
        deliver: impl FnOnce(Result<serde_json::Value>),
    ) {
        if !self.has_resend.load(Ordering::Relaxed) {
            return deliver(Err(Error::invalid(
                "this kernel lacks FUSE_NOTIFY_RESEND (Linux 6.9 or later): a restart would end the mount; unmount and mount again instead",
            )));
        }
        if let (Some((_, target)), false) = (engine.active(), force) {
            return deliver(Err(Error::busy(format!(
                "a backup access is active for target '{target}': a restart would break it; tear it down first, or use --force"
            ))));
        }
        let explicit = binary.map(PathBuf::from);
        let checked = match &explicit {
            Some(p) => Binary::verify(p),
            None => Binary::installed(&self.plan.keeper_binary),
        }
        .and_then(|b| b.check_version().map(|_| b));
        let binary = match checked {
            Ok(b) => b.path().to_path_buf(),
            Err(e) => return deliver(Err(e)),
        };
        // From here on the worker hands over whatever happens.
        let start = now_ms();
        log::info!(
            "planned restart: draining, then handing over to {}",
            binary.display()
        );
        if !GATE.close_and_drain(DRAIN_TIMEOUT) {
            log::warn!(
                "requests still in flight after {} s: handing over anyway (the kernel resends them)",
                DRAIN_TIMEOUT.as_secs()
            );
        }
        match engine.active() {
            None => {
                engine.wait_for_copies(DRAIN_TIMEOUT);
                // Closes every bitmap cleanly: the next worker opens them as after a
                // clean stop.
                engine.shutdown();
            }
            Some((_, target)) => {
                log::warn!("restart --force: backup access '{target}' breaks (daemon restarted)");
                // Its bitmaps are closed cleanly: the next setup of the target uses them.
                engine.hand_over();
            }
        }
        self.report(&Report::Restart {
            at_ms: start,
            binary: explicit,
        });
        deliver(Ok(serde_json::json!({
            "old_worker_pid": std::process::id(),
            "binary": binary,
        })));
        std::process::exit(EXIT_HANDOVER);
    }

    /// A SIGTERM to a worker whose fds are in systemd's store (`systemctl restart` or
    /// `stop`): stop like a planned restart (drain, flush, clean bitmaps) without
    /// unmounting, and exit 75. Its keeper exits too; a keeper that did not get the
    /// signal starts a new worker.
    pub fn stop_keeping_connection(&self, engine: &Engine) -> ! {
        log::info!(
            "stopping without unmounting: the FUSE connection stays in systemd's file descriptor store"
        );
        if !GATE.close_and_drain(DRAIN_TIMEOUT) {
            log::warn!(
                "requests still in flight after {} s: stopping anyway (the kernel resends them)",
                DRAIN_TIMEOUT.as_secs()
            );
        }
        if engine.active().is_none() {
            engine.wait_for_copies(DRAIN_TIMEOUT);
            engine.shutdown();
        }
        std::process::exit(EXIT_HANDOVER);
    }
}

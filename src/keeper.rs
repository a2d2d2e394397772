//! Keeper and worker: the mount survives the death of the process that serves it.
//!
//! `fleecefs mount` runs two processes. The **keeper** opens `/dev/fuse`, mounts, makes
//! one clone of the fd per extra FUSE thread (`FUSE_DEV_IOC_CLONE`), and holds all of
//! them for the life of the mount. It starts the **worker** (the same binary with
//! `--worker`), which inherits the fds over `exec` (their numbers in the environment
//! variable [`WORKER_ENV`]) and does everything a daemon does: recovery, engine, control
//! socket, FUSE requests. The keeper holds no engine state and serves no request.
//!
//! A FUSE connection lives while one process holds one of its fds, and a clone's
//! processing queue (requests read but not answered) is aborted only when its last
//! holder closes it. So when a worker dies, its unanswered requests wait in the kernel;
//! the keeper starts a new worker, which takes the fds over without a second INIT (the
//! parameters negotiated by the first worker are kept by the keeper and handed on), and
//! sends `FUSE_NOTIFY_RESEND` (Linux 6.9+): the kernel queues those requests again, and
//! the new worker answers them. Writers see a pause, not an error.
//!
//! The worker reports to the keeper over a pipe, one line per event, each starting with
//! its pid: `init {json}` (negotiated at INIT), `ready CONNECTION` (serving),
//! `restart MILLIS PATH` (a planned restart: the worker has drained and exits next).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cli::MountArgs;
use crate::control::client::FSNAME_PREFIX;
use crate::engine::Engine;
use crate::error::{Error, IoContext, Kind, Result};
use crate::state::{StateDir, LOG_FILE};
use crate::sys;

mod process;
pub use process::{run, MountPlan};

/// Environment variable that carries a worker's [`WorkerEnv`] (JSON).
pub const WORKER_ENV: &str = "FLEECEFS_WORKER";
/// Exit code of a worker that handed over for a planned restart.
const EXIT_HANDOVER: i32 = 75;
/// This many counted worker deaths within [`CRASH_WINDOW`] make the keeper give up
/// (every death counts except a SIGKILL after the worker served).
pub const CRASH_LIMIT: usize = 5;
/// See [`CRASH_LIMIT`].
pub const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// The keeper's `oom_score_adj`: the OOM killer takes a worker first (replaced at once);
/// the keeper's death would end the mount.
pub const KEEPER_OOM_SCORE_ADJ: i32 = -900;
/// Longest a planned restart waits for the requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the first worker negotiated at INIT and later workers must honour.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// FUSE_DIRECT_IO_ALLOW_MMAP was granted (see `FleeceFs::open`).
    pub coherent_direct_io: bool,
    /// The kernel offers FUSE_HAS_RESEND (FUSE_NOTIFY_RESEND).
    pub has_resend: bool,
}

/// The last worker restart, as `status` reports it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LastRestart {
    /// When the old worker died or began to hand over (seconds since the epoch).
    pub at: u64,
    /// Why: `planned restart`, `killed by signal 9`, `exited with status 1`, ...
    pub reason: String,
    /// Milliseconds from then until the new worker served again: the writers' pause.
    #[serde(default)]
    pub pause_ms: Option<u64>,
    /// `at` in milliseconds.
    #[serde(default)]
    pub at_ms: u64,
}

/// Everything a worker inherits from its keeper.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct WorkerEnv {
    /// The keeper's pid.
    pub keeper_pid: u32,
    /// The keeper's own binary (the default of `restart --binary`).
    pub keeper_binary: PathBuf,
    /// The mount point as the keeper resolved it (the worker must not touch the mount
    /// before it serves).
    pub mountpoint: PathBuf,
    /// `/dev/fuse` fds: the session fd, then its clones.
    pub fds: Vec<i32>,
    /// Write end of the report pipe.
    pub report_fd: i32,
    /// The state directory lock (shared with the keeper).
    pub lock_fd: i32,
    /// Workers started before this one.
    pub restarts: u64,
    /// The last restart.
    pub last_restart: Option<LastRestart>,
    /// INIT was answered already (by an earlier worker) with these parameters.
    pub negotiated: Option<Negotiated>,
    /// A background mount: log to the state directory's log file.
    pub daemon: bool,
    /// The fds are in systemd's file descriptor store: a SIGTERM stops the worker
    /// without unmounting (see [`adopt_fd_store`]).
    #[serde(default)]
    pub fd_store: bool,
}

/// FDNAME of the `/dev/fuse` fds in systemd's file descriptor store.
const FD_NAME_FUSE: &str = "fleecefs-fuse";
/// FDNAME of the memfd that holds the [`Negotiated`] parameters (JSON).
const FD_NAME_INIT: &str = "fleecefs-init";

/// The FUSE connection handed over by systemd (`LISTEN_FDS`) to a keeper started again
/// by `systemctl restart`.
struct Adopted {
    fds: Vec<File>,
    negotiated: Option<Negotiated>,
}

static ADOPTED: Mutex<Option<Adopted>> = Mutex::new(None);

/// Whether this keeper takes a stored FUSE connection over (see [`adopt_fd_store`]).
pub fn adopting() -> bool {
    ADOPTED.lock().unwrap_or_else(|e| e.into_inner()).is_some()
}

/// systemd's file descriptor store (`FileDescriptorStoreMax=`): the keeper stores its
/// `/dev/fuse` fds there (`FDSTORE=1`, name `fleecefs-fuse`) and the negotiated
/// parameters (a memfd, `fleecefs-init`). When `systemctl restart` starts the service
/// again, systemd passes them back (`LISTEN_FDS`, `LISTEN_FDNAMES`): the new keeper
/// takes the mount over instead of mounting, like a new worker after a death. Call
/// before validating (the mount point must not be touched: nobody serves it yet).
pub fn adopt_fd_store() -> Result<()> {
    let var = |k: &str| std::env::var(k).ok();
    let (Some(pid), Some(n)) = (var("LISTEN_PID"), var("LISTEN_FDS")) else {
        return Ok(());
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(());
    }
    let names = var("LISTEN_FDNAMES").unwrap_or_default();
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    let n: i32 = n
        .parse()
        .map_err(|_| Error::invalid(format!("LISTEN_FDS={n} is not a number")))?;
    let names: Vec<&str> = names.split(':').collect();
    let mut adopted = Adopted {
        fds: Vec::new(),
        negotiated: None,
    };
    for i in 0..n {
        let fd = 3 + i;
        // SAFETY: systemd passed fds 3..3+LISTEN_FDS to this process (LISTEN_PID).
        let f = unsafe { sys::inherited_file(fd) }
            .map_err(|e| Error::io(format!("fd {fd} from systemd"), e))?;
        match names.get(i as usize).copied() {
            Some(FD_NAME_FUSE) => adopted.fds.push(f),
            Some(FD_NAME_INIT) => {
                let mut text = String::new();
                use std::io::Read;
                let _ = (&f).read_to_string(&mut text);
                adopted.negotiated = serde_json::from_str(&text).ok();
            }
            _ => {}
        }
    }
    if !adopted.fds.is_empty() {
        *ADOPTED.lock().unwrap_or_else(|e| e.into_inner()) = Some(adopted);
    }
    Ok(())
}

/// Sends `fds` to systemd's file descriptor store under `name`, when running under
/// systemd with one (`NOTIFY_SOCKET`). Whether they were stored.
fn fd_store_send(name: &str, fds: &[i32]) -> bool {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    // Only where the unit has a store: systemd 254+ says so ($FDSTORE), the unit file
    // of docs/ says so itself (FLEECEFS_FDSTORE=1). Elsewhere SIGTERM must unmount.
    let has_store = std::env::var("FDSTORE").is_ok_and(|n| n.parse::<u32>().is_ok_and(|n| n > 0))
        || std::env::var("FLEECEFS_FDSTORE").is_ok_and(|v| v == "1");
    if !has_store {
        return false;
    }
    match sys::notify_with_fds(&socket, &format!("FDSTORE=1\nFDNAME={name}\n"), fds) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("cannot store the fds in systemd's file descriptor store: {e}");
            false
        }
    }
}

/// A SIGTERM to a worker whose fds are in systemd's store (`systemctl restart` or
/// `stop`): stop like a planned restart (drain, flush, clean bitmaps) without unmounting,
/// and exit 75. Its keeper exits too; a keeper that did not get the signal starts a new
/// worker.
pub fn stop_keeping_connection(engine: &Engine) -> ! {
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------
// The drain gate (planned restarts)

/// Requests that act on data pass this gate. A planned restart closes it and waits until
/// no request is inside: requests that arrive later wait at the gate until the worker
/// exits, and the kernel resends them to the next worker. Passing it costs two atomic
/// operations (no lock) while it is open.
pub struct Gate {
    closed: AtomicBool,
    inside: AtomicUsize,
    lock: Mutex<()>,
    idle: Condvar,
}

/// A request inside the [`Gate`].
pub struct Pass<'a>(&'a Gate);

impl Gate {
    const fn new() -> Gate {
        Gate {
            closed: AtomicBool::new(false),
            inside: AtomicUsize::new(0),
            lock: Mutex::new(()),
            idle: Condvar::new(),
        }
    }

    /// Enters; blocks for good once the gate is closed.
    pub fn enter(&self) -> Pass<'_> {
        // SeqCst on both sides: either the drain sees this request inside, or this
        // request sees the gate closed.
        self.inside.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.leave();
            let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                g = self.idle.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        }
        Pass(self)
    }

    fn leave(&self) {
        if self.inside.fetch_sub(1, Ordering::SeqCst) == 1 && self.closed.load(Ordering::SeqCst) {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.idle.notify_all();
        }
    }

    /// Closes the gate and waits until no request is inside (at most `timeout`).
    fn close_and_drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.closed.store(true, Ordering::SeqCst);
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        while self.inside.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            g = self
                .idle
                .wait_timeout(g, Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// The gate of this process.
pub static GATE: Gate = Gate::new();

// ---------------------------------------------------------------------------------
// Worker side

/// A worker's link to its keeper.
pub struct Worker {
    env: WorkerEnv,
    report: Mutex<File>,
    fds: Mutex<Vec<File>>,
    crashed_access: Mutex<Option<crate::state::AccessRecord>>,
    served_ms: Mutex<Option<u64>>,
    /// The kernel can resend (FUSE_HAS_RESEND), as negotiated at INIT.
    has_resend: AtomicBool,
}

static WORKER: OnceLock<Worker> = OnceLock::new();

/// This process's worker link, when it runs as a keeper's worker.
pub fn worker() -> Option<&'static Worker> {
    WORKER.get()
}

/// Reads [`WORKER_ENV`] and takes the inherited fds (`mount --worker`).
pub fn worker_init() -> Result<()> {
    let text = std::env::var(WORKER_ENV)
        .map_err(|_| Error::invalid(format!("--worker needs {WORKER_ENV} (set by the keeper)")))?;
    let env: WorkerEnv = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(format!("{WORKER_ENV} is malformed: {e}")))?;
    std::env::remove_var(WORKER_ENV);
    let take = |fd: i32| {
        // SAFETY: the keeper passed these fds to this process and nothing else owns them.
        unsafe { sys::inherited_file(fd) }.map_err(|e| Error::io(format!("inherited fd {fd}"), e))
    };
    let report = take(env.report_fd)?;
    let fds = env
        .fds
        .iter()
        .map(|&fd| take(fd))
        .collect::<Result<Vec<_>>>()?;
    #[cfg(feature = "fault-injection")]
    if let Some(from) = std::env::var("FLEECEFS_FAULT_WORKER_DIE_FROM")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        if env.restarts >= from {
            log::error!("fault injection: worker {} dies at start", env.restarts);
            std::process::exit(3);
        }
    }
    let resend = env.negotiated.is_some_and(|n| n.has_resend);
    let w = Worker {
        env,
        report: Mutex::new(report),
        fds: Mutex::new(fds),
        crashed_access: Mutex::new(None),
        served_ms: Mutex::new(None),
        has_resend: AtomicBool::new(resend),
    };
    let _ = WORKER.set(w);
    Ok(())
}

impl Worker {
    /// Takes the `/dev/fuse` fds inherited from the keeper (the session fd first, then
    /// its clones); empty the second time.
    pub fn take_fuse_fds(&self) -> Vec<OwnedFd> {
        std::mem::take(&mut *self.fds.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .map(OwnedFd::from)
            .collect()
    }

    /// What an earlier worker's INIT negotiated, or `None` for the first worker (which
    /// answers INIT itself).
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.env.negotiated
    }

    /// The mount point the keeper mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.env.mountpoint
    }

    /// Whether the worker logs to the state directory's log file (a background mount).
    pub fn daemon(&self) -> bool {
        self.env.daemon
    }

    /// Whether the fds are in systemd's file descriptor store.
    pub fn fd_store(&self) -> bool {
        self.env.fd_store
    }

    /// Whether an earlier worker served this mount.
    pub fn restarted(&self) -> bool {
        self.env.negotiated.is_some()
    }

    /// The state directory, under the lock the keeper holds.
    pub fn state_dir(&self, path: &Path) -> Result<StateDir> {
        // SAFETY: the keeper passed the lock fd to this process; nothing else owns it.
        let lock = unsafe { sys::inherited_file(self.env.lock_fd) }
            .map_err(|e| Error::io("inherited state directory lock", e))?;
        StateDir::adopt(path, lock)
    }

    fn report(&self, line: &str) {
        let mut f = self.report.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(f, "{} {line}", std::process::id());
    }

    /// Called by recovery for an access that did not end. After a worker death, that
    /// access comes back broken (see [`restore_broken_access`]).
    pub fn note_crashed_access(&self, record: &crate::state::AccessRecord) {
        if self.restarted() {
            *self
                .crashed_access
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(record.clone());
        }
    }
}

/// An access that was active when the previous worker died is set up again and broken
/// at once ("daemon restarted"): its copies in memory are lost, so its snapshot cannot
/// be trusted. Reads get EIO, `teardown --success` fails, and the bitmaps keep every
/// change (recovery ORed each background into its bitmap).
pub fn restore_broken_access(engine: &Engine) {
    let Some(w) = worker() else { return };
    let Some(record) = w
        .crashed_access
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    else {
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
pub fn record_init(coherent_direct_io: bool, has_resend: bool) {
    #[cfg(feature = "fault-injection")]
    let has_resend = has_resend && std::env::var_os("FLEECEFS_FAULT_NO_RESEND").is_none();
    if let Some(w) = worker() {
        w.has_resend.store(has_resend, Ordering::Relaxed);
        let n = Negotiated {
            coherent_direct_io,
            has_resend,
        };
        w.report(&format!(
            "init {}",
            serde_json::to_string(&n).unwrap_or_default()
        ));
    }
}

/// After a takeover: asks the kernel to resend what the dead worker had read but not
/// answered. Call once the session threads run.
pub fn resend(session_fd: Option<std::os::fd::BorrowedFd<'_>>) {
    let (Some(w), Some(fd)) = (worker(), session_fd) else {
        return;
    };
    if !w.restarted() {
        return;
    }
    let Ok(owned) = fd.try_clone_to_owned() else {
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
pub fn ready(connection: u32) {
    let Some(w) = worker() else { return };
    let now = now_ms();
    *w.served_ms.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
    if let Some(l) = &w.env.last_restart {
        // A death (not a planned restart) is a warning, with the pause writers saw.
        let planned =
            l.reason.starts_with("planned restart") || l.reason.starts_with("service restarted");
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
    w.report(&format!("ready {connection}"));
    if w.env.daemon {
        crate::logger::stop_tee();
        sys::redirect_stdio_to_null();
        let _ = std::env::set_current_dir("/");
    }
}

/// Adds the keeper fields to a `status` reply.
pub fn add_status(v: &mut serde_json::Value) {
    let Some(obj) = v.as_object_mut() else { return };
    let (keeper, restarts, last) = match worker() {
        Some(w) => {
            let mut last = w.env.last_restart.clone();
            if let (Some(l), Some(served)) = (
                &mut last,
                *w.served_ms.lock().unwrap_or_else(|e| e.into_inner()),
            ) {
                l.pause_ms = Some(served.saturating_sub(l.at_ms));
            }
            (Some(w.env.keeper_pid), w.env.restarts, last)
        }
        None => (None, 0, None),
    };
    // `pid` stays the daemon's: the keeper, the process that mounted and holds the lock.
    if let Some(k) = keeper {
        obj.insert("pid".into(), serde_json::json!(k));
    }
    obj.insert("keeper_pid".into(), serde_json::json!(keeper));
    obj.insert("worker_pid".into(), serde_json::json!(std::process::id()));
    obj.insert("worker_restarts".into(), serde_json::json!(restarts));
    obj.insert("last_restart".into(), serde_json::json!(last));
}

/// The control request `restart`: drain, flush, hand over to a worker started from
/// `binary`, and exit. `deliver` writes the reply; after a successful reply the process
/// exits.
pub fn handle_restart(
    engine: &Engine,
    binary: Option<String>,
    force: bool,
    deliver: impl FnOnce(Result<serde_json::Value>),
) {
    let Some(w) = worker() else {
        return deliver(Err(Error::invalid(
            "this mount has no keeper (the kernel lacks FUSE_NOTIFY_RESEND): it cannot restart without unmounting",
        )));
    };
    if !w.has_resend.load(Ordering::Relaxed) {
        return deliver(Err(Error::invalid(
            "this kernel lacks FUSE_NOTIFY_RESEND (Linux 6.9 or later): a restart would end the mount; unmount and mount again instead",
        )));
    }
    if let (Some((_, target)), false) = (engine.active(), force) {
        return deliver(Err(Error::busy(format!(
            "a backup access is active for target '{target}': a restart would break it; tear it down first, or use --force"
        ))));
    }
    let binary = binary
        .map(PathBuf::from)
        .unwrap_or_else(|| w.env.keeper_binary.clone());
    if let Err(e) = check_binary(&binary) {
        return deliver(Err(e));
    }
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
            // Closes every bitmap cleanly: the next worker opens them as after a clean stop.
            engine.shutdown();
        }
        Some((_, target)) => {
            log::warn!("restart --force: backup access '{target}' breaks (daemon restarted)");
            // Its bitmaps are closed cleanly: the next setup of the target uses them.
            engine.hand_over();
        }
    }
    w.report(&format!("restart {start} {}", binary.display()));
    deliver(Ok(serde_json::json!({
        "old_worker_pid": std::process::id(),
        "binary": binary,
    })));
    std::process::exit(EXIT_HANDOVER);
}

/// `binary` must be an executable fleecefs.
fn check_binary(binary: &Path) -> Result<()> {
    let shown = binary.display();
    match std::fs::metadata(binary) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
        Ok(_) => return Err(Error::invalid(format!("{shown} is not an executable file"))),
        Err(e) => return Err(Error::io(format!("binary {shown}"), e)),
    }
    let out = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("running {shown} --version"), e))?;
    if !out.status.success() || !out.stdout.starts_with(b"fleecefs ") {
        return Err(Error::invalid(format!(
            "{shown} is not a fleecefs binary ('{shown} --version' does not say fleecefs)"
        )));
    }
    Ok(())
}

/// `fleecefs restart MOUNTPOINT [--binary PATH] [--force]`.
pub fn restart_command(mountpoint: &Path, binary: Option<&Path>, force: bool) -> Result<()> {
    use crate::control::client::call;
    use crate::control::proto::Request;
    let binary = match binary {
        Some(b) => {
            let b = std::path::absolute(b).context(|| format!("resolving {}", b.display()))?;
            check_binary(&b)?;
            Some(b.to_string_lossy().into_owned())
        }
        None => None,
    };
    let before = call(mountpoint, &Request::Status {})?;
    let restarts = before["worker_restarts"].as_u64().unwrap_or(0);
    let reply = call(mountpoint, &Request::Restart { binary, force })?;
    let old = reply["old_worker_pid"].as_u64().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(20));
        if let Ok(v) = call(mountpoint, &Request::Status {}) {
            let pause = v["last_restart"]["pause_ms"].as_u64();
            if v["worker_restarts"].as_u64().unwrap_or(0) > restarts && pause.is_some() {
                crate::out!(
                    "restarted: worker {old} -> {} ({}); writers paused {} ms",
                    v["worker_pid"],
                    reply["binary"].as_str().unwrap_or("?"),
                    pause.unwrap_or(0)
                );
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(Error::busy(
                "the new worker does not answer after 60 s; see the log in the state directory",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_drains_in_flight_requests_and_holds_new_ones() {
        static G: Gate = Gate::new();
        let inside = G.enter();
        let (tx, rx) = mpsc::channel();
        let drain = std::thread::spawn(move || {
            let done = G.close_and_drain(Duration::from_secs(10));
            tx.send(done).ok();
        });
        // The drain waits for the request inside.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(inside);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(true));
        drain.join().ok();
        // A request arriving now waits at the gate (until the process exits).
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _p = G.enter();
            tx.send(()).ok();
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    }

    #[test]
    fn drain_gives_up_after_its_timeout() {
        static G: Gate = Gate::new();
        let _inside = G.enter();
        assert!(!G.close_and_drain(Duration::from_millis(50)));
    }
}

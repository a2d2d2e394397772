//! The keeper process: mounts (or adopts the fds systemd kept), starts workers and
//! starts them again when they die or hand over, gives up on a crash loop, and ends with
//! the mount.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::binary::{Binary, Exec};
use super::fdchannel::{self, HeldFds};
use super::fdstore::{self, Adopted, FD_NAME_FUSE, FD_NAME_INIT};
use super::{
    now_ms, Fallback, LastRestart, MountSpec, NamedFd, Negotiated, Report, SourceFd, WorkerPlan,
    CRASH_LIMIT, CRASH_WINDOW, EXIT_HANDOVER, KEEPER_OOM_SCORE_ADJ, PLAN_ENV, START_TIMEOUT,
};
use crate::error::{Error, IoContext, Kind, Result};
use crate::state::{StateDir, LOG_FILE};
use crate::sync::Recover;
use crate::sys;

enum Event {
    Report(u32, Report),
    Exit(u32, ExitStatus),
    Signal(i32),
}

fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => format!("ended ({status})"),
    }
}

/// Detaches the mount and aborts its connection: every waiting request fails.
fn give_up(mountpoint: &Path, connection: Option<u32>, why: &str) -> Error {
    log::error!(
        "giving up on {}: {why}; the mount is detached and its connection aborted (mount again to recover)",
        mountpoint.display()
    );
    sys::detach_and_abort(mountpoint, connection);
    Error::invalid(format!("gave up: {why}"))
}

/// The keeper: mounts `spec` (or takes over the connection systemd kept, `adopted`),
/// then runs workers that serve `serve` until the mount ends.
pub fn run<S: Serialize>(spec: MountSpec, adopted: Option<Adopted>, serve: &S) -> Result<()> {
    let serve = serde_json::to_value(serve)
        .map_err(|e| Error::invalid(format!("cannot encode the worker plan: {e}")))?;
    sys::block_signals(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]);
    let state = StateDir::open(&spec.state_dir)?;
    if spec.background {
        crate::logger::tee_to_file(&state.path().join(LOG_FILE), state.open_log());
    }
    // The OOM killer must pick a worker (replaced at once), never the keeper (whose death
    // ends the mount).
    if let Err(e) = sys::set_oom_score_adj(KEEPER_OOM_SCORE_ADJ.to_string().as_bytes()) {
        log::warn!("cannot set the keeper's oom_score_adj to {KEEPER_OOM_SCORE_ADJ}: {e}");
    }
    let (fds, negotiated, fd_store) = match adopted {
        Some(a) => {
            log::warn!(
                "took the FUSE connection of {} over from systemd's file descriptor store ({} fds)",
                spec.mountpoint.display(),
                a.fds.len()
            );
            let Some(n) = a.negotiated else {
                return Err(give_up(
                    &spec.mountpoint,
                    None,
                    "systemd's file descriptor store has the FUSE fds but not the parameters negotiated at INIT",
                ));
            };
            (a.fds, Some(n), true)
        }
        None => {
            let fds = mount_new(&spec)?;
            let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let stored = fdstore::send(FD_NAME_FUSE, &raw);
            (fds, None, stored)
        }
    };
    keep_running(spec, serve, state, fds, negotiated, fd_store)
}

/// Cleans a stale mount up, opens `/dev/fuse`, mounts, clones.
fn mount_new(spec: &MountSpec) -> Result<Vec<File>> {
    if spec.stale_mount {
        sys::force_unmount(&spec.mountpoint, None);
        log::warn!(
            "cleaned up the stale mount at {} left by a daemon that died",
            spec.mountpoint.display()
        );
    }
    let fuse = sys::open_dev_fuse().map_err(|e| Error::io("opening /dev/fuse", e))?;
    let options = format!(
        "default_permissions,subtype=fleecefs{}",
        if spec.allow_other { ",allow_other" } else { "" }
    );
    sys::mount_fuse(&fuse, &spec.fsname, &spec.mountpoint, &options)
        .map_err(|e| Error::io(format!("mounting {}", spec.mountpoint.display()), e))?;
    let mut fds = vec![fuse];
    for _ in 1..spec.threads {
        match sys::fuse_clone(&fds[0]) {
            Ok(c) => fds.push(c),
            Err(e) => {
                sys::detach_and_abort(&spec.mountpoint, None);
                return Err(Error::io("cloning the /dev/fuse fd", e));
            }
        }
    }
    Ok(fds)
}

/// The `-v` flags that give a worker the keeper's log level.
fn verbosity_args() -> Vec<&'static str> {
    let n = match log::max_level() {
        log::LevelFilter::Off | log::LevelFilter::Error | log::LevelFilter::Warn => 0,
        log::LevelFilter::Info => 1,
        log::LevelFilter::Debug => 2,
        log::LevelFilter::Trace => 3,
    };
    vec!["-v"; n]
}

fn keep_running(
    mut spec: MountSpec,
    serve: serde_json::Value,
    state: StateDir,
    fds: Vec<File>,
    negotiated: Option<Negotiated>,
    fd_store: bool,
) -> Result<()> {
    let signals = sys::block_signals(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]);
    let (tx, rx) = mpsc::channel();
    let (report_r, report_w) = sys::pipe().map_err(|e| Error::io("creating a pipe", e))?;
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("worker-reports".into())
            .spawn(move || {
                for line in BufReader::new(report_r).lines() {
                    let Ok(l) = line else { break };
                    let ev = match Report::parse(&l) {
                        Ok((pid, r)) => Event::Report(pid, r),
                        Err(e) => {
                            log::warn!("{e}");
                            continue;
                        }
                    };
                    if tx.send(ev).is_err() {
                        break;
                    }
                }
            })
            .context(|| "starting the report thread".into())?;
    }
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                // The signals are blocked in every thread: only this one receives them.
                if let Some(sig) = sys::wait_signal(&signals) {
                    if tx.send(Event::Signal(sig)).is_err() {
                        break;
                    }
                }
            })
            .context(|| "starting the signal thread".into())?;
    }
    let own_binary =
        std::env::current_exe().context(|| "finding the fleecefs executable".into())?;
    let running = Binary::running(own_binary.clone())?;
    let last_restart = negotiated.map(|_| LastRestart {
        at: now_ms() / 1000,
        reason: "service restarted (systemd's file descriptor store)".into(),
        pause_ms: None,
        at_ms: now_ms(),
        binary: Some(own_binary.clone()),
        fallback: None,
    });
    let held: HeldFds = Default::default();
    held.lock()
        .recover()
        .extend(std::mem::take(&mut spec.held_fds));
    let mut keeper = Keeper {
        held,
        channel_done: None,
        lock_fd: state.lock_fd(),
        spec,
        serve,
        fd_store,
        fds,
        report_w,
        own_binary,
        binary: running.try_clone()?,
        served: running,
        fallback: None,
        tx,
        rx,
        negotiated,
        connection: None,
        restarts: 0,
        last_restart,
        deaths: VecDeque::new(),
    };
    let result = keeper.serve();
    crate::logger::close_file();
    drop(state);
    result
}

struct Keeper {
    spec: MountSpec,
    /// What workers serve, as the daemon gave it (never read here).
    serve: serde_json::Value,
    fd_store: bool,
    fds: Vec<File>,
    report_w: File,
    /// The named fds workers handed over (fd channel), and those of the mount.
    held: HeldFds,
    /// Says when the current worker's fd channel has been read to its end.
    channel_done: Option<mpsc::Receiver<()>>,
    lock_fd: i32,
    /// Where the keeper was started from (`restart` without `--binary` runs what is
    /// installed there now).
    own_binary: PathBuf,
    /// The binary the next worker is started from.
    binary: Binary,
    /// The binary whose worker served last: where a new binary that fails falls back.
    served: Binary,
    /// A new binary that failed, for the next worker's `last_restart`.
    fallback: Option<Fallback>,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    negotiated: Option<Negotiated>,
    connection: Option<u32>,
    restarts: u64,
    last_restart: Option<LastRestart>,
    deaths: VecDeque<Instant>,
}

/// What the keeper saw of one worker, from its start to its exit.
#[derive(Default)]
struct Life {
    ready: bool,
    unmounted: bool,
    unmounting: bool,
    stopping: bool,
    timed_out: bool,
    planned: Option<(u64, Option<PathBuf>)>,
}

impl Keeper {
    fn plan(&self, fd_channel: i32) -> WorkerPlan<&serde_json::Value> {
        let held_fds = self
            .held
            .lock()
            .recover()
            .iter()
            .map(|(name, fd)| NamedFd {
                name: name.clone(),
                fd: fd.as_raw_fd(),
            })
            .collect();
        WorkerPlan {
            keeper_pid: std::process::id(),
            keeper_binary: self.own_binary.clone(),
            mountpoint: self.spec.mountpoint.clone(),
            state_dir: self.spec.state_dir.clone(),
            fuse_fds: self.fds.iter().map(|f| f.as_raw_fd()).collect(),
            listen_fds: self.spec.listen_fds.iter().map(|f| f.as_raw_fd()).collect(),
            sources: self
                .spec
                .sources
                .iter()
                .map(|s| SourceFd {
                    name: s.name.clone(),
                    path: s.path.clone(),
                    fd: s.file.as_raw_fd(),
                })
                .collect(),
            held_fds,
            report_fd: self.report_w.as_raw_fd(),
            fd_channel: Some(fd_channel),
            lock_fd: self.lock_fd,
            restarts: self.restarts,
            last_restart: self.last_restart.clone(),
            negotiated: self.negotiated,
            background: self.spec.background,
            fd_store: self.fd_store,
            serve: &self.serve,
        }
    }

    fn spawn(&mut self) -> Result<u32> {
        let (channel, worker_end) = fdchannel::pair()?;
        let plan = self.plan(worker_end.as_raw_fd());
        let memfd = plan.to_memfd()?;
        let mut keep = plan.fuse_fds.clone();
        keep.extend(&plan.listen_fds);
        keep.extend(plan.sources.iter().map(|s| s.fd));
        keep.extend(plan.held_fds.iter().map(|h| h.fd));
        keep.extend([
            plan.report_fd,
            plan.lock_fd,
            memfd.as_raw_fd(),
            worker_end.as_raw_fd(),
        ]);
        // Open across the exec too: the kernel runs a script's interpreter on /dev/fd/N.
        keep.push(self.binary.fd());
        let parent = std::process::id() as i32;
        let oom = self.spec.worker_oom_score_adj.to_string().into_bytes();
        let mut args: Vec<std::ffi::OsString> =
            verbosity_args().into_iter().map(Into::into).collect();
        args.push("worker".into());
        args.push(self.spec.mountpoint.clone().into_os_string());
        let exec = Exec::new(
            &self.binary,
            &args,
            &[(PLAN_ENV, memfd.as_raw_fd().to_string())],
        )?;
        let mut cmd = Command::new(self.binary.path());
        // Nothing the worker does depends on the directory the mount was started from
        // (every path in the plan is absolute), which may be gone by now.
        cmd.current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: the closure only makes async-signal-safe calls (fcntl, prctl, getppid,
        // open/write/close, execveat) and allocates nothing: `exec` was prepared before.
        unsafe {
            cmd.pre_exec(move || {
                sys::child_keep_fds_and_die_with_parent(&keep, parent)?;
                sys::set_oom_score_adj(&oom)?;
                // The open file the keeper verified, never its path again.
                Err(exec.run())
            });
        }
        let mut child = cmd
            .spawn()
            .context(|| format!("starting a worker from {}", self.binary.path().display()))?;
        drop(memfd);
        // Only the worker has its end now: the keeper's reads end when the worker does.
        drop(worker_end);
        let (done_tx, done_rx) = mpsc::channel();
        fdchannel::serve(channel, self.held.clone(), done_tx)?;
        self.channel_done = Some(done_rx);
        let pid = child.id();
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name("worker-wait".into())
            .spawn(move || {
                if let Ok(st) = child.wait() {
                    let _ = tx.send(Event::Exit(pid, st));
                }
            })
            .context(|| "starting the worker wait thread".into())?;
        log::info!(
            "keeper {}: worker {pid} started from {} ({} restart(s) so far)",
            std::process::id(),
            self.binary.path().display(),
            self.restarts
        );
        Ok(pid)
    }

    /// The first worker serves: a background keeper tells `mount` and leaves the
    /// terminal.
    fn first_served(&self) {
        if self.spec.background {
            let _ = std::io::stdout().write_all(b"ready\n");
            let _ = std::io::stdout().flush();
            crate::logger::stop_tee();
            sys::redirect_stdio_to_null();
            let _ = std::env::set_current_dir("/");
        }
    }

    /// Records what the first worker negotiated (and stores it with systemd).
    fn negotiated(&mut self, n: Negotiated, warned_resend: &mut bool) {
        if !n.has_resend && !*warned_resend {
            *warned_resend = true;
            log::warn!("this kernel lacks FUSE_NOTIFY_RESEND (Linux 6.9 or later): if the worker dies, the mount ends as before (ENOTCONN) instead of restarting");
        }
        if self.fd_store && self.negotiated.is_none() {
            let json = serde_json::to_vec(&n).unwrap_or_default();
            match sys::memfd_with(c"fleecefs-init", &json) {
                Ok(m) => {
                    fdstore::send(FD_NAME_INIT, &[m.as_raw_fd()]);
                }
                Err(e) => log::warn!("memfd for the fd store: {e}"),
            }
        }
        self.negotiated = Some(n);
    }

    /// A new binary failed (`why`): the next worker is started from the one that served.
    fn fall_back(&mut self, why: String) -> Result<()> {
        log::error!(
            "the worker from {} {why}: back to {}",
            self.binary.path().display(),
            self.served.path().display()
        );
        self.fallback = Some(Fallback {
            tried: self.binary.path().to_path_buf(),
            reason: why,
        });
        self.binary = self.served.try_clone()?;
        Ok(())
    }

    /// Follows worker `pid` until it exits. A worker from a binary that has not served
    /// yet (`trial`) gets [`START_TIMEOUT`] to serve, then is killed.
    fn follow(
        &mut self,
        pid: u32,
        trial: bool,
        served_once: &mut bool,
        warned_resend: &mut bool,
    ) -> Result<(ExitStatus, Life)> {
        let mp = self.spec.mountpoint.clone();
        let mut life = Life::default();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ev = if trial && !life.ready && !life.timed_out {
                match self
                    .rx
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                {
                    Ok(ev) => ev,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        life.timed_out = true;
                        let _ = sys::kill(pid, libc::SIGKILL);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(give_up(&mp, self.connection, "keeper channel closed"))
                    }
                }
            } else {
                match self.rx.recv() {
                    Ok(ev) => ev,
                    Err(_) => return Err(give_up(&mp, self.connection, "keeper channel closed")),
                }
            };
            match ev {
                Event::Report(from, _) if from != pid => {}
                Event::Report(_, Report::Init(n)) => self.negotiated(n, warned_resend),
                Event::Report(_, Report::Ready { connection }) => {
                    life.ready = true;
                    self.connection = Some(connection);
                    if trial {
                        self.served = self.binary.try_clone()?;
                    }
                    if !*served_once {
                        *served_once = true;
                        self.first_served();
                    }
                }
                Event::Report(_, Report::Restart { at_ms, binary }) => {
                    life.planned = Some((at_ms, binary));
                }
                Event::Report(_, Report::Unmounted) => life.unmounted = true,
                Event::Report(_, Report::DeviceRemoved { name }) => {
                    // Its lock goes with it: the image is free for others again.
                    self.spec.sources.retain(|s| s.name != name);
                }
                Event::Signal(sig) => self.signalled(sig, pid, &mut life),
                Event::Exit(p, st) if p == pid => {
                    // A report precedes the exit, but comes through another thread: let
                    // it arrive.
                    if life.planned.is_none() && !life.unmounted {
                        while let Ok(ev) = self.rx.recv_timeout(Duration::from_millis(200)) {
                            match ev {
                                Event::Report(from, Report::Restart { at_ms, binary })
                                    if from == pid =>
                                {
                                    life.planned = Some((at_ms, binary));
                                    break;
                                }
                                Event::Report(from, Report::Unmounted) if from == pid => {
                                    life.unmounted = true;
                                    break;
                                }
                                Event::Signal(sig) => self.signalled(sig, pid, &mut life),
                                _ => {}
                            }
                        }
                    }
                    return Ok((st, life));
                }
                Event::Exit(..) => {}
            }
        }
    }

    /// SIGTERM, SIGINT or SIGHUP: unmount, or with systemd's fd store, stop the worker
    /// and keep the mount.
    fn signalled(&self, sig: i32, pid: u32, life: &mut Life) {
        let mp = &self.spec.mountpoint;
        if self.fd_store {
            log::info!("signal {sig}: stopping; {} stays mounted, its FUSE connection in systemd's file descriptor store", mp.display());
            life.stopping = true;
            let _ = sys::kill(pid, libc::SIGTERM);
        } else {
            log::info!("signal {sig}: unmounting {}", mp.display());
            life.unmounting = true;
            sys::force_unmount(mp, self.connection);
        }
    }

    fn serve(&mut self) -> Result<()> {
        let mp = self.spec.mountpoint.clone();
        let mut served_once = false;
        let mut warned_resend = false;
        loop {
            let trial = !self.binary.same_file(&self.served);
            let pid = match self.spawn() {
                Ok(p) => p,
                Err(e) if trial => {
                    self.fall_back(format!("cannot start: {}", crate::error::report(&e)))?;
                    continue;
                }
                Err(e) => return Err(give_up_with(&mp, self.connection, e)),
            };
            let (status, life) = self.follow(pid, trial, &mut served_once, &mut warned_resend)?;
            // Every fd the worker handed over is held before the next worker starts.
            if let Some(done) = self.channel_done.take() {
                if done.recv_timeout(Duration::from_secs(5)).is_err() {
                    log::warn!("the fd channel of worker {pid} is still open after its exit");
                }
            }
            let at_ms = now_ms();
            if life.unmounting {
                sys::detach_and_abort(&mp, self.connection);
                return Ok(());
            }
            if life.stopping {
                log::info!("worker {pid} stopped; keeper exits (the mount stays)");
                return Ok(());
            }
            if life.unmounted {
                log::info!("worker {pid} ended after the unmount; keeper exits");
                return Ok(());
            }
            if !served_once {
                // The first worker failed before serving: `mount` fails (it said why).
                sys::detach_and_abort(&mp, None);
                return Err(Error::new(Kind::Invalid, String::new()));
            }
            let handover = match life.planned {
                Some(p) if status.code() == Some(EXIT_HANDOVER) => Some(p),
                _ => None,
            };
            let (reason, event_ms) = match (&handover, trial && !life.ready) {
                (Some((t, path)), _) => (
                    format!(
                        "planned restart ({})",
                        path.as_deref().unwrap_or(&self.own_binary).display()
                    ),
                    *t,
                ),
                // A failed new binary: the pause began with the planned restart.
                (None, true) => {
                    let why = if life.timed_out {
                        format!("did not serve within {} s", START_TIMEOUT.as_secs())
                    } else {
                        format!("{} before serving", describe(&status))
                    };
                    self.fall_back(why.clone())?;
                    let at = self.last_restart.as_ref().map_or(at_ms, |l| l.at_ms);
                    (format!("worker {pid} from a new binary {why}"), at)
                }
                (None, false) => {
                    let reason = format!("worker {pid} {}", describe(&status));
                    self.died(&reason, life.ready, &status)?;
                    (reason, at_ms)
                }
            };
            if let Some((_, path)) = handover {
                self.fallback = None;
                let next = match &path {
                    Some(p) => Binary::verify(p),
                    None => Binary::installed(&self.own_binary),
                };
                match next {
                    Ok(b) => self.binary = b,
                    Err(e) => {
                        let tried = path.unwrap_or_else(|| self.own_binary.clone());
                        log::error!(
                            "{}: back to {}",
                            crate::error::report(&e),
                            self.served.path().display()
                        );
                        self.fallback = Some(Fallback {
                            tried,
                            reason: crate::error::report(&e),
                        });
                        self.binary = self.served.try_clone()?;
                    }
                }
            }
            self.restarts += 1;
            self.last_restart = Some(LastRestart {
                at: event_ms / 1000,
                reason,
                pause_ms: None,
                at_ms: event_ms,
                binary: Some(self.binary.path().to_path_buf()),
                fallback: self.fallback.clone(),
            });
        }
    }

    /// A worker died (not a handover): counts toward the crash loop, or gives up.
    fn died(&mut self, reason: &str, ready: bool, status: &ExitStatus) -> Result<()> {
        let mp = self.spec.mountpoint.clone();
        // Recovered (writers pause): a warning; the new worker logs the pause.
        log::warn!("{reason}: starting a new worker");
        // A worker killed with SIGKILL after it served was killed from outside (an
        // operator, the OOM killer): recovered every time. Any other death, or one before
        // serving, may repeat with the next worker (a request that makes it panic is
        // resent to it): those count toward the crash loop.
        let counted = !(ready && status.signal() == Some(libc::SIGKILL));
        let now = Instant::now();
        if counted {
            self.deaths.push_back(now);
        }
        while self
            .deaths
            .front()
            .is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW)
        {
            self.deaths.pop_front();
        }
        if self.deaths.len() >= CRASH_LIMIT {
            return Err(give_up(
                &mp,
                self.connection,
                &format!(
                    "the worker died {} times within {} s (last: {reason})",
                    self.deaths.len(),
                    CRASH_WINDOW.as_secs()
                ),
            ));
        }
        if self.negotiated.is_some_and(|n| !n.has_resend) {
            return Err(give_up(
                &mp,
                self.connection,
                &format!(
                    "{reason}, and this kernel cannot resend its requests (no FUSE_NOTIFY_RESEND)"
                ),
            ));
        }
        Ok(())
    }
}

fn give_up_with(mp: &Path, connection: Option<u32>, e: Error) -> Error {
    give_up(mp, connection, &crate::error::report(&e))
}

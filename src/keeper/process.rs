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

use super::fdstore::{self, Adopted, FD_NAME_FUSE, FD_NAME_INIT};
use super::{
    now_ms, LastRestart, MountSpec, Negotiated, Report, WorkerPlan, CRASH_LIMIT, CRASH_WINDOW,
    EXIT_HANDOVER, KEEPER_OOM_SCORE_ADJ, PLAN_ENV,
};
use crate::error::{Error, IoContext, Kind, Result};
use crate::state::{StateDir, LOG_FILE};
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
    spec: MountSpec,
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
    let last_restart = negotiated.map(|_| LastRestart {
        at: now_ms() / 1000,
        reason: "service restarted (systemd's file descriptor store)".into(),
        pause_ms: None,
        at_ms: now_ms(),
    });
    let mut keeper = Keeper {
        lock_fd: state.lock_fd(),
        spec,
        serve,
        fd_store,
        fds,
        report_w,
        own_binary: own_binary.clone(),
        binary: own_binary,
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
    lock_fd: i32,
    own_binary: PathBuf,
    binary: PathBuf,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    negotiated: Option<Negotiated>,
    connection: Option<u32>,
    restarts: u64,
    last_restart: Option<LastRestart>,
    deaths: VecDeque<Instant>,
}

impl Keeper {
    fn plan(&self) -> WorkerPlan<&serde_json::Value> {
        WorkerPlan {
            keeper_pid: std::process::id(),
            keeper_binary: self.own_binary.clone(),
            mountpoint: self.spec.mountpoint.clone(),
            state_dir: self.spec.state_dir.clone(),
            fuse_fds: self.fds.iter().map(|f| f.as_raw_fd()).collect(),
            listen_fds: self.spec.listen_fds.iter().map(|f| f.as_raw_fd()).collect(),
            report_fd: self.report_w.as_raw_fd(),
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
        let plan = self.plan();
        let memfd = plan.to_memfd()?;
        let mut keep = plan.fuse_fds.clone();
        keep.extend(&plan.listen_fds);
        keep.extend([plan.report_fd, plan.lock_fd, memfd.as_raw_fd()]);
        let parent = std::process::id() as i32;
        let oom = self.spec.worker_oom_score_adj.to_string().into_bytes();
        let mut cmd = Command::new(&self.binary);
        cmd.args(verbosity_args())
            .arg("worker")
            .arg(&self.spec.mountpoint)
            // Nothing the worker does depends on the directory the mount was started
            // from (every path in the plan is absolute), which may be gone by now.
            .current_dir("/")
            .env(PLAN_ENV, memfd.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: the closure only makes async-signal-safe calls (fcntl, prctl, getppid,
        // open/write/close).
        unsafe {
            cmd.pre_exec(move || {
                sys::child_keep_fds_and_die_with_parent(&keep, parent)?;
                sys::set_oom_score_adj(&oom)
            });
        }
        let mut child = cmd
            .spawn()
            .context(|| format!("starting a worker from {}", self.binary.display()))?;
        drop(memfd);
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
            "keeper {}: worker {pid} started ({} restart(s) so far)",
            std::process::id(),
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

    fn serve(&mut self) -> Result<()> {
        let mp = self.spec.mountpoint.clone();
        let mut served_once = false;
        let mut warned_resend = false;
        loop {
            let pid = match self.spawn() {
                Ok(p) => p,
                Err(e) if served_once && self.binary != self.own_binary => {
                    log::error!(
                        "{}; restarting from {} instead",
                        crate::error::report(&e),
                        self.own_binary.display()
                    );
                    self.binary = self.own_binary.clone();
                    continue;
                }
                Err(e) => return Err(give_up_with(&mp, self.connection, e)),
            };
            let mut ready = false;
            let mut unmounting = false;
            let mut stopping = false;
            let mut planned: Option<(u64, PathBuf)> = None;
            let status = loop {
                let Ok(ev) = self.rx.recv() else {
                    return Err(give_up(&mp, self.connection, "keeper channel closed"));
                };
                match ev {
                    Event::Report(from, _) if from != pid => {}
                    Event::Report(_, Report::Init(n)) => self.negotiated(n, &mut warned_resend),
                    Event::Report(_, Report::Ready { connection }) => {
                        ready = true;
                        self.connection = Some(connection);
                        if !served_once {
                            served_once = true;
                            self.first_served();
                        }
                    }
                    Event::Report(_, Report::Restart { at_ms, binary }) => {
                        planned = Some((at_ms, binary));
                    }
                    Event::Signal(sig) if self.fd_store => {
                        log::info!("signal {sig}: stopping; {} stays mounted, its FUSE connection in systemd's file descriptor store", mp.display());
                        stopping = true;
                        let _ = sys::kill(pid, libc::SIGTERM);
                    }
                    Event::Signal(sig) => {
                        log::info!("signal {sig}: unmounting {}", mp.display());
                        unmounting = true;
                        sys::force_unmount(&mp, self.connection);
                    }
                    Event::Exit(p, st) if p == pid => {
                        // The report of a handover precedes the exit, but comes through
                        // another thread: let it arrive.
                        if st.code() == Some(EXIT_HANDOVER) && planned.is_none() {
                            while let Ok(ev) = self.rx.recv_timeout(Duration::from_millis(500)) {
                                if let Event::Report(from, Report::Restart { at_ms, binary }) = ev {
                                    if from == pid {
                                        planned = Some((at_ms, binary));
                                        break;
                                    }
                                }
                            }
                        }
                        break st;
                    }
                    Event::Exit(..) => {}
                }
            };
            let at_ms = now_ms();
            if status.success() {
                log::info!("worker {pid} ended after the unmount; keeper exits");
                return Ok(());
            }
            if unmounting {
                sys::detach_and_abort(&mp, self.connection);
                return Ok(());
            }
            if stopping {
                log::info!("worker {pid} stopped; keeper exits (the mount stays)");
                return Ok(());
            }
            if !served_once {
                // The first worker failed before serving: `mount` fails (it said why).
                sys::detach_and_abort(&mp, None);
                return Err(Error::new(Kind::Invalid, String::new()));
            }
            let handover = match planned {
                Some(p) if status.code() == Some(EXIT_HANDOVER) => Some(p),
                _ => None,
            };
            let (reason, event_ms) = match &handover {
                Some((t, path)) => (format!("planned restart ({})", path.display()), *t),
                None => (format!("worker {pid} {}", describe(&status)), at_ms),
            };
            match handover {
                Some((_, path)) => self.binary = path,
                None => self.died(&reason, ready, &status)?,
            }
            self.restarts += 1;
            self.last_restart = Some(LastRestart {
                at: event_ms / 1000,
                reason,
                pause_ms: None,
                at_ms: event_ms,
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
        if !ready && self.binary != self.own_binary {
            log::error!(
                "the worker from {} died before serving: back to {}",
                self.binary.display(),
                self.own_binary.display()
            );
            self.binary = self.own_binary.clone();
        }
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

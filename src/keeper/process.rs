//! The keeper process: mounts (or adopts the fds systemd kept), starts workers and
//! starts them again when they die or hand over, gives up on a crash loop, and ends with
//! the mount. The worker's side of the link is in the parent module.

use super::*;

enum Event {
    Line(String),
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

/// What the keeper needs of a validated `mount` request (`daemon::MountPlan`).
#[derive(Clone, Debug)]
pub struct MountPlan {
    /// Absolute mount point.
    pub mountpoint: PathBuf,
    /// Absolute state directory (may not exist yet).
    pub state_dir: PathBuf,
    /// Whether the mount point is a stale fleecefs mount to clean up first.
    pub stale_mount: bool,
    /// FUSE worker threads (one `/dev/fuse` fd each).
    pub threads: usize,
}

/// The keeper: mounts, then runs workers until the mount ends.
pub fn run(plan: MountPlan, args: &MountArgs) -> Result<()> {
    sys::block_signals(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]);
    let state = StateDir::open(&plan.state_dir)?;
    if args.daemon_child {
        crate::logger::tee_to_file(&state.path().join(LOG_FILE));
    }
    // The OOM killer must pick a worker (replaced at once), never the keeper (whose death
    // ends the mount).
    if let Err(e) = sys::set_oom_score_adj(KEEPER_OOM_SCORE_ADJ.to_string().as_bytes()) {
        log::warn!("cannot set the keeper's oom_score_adj to {KEEPER_OOM_SCORE_ADJ}: {e}");
    }
    let adopted = ADOPTED.lock().unwrap_or_else(|e| e.into_inner()).take();
    let (fds, negotiated, fd_store) = match adopted {
        Some(a) => {
            log::warn!(
                "took the FUSE connection of {} over from systemd's file descriptor store ({} fds)",
                plan.mountpoint.display(),
                a.fds.len()
            );
            let Some(n) = a.negotiated else {
                return Err(give_up(
                    &plan.mountpoint,
                    None,
                    "systemd's file descriptor store has the FUSE fds but not the parameters negotiated at INIT",
                ));
            };
            (a.fds, Some(n), true)
        }
        None => {
            let fds = mount_new(&plan, args)?;
            let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let stored = fd_store_send(FD_NAME_FUSE, &raw);
            (fds, None, stored)
        }
    };
    keep_running(plan, args, state, fds, negotiated, fd_store)
}

/// Cleans a stale mount up, opens `/dev/fuse`, mounts, clones.
fn mount_new(plan: &MountPlan, args: &MountArgs) -> Result<Vec<File>> {
    if plan.stale_mount {
        sys::force_unmount(&plan.mountpoint, None);
        log::warn!(
            "cleaned up the stale mount at {} left by a daemon that died",
            plan.mountpoint.display()
        );
    }
    let fuse = sys::open_dev_fuse().map_err(|e| Error::io("opening /dev/fuse", e))?;
    let source = format!("{FSNAME_PREFIX}{}", plan.state_dir.display());
    let options = format!(
        "default_permissions,subtype=fleecefs{}",
        if args.allow_other { ",allow_other" } else { "" }
    );
    sys::mount_fuse(&fuse, &source, &plan.mountpoint, &options)
        .map_err(|e| Error::io(format!("mounting {}", plan.mountpoint.display()), e))?;
    let mut fds = vec![fuse];
    for _ in 1..plan.threads {
        match sys::fuse_clone(&fds[0]) {
            Ok(c) => fds.push(c),
            Err(e) => {
                sys::detach_and_abort(&plan.mountpoint, None);
                return Err(Error::io("cloning the /dev/fuse fd", e));
            }
        }
    }
    Ok(fds)
}

fn keep_running(
    plan: MountPlan,
    args: &MountArgs,
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
                    if tx.send(Event::Line(l)).is_err() {
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
    let mut worker_args: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--daemon-child")
        .collect();
    worker_args.push("--worker".into());
    let last_restart = negotiated.map(|_| LastRestart {
        at: now_ms() / 1000,
        reason: "service restarted (systemd's file descriptor store)".into(),
        pause_ms: None,
        at_ms: now_ms(),
    });
    let mut keeper = Keeper {
        plan,
        fd_store,
        daemon: args.daemon_child,
        fds,
        report_w,
        lock_fd: state.lock_fd(),
        cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
        own_binary: own_binary.clone(),
        binary: own_binary,
        worker_args,
        worker_oom: args.worker_oom_score_adj,
        tx,
        rx,
        negotiated,
        connection: None,
        restarts: 0,
        last_restart,
        deaths: VecDeque::new(),
    };
    let result = keeper.serve();
    drop(state);
    result
}

struct Keeper {
    plan: MountPlan,
    fd_store: bool,
    daemon: bool,
    fds: Vec<File>,
    report_w: File,
    lock_fd: i32,
    cwd: PathBuf,
    own_binary: PathBuf,
    binary: PathBuf,
    worker_args: Vec<std::ffi::OsString>,
    /// `oom_score_adj` of every worker (`--worker-oom-score-adj`).
    worker_oom: i32,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    negotiated: Option<Negotiated>,
    connection: Option<u32>,
    restarts: u64,
    last_restart: Option<LastRestart>,
    deaths: VecDeque<Instant>,
}

/// `args` without `--device NAME=PATH` and `--device=NAME=PATH` (clap's two spellings).
fn without_device_options(args: &[std::ffi::OsString]) -> Vec<std::ffi::OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--device" {
            it.next();
        } else if !a.as_encoded_bytes().starts_with(b"--device=") {
            out.push(a.clone());
        }
    }
    out
}

impl Keeper {
    fn spawn(&mut self) -> Result<u32> {
        let env = WorkerEnv {
            keeper_pid: std::process::id(),
            keeper_binary: self.own_binary.clone(),
            mountpoint: self.plan.mountpoint.clone(),
            fds: self.fds.iter().map(|f| f.as_raw_fd()).collect(),
            report_fd: self.report_w.as_raw_fd(),
            lock_fd: self.lock_fd,
            restarts: self.restarts,
            last_restart: self.last_restart.clone(),
            negotiated: self.negotiated,
            daemon: self.daemon,
            fd_store: self.fd_store,
        };
        let mut keep = env.fds.clone();
        keep.extend([env.report_fd, env.lock_fd]);
        let parent = std::process::id() as i32;
        let oom = self.worker_oom.to_string().into_bytes();
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.worker_args)
            .current_dir(&self.cwd)
            .env(WORKER_ENV, serde_json::to_string(&env).unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: the closure only makes async-signal-safe calls (fcntl, prctl, getppid).
        unsafe {
            cmd.pre_exec(move || {
                sys::child_keep_fds_and_die_with_parent(&keep, parent)?;
                sys::set_oom_score_adj(&oom)
            });
        }
        let mut child = cmd
            .spawn()
            .context(|| format!("starting a worker from {}", self.binary.display()))?;
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

    fn serve(&mut self) -> Result<()> {
        let mp = self.plan.mountpoint.clone();
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
                    Event::Line(line) => {
                        let mut parts = line.splitn(3, ' ');
                        let (who, what, rest) = (
                            parts.next().unwrap_or(""),
                            parts.next().unwrap_or(""),
                            parts.next().unwrap_or(""),
                        );
                        if who != pid.to_string() {
                            continue;
                        }
                        match what {
                            "init" => {
                                if let Ok(n) = serde_json::from_str::<Negotiated>(rest) {
                                    if !n.has_resend && !warned_resend {
                                        warned_resend = true;
                                        log::warn!("this kernel lacks FUSE_NOTIFY_RESEND (Linux 6.9 or later): if the worker dies, the mount ends as before (ENOTCONN) instead of restarting");
                                    }
                                    if self.fd_store && self.negotiated.is_none() {
                                        let json = serde_json::to_vec(&n).unwrap_or_default();
                                        match sys::memfd_with(c"fleecefs-init", &json) {
                                            Ok(m) => {
                                                fd_store_send(FD_NAME_INIT, &[m.as_raw_fd()]);
                                            }
                                            Err(e) => log::warn!("memfd for the fd store: {e}"),
                                        }
                                    }
                                    self.negotiated = Some(n);
                                }
                            }
                            "ready" => {
                                ready = true;
                                self.connection = rest.trim().parse().ok();
                                if !served_once {
                                    served_once = true;
                                    // The first worker recorded the device set; later
                                    // workers serve the record, which `device add`,
                                    // `device remove` and `resize` keep current, not the
                                    // `--device` options the mount started with.
                                    self.worker_args = without_device_options(&self.worker_args);
                                    if self.daemon {
                                        let _ = std::io::stdout().write_all(b"ready\n");
                                        let _ = std::io::stdout().flush();
                                        crate::logger::stop_tee();
                                        sys::redirect_stdio_to_null();
                                        let _ = std::env::set_current_dir("/");
                                    }
                                }
                            }
                            "restart" => {
                                let mut p = rest.splitn(2, ' ');
                                let at =
                                    p.next().and_then(|t| t.parse().ok()).unwrap_or_else(now_ms);
                                planned = Some((at, PathBuf::from(p.next().unwrap_or(""))));
                            }
                            _ => log::debug!("unknown worker report: {line}"),
                        }
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
                            while let Ok(Event::Line(l)) =
                                self.rx.recv_timeout(Duration::from_millis(500))
                            {
                                if let Some(rest) = l.strip_prefix(&format!("{pid} restart ")) {
                                    let mut p = rest.splitn(2, ' ');
                                    let at = p
                                        .next()
                                        .and_then(|t| t.parse().ok())
                                        .unwrap_or_else(now_ms);
                                    planned = Some((at, PathBuf::from(p.next().unwrap_or(""))));
                                    break;
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
            let reason = match (&planned, status.code()) {
                (Some((_, path)), Some(EXIT_HANDOVER)) => {
                    format!("planned restart ({})", path.display())
                }
                _ => format!("worker {pid} {}", describe(&status)),
            };
            let event_ms = match &planned {
                Some((t, _)) if status.code() == Some(EXIT_HANDOVER) => *t,
                _ => at_ms,
            };
            if planned.is_some() && status.code() == Some(EXIT_HANDOVER) {
                if let Some((_, path)) = planned {
                    self.binary = path;
                }
            } else {
                // Recovered (writers pause): a warning; the new worker logs the pause.
                log::warn!("{reason}: starting a new worker");
                // A worker killed with SIGKILL after it served was killed from outside
                // (an operator, the OOM killer): recovered every time. Any other death,
                // or one before serving, may repeat with the next worker (a request that
                // makes it panic is resent to it): those count toward the crash loop.
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
                        &format!("{reason}, and this kernel cannot resend its requests (no FUSE_NOTIFY_RESEND)"),
                    ));
                }
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
}

fn give_up_with(mp: &Path, connection: Option<u32>, e: Error) -> Error {
    give_up(mp, connection, &crate::error::report(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_workers_drop_the_device_options() {
        let args: Vec<std::ffi::OsString> = [
            "mount",
            "/m",
            "--device",
            "a=/x",
            "--state-dir",
            "/s",
            "--device=b=/y",
            "-v",
        ]
        .iter()
        .map(Into::into)
        .collect();
        let want: Vec<std::ffi::OsString> = ["mount", "/m", "--state-dir", "/s", "-v"]
            .iter()
            .map(Into::into)
            .collect();
        assert_eq!(without_device_options(&args), want);
    }
}

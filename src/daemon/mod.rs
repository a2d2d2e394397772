//! The daemon: validates a `mount`, starts in the background, and runs the keeper,
//! whose workers serve (`fleecefs worker`).
//!
//! `plan.rs` checks the request and makes the [`ServePlan`]; `serve.rs` is a worker's
//! life: recovery, engine, control socket, FUSE session, shutdown.
//!
//! # Start
//! `fleecefs mount` validates everything it can in the caller's process, then (unless
//! `--foreground`) re-executes itself as a new session with `--daemon-child` and waits
//! for one line on the child's stdout: `ready` once the mount answers a request. Until
//! then the child's log goes to the caller's stderr as well as to `STATE_DIR/fleecefs.log`.
//! The foreground process, or the daemon child, becomes the keeper (`keeper::run`).
//!
//! # Shutdown order
//! `umount`, `fleecefs unmount`, SIGTERM, SIGINT or SIGHUP all end the FUSE session
//! (signals unmount; a busy mount is detached and its FUSE connection aborted). Then, in
//! the worker:
//! 1. the active access, if any, is torn down as a failure (fleecing files deleted);
//! 2. the control socket is removed;
//! 3. the worker exits 0, and the keeper releases the state directory lock and exits.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::cli::MountArgs;
use crate::control::client::FSNAME_PREFIX;
use crate::error::{Error, IoContext, Result};

mod plan;
mod serve;

pub use plan::{validate, MountpointCheck, ServePlan, Validated};

/// Process settings of the daemon's processes (keeper and workers).
fn process_setup() {
    // Before anything opens files.
    if let Err(e) = crate::sys::raise_fd_limit() {
        log::warn!("cannot raise the limit of open files: {e}");
    }
    // Every file the daemon makes has an explicit mode; the umask only narrows, so that
    // an inherited `umask 000` opens nothing.
    crate::sys::set_umask(0o077);
}

/// `fleecefs mount`: validate, then serve here (`--foreground`) or in the background.
pub fn mount(args: &MountArgs) -> Result<()> {
    process_setup();
    let keeper = args.foreground || args.daemon_child;
    let adopted = if keeper {
        crate::keeper::adopt_fd_store()?
    } else {
        None
    };
    let check = match adopted {
        Some(_) => MountpointCheck::Adopted,
        None => MountpointCheck::Check,
    };
    let Validated { serve, stale_mount } = validate(args, check)?;
    if !keeper {
        start_background()?;
        let names: Vec<&str> = serve.devices.iter().map(|(n, _)| n.as_str()).collect();
        crate::out!(
            "mounted {}: {} (log {})",
            serve.mountpoint.display(),
            if names.is_empty() {
                "no device yet".to_string()
            } else {
                format!("{} device(s): {}", names.len(), names.join(", "))
            },
            serve.state_dir.join(crate::state::LOG_FILE).display()
        );
        return Ok(());
    }
    let spec = crate::keeper::MountSpec {
        mountpoint: serve.mountpoint.clone(),
        state_dir: serve.state_dir.clone(),
        fsname: format!("{FSNAME_PREFIX}{}", serve.state_dir.display()),
        allow_other: serve.allow_other,
        threads: serve.threads,
        stale_mount,
        background: args.daemon_child,
        worker_oom_score_adj: serve.worker_oom_score_adj,
        // Bound here, held by the keeper: the NBD and vhost-user-blk sockets survive
        // worker restarts (NBD's in order, the exports' by name).
        listen_fds: crate::nbd::server::bind_all(&serve.nbd_listen)?,
        held_fds: crate::vhost_user::bind(&serve.vhost_user_blk)?,
        sources: serve
            .devices
            .iter()
            .map(|(name, path)| {
                Ok(crate::keeper::HeldSource {
                    name: name.clone(),
                    path: path.clone(),
                    file: crate::source::Source::open_file(path)?,
                })
            })
            .collect::<Result<Vec<_>>>()?,
    };
    crate::keeper::run(spec, adopted, &serve)
}

/// `fleecefs worker MOUNTPOINT`: started by the keeper of that mount, serves the plan it
/// hands over.
pub fn worker(mountpoint: &Path) -> Result<()> {
    process_setup();
    let (worker, plan): (_, ServePlan) = crate::keeper::worker_init()?;
    if plan.mountpoint != mountpoint {
        return Err(Error::invalid(format!(
            "the worker plan is for {}, not {}",
            plan.mountpoint.display(),
            mountpoint.display()
        )));
    }
    let restarted = worker.restarted();
    let result = serve::serve(plan, worker);
    // A later worker's stderr is nobody's terminal: the cause goes to the log. (The
    // first one's goes to `mount`'s stderr, through main.)
    if let (Err(e), true) = (&result, restarted) {
        log::error!(
            "worker {} cannot serve: {}",
            std::process::id(),
            crate::error::report(e)
        );
    }
    result
}

fn start_background() -> Result<()> {
    let exe = std::env::current_exe().context(|| "finding the fleecefs executable".into())?;
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .arg("--daemon-child")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::sys::new_session_on_exec(&mut cmd);
    let mut child = cmd
        .spawn()
        .context(|| "starting the fleecefs daemon".into())?;
    let (Some(mut stderr), Some(stdout)) = (child.stderr.take(), child.stdout.take()) else {
        return Err(Error::invalid("the fleecefs daemon has no output pipes"));
    };
    let relay = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    let messages = relay.join().unwrap_or_default();
    eprint!("{messages}");
    if line.trim() == "ready" {
        return Ok(());
    }
    let status = child
        .wait()
        .context(|| "waiting for the fleecefs daemon".into())?;
    Err(Error::new(
        crate::error::Kind::Invalid,
        if messages.trim().is_empty() {
            format!("the fleecefs daemon exited before mounting ({status})")
        } else {
            String::new()
        },
    ))
}

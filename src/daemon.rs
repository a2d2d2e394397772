//! The daemon: validates a `mount`, starts in the background, recovers what a crash
//! left, mounts, serves, and shuts down in order.
//!
//! # Start
//! `fleecefs mount` validates everything it can in the caller's process, then (unless
//! `--foreground`) re-executes itself as a new session with `--daemon-child` and waits
//! for one line on the child's stdout: `ready` once the mount answers a request. Until
//! then the child's log goes to the caller's stderr as well as to `STATE_DIR/fleecefs.log`.
//!
//! # Shutdown order
//! `umount`, `fleecefs unmount`, SIGTERM, SIGINT or SIGHUP all end the FUSE session
//! (signals unmount; a busy mount is detached and its FUSE connection aborted). Then:
//! 1. the active access, if any, is torn down as a failure (fleecing files deleted);
//! 2. the control socket is removed;
//! 3. the state directory lock is released and the process exits 0.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::cbw::{Device, OnCbwError};
use crate::cli::{MountArgs, OnCbwErrorArg};
use crate::control::client::{mount_at, resolve_mountpoint, FSNAME_PREFIX};
use crate::control::server;
use crate::engine::{check_device_name, Engine, EngineConfig};
use crate::error::{Error, IoContext, Result};
use crate::fuse::session::{self, SessionOptions};
use crate::layout::MountLayout;
use crate::secure_path;
use crate::source::Source;
use crate::state::{StateDir, LOG_FILE};
use crate::sys;
use crate::units::{parse_size, ClusterSize};

/// A validated `mount` request.
#[derive(Debug, Clone)]
pub struct MountPlan {
    /// Absolute mount point.
    pub mountpoint: PathBuf,
    /// Absolute state directory (may not exist yet).
    pub state_dir: PathBuf,
    /// Absolute fleecing directory.
    pub fleecing_dir: PathBuf,
    /// Devices: name and absolute source path.
    pub devices: Vec<(String, PathBuf)>,
    /// Whether the devices were given with `--device` (else: the recorded set).
    pub explicit_devices: bool,
    /// Cluster size.
    pub cluster: ClusterSize,
    /// Worker threads.
    pub threads: usize,
    /// Copy-before-write failure policy.
    pub on_cbw_error: OnCbwError,
    /// Whether the mount point is a stale fleecefs mount to clean up first.
    pub stale_mount: bool,
    /// Which crashes bitmaps survive.
    pub crash_safe_bitmaps: crate::bitmap_file::CrashSafety,
    /// Copy-before-write timeout.
    pub cbw_timeout: Option<Duration>,
    /// Fleecing space limit per access.
    pub fleecing_limit: Option<u64>,
    /// Buffered opens of live files use the page cache (`--live-cache`).
    pub live_cache: bool,
    /// Write-behind buffer for copies (`--cbw-buffer`).
    pub cbw_buffer: u64,
    /// Where snapshot reads run (`--backup-priority`).
    pub backup_priority: crate::sched::BackupPriority,
    /// Their CPU share while the guest does I/O (`--backup-share`), if paced.
    pub backup_share: Option<crate::sched::BackupShare>,
    /// How snapshot reads read the source (`--backup-read`).
    pub backup_read: crate::source::BackupRead,
    /// vhost-user-blk exports (`--vhost-user-blk`).
    pub vhost_user_blk: Vec<crate::vhost_user::ExportSpec>,
    /// The NBD server (`--nbd`, `--nbd-tls-creds`, `--nbd-insecure`).
    pub nbd: crate::nbd::server::NbdConfig,
    /// Owners and modes the mount shows (`--allow-other`, `--mode`, `--uid`, `--gid`).
    pub access: crate::fuse::namespace::AccessPolicy,
}

/// `p` (absolute) with symlinks and `..` resolved as far as it exists; the missing rest
/// is appended with `..` applied lexically.
fn resolved(p: &Path) -> PathBuf {
    let mut missing = Vec::new();
    let mut cur = p.to_path_buf();
    let mut out = loop {
        if let Ok(c) = cur.canonicalize() {
            break c;
        }
        match (cur.file_name(), cur.parent()) {
            (Some(name), Some(parent)) => {
                missing.push(name.to_os_string());
                cur = parent.to_path_buf();
            }
            // '..' at the end, or the root: nothing more to resolve.
            _ => break cur,
        }
    };
    for c in missing.into_iter().rev() {
        if c == ".." {
            out.pop();
        } else if c != "." {
            out.push(c);
        }
    }
    out
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).context(|| format!("resolving {}", p.display()))
}

/// Checks every argument of `mount` without changing anything.
pub fn validate(args: &MountArgs) -> Result<MountPlan> {
    let cluster_bytes = parse_size(&args.cluster_size)
        .map_err(|e| Error::invalid(format!("--cluster-size: {e}")))?;
    let cluster = ClusterSize::new(cluster_bytes)
        .map_err(|e| Error::invalid(format!("--cluster-size: {e}")))?;
    if !(args.cbw_timeout.is_finite() && (0.0..=86400.0).contains(&args.cbw_timeout)) {
        return Err(Error::invalid(format!(
            "--cbw-timeout {} is out of range (0 to 86400 seconds)",
            args.cbw_timeout
        )));
    }
    if args.cbw_timeout > 0.0 && args.cbw_timeout < 0.001 {
        return Err(Error::invalid(format!(
            "--cbw-timeout {} is too short: use 0 (no limit) or at least 0.001 seconds",
            args.cbw_timeout
        )));
    }
    if args.backup_share.is_some() && args.backup_priority == crate::sched::BackupPriority::Normal {
        return Err(Error::invalid(
            "--backup-share applies only with --backup-priority low",
        ));
    }
    let cbw_timeout = (args.cbw_timeout > 0.0).then(|| Duration::from_secs_f64(args.cbw_timeout));
    let fleecing_limit = match &args.fleecing_limit {
        None => None,
        Some(t) => {
            match parse_size(t).map_err(|e| Error::invalid(format!("--fleecing-limit: {e}")))? {
                0 => return Err(Error::invalid("--fleecing-limit must be larger than 0")),
                n => Some(n),
            }
        }
    };
    let unit = cluster.bytes().max(crate::cbw::LOCK_UNIT_MIN);
    let cbw_buffer = match &args.cbw_buffer {
        // The default would not hold one cluster of the largest sizes: copy synchronously.
        None if unit > crate::cbw::writebehind::DEFAULT_CAPACITY => 0,
        None => crate::cbw::writebehind::DEFAULT_CAPACITY,
        Some(text) => {
            let n = parse_size(text).map_err(|e| Error::invalid(format!("--cbw-buffer: {e}")))?;
            if n > 4 << 30 {
                return Err(Error::invalid(format!(
                    "--cbw-buffer {text} is out of range (0 to 4G)"
                )));
            }
            if n > 0 && n < unit {
                return Err(Error::invalid(format!(
                    "--cbw-buffer {text} cannot hold the old data of one cluster ({unit} bytes): use 0 or at least that"
                )));
            }
            n
        }
    };
    if !(1..=256).contains(&args.threads) {
        return Err(Error::invalid(format!(
            "--threads {} is out of range (1-256)",
            args.threads
        )));
    }
    let state_dir = absolute(&args.state_dir)?;
    // The daemon runs as root: it must not follow a path another user controls.
    secure_path::open_trusted_dir(&state_dir, "state directory", secure_path::Missing::Allow)?;
    let fleecing_dir = match &args.fleecing_dir {
        Some(d) => {
            let d = absolute(d)?;
            secure_path::open_trusted_dir(&d, "--fleecing-dir", secure_path::Missing::Fail)?;
            d
        }
        None => state_dir.join(crate::state::FLEECING_DIR),
    };
    let (mountpoint, stale_mount) = match crate::keeper::worker() {
        // A worker must not touch the mount before it serves it: the keeper checked it.
        Some(w) if args.worker => (w.mountpoint().to_path_buf(), false),
        // Taken over from systemd's fd store: nobody serves it until our worker does.
        _ if crate::keeper::adopting() => (absolute(&args.mountpoint)?, false),
        _ => check_mountpoint(&args.mountpoint, &state_dir)?,
    };
    // Compared resolved: through a symlink or a '..', they could still lead inside.
    if resolved(&state_dir).starts_with(&mountpoint)
        || resolved(&fleecing_dir).starts_with(&mountpoint)
    {
        return Err(Error::invalid(
            "the state and fleecing directories must not be inside the mount point",
        ));
    }
    // Sources last: the messages about the mount point and state dir say more.
    // Without --device: the set the state directory records (what was served last).
    let specs: Vec<String> = if args.devices.is_empty() {
        match crate::state::read_device_record(&state_dir)? {
            Some(r) if !r.devices.is_empty() => r
                .devices
                .iter()
                .map(|d| format!("{}={}", d.name, d.path.display()))
                .collect(),
            _ => {
                return Err(Error::invalid(format!(
                    "no --device given, and state directory {} records no devices: give --device NAME=PATH",
                    state_dir.display()
                )))
            }
        }
    } else {
        args.devices.clone()
    };
    let mut devices: Vec<(String, PathBuf, crate::source::Identity)> = Vec::new();
    for spec in &specs {
        let (name, path) = spec
            .split_once('=')
            .ok_or_else(|| Error::invalid(format!("--device '{spec}' is not NAME=PATH")))?;
        check_device_name(name)?;
        if devices.iter().any(|(n, _, _)| n == name) {
            return Err(Error::invalid(format!(
                "device name '{name}' is given twice"
            )));
        }
        if path.is_empty() {
            return Err(Error::invalid(format!(
                "--device '{spec}' has an empty path"
            )));
        }
        let path = absolute(Path::new(path))?;
        // Opening checks existence, type, size, write permission and that nobody else
        // holds the image; it is closed again.
        let id = Source::open(&path)?.identity().clone();
        // The same file under another path (a symlink, a hard link) is the same image.
        if let Some((other, p, _)) = devices
            .iter()
            .find(|(_, _, i)| (i.dev, i.ino) == (id.dev, id.ino))
        {
            return Err(Error::invalid(format!(
                "source {} is given twice (device '{other}' is {})",
                path.display(),
                p.display()
            )));
        }
        devices.push((name.to_string(), path, id));
    }
    let devices: Vec<(String, PathBuf)> = devices.into_iter().map(|(n, p, _)| (n, p)).collect();
    let vhost_user_blk = args
        .vhost_user_blk
        .iter()
        .map(|s| crate::vhost_user::ExportSpec::parse(s))
        .collect::<Result<Vec<_>>>()?;
    let names: Vec<String> = devices.iter().map(|(n, _)| n.clone()).collect();
    crate::vhost_user::validate(&vhost_user_blk, &names)?;
    let nbd = validate_nbd(args)?;
    Ok(MountPlan {
        mountpoint,
        state_dir,
        fleecing_dir,
        devices,
        explicit_devices: !args.devices.is_empty(),
        cluster,
        threads: args.threads,
        on_cbw_error: match args.on_cbw_error {
            OnCbwErrorArg::BreakSnapshot => OnCbwError::BreakSnapshot,
            OnCbwErrorArg::BreakGuestWrite => OnCbwError::BreakGuestWrite,
        },
        stale_mount,
        crash_safe_bitmaps: match args.crash_safe_bitmaps {
            crate::cli::CrashSafetyArg::On => crate::bitmap_file::CrashSafety::On,
            crate::cli::CrashSafetyArg::Sync => crate::bitmap_file::CrashSafety::Sync,
            crate::cli::CrashSafetyArg::Off => crate::bitmap_file::CrashSafety::Off,
        },
        cbw_timeout,
        fleecing_limit,
        live_cache: args.live_cache,
        backup_priority: args.backup_priority,
        backup_share: args.backup_share,
        backup_read: args.backup_read,
        cbw_buffer,
        vhost_user_blk,
        nbd,
        access: crate::fuse::namespace::AccessPolicy {
            allow_other: args.allow_other,
            mode: args.mode,
            uid: args.uid,
            gid: args.gid,
        },
    })
}

/// The NBD flags: TCP needs TLS credentials or `--nbd-insecure`; credentials are
/// loaded here, so that a bad file fails the mount.
fn validate_nbd(args: &MountArgs) -> Result<crate::nbd::server::NbdConfig> {
    use crate::nbd::Listen;
    let tcp = args.nbd.iter().find(|l| matches!(l, Listen::Tcp(_)));
    if args.nbd_tls_creds.is_some() && tcp.is_none() {
        return Err(Error::invalid(
            "--nbd-tls-creds is only for --nbd tcp:ADDR:PORT listeners",
        ));
    }
    if let (Some(l), None, false) = (tcp, &args.nbd_tls_creds, args.nbd_insecure) {
        return Err(Error::invalid(format!(
            "--nbd {l} needs TLS: give --nbd-tls-creds DIR (or --nbd-insecure to serve it in clear text)"
        )));
    }
    for (i, l) in args.nbd.iter().enumerate() {
        if args.nbd[..i].contains(l) {
            return Err(Error::invalid(format!("--nbd {l} is given twice")));
        }
    }
    let tls = match &args.nbd_tls_creds {
        Some(dir) => Some(crate::nbd::link::tls_config(&absolute(dir)?)?),
        None => None,
    };
    Ok(crate::nbd::server::NbdConfig {
        listen: args.nbd.clone(),
        tls,
        insecure: args.nbd_insecure,
    })
}

/// The slot of each device of `plan` (its recorded slot if the record has the same name
/// and source, else a new one) and the next free slot. With explicit `--device` options
/// that differ from the record, says what differs.
fn assign_slots(state: &StateDir, plan: &MountPlan) -> Result<(Vec<usize>, usize)> {
    let record = crate::state::read_device_record(state.path())?.unwrap_or_default();
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
    Ok((slots, next))
}

/// The mount point must be an existing, empty directory; a stale fleecefs mount (its
/// daemon died) is accepted and cleaned up later.
fn check_mountpoint(path: &Path, state_dir: &Path) -> Result<(PathBuf, bool)> {
    let shown = path.display();
    // A dead FUSE mount still answers stat on its root from cached attributes; listing
    // it is what fails (ENOTCONN, or ECONNABORTED after an abort).
    let probe = fs::metadata(path).and_then(|m| {
        if m.is_dir() {
            fs::read_dir(path).map(|_| m)
        } else {
            Ok(m)
        }
    });
    match probe {
        Err(e) if crate::control::client::is_dead_mount(&e) => {
            let mp = resolve_mountpoint(path)?;
            return match mount_at(&mp)? {
                Some(m) if m.source == format!("{FSNAME_PREFIX}{}", state_dir.display()) => {
                    Ok((mp, true))
                }
                Some(m) if m.source.starts_with(FSNAME_PREFIX) => Err(Error::busy(format!(
                    "mount point {shown} is a dead fleecefs mount of another state directory ({}); clean it up with 'umount -l {shown}' or mount with that state directory",
                    &m.source[FSNAME_PREFIX.len()..]
                ))),
                _ => Err(Error::busy(format!(
                    "mount point {shown} is a disconnected FUSE mount of another program; clean it up with 'umount -l {shown}'"
                ))),
            };
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::not_found(format!(
                "mount point {shown} does not exist"
            )))
        }
        Err(e) => return Err(Error::io(format!("mount point {shown}"), e)),
        Ok(m) if !m.is_dir() => {
            return Err(Error::invalid(format!(
                "mount point {shown} is not a directory"
            )))
        }
        Ok(_) => {}
    }
    let mp = path
        .canonicalize()
        .context(|| format!("resolving {shown}"))?;
    if let Some(m) = mount_at(&mp)? {
        if m.source.starts_with(FSNAME_PREFIX) {
            return Err(Error::busy(format!(
                "{shown} is already a fleecefs mount (state dir {})",
                &m.source[FSNAME_PREFIX.len()..]
            )));
        }
    }
    let mut entries = fs::read_dir(&mp).context(|| format!("reading mount point {shown}"))?;
    if entries.next().is_some() {
        return Err(Error::invalid(format!("mount point {shown} is not empty")));
    }
    Ok((mp, false))
}

/// `fleecefs mount`: validate, then serve here (`--foreground`) or in the background.
pub fn mount(args: &MountArgs) -> Result<()> {
    // Before anything opens files; workers inherit the limit.
    if let Err(e) = sys::raise_fd_limit() {
        log::warn!("cannot raise the limit of open files: {e}");
    }
    // Every file the daemon makes has an explicit mode; the umask only narrows, so that
    // an inherited `umask 000` opens nothing.
    sys::set_umask(0o077);
    if args.worker {
        crate::keeper::worker_init()?;
        return serve(validate(args)?, false, args.allow_other);
    }
    if args.foreground || args.daemon_child {
        crate::keeper::adopt_fd_store()?;
    }
    let plan = validate(args)?;
    if args.foreground || args.daemon_child {
        crate::keeper::run(
            crate::keeper::MountPlan {
                mountpoint: plan.mountpoint,
                state_dir: plan.state_dir,
                stale_mount: plan.stale_mount,
                threads: plan.threads,
            },
            args,
        )
    } else {
        start_background()?;
        let names: Vec<&str> = plan.devices.iter().map(|(n, _)| n.as_str()).collect();
        crate::out!(
            "mounted {}: {} (log {})",
            plan.mountpoint.display(),
            if names.is_empty() {
                "no device yet".to_string()
            } else {
                format!("{} device(s): {}", names.len(), names.join(", "))
            },
            plan.state_dir.join(LOG_FILE).display()
        );
        Ok(())
    }
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
    let mut stderr = child.stderr.take().expect("piped");
    let relay = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped");
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

/// The options of `plan` as `status` shows them: flag values as written on the command
/// line.
fn mount_options(plan: &MountPlan) -> crate::engine::MountOptions {
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
            OnCbwError::BreakSnapshot => "break-snapshot",
            OnCbwError::BreakGuestWrite => "break-guest-write",
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

fn serve(plan: MountPlan, daemon_child: bool, allow_other: bool) -> Result<()> {
    let signals = sys::block_signals(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]);
    let state = match crate::keeper::worker() {
        Some(w) => w.state_dir(&plan.state_dir)?,
        None => StateDir::open(&plan.state_dir)?,
    };
    if daemon_child || crate::keeper::worker().is_some_and(|w| w.daemon()) {
        crate::logger::tee_to_file(&state.path().join(LOG_FILE));
    }
    if let Some(record) = state.leftover_access()? {
        if let Some(w) = crate::keeper::worker() {
            w.note_crashed_access(&record);
        }
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
    }
    if plan.stale_mount {
        sys::force_unmount(&plan.mountpoint, None);
        log::warn!(
            "cleaned up the stale mount at {} left by a daemon that died",
            plan.mountpoint.display()
        );
    }
    let (slots, next_slot) = assign_slots(&state, &plan)?;
    let mut devices = Vec::new();
    for ((name, path), slot) in plan.devices.iter().zip(slots) {
        devices.push((
            slot,
            Device::new(
                name.clone(),
                Source::open_with(path, plan.backup_read)?,
                plan.cluster,
            ),
        ));
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
    let mut nbd_listeners = Vec::new();
    for l in &plan.nbd.listen {
        nbd_listeners.push(crate::nbd::server::bind(l)?);
    }
    let listener = bind_socket(&state)?;
    let vhost_listeners = crate::vhost_user::bind(&plan.vhost_user_blk).inspect_err(|_| {
        let _ = fs::remove_file(state.socket_path());
    })?;
    let socket_path = state.socket_path();
    let engine = match Engine::with_slots(devices, next_slot, config, Some(state))
        .and_then(|e| e.save_device_record().map(|_| e))
    {
        Ok(e) => Arc::new(e),
        Err(e) => {
            let _ = fs::remove_file(&socket_path);
            return Err(e);
        }
    };
    engine.set_mount_options(mount_options(&plan));
    crate::keeper::restore_broken_access(&engine);
    crate::vhost_user::start(&engine, &plan.vhost_user_blk, vhost_listeners)?;
    // One backup scheduler for the mount, shared by every frontend that serves it.
    let backup = match crate::sched::BackupScheduler::start(plan.backup_priority, plan.backup_share)
    {
        Ok(b) => Arc::new(b),
        Err(e) => {
            let _ = fs::remove_file(&socket_path);
            return Err(Error::io("starting the backup read pool", e));
        }
    };
    let nbd = if plan.nbd.listen.is_empty() {
        None
    } else {
        Some(Arc::new(crate::nbd::NbdServer::start(
            engine.clone(),
            backup.clone(),
            plan.nbd.clone(),
            nbd_listeners,
        )?))
    };
    {
        let engine = engine.clone();
        let layout = MountLayout::new(plan.mountpoint.clone());
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
            .spawn(move || server::serve(listener, engine, layout, extra))
            .context(|| "starting the control thread".into())?;
    }

    let session_options = SessionOptions {
        fsname: format!("{FSNAME_PREFIX}{}", plan.state_dir.display()),
        allow_other,
        access: plan.access,
        threads: plan.threads,
        live_cache: plan.live_cache,
        backup: backup.clone(),
    };
    let session =
        session::mount(engine.clone(), &plan.mountpoint, &session_options).map_err(|e| {
            let _ = fs::remove_file(&socket_path);
            Error::io(format!("mounting {}", plan.mountpoint.display()), e)
        })?;
    // The session and the NBD server hold the scheduler now; it is closed (its queue
    // drained) when the session has ended, before the shutdown.
    drop(session_options);
    let resend_fd = std::os::fd::AsFd::as_fd(&session).try_clone_to_owned().ok();
    let fuse_thread = session::spawn(session).context(|| "starting the FUSE session".into())?;
    crate::keeper::resend(resend_fd.as_ref().map(std::os::fd::AsFd::as_fd));
    drop(resend_fd);
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
    crate::keeper::ready(connection);
    if daemon_child {
        // Tell the parent, then leave the terminal: from now on the log file only.
        let _ = std::io::stdout().write_all(b"ready\n");
        let _ = std::io::stdout().flush();
        crate::logger::stop_tee();
        sys::redirect_stdio_to_null();
        let _ = std::env::set_current_dir("/");
    }
    {
        let mountpoint = plan.mountpoint.clone();
        let engine = engine.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                // The signals are blocked in every thread: only this one receives them.
                if let Some(sig) = sys::wait_signal(&signals) {
                    if crate::keeper::worker().is_some_and(|w| w.fd_store()) {
                        crate::keeper::stop_keeping_connection(&engine);
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
        crate::nbd::server::remove_sockets(&plan.nbd.listen);
    }
    backup.close();
    engine.shutdown();
    let _ = fs::remove_file(&socket_path);
    crate::vhost_user::remove_sockets(&plan.vhost_user_blk);
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::io("FUSE session ended with an error", e)),
        Err(_) => Err(Error::invalid("FUSE session thread panicked")),
    }
}

/// `fleecefs unmount`: unmount and wait until the daemon has cleaned up and exited.
pub fn unmount(mountpoint: &Path) -> Result<()> {
    let state = crate::control::client::state_dir_of(mountpoint)?;
    let mp = resolve_mountpoint(mountpoint)?;
    let c = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::invalid("mount point path contains a NUL byte"))?;
    if let Err(e) = sys::umount(&c, false) {
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Err(Error::busy(format!(
                "{} is busy: a process still has files open under it (see 'fuser -vm {}')",
                mountpoint.display(),
                mountpoint.display()
            )));
        }
        return Err(Error::io(format!("unmounting {}", mountpoint.display()), e));
    }
    wait_for_daemon_exit(&state, Duration::from_secs(120))?;
    crate::out!("unmounted {}", mp.display());
    Ok(())
}

/// Waits until nobody holds the state directory lock any more.
pub fn wait_for_daemon_exit(state_dir: &Path, timeout: Duration) -> Result<()> {
    let lock = state_dir.join(crate::state::LOCK_FILE);
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&lock)
        .context(|| format!("opening {}", lock.display()))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if sys::try_flock(&f, false).is_ok() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::busy(format!(
                "the daemon has not exited after {}s; see {}",
                timeout.as_secs(),
                state_dir.join(LOG_FILE).display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

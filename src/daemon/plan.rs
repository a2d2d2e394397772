//! Validation of `mount`: every argument is checked before anything changes, and the
//! result is the [`ServePlan`] each worker serves. No I/O here beyond the checks
//! (metadata, the device record, opening each source and closing it again).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bitmap_file::CrashSafety;
use crate::cbw::OnCbwError;
use crate::cli::{CrashSafetyArg, MountArgs, OnCbwErrorArg};
use crate::control::client::{is_dead_mount, mount_at, resolve_mountpoint, FSNAME_PREFIX};
use crate::engine::check_device_name;
use crate::error::{Error, IoContext, Result};
use crate::sched::{BackupPriority, BackupShare};
use crate::secure_path;
use crate::source::{BackupRead, Source};
use crate::units::{parse_size, ClusterSize};

/// What a worker serves: a validated `mount` request. The keeper hands it to every
/// worker it starts (`keeper::WorkerPlan`), without reading it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ServePlan {
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
    /// FUSE threads.
    pub threads: usize,
    /// Other users may use the mount (`--allow-other`).
    pub allow_other: bool,
    /// Copy-before-write failure policy.
    pub on_cbw_error: OnCbwError,
    /// Which crashes bitmaps survive.
    pub crash_safe_bitmaps: CrashSafety,
    /// Copy-before-write timeout.
    pub cbw_timeout: Option<Duration>,
    /// Fleecing space limit per access.
    pub fleecing_limit: Option<u64>,
    /// Buffered opens of live files use the page cache (`--live-cache`).
    pub live_cache: bool,
    /// Write-behind buffer for copies (`--cbw-buffer`).
    pub cbw_buffer: u64,
    /// Where snapshot reads run (`--backup-priority`).
    pub backup_priority: BackupPriority,
    /// Their CPU share while the guest does I/O (`--backup-share`), if paced.
    pub backup_share: Option<BackupShare>,
    /// How snapshot reads read the source (`--backup-read`).
    pub backup_read: BackupRead,
    /// vhost-user-blk exports (`--vhost-user-blk`).
    pub vhost_user_blk: Vec<crate::vhost_user::ExportSpec>,
    /// The OOM killer's adjustment for workers (`--worker-oom-score-adj`).
    pub worker_oom_score_adj: i32,
    /// Where the NBD server listens (`--nbd`).
    pub nbd_listen: Vec<crate::nbd::Listen>,
    /// Its TLS credentials directory, absolute (`--nbd-tls-creds`), loaded by each worker.
    pub nbd_tls_creds: Option<PathBuf>,
    /// TCP without TLS (`--nbd-insecure`).
    pub nbd_insecure: bool,
    /// Owners and modes the mount shows (`--allow-other`, `--mode`, `--uid`, `--gid`).
    pub access: crate::fuse::namespace::AccessPolicy,
}

impl ServePlan {
    /// The NBD server's configuration, with the TLS credentials loaded.
    pub fn nbd(&self) -> Result<crate::nbd::server::NbdConfig> {
        let tls = match &self.nbd_tls_creds {
            Some(dir) => Some(crate::nbd::link::tls_config(dir)?),
            None => None,
        };
        Ok(crate::nbd::server::NbdConfig {
            listen: self.nbd_listen.clone(),
            tls,
            insecure: self.nbd_insecure,
        })
    }
}

/// How the mount point is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountpointCheck {
    /// It must be an empty directory, or a stale mount of this state directory.
    Check,
    /// Taken over from systemd's file descriptor store: nobody serves it until a worker
    /// does, so it is not touched.
    Adopted,
}

/// A validated `mount` request: what to serve, and whether the mount point is a stale
/// fleecefs mount (its daemon died) for the keeper to clean up first.
#[derive(Debug, Clone)]
pub struct Validated {
    /// What workers serve.
    pub serve: ServePlan,
    /// The mount point is a stale mount of this state directory.
    pub stale_mount: bool,
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).context(|| format!("resolving {}", p.display()))
}

/// The options that need no file system: sizes, timeouts, threads and policies.
struct Options {
    cluster: ClusterSize,
    cbw_timeout: Option<Duration>,
    fleecing_limit: Option<u64>,
    cbw_buffer: u64,
}

fn check_options(args: &MountArgs) -> Result<Options> {
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
    if args.backup_share.is_some() && args.backup_priority == BackupPriority::Normal {
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
    Ok(Options {
        cluster,
        cbw_timeout,
        fleecing_limit,
        cbw_buffer,
    })
}

/// The state and fleecing directories.
fn check_dirs(args: &MountArgs) -> Result<(PathBuf, PathBuf)> {
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
    Ok((state_dir, fleecing_dir))
}

/// The devices: `--device NAME=PATH` options, or the set the state directory records
/// (what was served last). Each source is opened (existence, type, size, write
/// permission, nobody else holds it) and closed again.
fn check_devices(specs: &[String], state_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let specs: Vec<String> = if specs.is_empty() {
        match crate::state::read_device_record(state_dir)? {
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
        specs.to_vec()
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
    // A path given relative to the current directory is recorded from its real parent
    // directory (no '..'): a later worker starts in `/`, and the directories named on
    // the way may be gone by then. Absolute paths stay as given (/dev/disk/by-id/...).
    for ((_, path, _), spec) in devices.iter_mut().zip(&specs) {
        let given = Path::new(spec.split_once('=').map_or("", |(_, p)| p));
        if given.is_relative() {
            if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
                if let Ok(dir) = dir.canonicalize() {
                    *path = dir.join(name);
                }
            }
        }
    }
    Ok(devices.into_iter().map(|(n, p, _)| (n, p)).collect())
}

/// Checks every argument of `mount` without changing anything.
pub fn validate(args: &MountArgs, check: MountpointCheck) -> Result<Validated> {
    let o = check_options(args)?;
    let (state_dir, fleecing_dir) = check_dirs(args)?;
    let (mountpoint, stale_mount) = match check {
        MountpointCheck::Check => check_mountpoint(&args.mountpoint, &state_dir)?,
        MountpointCheck::Adopted => (absolute(&args.mountpoint)?, false),
    };
    // Compared resolved: through a symlink or a '..', they could still lead inside.
    if secure_path::resolved(&state_dir).starts_with(&mountpoint)
        || secure_path::resolved(&fleecing_dir).starts_with(&mountpoint)
    {
        return Err(Error::invalid(
            "the state and fleecing directories must not be inside the mount point",
        ));
    }
    // Sources last: the messages about the mount point and state dir say more.
    let devices = check_devices(&args.devices, &state_dir)?;
    // Without --device and --vhost-user-blk, the recorded devices come back with their
    // exports.
    let vhost_user_blk = if args.vhost_user_blk.is_empty() && args.devices.is_empty() {
        crate::state::read_device_record(&state_dir)?
            .map(|r| crate::vhost_user::ExportSpec::all_from_record(&r))
            .unwrap_or_default()
    } else {
        args.vhost_user_blk
            .iter()
            .map(|s| crate::vhost_user::ExportSpec::parse(s))
            .collect::<Result<Vec<_>>>()?
    };
    let names: Vec<String> = devices.iter().map(|(n, _)| n.clone()).collect();
    crate::vhost_user::validate(&vhost_user_blk, &names)?;
    let nbd_tls_creds = validate_nbd(args)?;
    check_socket_paths(&state_dir, &args.nbd, &vhost_user_blk)?;
    let serve = ServePlan {
        mountpoint,
        state_dir,
        fleecing_dir,
        devices,
        explicit_devices: !args.devices.is_empty(),
        cluster: o.cluster,
        threads: args.threads,
        allow_other: args.allow_other,
        on_cbw_error: match args.on_cbw_error {
            OnCbwErrorArg::BreakSnapshot => OnCbwError::BreakSnapshot,
            OnCbwErrorArg::BreakGuestWrite => OnCbwError::BreakGuestWrite,
        },
        crash_safe_bitmaps: match args.crash_safe_bitmaps {
            CrashSafetyArg::On => CrashSafety::On,
            CrashSafetyArg::Sync => CrashSafety::Sync,
            CrashSafetyArg::Off => CrashSafety::Off,
        },
        cbw_timeout: o.cbw_timeout,
        fleecing_limit: o.fleecing_limit,
        live_cache: args.live_cache,
        cbw_buffer: o.cbw_buffer,
        backup_priority: args.backup_priority,
        backup_share: args.backup_share,
        backup_read: args.backup_read,
        vhost_user_blk,
        worker_oom_score_adj: args.worker_oom_score_adj,
        nbd_listen: args.nbd.clone(),
        nbd_tls_creds,
        nbd_insecure: args.nbd_insecure,
        access: crate::fuse::namespace::AccessPolicy {
            allow_other: args.allow_other,
            mode: args.mode,
            uid: args.uid,
            gid: args.gid,
        },
    };
    Ok(Validated { serve, stale_mount })
}

/// Every Unix socket the mount makes is a file of its own: the control socket, the NBD
/// listeners and the vhost-user-blk exports, compared with symlinks and `..` resolved
/// (binding a second socket at a path replaces the first, which nobody could reach).
fn check_socket_paths(
    state_dir: &Path,
    nbd: &[crate::nbd::Listen],
    exports: &[crate::vhost_user::ExportSpec],
) -> Result<()> {
    let control = state_dir.join(crate::state::CONTROL_SOCKET);
    let mut named = vec![(control.clone(), "the control socket".to_string())];
    for l in nbd {
        if let crate::nbd::Listen::Unix(p) = l {
            named.push((p.clone(), format!("--nbd {l}")));
        }
    }
    for e in exports {
        named.push((
            e.socket.clone(),
            format!("--vhost-user-blk {}={}", e.name, e.socket.display()),
        ));
    }
    let resolved: Vec<PathBuf> = named
        .iter()
        .map(|(p, _)| secure_path::resolved(p))
        .collect();
    for (i, r) in resolved.iter().enumerate() {
        if let Some(j) = resolved[..i].iter().position(|o| o == r) {
            return Err(Error::invalid(format!(
                "{} and {} name the same socket {}: a socket path is given twice",
                named[j].1,
                named[i].1,
                r.display()
            )));
        }
    }
    Ok(())
}

/// The NBD flags: TCP needs TLS credentials or `--nbd-insecure`; the credentials are
/// loaded here, so that a bad file fails the mount. Their directory, absolute.
fn validate_nbd(args: &MountArgs) -> Result<Option<PathBuf>> {
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
    match &args.nbd_tls_creds {
        Some(dir) => {
            let dir = absolute(dir)?;
            crate::nbd::link::tls_config(&dir)?;
            Ok(Some(dir))
        }
        None => Ok(None),
    }
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
        Err(e) if is_dead_mount(&e) => {
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
        // The daemon of this state dir killed a moment ago: its worker, killed with its
        // keeper, may still answer for a while; the mount is dead once it is gone.
        if m.source == format!("{FSNAME_PREFIX}{}", state_dir.display())
            && keeper_exiting(state_dir)
        {
            log::warn!(
                "the daemon of {shown} was killed and is still exiting; waiting (at most {} s) for it",
                crate::holders::DYING_WAIT.as_secs()
            );
            if mount_dies(path) {
                return Ok((mp, true));
            }
        }
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

/// Whether the keeper recorded in `state_dir`'s lock file is gone or dying (killed).
fn keeper_exiting(state_dir: &Path) -> bool {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut lock) = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(state_dir.join(crate::state::LOCK_FILE))
    else {
        return false;
    };
    let mut text = String::new();
    if lock.read_to_string(&mut text).is_err() {
        return false;
    }
    let Ok(pid) = text.trim().parse::<u32>() else {
        return false;
    };
    crate::holders::holders_of(&lock)
        .iter()
        .find(|h| h.pid == pid)
        .is_none_or(|h| h.dying)
}

/// Waits (at most [`crate::holders::DYING_WAIT`]) until the mount at `path` is dead.
fn mount_dies(path: &Path) -> bool {
    let deadline = std::time::Instant::now() + crate::holders::DYING_WAIT;
    while std::time::Instant::now() < deadline {
        if let Err(e) = fs::read_dir(path) {
            if is_dead_mount(&e) {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn a_keeper_that_holds_its_lock_file_is_not_exiting() {
        let dir = tempfile::tempdir().expect("temp dir");
        let lock = dir.path().join(crate::state::LOCK_FILE);
        fs::write(&lock, "").expect("lock file");
        assert!(!keeper_exiting(dir.path()), "no pid recorded");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(fs::File::open(&lock).expect("open"))
            .spawn()
            .expect("sleep");
        fs::write(&lock, format!("{}\n", child.id())).expect("pid");
        assert!(
            !keeper_exiting(dir.path()),
            "a live keeper holding the lock file"
        );
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert!(keeper_exiting(dir.path()), "the recorded keeper is gone");
    }

    /// A mount point, a state directory and two 1 MiB images in a temporary directory.
    struct Dir {
        tmp: tempfile::TempDir,
    }

    impl Dir {
        fn new() -> Dir {
            let tmp = tempfile::tempdir().unwrap();
            fs::create_dir(tmp.path().join("m")).unwrap();
            for img in ["a.img", "b.img"] {
                fs::File::create(tmp.path().join(img))
                    .unwrap()
                    .set_len(1 << 20)
                    .unwrap();
            }
            Dir { tmp }
        }

        fn p(&self, rel: &str) -> String {
            self.tmp.path().join(rel).display().to_string()
        }

        /// `fleecefs mount M --state-dir S` with `extra` arguments, validated.
        fn validate(&self, extra: &[&str]) -> Result<Validated> {
            let mut argv = vec![
                "fleecefs".to_string(),
                "mount".into(),
                self.p("m"),
                "--state-dir".into(),
                self.p("s"),
            ];
            argv.extend(extra.iter().map(|a| a.replace("DIR/", &self.p(""))));
            let cli = crate::cli::Cli::try_parse_from(argv).unwrap();
            let crate::cli::Command::Mount(args) = cli.command else {
                unreachable!()
            };
            validate(&args, MountpointCheck::Check)
        }

        fn refused(&self, extra: &[&str], says: &str) {
            match self.validate(extra) {
                Ok(v) => panic!("{extra:?} accepted: {v:?}"),
                Err(e) => {
                    let msg = crate::error::report(&e);
                    assert!(
                        msg.contains(says),
                        "{extra:?}: '{msg}' does not say '{says}'"
                    );
                    assert!(!msg.contains('\n'), "{msg}");
                }
            }
        }
    }

    #[test]
    fn a_valid_request_becomes_a_plan_with_absolute_paths() {
        let d = Dir::new();
        let v = d
            .validate(&[
                "--device",
                "a=DIR/a.img",
                "--device=b=DIR/b.img",
                "--cluster-size",
                "1M",
            ])
            .unwrap();
        assert!(!v.stale_mount);
        let p = &v.serve;
        assert_eq!(p.mountpoint, d.tmp.path().join("m").canonicalize().unwrap());
        assert_eq!(p.fleecing_dir, d.tmp.path().join("s/fleecing"));
        assert_eq!(
            p.devices,
            vec![
                ("a".to_string(), d.tmp.path().join("a.img")),
                ("b".to_string(), d.tmp.path().join("b.img"))
            ]
        );
        assert!(p.explicit_devices);
        assert_eq!(p.cluster.bytes(), 1 << 20);
        assert_eq!(p.cbw_timeout, Some(Duration::from_secs(45)));
        assert_eq!(p.cbw_buffer, crate::cbw::writebehind::DEFAULT_CAPACITY);
        // What the keeper carries to each worker reads back the same.
        let json = serde_json::to_string(p).unwrap();
        assert_eq!(&serde_json::from_str::<ServePlan>(&json).unwrap(), p);
    }

    #[test]
    fn bad_options_are_refused_with_one_line_each() {
        let d = Dir::new();
        let dev = ["--device", "a=DIR/a.img"];
        let with = |extra: &[&str]| -> Vec<String> {
            dev.iter().chain(extra).map(|s| s.to_string()).collect()
        };
        for (extra, says) in [
            (&["--cluster-size", "3K"][..], "--cluster-size"),
            (&["--cbw-timeout", "-1"], "--cbw-timeout -1 is out of range"),
            (&["--cbw-timeout", "0.0001"], "too short"),
            (&["--threads", "0"], "--threads 0 is out of range"),
            (&["--fleecing-limit", "0"], "larger than 0"),
            (&["--cbw-buffer", "5G"], "out of range"),
            (
                &["--cbw-buffer", "4K"],
                "cannot hold the old data of one cluster",
            ),
            (&["--backup-share", "50"], "only with --backup-priority low"),
            (&["--fleecing-dir", "DIR/a.img"], "is not a directory"),
        ] {
            let args = with(extra);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            d.refused(&args, says);
        }
    }

    #[test]
    fn bad_devices_are_refused() {
        let d = Dir::new();
        d.refused(&[], "records no devices");
        d.refused(&["--device", "a"], "is not NAME=PATH");
        d.refused(&["--device", "a="], "has an empty path");
        d.refused(
            &["--device", "a=DIR/a.img", "--device", "a=DIR/b.img"],
            "given twice",
        );
        d.refused(&["--device", "a=DIR/missing.img"], "missing.img");
        std::os::unix::fs::symlink(d.p("a.img"), d.p("link.img")).unwrap();
        d.refused(
            &["--device", "a=DIR/a.img", "--device", "b=DIR/link.img"],
            "is given twice (device 'a'",
        );
    }

    #[test]
    fn bad_mount_points_and_directories_are_refused() {
        let d = Dir::new();
        let dev = "a=DIR/a.img";
        fs::File::create(d.p("m/x")).unwrap();
        d.refused(&["--device", dev], "is not empty");
        fs::remove_file(d.p("m/x")).unwrap();
        d.refused(
            &["--device", dev, "--fleecing-dir", "DIR/m/../m"],
            "must not be inside the mount point",
        );
        fs::write(d.p("s"), "").unwrap();
        d.refused(&["--device", dev], "is not a directory");
    }
}

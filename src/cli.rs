//! Command-line interface: the commands, their flags and help texts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// fleecefs: point-in-time snapshots of live disk images for backup tools.
#[derive(Parser, Debug)]
#[command(name = "fleecefs", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// The command
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount live/ and snapshot/ views of disk images and serve them
    #[command(
        after_help = "Example:\n  fleecefs mount /mnt/fleece --state-dir /var/lib/fleecefs --device vm100=/images/vm100.raw"
    )]
    Mount(MountArgs),
    /// Start a backup access: freeze snapshot/NAME for the devices
    #[command(
        after_help = "Example:\n  fleecefs setup /mnt/fleece --target nightly --bitmap nightly --json"
    )]
    Setup(SetupArgs),
    /// End a backup access, recording whether the backup succeeded
    #[command(after_help = "Example:\n  fleecefs teardown /mnt/fleece --target nightly --success")]
    Teardown(TeardownArgs),
    /// Copy snapshot/NAME into a raw or qcow2 image, full or incremental
    #[command(
        after_help = "Examples:\n  fleecefs copy /mnt/fleece vm100 /backup/vm100.img --discard --verify\n  \
                      fleecefs copy /mnt/fleece vm100 /backup/vm100.2.qcow2 --format qcow2 \\\n      \
                      --incremental --backing /backup/vm100.1.qcow2 --discard --verify"
    )]
    Copy(CopyArgs),
    /// Write a backup (raw, or the top of a qcow2 chain) back into live/NAME
    #[command(
        after_help = "Example:\n  fleecefs restore /mnt/fleece vm100 /backup/vm100.3.qcow2 --verify"
    )]
    Restore(RestoreArgs),
    /// Show devices, bitmaps and the active backup access
    #[command(after_help = "Example:\n  fleecefs status /mnt/fleece --json")]
    Status(StatusArgs),
    /// Restart the daemon's worker (an upgrade takes effect); writers only pause
    #[command(
        after_help = "Example:\n  fleecefs restart /mnt/fleece\n  fleecefs restart /mnt/fleece --binary /usr/local/bin/fleecefs"
    )]
    Restart(RestartArgs),
    /// Unmount (same as umount MOUNTPOINT) and wait for the daemon to exit
    #[command(after_help = "Example:\n  fleecefs unmount /mnt/fleece")]
    Unmount(UnmountArgs),
    /// Manage dirty bitmaps
    #[command(subcommand)]
    Bitmap(BitmapCommand),
    /// Change the size of a device while it is served (grow; shrink with --allow-shrink)
    #[command(
        after_help = "Examples:\n  fleecefs resize /mnt/fleece vm100 +10G\n  fleecefs resize /mnt/fleece vm101    # a block device, after lvextend"
    )]
    Resize(ResizeArgs),
    /// Add or remove devices while the mount serves others
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Internal: serves a mount for its keeper (started by the keeper only)
    #[command(hide = true)]
    Worker(WorkerArgs),
}

/// `device` subcommands.
#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Serve new devices (same checks as mount)
    #[command(
        after_help = "Examples:\n  fleecefs device add /mnt/fleece vm102=/images/vm102.raw\n  fleecefs device add /mnt/fleece vm103=/images/vm103.raw --vhost-user-blk vm103=/run/fleecefs/vm103.sock"
    )]
    Add(DeviceAddArgs),
    /// Stop serving a device (refused while live/NAME is open or in a backup access)
    #[command(after_help = "Example:\n  fleecefs device remove /mnt/fleece vm102")]
    Remove(DeviceRemoveArgs),
}

/// `resize` flags.
#[derive(Args, Debug)]
pub struct ResizeArgs {
    /// The fleecefs mount point
    pub mountpoint: PathBuf,
    /// The device to resize
    pub name: String,
    /// New size in bytes (suffixes K, M, G, T), or +DELTA to grow by that much
    /// [default: the source's size now; required equal to it for block devices]
    #[arg(allow_hyphen_values = true)]
    pub size: Option<String>,
    /// Allow a smaller size: the end of the device is cut off and its bitmaps become invalid
    #[arg(long)]
    pub allow_shrink: bool,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

/// `device add` flags.
#[derive(Args, Debug)]
pub struct DeviceAddArgs {
    /// The fleecefs mount point
    pub mountpoint: PathBuf,
    /// Devices to add: NAME=PATH, PATH a regular file or block device
    #[arg(value_name = "NAME=PATH", required = true)]
    pub devices: Vec<String>,
    /// Also serve added device NAME to a VMM as a vhost-user-blk disk on the UNIX socket
    /// SOCKET (created mode 0600); `,ro` for a read-only disk (repeatable)
    #[arg(long = "vhost-user-blk", value_name = "NAME=SOCKET[,ro]")]
    pub vhost_user_blk: Vec<String>,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

/// `device remove` flags.
#[derive(Args, Debug)]
pub struct DeviceRemoveArgs {
    /// The fleecefs mount point
    pub mountpoint: PathBuf,
    /// The device to remove
    pub name: String,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

/// `bitmap` subcommands.
#[derive(Subcommand, Debug)]
pub enum BitmapCommand {
    /// Delete every bitmap of a target (the next backup of it is full)
    #[command(after_help = "Example:\n  fleecefs bitmap remove /mnt/fleece --target nightly")]
    Remove(BitmapRemoveArgs),
}

/// `--crash-safe-bitmaps`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashSafetyArg {
    /// Survive a daemon crash (free)
    On,
    /// Survive a machine crash too (a flush per newly dirtied bitmap word)
    Sync,
    /// Any unclean stop invalidates bitmaps
    Off,
}

/// Copy-before-write failure policy.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnCbwErrorArg {
    /// Keep the guest write working; the snapshot becomes unreadable (EIO)
    BreakSnapshot,
    /// Fail the guest write; the snapshot stays valid
    BreakGuestWrite,
}

/// `mount` flags.
#[derive(Args, Debug, Clone)]
pub struct MountArgs {
    /// Empty directory to mount on
    pub mountpoint: PathBuf,
    /// Directory for the lock, control socket, log, bitmaps (created if missing)
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// A device to serve: NAME=PATH, PATH a regular file or block device (repeatable)
    /// [default: the devices served last with this state dir]
    #[arg(long = "device", value_name = "NAME=PATH")]
    pub devices: Vec<String>,
    /// Where fleecing files go [default: STATE_DIR/fleecing]
    #[arg(long, value_name = "DIR")]
    pub fleecing_dir: Option<PathBuf>,
    /// Copy-before-write and bitmap granularity: a power of two from 4K to 64M
    #[arg(long, value_name = "BYTES", default_value = "64K")]
    pub cluster_size: String,
    /// FUSE worker threads
    #[arg(
        long,
        value_name = "N",
        default_value_t = 8,
        allow_negative_numbers = true
    )]
    pub threads: usize,
    /// Stay in the foreground (log to stderr)
    #[arg(long)]
    pub foreground: bool,
    /// Let users other than root use the mount (file modes still apply, narrowed to what
    /// the source's directories allow)
    #[arg(long)]
    pub allow_other: bool,
    /// Permission bits of live files (octal, e.g. 0640) instead of the source's
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    pub mode: Option<u32>,
    /// Owner (numeric uid) of the mount's files and directories instead of the source's
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,
    /// Group (numeric gid) of the mount's files and directories instead of the source's
    #[arg(long, value_name = "GID")]
    pub gid: Option<u32>,
    /// What a failed copy-before-write breaks
    #[arg(long, value_enum, default_value = "break-snapshot")]
    pub on_cbw_error: OnCbwErrorArg,
    /// Longest a live write waits for copy-before-write before the policy applies (0: no limit)
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 45.0,
        allow_negative_numbers = true
    )]
    pub cbw_timeout: f64,
    /// Old data held in memory on its way to the fleecing file under break-snapshot, so
    /// that writers do not wait for the fleecing storage (0: copy synchronously)
    /// [default: 16M, or 0 with clusters larger than that]
    #[arg(long, value_name = "BYTES")]
    pub cbw_buffer: Option<String>,
    /// Most fleecing space a backup access may use across devices, e.g. 10G [default: unlimited]
    #[arg(long, value_name = "BYTES")]
    pub fleecing_limit: Option<String>,
    /// Bitmaps in use survive a daemon crash (on), also a machine crash by flushing each
    /// newly dirtied word before its write (sync, slower), or neither (off)
    #[arg(long, value_enum, value_name = "on|sync|off", default_value = "on")]
    pub crash_safe_bitmaps: CrashSafetyArg,
    /// Buffered opens of live files use the kernel page cache (kept across opens)
    /// instead of direct I/O: faster small sequential reads and re-reads, slower large I/O
    #[arg(long)]
    pub live_cache: bool,
    /// Snapshot and dirty-map reads run below the guest, on their own threads at idle CPU
    /// priority (or paced to --backup-share) (low), or on the FUSE workers like live I/O
    /// (normal)
    #[arg(long, value_enum, value_name = "low|normal", default_value = "normal")]
    pub backup_priority: crate::sched::BackupPriority,
    /// How snapshot reads read the source: through the page cache (cached), or with
    /// O_DIRECT (direct): less CPU per byte, and a backup larger than memory leaves the
    /// page cache to the guest; as fast as the storage, not the cache
    #[arg(
        long,
        value_enum,
        value_name = "cached|direct",
        default_value = "cached"
    )]
    pub backup_read: crate::source::BackupRead,
    /// With --backup-priority low: instead of idle CPU priority, normal priority paced to
    /// this much CPU time while the guest does I/O, in percent of one CPU: a floor for
    /// backups on busy hosts (100: no pacing); auto: the share adapts so that the guest
    /// keeps 92% of the request rate it has while the backup pauses [default: idle
    /// priority, no floor]
    #[arg(long, value_name = "PERCENT|auto",
          value_parser = crate::sched::parse_backup_share)]
    pub backup_share: Option<crate::sched::BackupShare>,
    /// The OOM killer's adjustment for the worker (-1000 to 1000), set at every worker
    /// start; the keeper protects itself at -900, so the OOM killer picks the worker,
    /// which the keeper replaces
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(i32).range(-1000..=1000)
    )]
    pub worker_oom_score_adj: i32,
    /// Also serve device NAME to a VMM as a vhost-user-blk disk on the UNIX socket
    /// SOCKET (created mode 0600); `,ro` for a read-only disk (repeatable)
    #[arg(long = "vhost-user-blk", value_name = "NAME=SOCKET[,ro]")]
    pub vhost_user_blk: Vec<String>,
    /// Export the backup access over NBD here: unix:PATH (a socket, mode 0600) or
    /// tcp:ADDRESS:PORT (TLS required, see --nbd-tls-creds); repeatable [default: no NBD]
    #[arg(long = "nbd", value_name = "unix:PATH|tcp:ADDR:PORT",
          value_parser = crate::nbd::parse_listen)]
    pub nbd: Vec<crate::nbd::Listen>,
    /// TLS credentials for NBD over TCP, in QEMU's x509 layout: server-cert.pem,
    /// server-key.pem, and ca-cert.pem to require client certificates it signed
    #[arg(long, value_name = "DIR")]
    pub nbd_tls_creds: Option<PathBuf>,
    /// Allow NBD over TCP without TLS (anyone who can connect reads the snapshots)
    #[arg(long)]
    pub nbd_insecure: bool,
    /// Internal: set in the background daemon started by `mount`
    #[arg(long, hide = true)]
    pub daemon_child: bool,
}

/// `worker` (internal): the process a mount's keeper starts to serve it.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The mount point the keeper mounted (its plan says the same)
    pub mountpoint: PathBuf,
}

/// `setup` flags.
#[derive(Args, Debug)]
pub struct SetupArgs {
    /// The fleecefs mount point
    pub mountpoint: PathBuf,
    /// Backup target ID (who is backing up)
    #[arg(long, value_name = "ID")]
    pub target: String,
    /// Devices to include, comma-separated [default: all]
    #[arg(long, value_name = "NAME,NAME", value_delimiter = ',')]
    pub devices: Option<Vec<String>>,
    /// Dirty bitmap for incremental backups of this target
    #[arg(long, value_name = "NAME")]
    pub bitmap: Option<String>,
    /// Command run just before the snapshot instant (e.g. "fsfreeze -f /mnt/data"); no
    /// shell unless written as sh -c '...'
    #[arg(long, value_name = "CMD", requires = "thaw_cmd")]
    pub freeze_cmd: Option<String>,
    /// Command run right after it, always once the freeze command was started
    #[arg(long, value_name = "CMD", requires = "freeze_cmd")]
    pub thaw_cmd: Option<String>,
    /// Longest each of the freeze and thaw commands may run before it is killed
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 10.0,
        allow_negative_numbers = true,
        requires = "freeze_cmd"
    )]
    pub freeze_timeout: f64,
    /// A failing or timed-out freeze command does not fail the setup
    #[arg(long, requires = "freeze_cmd")]
    pub freeze_optional: bool,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

/// `teardown` flags.
#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("outcome").required(true).args(["success", "failure"]))]
pub struct TeardownArgs {
    /// The fleecefs mount point
    pub mountpoint: PathBuf,
    /// Backup target ID
    #[arg(long, value_name = "ID")]
    pub target: String,
    /// The backup completed: bitmaps restart from the writes made since setup
    #[arg(long)]
    pub success: bool,
    /// The backup failed: bitmaps keep every change for the next attempt
    #[arg(long)]
    pub failure: bool,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

/// `copy` flags.
#[derive(Args, Debug)]
pub struct CopyArgs {
    /// The fleecefs mount point
    pub mountpoint: PathBuf,
    /// The device to copy (snapshot/NAME of the active backup access)
    pub name: String,
    /// The image to write: a new file, or (raw) with --incremental the previous full image
    pub dest: PathBuf,
    /// Write only the dirty ranges: raw onto DEST, the previous image; qcow2 into a new
    /// overlay DEST on --backing PREV
    #[arg(long)]
    pub incremental: bool,
    /// Format of DEST: raw, or qcow2 (a new image; with --incremental an overlay)
    #[arg(long, value_enum, default_value = "raw")]
    pub format: CopyFormatArg,
    /// The previous backup (raw or qcow2) a qcow2 overlay is based on; only read
    #[arg(long, value_name = "PREV")]
    pub backing: Option<PathBuf>,
    /// A directory PREV's qcow2 chain may have backing files in, besides PREV's own
    /// (repeatable)
    #[arg(long, value_name = "DIR")]
    pub backing_dir: Vec<PathBuf>,
    /// Average snapshot read rate in bytes per second, e.g. 100M
    #[arg(long, value_name = "RATE")]
    pub bwlimit: Option<String>,
    /// Parallel snapshot readers (DEST is still written in order) [default: 2]
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Punch each range on the snapshot once it is safely in DEST (frees fleecing space)
    #[arg(long)]
    pub discard: bool,
    /// Read each written range back from DEST and compare it with the snapshot
    #[arg(long)]
    pub verify: bool,
    /// Print the summary as JSON
    #[arg(long)]
    pub json: bool,
}

/// `restore` flags.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The fleecefs mount point
    pub mountpoint: PathBuf,
    /// The device to restore (live/NAME)
    pub name: String,
    /// The backup: a raw image or the top of a qcow2 chain
    pub from: PathBuf,
    /// A directory the chain's backing files may be in, besides FROM's own (repeatable)
    #[arg(long, value_name = "DIR")]
    pub backing_dir: Vec<PathBuf>,
    /// Read the device back afterwards and compare it with the backup
    #[arg(long)]
    pub verify: bool,
    /// Restore even while another process has live/NAME open
    #[arg(long)]
    pub force: bool,
    /// Print the summary as JSON
    #[arg(long)]
    pub json: bool,
}

/// `copy --format`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyFormatArg {
    /// Plain bytes (sparse)
    Raw,
    /// QEMU qcow2 (only allocated clusters; overlays for incrementals)
    Qcow2,
}

/// `status` flags.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The fleecefs mount point
    pub mountpoint: PathBuf,
    /// Print as JSON
    #[arg(long)]
    pub json: bool,
}

/// `restart` flags.
#[derive(Args, Debug)]
pub struct RestartArgs {
    /// The fleecefs mount point
    pub mountpoint: PathBuf,
    /// Binary of the new worker [default: the keeper's own binary, as installed now]
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Restart even during a backup access (the access breaks: "daemon restarted")
    #[arg(long)]
    pub force: bool,
}

/// `unmount` flags.
#[derive(Args, Debug)]
pub struct UnmountArgs {
    /// The fleecefs mount point
    pub mountpoint: PathBuf,
}

/// `bitmap remove` flags.
#[derive(Args, Debug)]
pub struct BitmapRemoveArgs {
    /// The fleecefs mount point
    pub mountpoint: PathBuf,
    /// Backup target ID whose bitmaps are deleted
    #[arg(long, value_name = "ID")]
    pub target: String,
}

/// `--mode`: permission bits in octal, at most 0777.
fn parse_mode(text: &str) -> std::result::Result<u32, String> {
    match u32::from_str_radix(text, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!(
            "'{text}' is not a mode: give permission bits in octal, 0 to 0777 (e.g. 0640)"
        )),
    }
}

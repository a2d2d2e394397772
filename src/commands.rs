//! The client commands: each sends one request to the daemon of a mount point and
//! prints the result, as a table for people or as JSON for programs.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::control::client::call;
use crate::control::proto::Request;
use crate::engine::{
    AddedBitmap, BitmapRemoveReport, DeviceAddReport, DeviceRemoveReport, ResizeReport,
    ResizedBitmaps, SetupReport, Status, TeardownReport,
};
use crate::error::{Error, Result};
use crate::logger::utc_timestamp;
use crate::units::format_size;

/// Writes one line to stdout. A closed pipe (`| head`, `| grep -q`) ends the program
/// quietly with success, as for any Unix filter, instead of a panic.
pub fn out_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(format_args!("{line}\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

/// `println!` through [`out_line`].
#[macro_export]
macro_rules! out {
    () => { $crate::commands::out_line(format_args!("")) };
    ($($t:tt)*) => { $crate::commands::out_line(format_args!($($t)*)) };
}

/// The daemon's reply `v` as the report type `T`.
fn typed<T: DeserializeOwned>(v: &Value) -> Result<T> {
    T::deserialize(v)
        .map_err(|e| Error::invalid(format!("the daemon's reply is not understood: {e}")))
}

/// An optional text cell: `-` when absent.
fn or_dash(s: Option<&str>) -> String {
    s.unwrap_or("-").to_string()
}

fn print_json(v: &Value) {
    crate::out!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints rows as aligned columns.
fn table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|x| x.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        crate::out!("{}", line.trim_end());
    }
}

/// The freeze hooks of `fleecefs setup`, if given.
pub fn freeze_hooks(a: &crate::cli::SetupArgs) -> Result<Option<crate::freeze::Hooks>> {
    let (Some(freeze), Some(thaw)) = (&a.freeze_cmd, &a.thaw_cmd) else {
        return Ok(None);
    };
    // Hook output goes to the daemon's log file (the mount must be fleecefs anyway).
    let log_file =
        crate::control::client::trusted_state_dir_of(&a.mountpoint)?.join(crate::state::LOG_FILE);
    crate::freeze::Hooks::new(
        freeze,
        thaw,
        a.freeze_timeout,
        a.freeze_optional,
        Some(log_file),
    )
    .map(Some)
}

/// `fleecefs setup`, between the freeze hooks if given.
pub fn setup(
    mp: &Path,
    target: &str,
    devices: Option<Vec<String>>,
    bitmap: Option<String>,
    hooks: Option<&crate::freeze::Hooks>,
    json: bool,
) -> Result<()> {
    let (mut v, freeze) = crate::freeze::around(hooks, || {
        call(
            mp,
            &Request::Setup {
                target: target.to_string(),
                devices,
                bitmap,
            },
        )
    })?;
    if let Some(o) = v.as_object_mut() {
        o.insert("frozen".into(), Value::Bool(freeze.frozen));
        if hooks.is_some() {
            o.insert("freeze_seconds".into(), serde_json::json!(freeze.seconds));
            if let Some(e) = &freeze.freeze_error {
                o.insert("freeze_error".into(), Value::String(e.clone()));
            }
            if let Some(e) = &freeze.thaw_error {
                o.insert("thaw_error".into(), Value::String(e.clone()));
            }
        }
    }
    let thaw_failed = || match &freeze.thaw_error {
        Some(t) => Err(Error::invalid(format!(
            "the backup access '{target}' is set up, but {t}: what it froze may still be frozen"
        ))),
        None => Ok(()),
    };
    if json {
        print_json(&v);
        return thaw_failed();
    }
    if hooks.is_some() {
        if freeze.frozen {
            crate::out!(
                "frozen for {:.2}s around the snapshot instant",
                freeze.seconds
            );
        } else {
            crate::out!("not frozen: the freeze command failed (--freeze-optional)");
        }
    }
    let r: SetupReport = typed(&v)?;
    crate::out!(
        "backup access '{target}' is set up on {} device(s)",
        r.devices.len()
    );
    let mut rows = vec![
        vec!["DEVICE", "SIZE", "TO READ", "BITMAP", "ACTION", "SNAPSHOT"]
            .into_iter()
            .map(String::from)
            .collect(),
    ];
    for d in &r.devices {
        rows.push(vec![
            d.name.clone(),
            format_size(d.size),
            format_size(d.dirty_bytes),
            or_dash(d.bitmap.as_deref()),
            d.bitmap_action.to_string(),
            d.snapshot.display().to_string(),
        ]);
    }
    table(&rows);
    thaw_failed()
}

/// `fleecefs teardown`.
pub fn teardown(mp: &Path, target: &str, success: bool, json: bool) -> Result<()> {
    let v = call(
        mp,
        &Request::Teardown {
            target: target.to_string(),
            success,
            ack: true,
        },
    )?;
    let r: TeardownReport = typed(&v)?;
    if json {
        print_json(&v);
    } else {
        crate::out!(
            "backup access '{target}' torn down as a {}",
            if r.success { "success" } else { "failure" }
        );
    }
    // The outcome stands (exit 0), but someone should look: one line each on stderr.
    for w in &r.warnings {
        eprintln!("fleecefs: warning: {w}");
    }
    Ok(())
}

/// `fleecefs bitmap remove`.
pub fn bitmap_remove(mp: &Path, target: &str) -> Result<()> {
    let v = call(
        mp,
        &Request::BitmapRemove {
            target: target.to_string(),
        },
    )?;
    let n = typed::<BitmapRemoveReport>(&v)?.removed.len();
    crate::out!("removed {n} bitmap(s) of target '{target}'");
    Ok(())
}

/// `fleecefs resize`.
pub fn resize(a: &crate::cli::ResizeArgs) -> Result<()> {
    let (size, grow_by) = match a.size.as_deref() {
        None => (None, None),
        Some(t) => {
            let (grow, text) = match t.strip_prefix('+') {
                Some(rest) => (true, rest),
                None => (false, t),
            };
            let n = crate::units::parse_size(text)
                .map_err(|e| Error::invalid(format!("SIZE '{t}': {e}")))?;
            if grow {
                (None, Some(n))
            } else {
                (Some(n), None)
            }
        }
    };
    let v = call(
        &a.mountpoint,
        &Request::Resize {
            device: a.name.clone(),
            size,
            grow_by,
            allow_shrink: a.allow_shrink,
        },
    )?;
    if a.json {
        print_json(&v);
        return Ok(());
    }
    let r = typed::<ResizeReport>(&v)?;
    let (old, new) = (r.old_size, r.new_size);
    if old == new {
        crate::out!(
            "device '{}' already has {} ({old} bytes)",
            r.device,
            format_size(new)
        );
        return Ok(());
    }
    crate::out!(
        "device '{}' resized from {} to {} ({old} -> {new} bytes)",
        r.device,
        format_size(old),
        format_size(new)
    );
    match r.bitmaps {
        ResizedBitmaps::Grown => crate::out!(
            "bitmaps grown, the new range counts as dirty: {}",
            r.bitmap_names.join(", ")
        ),
        ResizedBitmaps::Invalid => crate::out!(
            "bitmaps invalid, their next backup is full: {}",
            r.bitmap_names.join(", ")
        ),
        ResizedBitmaps::Unchanged => {}
    }
    Ok(())
}

/// `fleecefs device add`.
pub fn device_add(a: &crate::cli::DeviceAddArgs) -> Result<()> {
    let mut devices = Vec::new();
    for spec in &a.devices {
        let (name, path) = spec
            .split_once('=')
            .ok_or_else(|| Error::invalid(format!("'{spec}' is not NAME=PATH")))?;
        if path.is_empty() {
            return Err(Error::invalid(format!("'{spec}' has an empty path")));
        }
        let path =
            std::path::absolute(path).map_err(|e| Error::io(format!("resolving {path}"), e))?;
        let path = path
            .to_str()
            .ok_or_else(|| Error::invalid(format!("path {} is not UTF-8", path.display())))?;
        devices.push((name.to_string(), path.to_string()));
    }
    let vhost_user_blk = a
        .vhost_user_blk
        .iter()
        .map(|s| crate::vhost_user::ExportSpec::parse(s))
        .collect::<Result<Vec<_>>>()?;
    let v = call(
        &a.mountpoint,
        &Request::DeviceAdd {
            devices,
            vhost_user_blk,
        },
    )?;
    if a.json {
        print_json(&v);
        return Ok(());
    }
    for d in typed::<DeviceAddReport>(&v)?.devices {
        crate::out!(
            "device '{}' added: {} ({}){}{}",
            d.name,
            d.source.display(),
            format_size(d.size),
            if d.bitmaps.is_empty() {
                ""
            } else {
                "; bitmaps "
            },
            AddedBitmap::list(&d.bitmaps)
        );
        for e in &d.vhost_user_blk {
            crate::out!(
                "device '{}' exported over vhost-user-blk at {}{}",
                d.name,
                e.socket.display(),
                if e.read_only { " (read-only)" } else { "" }
            );
        }
    }
    Ok(())
}

/// A `device remove` refused because `live/NAME` is open: adds who holds it open (loop
/// devices attached to it, which the kernel holds with no process descriptor, and
/// processes), or else the `fuser` command that would find them.
fn name_holders(mp: &Path, name: &str, e: Error) -> Error {
    if !e.message().starts_with(&format!("live/{name} is open")) {
        return e;
    }
    let live = crate::layout::MountLayout::new(mp).live(name);
    let loops = crate::restore::loop_devices_on(&live);
    let procs = crate::restore::openers(&live);
    let mut who: Vec<String> = loops
        .iter()
        .chain(&procs)
        .map(|(w, what)| format!("{w} ({what})"))
        .collect();
    if who.is_empty() {
        return e.with_note(format!("'fuser -v {}' names the processes", live.display()));
    }
    if who.len() > 4 {
        let more = who.len() - 3;
        who.truncate(3);
        who.push(format!("{more} other(s)"));
    }
    let detach: Vec<String> = loops
        .iter()
        .filter_map(|(w, _)| w.strip_prefix("loop device "))
        .map(|d| format!("losetup -d {d}"))
        .collect();
    e.with_note(format!(
        "held by {}{}",
        who.join(", "),
        if detach.is_empty() {
            String::new()
        } else {
            format!(" (detach with '{}')", detach.join("; "))
        }
    ))
}

/// `fleecefs device remove`.
pub fn device_remove(a: &crate::cli::DeviceRemoveArgs) -> Result<()> {
    let v = call(
        &a.mountpoint,
        &Request::DeviceRemove {
            device: a.name.clone(),
        },
    )
    .map_err(|e| name_holders(&a.mountpoint, &a.name, e))?;
    if a.json {
        print_json(&v);
        return Ok(());
    }
    let r = typed::<DeviceRemoveReport>(&v)?;
    crate::out!(
        "device '{}' removed{}{}",
        r.device,
        if r.bitmaps_kept.is_empty() {
            ""
        } else {
            "; its bitmaps stay in the state dir: "
        },
        r.bitmaps_kept.join(", ")
    );
    Ok(())
}

/// The mount's options in `status`, in the words of `mount`'s flags.
fn options_line(o: &crate::engine::MountOptions) -> String {
    let mut line = format!(
        "options: cluster size {}, backup priority {}",
        format_size(o.cluster_size),
        o.backup_priority
    );
    if let Some(share) = &o.backup_share {
        line.push_str(&format!(
            ", backup share {share}{}",
            if share == "auto" { "" } else { "%" }
        ));
    }
    line.push_str(&format!(
        ", backup read {}, fleecing limit {}, crash-safe bitmaps {}, on cbw error {}, cbw timeout {}, cbw buffer {}{}",
        o.backup_read,
        o.fleecing_limit.map_or("none".to_string(), format_size),
        o.crash_safe_bitmaps,
        o.on_cbw_error,
        o.cbw_timeout_seconds
            .map_or("none".to_string(), |t| format!("{t}s")),
        format_size(o.cbw_buffer),
        if o.live_cache { ", live cache" } else { "" }
    ));
    line
}

/// `fleecefs status`.
pub fn status(mp: &Path, json: bool) -> Result<()> {
    let v = call(mp, &Request::Status {})?;
    if json {
        print_json(&v);
        return Ok(());
    }
    let st: Status = typed(&v)?;
    crate::out!("fleecefs at {} (pid {})", st.mountpoint.display(), st.pid);
    if let Some(o) = &st.options {
        crate::out!("{}", options_line(o));
    }
    let mut rows = vec![vec!["DEVICE", "SIZE", "CLUSTER", "SOURCE"]
        .into_iter()
        .map(String::from)
        .collect()];
    for d in &st.devices {
        rows.push(vec![
            d.name.clone(),
            format_size(d.size),
            format_size(d.cluster_size),
            d.source.display().to_string(),
        ]);
    }
    table(&rows);
    crate::out!();
    if st.bitmaps.is_empty() {
        crate::out!("no bitmaps");
    } else {
        let mut rows = vec![vec!["BITMAP", "DEVICE", "TARGET", "DIRTY", "CONSISTENT"]
            .into_iter()
            .map(String::from)
            .collect()];
        for b in &st.bitmaps {
            let consistent = if b.consistent {
                "yes".to_string()
            } else {
                format!("no: {}", or_dash(b.reason.as_deref()))
            };
            rows.push(vec![
                b.name.clone(),
                b.device.clone(),
                b.target.clone(),
                format_size(b.dirty_bytes),
                consistent,
            ]);
        }
        table(&rows);
    }
    crate::out!();
    match &st.access {
        None => crate::out!("no backup access is active"),
        Some(a) => {
            let age = crate::sys::unix_now().saturating_sub(a.started_at);
            let dirty = a.dirty_bytes;
            let pct = if dirty == 0 {
                100.0
            } else {
                a.discarded_bytes as f64 * 100.0 / dirty as f64
            };
            crate::out!(
                "backup access '{}' on {} since {} ({age}s)",
                a.target,
                a.devices.join(", "),
                utc_timestamp(a.started_at)
            );
            let in_memory = if a.pending_bytes > 0 {
                format!(" ({} of it still in memory)", format_size(a.pending_bytes))
            } else {
                String::new()
            };
            crate::out!(
                "  fleecing {}, copied before write {}{in_memory}, discarded {pct:.0}% of {}",
                format_size(a.fleecing_allocated),
                format_size(a.copied_bytes),
                format_size(dirty)
            );
            if a.broken {
                crate::out!(
                    "  BROKEN since {}: {}",
                    utc_timestamp(a.broken_at.unwrap_or(0)),
                    or_dash(a.broken_reason.as_deref())
                );
            }
        }
    }
    if let Some(n) = v.get("nbd") {
        let n: crate::nbd::NbdStatus = typed(n)?;
        crate::out!();
        crate::out!("NBD on {}", n.listeners.join(", "));
        for e in &n.exports {
            crate::out!(
                "  export {}: {} client(s), {} read",
                e.name,
                e.clients.len(),
                format_size(e.bytes_read)
            );
        }
    }
    if let Some(list) = v.get("vhost_user_blk") {
        let list: Vec<crate::vhost_user::ExportStatus> = typed(list)?;
        if !list.is_empty() {
            crate::out!();
        }
        for e in &list {
            crate::out!(
                "vhost-user-blk {} on {}{}: {}, {} queue(s), {} request(s), {} error(s)",
                e.device,
                e.socket.display(),
                if e.read_only { " (read-only)" } else { "" },
                if e.connected {
                    "VMM connected"
                } else {
                    "no VMM"
                },
                e.queues,
                e.requests,
                e.errors
            );
        }
    }
    if !st.errors.is_empty() {
        crate::out!();
        for e in &st.errors {
            crate::out!("error: {e}");
        }
    }
    Ok(())
}

/// Fails unless the current user is root (mounting and the control socket need it).
pub fn require_root(what: &str) -> Result<()> {
    if crate::sys::euid() != 0 {
        return Err(Error::invalid(format!("{what} needs root")));
    }
    Ok(())
}

/// `fleecefs unmount`: unmount and wait until the daemon has cleaned up and exited.
pub fn unmount(mountpoint: &Path) -> Result<()> {
    let state = crate::control::client::state_dir_of(mountpoint)?;
    let mp = crate::control::client::resolve_mountpoint(mountpoint)?;
    let c = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::invalid("mount point path contains a NUL byte"))?;
    if let Err(e) = crate::sys::umount(&c, false) {
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
fn wait_for_daemon_exit(state_dir: &Path, timeout: Duration) -> Result<()> {
    let dir = crate::secure_path::trusted_dir(
        state_dir,
        "state directory",
        crate::secure_path::Missing::Fail,
    )?;
    let f = dir
        .open(crate::state::LOCK_FILE, libc::O_RDONLY, 0)
        .map_err(|e| {
            Error::io(
                format!(
                    "opening {}",
                    dir.display_path(crate::state::LOCK_FILE).display()
                ),
                e,
            )
        })?;
    let deadline = Instant::now() + timeout;
    loop {
        if crate::sys::try_flock(&f, false).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::busy(format!(
                "the daemon has not exited after {}s; see {}",
                timeout.as_secs(),
                state_dir.join(crate::state::LOG_FILE).display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `fleecefs restart MOUNTPOINT [--binary PATH] [--force]`: asks the worker to hand over,
/// then waits until the next worker serves.
pub fn restart(mountpoint: &Path, binary: Option<&Path>, force: bool) -> Result<()> {
    let binary = match binary {
        // The daemon runs it as root: only a path that cannot mean another file later.
        Some(b) if !b.is_absolute() => {
            return Err(Error::invalid(format!(
                "restart --binary {} is not an absolute path",
                b.display()
            )))
        }
        Some(b) => Some(
            b.to_str()
                .ok_or_else(|| {
                    Error::invalid(format!("restart --binary {} is not UTF-8", b.display()))
                })?
                .to_string(),
        ),
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
                let last: Option<crate::keeper::LastRestart> =
                    serde_json::from_value(v["last_restart"].clone()).ok();
                if let Some((f, l)) = last.as_ref().and_then(|l| Some((l.fallback.as_ref()?, l))) {
                    return Err(Error::invalid(format!(
                        "restart fell back: the worker from {} {}; worker {} serves from {} again (writers paused {} ms)",
                        f.tried.display(),
                        f.reason,
                        v["worker_pid"],
                        l.binary.as_deref().unwrap_or(Path::new("?")).display(),
                        pause.unwrap_or(0)
                    )));
                }
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

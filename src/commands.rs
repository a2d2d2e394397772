//! The client commands: each sends one request to the daemon of a mount point and
//! prints the result, as a table for people or as JSON for programs.

use std::path::Path;

use serde_json::Value;

use crate::control::client::call;
use crate::control::proto::Request;
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

fn u(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("-")
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
        crate::control::client::state_dir_of(&a.mountpoint)?.join(crate::state::LOG_FILE);
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
    let devs = v["devices"].as_array().cloned().unwrap_or_default();
    crate::out!(
        "backup access '{target}' is set up on {} device(s)",
        devs.len()
    );
    let mut rows = vec![
        vec!["DEVICE", "SIZE", "TO READ", "BITMAP", "ACTION", "SNAPSHOT"]
            .into_iter()
            .map(String::from)
            .collect(),
    ];
    for d in &devs {
        rows.push(vec![
            s(d, "name").into(),
            format_size(u(d, "size")),
            format_size(u(d, "dirty_bytes")),
            s(d, "bitmap").into(),
            s(d, "bitmap_action").into(),
            s(d, "snapshot").into(),
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
    if json {
        print_json(&v);
    } else {
        crate::out!(
            "backup access '{target}' torn down as a {}",
            if v["success"].as_bool() == Some(true) {
                "success"
            } else {
                "failure"
            }
        );
    }
    // The outcome stands (exit 0), but someone should look: one line each on stderr.
    for w in v["warnings"].as_array().into_iter().flatten() {
        if let Some(w) = w.as_str() {
            eprintln!("fleecefs: warning: {w}");
        }
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
    let n = v["removed"].as_array().map(Vec::len).unwrap_or(0);
    crate::out!("removed {n} bitmap(s) of target '{target}'");
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1 << 20) as f64)
}

/// `fleecefs status`.
pub fn status(mp: &Path, json: bool) -> Result<()> {
    let v = call(mp, &Request::Status {})?;
    if json {
        print_json(&v);
        return Ok(());
    }
    crate::out!("fleecefs at {} (pid {})", s(&v, "mountpoint"), u(&v, "pid"));
    let mut rows = vec![vec!["DEVICE", "SIZE", "CLUSTER", "SOURCE"]
        .into_iter()
        .map(String::from)
        .collect()];
    for d in v["devices"].as_array().into_iter().flatten() {
        rows.push(vec![
            s(d, "name").into(),
            format_size(u(d, "size")),
            format_size(u(d, "cluster_size")),
            s(d, "source").into(),
        ]);
    }
    table(&rows);
    if let Some(bitmaps) = v["bitmaps"].as_array() {
        crate::out!();
        if bitmaps.is_empty() {
            crate::out!("no bitmaps");
        } else {
            let mut rows = vec![
                vec!["BITMAP", "DEVICE", "TARGET", "DIRTY MiB", "CONSISTENT"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
            ];
            for b in bitmaps {
                let consistent = if b["consistent"].as_bool() == Some(true) {
                    "yes".to_string()
                } else {
                    format!("no: {}", s(b, "reason"))
                };
                rows.push(vec![
                    s(b, "name").into(),
                    s(b, "device").into(),
                    s(b, "target").into(),
                    mib(u(b, "dirty_bytes")),
                    consistent,
                ]);
            }
            table(&rows);
        }
    }
    crate::out!();
    match v.get("access").filter(|a| !a.is_null()) {
        None => crate::out!("no backup access is active"),
        Some(a) => {
            let age = crate::sys::unix_now().saturating_sub(u(a, "started_at"));
            let dirty = u(a, "dirty_bytes");
            let pct = if dirty == 0 {
                100.0
            } else {
                u(a, "discarded_bytes") as f64 * 100.0 / dirty as f64
            };
            let devs: Vec<&str> = a["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            crate::out!(
                "backup access '{}' on {} since {} ({age}s)",
                s(a, "target"),
                devs.join(", "),
                utc_timestamp(u(a, "started_at"))
            );
            let pending = u(a, "pending_bytes");
            let in_memory = if pending > 0 {
                format!(" ({} MiB of it still in memory)", mib(pending))
            } else {
                String::new()
            };
            crate::out!(
                "  fleecing {} MiB, copied before write {} MiB{in_memory}, discarded {pct:.0}% of {} MiB",
                mib(u(a, "fleecing_allocated")),
                mib(u(a, "copied_bytes")),
                mib(dirty)
            );
            if a["broken"].as_bool() == Some(true) {
                crate::out!(
                    "  BROKEN since {}: {}",
                    utc_timestamp(u(a, "broken_at")),
                    s(a, "broken_reason")
                );
            }
        }
    }
    let errors: Vec<&str> = v["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !errors.is_empty() {
        crate::out!();
        for e in errors {
            crate::out!("error: {e}");
        }
    }
    Ok(())
}

/// Fails unless the current user is root (mounting and the control socket need it).
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::invalid(format!("{what} needs root")));
    }
    Ok(())
}

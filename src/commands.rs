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

/// `fleecefs setup`.
pub fn setup(
    mp: &Path,
    target: &str,
    devices: Option<Vec<String>>,
    bitmap: Option<String>,
    json: bool,
) -> Result<()> {
    let v = call(
        mp,
        &Request::Setup {
            target: target.to_string(),
            devices,
            bitmap,
        },
    )?;
    if json {
        print_json(&v);
        return Ok(());
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
    Ok(())
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
    let (old, new) = (u(&v, "old_size"), u(&v, "new_size"));
    let names: Vec<&str> = v["bitmap_names"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if old == new {
        crate::out!(
            "device '{}' already has {} ({old} bytes)",
            a.name,
            format_size(new)
        );
        return Ok(());
    }
    crate::out!(
        "device '{}' resized from {} to {} ({old} -> {new} bytes)",
        a.name,
        format_size(old),
        format_size(new)
    );
    match s(&v, "bitmaps") {
        "grown" => crate::out!(
            "bitmaps grown, the new range counts as dirty: {}",
            names.join(", ")
        ),
        "invalid" => crate::out!(
            "bitmaps invalid, their next backup is full: {}",
            names.join(", ")
        ),
        _ => {}
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
    let v = call(&a.mountpoint, &Request::DeviceAdd { devices })?;
    if a.json {
        print_json(&v);
        return Ok(());
    }
    for d in v["devices"].as_array().into_iter().flatten() {
        let bitmaps: Vec<&str> = d["bitmaps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        crate::out!(
            "device '{}' added: {} ({}){}{}",
            s(d, "name"),
            s(d, "source"),
            format_size(u(d, "size")),
            if bitmaps.is_empty() { "" } else { "; bitmaps " },
            bitmaps.join(", ")
        );
    }
    Ok(())
}

/// `fleecefs device remove`.
pub fn device_remove(a: &crate::cli::DeviceRemoveArgs) -> Result<()> {
    let v = call(
        &a.mountpoint,
        &Request::DeviceRemove {
            device: a.name.clone(),
        },
    )?;
    if a.json {
        print_json(&v);
        return Ok(());
    }
    let kept: Vec<&str> = v["bitmaps_kept"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    crate::out!(
        "device '{}' removed{}{}",
        a.name,
        if kept.is_empty() {
            ""
        } else {
            "; its bitmaps stay in the state dir: "
        },
        kept.join(", ")
    );
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

//! `fleecefs restore`: writes a backup (a raw image, or the top of a qcow2 chain) back
//! into `live/NAME` of a served device.
//!
//! Everything goes through `live/NAME`, like any writer's data, so every dirty bitmap of
//! the device records the restored ranges and the next incremental backup covers them.
//! Ranges that already hold the backup's data are read and compared, not written, so a
//! restore onto a mostly unchanged disk writes little (and dirties little).
//!
//! Refused while a backup access includes the device (its snapshot would not be wrong,
//! copy-before-write keeps it, but a restore in the middle of a backup is a mistake), and
//! while another process has `live/NAME` open or a loop device is attached to it (a
//! running VM or a mounted filesystem would see its disk change under it), unless
//! `--force`. Both are checked once at the start: a backup set up or an
//! open made during the restore is not refused.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::cli::RestoreArgs;
use crate::copy::qcow2::{self, Image};
use crate::copy::{pieces, rate, report_outcome, Progress};
use crate::error::{Error, IoContext, Result};
use crate::sys;
use crate::units::format_size;

/// Bytes compared per step.
const CHUNK: usize = 4 << 20;
/// Granularity of the comparison: only blocks that differ are written.
const BLOCK: usize = 64 << 10;

/// What a restore did (printed as JSON with `--json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RestoreSummary {
    /// The device name.
    pub name: String,
    /// The backup restored.
    pub from: String,
    /// Its format (`raw` or `qcow2`).
    pub format: String,
    /// The device size (all of it is compared).
    pub bytes_total: u64,
    /// Bytes written into `live/NAME` (blocks that differed).
    pub bytes_written: u64,
    /// Bytes that already held the backup's data and were not written.
    pub bytes_skipped_equal: u64,
    /// Whether the device was read back afterwards and compared with the backup.
    pub verified: bool,
    /// Wall-clock duration.
    pub seconds: f64,
}

/// `fleecefs restore`.
pub fn run(a: &RestoreArgs) -> Result<()> {
    let r = restore(
        &a.mountpoint,
        &a.name,
        &a.from,
        &a.backing_dir,
        a.verify,
        a.force,
        true,
    );
    report_outcome(
        &a.mountpoint,
        "restore",
        &format!("restore of {} onto {}", a.from.display(), a.name),
        r,
        a.json,
        summary_line,
    )
}

/// The one-line summary printed without `--json`.
fn summary_line(s: &RestoreSummary) -> String {
    format!(
        "restored {} ({}) onto {}: {} written, {} already equal, {:.1}s ({}){}",
        s.from,
        s.format,
        s.name,
        format_size(s.bytes_written),
        format_size(s.bytes_skipped_equal),
        s.seconds,
        rate(s.bytes_total, s.seconds),
        if s.verified { ", verified" } else { "" }
    )
}

/// Restores `from` onto `MOUNTPOINT/live/NAME`; the backing files its qcow2 header names
/// are read only in its directory and `backing_dirs`.
pub fn restore(
    mountpoint: &Path,
    name: &str,
    from: &Path,
    backing_dirs: &[PathBuf],
    verify: bool,
    force: bool,
    progress: bool,
) -> Result<RestoreSummary> {
    let start = Instant::now();
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(Error::invalid(format!("'{name}' is not a device name")));
    }
    crate::control::client::state_dir_of(mountpoint)?;
    let layout = crate::layout::MountLayout::new(mountpoint);
    let live = layout.live(name);
    if !live.exists() {
        return Err(Error::not_found(format!(
            "no device {name} in {}",
            mountpoint.display()
        )));
    }
    if layout.snapshot(name).exists() {
        return Err(Error::busy(format!(
            "a backup access includes {name}: restore after its teardown"
        )));
    }
    let backup = qcow2::open_chain(from, "backup", backing_dirs)?;
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&live)
        .context(|| format!("opening {}", live.display()))?;
    let size = out
        .metadata()
        .context(|| format!("stat of {}", live.display()))?
        .len();
    // A qcow2 backup of a device whose size is not a whole number of sectors has its
    // virtual size rounded up (`copy`): the bytes past the device's end must be zeros.
    let padded = backup.format == qcow2::ImageFormat::Qcow2
        && backup.size > size
        && backup.size == qcow2::virtual_size(size);
    if padded {
        check_zero_tail(&backup.image, from, size, backup.size)?;
    } else if backup.size != size {
        let mp = mountpoint.display();
        let b = backup.size;
        return Err(Error::invalid(format!(
            "backup {} is {b} bytes but {name} is {size} bytes: if it is a backup of {name} \
             from before a resize, resize the device first (`fleecefs resize {mp} {name} {b}{}`), \
             then restore",
            from.display(),
            if b < size { " --allow-shrink" } else { "" }
        )));
    }
    if !force {
        let mut others = openers(&live);
        others.extend(loop_devices_on(&live));
        if let Some((pid, comm)) = others.first() {
            return Err(Error::busy(format!(
                "live/{name} is open by {pid} ({comm}){}: stop it first, or use --force",
                if others.len() > 1 {
                    format!(" and {} other(s)", others.len() - 1)
                } else {
                    String::new()
                }
            )));
        }
    }
    let mut s = RestoreSummary {
        name: name.to_string(),
        from: from.display().to_string(),
        format: backup.format.name().to_string(),
        bytes_total: size,
        bytes_written: 0,
        bytes_skipped_equal: 0,
        verified: verify,
        seconds: 0.0,
    };
    let mut p = Progress::with_verb("restore", name, size, progress);
    let r = write_differences(&backup.image, &out, &live, size, &mut s, &mut p)
        .and_then(|()| {
            out.sync_all()
                .context(|| format!("syncing {}", live.display()))
        })
        .and_then(|()| {
            if verify {
                compare_all(&backup.image, &out, &live, size)
            } else {
                Ok(())
            }
        });
    p.finish(r.is_ok());
    r?;
    s.seconds = start.elapsed().as_secs_f64();
    Ok(s)
}

fn write_differences(
    image: &Image,
    out: &File,
    live: &Path,
    size: u64,
    s: &mut RestoreSummary,
    p: &mut Progress,
) -> Result<()> {
    let mut want = vec![0u8; CHUNK];
    let mut have = vec![0u8; CHUNK];
    for (off, len) in pieces(0, size, CHUNK as u64) {
        let n = len as usize;
        image
            .read(&mut want[..n], off)
            .context(|| format!("reading {} at offset {off}", s.from))?;
        sys::read_exact_at(out, &mut have[..n], off)
            .context(|| format!("reading {} at offset {off}", live.display()))?;
        // Runs of differing blocks are written together.
        let mut i = 0;
        while i < n {
            let end = (i + BLOCK).min(n);
            if want[i..end] == have[i..end] {
                s.bytes_skipped_equal += (end - i) as u64;
                i = end;
                continue;
            }
            let mut j = end;
            while j < n {
                let e = (j + BLOCK).min(n);
                if want[j..e] == have[j..e] {
                    break;
                }
                j = e;
            }
            let at = off + i as u64;
            sys::write_all_at(out, &want[i..j], at)
                .context(|| format!("writing {} at offset {at}", live.display()))?;
            s.bytes_written += (j - i) as u64;
            i = j;
        }
        p.update(off + len);
    }
    Ok(())
}

/// Checks that `[size, end)` of a backup image (past the device's end) reads as zeros.
fn check_zero_tail(image: &Image, from: &Path, size: u64, end: u64) -> Result<()> {
    let mut tail = vec![0u8; (end - size) as usize];
    image
        .read(&mut tail[..], size)
        .context(|| format!("reading {} at offset {size}", from.display()))?;
    match tail.iter().position(|&b| b != 0) {
        None => Ok(()),
        Some(i) => Err(Error::invalid(format!(
            "backup {} is {end} bytes and has data at offset {}, past the device's {size} bytes: \
             it is not a backup of this device",
            from.display(),
            size + i as u64
        ))),
    }
}

/// Reads the whole device back and compares it with the backup.
fn compare_all(image: &Image, out: &File, live: &Path, size: u64) -> Result<()> {
    let mut want = vec![0u8; CHUNK];
    let mut have = vec![0u8; CHUNK];
    for (off, len) in pieces(0, size, CHUNK as u64) {
        let n = len as usize;
        image
            .read(&mut want[..n], off)
            .context(|| format!("reading the backup at offset {off}"))?;
        sys::drop_cached_pages(out, off, len);
        sys::read_exact_at(out, &mut have[..n], off)
            .context(|| format!("reading back {} at offset {off}", live.display()))?;
        if want[..n] != have[..n] {
            let i = want[..n]
                .iter()
                .zip(&have[..n])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(Error::invalid(format!(
                "verification failed: {} differs from the backup at offset {}",
                live.display(),
                off + i as u64
            )));
        }
    }
    Ok(())
}

/// Loop devices whose backing file is `path` (the kernel holds it open without any
/// process descriptor): ("loop device /dev/loopN", "attached"), from
/// `/sys/block/loop*/loop/backing_file`.
pub fn loop_devices_on(path: &Path) -> Vec<(String, String)> {
    let target: PathBuf = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut found = Vec::new();
    let Ok(blocks) = std::fs::read_dir("/sys/block") else {
        return found;
    };
    for b in blocks.flatten() {
        let name = b.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(back) = std::fs::read_to_string(b.path().join("loop").join("backing_file")) else {
            continue;
        };
        if Path::new(back.trim_end_matches('\n')) == target {
            found.push((format!("loop device /dev/{name}"), "attached".to_string()));
        }
    }
    found
}

/// Other processes that have `path` open: ("process PID", command name), from
/// `/proc/*/fd`. Processes whose descriptors cannot be read (another user's, gone) are
/// skipped.
pub fn openers(path: &Path) -> Vec<(String, String)> {
    let me = std::process::id();
    let target: PathBuf = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let open = fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == target));
        if open {
            let comm = std::fs::read_to_string(p.path().join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_else(|_: io::Error| "?".into());
            found.push((format!("process {pid}"), comm));
        }
    }
    found
}

//! What a copy did: the summary of `fleecefs copy` (its `--json` output) and the one line
//! printed without `--json`; how `copy` and `restore` report their outcome.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::units::format_size;

/// What a copy did (printed as JSON with `--json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CopySummary {
    /// The device name.
    pub name: String,
    /// The destination path.
    pub dest: String,
    /// Bytes covered by the dirty map.
    pub bytes_total: u64,
    /// Bytes read from the snapshot (not counting verification).
    pub bytes_read: u64,
    /// Bytes written into DEST as data.
    pub bytes_written: u64,
    /// Zero bytes not written: left as holes (full) or punched in DEST (incremental).
    pub bytes_skipped_zero: u64,
    /// Bytes punched on the snapshot.
    pub bytes_discarded: u64,
    /// Ranges in the dirty map.
    pub ranges: u64,
    /// Wall-clock duration.
    pub seconds: f64,
    /// Whether only the dirty ranges were written onto an existing image.
    pub incremental: bool,
    /// Whether every range was read back from DEST and compared.
    pub verified: bool,
    /// `raw` or `qcow2`.
    pub format: String,
    /// The size of the device (and of a raw DEST).
    pub device_size: u64,
    /// qcow2: the virtual size of DEST, the device size rounded up to whole 512-byte
    /// sectors (QEMU reads a qcow2 image's size rounded down).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<u64>,
    /// qcow2: data clusters allocated in DEST.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clusters_allocated: Option<u64>,
    /// qcow2: the cluster size of DEST.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// qcow2 overlay: the backing file name recorded in DEST.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// qcow2 overlay: the backing file's format recorded in DEST.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_format: Option<String>,
    /// Snapshot reader threads.
    pub jobs: usize,
    /// `--bwlimit` in bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bwlimit: Option<u64>,
}

/// The one-line summary printed without `--json`.
pub fn summary_line(s: &CopySummary) -> String {
    let mut line = format!(
        "{} copy of {} to {}: {} in {} range(s), {} written, {} zero{}, {:.1}s ({})",
        match (s.incremental, s.format.as_str()) {
            (true, "qcow2") => "incremental qcow2",
            (false, "qcow2") => "full qcow2",
            (true, _) => "incremental",
            (false, _) => "full",
        },
        s.name,
        s.dest,
        format_size(s.bytes_read),
        s.ranges,
        format_size(s.bytes_written),
        format_size(s.bytes_skipped_zero),
        if s.incremental || s.format == "qcow2" {
            ""
        } else {
            " (holes)"
        },
        s.seconds,
        rate(s.bytes_read, s.seconds),
    );
    if let Some(n) = s.clusters_allocated {
        line.push_str(&format!(", {n} cluster(s) allocated"));
    }
    if let Some(b) = &s.backing_file {
        line.push_str(&format!(", backing {b}"));
    }
    if let Some(v) = s.virtual_size.filter(|&v| v != s.device_size) {
        line.push_str(&format!(
            ", virtual size rounded up from {} to {v} bytes (whole 512-byte sectors)",
            s.device_size
        ));
    }
    if s.bytes_discarded > 0 {
        line.push_str(&format!(", {} discarded", format_size(s.bytes_discarded)));
    }
    if s.verified {
        line.push_str(", verified");
    }
    line
}

pub(crate) fn rate(bytes: u64, seconds: f64) -> String {
    if seconds <= 0.0 {
        return "-/s".into();
    }
    crate::units::format_rate(bytes as f64 / seconds)
}

/// Reports the outcome `r` of `fleecefs copy` or `fleecefs restore` (`program`): one line
/// in the daemon's log of the mount at `mountpoint` (the mount's backup history: the
/// summary line, or "`what` failed" and why), then the summary on stdout (JSON with
/// `json`) or the error.
pub(crate) fn report_outcome<S: Serialize>(
    mountpoint: &Path,
    program: &str,
    what: &str,
    r: Result<S>,
    json: bool,
    line: impl Fn(&S) -> String,
) -> Result<()> {
    if let Ok(state) = crate::control::client::trusted_state_dir_of(mountpoint) {
        let log = state.join(crate::state::LOG_FILE);
        match &r {
            Ok(s) => crate::logger::append_to_daemon_log(&log, program, log::Level::Info, &line(s)),
            Err(e) => crate::logger::append_to_daemon_log(
                &log,
                program,
                log::Level::Error,
                &format!("{what} failed: {}", crate::error::report(e)),
            ),
        }
    }
    let s = r?;
    if json {
        let text = serde_json::to_string_pretty(&s).map_err(|e| Error::invalid(e.to_string()))?;
        crate::out!("{text}");
    } else {
        crate::out!("{}", line(&s));
    }
    Ok(())
}

//! A small `log` backend: one line per record on stderr (the daemon's stderr is its log
//! file once it runs in the background). Commands are quiet by default: warnings and
//! errors only; `-v` adds info, `-vv` debug, `-vvv` trace (including fuser's own
//! messages). A daemon logs info too (mounts, setups, teardowns and their outcome: its
//! log is a backup history).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::sync::Recover;

/// The daemon's log file, once it has one.
static FILE: Mutex<Option<File>> = Mutex::new(None);
/// Whether records also go to stderr while a log file is set.
static TEE: AtomicBool = AtomicBool::new(true);

/// Sends records to the log file `opened` (at `path`, for messages; opened for appending,
/// created 0600, a wider mode narrowed, never through a symlink:
/// [`crate::secure_path::open_log_in`]) as well as to stderr.
pub fn tee_to_file(path: &Path, opened: std::io::Result<File>) {
    match opened {
        Ok(f) => {
            *FILE.lock().recover() = Some(f);
        }
        Err(e) => log::warn!("cannot open log file {}: {e}", path.display()),
    }
}

/// Closes the log file (later records go to stderr only): before the state directory
/// lock is released, so that whoever waits for the lock finds no file of the state
/// directory open (an unmount of the file system it is on, say).
pub fn close_file() {
    FILE.lock().recover().take();
}

/// Appends one line, as a daemon's log lines look, to the log file `path` of a daemon
/// from a command of `program` (`setup`, `copy`, `restore`):
/// `TIME fleecefs-PROGRAM[PID] LEVEL: line`. Opened as the daemon opens it
/// ([`crate::secure_path::open_log`]: never through a symlink, 0600); failing to write is
/// not an error of the command.
pub fn append_to_daemon_log(path: &Path, program: &str, level: Level, line: &str) {
    let Ok(mut f) = crate::secure_path::open_log(path) else {
        return;
    };
    let _ = f.write_all(
        format!(
            "{} fleecefs-{program}[{}] {}: {line}\n",
            utc_timestamp(crate::sys::unix_now()),
            std::process::id(),
            level_name(level)
        )
        .as_bytes(),
    );
}

/// Stops writing to stderr; records go to the log file only.
pub fn stop_tee() {
    TEE.store(false, Ordering::Relaxed);
}

/// How a level is spelled in every line fleecefs writes (`fleecefs: warning: ...` on a
/// terminal, `fleecefs[PID] warning: ...` in the log), the words of its other messages.
pub fn level_name(level: Level) -> &'static str {
    match level {
        Level::Error => "error",
        Level::Warn => "warning",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    }
}

struct Logger {
    /// What goes to a terminal: `-v` flags (warnings and errors without).
    level: LevelFilter,
    /// What goes to the daemon's log: its log file, or its stderr when it has no file
    /// (in the foreground, e.g. under systemd, stderr is the journal). At least info.
    log_level: LevelFilter,
    daemon: bool,
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn utc_timestamp(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        // fuser logs unimplemented operations as warnings; only show them when tracing.
        if m.target().starts_with("fuser") && self.log_level < LevelFilter::Trace {
            return m.level() <= Level::Error;
        }
        m.level() <= self.log_level
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = if self.daemon {
            format!(
                "{} fleecefs[{}] {}: {}\n",
                utc_timestamp(crate::sys::unix_now()),
                std::process::id(),
                level_name(r.level()),
                r.args()
            )
        } else if r.level() <= Level::Warn {
            format!("fleecefs: {}: {}\n", level_name(r.level()), r.args())
        } else {
            format!("fleecefs: {}\n", r.args())
        };
        let mut to_stderr = true;
        if let Some(f) = FILE.lock().recover().as_mut() {
            let _ = f.write_all(line.as_bytes());
            // While it is still attached to the terminal, as quiet as a command.
            to_stderr = TEE.load(Ordering::Relaxed) && r.level() <= self.level;
        }
        if to_stderr {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger. `verbosity` counts `-v` flags; `daemon` adds timestamps and pid.
pub fn init(verbosity: u8, daemon: bool) {
    let level = match verbosity {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    let log_level = if daemon {
        level.max(LevelFilter::Info)
    } else {
        level
    };
    let logger = Logger {
        level,
        log_level,
        daemon,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(log_level);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps() {
        assert_eq!(super::utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc_timestamp(1_795_314_181), "2026-11-22T02:23:01Z");
        assert_eq!(super::utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
    }
}

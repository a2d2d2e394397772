//! Progress of a copy or restore on stderr: a bar redrawn in place on a terminal, a log
//! line every 10% otherwise.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use crate::copy::rate;
use crate::sys;
use crate::units::format_size;

/// Shortest time between two redraws of the progress bar.
const REDRAW: Duration = Duration::from_millis(200);

/// Progress on stderr: a bar redrawn in place on a terminal, a log line every 10% otherwise.
pub(crate) struct Progress {
    verb: &'static str,
    name: String,
    total: u64,
    enabled: bool,
    tty: bool,
    start: Instant,
    last_draw: Option<Instant>,
    /// Tenths of the total already logged (not on a terminal).
    logged_tenths: u64,
}

impl Progress {
    pub(crate) fn new(name: &str, total: u64, enabled: bool) -> Progress {
        Progress::with_verb("copy", name, total, enabled)
    }

    /// Progress of `verb` (`copy`, `restore`) on device `name`.
    pub(crate) fn with_verb(verb: &'static str, name: &str, total: u64, enabled: bool) -> Progress {
        let tty = enabled && sys::stderr_is_tty();
        Progress {
            verb,
            name: name.to_string(),
            total,
            enabled,
            tty,
            start: Instant::now(),
            last_draw: None,
            logged_tenths: 0,
        }
    }

    pub(crate) fn update(&mut self, done: u64) {
        if !self.enabled || self.total == 0 {
            return;
        }
        if self.tty {
            let now = Instant::now();
            if self.last_draw.is_some_and(|t| now - t < REDRAW) {
                return;
            }
            self.last_draw = Some(now);
            self.draw(done);
            return;
        }
        let tenths = tenths(done, self.total);
        if tenths > self.logged_tenths {
            self.logged_tenths = tenths;
            // Progress the user asked for: shown without -v (it is not debug logging).
            eprintln!(
                "fleecefs: {} {}: {}% ({} of {}), {}",
                self.verb,
                self.name,
                tenths * 10,
                format_size(done),
                format_size(self.total),
                rate(done, self.start.elapsed().as_secs_f64())
            );
        }
    }

    fn draw(&self, done: u64) {
        let secs = self.start.elapsed().as_secs_f64();
        let frac = if self.total == 0 {
            1.0
        } else {
            done as f64 / self.total as f64
        };
        const WIDTH: usize = 30;
        let filled = ((frac * WIDTH as f64) as usize).min(WIDTH);
        let eta = if done > 0 && done < self.total {
            let left = secs * (self.total - done) as f64 / done as f64;
            format!("ETA {}", clock(left))
        } else if done >= self.total {
            format!("in {}", clock(secs))
        } else {
            "ETA -".into()
        };
        let line = format!(
            "\r{} [{}{}] {:3.0}% {}/{} {} {}\x1b[K",
            self.name,
            "#".repeat(filled),
            "-".repeat(WIDTH - filled),
            frac * 100.0,
            format_size(done),
            format_size(self.total),
            rate(done, secs),
            eta
        );
        let mut err = io::stderr().lock();
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
    }

    pub(crate) fn finish(&mut self, ok: bool) {
        if !self.tty {
            return;
        }
        if ok {
            self.draw(self.total);
        }
        let _ = io::stderr().write_all(b"\n");
    }
}

/// Whole tenths of `total` that `done` covers (0 to 10).
fn tenths(done: u64, total: u64) -> u64 {
    if total == 0 {
        return 10;
    }
    (u128::from(done.min(total)) * 10 / u128::from(total)) as u64
}

/// `M:SS` or `H:MM:SS`.
fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_math() {
        assert_eq!(tenths(0, 100), 0);
        assert_eq!(tenths(19, 100), 1);
        assert_eq!(tenths(100, 100), 10);
        assert_eq!(tenths(u64::MAX, u64::MAX), 10);
        assert_eq!(clock(59.6), "1:00");
        assert_eq!(clock(3725.0), "1:02:05");
    }
}

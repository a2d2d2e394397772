//! Freeze hooks around `fleecefs setup` (application-consistent backups): the freeze
//! command runs before the snapshot instant, the thaw command right after it, like
//! Proxmox VE's guest-agent `fs-freeze` around its backup-access setup.
//!
//! They run in the CLI process around the setup request; the daemon and its engine know
//! nothing of them. Order: freeze (bounded by the timeout) -> setup request -> thaw. Thaw
//! runs exactly once whenever the freeze command was started: after it succeeded, failed
//! or timed out, and whether or not the setup succeeded. A freeze command that fails or
//! times out fails the setup before the request is sent (nothing is set up), unless the
//! hooks are optional; a command that cannot be started (missing) has nothing to thaw.
//!
//! Commands are split into words like a shell would (quotes, backslashes) but run without
//! one: `sh -c '...'` when a shell is wanted. Each runs in its own process group, which is
//! killed on timeout. Their output goes to the log: the daemon's log file in the state
//! directory, and stderr with `-v`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sync::Recover;

/// Default `--freeze-timeout`.
pub const DEFAULT_TIMEOUT: f64 = 10.0;

/// How long a command's output is still read after it exited (its pipes normally close
/// with it; a process it left running in the background may keep them open).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// The hooks of one setup.
#[derive(Clone, Debug)]
pub struct Hooks {
    /// The freeze command, split into words.
    pub freeze: Vec<String>,
    /// The thaw command, split into words.
    pub thaw: Vec<String>,
    /// Longest each command may run.
    pub timeout: Duration,
    /// A failed freeze does not fail the setup.
    pub optional: bool,
    /// Where output lines are appended (the daemon's log file), if it can be opened.
    pub log_file: Option<PathBuf>,
}

/// What the hooks did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// The freeze command succeeded: the snapshot was taken while frozen.
    pub frozen: bool,
    /// From the start of the freeze command to the end of the thaw command.
    pub seconds: f64,
    /// Why the freeze command failed, if it did (an optional freeze).
    pub freeze_error: Option<String>,
    /// Why the thaw command failed, if it did.
    pub thaw_error: Option<String>,
}

impl Hooks {
    /// Builds hooks from the command-line texts. `timeout` in seconds (0 < t <= 86400).
    pub fn new(
        freeze: &str,
        thaw: &str,
        timeout: f64,
        optional: bool,
        log_file: Option<PathBuf>,
    ) -> Result<Hooks> {
        if !(timeout > 0.0 && timeout <= 86400.0) {
            return Err(Error::invalid(format!(
                "--freeze-timeout {timeout} is out of range: more than 0, at most 86400 seconds"
            )));
        }
        let words = |flag: &str, text: &str| {
            let w = split_words(text).map_err(|e| Error::invalid(format!("{flag}: {e}")))?;
            if w.is_empty() {
                return Err(Error::invalid(format!("{flag} is empty")));
            }
            Ok(w)
        };
        Ok(Hooks {
            freeze: words("--freeze-cmd", freeze)?,
            thaw: words("--thaw-cmd", thaw)?,
            timeout: Duration::from_secs_f64(timeout),
            optional,
            log_file,
        })
    }
}

/// Runs `setup` between the freeze and thaw commands (or alone without hooks).
pub fn around<T>(hooks: Option<&Hooks>, setup: impl FnOnce() -> Result<T>) -> Result<(T, Report)> {
    let Some(h) = hooks else {
        return Ok((setup()?, Report::default()));
    };
    let start = Instant::now();
    let mut report = Report::default();
    let freeze = run(&h.freeze, h.timeout, "freeze", h.log_file.as_deref());
    let started = match &freeze {
        Ok(()) => true,
        Err(f) => f.started,
    };
    let thaw = |report: &mut Report| {
        if !started {
            return;
        }
        if let Err(f) = run(&h.thaw, h.timeout, "thaw", h.log_file.as_deref()) {
            report.thaw_error = Some(f.message);
        }
        report.seconds = start.elapsed().as_secs_f64();
    };
    match freeze {
        Ok(()) => report.frozen = true,
        Err(f) if h.optional => {
            log::warn!(
                "{}; setting up without the freeze (--freeze-optional)",
                f.message
            );
            report.freeze_error = Some(f.message);
        }
        Err(f) => {
            thaw(&mut report);
            let mut e = Error::invalid(format!("{}: nothing was set up", f.message));
            if let Some(t) = report.thaw_error {
                e = e.with_note(t);
            }
            return Err(e);
        }
    }
    let r = setup();
    thaw(&mut report);
    match r {
        Ok(v) => Ok((v, report)),
        Err(e) => Err(match report.thaw_error {
            Some(t) => e.with_note(t),
            None => e,
        }),
    }
}

/// A command that did not succeed.
#[derive(Debug)]
struct Failed {
    /// Whether the process was started (it then needs its thaw).
    started: bool,
    message: String,
}

/// Runs one hook command with a timeout; its output lines go to the log.
fn run(
    argv: &[String],
    timeout: Duration,
    what: &str,
    log_file: Option<&Path>,
) -> std::result::Result<(), Failed> {
    use std::os::unix::process::CommandExt;
    let shown = argv.join(" ");
    let (prog, args) = argv.split_first().ok_or_else(|| Failed {
        started: false,
        message: format!("the {what} command is empty"),
    })?;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| Failed {
            started: false,
            message: format!("the {what} command '{shown}' cannot be started: {e}"),
        })?;
    log::info!("{what} command started: {shown}");
    // Output is logged by two threads that end when the pipes close. Once the command
    // has exited they are waited for, so its last lines are in the log before this
    // returns (the CLI exits right after the thaw), but only for a bounded time: a
    // process the command left behind may hold the pipes open.
    let last = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let mut readers = 0;
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let what = what.to_string();
        let log_file = log_file.map(Path::to_path_buf);
        let last = last.clone();
        let done = done_tx.clone();
        readers += 1;
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                log_line(log_file.as_deref(), &format!("{what} command: {line}"));
                *last.lock().recover() = line;
            }
            let _ = done.send(());
        });
    }
    drop(done_tx);
    // Waits until both output threads have logged everything up to the end of their
    // pipe, at most `OUTPUT_GRACE` (nothing to wait for in the usual case: the pipes
    // close when the command exits).
    let drain_output = || {
        let until = Instant::now() + OUTPUT_GRACE;
        for _ in 0..readers {
            let left = until.saturating_duration_since(Instant::now());
            if done_rx.recv_timeout(left).is_err() {
                log::debug!(
                    "the {what} command's output pipes are still open (a process it left behind)"
                );
                break;
            }
        }
    };
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                crate::sys::kill_group(child.id());
                let _ = child.wait();
                drain_output();
                let m = format!(
                    "the {what} command '{shown}' did not finish within {:.1}s and was killed",
                    timeout.as_secs_f64()
                );
                log_line(log_file, &m);
                return Err(Failed {
                    started: true,
                    message: m,
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                return Err(Failed {
                    started: true,
                    message: format!("waiting for the {what} command '{shown}': {e}"),
                })
            }
        }
    };
    drain_output();
    if status.success() {
        log_line(log_file, &format!("{what} command '{shown}' succeeded"));
        return Ok(());
    }
    let said = last.lock().recover().clone();
    let m = format!(
        "the {what} command '{shown}' failed ({status}){}",
        if said.is_empty() {
            String::new()
        } else {
            format!(": {said}")
        }
    );
    log_line(log_file, &m);
    Err(Failed {
        started: true,
        message: m,
    })
}

/// One line to the log: the daemon's log file (if given and writable) and `log::info!`.
fn log_line(file: Option<&Path>, line: &str) {
    log::info!("{line}");
    if let Some(path) = file {
        crate::logger::append_to_daemon_log(path, "setup", log::Level::Info, line);
    }
}

/// Splits a command line into words as a POSIX shell would for a simple command: blanks
/// separate words; `'...'` is literal; `"..."` keeps blanks, with `\` escaping `"`, `\`,
/// `$` and `` ` ``; `\` outside quotes escapes the next character. No expansion of any
/// kind (`$`, `*`, `~` stay as written).
pub fn split_words(text: &str) -> std::result::Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("unterminated ' quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err("unterminated \" quote".into()),
                        },
                        Some(c) => cur.push(c),
                        None => return Err("unterminated \" quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => cur.push(c),
                    None => return Err("a trailing backslash".into()),
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Vec<String> {
        split_words(s).unwrap()
    }

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(w("fsfreeze -f /mnt/x"), ["fsfreeze", "-f", "/mnt/x"]);
        assert_eq!(w("  a   b\t"), ["a", "b"]);
        assert_eq!(w("sh -c 'sync; echo $X'"), ["sh", "-c", "sync; echo $X"]);
        assert_eq!(
            w(r#"echo "a b" c\ d "q\"x" ''"#),
            ["echo", "a b", "c d", "q\"x", ""]
        );
        assert_eq!(w(r#""\n""#), [r"\n"]);
        assert!(w("").is_empty());
        assert!(split_words("'open").is_err());
        assert!(split_words("\"open").is_err());
        assert!(split_words("end\\").is_err());
    }

    fn hooks(freeze: &str, thaw: &str, timeout: f64, optional: bool) -> Hooks {
        Hooks::new(freeze, thaw, timeout, optional, None).unwrap()
    }

    #[test]
    fn thaw_runs_once_whenever_freeze_started() {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("thawed");
        let thaw = format!("sh -c 'echo x >> {}'", mark.display());
        let count = || {
            std::fs::read_to_string(&mark)
                .map(|s| s.lines().count())
                .unwrap_or(0)
        };
        // success
        let (v, r) = around(Some(&hooks("true", &thaw, 5.0, false)), || Ok(7)).unwrap();
        assert_eq!((v, r.frozen, count()), (7, true, 1));
        // setup fails: thawed, the setup's error returned
        let e = around(Some(&hooks("true", &thaw, 5.0, false)), || {
            Err::<(), _>(Error::invalid("setup broke"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("setup broke"));
        assert_eq!(count(), 2);
        // freeze fails: no setup, thawed
        let mut ran = false;
        let e = around(
            Some(&hooks("sh -c 'echo no way >&2; exit 3'", &thaw, 5.0, false)),
            || {
                ran = true;
                Ok(())
            },
        )
        .unwrap_err();
        assert!(!ran);
        assert!(e.to_string().contains("failed"), "{e}");
        assert!(e.to_string().contains("no way"), "{e}");
        assert!(e.to_string().contains("nothing was set up"), "{e}");
        assert_eq!(count(), 3);
        // freeze hangs: killed at the timeout, thawed, no setup
        let t = Instant::now();
        let e = around(Some(&hooks("sleep 30", &thaw, 0.3, false)), || Ok(())).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(e.to_string().contains("did not finish within 0.3s"), "{e}");
        assert_eq!(count(), 4);
        // missing: never started, so no thaw
        let e = around(
            Some(&hooks("/nonexistent/freeze", &thaw, 5.0, false)),
            || Ok(()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("cannot be started"), "{e}");
        assert_eq!(count(), 4);
        // optional: the setup goes on unfrozen, thawed since it started
        let (_, r) = around(Some(&hooks("false", &thaw, 5.0, true)), || Ok(())).unwrap();
        assert!(!r.frozen);
        assert!(r.freeze_error.is_some());
        assert_eq!(count(), 5);
        // a failing thaw is reported
        let (_, r) = around(Some(&hooks("true", "false", 5.0, false)), || Ok(())).unwrap();
        assert!(r.frozen && r.thaw_error.is_some());
    }

    #[test]
    fn bad_hook_arguments() {
        assert!(Hooks::new("true", "true", 0.0, false, None).is_err());
        assert!(Hooks::new("", "true", 1.0, false, None).is_err());
        assert!(Hooks::new("true", "'x", 1.0, false, None).is_err());
    }
}

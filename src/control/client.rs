//! Finding the daemon of a mount point and talking to it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::proto::{Request, Response, ACK};
use crate::error::{Error, Result};
use crate::state::{CONTROL_SOCKET, LOCK_FILE, LOG_FILE};

/// Prefix of the mount source that marks a fleecefs mount; the state dir follows.
pub const FSNAME_PREFIX: &str = "fleecefs:";

/// One line of `/proc/self/mountinfo`, the parts we use.
#[derive(Debug, Clone, PartialEq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Filesystem type (`fuse` for fleecefs).
    pub fstype: String,
    /// Mount source (`fleecefs:STATE_DIR` for fleecefs).
    pub source: String,
}

fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mountpoint = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let source = post.next()?;
            Some(MountEntry {
                mountpoint: PathBuf::from(unescape(mountpoint)),
                fstype: fstype.to_string(),
                source: unescape(source),
            })
        })
        .collect()
}

/// Whether an error from a path means a FUSE mount whose daemon is gone: ENOTCONN, or
/// ECONNABORTED when the connection was aborted with requests in flight.
pub fn is_dead_mount(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
    )
}

/// The absolute, symlink-free form of `path`, even when it is a disconnected mount
/// (where `canonicalize` itself fails with ENOTCONN or ECONNABORTED).
pub fn resolve_mountpoint(path: &Path) -> Result<PathBuf> {
    match path.canonicalize() {
        Ok(p) => Ok(p),
        Err(e) if is_dead_mount(&e) => {
            let abs =
                std::path::absolute(path).map_err(|e| Error::io("resolving mount point", e))?;
            let parent = abs.parent().unwrap_or(Path::new("/"));
            let name = abs
                .file_name()
                .ok_or_else(|| Error::invalid("mount point has no name"))?;
            let parent = parent
                .canonicalize()
                .map_err(|e| Error::io(format!("resolving {}", parent.display()), e))?;
            Ok(parent.join(name))
        }
        Err(e) => Err(Error::io(format!("mount point {}", path.display()), e)),
    }
}

/// The mount entry at `mountpoint` (the last one, if several are stacked).
pub fn mount_at(mountpoint: &Path) -> Result<Option<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .rfind(|m| m.mountpoint == mountpoint))
}

/// The state directory of the fleecefs daemon serving `mountpoint`.
pub fn state_dir_of(mountpoint: &Path) -> Result<PathBuf> {
    let mp = resolve_mountpoint(mountpoint)?;
    match mount_at(&mp)? {
        Some(m) if m.source.starts_with(FSNAME_PREFIX) => {
            Ok(PathBuf::from(&m.source[FSNAME_PREFIX.len()..]))
        }
        _ => Err(Error::not_found(format!(
            "{} is not a fleecefs mount point",
            mountpoint.display()
        ))),
    }
}

/// [`state_dir_of`], refused unless it is a trusted directory
/// ([`crate::secure_path`]): a mount names its state directory itself, and a user who
/// could write there could answer root's commands in the daemon's place.
pub fn trusted_state_dir_of(mountpoint: &Path) -> Result<PathBuf> {
    let state = state_dir_of(mountpoint)?;
    let what = format!("the state directory of {}", mountpoint.display());
    crate::secure_path::open_trusted_dir(&state, &what, crate::secure_path::Missing::Fail)?;
    // The socket itself: root's (or ours), not a symlink. Its directory is trusted, so
    // what is checked here is what `connect` reaches.
    let socket = state.join(CONTROL_SOCKET);
    if let Ok(m) = std::fs::symlink_metadata(&socket) {
        if !m.file_type().is_socket() || (m.uid() != 0 && m.uid() != crate::sys::euid()) {
            return Err(Error::invalid(format!(
                "{} is not a socket of root's (a {} owned by uid {}): refusing to talk to it",
                socket.display(),
                if m.file_type().is_symlink() {
                    "symlink"
                } else if m.is_file() {
                    "file"
                } else {
                    "node"
                },
                m.uid()
            )));
        }
    }
    Ok(state)
}

/// Longest a command waits for a worker to serve while the keeper holds the mount (a
/// worker that died is replaced within a second; more under load).
pub const WORKER_START_WAIT: Duration = Duration::from_secs(10);

/// Why one attempt to talk to the daemon failed.
enum Failure {
    /// An answer that ends the command (a refusal, a malformed reply, a timeout).
    Final(Error),
    /// Nobody answered: no listener, or the connection was dropped. `sent`: the request
    /// may have reached a worker (which then died before it replied).
    NoAnswer { err: String, sent: bool },
}

/// Sends `req` to the daemon of `mountpoint` and returns its result.
///
/// When nobody answers while the mount's keeper is alive (a worker died and the next
/// one is starting), waits and tries again for up to [`WORKER_START_WAIT`]. A request
/// that may have reached a worker that died is sent once more: every request is safe to
/// repeat (a repeated setup or teardown is refused, naming what is active, or ends the
/// access the worker death left broken). Only when no keeper holds the mount does the
/// error suggest `umount -l`.
pub fn call(mountpoint: &Path, req: &Request) -> Result<serde_json::Value> {
    let state = trusted_state_dir_of(mountpoint)?;
    #[allow(unused_mut)]
    let mut wait = WORKER_START_WAIT;
    #[cfg(feature = "fault-injection")]
    if let Some(ms) = std::env::var("FLEECEFS_FAULT_WORKER_START_WAIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        wait = Duration::from_millis(ms);
    }
    let deadline = Instant::now() + wait;
    let mut resent = false;
    loop {
        let (err, sent) = match attempt(&state, req) {
            Ok(v) => return Ok(v),
            Err(Failure::Final(e)) => return Err(e),
            Err(Failure::NoAnswer { err, sent }) => (err, sent),
        };
        let Some(keeper) = live_holder(&state) else {
            return Err(Error::not_found(format!(
                "the fleecefs daemon of {} does not answer ({err}) and no process holds its state directory; run 'umount -l {}' and mount again",
                mountpoint.display(),
                mountpoint.display()
            )));
        };
        if Instant::now() >= deadline || (sent && resent) {
            return Err(Error::busy(format!(
                "the fleecefs daemon of {} does not answer ({err}) after {:.1} s, but its keeper (pid {keeper}) still holds the mount: do not unmount; see {} and try again",
                mountpoint.display(),
                wait.as_secs_f64(),
                state.join(LOG_FILE).display()
            )));
        }
        resent |= sent;
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The keeper, when it is alive (not dying): the process whose pid the state
/// directory's lock file holds, with that file open. It keeps the mount while a worker
/// starts. (Other processes may have the file open a moment: commands like this one.)
fn live_holder(state: &Path) -> Option<u32> {
    let dir = crate::secure_path::trusted_dir(
        state,
        "state directory",
        crate::secure_path::Missing::Fail,
    )
    .ok()?;
    let mut lock = dir
        .open(LOCK_FILE, libc::O_RDONLY | libc::O_NONBLOCK, 0)
        .ok()?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut lock, &mut text).ok()?;
    let keeper: u32 = text.trim().parse().ok()?;
    crate::holders::holders_of(&lock)
        .into_iter()
        .find(|h| h.pid == keeper && !h.dying)
        .map(|h| h.pid)
}

fn attempt(state: &Path, req: &Request) -> std::result::Result<serde_json::Value, Failure> {
    let socket = state.join(CONTROL_SOCKET);
    let mut stream = UnixStream::connect(&socket).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            return Failure::Final(Error::invalid(format!(
                "permission denied on {}: fleecefs commands need root",
                socket.display()
            )));
        }
        Failure::NoAnswer {
            err: e.to_string(),
            sent: false,
        }
    })?;
    let mut line =
        serde_json::to_vec(req).map_err(|e| Failure::Final(Error::invalid(e.to_string())))?;
    line.push(b'\n');
    // Nothing was delivered if this fails: the worker went away before reading.
    stream.write_all(&line).map_err(|e| Failure::NoAnswer {
        err: format!("sending the request: {e}"),
        sent: false,
    })?;
    // A teardown with `ack` waits for our acknowledgement: the write side stays open.
    let ack = matches!(req, Request::Teardown { ack: true, .. });
    if !ack {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(600)));
    // The reply is one line: complete once its newline is here.
    let mut out = Vec::new();
    match BufReader::new(&stream).read_until(b'\n', &mut out) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Err(Failure::Final(Error::io("reading the daemon's reply", e)))
        }
        Err(e) => {
            return Err(Failure::NoAnswer {
                err: format!("reading the reply: {e}"),
                sent: true,
            })
        }
        // The worker died before it replied (a reply is written whole, with its newline).
        Ok(_) if out.last() != Some(&b'\n') => {
            return Err(Failure::NoAnswer {
                err: "the connection closed before a reply".into(),
                sent: true,
            })
        }
        Ok(_) => {}
    }
    let resp: Response = serde_json::from_slice(&out).map_err(|e| {
        Failure::Final(Error::invalid(format!(
            "the daemon sent a malformed reply ({e})"
        )))
    })?;
    if ack {
        // The daemon applies a success to the bitmaps only once this arrives; if it does
        // not, the backup counts as failed there too.
        (&stream)
            .write_all(format!("{ACK}\n").as_bytes())
            .map_err(|e| Failure::Final(Error::io("acknowledging the daemon's reply", e)))?;
    }
    if resp.ok {
        Ok(resp.data.unwrap_or(serde_json::Value::Null))
    } else {
        Err(Failure::Final(Error::new(
            crate::error::Kind::Invalid,
            resp.error
                .unwrap_or_else(|| "the daemon refused the request".into()),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    99 22 0:55 / /tmp/my\\040mnt rw,nosuid,nodev shared:1 - fuse fleecefs:/var/lib/x\\040y rw,user_id=0\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].mountpoint, PathBuf::from("/tmp/my mnt"));
        assert_eq!(m[1].fstype, "fuse");
        assert_eq!(m[1].source, "fleecefs:/var/lib/x y");
    }
}

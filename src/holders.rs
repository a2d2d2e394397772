//! Who holds a file open, from /proc: to wait for a fleecefs process that is still
//! dying after `kill -9` (its threads take a moment to exit, and its locks go with its
//! last one), and to name a live holder in the error otherwise.

use std::fs::File;
use std::io;
use std::time::{Duration, Instant};

/// Longest a lock waits for dying holders.
pub const DYING_WAIT: Duration = Duration::from_secs(5);

/// A process that has the file open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its pid.
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// It was killed and is exiting (zombie leader, or SIGKILL pending).
    pub dying: bool,
}

/// The (mnt_id, ino) of an open file from `/proc/PID/fdinfo/FD`. Read from fdinfo, not
/// by stat-ing `/proc/PID/fd/FD`: that would ask the file's filesystem, and a file on a
/// hung FUSE mount (a killed daemon's) would block the caller for good.
fn fdinfo_id(path: &std::path::Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((field("mnt_id:")?, field("ino:")?))
}

fn holds(dir: &std::path::Path, id: (u64, u64)) -> bool {
    std::fs::read_dir(dir)
        .is_ok_and(|entries| entries.flatten().any(|e| fdinfo_id(&e.path()) == Some(id)))
}

/// The processes (other than this one) that have the file `id` (mnt_id, ino) open.
pub fn holders(id: (u64, u64)) -> Vec<Holder> {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let dir = p.path();
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        let (comm, state) = match (stat.find('('), stat.rfind(')')) {
            (Some(a), Some(b)) if a < b => (
                stat[a + 1..b].to_string(),
                stat[b + 1..].trim_start().chars().next().unwrap_or('?'),
            ),
            _ => continue,
        };
        // A killed multi-threaded process: its leader is a zombie while the other
        // threads exit, and only they still show the open files.
        let held = holds(&dir.join("fdinfo"), id)
            || (state == 'Z'
                && std::fs::read_dir(dir.join("task")).is_ok_and(|tasks| {
                    tasks.flatten().any(|t| holds(&t.path().join("fdinfo"), id))
                }));
        if !held {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let sigkill_pending = status.lines().any(|l| {
            (l.starts_with("ShdPnd:") || l.starts_with("SigPnd:"))
                && u64::from_str_radix(l[7..].trim(), 16).is_ok_and(|m| m & (1 << 8) != 0)
        });
        out.push(Holder {
            pid,
            comm,
            dying: matches!(state, 'Z' | 'X') || sigkill_pending,
        });
    }
    out
}

/// The (mnt_id, ino) of `file`, open in this process.
fn own_id(file: &File) -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd;
    fdinfo_id(std::path::Path::new(&format!(
        "/proc/self/fdinfo/{}",
        file.as_raw_fd()
    )))
}

/// The processes (other than this one) that have `file` open too.
pub fn holders_of(file: &File) -> Vec<Holder> {
    own_id(file).map(holders).unwrap_or_default()
}

/// ": held by pid N (comm)" for the holders of `file` (live ones; or, if all are dying,
/// those, said so), or "".
pub fn describe(file: &File) -> String {
    let Some(id) = own_id(file) else {
        return String::new();
    };
    let all = holders(id);
    let live: Vec<&Holder> = all.iter().filter(|h| !h.dying).collect();
    let (shown, note) = if live.is_empty() {
        (all.iter().collect(), ", still exiting after being killed")
    } else {
        (live, "")
    };
    if shown.is_empty() {
        return String::new();
    }
    let names: Vec<String> = shown
        .iter()
        .map(|h| format!("pid {} ({})", h.pid, h.comm))
        .collect();
    format!(": held by {}{note}", names.join(", "))
}

/// Runs `attempt` (a lock on `file`) until it succeeds, or fails otherwise than with a
/// conflict (`is_conflict`), or the conflict is with a live holder; while every holder
/// is dying (or none is found: it just went), it tries again, for at most
/// [`DYING_WAIT`].
pub fn lock_waiting_for_dying(
    file: &File,
    attempt: impl FnMut() -> io::Result<()>,
    is_conflict: impl Fn(&io::Error) -> bool,
) -> io::Result<()> {
    retry_while_dying(own_id(file), attempt, is_conflict)
}

/// Opens a block device exclusively (`open`, which fails with EBUSY while another
/// exclusive opener or a mount has it), waiting like [`lock_waiting_for_dying`] while
/// the processes that have it open are all dying. `probe` is the device opened without
/// `O_EXCL`, to find them.
pub fn open_excl_waiting_for_dying(
    probe: &File,
    open: impl FnMut() -> io::Result<File>,
) -> io::Result<File> {
    retry_while_dying(own_id(probe), open, |e| {
        e.raw_os_error() == Some(libc::EBUSY)
    })
}

fn retry_while_dying<T>(
    id: Option<(u64, u64)>,
    mut attempt: impl FnMut() -> io::Result<T>,
    is_conflict: impl Fn(&io::Error) -> bool,
) -> io::Result<T> {
    let deadline = Instant::now() + DYING_WAIT;
    let mut waited = false;
    let mut announced = false;
    let mut nobody = 0;
    loop {
        match attempt() {
            Ok(v) => {
                if waited {
                    log::info!("a dying process let go of the file; going on");
                }
                return Ok(v);
            }
            Err(e) if !is_conflict(&e) || Instant::now() >= deadline => return Err(e),
            Err(e) => {
                let Some(id) = id else { return Err(e) };
                let found = holders(id);
                if found.iter().any(|h| !h.dying) {
                    return Err(e);
                }
                if !found.is_empty() && !announced {
                    announced = true;
                    let names: Vec<String> = found
                        .iter()
                        .map(|h| format!("pid {} ({})", h.pid, h.comm))
                        .collect();
                    log::warn!(
                        "waiting (at most {} s) for {}, killed and still exiting, to let go of the file",
                        DYING_WAIT.as_secs(),
                        names.join(", ")
                    );
                }
                // Nobody has it open: it just went (the next attempt succeeds), or the
                // conflict is not a process's (a block device mounted, or claimed by
                // device-mapper, md or swap), which waiting does not end.
                nobody = if found.is_empty() { nobody + 1 } else { 0 };
                if nobody > 3 {
                    return Err(e);
                }
                waited = true;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_names_a_live_holder_without_touching_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f");
        let file = File::create(&path).expect("create");
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .stdin(File::open(&path).expect("open"))
            .spawn()
            .expect("sleep");
        let id = own_id(&file).expect("fdinfo of an open file");
        let found = holders(id);
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            found
                .iter()
                .any(|h| h.pid == child.id() && !h.dying && h.comm == "sleep"),
            "{found:?}"
        );
        assert!(holders(id).iter().all(|h| h.pid != child.id()));
    }
}

//! The fd channel: a worker hands its keeper a **named fd** to hold for the life of the
//! mount (a listening socket made after the mount started, a memory region), and every
//! later worker inherits it under that name ([`super::WorkerPlan::held_fds`]).
//!
//! One `SOCK_SEQPACKET` socket pair per worker, inherited like the report pipe. The
//! worker sends one request per message and waits for the answer, so when
//! [`FdChannel::hold`] returns `Ok` the keeper holds the fd: a worker death right after
//! loses nothing. The keeper answers from a thread of its own ([`serve`]); after the
//! worker exits it waits for that thread to read the last requests (end of file on the
//! socket) before it starts the next worker.
//!
//! Requests are JSON: `{"hold":"NAME"}` with exactly one fd attached (a held fd of that
//! name is replaced and closed), `{"release":"NAME"}` with none (the keeper closes it).
//! The answer is `ok` or `error: WHY`, one per request, in order: a worker that gave up
//! waiting for one ([`ANSWER_TIMEOUT`]) skips it when it comes, so every answer it takes
//! is that of the request it just sent.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sync::Recover;
use crate::sys;

/// Longest name of a held fd, in bytes.
pub const MAX_NAME: usize = 256;
/// Most fds a keeper holds for its workers.
pub const MAX_HELD: usize = 4096;
/// Longest a worker waits for the keeper's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request message.
const MAX_MESSAGE: usize = MAX_NAME + 64;

/// The named fds a keeper holds.
pub(super) type HeldFds = Arc<Mutex<BTreeMap<String, OwnedFd>>>;

#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Hold(String),
    Release(String),
}

/// The worker's end of the channel.
pub struct FdChannel {
    sock: Mutex<WorkerEnd>,
}

struct WorkerEnd {
    fd: OwnedFd,
    /// Answers still to come for requests whose wait timed out.
    late: usize,
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

impl FdChannel {
    pub(super) fn new(sock: OwnedFd) -> FdChannel {
        FdChannel {
            sock: Mutex::new(WorkerEnd { fd: sock, late: 0 }),
        }
    }

    /// Hands `fd` (a duplicate of it) to the keeper under `name`; `Ok` once the keeper
    /// holds it. An fd already held under `name` is replaced.
    pub fn hold(&self, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
        self.ask(&Request::Hold(name.to_string()), Some(fd))
    }

    /// The keeper closes the fd it holds under `name` (if any).
    pub fn release(&self, name: &str) -> Result<()> {
        self.ask(&Request::Release(name.to_string()), None)
    }

    fn ask(&self, req: &Request, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        let (Request::Hold(name) | Request::Release(name)) = req;
        check_name(name)?;
        let line = serde_json::to_vec(req)
            .map_err(|e| Error::invalid(format!("cannot encode a request to the keeper: {e}")))?;
        let mut sock = self.sock.lock().recover();
        let io = |e| Error::io(format!("asking the keeper to hold fd '{name}'"), e);
        sys::send_with_fd(sock.fd.as_fd(), &line, fd).map_err(io)?;
        let mut buf = [0u8; 512];
        // The keeper answers every request, in order: the answers owed to requests the
        // worker stopped waiting for come first.
        let n = loop {
            match sys::recv_with_fds(sock.fd.as_fd(), &mut buf) {
                Ok((n, _)) if n > 0 && sock.late > 0 => sock.late -= 1,
                Ok((n, _)) => break n,
                Err(e) => {
                    if is_timeout(&e) {
                        sock.late += 1;
                    }
                    return Err(io(e));
                }
            }
        };
        match std::str::from_utf8(&buf[..n]) {
            Ok("ok") => Ok(()),
            Ok(a) if a.starts_with("error: ") => Err(Error::invalid(format!(
                "the keeper refused to hold fd '{name}': {}",
                &a["error: ".len()..]
            ))),
            _ if n == 0 => Err(Error::invalid(format!(
                "the keeper closed the fd channel (fd '{name}')"
            ))),
            _ => Err(Error::invalid(format!(
                "the keeper's answer about fd '{name}' is not understood"
            ))),
        }
    }
}

/// A new channel: the keeper's end, and the worker's (with the answer timeout set).
pub(super) fn pair() -> Result<(OwnedFd, OwnedFd)> {
    let (keeper, worker) =
        sys::seqpacket_pair().map_err(|e| Error::io("creating the fd channel", e))?;
    sys::set_recv_timeout(worker.as_fd(), ANSWER_TIMEOUT)
        .map_err(|e| Error::io("setting up the fd channel", e))?;
    Ok((keeper, worker))
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME || name.contains('\0') {
        return Err(Error::invalid(format!(
            "invalid name of a held fd '{}' (1-{MAX_NAME} bytes)",
            name.escape_debug()
        )));
    }
    Ok(())
}

/// One request of the worker, applied to `held`: the answer.
fn apply(held: &HeldFds, buf: &[u8], mut fds: Vec<OwnedFd>) -> String {
    let req: Request = match serde_json::from_slice(buf) {
        Ok(r) => r,
        Err(e) => return format!("error: request not understood ({e})"),
    };
    match req {
        Request::Hold(name) => {
            if let Err(e) = check_name(&name) {
                return format!("error: {}", e.message());
            }
            if fds.len() != 1 {
                return format!("error: 'hold' takes one fd, {} came", fds.len());
            }
            let mut held = held.lock().recover();
            if held.len() >= MAX_HELD && !held.contains_key(&name) {
                return format!("error: the keeper holds {MAX_HELD} fds already");
            }
            held.insert(name, fds.remove(0));
            "ok".into()
        }
        Request::Release(name) => {
            if !fds.is_empty() {
                return "error: 'release' takes no fd".into();
            }
            held.lock().recover().remove(&name);
            "ok".into()
        }
    }
}

/// The keeper's side: answers the requests of one worker on `sock` until the worker's end
/// is closed (it exited), then sends on `done`.
pub(super) fn serve(sock: OwnedFd, held: HeldFds, done: mpsc::Sender<()>) -> Result<()> {
    std::thread::Builder::new()
        .name("worker-fds".into())
        .spawn(move || {
            let mut buf = vec![0u8; MAX_MESSAGE];
            loop {
                let (n, fds) = match sys::recv_with_fds(sock.as_fd(), &mut buf) {
                    Ok((0, fds)) if fds.is_empty() => break,
                    Ok(r) => r,
                    Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                        let _ = sys::send_with_fd(sock.as_fd(), b"error: message too long", None);
                        continue;
                    }
                    Err(e) => {
                        log::warn!("fd channel of the worker: {e}");
                        break;
                    }
                };
                let answer = apply(&held, &buf[..n], fds);
                if answer != "ok" {
                    log::warn!("fd channel of the worker: {answer}");
                }
                // The worker may have died meanwhile: what it handed over is held anyway.
                let _ = sys::send_with_fd(sock.as_fd(), answer.as_bytes(), None);
            }
            let _ = done.send(());
        })
        .map_err(|e| Error::io("starting the fd channel thread", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    fn memfd(text: &str) -> std::fs::File {
        sys::memfd_with(c"test", text.as_bytes()).unwrap()
    }

    fn read(fd: &OwnedFd) -> String {
        let mut f = std::fs::File::from(fd.try_clone().unwrap());
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn held_fds_are_replaced_released_and_survive_the_worker_end() {
        let held: HeldFds = Default::default();
        let (keeper, worker) = pair().unwrap();
        let (tx, rx) = mpsc::channel();
        serve(keeper, held.clone(), tx).unwrap();
        let ch = FdChannel::new(worker);
        let a = memfd("a1");
        ch.hold("a", a.as_fd()).unwrap();
        ch.hold("b", memfd("b").as_fd()).unwrap();
        // Writes through the worker's fd are seen through the keeper's: the same file.
        (&a).write_all(b"+").unwrap();
        assert_eq!(read(&held.lock().unwrap()["a"]), "+1");
        ch.hold("a", memfd("a2").as_fd()).unwrap();
        ch.release("b").unwrap();
        ch.release("never-held").unwrap();
        let e = ch.hold("", memfd("x").as_fd()).unwrap_err();
        assert!(e.message().contains("invalid name"), "{}", e.message());
        let e = ch.hold(&"n".repeat(MAX_NAME + 1), a.as_fd()).unwrap_err();
        assert!(e.message().contains("invalid name"), "{}", e.message());
        drop(ch);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let held = held.lock().unwrap();
        assert_eq!(held.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(read(&held["a"]), "a2");
    }

    /// An answer that comes after the worker stopped waiting for it is not taken for the
    /// answer to the next request.
    #[test]
    fn a_late_answer_is_not_taken_for_the_next_one() {
        let (keeper, worker) = sys::seqpacket_pair().unwrap();
        sys::set_recv_timeout(worker.as_fd(), Duration::from_millis(200)).unwrap();
        let ch = FdChannel::new(worker);
        let slow = std::thread::spawn(move || {
            let mut buf = [0u8; MAX_MESSAGE];
            // The first request is answered too late, the second at once.
            let (n, _) = sys::recv_with_fds(keeper.as_fd(), &mut buf).unwrap();
            assert!(buf[..n].starts_with(b"{\"hold\""));
            std::thread::sleep(Duration::from_millis(600));
            sys::send_with_fd(keeper.as_fd(), b"error: too late", None).unwrap();
            let (n, _) = sys::recv_with_fds(keeper.as_fd(), &mut buf).unwrap();
            assert!(buf[..n].starts_with(b"{\"release\""));
            sys::send_with_fd(keeper.as_fd(), b"ok", None).unwrap();
            keeper
        });
        let e = ch.hold("a", memfd("a").as_fd()).unwrap_err();
        assert!(!e.message().contains("too late"), "{}", e.message());
        // the next request is sent before the late answer comes
        let fd = ch.sock.lock().unwrap().fd.try_clone().unwrap();
        sys::set_recv_timeout(fd.as_fd(), Duration::from_secs(10)).unwrap();
        ch.release("a").unwrap();
        drop(slow.join().unwrap());
    }

    #[test]
    fn malformed_requests_are_answered_with_an_error() {
        let held: HeldFds = Default::default();
        let (keeper, worker) = pair().unwrap();
        let (tx, rx) = mpsc::channel();
        serve(keeper, held.clone(), tx).unwrap();
        let f = memfd("x");
        for (msg, fd) in [
            (&b"{\"hold\":\"a\"}"[..], None),
            (b"{\"release\":\"a\"}", Some(f.as_fd())),
            (b"nonsense", None),
            (b"{\"format\":\"disk\"}", None),
        ] {
            sys::send_with_fd(worker.as_fd(), msg, fd).unwrap();
            let mut buf = [0u8; 256];
            let (n, _) = sys::recv_with_fds(worker.as_fd(), &mut buf).unwrap();
            let answer = std::str::from_utf8(&buf[..n]).unwrap();
            assert!(answer.starts_with("error: "), "{answer}");
        }
        let big = vec![b'x'; MAX_MESSAGE + 10];
        sys::send_with_fd(worker.as_fd(), &big, None).unwrap();
        let mut buf = [0u8; 256];
        let (n, _) = sys::recv_with_fds(worker.as_fd(), &mut buf).unwrap();
        assert!(buf[..n].starts_with(b"error: "));
        drop(worker);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(held.lock().unwrap().is_empty());
    }
}

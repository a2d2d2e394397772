//! The drain gate of planned restarts.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sync::Recover;

/// Requests that act on data pass this gate. A planned restart closes it and waits until
/// no request is inside: requests that arrive later wait at the gate until the worker
/// exits, and the kernel resends them to the next worker. Passing it costs two atomic
/// operations (no lock) while it is open.
pub struct Gate {
    closed: AtomicBool,
    inside: AtomicUsize,
    lock: Mutex<()>,
    idle: Condvar,
}

/// A request inside the [`Gate`].
pub struct Pass<'a>(&'a Gate);

impl Gate {
    const fn new() -> Gate {
        Gate {
            closed: AtomicBool::new(false),
            inside: AtomicUsize::new(0),
            lock: Mutex::new(()),
            idle: Condvar::new(),
        }
    }

    /// Enters; blocks for good once the gate is closed.
    pub fn enter(&self) -> Pass<'_> {
        // SeqCst on both sides: either the drain sees this request inside, or this
        // request sees the gate closed.
        self.inside.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.leave();
            let mut g = self.lock.lock().recover();
            loop {
                g = self.idle.wait(g).recover();
            }
        }
        Pass(self)
    }

    /// Whether a planned restart closed the gate (requests arriving now wait for the next
    /// worker).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn leave(&self) {
        if self.inside.fetch_sub(1, Ordering::SeqCst) == 1 && self.closed.load(Ordering::SeqCst) {
            let _g = self.lock.lock().recover();
            self.idle.notify_all();
        }
    }

    /// Closes the gate and waits until no request is inside (at most `timeout`).
    pub(super) fn close_and_drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.closed.store(true, Ordering::SeqCst);
        let mut g = self.lock.lock().recover();
        while self.inside.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            g = self
                .idle
                .wait_timeout(g, Duration::from_millis(10))
                .recover()
                .0;
        }
        true
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// The gate of this process: one per process, since a process is one worker.
pub static GATE: Gate = Gate::new();

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn gate_drains_in_flight_requests_and_holds_new_ones() {
        static G: Gate = Gate::new();
        let inside = G.enter();
        let (tx, rx) = mpsc::channel();
        let drain = std::thread::spawn(move || {
            let done = G.close_and_drain(Duration::from_secs(10));
            tx.send(done).ok();
        });
        // The drain waits for the request inside.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(inside);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(true));
        drain.join().ok();
        // A request arriving now waits at the gate (until the process exits).
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _p = G.enter();
            tx.send(()).ok();
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    }

    #[test]
    fn drain_gives_up_after_its_timeout() {
        static G: Gate = Gate::new();
        let _inside = G.enter();
        assert!(!G.close_and_drain(Duration::from_millis(50)));
    }
}

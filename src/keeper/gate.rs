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
    /// A drain has begun: no new FUSE notification is sent ([`Gate::notify`]).
    quiescing: AtomicBool,
    /// FUSE notifications being sent, which a drain lets finish before it closes.
    notifying: AtomicUsize,
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
            quiescing: AtomicBool::new(false),
            notifying: AtomicUsize::new(0),
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

    /// Sends a FUSE notification (`send`) that the kernel may complete only once
    /// requests of this worker are served (an `inval_inode` waits for the pages a read
    /// holds locked), unless a planned restart is draining: then nothing is sent (None).
    /// A drain lets the notifications under way finish before it closes the gate: one
    /// waiting for a request held at the closed gate would never return, and a thread
    /// asleep in the kernel keeps the worker from exiting, so no next worker would
    /// ever serve that request.
    pub fn notify<R>(&self, send: impl FnOnce() -> R) -> Option<R> {
        // SeqCst on both sides: either the drain sees this notification under way, or
        // it is not sent.
        self.notifying.fetch_add(1, Ordering::SeqCst);
        let r = if self.quiescing.load(Ordering::SeqCst) {
            None
        } else {
            Some(send())
        };
        self.notifying.fetch_sub(1, Ordering::SeqCst);
        r
    }

    fn leave(&self) {
        if self.inside.fetch_sub(1, Ordering::SeqCst) == 1 && self.closed.load(Ordering::SeqCst) {
            let _g = self.lock.lock().recover();
            self.idle.notify_all();
        }
    }

    /// Closes the gate and waits until no request is inside (at most `timeout`). First
    /// no new FUSE notification is sent, and those under way finish while requests are
    /// still served ([`Gate::notify`]).
    pub(super) fn close_and_drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.quiescing.store(true, Ordering::SeqCst);
        while self.notifying.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
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
    fn a_drain_lets_notifications_under_way_finish_before_it_closes_and_stops_new_ones() {
        static G: Gate = Gate::new();
        let (started_tx, started_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let notifier = std::thread::spawn(move || {
            let _inside = G.enter();
            G.notify(|| {
                started_tx.send(()).ok();
                release_rx.recv().ok();
            })
        });
        started_rx.recv_timeout(Duration::from_secs(5)).ok();
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            done_tx
                .send(G.close_and_drain(Duration::from_secs(10)))
                .ok();
        });
        // The gate stays open while the notification is under way: a request arriving
        // now (the read the notification waits for) is served.
        std::thread::sleep(Duration::from_millis(100));
        assert!(!G.closed.load(Ordering::SeqCst));
        drop(G.enter());
        // No new notification is sent meanwhile.
        assert_eq!(G.notify(|| ()), None);
        release_tx.send(()).ok();
        assert_eq!(notifier.join().ok(), Some(Some(())));
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)), Ok(true));
        assert!(G.closed.load(Ordering::SeqCst));
    }

    #[test]
    fn drain_gives_up_after_its_timeout() {
        static G: Gate = Gate::new();
        let _inside = G.enter();
        assert!(!G.close_and_drain(Duration::from_millis(50)));
    }
}

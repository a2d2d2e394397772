//! Copy-before-write failure policy: what breaks when copying old data fails or is slow
//! (QEMU's `on-cbw-error` and `cbw-timeout`), the fleecing space limit, and the pool of
//! threads copies run on when a timeout is set.
//!
//! A copy with a timeout runs on a pool thread while the writer waits at most the
//! timeout for it. If it gives up, the copy goes on by itself (a blocking `pwrite`
//! cannot be interrupted); the caller marks the access broken *before* its write reaches
//! the source, so whatever the late copy stores is never served (see `cbw/mod.rs`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Error, Kind, Result};
use crate::sync::Recover;

/// What to do when copying old data to the fleecing file fails or times out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OnCbwError {
    /// The live write succeeds; the access becomes broken and snapshot reads fail (EIO).
    BreakSnapshot,
    /// The live write fails with the copy's error; the snapshot stays valid.
    BreakGuestWrite,
}

/// The fleecing space of one access, shared by its devices: bytes of old data held in
/// fleecing files (copied and not yet discarded), against an optional limit.
#[derive(Debug)]
pub struct FleecingBudget {
    used: AtomicU64,
    limit: Option<u64>,
}

impl FleecingBudget {
    /// A budget of at most `limit` bytes (unlimited when `None`).
    pub fn new(limit: Option<u64>) -> FleecingBudget {
        FleecingBudget {
            used: AtomicU64::new(0),
            limit,
        }
    }

    /// Reserves `n` bytes, or fails with ENOSPC when the limit would be exceeded.
    pub fn reserve(&self, n: u64) -> Result<()> {
        let Some(limit) = self.limit else {
            self.used.fetch_add(n, Ordering::AcqRel);
            return Ok(());
        };
        // Commit only if it fits, so concurrent reservations never fail for each other.
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                cur.checked_add(n).filter(|&total| total <= limit)
            })
            .map(|_| ())
            .map_err(|_| {
                Error::io(
                    format!("the fleecing limit of {limit} bytes is reached"),
                    std::io::Error::from_raw_os_error(libc::ENOSPC),
                )
            })
    }

    /// Gives back `n` reserved bytes (a failed copy, or a discard).
    pub fn release(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes currently held.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// Why and when an access broke.
#[derive(Clone, Debug)]
pub struct Broken {
    /// One-line reason.
    pub reason: String,
    /// When it happened.
    pub at: SystemTime,
}

/// Whether an access is broken, shared by all its devices: a backup of several devices
/// succeeds or fails as one, so a failed copy on any device breaks every snapshot of it
/// (and stops copy-before-write everywhere, which would only fill fleecing space).
#[derive(Debug, Default)]
pub struct Breaker {
    is_broken: AtomicBool,
    broken: OnceLock<Broken>,
}

impl Breaker {
    /// Marks the access broken (the first reason wins). Must happen before a live write
    /// that skipped its copy reaches the source.
    pub fn break_with(&self, reason: String) {
        let first = self
            .broken
            .set(Broken {
                reason: reason.clone(),
                at: SystemTime::now(),
            })
            .is_ok();
        self.is_broken.store(true, Ordering::SeqCst);
        if first {
            log::error!("backup access broken, snapshot reads now fail with EIO: {reason}");
        }
    }

    /// Whether it is broken.
    pub fn is_broken(&self) -> bool {
        self.is_broken.load(Ordering::SeqCst)
    }

    /// Why it broke, if it did.
    pub fn broken(&self) -> Option<&Broken> {
        if self.is_broken() {
            self.broken.get()
        } else {
            None
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The job queue of the pool. Plain mutex and condition variable: waiters park at once
/// (a spinning channel would take CPU from the copy it waits for).
#[derive(Default)]
struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
}

/// Threads that run copies for writers that wait with a timeout.
pub struct CopyPool {
    queue: Arc<Queue>,
}

/// The result of one job, handed from the pool thread to the waiting writer.
type Slot = Arc<(Mutex<Option<Result<()>>>, Condvar)>;

impl CopyPool {
    /// A pool of `threads` threads.
    pub fn new(threads: usize) -> std::io::Result<CopyPool> {
        let queue = Arc::new(Queue::default());
        for i in 0..threads.max(1) {
            let q = queue.clone();
            std::thread::Builder::new()
                .name(format!("cbw-copy-{i}"))
                .spawn(move || loop {
                    let job = {
                        let mut jobs = q.jobs.lock().recover();
                        loop {
                            if let Some(job) = jobs.pop_front() {
                                break job;
                            }
                            jobs = q.ready.wait(jobs).recover();
                        }
                    };
                    job();
                })?;
        }
        Ok(CopyPool { queue })
    }

    /// Runs `f` on the pool and waits at most `timeout` for its result.
    pub fn run<F>(&self, timeout: Duration, f: F) -> Result<()>
    where
        F: FnOnce() -> Result<()> + Send + 'static,
    {
        let slot: Slot = Arc::new((Mutex::new(None), Condvar::new()));
        let theirs = slot.clone();
        self.queue
            .jobs
            .lock()
            .recover()
            .push_back(Box::new(move || {
                let r = f();
                *theirs.0.lock().recover() = Some(r);
                theirs.1.notify_one();
            }));
        self.queue.ready.notify_one();
        let deadline = Instant::now() + timeout;
        let mut done = slot.0.lock().recover();
        loop {
            if let Some(r) = done.take() {
                return r;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::new(
                    Kind::TimedOut,
                    format!(
                        "copy-before-write took longer than the {}s timeout",
                        timeout.as_secs_f64()
                    ),
                ));
            }
            done = slot.1.wait_timeout(done, deadline - now).recover().0;
        }
    }
}

/// Test-only fault injection (cargo feature `fault-injection`):
/// `FLEECEFS_FAULT_FLEECE_READ=delay=MILLISECONDS` makes every snapshot read from a
/// fleecing file sleep first. Without the feature this is a no-op.
pub fn inject_fleece_read_fault() {
    #[cfg(feature = "fault-injection")]
    if let Some(ms) = std::env::var("FLEECEFS_FAULT_FLEECE_READ")
        .ok()
        .and_then(|v| v.strip_prefix("delay=")?.parse().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Test-only fault injection (cargo feature `fault-injection`): the environment variable
/// `FLEECEFS_FAULT_CBW` makes every copy-before-write sleep (`delay=MILLISECONDS`) or
/// fail with EIO (`eio`). Without the feature this is a no-op.
pub fn inject_copy_fault() -> Result<()> {
    #[cfg(feature = "fault-injection")]
    {
        if let Ok(v) = std::env::var("FLEECEFS_FAULT_CBW") {
            if let Some(ms) = v.strip_prefix("delay=").and_then(|m| m.parse().ok()) {
                std::thread::sleep(Duration::from_millis(ms));
            } else if v == "eio" {
                return Err(Error::io(
                    "injected copy-before-write fault",
                    std::io::Error::from_raw_os_error(libc::EIO),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_limits_and_releases() {
        let b = FleecingBudget::new(Some(100));
        b.reserve(60).unwrap();
        let e = b.reserve(50).unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC);
        assert_eq!(b.used(), 60);
        b.release(30);
        b.reserve(50).unwrap();
        assert_eq!(b.used(), 80);
    }

    #[test]
    fn pool_times_out_without_waiting_for_the_job() {
        let pool = CopyPool::new(1).unwrap();
        let start = std::time::Instant::now();
        let e = pool
            .run(Duration::from_millis(50), || {
                std::thread::sleep(Duration::from_millis(500));
                Ok(())
            })
            .unwrap_err();
        assert_eq!(e.errno(), libc::ETIMEDOUT);
        assert!(start.elapsed() < Duration::from_millis(400));
        pool.run(Duration::from_secs(5), || Ok(())).unwrap();
    }
}

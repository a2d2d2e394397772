//! Guest first: backup reads on a small pool of low-priority threads (issue 15).
//!
//! The FUSE workers serve the guest (the VM writing and reading `live/NAME`) and the
//! backup (reading `snapshot/NAME` and `NAME.dirty`) alike. A backup tool that streams
//! the snapshot as fast as it can keeps workers and CPUs busy with 1 MiB copies that the
//! guest's small requests then wait behind. With `--backup-priority low` (the default)
//! a worker hands every snapshot and dirty-map read to this pool and goes back to
//! `/dev/fuse` at once; a pool thread reads and replies itself (a fuser reply may be sent
//! from any thread).
//!
//! Pool threads run at `SCHED_IDLE` with the lowest best-effort I/O priority: they get
//! CPU time that the guest's threads (FUSE workers, copy-before-write, flushers, the VM
//! itself) do not want, so with no guest I/O the backup reads at full speed
//! (work-conserving, no rate cap), and under guest load it gets what is left. With
//! `--backup-share PERCENT` they run at normal CPU priority instead and pace themselves
//! while the guest is active (a live request within the last 20 ms): together they use
//! at most that share of one CPU then (counted in thread CPU time), and no pause
//! otherwise. Idle priority protects the guest best but can starve a backup on a busy
//! host; the share is a floor as well as a cap (measured in docs/performance.md,
//! session 6). The whole cost of a snapshot read is in the pool thread: the `pread`s of
//! source and fleecing file, and the kernel's copy of the reply into the reader's
//! buffer (done by the `write` to `/dev/fuse`).
//!
//! Why this cannot hold up the guest through a lock: a snapshot read holds no lock while
//! it reads; it takes the device gate and one stripe shared only to check a few bits
//! afterwards (`Device::read_snapshot`). Discards, which take stripes exclusively, stay
//! on the FUSE workers. Copy-before-write for a guest write runs in the worker that serves
//! the write, at the guest's priority, and so do the write-behind flushers that the guest
//! waits for when the buffer is full.
//!
//! The queue is not bounded here: the kernel bounds the requests in flight (each is a
//! caller blocked in `read(2)`, or one of at most `max_background` asynchronous ones),
//! and a queued request holds no buffer (a pool thread has one read buffer).

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sys;

/// Where snapshot and dirty-map reads run (`mount --backup-priority`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackupPriority {
    /// On the backup pool, below the guest (SCHED_IDLE, or paced to `--backup-share`;
    /// best-effort I/O level 7).
    Low,
    /// On the FUSE workers, like every other request.
    Normal,
}

/// Threads of the backup pool: enough for a few parallel backup streams; idle ones cost
/// nothing.
pub const POOL_THREADS: usize = 4;

/// One backup read: runs on a pool thread and replies itself.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    pacer: Option<Pacer>,
}

/// The guest counts as active for this long after its last request.
const GUEST_WINDOW: Duration = Duration::from_millis(20);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// When the guest (a live request) was last seen, in ns since [`epoch`]; 0: never.
static GUEST_SEEN: AtomicU64 = AtomicU64::new(0);

/// Records a guest request (called by the FUSE workers for live files).
pub fn note_guest() {
    let ns = epoch().elapsed().as_nanos() as u64;
    // Coarse: at most one store per 100 µs, so the workers do not fight over the line.
    if ns.saturating_sub(GUEST_SEEN.load(Ordering::Relaxed)) > 100_000 {
        GUEST_SEEN.store(ns.max(1), Ordering::Relaxed);
    }
}

fn guest_active() -> bool {
    let seen = GUEST_SEEN.load(Ordering::Relaxed);
    let now = epoch().elapsed().as_nanos() as u64;
    seen != 0 && now.saturating_sub(seen) < GUEST_WINDOW.as_nanos() as u64
}

/// Paces backup reads while the guest is active: after a read that used `c` of CPU time,
/// the next may start only `c * (1 - share) / share` later, so the pool's threads
/// together use at most `share` of one CPU; with no guest request for [`GUEST_WINDOW`],
/// no pause (work-conserving).
struct Pacer {
    share: f64,
    not_before: Mutex<Instant>,
}

impl Pacer {
    fn wait(&self) {
        if !guest_active() {
            return;
        }
        let until = *self.not_before.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if until > now {
            std::thread::sleep(until - now);
        }
    }

    fn account(&self, busy: Duration) {
        if !guest_active() {
            return;
        }
        let mut nb = self.not_before.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        *nb = (*nb).max(now) + busy.mul_f64((1.0 - self.share) / self.share);
    }
}

/// The backup pool: `backup-read-0..N-1` threads at idle priority.
pub struct BackupPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl BackupPool {
    /// Starts `n` threads. A thread that cannot lower its priority logs it once and
    /// serves at normal priority (the reads are the same; only the guest's share of the
    /// CPUs is not protected).
    pub fn start(n: usize, share_percent: Option<u8>) -> io::Result<BackupPool> {
        let share = share_percent.map(|p| f64::from(p.clamp(1, 100)) / 100.0);
        let idle = share.is_none();
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            pacer: share.filter(|s| *s < 1.0).map(|share| Pacer {
                share,
                not_before: Mutex::new(Instant::now()),
            }),
        });
        let mut pool = BackupPool {
            shared,
            threads: Vec::new(),
        };
        for i in 0..n.max(1) {
            let shared = pool.shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("backup-read-{i}"))
                .spawn(move || {
                    lower_priority(i, idle);
                    worker(&shared)
                })?;
            pool.threads.push(t);
        }
        Ok(pool)
    }

    /// Queues `job` for a pool thread. After [`BackupPool::close`] the job runs in the
    /// caller instead (nothing is dropped unanswered).
    pub fn submit(&self, job: Job) {
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.closed {
            drop(q);
            return job();
        }
        q.jobs.push_back(job);
        drop(q);
        self.shared.ready.notify_one();
    }

    /// Lets the threads finish the queued jobs and exit; waits for them.
    pub fn close(&mut self) {
        {
            let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.closed = true;
        }
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for BackupPool {
    fn drop(&mut self) {
        self.close();
    }
}

fn lower_priority(i: usize, idle: bool) {
    // Only the first thread logs: the others fail the same way.
    if idle {
        if let Err(e) = sys::set_thread_sched_idle() {
            if i == 0 {
                log::warn!("backup reads run at normal CPU priority: SCHED_IDLE refused: {e}");
            }
        }
    }
    if let Err(e) = sys::set_thread_ioprio_best_effort(sys::IOPRIO_BE_LOWEST) {
        if i == 0 {
            log::warn!("backup reads run at normal I/O priority: ioprio_set refused: {e}");
        }
    }
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(j) = q.jobs.pop_front() {
                    break j;
                }
                if q.closed {
                    return;
                }
                q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        match &shared.pacer {
            Some(p) => {
                p.wait();
                let start = sys::thread_cpu_time();
                job();
                p.account(sys::thread_cpu_time().saturating_sub(start));
            }
            None => job(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_every_job_and_close_drains_the_queue() {
        let mut pool = BackupPool::start(2, Some(100)).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..100 {
            let done = done.clone();
            pool.submit(Box::new(move || {
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        pool.close();
        assert_eq!(done.load(Ordering::SeqCst), 100);
        // closed: runs in the caller
        let d = done.clone();
        pool.submit(Box::new(move || {
            d.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(done.load(Ordering::SeqCst), 101);
    }

    #[test]
    fn pool_threads_run_at_idle_or_paced_normal_cpu_and_lowest_io_priority() {
        for (share, want) in [(None, libc::SCHED_IDLE), (Some(45), libc::SCHED_OTHER)] {
            let pool = BackupPool::start(1, share).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            pool.submit(Box::new(move || {
                // SAFETY: sched_getscheduler(0) reads the calling thread's policy.
                let policy = unsafe { libc::sched_getscheduler(0) };
                // SAFETY: ioprio_get(IOPRIO_WHO_PROCESS, 0) reads the calling thread's.
                let prio = unsafe { libc::syscall(libc::SYS_ioprio_get, 1, 0) };
                let name = std::thread::current().name().map(str::to_string);
                let _ = tx.send((policy, prio, name));
            }));
            let (policy, prio, name) = rx.recv().unwrap();
            assert_eq!(policy, want);
            assert_eq!(prio, (2 << 13) | 7);
            assert_eq!(name.as_deref(), Some("backup-read-0"));
        }
    }

    /// Runs 10 jobs that each burn 5 ms of CPU on a pool with a 10% share; returns the
    /// wall time until the last one ended.
    fn ten_busy_jobs() -> Duration {
        let mut pool = BackupPool::start(1, Some(10)).unwrap();
        let start = Instant::now();
        for _ in 0..10 {
            pool.submit(Box::new(|| {
                let t = sys::thread_cpu_time();
                while sys::thread_cpu_time() - t < Duration::from_millis(5) {}
            }));
        }
        pool.close();
        start.elapsed()
    }

    #[test]
    fn pacing_only_while_the_guest_is_active() {
        // No guest request yet (nothing else in this test binary notes one): full speed.
        let idle = ten_busy_jobs();
        // A guest request every millisecond: each 5 ms job is followed by a 45 ms pause.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guest = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    note_guest();
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(5));
        let paced = ten_busy_jobs();
        stop.store(true, Ordering::Relaxed);
        guest.join().unwrap();
        assert!(idle < Duration::from_millis(300), "unpaced: {idle:?}");
        // 50 ms of CPU and 9 pauses of at least 45 ms.
        assert!(paced >= Duration::from_millis(450), "paced: {paced:?}");
    }
}

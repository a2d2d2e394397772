//! Backup scheduling: backup reads on a small pool of low-priority threads, below the
//! guest. Frontend-neutral: each frontend (the FUSE adapter, the NBD export) holds the
//! mount's [`BackupScheduler`], hands it every backup read
//! ([`BackupScheduler::run_backup_read`]) and notes every guest request
//! ([`BackupScheduler::note_guest`]); `guest.rs` keeps the guest's activity, `pacer.rs`
//! the pacing and the `--backup-share auto` controller.
//!
//! The FUSE workers serve the guest (the VM writing and reading `live/NAME`) and the
//! backup (reading `snapshot/NAME` and `NAME.dirty`) alike. A backup tool that streams
//! the snapshot as fast as it can keeps workers and CPUs busy with 1 MiB copies that the
//! guest's small requests then wait behind. With `--backup-priority low`
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
//! host; the share is a floor as well as a cap (measured in docs/performance.md, "Guest
//! first"). With `--backup-share auto` the share follows the guest: a controller thread
//! raises it while the guest keeps its request rate against short probes with
//! the backup paused, and cuts it when the guest does not (`pacer::control_share`).
//! One scheduler serves a mount: every frontend that serves the guest or a backup holds
//! the same one, so backup reads of any frontend yield to guest requests of any other.
//! The whole cost of a snapshot read is in the pool thread: the `pread`s of source and
//! fleecing file, and the kernel's copy of the reply into the reader's
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

mod guest;
mod pacer;

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::sync::Recover;
use crate::sys;
use guest::GuestMeter;
pub use pacer::AUTO_TARGET;
use pacer::{Clock, Pacer};

/// Where snapshot and dirty-map reads run (`mount --backup-priority`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum BackupPriority {
    /// On the backup pool, below the guest (SCHED_IDLE, or paced to `--backup-share`;
    /// best-effort I/O level 7).
    Low,
    /// On the frontend's own threads (the FUSE workers), like every other request.
    Normal,
}

/// Threads of the backup pool: enough for a few parallel backup streams; idle ones cost
/// nothing.
pub const POOL_THREADS: usize = 4;

/// How the pool is paced while the guest is active (`--backup-share`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BackupShare {
    /// At most this many percent of one CPU (1-100; 100: no pacing).
    Percent(u8),
    /// A share that adapts to keep the guest's request rate at [`AUTO_TARGET`] of what
    /// it is while the backup pauses.
    Auto,
}

/// Parses `--backup-share`: `auto`, or a percentage of one CPU, 1-100.
pub fn parse_backup_share(s: &str) -> Result<BackupShare, String> {
    if s == "auto" {
        return Ok(BackupShare::Auto);
    }
    match s.parse::<u8>() {
        Ok(p) if (1..=100).contains(&p) => Ok(BackupShare::Percent(p)),
        _ => Err(format!(
            "'{s}' is not 'auto' or a percentage of one CPU from 1 to 100"
        )),
    }
}

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
    guest: GuestMeter,
    pacer: Option<Pacer>,
    /// Set by `close`: the controller thread (`--backup-share auto`) exits.
    stop: AtomicBool,
}

/// The backup scheduling of one mount, held (in an `Arc`) by each of its frontends.
/// With `--backup-priority low`, a pool of `backup-read-0..N-1` threads below the guest;
/// with `normal`, none: backup reads run in the caller and guest requests are not
/// counted.
pub struct BackupScheduler {
    shared: Option<Arc<Shared>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for BackupScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupScheduler")
            .field("pool", &self.shared.is_some())
            .finish()
    }
}

impl BackupScheduler {
    /// The scheduling `--backup-priority` and `--backup-share` ask for: for `Low`, a
    /// pool of [`POOL_THREADS`] threads (see [`BackupScheduler::with_pool`]).
    pub fn start(
        priority: BackupPriority,
        share: Option<BackupShare>,
    ) -> io::Result<BackupScheduler> {
        match priority {
            BackupPriority::Low => BackupScheduler::with_pool(POOL_THREADS, share),
            BackupPriority::Normal => Ok(BackupScheduler::inline()),
        }
    }

    /// No pool: backup reads run in the caller.
    pub fn inline() -> BackupScheduler {
        BackupScheduler {
            shared: None,
            threads: Mutex::new(Vec::new()),
        }
    }

    /// A pool of `n` threads (and, with `auto`, the controller). A thread that cannot
    /// lower its priority logs it once and serves at normal priority (the reads are the
    /// same; only the guest's share of the CPUs is not protected).
    pub fn with_pool(n: usize, share: Option<BackupShare>) -> io::Result<BackupScheduler> {
        let idle = share.is_none();
        let pacer = match share {
            None | Some(BackupShare::Percent(100..)) => None,
            Some(BackupShare::Percent(p)) => Some(Pacer::new(f64::from(p.max(1)) / 100.0)),
            Some(BackupShare::Auto) => Some(Pacer::new(pacer::AUTO_START)),
        };
        let auto = share == Some(BackupShare::Auto);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            guest: GuestMeter::new(auto),
            pacer,
            stop: AtomicBool::new(false),
        });
        let sched = BackupScheduler {
            shared: Some(shared.clone()),
            threads: Mutex::new(Vec::new()),
        };
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let shared = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("backup-read-{i}"))
                .spawn(move || {
                    lower_priority(i, idle);
                    worker(&shared)
                });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    *sched.threads.lock().recover() = threads;
                    return Err(e); // dropping `sched` stops the threads started
                }
            }
        }
        if auto {
            let shared = shared.clone();
            let t = std::thread::Builder::new()
                .name("backup-pacer".into())
                .spawn(move || {
                    if let Some(p) = &shared.pacer {
                        let clock = Clock {
                            guest: &shared.guest,
                            stop: &shared.stop,
                        };
                        pacer::control_share(p, &clock)
                    }
                });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    *sched.threads.lock().recover() = threads;
                    return Err(e);
                }
            }
        }
        *sched.threads.lock().recover() = threads;
        Ok(sched)
    }

    /// Whether backup reads run on a pool (`--backup-priority low`).
    pub fn pooled(&self) -> bool {
        self.shared.is_some()
    }

    /// Records a guest request (a frontend calls this for every read or write of a
    /// live device). Costs a load and, now and then, a store.
    pub fn note_guest(&self) {
        if let Some(s) = &self.shared {
            s.guest.note();
        }
    }

    /// Guest requests the frontends noted, counted only while `--backup-share auto`
    /// steers by them (0 otherwise).
    pub fn guest_requests(&self) -> u64 {
        self.shared.as_ref().map_or(0, |s| s.guest.requests())
    }

    /// Runs `read` (a backup read that replies itself) below the guest: queued for a
    /// pool thread; in the caller without a pool, or after [`BackupScheduler::close`]
    /// (nothing is dropped unanswered).
    pub fn run_backup_read(&self, read: impl FnOnce() + Send + 'static) {
        match &self.shared {
            Some(s) => submit(s, Box::new(read)),
            None => read(),
        }
    }

    /// Lets the pool threads finish the queued reads and exit; waits for them.
    pub fn close(&self) {
        let Some(shared) = &self.shared else { return };
        shared.queue.lock().recover().closed = true;
        shared.stop.store(true, Ordering::Relaxed);
        shared.ready.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().recover());
        for t in threads {
            let _ = t.join();
        }
    }

    #[cfg(test)]
    fn pacer(&self) -> Option<&Pacer> {
        self.shared.as_ref().and_then(|s| s.pacer.as_ref())
    }
}

impl Drop for BackupScheduler {
    fn drop(&mut self) {
        self.close();
    }
}

fn submit(shared: &Shared, job: Job) {
    let mut q = shared.queue.lock().recover();
    if q.closed {
        drop(q);
        return job();
    }
    q.jobs.push_back(job);
    drop(q);
    shared.ready.notify_one();
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
            let mut q = shared.queue.lock().recover();
            loop {
                if let Some(j) = q.jobs.pop_front() {
                    break j;
                }
                if q.closed {
                    return;
                }
                q = shared.ready.wait(q).recover();
            }
        };
        match &shared.pacer {
            Some(p) => {
                p.wait(&shared.guest);
                let start = sys::thread_cpu_time();
                job();
                p.account(sys::thread_cpu_time().saturating_sub(start), &shared.guest);
            }
            None => job(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[test]
    fn runs_every_job_and_close_drains_the_queue() {
        let pool = BackupScheduler::with_pool(2, Some(BackupShare::Percent(100))).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..100 {
            let done = done.clone();
            pool.run_backup_read(move || {
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        pool.close();
        assert_eq!(done.load(Ordering::SeqCst), 100);
        // closed: runs in the caller
        let d = done.clone();
        pool.run_backup_read(move || {
            d.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(done.load(Ordering::SeqCst), 101);
    }

    #[test]
    fn without_a_pool_reads_run_in_the_caller() {
        let sched = BackupScheduler::start(BackupPriority::Normal, None).unwrap();
        assert!(!sched.pooled());
        let me = std::thread::current().id();
        let (tx, rx) = std::sync::mpsc::channel();
        sched.note_guest();
        sched.run_backup_read(move || {
            let _ = tx.send(std::thread::current().id());
        });
        assert_eq!(rx.try_recv().ok(), Some(me));
    }

    #[test]
    fn pool_threads_run_at_idle_or_paced_normal_cpu_and_lowest_io_priority() {
        for (share, want) in [
            (None, libc::SCHED_IDLE),
            (Some(BackupShare::Percent(45)), libc::SCHED_OTHER),
            (Some(BackupShare::Auto), libc::SCHED_OTHER),
        ] {
            let pool = BackupScheduler::with_pool(1, share).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            pool.run_backup_read(move || {
                // SAFETY: sched_getscheduler(0) reads the calling thread's policy.
                let policy = unsafe { libc::sched_getscheduler(0) };
                // SAFETY: ioprio_get(IOPRIO_WHO_PROCESS, 0) reads the calling thread's.
                let prio = unsafe { libc::syscall(libc::SYS_ioprio_get, 1, 0) };
                let name = std::thread::current().name().map(str::to_string);
                let _ = tx.send((policy, prio, name));
            });
            let (policy, prio, name) = rx.recv().unwrap();
            assert_eq!(policy, want);
            assert_eq!(prio, (2 << 13) | 7);
            assert_eq!(name.as_deref(), Some("backup-read-0"));
        }
    }

    /// Runs 10 jobs that each burn 5 ms of CPU on a pool with a 10% share while `guest`
    /// notes a request every millisecond (if set); returns the time the pool paused.
    fn pause_of_ten_busy_jobs(guest: bool) -> Duration {
        let pool = Arc::new(BackupScheduler::with_pool(1, Some(BackupShare::Percent(10))).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let noter = guest.then(|| {
            let (stop, pool) = (stop.clone(), pool.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    pool.note_guest();
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        });
        if guest {
            std::thread::sleep(Duration::from_millis(5));
        }
        for _ in 0..10 {
            pool.run_backup_read(|| {
                let t = sys::thread_cpu_time();
                while sys::thread_cpu_time() - t < Duration::from_millis(5) {}
            });
        }
        pool.close();
        stop.store(true, Ordering::Relaxed);
        if let Some(n) = noter {
            n.join().unwrap();
        }
        pool.pacer().unwrap().paused()
    }

    /// Counted as pauses, not wall time, so a loaded machine slows neither claim: with
    /// no guest there is no pause at all; with a guest each 5 ms of CPU earns a 45 ms
    /// pause (9 of them, 405 ms; half of that is required, for a guest thread that a
    /// busy machine does not wake every millisecond and so is not always "active").
    #[test]
    fn pacing_only_while_the_guest_is_active() {
        let idle = pause_of_ten_busy_jobs(false);
        assert!(idle < Duration::from_millis(5), "unpaced: {idle:?}");
        let paced = pause_of_ten_busy_jobs(true);
        assert!(paced >= Duration::from_millis(200), "paced: {paced:?}");
    }

    #[test]
    fn backup_share_parses_auto_and_percentages() {
        assert_eq!(parse_backup_share("auto"), Ok(BackupShare::Auto));
        assert_eq!(parse_backup_share("1"), Ok(BackupShare::Percent(1)));
        assert_eq!(parse_backup_share("100"), Ok(BackupShare::Percent(100)));
        for bad in ["0", "101", "-5", "", "Auto", "50%"] {
            let e = parse_backup_share(bad).unwrap_err();
            assert!(e.contains("'auto' or a percentage"), "{bad}: {e}");
        }
    }

    /// The controller thread of `auto` runs on the real clock: with an active guest it
    /// probes (a probe every 360 ms; 5 s is plenty on a loaded machine), and it stops
    /// when the scheduler closes.
    #[test]
    fn auto_share_probes_an_active_guest_and_stops_on_close() {
        let pool = Arc::new(BackupScheduler::with_pool(1, Some(BackupShare::Auto)).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let noter = {
            let (stop, pool) = (stop.clone(), pool.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    pool.note_guest();
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while pool.pacer().unwrap().probes() == 0 && std::time::Instant::now() < deadline {
            pool.run_backup_read(|| {
                let t = sys::thread_cpu_time();
                while sys::thread_cpu_time() - t < Duration::from_millis(1) {}
            });
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        noter.join().unwrap();
        assert!(pool.pacer().unwrap().probes() > 0, "no probe in 20 s");
        pool.close();
    }
}

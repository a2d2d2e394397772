//! Guest first: backup reads on a small pool of low-priority threads.
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
//! host; the share is a floor as well as a cap (measured in docs/performance.md,
//! "Guest first"). With `--backup-share auto` the share follows the guest: a controller
//! thread raises it while the guest keeps its request rate against short probes with
//! the backup paused, and cuts it when the guest does not (`control_share`).
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

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// How the pool is paced while the guest is active (`--backup-share`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupShare {
    /// At most this many percent of one CPU (1-100; 100: no pacing).
    Percent(u8),
    /// A share that adapts to keep the guest's request rate at [`AUTO_TARGET`] of what
    /// it is while the backup pauses (see `control_share`).
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
    pacer: Option<Pacer>,
    /// Set by `close`: the controller thread (`--backup-share auto`) exits.
    stop: AtomicBool,
}

/// The guest counts as active for this long after its last request.
const GUEST_WINDOW: Duration = Duration::from_millis(20);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// When the guest (a live request) was last seen, in ns since [`epoch`]; 0: never.
static GUEST_SEEN: AtomicU64 = AtomicU64::new(0);
/// Guest requests seen so far (the rate `--backup-share auto` steers by), counted only
/// while a controller runs (`COUNT_GUEST`): otherwise the hot path pays a load, not an
/// increment of a line every worker shares.
static GUEST_REQUESTS: AtomicU64 = AtomicU64::new(0);
static COUNT_GUEST: AtomicBool = AtomicBool::new(false);

/// Records a guest request (called by the FUSE workers for live files).
pub fn note_guest() {
    if COUNT_GUEST.load(Ordering::Relaxed) {
        GUEST_REQUESTS.fetch_add(1, Ordering::Relaxed);
    }
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
/// no pause (work-conserving). With `--backup-share auto`, [`control_share`] sets the
/// share and pauses the pool for its probes.
struct Pacer {
    /// The share of one CPU, in millionths (1,000,000 and more: no pacing).
    share_ppm: AtomicU64,
    not_before: Mutex<Instant>,
    /// Set during a probe of the controller: no backup read starts.
    probing: AtomicBool,
    /// CPU time the pool's reads used, in ns (the controller's "did the backup read").
    busy_ns: AtomicU64,
}

const PPM: u64 = 1_000_000;

impl Pacer {
    fn new(share: f64) -> Pacer {
        Pacer {
            share_ppm: AtomicU64::new(share_to_ppm(share)),
            not_before: Mutex::new(Instant::now()),
            probing: AtomicBool::new(false),
            busy_ns: AtomicU64::new(0),
        }
    }

    fn share(&self) -> f64 {
        self.share_ppm.load(Ordering::Relaxed) as f64 / PPM as f64
    }

    fn wait(&self) {
        while self.probing.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if !guest_active() || self.share() >= 1.0 {
            return;
        }
        let until = *self.not_before.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if until > now {
            std::thread::sleep(until - now);
        }
    }

    fn account(&self, busy: Duration) {
        self.busy_ns
            .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
        let share = self.share();
        if !guest_active() || share >= 1.0 {
            return;
        }
        let mut nb = self.not_before.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        *nb = (*nb).max(now) + busy.mul_f64((1.0 - share) / share);
    }
}

fn share_to_ppm(share: f64) -> u64 {
    (share * PPM as f64).round() as u64
}

/// `--backup-share auto`: the guest should keep this share of the request rate it has
/// while the backup pauses. The goal is 80% of the guest's rate without any
/// access; at 0.85 the guest kept 71-84% of that in three runs, at 0.92 78-93% in
/// eight of nine and 63% in one (docs/performance.md, "Guest first"): the probes see a
/// guest that already pays for the access's copies, and AIMD runs below its target on
/// average.
pub const AUTO_TARGET: f64 = 0.92;
/// The share the controller starts from, and its floor: a backup always progresses.
const AUTO_START: f64 = 0.25;
const AUTO_MIN: f64 = 0.05;
/// Additive increase per period when the guest keeps its rate; multiplicative decrease.
const AUTO_STEP: f64 = 0.05;
const AUTO_CUT: f64 = 0.7;
/// A period: settle, measure the guest with the backup reading, settle, measure it with
/// the backup paused (the probe). The probes take the backup 50 of 360 ms while the
/// guest is active, none otherwise.
const SETTLE: Duration = Duration::from_millis(10);
const LOADED: Duration = Duration::from_millis(300);
const PROBE: Duration = Duration::from_millis(40);

/// The next share from one period's measurement: the guest's request rate while the
/// backup read (`loaded`) and while it paused (`free`), and whether the pool read at
/// all. Additive increase while the guest keeps [`AUTO_TARGET`] of its free rate,
/// multiplicative decrease when it does not (AIMD, as TCP shares a link).
fn next_share(share: f64, loaded: f64, free: f64, pool_read: bool) -> f64 {
    if !pool_read || free <= 0.0 {
        return share; // nothing learned
    }
    if loaded < AUTO_TARGET * free {
        (share.min(1.0) * AUTO_CUT).max(AUTO_MIN)
    } else {
        (share + AUTO_STEP).min(1.0)
    }
}

/// `--backup-share auto`: a thread (`backup-pacer`) that measures the guest's request
/// rate with the backup reading and, for a short probe, with the backup paused, and
/// steers the pool's share by [`next_share`]. Latency inside the daemon is not a usable
/// signal here: the guest's requests wait in the kernel's queue and for a CPU, which the
/// daemon does not see; the rate it keeps is the goal itself. While the guest is idle
/// there is no probe and no pacing (work-conserving).
fn control_share(shared: &Shared) {
    let Some(pacer) = &shared.pacer else { return };
    let sleep = |d: Duration| -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if shared.stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(
                end.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(10)),
            );
        }
        !shared.stop.load(Ordering::Relaxed)
    };
    let rate_over = |d: Duration| -> Option<f64> {
        let (r0, t0) = (GUEST_REQUESTS.load(Ordering::Relaxed), Instant::now());
        if !sleep(d) {
            return None;
        }
        let n = GUEST_REQUESTS.load(Ordering::Relaxed) - r0;
        Some(n as f64 / t0.elapsed().as_secs_f64())
    };
    loop {
        if !sleep(SETTLE) {
            return;
        }
        let busy0 = pacer.busy_ns.load(Ordering::Relaxed);
        let Some(loaded) = rate_over(LOADED) else {
            return;
        };
        let pool_read = pacer.busy_ns.load(Ordering::Relaxed) > busy0;
        if !guest_active() {
            // Idle guest: nothing to protect, nothing to probe.
            continue;
        }
        pacer.probing.store(true, Ordering::Relaxed);
        let free = if sleep(SETTLE) {
            rate_over(PROBE)
        } else {
            None
        };
        pacer.probing.store(false, Ordering::Relaxed);
        let Some(free) = free else {
            return;
        };
        let share = pacer.share();
        let next = next_share(share, loaded, free, pool_read);
        if next != share {
            log::debug!(
                "backup share {:.0}% -> {:.0}%: guest {loaded:.0}/s reading, {free:.0}/s paused",
                share * 100.0,
                next * 100.0
            );
        }
        pacer.share_ppm.store(share_to_ppm(next), Ordering::Relaxed);
    }
}

/// The backup pool: `backup-read-0..N-1` threads at idle priority.
pub struct BackupPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl BackupPool {
    /// Starts `n` threads (and, with `auto`, the controller). A thread that cannot lower
    /// its priority logs it once and serves at normal priority (the reads are the same;
    /// only the guest's share of the CPUs is not protected).
    pub fn start(n: usize, share: Option<BackupShare>) -> io::Result<BackupPool> {
        let idle = share.is_none();
        let pacer = match share {
            None | Some(BackupShare::Percent(100..)) => None,
            Some(BackupShare::Percent(p)) => Some(Pacer::new(f64::from(p.max(1)) / 100.0)),
            Some(BackupShare::Auto) => Some(Pacer::new(AUTO_START)),
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            pacer,
            stop: AtomicBool::new(false),
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
        if share == Some(BackupShare::Auto) {
            COUNT_GUEST.store(true, Ordering::Relaxed);
            let shared = pool.shared.clone();
            let t = std::thread::Builder::new()
                .name("backup-pacer".into())
                .spawn(move || control_share(&shared))?;
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
        self.shared.stop.store(true, Ordering::Relaxed);
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
        let mut pool = BackupPool::start(2, Some(BackupShare::Percent(100))).unwrap();
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
        for (share, want) in [
            (None, libc::SCHED_IDLE),
            (Some(BackupShare::Percent(45)), libc::SCHED_OTHER),
            (Some(BackupShare::Auto), libc::SCHED_OTHER),
        ] {
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
        let mut pool = BackupPool::start(1, Some(BackupShare::Percent(10))).unwrap();
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

    /// Tests that note guest requests (global state) run one at a time.
    static GUEST_TESTS: Mutex<()> = Mutex::new(());

    #[test]
    fn pacing_only_while_the_guest_is_active() {
        let _one = GUEST_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        std::thread::sleep(GUEST_WINDOW * 2); // a guest of another test has gone quiet
                                              // No guest request now: full speed.
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

    #[test]
    fn auto_share_is_aimd_on_the_guest_rate() {
        let eq = |a: f64, b: f64| (a - b).abs() < 1e-9;
        // the guest keeps 95% of its free rate: a step up
        assert!(eq(next_share(0.25, 95.0, 100.0, true), 0.30));
        // it keeps 80%: cut by 30%
        assert!(eq(next_share(0.25, 80.0, 100.0, true), 0.175));
        // never below the floor, never above one CPU
        assert!(eq(next_share(0.06, 0.0, 100.0, true), AUTO_MIN));
        assert!(eq(next_share(0.98, 100.0, 100.0, true), 1.0));
        // unpaced (1.0) and the guest suffers: down from one CPU
        assert!(eq(next_share(1.0, 10.0, 100.0, true), 0.7));
        // the pool did not read, or the guest was idle during the probe: nothing learned
        assert!(eq(next_share(0.4, 10.0, 100.0, false), 0.4));
        assert!(eq(next_share(0.4, 0.0, 0.0, true), 0.4));
    }

    /// Runs a pool with `--backup-share auto` for `secs` seconds under a simulated guest
    /// that notes a request every 50 µs, every 100 µs while a backup read runs if
    /// `slowed`; returns the controller's mean and highest share over the second half
    /// (single periods are noisy: a probe of 40 ms sees a few hundred requests of this
    /// guest).
    fn auto_share_after(slowed: bool, secs: u64) -> (f64, f64) {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reading = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guest = {
            let (stop, reading) = (stop.clone(), reading.clone());
            std::thread::spawn(move || {
                // SAFETY: prctl(PR_SET_TIMERSLACK) on the calling thread: sleeps of
                // 50 µs stay close to 50 µs, so the guest's rate is steady.
                unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
                while !stop.load(Ordering::Relaxed) {
                    note_guest();
                    let gap = if slowed && reading.load(Ordering::Relaxed) {
                        100
                    } else {
                        50
                    };
                    std::thread::sleep(Duration::from_micros(gap));
                }
            })
        };
        let mut pool = BackupPool::start(1, Some(BackupShare::Auto)).unwrap();
        for _ in 0..20_000 {
            let (stop, reading) = (stop.clone(), reading.clone());
            pool.submit(Box::new(move || {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                reading.store(true, Ordering::Relaxed);
                let t = sys::thread_cpu_time();
                while sys::thread_cpu_time() - t < Duration::from_millis(2) {}
                reading.store(false, Ordering::Relaxed);
            }));
        }
        let pacer = pool.shared.pacer.as_ref().unwrap();
        assert!((pacer.share() - AUTO_START).abs() < 1e-6);
        std::thread::sleep(Duration::from_millis(secs * 500));
        let mut samples = Vec::new();
        while samples.len() < (secs * 10) as usize {
            samples.push(pacer.share());
            std::thread::sleep(Duration::from_millis(50));
        }
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        let max = samples.iter().copied().fold(0.0, f64::max);
        stop.store(true, Ordering::Relaxed);
        pool.close();
        guest.join().unwrap();
        (mean, max)
    }

    /// The controller finds the share at which the guest keeps [`AUTO_TARGET`] (92%) of
    /// its rate: with a guest that runs at half its rate while the backup reads, that
    /// means reading 16% of the time (1 - 0.5 s = 0.92), and the share oscillates about
    /// that (cut by 30%, raised by 5 points); with a guest the reads do not slow, it rises
    /// (its highest value at least two steps above the start: noise in the probes cuts it
    /// now and then, a controller that only cuts stays at or below the start).
    #[test]
    fn auto_share_settles_where_the_guest_keeps_its_target() {
        let _one = GUEST_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let (slowed, _) = auto_share_after(true, 6);
        assert!(
            (0.08..=0.3).contains(&slowed),
            "slowed guest: mean share {slowed}"
        );
        let (_, unaffected) = auto_share_after(false, 5);
        assert!(
            unaffected >= 0.35,
            "unaffected guest: highest share {unaffected}"
        );
    }
}

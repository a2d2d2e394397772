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
//! (work-conserving, no rate cap), and under guest load it gets what is left. The whole
//! cost of a snapshot read is in the pool thread: the `pread`s of source and fleecing
//! file, and the kernel's copy of the reply into the reader's buffer (done by the
//! `write` to `/dev/fuse`).
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
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::sys;

/// Where snapshot and dirty-map reads run (`mount --backup-priority`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackupPriority {
    /// On the backup pool, below the guest (SCHED_IDLE, best-effort I/O level 7).
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
    pub fn start(n: usize) -> io::Result<BackupPool> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
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
                    lower_priority(i);
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

fn lower_priority(i: usize) {
    // Only the first thread logs: the others fail the same way.
    if let Err(e) = sys::set_thread_sched_idle() {
        if i == 0 {
            log::warn!("backup reads run at normal CPU priority: SCHED_IDLE refused: {e}");
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
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_every_job_and_close_drains_the_queue() {
        let mut pool = BackupPool::start(2).unwrap();
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
    fn pool_threads_run_at_idle_cpu_and_lowest_io_priority() {
        let pool = BackupPool::start(1).unwrap();
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
        assert_eq!(policy, libc::SCHED_IDLE);
        assert_eq!(prio, (2 << 13) | 7);
        assert_eq!(name.as_deref(), Some("backup-read-0"));
    }
}

//! Write-behind of copy-before-write, used under `--on-cbw-error break-snapshot` (the
//! default) when `--cbw-buffer` is not 0.
//!
//! A live write that must copy a cluster first reads the cluster's old data from the
//! source into memory (a [`PendingCopy`]), publishes it in its access's `PendingMap`
//! and marks the cluster copied, all under the cluster's stripe lock; then it writes the
//! source and returns. Flusher threads store pending copies in the fleecing file later,
//! and only then remove them from the map. Snapshot reads of a copied cluster take the
//! data from the map while it is there and from the fleecing file otherwise, so they see
//! the point-in-time data at every moment (see `cbw/mod.rs`).
//!
//! What the writer waits for is memory, not the fleecing storage: the bytes pending or
//! being written are bounded by the buffer's capacity, and a writer that finds it full
//! waits (before taking any stripe lock) at most `--cbw-timeout`, then the access breaks;
//! so does a writer that finds its stripe lock held by a snapshot reader for that long.
//! A watchdog breaks the access too when one fleecing write takes longer than the
//! timeout, whether or not anybody waits for it. A failed fleecing write breaks the
//! access before its copy leaves the map, so no reader ever misses the old data silently.
//!
//! `break-guest-write` cannot use this: its writes must fail when the copy fails, and a
//! write-behind failure happens after the write has returned.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Kind, Result};
use crate::sync::Recover;

/// Default `--cbw-buffer`: 16 MiB, 256 clusters of 64 KiB.
pub const DEFAULT_CAPACITY: u64 = 16 << 20;

/// Old data of a run of clusters, read from the source before a live write changed it,
/// not yet (known to be) in the fleecing file.
pub struct PendingCopy {
    /// First cluster of the run.
    pub first: u64,
    /// Number of clusters.
    pub clusters: u64,
    /// Byte offset of the first cluster.
    pub offset: u64,
    /// The old data (the last cluster may be partial at the end of the device).
    pub data: Vec<u8>,
}

/// Where the buffer stores its copies: the device access they were copied for
/// (`DeviceAccess` implements this). The buffer knows the access only through this trait,
/// so it does not depend on the copy path that feeds it.
pub trait CopyTarget: Send + Sync {
    /// The device the access is of (for messages).
    fn device_name(&self) -> &str;
    /// Whether nothing of the access will be read again (broken or ended), so its
    /// copies need not be stored.
    fn stores_nothing(&self) -> bool;
    /// Stores `copy` in the fleecing file, then removes it from the pending map (a failed
    /// write breaks the access first).
    fn store_pending(&self, copy: &Arc<PendingCopy>);
    /// Removes `copy` from the pending map without storing it (its access is broken or
    /// ended).
    fn drop_pending(&self, copy: &Arc<PendingCopy>);
    /// Marks the access broken (all its devices).
    fn break_with(&self, reason: String);
}

/// One pending copy to store.
pub struct Job {
    access: Arc<dyn CopyTarget>,
    copy: Arc<PendingCopy>,
}

impl Job {
    fn bytes(&self) -> u64 {
        self.copy.data.len() as u64
    }
}

struct Busy {
    since: Instant,
    access: Arc<dyn CopyTarget>,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Bytes reserved by writers, queued, or being written.
    held: u64,
    /// What each flusher is writing, and since when.
    busy: Vec<Option<Busy>>,
    idle_flushers: usize,
    space_waiters: usize,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    space: Condvar,
    /// Wakes the watchdog when the buffer closes.
    closing: Condvar,
    capacity: u64,
    /// Recycled copy buffers (their total stays under a quarter of the capacity).
    buffers: Mutex<Vec<Vec<u8>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().recover()
    }

    fn release(&self, st: &mut State, bytes: u64) {
        st.held -= bytes;
        if st.space_waiters > 0 {
            self.space.notify_all();
        }
    }

    /// Takes the jobs of broken or ended accesses out of the queue; the caller drops
    /// them after unlocking (dropping the last reference to an access must not happen
    /// under this lock).
    fn purge(&self, st: &mut State) -> Vec<Job> {
        let mut dead = Vec::new();
        let mut keep = VecDeque::with_capacity(st.jobs.len());
        for job in st.jobs.drain(..) {
            if job.access.stores_nothing() {
                dead.push(job);
            } else {
                keep.push_back(job);
            }
        }
        st.jobs = keep;
        let freed: u64 = dead.iter().map(Job::bytes).sum();
        if freed > 0 {
            self.release(st, freed);
        }
        dead
    }

    fn recycle(&self, copy: Arc<PendingCopy>) {
        if let Ok(copy) = Arc::try_unwrap(copy) {
            let mut free = self.buffers.lock().recover();
            // Count what the buffers hold, not what they are used for.
            let total: usize = free.iter().map(Vec::capacity).sum();
            if (total + copy.data.capacity()) as u64 <= self.capacity / 4 {
                free.push(copy.data);
            }
        }
    }

    fn flusher(self: Arc<Self>, me: usize) {
        loop {
            let job = {
                let mut st = self.lock();
                loop {
                    if let Some(job) = st.jobs.pop_front() {
                        break job;
                    }
                    if st.closed {
                        return;
                    }
                    st.idle_flushers += 1;
                    st = self.work.wait(st).recover();
                    st.idle_flushers -= 1;
                }
            };
            let bytes = job.bytes();
            self.lock().busy[me] = Some(Busy {
                since: Instant::now(),
                access: job.access.clone(),
            });
            job.access.store_pending(&job.copy);
            let dead = {
                let mut st = self.lock();
                let busy = st.busy[me].take();
                self.release(&mut st, bytes);
                busy
            };
            drop(dead);
            let Job { access, copy } = job;
            drop(access);
            self.recycle(copy);
        }
    }

    fn watchdog(self: Arc<Self>, timeout: Duration) {
        let period = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            let (late, dead) = {
                let st = self.lock();
                let (mut st, _) = self
                    .closing
                    .wait_timeout_while(st, period, |st| !st.closed)
                    .recover();
                if st.closed {
                    return;
                }
                let late: Vec<Arc<dyn CopyTarget>> = st
                    .busy
                    .iter()
                    .flatten()
                    .filter(|b| b.since.elapsed() > timeout && !b.access.stores_nothing())
                    .map(|b| b.access.clone())
                    .collect();
                let dead = if late.is_empty() {
                    Vec::new()
                } else {
                    for a in &late {
                        a.break_with(format!(
                            "copy-before-write on device {} took longer than the {}s timeout (fleecing write)",
                            a.device_name(),
                            timeout.as_secs_f64()
                        ));
                    }
                    self.purge(&mut st)
                };
                (late, dead)
            };
            drop(late);
            for job in dead {
                job.access.drop_pending(&job.copy);
            }
        }
    }
}

/// The write-behind buffer of an engine: a bounded queue of pending copies and the
/// threads that store them.
pub struct WriteBehind {
    shared: Arc<Shared>,
    timeout: Option<Duration>,
}

impl WriteBehind {
    /// A buffer of `capacity` bytes with `flushers` threads; with `timeout`, a watchdog
    /// breaks an access whose fleecing write takes longer.
    pub fn new(
        capacity: u64,
        flushers: usize,
        timeout: Option<Duration>,
    ) -> std::io::Result<WriteBehind> {
        let flushers = flushers.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                busy: (0..flushers).map(|_| None).collect(),
                ..State::default()
            }),
            work: Condvar::new(),
            space: Condvar::new(),
            closing: Condvar::new(),
            capacity,
            buffers: Mutex::new(Vec::new()),
        });
        let wb = WriteBehind {
            shared: shared.clone(),
            timeout,
        };
        for i in 0..flushers {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("cbw-flush-{i}"))
                .spawn(move || s.flusher(i))?;
        }
        if let Some(t) = timeout {
            let s = shared.clone();
            std::thread::Builder::new()
                .name("cbw-watchdog".into())
                .spawn(move || s.watchdog(t))?;
        }
        Ok(wb)
    }

    /// Waits until `bytes` more fit (at most until `deadline`), then holds them. Called
    /// before any stripe lock is taken.
    pub fn reserve(&self, bytes: u64, deadline: Option<Instant>) -> Result<()> {
        let s = &self.shared;
        let mut st = s.lock();
        while st.held > 0 && st.held + bytes > s.capacity {
            // Copies of broken or ended accesses will never be read: make room first.
            let dead = s.purge(&mut st);
            if !dead.is_empty() {
                drop(st);
                for job in dead {
                    job.access.drop_pending(&job.copy);
                }
                st = s.lock();
                continue;
            }
            st.space_waiters += 1;
            st = match deadline {
                None => s.space.wait(st).recover(),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        st.space_waiters -= 1;
                        return Err(Error::new(
                            Kind::TimedOut,
                            format!(
                                "copy-before-write waited longer than the {}s timeout for the fleecing storage",
                                self.timeout.unwrap_or_default().as_secs_f64()
                            ),
                        ));
                    }
                    s.space.wait_timeout(st, d - now).recover().0
                }
            };
            st.space_waiters -= 1;
        }
        st.held += bytes;
        Ok(())
    }

    /// A buffer of `len` bytes for old data (recycled when possible).
    pub fn buffer(&self, len: usize) -> Vec<u8> {
        let mut free = self.shared.buffers.lock().recover();
        // Only a buffer of exactly this size is reused, so none grows or hides spare
        // capacity (runs of small clusters come in many sizes).
        match free.iter().position(|b| b.len() == len) {
            Some(i) => free.swap_remove(i),
            None => {
                drop(free);
                vec![0; len]
            }
        }
    }

    /// Queues `copies` of `access` (their bytes were reserved) and gives back
    /// `unused` reserved bytes.
    pub fn submit(&self, access: &Arc<dyn CopyTarget>, copies: Vec<Arc<PendingCopy>>, unused: u64) {
        let s = &self.shared;
        let mut st = s.lock();
        let n = copies.len();
        st.jobs.extend(copies.into_iter().map(|copy| Job {
            access: access.clone(),
            copy,
        }));
        if unused > 0 {
            s.release(&mut st, unused);
        }
        match (n, st.idle_flushers) {
            (0, _) | (_, 0) => {}
            (1, _) => s.work.notify_one(),
            _ => s.work.notify_all(),
        }
    }

    /// Waits until nothing is held (every copy stored or dropped), at most `timeout`.
    /// Returns whether it got there.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let s = &self.shared;
        let deadline = Instant::now() + timeout;
        let mut st = s.lock();
        while st.held > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st.space_waiters += 1;
            st = s.space.wait_timeout(st, deadline - now).recover().0;
            st.space_waiters -= 1;
        }
        true
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.closed = true;
        self.shared.work.notify_all();
        self.shared.closing.notify_all();
    }
}

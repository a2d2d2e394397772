//! One device's part of a backup access: its cluster bitmaps (`accessible`, `copied`),
//! the striped locks that serialize a copy against a snapshot read of the same clusters,
//! the pending map of write-behind copies, and the policy it copies under.
//!
//! The ordering invariant and the lock order these serve are written in `cbw/mod.rs`.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use crate::bitmap::Bitmap;
use crate::cbw::policy::{
    inject_copy_fault, inject_fleece_read_fault, Breaker, Broken, CopyPool, FleecingBudget,
    OnCbwError,
};
use crate::cbw::writebehind::{CopyTarget, PendingCopy, WriteBehind};
use crate::dirtymap::DirtyMap;
use crate::error::Result;
use crate::fleece::FleecingFile;
use crate::sync::Recover;
use crate::units::ClusterSize;

/// Smallest span of bytes one stripe lock covers. With 64 KiB clusters a lock covers one
/// cluster; smaller clusters are grouped so that I/O per lock stays >= 64 KiB.
pub const LOCK_UNIT_MIN: u64 = 64 << 10;
/// Number of stripe locks per access.
const STRIPES: usize = 4096;

/// What an access needs to know of its device.
#[derive(Clone, Copy)]
pub struct DeviceShape<'a> {
    /// The device name.
    pub name: &'a str,
    /// Its cluster size.
    pub cluster: ClusterSize,
    /// Its size in bytes.
    pub size: u64,
}

/// Counters of one device's access (for `status`).
#[derive(Clone, Debug, Default)]
pub struct AccessStats {
    /// Bytes of old data copied into the fleecing file.
    pub copied_bytes: u64,
    /// Bytes of the snapshot discarded.
    pub discarded_bytes: u64,
    /// Bytes the fleecing file occupies on disk.
    pub fleecing_allocated: u64,
    /// Bytes in the dirty map.
    pub dirty_bytes: u64,
    /// Copied clusters whose old data is still in memory (write-behind), in bytes.
    pub pending_bytes: u64,
}

/// One device's part of an active backup access.
pub struct DeviceAccess {
    pub(super) id: u64,
    pub(super) name: String,
    cluster: ClusterSize,
    /// The device size at setup: the snapshot keeps it when the device is resized.
    pub(super) size: u64,
    /// Clusters of the snapshot (of `size`); clusters past it never need a copy.
    pub(super) nclusters: u64,
    created: SystemTime,
    pub(super) fleece: FleecingFile,
    dirty_map: DirtyMap,
    pub(super) accessible: Bitmap,
    pub(super) copied: Bitmap,
    stripes: Box<[RwLock<()>]>,
    pub(super) unit_shift: u32,
    pub(super) copied_bytes: AtomicU64,
    pub(super) discarded_bytes: AtomicU64,
    pub(super) policy: CbwPolicy,
    /// Old data of copied clusters not yet stored in the fleecing file (write-behind).
    pub(super) pending: PendingMap,
    /// Set by teardown: nothing will read this access again.
    retired: AtomicBool,
}

impl DeviceAccess {
    /// An access over `frozen` (the clusters to expose) using `fleece`. Cannot fail, so
    /// the engine builds it while holding the gates.
    pub fn new(
        id: u64,
        device: DeviceShape<'_>,
        frozen: Arc<Bitmap>,
        fleece: FleecingFile,
        policy: CbwPolicy,
    ) -> DeviceAccess {
        let accessible = frozen.to_heap();
        let copied = Bitmap::new(frozen.len(), false);
        let nclusters = frozen.len();
        let dirty_map = DirtyMap::new(frozen, device.cluster, device.size);
        let unit = device.cluster.bytes().max(LOCK_UNIT_MIN);
        DeviceAccess {
            id,
            name: device.name.to_string(),
            cluster: device.cluster,
            size: device.size,
            nclusters,
            created: SystemTime::now(),
            fleece,
            dirty_map,
            accessible,
            copied,
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            unit_shift: unit.trailing_zeros(),
            copied_bytes: AtomicU64::new(0),
            discarded_bytes: AtomicU64::new(0),
            policy,
            pending: PendingMap::default(),
            retired: AtomicBool::new(false),
        }
    }

    /// The device this access is of.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// Copies not yet stored in the fleecing file.
    pub fn pending(&self) -> &PendingMap {
        &self.pending
    }

    /// Marks the access ended (teardown): its pending copies need not be stored.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    pub(super) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// Whether nothing of this access will be read again (broken or ended), so copies
    /// for it need not be stored.
    pub fn stores_nothing(&self) -> bool {
        self.is_broken() || self.is_retired()
    }

    /// Stores a pending copy in the fleecing file (a write-behind flusher), then removes
    /// it from the pending map. A failed write breaks the access *before* the copy leaves
    /// the map, so readers see either the old data or the broken access.
    pub fn store_pending(&self, copy: &Arc<PendingCopy>) {
        let stored = !self.stores_nothing() && {
            let r = inject_copy_fault().and_then(|_| self.fleece.write_at(&copy.data, copy.offset));
            if let Err(e) = &r {
                self.break_with(format!(
                    "copy-before-write on device {} failed: {}",
                    self.name,
                    crate::error::report(e)
                ));
            }
            r.is_ok()
        };
        let discarded = self.pending.finish(copy);
        if stored {
            // A discard may have punched these clusters before the write landed.
            for run in discarded {
                let bytes = self
                    .cluster
                    .byte_range(run, copy.offset + copy.data.len() as u64);
                self.fleece.punch(bytes.start, bytes.end - bytes.start);
            }
        }
    }

    /// Reads copied (point-in-time) data at `pos`: pending copies from memory, the rest
    /// from the fleecing file. Called without locks for clusters seen copied (copied data
    /// never changes during the access); the caller checks afterwards that they are still
    /// accessible (a discard drops pending copies and punches the fleecing file) and that
    /// the access has not ended (teardown drops pending copies unwritten).
    pub(super) fn read_copied(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        inject_fleece_read_fault();
        if self.pending.is_empty() {
            return self.fleece.read_at(buf, pos);
        }
        let end = pos + buf.len() as u64;
        let mut p = pos;
        while p < end {
            let c = self.cluster.index_of(p);
            let mut run_end = self.cluster.start_of(c.next()).min(end);
            let copy = self.pending.get(c.0);
            if copy.is_none() {
                // Extend over the following clusters that are not pending either.
                while run_end < end {
                    let n = self.cluster.index_of(run_end);
                    if self.pending.get(n.0).is_some() {
                        break;
                    }
                    run_end = self.cluster.start_of(n.next()).min(end);
                }
            }
            let dst = &mut buf[(p - pos) as usize..(run_end - pos) as usize];
            match copy {
                Some(copy) => {
                    let at = (p - copy.offset) as usize;
                    dst.copy_from_slice(&copy.data[at..at + dst.len()]);
                }
                None => self.fleece.read_at(dst, p)?,
            }
            p = run_end;
        }
        Ok(())
    }

    /// The access generation this belongs to.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The size of the snapshot: the device's size at setup.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The instant of setup: the snapshot's modification time, so that tools comparing
    /// size and mtime (rsync, restic) see each access as a new version of the file.
    pub fn created(&self) -> SystemTime {
        self.created
    }

    /// The dirty map of this access.
    pub fn dirty_map(&self) -> &DirtyMap {
        &self.dirty_map
    }

    /// Whether the snapshot byte at `offset` (< `size()`) is readable (in the dirty map
    /// and not discarded), and where the run of bytes with the same answer ends (at most
    /// `size()`). A snapshot read of the run fails (not readable) or, for a readable
    /// run, succeeds unless a discard overtakes it.
    pub fn accessible_run(&self, offset: u64) -> (bool, u64) {
        let (value, end) = self.accessible.run_of(self.cluster.index_of(offset).0);
        (
            value,
            self.cluster
                .start_of(crate::units::ClusterIdx(end))
                .min(self.size),
        )
    }

    /// The fleecing file.
    pub fn fleecing(&self) -> &FleecingFile {
        &self.fleece
    }

    /// Bytes of old data copied so far (one atomic load).
    pub fn copied_bytes(&self) -> u64 {
        self.copied_bytes.load(Ordering::Relaxed)
    }

    /// Counters.
    pub fn stats(&self) -> AccessStats {
        AccessStats {
            copied_bytes: self.copied_bytes.load(Ordering::Relaxed),
            discarded_bytes: self.discarded_bytes.load(Ordering::Relaxed),
            fleecing_allocated: self.fleece.allocated_bytes(),
            dirty_bytes: self.dirty_map.dirty_bytes(),
            pending_bytes: self.pending.len() as u64 * self.cluster.bytes(),
        }
    }

    /// Why the access is broken, if it is.
    pub fn broken(&self) -> Option<&Broken> {
        self.policy.breaker.broken()
    }

    /// Marks the whole access broken (all its devices).
    pub fn break_with(&self, reason: String) {
        self.policy.breaker.break_with(reason)
    }

    pub(super) fn is_broken(&self) -> bool {
        self.policy.breaker.is_broken()
    }

    pub(super) fn needs_copy(&self, c: u64) -> bool {
        c < self.nclusters && self.accessible.get(c) && !self.copied.get(c)
    }

    pub(super) fn stripe(&self, unit: u64) -> &RwLock<()> {
        &self.stripes[(unit as usize) & (STRIPES - 1)]
    }

    /// Waits for a stripe lock without blocking forever. Readers and discards hold the
    /// device gate, so they must not wait forever behind a copy stuck in the fleecing
    /// file (a waiting teardown would then hold up every live write); the copy's writer
    /// gives up after `--cbw-timeout` and breaks the access. A write-behind copy waits
    /// at most until its `deadline`, since the holder may be a reader stuck reading the
    /// fleecing file. Returns `None` once the access is broken or the deadline passed.
    pub(super) fn wait_stripe<G>(
        &self,
        mut try_lock: impl FnMut() -> std::sync::TryLockResult<G>,
        deadline: Option<std::time::Instant>,
    ) -> Option<G> {
        let mut spins = 0u32;
        loop {
            match try_lock() {
                Ok(g) => return Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => return Some(Err(p).recover()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if self.is_broken() || deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return None;
            }
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
    }

    /// Clusters of `clusters` that fall into lock unit `unit`.
    pub(super) fn unit_clusters(
        &self,
        cluster: ClusterSize,
        unit: u64,
        clusters: &Range<u64>,
    ) -> Range<u64> {
        let per_unit_shift = self.unit_shift - cluster.bytes().trailing_zeros();
        let first = unit << per_unit_shift;
        let last = (unit + 1) << per_unit_shift;
        first.max(clusters.start)..last.min(clusters.end)
    }
}

/// The write-behind buffer stores this access's pending copies through this.
impl CopyTarget for DeviceAccess {
    fn device_name(&self) -> &str {
        DeviceAccess::device_name(self)
    }

    fn stores_nothing(&self) -> bool {
        DeviceAccess::stores_nothing(self)
    }

    fn store_pending(&self, copy: &Arc<PendingCopy>) {
        DeviceAccess::store_pending(self, copy)
    }

    fn drop_pending(&self, copy: &Arc<PendingCopy>) {
        self.pending.finish(copy);
    }

    fn break_with(&self, reason: String) {
        DeviceAccess::break_with(self, reason)
    }
}

/// Everything a device access needs to apply the policy.
#[derive(Clone)]
pub struct CbwPolicy {
    /// What a failed or timed-out copy breaks.
    pub on_error: OnCbwError,
    /// How long a writer waits for a copy (`None`: as long as it takes, inline).
    pub timeout: Option<Duration>,
    /// The pool timed copies run on.
    pub pool: Option<Arc<CopyPool>>,
    /// Where copies go under break-snapshot: into memory first, stored by flusher
    /// threads (`None`: copies are synchronous).
    pub write_behind: Option<Arc<WriteBehind>>,
    /// Fleecing space of the access.
    pub budget: Arc<FleecingBudget>,
    /// Whether the access is broken.
    pub breaker: Arc<Breaker>,
}

/// The pending copies of one device access, by cluster.
#[derive(Default)]
pub struct PendingMap {
    map: Mutex<HashMap<u64, Arc<PendingCopy>>>,
    /// Clusters in `map`; lets readers skip the lock when nothing is pending.
    clusters: AtomicUsize,
}

impl PendingMap {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<PendingCopy>>> {
        self.map.lock().recover()
    }

    /// Whether no copy is pending.
    pub fn is_empty(&self) -> bool {
        self.clusters.load(Ordering::Acquire) == 0
    }

    /// Publishes `copy` for its clusters. The caller holds their stripe lock and marks
    /// them copied afterwards.
    pub fn insert(&self, copy: &Arc<PendingCopy>) {
        let mut map = self.lock();
        for c in copy.first..copy.first + copy.clusters {
            map.insert(c, copy.clone());
        }
        self.clusters
            .fetch_add(copy.clusters as usize, Ordering::AcqRel);
    }

    /// The pending copy holding cluster `c`, if any.
    pub fn get(&self, c: u64) -> Option<Arc<PendingCopy>> {
        if self.is_empty() {
            return None;
        }
        self.lock().get(&c).cloned()
    }

    /// Removes `copy` once it is stored (or will never be). Returns the runs of its
    /// clusters that were discarded meanwhile, whose fleecing space the caller releases
    /// again (its write may have landed after the discard's punch).
    pub fn finish(&self, copy: &Arc<PendingCopy>) -> Vec<Range<u64>> {
        let mut gone: Vec<Range<u64>> = Vec::new();
        let mut map = self.lock();
        let mut removed = 0;
        for c in copy.first..copy.first + copy.clusters {
            match map.get(&c) {
                Some(p) if Arc::ptr_eq(p, copy) => {
                    map.remove(&c);
                    removed += 1;
                }
                _ => match gone.last_mut() {
                    Some(r) if r.end == c => r.end = c + 1,
                    _ => gone.push(c..c + 1),
                },
            }
        }
        self.clusters.fetch_sub(removed, Ordering::AcqRel);
        gone
    }

    /// Drops the pending copies of `clusters` (a discard, under their stripe lock).
    pub fn discard(&self, clusters: Range<u64>) {
        if self.is_empty() {
            return;
        }
        let mut map = self.lock();
        let mut removed = 0;
        for c in clusters {
            if map.remove(&c).is_some() {
                removed += 1;
            }
        }
        self.clusters.fetch_sub(removed, Ordering::AcqRel);
    }

    /// Clusters pending (for tests and status).
    pub fn len(&self) -> usize {
        self.clusters.load(Ordering::Acquire)
    }
}

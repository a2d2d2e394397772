//! The copy-before-write engine for one device: live I/O, snapshot reads, discard.
//!
//! # State
//! A [`Device`] owns its [`Source`] and a *gate*, an `RwLock<GateState>` holding the
//! bitmaps every live write must mark (`tracking`) and, while a backup access is active,
//! a [`DeviceAccess`] with three cluster bitmaps:
//! - `frozen`: the clusters the backup must read (the dirty map); never changes;
//! - `accessible`: `frozen` minus what has been discarded;
//! - `copied`: clusters whose point-in-time data is in the fleecing file.
//!
//! A cluster *needs copy-before-write* when it is `accessible && !copied` and the access
//! is not broken. During one access that predicate only ever goes from true to false
//! (bits are only cleared in `accessible`, only set in `copied`, and broken never
//! heals), so a writer that once saw it false can skip the cluster without any lock.
//!
//! # The ordering invariant
//! For every cluster `c` and every live write `w` that touches it while an access is
//! active: if `c` needs copy-before-write, the old data of `c` is in the fleecing file or
//! in the access's pending map (write-behind, see `writebehind.rs`), and `copied[c]` is
//! set, **before** `w` reaches the source. A pending copy leaves the map only once it is
//! in the fleecing file, the access is broken, or nobody can read it (discarded, or the
//! access ended). And for every write: `c` is marked in
//! every tracking bitmap (flushed, when crash-safe) before `w` reaches the source.
//! Readers therefore find point-in-time data either in the source (`!copied[c]`: nobody
//! has written it since setup), or in the pending map, or in the fleecing file.
//!
//! # Locks and their order
//! 1. `Engine::control` (setup, teardown, status; never on the data path)
//! 2. device gates, in device index order (exclusive only in setup/teardown; every data
//!    operation holds its device's gate shared for its whole duration, so setup and
//!    teardown happen between data operations, at one instant for all devices; only a
//!    snapshot read lets go of it for lock units made only of copied clusters, and
//!    returns ESTALE if the access ended meanwhile)
//! 3. one *stripe* lock of the access (`RwLock<()>` per lock unit of clusters, striped).
//!    Snapshot reads hold it shared while they check bits and read a unit; copy and
//!    discard hold it exclusive. **A thread holds at most one stripe lock at a time**,
//!    so stripe locks cannot deadlock.
//! 4. bitmaps are atomic words: no lock.
//! 5. leaves: a pending map's mutex, the write-behind state mutex. A writer waits for
//!    room in the write-behind buffer before it takes a stripe lock.
//!
//! A snapshot read and a copy of the same cluster are serialized by the stripe lock;
//! operations on different lock units run in parallel.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::SystemTime;

use crate::bitmap::Bitmap;
use crate::dirtymap::DirtyMap;
use crate::error::{Error, Kind, Result};
use crate::fleece::FleecingFile;
use crate::persist::TrackedBitmap;
pub use crate::policy::Broken;
pub use crate::policy::OnCbwError;
use crate::policy::{inject_copy_fault, inject_fleece_read_fault, CbwPolicy};
use crate::source::Source;
use crate::sys;
use crate::units::ClusterSize;
use crate::writebehind::{PendingCopy, PendingMap, WriteBehind};

/// Smallest span of bytes one stripe lock covers. With 64 KiB clusters a lock covers one
/// cluster; smaller clusters are grouped so that I/O per lock stays >= 64 KiB.
pub const LOCK_UNIT_MIN: u64 = 64 << 10;
/// Number of stripe locks per access.
const STRIPES: usize = 4096;
/// Largest buffer one copy step uses; bigger clusters are copied in pieces.
const COPY_CHUNK: usize = 1 << 20;

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
    id: u64,
    name: String,
    cluster: ClusterSize,
    created: SystemTime,
    fleece: FleecingFile,
    dirty_map: DirtyMap,
    accessible: Bitmap,
    copied: Bitmap,
    stripes: Box<[RwLock<()>]>,
    unit_shift: u32,
    copied_bytes: AtomicU64,
    discarded_bytes: AtomicU64,
    policy: CbwPolicy,
    /// Old data of copied clusters not yet stored in the fleecing file (write-behind).
    pending: PendingMap,
    /// Set by teardown: nothing will read this access again.
    retired: AtomicBool,
}

impl DeviceAccess {
    /// An access over `frozen` (the clusters to expose) using `fleece`. Cannot fail, so
    /// the engine builds it while holding the gates.
    pub fn new(
        id: u64,
        device: &Device,
        frozen: Arc<Bitmap>,
        fleece: FleecingFile,
        policy: CbwPolicy,
    ) -> DeviceAccess {
        let accessible = frozen.to_heap();
        let copied = Bitmap::new(frozen.len(), false);
        let dirty_map = DirtyMap::new(frozen, device.cluster, device.size());
        let unit = device.cluster.bytes().max(LOCK_UNIT_MIN);
        DeviceAccess {
            id,
            name: device.name.clone(),
            cluster: device.cluster,
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

    fn is_retired(&self) -> bool {
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
    /// from the fleecing file. Called under the stripe lock of `pos`.
    fn read_copied(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        inject_fleece_read_fault();
        if self.pending.is_empty() {
            return self.fleece.read_at(buf, pos);
        }
        let end = pos + buf.len() as u64;
        let mut p = pos;
        while p < end {
            let c = self.cluster.index_of(p);
            let mut run_end = self.cluster.start_of(c + 1).min(end);
            let copy = self.pending.get(c);
            if copy.is_none() {
                // Extend over the following clusters that are not pending either.
                while run_end < end && self.pending.get(self.cluster.index_of(run_end)).is_none() {
                    run_end = self
                        .cluster
                        .start_of(self.cluster.index_of(run_end) + 1)
                        .min(end);
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

    /// The instant of setup: the snapshot's modification time, so that tools comparing
    /// size and mtime (rsync, restic) see each access as a new version of the file.
    pub fn created(&self) -> SystemTime {
        self.created
    }

    /// The dirty map of this access.
    pub fn dirty_map(&self) -> &DirtyMap {
        &self.dirty_map
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

    fn is_broken(&self) -> bool {
        self.policy.breaker.is_broken()
    }

    fn needs_copy(&self, c: u64) -> bool {
        self.accessible.get(c) && !self.copied.get(c)
    }

    fn stripe(&self, unit: u64) -> &RwLock<()> {
        &self.stripes[(unit as usize) & (STRIPES - 1)]
    }

    /// Waits for a stripe lock without blocking forever. Readers and discards hold the
    /// device gate, so they must not wait forever behind a copy stuck in the fleecing
    /// file (a waiting teardown would then hold up every live write); the copy's writer
    /// gives up after `--cbw-timeout` and breaks the access. A write-behind copy waits
    /// at most until its `deadline`, since the holder may be a reader stuck reading the
    /// fleecing file. Returns `None` once the access is broken or the deadline passed.
    fn wait_stripe<G>(
        &self,
        mut try_lock: impl FnMut() -> std::sync::TryLockResult<G>,
        deadline: Option<std::time::Instant>,
    ) -> Option<G> {
        let mut spins = 0u32;
        loop {
            match try_lock() {
                Ok(g) => return Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
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
    fn unit_clusters(&self, cluster: ClusterSize, unit: u64, clusters: &Range<u64>) -> Range<u64> {
        let per_unit_shift = self.unit_shift - cluster.bytes().trailing_zeros();
        let first = unit << per_unit_shift;
        let last = (unit + 1) << per_unit_shift;
        first.max(clusters.start)..last.min(clusters.end)
    }
}

/// What every data operation of a device reads under its gate.
#[derive(Default)]
pub struct GateState {
    /// The active access, if any.
    pub access: Option<Arc<DeviceAccess>>,
    /// Bitmaps that record live writes.
    pub tracking: Vec<Arc<TrackedBitmap>>,
}

/// A device: a source image, its live view and (during an access) its snapshot view.
pub struct Device {
    name: String,
    source: Arc<Source>,
    cluster: ClusterSize,
    gate: RwLock<GateState>,
    last_error: Mutex<Option<(String, SystemTime)>>,
}

thread_local! {
    static COPY_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn with_copy_buf<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    COPY_BUF.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < len {
            b.resize(len, 0);
        }
        f(&mut b[..len])
    })
}

impl Device {
    /// A device named `name` over `source`, tracked in clusters of `cluster`.
    pub fn new(name: String, source: Source, cluster: ClusterSize) -> Device {
        Device {
            name,
            source: Arc::new(source),
            cluster,
            gate: RwLock::new(GateState::default()),
            last_error: Mutex::new(None),
        }
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.source.size()
    }

    /// The cluster size.
    pub fn cluster(&self) -> ClusterSize {
        self.cluster
    }

    /// Number of clusters.
    pub fn clusters(&self) -> u64 {
        self.cluster.count(self.size())
    }

    /// The source.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The last I/O error the source returned, if any (for `status`).
    pub fn last_error(&self) -> Option<(String, SystemTime)> {
        self.last_error.lock().map(|g| g.clone()).unwrap_or(None)
    }

    fn note_source_error(&self, e: &Error) {
        let text = crate::error::report(e);
        log::warn!("device {}: {text}", self.name);
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some((text, SystemTime::now()));
        }
    }

    fn gate(&self) -> RwLockReadGuard<'_, GateState> {
        // A poisoned gate only means a thread panicked while holding it; what it guards
        // (an Option<Arc> and a Vec of Arcs) is never left half-updated, so keep serving.
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The current access, if any.
    pub fn access(&self) -> Option<Arc<DeviceAccess>> {
        self.gate().access.clone()
    }

    /// The gate, exclusively: no data operation of this device runs while it is held.
    /// The engine takes the gates of all devices it switches, in device index order.
    pub fn lock_gate(&self) -> std::sync::RwLockWriteGuard<'_, GateState> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    /// What must happen before `[offset, offset+len)` of the source changes (the ordering
    /// invariant): mark the clusters in every tracking bitmap, then copy the old data of
    /// those that still need it. Called with the gate held for the whole change.
    fn before_change(&self, gate: &GateState, offset: u64, len: u64) -> Result<()> {
        if !gate.tracking.is_empty() {
            let clusters = self.cluster.outward(offset, len);
            for t in &gate.tracking {
                t.mark(clusters.clone());
            }
        }
        match gate.access.as_ref() {
            Some(access) => self.copy_before_write(access, offset, len),
            None => Ok(()),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::new(
                Kind::PastEnd,
                format!(
                    "device {} has a fixed size of {} bytes; {offset}+{len} is past its end",
                    self.name,
                    self.size()
                ),
            )),
        }
    }

    // ---- live view ---------------------------------------------------------------

    /// Reads the live image.
    pub fn read_live(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = self.size();
        if offset >= size {
            return Ok(0);
        }
        let n = buf.len().min((size - offset) as usize);
        self.source
            .read_at(&mut buf[..n], offset)
            .inspect_err(|e| self.note_source_error(e))?;
        Ok(n)
    }

    /// Writes the live image, copying old data first while an access needs it. A write
    /// that crosses the end of the device is cut there and returns the short count (as a
    /// block device does), whatever its size or the way the kernel split it; one that
    /// starts at or past the end fails with ENOSPC.
    pub fn write_live(&self, offset: u64, data: &[u8]) -> Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        if offset >= self.size() {
            self.check_range(offset, data.len() as u64)?;
        }
        let data = &data[..data.len().min((self.size() - offset) as usize)];
        let len = data.len() as u64;
        let gate = self.gate();
        self.before_change(&gate, offset, len)?;
        self.source
            .write_at(data, offset)
            .inspect_err(|e| self.note_source_error(e))?;
        Ok(data.len())
    }

    /// Punches a hole in or zeroes the live image (`fallocate` modes), or allocates.
    pub fn fallocate_live(&self, mode: i32, offset: u64, len: u64) -> Result<()> {
        let keep = mode & sys::FALLOC_KEEP_SIZE != 0;
        let op = mode & !sys::FALLOC_KEEP_SIZE;
        let changes_data = match op {
            0 => false,
            sys::FALLOC_PUNCH_HOLE if keep => true,
            sys::FALLOC_ZERO_RANGE => true,
            _ => {
                return Err(Error::new(
                    Kind::Unsupported,
                    format!(
                        "fallocate mode {mode:#x} is not supported on live/{}",
                        self.name
                    ),
                ))
            }
        };
        // Allocation or zeroing must not grow the device: clip when KEEP_SIZE says so,
        // refuse otherwise.
        let len = if keep {
            len.min(self.size().saturating_sub(offset))
        } else {
            self.check_range(offset, len)?;
            len
        };
        if len == 0 {
            return Ok(());
        }
        if self.source.identity().block_device && !changes_data {
            // Every block of a block device is allocated.
            return Ok(());
        }
        let gate = self.gate();
        if changes_data {
            self.before_change(&gate, offset, len)?;
        }
        if self.source.identity().block_device {
            return self.fallocate_block_device(mode | sys::FALLOC_KEEP_SIZE, offset, len);
        }
        self.source
            .fallocate(mode, offset, len)
            .inspect_err(|e| self.note_source_error_of(e))
    }

    /// Punch hole or zero range on a block-device source, which takes only ranges aligned
    /// to its logical block size: the partial blocks at the edges are written with zeros,
    /// the aligned middle goes to `fallocate`. The result is what a regular file gives.
    fn fallocate_block_device(&self, mode: i32, offset: u64, len: u64) -> Result<()> {
        let block = self.source.logical_block_size();
        let end = offset + len;
        let (mid_start, mid_end) = (offset.next_multiple_of(block), end / block * block);
        let zero = |from: u64, to: u64| -> Result<()> {
            if from < to {
                with_copy_buf((to - from) as usize, |buf| {
                    buf.fill(0);
                    self.source.write_at(buf, from)
                })
                .inspect_err(|e| self.note_source_error(e))?;
            }
            Ok(())
        };
        if mid_start >= mid_end {
            return zero(offset, end);
        }
        zero(offset, mid_start)?;
        self.source
            .fallocate(mode, mid_start, mid_end - mid_start)
            .inspect_err(|e| self.note_source_error_of(e))?;
        zero(mid_end, end)
    }

    /// Like `note_source_error`, except for errors that say the request was refused
    /// (EINVAL, EOPNOTSUPP: a mode or range the source does not take): those go back to
    /// the caller with their errno but are no device failure for `status`.
    fn note_source_error_of(&self, e: &Error) {
        match e.errno() {
            libc::EINVAL | libc::EOPNOTSUPP => {
                log::debug!("device {}: {}", self.name, crate::error::report(e))
            }
            _ => self.note_source_error(e),
        }
    }

    /// Flushes the live image to the source's storage.
    pub fn sync_live(&self, data_only: bool) -> Result<()> {
        self.source
            .sync(data_only)
            .inspect_err(|e| self.note_source_error(e))
    }

    /// Copies the old data of every cluster that `[offset, offset+len)` touches and that
    /// still needs it. Returns `Err` only when the write must fail (break-guest-write).
    fn copy_before_write(&self, access: &Arc<DeviceAccess>, offset: u64, len: u64) -> Result<()> {
        if access.is_broken() {
            return Ok(());
        }
        let clusters = self.cluster.outward(offset, len);
        // Fast path: nothing to copy (already copied, discarded, or outside the map).
        let Some(first) = clusters.clone().find(|&c| access.needs_copy(c)) else {
            return Ok(());
        };
        let clusters = first..clusters.end;
        let policy = &access.policy;
        let result = match (&policy.write_behind, policy.timeout, &policy.pool) {
            (Some(wb), timeout, _) => {
                let deadline = timeout.map(|t| std::time::Instant::now() + t);
                copy_clusters(
                    &self.source,
                    self.cluster,
                    access,
                    clusters,
                    Store::Behind(wb, deadline),
                )
            }
            (None, Some(timeout), Some(pool)) => {
                let (source, access, cluster) = (self.source.clone(), access.clone(), self.cluster);
                pool.run(timeout, move || {
                    copy_clusters(&source, cluster, &access, clusters, Store::Now)
                })
            }
            _ => copy_clusters(&self.source, self.cluster, access, clusters, Store::Now),
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) => match access.policy.on_error {
                OnCbwError::BreakSnapshot => {
                    access.break_with(format!(
                        "copy-before-write on device {} failed: {}",
                        self.name,
                        crate::error::report(&e)
                    ));
                    Ok(())
                }
                OnCbwError::BreakGuestWrite => {
                    log::warn!(
                        "live write to {} refused, copy-before-write failed: {}",
                        self.name,
                        crate::error::report(&e)
                    );
                    Err(e)
                }
            },
        }
    }

    // ---- snapshot view -----------------------------------------------------------

    fn current_access<'a>(
        &self,
        gate: &'a RwLockReadGuard<'_, GateState>,
        access_id: u64,
    ) -> Result<&'a Arc<DeviceAccess>> {
        match gate.access.as_ref() {
            Some(a) if a.id == access_id => Ok(a),
            _ => Err(self.stale_error()),
        }
    }

    fn stale_error(&self) -> Error {
        Error::new(
            Kind::Stale,
            format!("the backup access of snapshot/{} has ended", self.name),
        )
    }

    fn broken_error(&self, access: &DeviceAccess) -> Error {
        let reason = access
            .broken()
            .map(|b| b.reason.clone())
            .unwrap_or_default();
        Error::new(
            Kind::Broken,
            format!("snapshot of {} is broken: {reason}", self.name),
        )
    }

    /// Reads the snapshot of access `access_id` at `offset`. Fails with EACCES when
    /// `offset` is in an inaccessible cluster; stops short where inaccessible data begins.
    pub fn read_snapshot(&self, access_id: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let access = {
            let gate = self.gate();
            self.current_access(&gate, access_id)?.clone()
        };
        if access.is_broken() {
            return Err(self.broken_error(&access));
        }
        let size = self.size();
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let end = size.min(offset + buf.len() as u64);
        let mut pos = offset;
        'units: while pos < end {
            // Gate, then stripe (the lock order), one lock unit at a time. The gate keeps
            // teardown out while source data is read: after teardown, writes no longer
            // copy first. Copied data (fleecing file or memory) never changes during the
            // access, so a unit whose clusters to read are all copied is read without the
            // gate: a read stuck in slow fleecing storage then does not hold up a
            // teardown. If a teardown does overtake the read, the retired check below
            // turns it into ESTALE (teardown drops pending copies unwritten).
            let gate = self.gate();
            if !matches!(gate.access.as_ref(), Some(a) if Arc::ptr_eq(a, &access)) {
                // Torn down (retired) between two units: ESTALE below.
                break;
            }
            let unit = pos >> access.unit_shift;
            let unit_end = ((unit + 1) << access.unit_shift).min(end);
            let stripe = access.stripe(unit);
            let Some(_g) = access.wait_stripe(|| stripe.try_read(), None) else {
                return Err(self.broken_error(&access));
            };
            let mut gate = Some(gate);
            let first = self.cluster.index_of(pos);
            let last = self.cluster.index_of(unit_end - 1);
            if (first..=last)
                .take_while(|&c| access.accessible.get(c))
                .all(|c| access.copied.get(c))
            {
                gate = None;
            }
            while pos < unit_end {
                let c = self.cluster.index_of(pos);
                if !access.accessible.get(c) {
                    if pos == offset {
                        return Err(Error::new(
                            Kind::Inaccessible,
                            format!(
                                "snapshot/{} at {offset} was discarded or is not in the dirty map",
                                self.name
                            ),
                        ));
                    }
                    break 'units;
                }
                // Extend over clusters with the same location (fleecing or source).
                let from_fleece = access.copied.get(c);
                let mut run_end = (self.cluster.start_of(c + 1)).min(unit_end);
                while run_end < unit_end {
                    let n = self.cluster.index_of(run_end);
                    if !access.accessible.get(n) || access.copied.get(n) != from_fleece {
                        break;
                    }
                    run_end = self.cluster.start_of(n + 1).min(unit_end);
                }
                let dst = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
                if from_fleece {
                    access.read_copied(dst, pos)
                } else {
                    debug_assert!(gate.is_some(), "source read without the gate");
                    self.source
                        .read_at(dst, pos)
                        .inspect_err(|e| self.note_source_error(e))
                }?;
                pos = run_end;
            }
            drop(gate);
        }
        // Once the access has ended, its pending copies are dropped without being stored,
        // so copied data read without the gate may be a hole of the fleecing file: a read
        // that overlapped the teardown returns ESTALE, like any later read of its handle.
        // (Dropping a copy follows the retire mark, and this check follows the read.)
        if access.is_retired() {
            return Err(self.stale_error());
        }
        // A write that gave up on its copy (timeout) marks the access broken before it
        // touches the source, so checking again here catches any new data read above.
        if access.is_broken() {
            return Err(self.broken_error(&access));
        }
        Ok((pos - offset) as usize)
    }

    /// SEEK_DATA (`data`) or SEEK_HOLE on the snapshot of access `access_id`: the first
    /// data (hole) at or after `offset`, `None` for ENXIO. Inaccessible clusters are holes;
    /// copied ones are data (their old data may be in memory, not yet in the fleecing
    /// file); uncopied ones are the source's own map. A hole is never reported where the
    /// point-in-time image has data: a cluster still uncopied *after* the source was asked
    /// was not written since setup when it was asked (the copied bit is set before a write
    /// reaches the source), and one copied meanwhile counts as data. No lock is taken.
    pub fn seek_snapshot(&self, access_id: u64, offset: u64, data: bool) -> Result<Option<u64>> {
        let access = {
            let gate = self.gate();
            self.current_access(&gate, access_id)?.clone()
        };
        let r = if offset >= self.size() {
            None
        } else if data {
            self.next_snapshot_data(&access, offset)?
        } else {
            Some(self.next_snapshot_hole(&access, offset)?)
        };
        // After a teardown or a break, writes no longer copy first: the source's map may
        // no longer be the snapshot's.
        if access.is_retired() {
            return Err(self.stale_error());
        }
        if access.is_broken() {
            return Err(self.broken_error(&access));
        }
        Ok(r)
    }

    fn next_snapshot_data(&self, access: &DeviceAccess, mut pos: u64) -> Result<Option<u64>> {
        let (size, cl) = (self.size(), self.cluster);
        loop {
            if pos >= size {
                return Ok(None);
            }
            let c = cl.index_of(pos);
            if !access.accessible.get(c) {
                match access.accessible.next(c, true) {
                    Some(n) => pos = cl.start_of(n),
                    None => return Ok(None),
                }
                continue;
            }
            if access.copied.get(c) {
                return Ok(Some(pos));
            }
            let found = self
                .source
                .seek(pos, true)
                .inspect_err(|e| self.note_source_error(e))?
                .filter(|&d| d < size);
            // Clusters before the source's next data that were copied meanwhile are data.
            let end = found.map_or(cl.count(size), |d| cl.index_of(d) + 1);
            for copied in access.copied.runs(c..end) {
                if let Some(run) = access.accessible.runs(copied).next() {
                    return Ok(Some(pos.max(cl.start_of(run.start))));
                }
            }
            let Some(d) = found else {
                return Ok(None);
            };
            if access.accessible.get(cl.index_of(d)) {
                return Ok(Some(d));
            }
            pos = cl.start_of(cl.index_of(d) + 1);
        }
    }

    fn next_snapshot_hole(&self, access: &DeviceAccess, mut pos: u64) -> Result<u64> {
        let (size, cl) = (self.size(), self.cluster);
        loop {
            if pos >= size {
                return Ok(size);
            }
            let c = cl.index_of(pos);
            if !access.accessible.get(c) {
                return Ok(pos);
            }
            if access.copied.get(c) {
                let end = access.copied.next(c, false).unwrap_or(cl.count(size));
                let end = access.accessible.next(c, false).map_or(end, |n| n.min(end));
                pos = cl.start_of(end);
                continue;
            }
            let h = self
                .source
                .seek(pos, false)
                .inspect_err(|e| self.note_source_error(e))?
                .unwrap_or(size)
                .min(size);
            // Data up to h in the source; an inaccessible cluster before it is a hole.
            let end = if h > pos {
                cl.index_of(h - 1) + 1
            } else {
                c + 1
            };
            if let Some(n) = access.accessible.next(c, false).filter(|&n| n < end) {
                return Ok(pos.max(cl.start_of(n)));
            }
            if h >= size {
                return Ok(size);
            }
            let ch = cl.index_of(h);
            if !access.accessible.get(ch) || !access.copied.get(ch) {
                return Ok(h);
            }
            pos = cl.start_of(ch + 1);
        }
    }

    /// Discards `[offset, offset+len)` of the snapshot: whole clusters inside it (aligned
    /// inward) become inaccessible, their fleecing space is released, and live writes
    /// there copy nothing from now on.
    pub fn discard_snapshot(&self, access_id: u64, offset: u64, len: u64) -> Result<()> {
        let gate = self.gate();
        let access = self.current_access(&gate, access_id)?;
        let size = self.size();
        let clusters = self.cluster.inward(offset, len, size);
        if clusters.is_empty() {
            return Ok(());
        }
        let unit_of = |c: u64| self.cluster.start_of(c) >> access.unit_shift;
        let mut unit = unit_of(clusters.start);
        let last_unit = unit_of(clusters.end - 1);
        let mut to_punch: Vec<Range<u64>> = Vec::new();
        let mut result = Ok(());
        while unit <= last_unit {
            let in_unit = access.unit_clusters(self.cluster, unit, &clusters);
            unit += 1;
            if !access.accessible.any_in(in_unit.clone()) {
                continue;
            }
            let stripe = access.stripe(unit - 1);
            // A discard holds the gate: it waits at most the copy timeout (if one is
            // set) for each stripe, whose holder may be a reader stuck reading slow
            // fleecing storage.
            let deadline = access.policy.timeout.map(|t| std::time::Instant::now() + t);
            let Some(_g) = access.wait_stripe(|| stripe.try_write(), deadline) else {
                result = Err(if access.is_broken() {
                    self.broken_error(access)
                } else {
                    Error::new(
                        Kind::TimedOut,
                        format!(
                            "discard of snapshot/{} waited longer than the copy timeout for a read of the same clusters",
                            self.name
                        ),
                    )
                });
                break;
            };
            let newly: Vec<Range<u64>> = access.accessible.runs(in_unit.clone()).collect();
            for run in newly {
                // Copied clusters that were still accessible hold fleecing space until now.
                for copied in access.copied.runs(run.clone()) {
                    let bytes = self.cluster.byte_range(copied, size);
                    access.policy.budget.release(bytes.end - bytes.start);
                    match to_punch.last_mut() {
                        Some(last) if last.end == bytes.start => last.end = bytes.end,
                        _ => to_punch.push(bytes),
                    }
                }
                let bytes = self.cluster.byte_range(run.clone(), size);
                access.pending.discard(run.clone());
                access.accessible.clear_range(run);
                access
                    .discarded_bytes
                    .fetch_add(bytes.end - bytes.start, Ordering::Relaxed);
            }
        }
        // Nobody reads or writes inaccessible clusters of the fleecing file again, so the
        // space can be released after the locks are gone (also what was discarded before
        // a failure).
        for r in to_punch {
            access.fleece.punch(r.start, r.end - r.start);
        }
        result
    }
}

/// Where [`copy_clusters`] puts old data.
enum Store<'a> {
    /// In the fleecing file, before returning.
    Now,
    /// In memory, stored later by the write-behind buffer; waits for room in it at most
    /// until the deadline.
    Behind(&'a WriteBehind, Option<std::time::Instant>),
}

/// The slow path of copy-before-write: lock unit by unit, re-check, copy runs of
/// clusters from the source (to the fleecing file, or to memory with write-behind),
/// then mark them copied.
fn copy_clusters(
    source: &Source,
    cluster: ClusterSize,
    access: &Arc<DeviceAccess>,
    clusters: Range<u64>,
    store: Store<'_>,
) -> Result<()> {
    let size = source.size();
    let unit_of = |c: u64| cluster.start_of(c) >> access.unit_shift;
    let mut unit = unit_of(clusters.start);
    let last_unit = unit_of(clusters.end - 1);
    while unit <= last_unit {
        let in_unit = access.unit_clusters(cluster, unit, &clusters);
        unit += 1;
        let want: u64 = in_unit
            .clone()
            .filter(|&c| access.needs_copy(c))
            .map(|c| {
                let b = cluster.byte_range(c..c + 1, size);
                b.end - b.start
            })
            .sum();
        if want == 0 {
            continue;
        }
        // Room in the write-behind buffer is waited for before the stripe lock, so no
        // reader ever waits behind a writer that waits for the fleecing storage. (The
        // engine only uses write-behind when one lock unit fits in the buffer.)
        let (behind, deadline) = match store {
            Store::Behind(wb, deadline) => {
                wb.reserve(want, deadline)?;
                (Some(wb), deadline)
            }
            Store::Now => (None, None),
        };
        let mut copies = Vec::new();
        let result = copy_unit(
            source,
            cluster,
            access,
            in_unit,
            unit - 1,
            (behind, deadline),
            &mut copies,
        );
        if let Some(wb) = behind {
            // Whatever was published must be stored, also when a later run failed.
            let used: u64 = copies.iter().map(|c| c.data.len() as u64).sum();
            wb.submit(access, copies, want - used);
        }
        result?;
    }
    Ok(())
}

/// Copies the clusters of `in_unit` (lock unit `unit`) that need it, under its stripe
/// lock. With write-behind, old data goes into `copies`, published in the pending map,
/// and the stripe lock is waited for at most until the deadline: a snapshot reader
/// holding it may be stuck reading slow fleecing storage, and the writer runs in its own
/// thread, not on the copy pool that bounds synchronous copies.
fn copy_unit(
    source: &Source,
    cluster: ClusterSize,
    access: &DeviceAccess,
    in_unit: Range<u64>,
    unit: u64,
    (behind, deadline): (Option<&WriteBehind>, Option<std::time::Instant>),
    copies: &mut Vec<Arc<PendingCopy>>,
) -> Result<()> {
    let size = source.size();
    let stripe = access.stripe(unit);
    let _g = match deadline {
        None => stripe.write().unwrap_or_else(|p| p.into_inner()),
        Some(d) => match access.wait_stripe(|| stripe.try_write(), Some(d)) {
            Some(g) => g,
            None if access.is_broken() => return Ok(()),
            None => {
                return Err(Error::new(
                    Kind::TimedOut,
                    format!(
                        "copy-before-write on device {} waited longer than the timeout for a snapshot read of the same clusters",
                        access.name
                    ),
                ))
            }
        },
    };
    if access.is_broken() {
        return Ok(());
    }
    let mut c = in_unit.start;
    while c < in_unit.end {
        if !access.needs_copy(c) {
            c += 1;
            continue;
        }
        let run_start = c;
        while c < in_unit.end && access.needs_copy(c) {
            c += 1;
        }
        let bytes = cluster.byte_range(run_start..c, size);
        let n = bytes.end - bytes.start;
        access.policy.budget.reserve(n)?;
        let copied = match behind {
            Some(wb) => {
                let mut data = wb.buffer(n as usize);
                source.read_at(&mut data, bytes.start).map(|()| {
                    let copy = Arc::new(PendingCopy {
                        first: run_start,
                        clusters: c - run_start,
                        offset: bytes.start,
                        data,
                    });
                    access.pending.insert(&copy);
                    copies.push(copy);
                })
            }
            None => copy_bytes(source, access, bytes),
        };
        if let Err(e) = copied {
            access.policy.budget.release(n);
            return Err(e);
        }
        access.copied.set_range(run_start..c);
        access.copied_bytes.fetch_add(n, Ordering::Relaxed);
    }
    Ok(())
}

fn copy_bytes(source: &Source, access: &DeviceAccess, bytes: Range<u64>) -> Result<()> {
    inject_copy_fault()?;
    let mut pos = bytes.start;
    while pos < bytes.end {
        let n = ((bytes.end - pos) as usize).min(COPY_CHUNK);
        with_copy_buf(n, |buf| {
            source.read_at(buf, pos)?;
            access.fleece.write_at(buf, pos)
        })?;
        pos += n as u64;
    }
    Ok(())
}

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
//! in the access's pending map (write-behind, see `cbw/writebehind.rs`), and `copied[c]` is
//! set, **before** `w` reaches the source. A pending copy leaves the map only once it is
//! in the fleecing file, the access is broken, or nobody can read it (discarded, or the
//! access ended). And for every write: `c` is marked in
//! every tracking bitmap (flushed, when crash-safe) before `w` reaches the source.
//! Readers therefore find point-in-time data either in the source (`!copied[c]`: nobody
//! has written it since setup), or in the pending map, or in the fleecing file.
//!
//! # Locks and their order
//! Taken only in this order (docs/architecture.md, "Invariants and lock order", argues
//! why this cannot deadlock):
//! 0. the drain gate of a planned restart (`keeper::GATE`): data requests enter it first
//!    and leave it last; while open it is two atomics, no lock
//! 1. `Engine::control` (setup, teardown, status, bitmap remove, resize, device add and
//!    remove, shutdown; never on the data path)
//!
//!    1a. the device table (`RwLock` of the devices by slot): written only under
//!    `Engine::control`; read just long enough to clone one `Arc<Device>`, never held
//!    while a gate is taken or I/O is done
//! 2. device gates, in device index order (exclusive only in setup/teardown; every live
//!    write and discard holds its device's gate shared for its whole duration, so setup
//!    and teardown happen between them, at one instant for all devices; a snapshot read
//!    takes it shared only to check, after reading a lock unit, that its access is still
//!    the device's, and returns ESTALE if the access ended meanwhile)
//! 3. one *stripe* lock of the access (`RwLock<()>` per lock unit of clusters, striped).
//!    Copy and discard hold it exclusive; a snapshot read takes it shared only to check
//!    the unit's bits after reading the unit without locks (`Device::read_snapshot`), and
//!    never together with the gate. **A thread holds at most one stripe lock at a time**,
//!    so stripe locks cannot deadlock.
//!    Discards, write-behind copies and snapshot reads wait for a stripe by polling it
//!    (discards and copies at most the copy timeout) and stop once the access breaks.
//! 4. bitmaps are atomic words: no lock.
//! 5. leaves, never held while taking another lock: a pending map's mutex, the
//!    write-behind state mutex, a device's last error, a bitmap file's header. A writer
//!    waits for room in the write-behind buffer before it takes a stripe lock.
//!
//! A copy and a discard of the same cluster are serialized by the stripe lock; a snapshot
//! read that overlapped either finds out under the stripe lock afterwards and reads the
//! cluster again (or stops where it was discarded). Operations on different lock units
//! run in parallel.

pub mod access;
mod copy;
mod handles;
pub mod policy;
mod vectored;
pub mod writebehind;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::SystemTime;

use crate::bitmap::Bitmap;
use crate::bitmap_file::TrackedBitmap;
use crate::error::{Error, Kind, Result};
use crate::fleece::FleecingFile;
use crate::source::Source;
use crate::sync::Recover;
use crate::sys;
use crate::units::{ClusterIdx, ClusterSize};
use copy::{copy_clusters, with_copy_buf, Store};

pub use access::{AccessStats, CbwPolicy, DeviceAccess, DeviceShape, PendingMap, LOCK_UNIT_MIN};
pub use policy::{Broken, OnCbwError};

/// What every data operation of a device reads under its gate.
#[derive(Default)]
pub struct GateState {
    /// The active access, if any.
    pub access: Option<Arc<DeviceAccess>>,
    /// Bitmaps that record live writes.
    pub tracking: Vec<Arc<TrackedBitmap>>,
}

/// Most source runs one pass of a snapshot read reads before it checks them: bounds the
/// record a pass keeps (on the stack) when copied and uncopied clusters alternate.
const SOURCE_RUNS_PER_PASS: usize = 32;

/// A device: a source image, its live view and (during an access) its snapshot view.
pub struct Device {
    name: String,
    source: Arc<Source>,
    cluster: ClusterSize,
    gate: RwLock<GateState>,
    last_error: Mutex<Option<(String, SystemTime)>>,
    /// Open handles of `live/NAME` (a device with open handles cannot be removed).
    open_handles: AtomicU64,
    /// `device remove` of the device is under way: no new handle is opened.
    removing: AtomicBool,
    /// `live/NAME` was opened through the mount: the kernel may hold pages of it (a
    /// cached open, a mapping), which changes made by another frontend must drop.
    opened_through_mount: AtomicBool,
    /// Open read-write handles of `snapshot/NAME` (the FUSE adapter keeps snapshot pages
    /// out of the page cache while there are any).
    rw_snapshot_handles: AtomicU64,
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
            open_handles: AtomicU64::new(0),
            removing: AtomicBool::new(false),
            opened_through_mount: AtomicBool::new(false),
            rw_snapshot_handles: AtomicU64::new(0),
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
        self.last_error.lock().recover().clone()
    }

    fn note_source_error(&self, e: &Error) {
        let text = crate::error::report(e);
        log::warn!("device {}: {text}", self.name);
        *self.last_error.lock().recover() = Some((text, SystemTime::now()));
    }

    fn gate(&self) -> RwLockReadGuard<'_, GateState> {
        // A poisoned gate only means a thread panicked while holding it; what it guards
        // (an Option<Arc> and a Vec of Arcs) is never left half-updated, so keep serving.
        self.gate.read().recover()
    }

    /// A new access of this device over `frozen` (the clusters to expose) using
    /// `fleece`. Cannot fail, so the engine builds it while holding the gates.
    pub fn new_access(
        &self,
        id: u64,
        frozen: Arc<Bitmap>,
        fleece: FleecingFile,
        policy: CbwPolicy,
    ) -> DeviceAccess {
        let shape = DeviceShape {
            name: &self.name,
            cluster: self.cluster,
            size: self.size(),
        };
        DeviceAccess::new(id, shape, frozen, fleece, policy)
    }

    /// The current access, if any.
    pub fn access(&self) -> Option<Arc<DeviceAccess>> {
        self.gate().access.clone()
    }

    /// The gate, exclusively: no data operation of this device runs while it is held.
    /// The engine takes the gates of all devices it switches, in device index order.
    pub fn lock_gate(&self) -> std::sync::RwLockWriteGuard<'_, GateState> {
        self.gate.write().recover()
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
                    "device {} has a size of {} bytes; {offset}+{len} is past its end",
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
        // Under the gate: a resize changes the size only while holding it exclusively.
        let gate = self.gate();
        let size = self.size();
        if offset >= size {
            self.check_range(offset, data.len() as u64)?;
        }
        let data = &data[..data.len().min((size - offset) as usize)];
        let len = data.len() as u64;
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
        // refuse otherwise. Under the gate, like writes (see `write_live`).
        let gate = self.gate();
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
        let clusters = first..clusters.end.min(access.nclusters);
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
        let size = access.size;
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let end = size.min(offset + buf.len() as u64);
        let mut pos = offset;
        while pos < end {
            // Two steps. First read without any lock, by the bits as they are now: copied
            // clusters from the pending map or the fleecing file, the others from the
            // source, each run of clusters with the same location in one read (across
            // lock units, so that a direct read of the source is large: a 64 KiB direct
            // read costs the CPU ten times what a 1 MiB one does per byte). Then check,
            // under the gate and then each unit's stripe in turn (shared, each only for a
            // few bit tests), that what was read is still the point-in-time data: the
            // access is still the device's (after teardown, writes no longer copy first),
            // every cluster read is still accessible (a discard punches the fleecing file
            // only after clearing it, under the stripe), and every cluster read from the
            // source is still not copied (a writer sets `copied` under the stripe before
            // its write reaches the source). Reading resumes at the first cluster that
            // failed the check (its bits change at most once each, so this ends). So a
            // read holds no lock while it copies data: a reader on the backup pool at idle
            // priority (src/sched/), or one stuck in slow fleecing storage, never holds
            // up a live write, a discard or a teardown.
            let mut source_runs = [(0u64, 0u64); SOURCE_RUNS_PER_PASS];
            let mut nruns = 0;
            let mut read_end = pos;
            while read_end < end {
                let c = self.cluster.index_of(read_end);
                if !access.accessible.get(c.0) {
                    break;
                }
                let from_fleece = access.copied.get(c.0);
                if !from_fleece && nruns == SOURCE_RUNS_PER_PASS {
                    break;
                }
                // Extend over clusters with the same location (fleecing or source).
                let mut run_end = self.cluster.start_of(c.next()).min(end);
                while run_end < end {
                    let n = self.cluster.index_of(run_end);
                    if !access.accessible.get(n.0) || access.copied.get(n.0) != from_fleece {
                        break;
                    }
                    run_end = self.cluster.start_of(n.next()).min(end);
                }
                let dst = &mut buf[(read_end - offset) as usize..(run_end - offset) as usize];
                if from_fleece {
                    access.read_copied(dst, read_end)?;
                } else {
                    source_runs[nruns] = (read_end, run_end);
                    nruns += 1;
                    self.source
                        .read_for_backup(dst, read_end)
                        .inspect_err(|e| self.note_source_error(e))?;
                }
                read_end = run_end;
            }
            if read_end > pos {
                {
                    let gate = self.gate();
                    if !matches!(gate.access.as_ref(), Some(a) if Arc::ptr_eq(a, &access)) {
                        // Torn down (retired) meanwhile: ESTALE below.
                        break;
                    }
                }
                let from_source = |at: u64| {
                    source_runs[..nruns]
                        .iter()
                        .any(|r| (r.0..r.1).contains(&at))
                };
                let valid_end = self.valid_end(&access, pos, read_end, from_source)?;
                if valid_end < read_end {
                    pos = valid_end;
                    continue;
                }
            }
            pos = read_end;
            if pos < end && !access.accessible.get(self.cluster.index_of(pos).0) {
                // An inaccessible cluster (bits never become accessible again); else the
                // pass stopped at SOURCE_RUNS_PER_PASS and the next one goes on.
                if pos == offset {
                    return Err(Error::new(
                        Kind::Inaccessible,
                        format!(
                            "snapshot/{} at {offset} was discarded or is not in the dirty map",
                            self.name
                        ),
                    ));
                }
                break;
            }
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

    /// The end of the longest prefix of `pos..read_end`, just read by `read_snapshot`,
    /// that is still the point-in-time data: every cluster still accessible, and every one
    /// read from the source (`from_source` of an offset in it) still not copied. Checks
    /// each lock unit under its stripe, shared, one at a time.
    fn valid_end(
        &self,
        access: &DeviceAccess,
        pos: u64,
        read_end: u64,
        from_source: impl Fn(u64) -> bool,
    ) -> Result<u64> {
        let mut at = pos;
        while at < read_end {
            let unit = at >> access.unit_shift;
            let unit_end = ((unit + 1) << access.unit_shift).min(read_end);
            let stripe = access.stripe(unit);
            let Some(_g) = access.wait_stripe(|| stripe.try_read(), None) else {
                return Err(self.broken_error(access));
            };
            while at < unit_end {
                let c = self.cluster.index_of(at);
                if !access.accessible.get(c.0) || (from_source(at) && access.copied.get(c.0)) {
                    return Ok(at);
                }
                at = self.cluster.start_of(c.next()).min(unit_end);
            }
        }
        Ok(read_end)
    }

    /// SEEK_DATA (`data`) or SEEK_HOLE on the snapshot of access `access_id`: the first
    /// data (hole) at or after `offset`, `None` for ENXIO. Inaccessible clusters are holes;
    /// copied ones are data (their old data may be in memory, not yet in the fleecing
    /// file); uncopied ones are the source's own map. A hole is never reported where the
    /// point-in-time image has data: a cluster still uncopied *after* the source was asked
    /// was not written since setup when it was asked (the copied bit is set before a write
    /// reaches the source), and one copied meanwhile counts as data. No lock is taken.
    /// The search goes no further than `limit` (what a caller needs only up to there must
    /// not cost a walk to the next data far beyond): then `None`, or a hole at `limit`.
    pub fn seek_snapshot(
        &self,
        access_id: u64,
        offset: u64,
        data: bool,
        limit: u64,
    ) -> Result<Option<u64>> {
        let access = {
            let gate = self.gate();
            self.current_access(&gate, access_id)?.clone()
        };
        let r = if offset >= self.size() {
            None
        } else if data {
            self.next_snapshot_data(&access, offset, limit)?
        } else {
            Some(self.next_snapshot_hole(&access, offset, limit)?)
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

    fn next_snapshot_data(
        &self,
        access: &DeviceAccess,
        mut pos: u64,
        limit: u64,
    ) -> Result<Option<u64>> {
        let size = self.size().min(limit);
        // Cluster indices as plain bit numbers of the access's bitmaps.
        let idx = |off: u64| self.cluster.index_of(off).0;
        let start = |c: u64| self.cluster.start_of(ClusterIdx(c));
        loop {
            if pos >= size {
                return Ok(None);
            }
            let c = idx(pos);
            if !access.accessible.get(c) {
                match access.accessible.next(c, true) {
                    Some(n) => pos = start(n),
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
            let end = found.map_or(idx(size - 1) + 1, |d| idx(d) + 1);
            for copied in access.copied.runs(c..end) {
                if let Some(run) = access.accessible.runs(copied).next() {
                    return Ok(Some(pos.max(start(run.start))));
                }
            }
            let Some(d) = found else {
                return Ok(None);
            };
            if access.accessible.get(idx(d)) {
                return Ok(Some(d));
            }
            pos = start(idx(d) + 1);
        }
    }

    fn next_snapshot_hole(&self, access: &DeviceAccess, mut pos: u64, limit: u64) -> Result<u64> {
        let size = self.size().min(limit);
        let idx = |off: u64| self.cluster.index_of(off).0;
        let start = |c: u64| self.cluster.start_of(ClusterIdx(c));
        loop {
            if pos >= size {
                return Ok(size);
            }
            let c = idx(pos);
            if !access.accessible.get(c) {
                return Ok(pos);
            }
            if access.copied.get(c) {
                let end = access.copied.next(c, false).unwrap_or(self.clusters());
                let end = access.accessible.next(c, false).map_or(end, |n| n.min(end));
                pos = start(end);
                continue;
            }
            let h = self
                .source
                .seek(pos, false)
                .inspect_err(|e| self.note_source_error(e))?
                .unwrap_or(size)
                .min(size);
            // Data up to h in the source; an inaccessible cluster before it is a hole.
            let end = if h > pos { idx(h - 1) + 1 } else { c + 1 };
            if let Some(n) = access.accessible.next(c, false).filter(|&n| n < end) {
                return Ok(pos.max(start(n)));
            }
            if h >= size {
                return Ok(size);
            }
            let ch = idx(h);
            if !access.accessible.get(ch) || !access.copied.get(ch) {
                return Ok(h);
            }
            pos = start(ch + 1);
        }
    }

    /// Discards `[offset, offset+len)` of the snapshot: whole clusters inside it (aligned
    /// inward) become inaccessible, their fleecing space is released, and live writes
    /// there copy nothing from now on.
    pub fn discard_snapshot(&self, access_id: u64, offset: u64, len: u64) -> Result<()> {
        let gate = self.gate();
        let access = self.current_access(&gate, access_id)?;
        let size = access.size;
        let clusters = self.cluster.inward(offset, len, size);
        if clusters.is_empty() {
            return Ok(());
        }
        let unit_of = |c: u64| self.cluster.start_of(ClusterIdx(c)) >> access.unit_shift;
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

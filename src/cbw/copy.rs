//! The slow path of copy-before-write: copying the old data of clusters that still need
//! it, lock unit by lock unit under the stripe lock, into the fleecing file or (with
//! write-behind) into the access's pending map.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::cbw::access::DeviceAccess;
use crate::cbw::policy::inject_copy_fault;
use crate::cbw::writebehind::{CopyTarget, PendingCopy, WriteBehind};
use crate::error::{Error, Kind, Result};
use crate::source::Source;
use crate::sync::Recover;
use crate::units::{ClusterIdx, ClusterSize};

/// Largest buffer one copy step uses; bigger clusters are copied in pieces.
const COPY_CHUNK: usize = 1 << 20;

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

/// Where [`copy_clusters`] puts old data.
pub(super) enum Store<'a> {
    /// In the fleecing file, before returning.
    Now,
    /// In memory, stored later by the write-behind buffer; waits for room in it at most
    /// until the deadline.
    Behind(&'a WriteBehind, Option<std::time::Instant>),
}

/// The slow path of copy-before-write: lock unit by unit, re-check, copy runs of
/// clusters from the source (to the fleecing file, or to memory with write-behind),
/// then mark them copied.
pub(super) fn copy_clusters(
    source: &Source,
    cluster: ClusterSize,
    access: &Arc<DeviceAccess>,
    clusters: Range<u64>,
    store: Store<'_>,
) -> Result<()> {
    let size = source.size();
    let unit_of = |c: u64| cluster.start_of(ClusterIdx(c)) >> access.unit_shift;
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
            let target: Arc<dyn CopyTarget> = access.clone();
            wb.submit(&target, copies, want - used);
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
pub(super) fn copy_unit(
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
        None => stripe.write().recover(),
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

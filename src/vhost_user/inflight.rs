//! The inflight region of vhost-user (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): shared
//! memory that records which requests a worker took off a queue and has not completed,
//! so that the worker after it resubmits them.
//!
//! Layout (split virtqueues, as QEMU's libvhost-user lays it out, so a VMM may keep a
//! region across backends): one part per queue, each `queue_part_len(queue_size)` bytes
//! (a multiple of 64), holding a 16-byte header
//! `{ features: u64, version: u16, desc_num: u16, last_batch_head: u16, used_idx: u16 }`
//! and then `desc_num` 16-byte entries `{ inflight: u8, padding: [u8; 5], next: u16,
//! counter: u64 }`, one per descriptor index (little endian).
//!
//! Ordering (per queue, from one thread at a time):
//! - take: a chain popped off the available ring gets `counter` (increasing), then
//!   `inflight = 1`, before any of it is executed;
//! - complete: `last_batch_head = head`; the used entry and the used index are published
//!   (the guest may now reuse the descriptors); `inflight = 0`; `used_idx = ` the used
//!   index just published.
//!
//! Recovery after a restart (`recover`): the used index in guest memory one past the
//! region's `used_idx` means the worker died between publishing a completion and
//! clearing its entry: `last_batch_head` is cleared then, so it is not completed twice.
//! Every entry still marked is resubmitted, in counter order, and the next available
//! index is the used index plus their number (what was taken is what completed plus what
//! is marked). The region is shared with the VMM and outlives the worker that wrote it,
//! so it is read as untrusted: every index is bounds-checked, and a region that does
//! not hold together (version, size, indices, marks) counts as no inflight state.

use std::fs::File;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// Each queue's part is a multiple of this (libvhost-user's `INFLIGHT_ALIGNMENT`).
const PART_ALIGN: usize = 64;
/// The header of a queue's part.
const HEADER_LEN: usize = 16;
/// One descriptor's entry.
const ENTRY_LEN: usize = 16;
/// The layout version written in a fresh part.
const VERSION: u16 = 1;

/// Header field offsets in a queue's part.
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
/// Entry field offsets.
const INFLIGHT_AT: usize = 0;
const COUNTER_AT: usize = 8;

/// Bytes of one queue's part for queues of `queue_size` descriptors. libvhost-user counts
/// the entries and a `u16`, not the whole header, before aligning; the alignment always
/// leaves room for the header (the entries are a multiple of 16 bytes).
pub fn queue_part_len(queue_size: u16) -> usize {
    (ENTRY_LEN * usize::from(queue_size) + 2).next_multiple_of(PART_ALIGN)
}

/// Why a region (or one queue's part of it) cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable(pub String);

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A mapped inflight region: `queues` parts of `queue_size` descriptors each.
pub struct Region {
    map: memmap2::MmapMut,
    queues: u16,
    queue_size: u16,
}

impl Region {
    /// The bytes a region of `queues` queues of `queue_size` descriptors needs.
    pub fn len_for(queues: u16, queue_size: u16) -> usize {
        usize::from(queues) * queue_part_len(queue_size)
    }

    /// A new zero-filled region in a sealed memory file (returned to be handed to the VMM).
    pub fn create(queues: u16, queue_size: u16) -> std::io::Result<(Region, File)> {
        check_shape(queues, queue_size).map_err(|u| std::io::Error::other(u.0))?;
        let len = Region::len_for(queues, queue_size);
        let file = crate::sys::sealed_memfd(c"fleecefs-vhost-inflight", len as u64)?;
        let map = crate::sys::map_shared(&file, 0, len)?;
        Ok((
            Region {
                map,
                queues,
                queue_size,
            },
            file,
        ))
    }

    /// Maps the region the VMM gave back: `len` bytes at `offset` of `file`, for `queues`
    /// queues of `queue_size` descriptors. Refused (nothing mapped) unless the file is a
    /// memory file sealed against shrinking that holds the whole region, at an offset
    /// aligned for the fields, of at least the size the layout needs.
    pub fn map(
        file: &File,
        offset: u64,
        len: u64,
        queues: u16,
        queue_size: u16,
    ) -> Result<Region, Unusable> {
        check_shape(queues, queue_size)?;
        let need = Region::len_for(queues, queue_size);
        if len < need as u64 {
            return Err(Unusable(format!(
                "{len} bytes for {queues} queue(s) of {queue_size} need {need}"
            )));
        }
        if offset % PART_ALIGN as u64 != 0 {
            return Err(Unusable(format!("offset {offset} is not aligned")));
        }
        if !crate::sys::cannot_shrink(file) {
            return Err(Unusable("the file is not sealed against shrinking".into()));
        }
        let size = file
            .metadata()
            .map_err(|e| Unusable(format!("reading its size: {e}")))?
            .len();
        if offset.checked_add(need as u64).is_none_or(|end| end > size) {
            return Err(Unusable(format!(
                "{need} bytes at offset {offset} are past the end of the file ({size} bytes)"
            )));
        }
        let map = crate::sys::map_shared(file, offset, need)
            .map_err(|e| Unusable(format!("mapping it: {e}")))?;
        Ok(Region {
            map,
            queues,
            queue_size,
        })
    }

    /// Queue `q`'s part, if the region has one.
    pub fn queue(self: &Arc<Self>, q: usize) -> Option<QueueLog> {
        (q < usize::from(self.queues)).then(|| QueueLog {
            region: self.clone(),
            start: q * queue_part_len(self.queue_size),
            size: self.queue_size,
        })
    }
}

fn check_shape(queues: u16, queue_size: u16) -> Result<(), Unusable> {
    if queues == 0 || queue_size == 0 || usize::from(queue_size) > super::backend::MAX_QUEUE_SIZE {
        return Err(Unusable(format!(
            "{queues} queue(s) of {queue_size} descriptors"
        )));
    }
    Ok(())
}

/// One queue's part of a region.
#[derive(Clone)]
pub struct QueueLog {
    region: Arc<Region>,
    /// Offset of the part in the mapping (a multiple of 64).
    start: usize,
    /// Descriptors of the queue (entries of the part).
    size: u16,
}

/// What [`QueueLog::recover`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Head indices of the requests to resubmit, oldest first.
    pub resubmit: Vec<u16>,
    /// Where the available ring continues (the used index plus the requests resubmitted).
    pub next_avail: u16,
    /// The counter the next request taken gets.
    pub next_counter: u64,
}

impl QueueLog {
    fn u16_at(&self, at: usize) -> &AtomicU16 {
        debug_assert!(at % 2 == 0 && at + 2 <= queue_part_len(self.size));
        // SAFETY: `start + at` is inside the mapping (the part is `queue_part_len` bytes,
        // every caller's offset is a header field or an entry below `size`), aligned to
        // 2 (the mapping is page aligned, `start` a multiple of 64, `at` even), and the
        // mapping lives as long as `self.region`. Other processes (the VMM) may write the
        // same bytes; atomics make such accesses defined.
        unsafe { &*(self.region.map.as_ptr().add(self.start + at) as *const AtomicU16) }
    }

    fn u8_at(&self, at: usize) -> &AtomicU8 {
        debug_assert!(at < queue_part_len(self.size));
        // SAFETY: as in `u16_at`, for one byte.
        unsafe { &*(self.region.map.as_ptr().add(self.start + at) as *const AtomicU8) }
    }

    fn u64_at(&self, at: usize) -> &AtomicU64 {
        debug_assert!(at % 8 == 0 && at + 8 <= queue_part_len(self.size));
        // SAFETY: as in `u16_at`; `at` is a multiple of 8 (header and entries are 16
        // bytes, the counter at 8 in an entry).
        unsafe { &*(self.region.map.as_ptr().add(self.start + at) as *const AtomicU64) }
    }

    /// The entry of descriptor `head`, if the queue has one.
    fn entry(&self, head: u16) -> Option<usize> {
        (head < self.size).then(|| HEADER_LEN + usize::from(head) * ENTRY_LEN)
    }

    /// Records that the chain at `head` was taken off the available ring, as number
    /// `counter`. A head outside the queue is not recorded (virtio-queue does not hand
    /// out such chains).
    pub fn take(&self, head: u16, counter: u64) {
        if let Some(e) = self.entry(head) {
            self.u64_at(e + COUNTER_AT)
                .store(counter.to_le(), Ordering::Relaxed);
            self.u8_at(e + INFLIGHT_AT).store(1, Ordering::Release);
        }
    }

    /// Before the used entry of `head` is published.
    pub fn before_used(&self, head: u16) {
        if head < self.size {
            self.u16_at(LAST_BATCH_HEAD_AT)
                .store(head.to_le(), Ordering::Release);
        }
    }

    /// After the used entry of `head` was published and the used index is `used_idx`.
    pub fn after_used(&self, head: u16, used_idx: u16) {
        if let Some(e) = self.entry(head) {
            self.u8_at(e + INFLIGHT_AT).store(0, Ordering::Release);
        }
        self.u16_at(USED_IDX_AT)
            .store(used_idx.to_le(), Ordering::Release);
    }

    /// Starts the part afresh (no request in flight) for a ring whose used index is
    /// `used_idx`.
    pub fn reset(&self, used_idx: u16) {
        for head in 0..self.size {
            if let Some(e) = self.entry(head) {
                self.u8_at(e + INFLIGHT_AT).store(0, Ordering::Relaxed);
            }
        }
        self.u16_at(DESC_NUM_AT)
            .store(self.size.to_le(), Ordering::Relaxed);
        self.u16_at(LAST_BATCH_HEAD_AT).store(0, Ordering::Relaxed);
        self.u16_at(USED_IDX_AT)
            .store(used_idx.to_le(), Ordering::Relaxed);
        self.u16_at(VERSION_AT)
            .store(VERSION.to_le(), Ordering::Release);
    }

    /// Reads the part when a queue starts, with `used_idx` the used index in guest memory
    /// and `ring_size` the queue's size. A fresh part (version 0) is initialized and has
    /// nothing to resubmit. A part that does not hold together is an error; the caller
    /// then [`reset`](Self::reset)s it.
    pub fn recover(&self, used_idx: u16, ring_size: u16) -> Result<Recovery, Unusable> {
        let version = u16::from_le(self.u16_at(VERSION_AT).load(Ordering::Acquire));
        if version == 0 {
            self.reset(used_idx);
            return Ok(Recovery {
                resubmit: Vec::new(),
                next_avail: used_idx,
                next_counter: 0,
            });
        }
        if version != VERSION {
            return Err(Unusable(format!("layout version {version}")));
        }
        let desc_num = u16::from_le(self.u16_at(DESC_NUM_AT).load(Ordering::Relaxed));
        if desc_num != self.size || ring_size != self.size {
            return Err(Unusable(format!(
                "{desc_num} descriptors recorded, the region is for {}, the queue has {ring_size}",
                self.size
            )));
        }
        let logged_used = u16::from_le(self.u16_at(USED_IDX_AT).load(Ordering::Relaxed));
        match used_idx.wrapping_sub(logged_used) {
            0 => {}
            1 => {
                // Died after publishing a completion, before clearing its entry.
                let head = u16::from_le(self.u16_at(LAST_BATCH_HEAD_AT).load(Ordering::Relaxed));
                let e = self.entry(head).ok_or_else(|| {
                    Unusable(format!("last completed head {head} is out of range"))
                })?;
                self.u8_at(e + INFLIGHT_AT).store(0, Ordering::Release);
                self.u16_at(USED_IDX_AT)
                    .store(used_idx.to_le(), Ordering::Release);
            }
            _ => {
                return Err(Unusable(format!(
                    "used index {used_idx} in guest memory, {logged_used} recorded"
                )))
            }
        }
        let mut marked = Vec::new();
        for head in 0..self.size {
            let Some(e) = self.entry(head) else { break };
            match self.u8_at(e + INFLIGHT_AT).load(Ordering::Acquire) {
                0 => {}
                1 => {
                    let counter = u64::from_le(self.u64_at(e + COUNTER_AT).load(Ordering::Relaxed));
                    marked.push((counter, head));
                }
                v => {
                    return Err(Unusable(format!(
                        "descriptor {head} is marked {v}, neither 0 nor 1"
                    )))
                }
            }
        }
        marked.sort_unstable();
        let next_counter = marked.last().map_or(0, |&(c, _)| c.saturating_add(1));
        let n = u16::try_from(marked.len()).unwrap_or(u16::MAX);
        Ok(Recovery {
            resubmit: marked.into_iter().map(|(_, head)| head).collect(),
            next_avail: used_idx.wrapping_add(n),
            next_counter,
        })
    }
}

/// The inflight state of one queue: its part of the region (when the VMM uses one), the
/// counter of the next request taken, and whether the part still has to be read (after
/// the VMM handed a region, before the queue's first requests).
#[derive(Default)]
pub struct Tracker {
    log: Option<QueueLog>,
    counter: u64,
    pending: bool,
}

impl Tracker {
    /// Uses `log` from now on; it is read (and its requests resubmitted) before the
    /// queue's next requests.
    pub fn attach(&mut self, log: Option<QueueLog>) {
        self.pending = log.is_some();
        self.log = log;
        self.counter = 0;
    }

    /// The part to read, once after [`attach`](Self::attach).
    pub fn take_pending(&mut self) -> Option<QueueLog> {
        if std::mem::take(&mut self.pending) {
            self.log.clone()
        } else {
            None
        }
    }

    /// Continues after recovery with `next_counter`.
    pub fn resume(&mut self, next_counter: u64) {
        self.counter = next_counter;
    }

    /// Records the chain at `head` as taken.
    pub fn take(&mut self, head: u16) {
        if let Some(log) = &self.log {
            log.take(head, self.counter);
            self.counter = self.counter.wrapping_add(1);
        }
    }

    /// Completes `head`: `publish` adds its used entry and returns the new used index.
    pub fn complete<E>(
        &mut self,
        head: u16,
        publish: impl FnOnce() -> Result<u16, E>,
    ) -> Result<(), E> {
        if let Some(log) = &self.log {
            log.before_used(head);
        }
        let used = publish()?;
        if let Some(log) = &self.log {
            log.after_used(head, used);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost::vhost_user::message::DescStateSplit;

    fn region(queues: u16, size: u16) -> Arc<Region> {
        Arc::new(Region::create(queues, size).unwrap().0)
    }

    /// Sizes and offsets as libvhost-user and the vhost crate's structures have them.
    #[test]
    fn layout_matches_libvhost_user() {
        // (vhost's `QueueRegionSplit` has a trailing pointer field that libvhost-user's
        // header does not: the header is checked byte by byte below instead.)
        assert_eq!(std::mem::size_of::<DescStateSplit>(), ENTRY_LEN);
        // ALIGN_UP(16 * size + 2, 64)
        assert_eq!(queue_part_len(128), 2112);
        assert_eq!(queue_part_len(256), 4160);
        assert_eq!(queue_part_len(1024), 16448);
        assert_eq!(queue_part_len(3), 64);
        for size in 1..=1024u16 {
            let len = queue_part_len(size);
            assert_eq!(len % PART_ALIGN, 0);
            assert!(
                HEADER_LEN + ENTRY_LEN * usize::from(size) <= len,
                "size {size}"
            );
        }
        assert_eq!(Region::len_for(2, 256), 2 * 4160);
        // Byte positions, read back through the file the VMM would keep.
        let (r, file) = Region::create(2, 4).unwrap();
        let r = Arc::new(r);
        let q1 = r.queue(1).unwrap();
        q1.reset(7);
        q1.take(2, 0x0102_0304_0506_0708);
        q1.before_used(3);
        let mut bytes = vec![0u8; Region::len_for(2, 4)];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, 0).unwrap();
        let p = queue_part_len(4);
        assert_eq!(&bytes[p + 8..p + 16], &[1, 0, 4, 0, 3, 0, 7, 0]);
        let e = p + HEADER_LEN + 2 * ENTRY_LEN;
        assert_eq!(bytes[e], 1);
        assert_eq!(
            &bytes[e + 8..e + 16],
            &0x0102_0304_0506_0708u64.to_le_bytes()
        );
        assert!(bytes[..p].iter().all(|&b| b == 0), "queue 0 untouched");
        assert!(r.queue(2).is_none());
    }

    #[test]
    fn fresh_part_is_initialized_and_has_nothing_to_resubmit() {
        let r = region(1, 8);
        let q = r.queue(0).unwrap();
        let rec = q.recover(5, 8).unwrap();
        assert_eq!(
            rec,
            Recovery {
                resubmit: vec![],
                next_avail: 5,
                next_counter: 0
            }
        );
        // Now it is a version-1 part: a second look finds the same.
        assert_eq!(q.recover(5, 8).unwrap().next_avail, 5);
    }

    /// Requests completed out of order: the ones still marked come back oldest first, and
    /// the available ring continues past everything taken.
    #[test]
    fn marked_requests_resubmit_in_counter_order() {
        let r = region(1, 8);
        let mut t = Tracker::default();
        t.attach(r.queue(0));
        assert!(t.take_pending().unwrap().recover(0, 8).is_ok());
        for head in [4, 1, 6, 2] {
            t.take(head);
        }
        // 1 and 2 complete; 4 and 6 stay in flight.
        let mut used = 0u16;
        for head in [1, 2] {
            t.complete::<()>(head, || {
                used += 1;
                Ok(used)
            })
            .unwrap();
        }
        let rec = r.queue(0).unwrap().recover(2, 8).unwrap();
        assert_eq!(rec.resubmit, vec![4, 6]);
        assert_eq!(rec.next_avail, 4);
        assert_eq!(rec.next_counter, 3);
    }

    /// The worker died after publishing a completion and before clearing its entry: the
    /// request is not resubmitted (it would complete twice), and the part is repaired.
    #[test]
    fn death_between_used_published_and_entry_cleared() {
        let r = region(1, 8);
        let q = r.queue(0).unwrap();
        q.recover(10, 8).unwrap();
        q.take(3, 0);
        q.take(5, 1);
        q.before_used(3);
        // ...the used entry of 3 is published (used index 11), then the worker dies.
        let rec = q.recover(11, 8).unwrap();
        assert_eq!(rec.resubmit, vec![5]);
        assert_eq!(rec.next_avail, 12);
        // The repair is durable: the same part read again gives the same answer.
        assert_eq!(q.recover(11, 8).unwrap(), rec);
    }

    /// Died before publishing: the request is still in flight and is resubmitted.
    #[test]
    fn death_before_used_published() {
        let r = region(1, 8);
        let q = r.queue(0).unwrap();
        q.recover(0, 8).unwrap();
        q.take(3, 0);
        q.before_used(3);
        let rec = q.recover(0, 8).unwrap();
        assert_eq!(rec.resubmit, vec![3]);
        assert_eq!(rec.next_avail, 1);
    }

    fn poke(r: &Region, at: usize, bytes: &[u8]) {
        // SAFETY: test only, inside the mapping; no other access runs meanwhile.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                r.map.as_ptr().add(at) as *mut u8,
                bytes.len(),
            )
        }
    }

    /// A part that does not hold together is refused with a reason, never indexed out of
    /// range; after `reset` it is a clean part again.
    #[test]
    fn corrupt_parts_are_refused() {
        type Corrupt = Box<dyn Fn(&Region)>;
        // (what, how, used index in guest memory, queue size)
        let cases: Vec<(&str, Corrupt, u16, u16)> = vec![
            ("version", Box::new(|r| poke(r, VERSION_AT, &[9, 0])), 0, 8),
            (
                "desc_num",
                Box::new(|r| poke(r, DESC_NUM_AT, &[0xff, 0xff])),
                0,
                8,
            ),
            ("ring size", Box::new(|_| {}), 0, 16),
            (
                "last_batch_head",
                Box::new(|r| poke(r, LAST_BATCH_HEAD_AT, &[0xff, 0x7f])),
                1,
                8,
            ),
            ("used index jump", Box::new(|_| {}), 40, 8),
            (
                "mark",
                Box::new(|r| poke(r, HEADER_LEN + 7 * ENTRY_LEN, &[0x80])),
                0,
                8,
            ),
        ];
        for (what, corrupt, used, ring) in cases {
            let r = region(1, 8);
            let q = r.queue(0).unwrap();
            q.recover(0, 8).unwrap();
            q.take(2, 0);
            corrupt(&r);
            let err = q.recover(used, ring).expect_err(what);
            assert!(!err.0.is_empty());
            q.reset(used);
            let rec = q.recover(used, 8).unwrap();
            assert!(rec.resubmit.is_empty(), "{what}");
        }
    }

    #[test]
    fn regions_that_do_not_fit_are_not_mapped() {
        let (_, file) = Region::create(2, 64).unwrap();
        let len = Region::len_for(2, 64) as u64;
        assert!(Region::map(&file, 0, len, 2, 64).is_ok());
        // More queues or larger queues than the file holds.
        assert!(Region::map(&file, 0, len * 2, 4, 64).is_err());
        assert!(Region::map(&file, 0, len, 2, 128).is_err());
        // A size that says less than the layout needs.
        assert!(Region::map(&file, 0, len - 1, 2, 64).is_err());
        // Offsets past the end, or not aligned.
        assert!(Region::map(&file, 4096, len, 2, 64).is_err());
        assert!(Region::map(&file, 8, 64, 1, 1).is_err());
        assert!(Region::map(&file, u64::MAX - 63, len, 2, 64).is_err());
        // No queues, empty queues, queues larger than the device offers.
        assert!(Region::map(&file, 0, len, 0, 64).is_err());
        assert!(Region::map(&file, 0, len, 2, 0).is_err());
        assert!(Region::map(&file, 0, len, 1, 2048).is_err());
        // A file that could shrink under the mapping.
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(len).unwrap();
        assert!(Region::map(&plain, 0, len, 2, 64).is_err());
    }
}

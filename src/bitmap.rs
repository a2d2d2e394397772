//! Cluster bitmaps as atomic 64-bit words (rust-vmm's `atomic_bitmap.rs` style).
//!
//! The write path sets and tests bits with single atomic operations, so no mutex is
//! ever taken to track or check a cluster. A bitmap lives either on the heap or inside
//! a shared file mapping (persistent dirty bitmaps, see `bitmap_file.rs`); the operations
//! are the same.
//!
//! Invariant: bits at or beyond `len()` in the last word are always zero, so counts and
//! run scans never see phantom clusters.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;

const ACQ: Ordering = Ordering::Acquire;
const ACQREL: Ordering = Ordering::AcqRel;

enum Storage {
    Heap(Box<[AtomicU64]>),
    /// `words` points into `_map` at a 64-bit aligned offset; the mapping is never
    /// accessed other than through these atomics while the bitmap lives.
    Mapped {
        _map: MmapMut,
        words: *const AtomicU64,
        nwords: usize,
    },
}

// SAFETY: the raw pointer only refers into the owned mapping, and all access to it goes
// through atomic operations.
unsafe impl Send for Storage {}
// SAFETY: as for Send: shared access goes through atomic operations only.
unsafe impl Sync for Storage {}

/// A fixed-size bitmap of clusters with atomic bit operations.
pub struct Bitmap {
    storage: Storage,
    nbits: u64,
}

fn words_for(nbits: u64) -> usize {
    nbits.div_ceil(64) as usize
}

fn mask_below(bit: u64) -> u64 {
    if bit >= 64 {
        !0
    } else {
        (1u64 << bit) - 1
    }
}

impl Bitmap {
    /// A heap bitmap of `nbits` bits, all set to `fill`.
    pub fn new(nbits: u64, fill: bool) -> Self {
        let words: Box<[AtomicU64]> = (0..words_for(nbits)).map(|_| AtomicU64::new(0)).collect();
        let b = Bitmap {
            storage: Storage::Heap(words),
            nbits,
        };
        if fill {
            b.set_range(0..nbits);
        }
        b
    }

    /// A bitmap stored in `map` from byte `offset` (a multiple of 8) on. The mapping must
    /// be at least `offset + bytes_for(nbits)` long. Bits past `nbits` are cleared.
    pub fn from_mmap(map: MmapMut, offset: usize, nbits: u64) -> Self {
        let nwords = words_for(nbits);
        assert!(offset % 8 == 0, "bitmap offset must be 8-byte aligned");
        assert!(
            map.len() >= offset + nwords * 8,
            "mapping too small for bitmap"
        );
        // SAFETY: mappings are page aligned, so `offset % 8 == 0` keeps the pointer
        // aligned for AtomicU64; the range is inside the mapping (checked above), and the
        // mapping is owned by the bitmap and only touched through atomics from here on.
        let words = unsafe { map.as_ptr().add(offset) as *const AtomicU64 };
        let b = Bitmap {
            storage: Storage::Mapped {
                _map: map,
                words,
                nwords,
            },
            nbits,
        };
        b.clear_tail();
        b
    }

    /// Bytes of storage needed for `nbits` bits (whole 64-bit words).
    pub fn bytes_for(nbits: u64) -> usize {
        words_for(nbits) * 8
    }

    fn words(&self) -> &[AtomicU64] {
        match &self.storage {
            Storage::Heap(w) => w,
            // SAFETY: see `from_mmap`.
            Storage::Mapped { words, nwords, .. } => unsafe {
                std::slice::from_raw_parts(*words, *nwords)
            },
        }
    }

    fn clear_tail(&self) {
        let rem = self.nbits % 64;
        if rem != 0 {
            if let Some(last) = self.words().last() {
                last.fetch_and(mask_below(rem), ACQREL);
            }
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.nbits
    }

    /// True when the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.nbits == 0
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        debug_assert!(i < self.nbits);
        self.words()[(i / 64) as usize].load(ACQ) & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns whether it was already set.
    pub fn set(&self, i: u64) -> bool {
        debug_assert!(i < self.nbits);
        let bit = 1 << (i % 64);
        self.words()[(i / 64) as usize].fetch_or(bit, ACQREL) & bit != 0
    }

    /// Clears bit `i`; returns whether it was set.
    pub fn clear(&self, i: u64) -> bool {
        debug_assert!(i < self.nbits);
        let bit = 1 << (i % 64);
        self.words()[(i / 64) as usize].fetch_and(!bit, ACQREL) & bit != 0
    }

    /// Calls `f(word_index, mask)` for every word that `range` touches.
    fn for_words(&self, range: Range<u64>, mut f: impl FnMut(usize, u64)) {
        let end = range.end.min(self.nbits);
        let mut i = range.start;
        while i < end {
            let w = i / 64;
            let lo = i % 64;
            let hi = if end / 64 == w { end % 64 } else { 64 };
            let mask = mask_below(hi) & !mask_below(lo);
            f(w as usize, mask);
            i = (w + 1) * 64;
        }
    }

    /// Sets every bit in `range`; returns how many were newly set.
    pub fn set_range(&self, range: Range<u64>) -> u64 {
        let words = self.words();
        let mut newly = 0;
        self.for_words(range, |w, mask| {
            let old = words[w].fetch_or(mask, ACQREL);
            newly += u64::from((mask & !old).count_ones());
        });
        newly
    }

    /// Clears every bit in `range`; returns how many were set before.
    pub fn clear_range(&self, range: Range<u64>) -> u64 {
        let words = self.words();
        let mut was = 0;
        self.for_words(range, |w, mask| {
            let old = words[w].fetch_and(!mask, ACQREL);
            was += u64::from((mask & old).count_ones());
        });
        was
    }

    /// Whether any bit in `range` is set.
    pub fn any_in(&self, range: Range<u64>) -> bool {
        let words = self.words();
        let mut any = false;
        self.for_words(range, |w, mask| any |= words[w].load(ACQ) & mask != 0);
        any
    }

    /// Whether every bit in `range` is set.
    pub fn all_in(&self, range: Range<u64>) -> bool {
        let words = self.words();
        let mut all = true;
        self.for_words(range, |w, mask| all &= words[w].load(ACQ) & mask == mask);
        all
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words()
            .iter()
            .map(|w| u64::from(w.load(ACQ).count_ones()))
            .sum()
    }

    /// First bit at or after `from` whose value is `value`, if any before `len()`.
    pub fn next(&self, from: u64, value: bool) -> Option<u64> {
        if from >= self.nbits {
            return None;
        }
        let words = self.words();
        let mut w = (from / 64) as usize;
        let mut cur = words[w].load(ACQ);
        if !value {
            cur = !cur;
        }
        cur &= !mask_below(from % 64);
        loop {
            if cur != 0 {
                let bit = w as u64 * 64 + u64::from(cur.trailing_zeros());
                return (bit < self.nbits).then_some(bit);
            }
            w += 1;
            if w >= words.len() {
                return None;
            }
            cur = words[w].load(ACQ);
            if !value {
                cur = !cur;
            }
        }
    }

    /// The value of bit `i` (< `len()`) and the end of the run of bits with that value
    /// (at most `len()`).
    pub fn run_of(&self, i: u64) -> (bool, u64) {
        let value = self.get(i);
        (value, self.next(i, !value).unwrap_or(self.nbits))
    }

    /// The run of set bits that starts at or after `from`, as a range of bit indices.
    pub fn next_run(&self, from: u64) -> Option<Range<u64>> {
        let start = self.next(from, true)?;
        let end = self.next(start, false).unwrap_or(self.nbits);
        Some(start..end)
    }

    /// Iterates over the runs of set bits in `range`, clipped to it.
    pub fn runs(&self, range: Range<u64>) -> Runs<'_> {
        Runs {
            bitmap: self,
            pos: range.start,
            end: range.end.min(self.nbits),
        }
    }

    /// Makes this bitmap equal to `other` (same length).
    pub fn copy_from(&self, other: &Bitmap) {
        assert_eq!(self.nbits, other.nbits, "bitmap sizes differ");
        for (a, b) in self.words().iter().zip(other.words()) {
            a.store(b.load(ACQ), Ordering::Release);
        }
    }

    /// Sets every bit that is set in `other` (same length).
    pub fn or_from(&self, other: &Bitmap) {
        assert_eq!(self.nbits, other.nbits, "bitmap sizes differ");
        for (a, b) in self.words().iter().zip(other.words()) {
            a.fetch_or(b.load(ACQ), ACQREL);
        }
    }

    /// Sets all bits to `value`.
    pub fn fill(&self, value: bool) {
        if value {
            self.set_range(0..self.nbits);
        } else {
            for w in self.words() {
                w.store(0, Ordering::Release);
            }
        }
    }

    /// A heap copy of this bitmap.
    pub fn to_heap(&self) -> Bitmap {
        let b = Bitmap::new(self.nbits, false);
        b.copy_from(self);
        b
    }

    /// Flushes a mapped bitmap's words covering `bits` to stable storage with one msync
    /// (no-op on heap).
    pub fn flush_bits(&self, bits: Range<u64>) -> std::io::Result<()> {
        if bits.is_empty() {
            return Ok(());
        }
        if let Storage::Mapped { _map, words, .. } = &self.storage {
            let base = *words as usize - _map.as_ptr() as usize;
            let first = (bits.start / 64) as usize * 8;
            let last = ((bits.end - 1) / 64) as usize * 8 + 8;
            _map.flush_range(base + first, last - first)?;
        }
        Ok(())
    }

    /// Flushes a whole mapped bitmap to stable storage (no-op on heap).
    pub fn flush(&self) -> std::io::Result<()> {
        if let Storage::Mapped { _map, .. } = &self.storage {
            _map.flush()?;
        }
        Ok(())
    }

    /// The raw words, for checksums and for writing bitmaps out.
    pub fn word_values(&self) -> impl Iterator<Item = u64> + '_ {
        self.words().iter().map(|w| w.load(ACQ))
    }
}

/// Iterator over runs of set bits; see [`Bitmap::runs`].
pub struct Runs<'a> {
    bitmap: &'a Bitmap,
    pos: u64,
    end: u64,
}

impl Iterator for Runs<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        if self.pos >= self.end {
            return None;
        }
        let run = self.bitmap.next_run(self.pos)?;
        if run.start >= self.end {
            self.pos = self.end;
            return None;
        }
        let run = run.start..run.end.min(self.end);
        self.pos = run.end;
        Some(run)
    }
}

impl std::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bitmap({} of {} set)", self.count_ones(), self.nbits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_check(b: &Bitmap, m: &[bool]) {
        for (i, &v) in m.iter().enumerate() {
            assert_eq!(b.get(i as u64), v, "bit {i}");
        }
        assert_eq!(b.count_ones(), m.iter().filter(|&&v| v).count() as u64);
        let runs: Vec<_> = b.runs(0..b.len()).collect();
        let mut expect = Vec::new();
        let mut i = 0;
        while i < m.len() {
            if m[i] {
                let s = i;
                while i < m.len() && m[i] {
                    i += 1;
                }
                expect.push(s as u64..i as u64);
            } else {
                i += 1;
            }
        }
        assert_eq!(runs, expect);
    }

    #[test]
    fn ranges_against_model() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for nbits in [1u64, 63, 64, 65, 130, 1000] {
            let b = Bitmap::new(nbits, false);
            let mut m = vec![false; nbits as usize];
            for _ in 0..400 {
                let s = rnd(nbits);
                let e = s + rnd(nbits - s + 1);
                let setting = rnd(2) == 0;
                let expected_change = m[s as usize..e as usize]
                    .iter()
                    .filter(|&&v| v != setting)
                    .count() as u64;
                let changed = if setting {
                    b.set_range(s..e)
                } else {
                    b.clear_range(s..e)
                };
                assert_eq!(changed, expected_change);
                for v in &mut m[s as usize..e as usize] {
                    *v = setting;
                }
                let q = rnd(nbits);
                let qe = q + rnd(nbits - q + 1);
                let slice = &m[q as usize..qe as usize];
                assert_eq!(b.any_in(q..qe), slice.iter().any(|&v| v));
                assert_eq!(b.all_in(q..qe), slice.iter().all(|&v| v));
            }
            model_check(&b, &m);
        }
    }

    #[test]
    fn fill_keeps_tail_clear() {
        let b = Bitmap::new(70, true);
        assert_eq!(b.count_ones(), 70);
        assert_eq!(b.next(0, false), None);
        assert_eq!(b.next_run(0), Some(0..70));
        b.clear(69);
        assert_eq!(b.next(0, false), Some(69));
        let c = Bitmap::new(70, false);
        c.or_from(&b);
        assert_eq!(c.count_ones(), 69);
        c.fill(false);
        assert_eq!(c.count_ones(), 0);
        assert_eq!(c.next(0, true), None);
    }

    #[test]
    fn runs_are_clipped() {
        let b = Bitmap::new(200, false);
        b.set_range(10..20);
        b.set_range(100..150);
        assert_eq!(b.runs(15..120).collect::<Vec<_>>(), vec![15..20, 100..120]);
        assert_eq!(b.runs(0..5).count(), 0);
    }

    #[test]
    fn mapped_storage() {
        let mut map = MmapMut::map_anon(4096 + 64).unwrap();
        map[4096..].fill(0xff);
        let b = Bitmap::from_mmap(map, 4096, 100);
        assert_eq!(b.count_ones(), 100);
        b.clear_range(0..50);
        assert_eq!(b.next_run(0), Some(50..100));
    }
}

//! The dirty map sidecar `snapshot/NAME.dirty`: text, one `OFFSET LENGTH\n` line per run
//! of dirty clusters, sorted, merged, clipped at the device size.
//!
//! The text is never stored. It is generated on read from the frozen bitmap of the
//! access, with an index that records, for every chunk of [`CHUNK_BITS`] clusters, the
//! text offset of the first run starting in that chunk. A read at any offset therefore
//! regenerates at most one chunk's worth of lines before it reaches its data, and memory
//! stays one `u64` per chunk however fragmented the bitmap is.

use std::io::Write;
use std::sync::Arc;

use crate::bitmap::Bitmap;
use crate::units::ClusterSize;

/// Clusters per index entry.
pub const CHUNK_BITS: u64 = 16384;

/// A read-only, lazily generated dirty map.
pub struct DirtyMap {
    frozen: Arc<Bitmap>,
    cluster: ClusterSize,
    device_size: u64,
    /// `index[k]` = text offset of the first run starting at or after cluster `k * CHUNK_BITS`.
    index: Vec<u64>,
    text_len: u64,
    dirty_bytes: u64,
}

/// Decimal digits of `v`.
fn digits(v: u64) -> u64 {
    v.checked_ilog10().map_or(1, |d| u64::from(d) + 1)
}

/// Length of the line `"{offset} {len}\n"` without formatting it.
fn line_len(offset: u64, len: u64) -> u64 {
    digits(offset) + 1 + digits(len) + 1
}

fn format_line(out: &mut [u8; 48], offset: u64, len: u64) -> usize {
    let mut cur = &mut out[..];
    let before = cur.len();
    // 20 + 1 + 20 + 1 digits and separators always fit in 48 bytes.
    let _ = writeln!(cur, "{offset} {len}");
    before - cur.len()
}

impl DirtyMap {
    /// Builds the index for `frozen` (which must not change while the map lives).
    pub fn new(frozen: Arc<Bitmap>, cluster: ClusterSize, device_size: u64) -> DirtyMap {
        let nchunks = frozen.len().div_ceil(CHUNK_BITS) as usize;
        let mut index = Vec::with_capacity(nchunks.max(1));
        let mut pos = 0u64;
        let mut dirty_bytes = 0u64;
        for run in frozen.runs(0..frozen.len()) {
            let chunk = (run.start / CHUNK_BITS) as usize;
            while index.len() <= chunk {
                index.push(pos);
            }
            let bytes = cluster.byte_range(run, device_size);
            dirty_bytes += bytes.end - bytes.start;
            pos += line_len(bytes.start, bytes.end - bytes.start);
        }
        while index.len() < nchunks.max(1) {
            index.push(pos);
        }
        DirtyMap {
            frozen,
            cluster,
            device_size,
            index,
            text_len: pos,
            dirty_bytes,
        }
    }

    /// Length of the text in bytes (the size of the `.dirty` file).
    pub fn text_len(&self) -> u64 {
        self.text_len
    }

    /// Sum of the lengths of all ranges.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes
    }

    /// Copies text from `offset` into `buf`; returns how many bytes (0 at the end).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> usize {
        if offset >= self.text_len || buf.is_empty() {
            return 0;
        }
        let k = self.index.partition_point(|&p| p <= offset) - 1;
        let mut text_pos = self.index[k];
        let mut bit = k as u64 * CHUNK_BITS;
        // A run that began in an earlier chunk belongs to that chunk's text.
        if bit > 0 && self.frozen.get(bit - 1) {
            bit = self.frozen.next(bit, false).unwrap_or(self.frozen.len());
        }
        let mut filled = 0;
        let mut line = [0u8; 48];
        for run in self.frozen.runs(bit..self.frozen.len()) {
            let bytes = self.cluster.byte_range(run, self.device_size);
            let n = format_line(&mut line, bytes.start, bytes.end - bytes.start) as u64;
            let line_end = text_pos + n;
            if line_end > offset {
                let from = offset.saturating_sub(text_pos) as usize;
                let take = (n as usize - from).min(buf.len() - filled);
                buf[filled..filled + take].copy_from_slice(&line[from..from + take]);
                filled += take;
                if filled == buf.len() {
                    break;
                }
            }
            text_pos = line_end;
        }
        filled
    }

    /// Whether the byte at `offset` (below the device size) is dirty, and where the run
    /// of bytes with the same answer ends (at most the device size).
    pub fn run_at(&self, offset: u64) -> (bool, u64) {
        let (value, end) = self.frozen.run_of(self.cluster.index_of(offset).0);
        (
            value,
            self.cluster
                .start_of(crate::units::ClusterIdx(end))
                .min(self.device_size),
        )
    }

    /// The whole text (tests and small maps).
    pub fn to_text(&self) -> String {
        let mut buf = vec![0u8; self.text_len as usize];
        let n = self.read_at(0, &mut buf);
        buf.truncate(n);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Parses dirty map text back into byte ranges (used by `fleecefs copy` and tests).
pub fn parse(text: &str) -> Result<Vec<(u64, u64)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut it = line.split_ascii_whitespace();
        let (Some(a), Some(b), None) = (it.next(), it.next(), it.next()) else {
            return Err(format!("dirty map line {} is not 'OFFSET LENGTH'", i + 1));
        };
        let off = a
            .parse()
            .map_err(|_| format!("dirty map line {}: bad offset '{a}'", i + 1))?;
        let len = b
            .parse()
            .map_err(|_| format!("dirty map line {}: bad length '{b}'", i + 1))?;
        out.push((off, len));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected_text(b: &Bitmap, c: ClusterSize, size: u64) -> String {
        let mut s = String::new();
        for r in b.runs(0..b.len()) {
            let br = c.byte_range(r, size);
            s.push_str(&format!("{} {}\n", br.start, br.end - br.start));
        }
        s
    }

    #[test]
    fn whole_device_is_one_line() {
        let c = ClusterSize::new(65536).unwrap();
        let size = 64 << 20;
        let b = Arc::new(Bitmap::new(c.count(size), true));
        let m = DirtyMap::new(b, c, size);
        assert_eq!(m.to_text(), format!("0 {size}\n"));
        assert_eq!(m.dirty_bytes(), size);
    }

    #[test]
    fn last_range_is_clipped() {
        let c = ClusterSize::new(4096).unwrap();
        let size = 3 * 4096 + 10;
        let b = Arc::new(Bitmap::new(c.count(size), false));
        b.set_range(1..4);
        let m = DirtyMap::new(b, c, size);
        assert_eq!(m.to_text(), "4096 8202\n");
        assert_eq!(m.dirty_bytes(), 8202);
    }

    #[test]
    fn line_lengths_match_formatting() {
        let mut line = [0u8; 48];
        for (o, l) in [
            (0, 1),
            (9, 10),
            (99, 100),
            (65536, 65536),
            (u64::MAX, u64::MAX),
        ] {
            assert_eq!(
                line_len(o, l),
                format_line(&mut line, o, l) as u64,
                "{o} {l}"
            );
        }
    }

    #[test]
    fn empty_map() {
        let c = ClusterSize::new(4096).unwrap();
        let b = Arc::new(Bitmap::new(100, false));
        let m = DirtyMap::new(b, c, 100 * 4096);
        assert_eq!(m.text_len(), 0);
        assert_eq!(m.read_at(0, &mut [0u8; 10]), 0);
    }

    #[test]
    fn reads_at_every_offset_across_chunks() {
        let c = ClusterSize::new(4096).unwrap();
        let nbits = CHUNK_BITS * 3 + 77;
        let size = nbits * 4096 - 5;
        let b = Bitmap::new(nbits, false);
        let mut seed = 12345u64;
        let mut i = 0;
        while i < nbits {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let run = (seed >> 33) % 40;
            if (seed >> 20) & 1 == 1 {
                b.set_range(i..(i + run).min(nbits));
            }
            i += run + 1;
        }
        // runs that cross chunk boundaries
        b.set_range(CHUNK_BITS - 3..CHUNK_BITS + 3);
        b.set_range(nbits - 2..nbits);
        let b = Arc::new(b);
        let want = expected_text(&b, c, size);
        let m = DirtyMap::new(b.clone(), c, size);
        assert_eq!(m.text_len(), want.len() as u64);
        assert_eq!(m.to_text(), want);
        let bytes = want.as_bytes();
        assert!(
            bytes.len() > 8192,
            "test bitmap too sparse: {}",
            bytes.len()
        );
        for (off, len) in [(0, 7), (1, 100), (4095, 4096), (bytes.len() - 3, 10)] {
            let mut buf = vec![0u8; len];
            let n = m.read_at(off as u64, &mut buf);
            let end = (off + len).min(bytes.len());
            assert_eq!(&buf[..n], &bytes[off..end], "offset {off}");
        }
        let parsed = parse(&want).unwrap();
        let total: u64 = parsed.iter().map(|r| r.1).sum();
        assert_eq!(total, m.dirty_bytes());
        // Reading in small pieces reassembles the text exactly.
        let mut all = Vec::new();
        let mut off = 0u64;
        let mut buf = [0u8; 333];
        loop {
            let n = m.read_at(off, &mut buf);
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            off += n as u64;
        }
        assert_eq!(all, bytes);
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!(parse("1 2\n3\n").is_err());
        assert!(parse("x 2\n").is_err());
        assert_eq!(parse("0 10\n20 5\n").unwrap(), vec![(0, 10), (20, 5)]);
    }
}

//! Units that are easy to mix up: byte offsets, cluster indices and the cluster size.
//!
//! Every conversion between bytes and clusters goes through [`ClusterSize`], so the
//! rounding direction (outward for copy-before-write, inward for discard) is written
//! down exactly once.

use std::fmt;
use std::ops::Range;

/// Smallest allowed cluster size (4 KiB).
pub const MIN_CLUSTER: u64 = 4 << 10;
/// Largest allowed cluster size (64 MiB).
pub const MAX_CLUSTER: u64 = 64 << 20;
/// Default cluster size (64 KiB), QEMU's default for copy-before-write.
pub const DEFAULT_CLUSTER: u64 = 64 << 10;

/// The index of a cluster, as opposed to a byte offset: [`ClusterSize::index_of`] and
/// [`ClusterSize::start_of`] are the only ways between the two. (Ranges of clusters, as
/// the bitmaps take them, are `Range<u64>` of indices.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterIdx(pub u64);

impl ClusterIdx {
    /// The cluster after this one.
    pub fn next(self) -> ClusterIdx {
        ClusterIdx(self.0 + 1)
    }
}

/// A power-of-two cluster size between [`MIN_CLUSTER`] and [`MAX_CLUSTER`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct ClusterSize {
    shift: u32,
}

impl TryFrom<u64> for ClusterSize {
    type Error = String;
    fn try_from(bytes: u64) -> Result<Self, String> {
        ClusterSize::new(bytes)
    }
}

impl From<ClusterSize> for u64 {
    fn from(c: ClusterSize) -> u64 {
        c.bytes()
    }
}

impl ClusterSize {
    /// The default cluster size (64 KiB).
    pub const DEFAULT: ClusterSize = ClusterSize { shift: 16 };

    /// Validates `bytes` as a cluster size.
    pub fn new(bytes: u64) -> Result<Self, String> {
        if !bytes.is_power_of_two() || !(MIN_CLUSTER..=MAX_CLUSTER).contains(&bytes) {
            return Err(format!(
                "cluster size {bytes} is not a power of two from 4K to 64M"
            ));
        }
        Ok(ClusterSize {
            shift: bytes.trailing_zeros(),
        })
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        1 << self.shift
    }

    /// Number of clusters needed to cover `device_size` bytes (the last one may be partial).
    pub fn count(self, device_size: u64) -> u64 {
        device_size.div_ceil(self.bytes())
    }

    /// The cluster that holds byte `offset`.
    pub fn index_of(self, offset: u64) -> ClusterIdx {
        ClusterIdx(offset >> self.shift)
    }

    /// First byte of cluster `idx`.
    pub fn start_of(self, idx: ClusterIdx) -> u64 {
        idx.0 << self.shift
    }

    /// Clusters touched by `[offset, offset+len)`, widened outward (copy-before-write).
    pub fn outward(self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        self.index_of(offset).0..self.index_of(offset + len - 1).next().0
    }

    /// Whole clusters inside `[offset, offset+len)`, aligned inward (discard), as QEMU's
    /// snapshot-access does. A range that reaches the end of the device also covers the
    /// last, partial cluster: otherwise it could never be discarded.
    pub fn inward(self, offset: u64, len: u64, device_size: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(device_size);
        let first = offset.div_ceil(self.bytes());
        let last = if end == device_size {
            self.count(device_size)
        } else {
            end >> self.shift
        };
        if first >= last {
            first..first
        } else {
            first..last
        }
    }

    /// Byte range of the clusters `clusters`, clipped at the device size.
    pub fn byte_range(self, clusters: Range<u64>, device_size: u64) -> Range<u64> {
        let start = self.start_of(ClusterIdx(clusters.start)).min(device_size);
        let end = self.start_of(ClusterIdx(clusters.end)).min(device_size);
        start..end
    }
}

impl fmt::Display for ClusterSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.bytes()))
    }
}

/// Parses a byte count with an optional binary suffix: `65536`, `64K`, `64KiB`, `4M`, `1G`, `2T`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!(
            "'{text}' is not a size (examples: 65536, 64K, 4M, 1G)"
        ));
    }
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "'{text}' has an unknown size suffix (use K, M, G or T)"
            ))
        }
    };
    let n: u64 = num.parse().map_err(|_| format!("'{text}' is too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// `value` in the largest binary unit it reaches (up to T), and that unit's letter ("" for
/// values below 1024).
fn in_binary_units(mut value: f64) -> (f64, &'static str) {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    (value, UNITS[unit])
}

/// Formats a byte count for people: `64K`, `1.5M`, `3G`.
pub fn format_size(bytes: u64) -> String {
    match in_binary_units(bytes as f64) {
        (_, "") => format!("{bytes}"),
        (value, unit) if value.fract() == 0.0 => format!("{}{unit}", value as u64),
        (value, unit) => format!("{value:.1}{unit}"),
    }
}

/// Formats a rate for people in the units of [`format_size`] per second, binary like
/// them: `512/s`, `64.0K/s`, `206.2M/s`.
pub fn format_rate(bytes_per_second: f64) -> String {
    match in_binary_units(bytes_per_second.max(0.0)) {
        (value, "") => format!("{}/s", value.round() as u64),
        (value, unit) => format!("{value:.1}{unit}/s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_binary() {
        assert_eq!(format_rate(0.0), "0/s");
        assert_eq!(format_rate(512.0), "512/s");
        assert_eq!(format_rate(65536.0), "64.0K/s");
        assert_eq!(format_rate(100.0 * 1048576.0), "100.0M/s");
        assert_eq!(format_rate(1.5 * 1073741824.0), "1.5G/s");
    }

    #[test]
    fn parse_sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("16777216T").is_err());
    }

    #[test]
    fn cluster_size_validation() {
        assert!(ClusterSize::new(4096).is_ok());
        assert!(ClusterSize::new(64 << 20).is_ok());
        assert!(ClusterSize::new(2048).is_err());
        assert!(ClusterSize::new(128 << 20).is_err());
        assert!(ClusterSize::new(65537).is_err());
        assert!(ClusterSize::new(0).is_err());
    }

    #[test]
    fn outward_and_inward() {
        let c = ClusterSize::new(4096).unwrap();
        assert_eq!(c.outward(0, 1), 0..1);
        assert_eq!(c.outward(4095, 2), 0..2);
        assert_eq!(c.outward(4096, 4096), 1..2);
        assert_eq!(c.outward(100, 0), 0..0);
        let size = 10 * 4096 + 100; // 11 clusters, last partial
        assert_eq!(c.count(size), 11);
        assert_eq!(c.inward(1, 4096, size), 1..1);
        assert_eq!(c.inward(0, 8192, size), 0..2);
        assert_eq!(c.inward(100, 3 * 4096, size), 1..3);
        // reaching the end covers the last partial cluster
        assert_eq!(c.inward(9 * 4096, 4096 + 100, size), 9..11);
        assert_eq!(c.inward(9 * 4096, u64::MAX, size), 9..11);
        assert_eq!(c.byte_range(9..11, size), 9 * 4096..size);
    }

    #[test]
    fn format_sizes() {
        assert_eq!(format_size(512), "512");
        assert_eq!(format_size(65536), "64K");
        assert_eq!(format_size(3 << 29), "1.5G");
    }
}

//! The header of a bitmap file, encoded and checked.
//!
//! # Format (version 1, little-endian; see docs/formats.md)
//! ```text
//! off  size  field
//!   0     8  magic "FLEECEBM"
//!   8     4  format version (1)
//!  12     4  flags: bit 0 IN_USE (a daemon has it open), bit 1 CRASH_SAFE (while in
//!            use it survives the daemon's death), bit 2 SYNCED (while in use, every
//!            clean-to-dirty transition was flushed before its write)
//!  16     8  cluster size
//!  24     8  source size
//!  32     8  source device number (st_dev, st_rdev for block devices)
//!  40     8  source inode
//!  48     8  source mtime in ns at the last clean close (0 while in use)
//!  56     8  number of bits (clusters)
//!  64     8  generation id (random, fixed when the bitmap is created)
//!  72     8  sequence (successful backups since creation)
//!  80     4  kind: 0 target bitmap, 1 background bitmap
//!  84     4  CRC-32 of the bitmap words (valid when not IN_USE)
//!  88    72  device name  (u8 length + 71 bytes)
//! 160    72  target ID    (u8 length + 71 bytes)
//! 232    72  bitmap name  (u8 length + 71 bytes)
//! 304    16  boot id of the machine while in use
//! 4092    4  CRC-32 of bytes 0..4092
//! 4096    …  bitmap words, u64 little-endian, bit i of word w = cluster 64*w+i
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;

const MAGIC: &[u8; 8] = b"FLEECEBM";
/// Format version written and understood.
pub const VERSION: u32 = 1;
/// Size of the header; the bitmap words start here.
pub const HEADER_LEN: usize = 4096;
const FLAG_IN_USE: u32 = 1;
const FLAG_CRASH_SAFE: u32 = 2;
const FLAG_SYNCED: u32 = 4;

/// The kernel's boot id (`/proc/sys/kernel/random/boot_id`), zeros if unreadable.
pub fn boot_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(text) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let hex: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        for (i, pair) in hex.chunks(2).take(16).enumerate() {
            let s = std::str::from_utf8(pair).unwrap_or("0");
            id[i] = u8::from_str_radix(s, 16).unwrap_or(0);
        }
    }
    id
}
const NAME_FIELD: usize = 72;

/// Which role a bitmap file plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapKind {
    /// A target's bitmap: clusters written since its last successful backup.
    Target,
    /// Writes made during an access (merged into the target bitmap at teardown).
    Background,
}

/// The header fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// IN_USE flag.
    pub in_use: bool,
    /// CRASH_SAFE flag: while in use, the bitmap survives the daemon's death.
    pub crash_safe: bool,
    /// SYNCED flag: while in use, every clean-to-dirty transition was flushed first.
    pub synced: bool,
    /// Boot id of the machine while in use.
    pub boot_id: [u8; 16],
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Source size in bytes.
    pub source_size: u64,
    /// Source device number.
    pub source_dev: u64,
    /// Source inode.
    pub source_ino: u64,
    /// Source mtime (ns) at the last clean close.
    pub source_mtime_ns: i64,
    /// Number of bits.
    pub nbits: u64,
    /// Generation id.
    pub generation: u64,
    /// Successful backups since creation.
    pub sequence: u64,
    /// Role.
    pub kind: BitmapKind,
    /// CRC-32 of the words.
    pub data_crc: u32,
    /// Device name.
    pub device: String,
    /// Target ID.
    pub target: String,
    /// Bitmap name.
    pub name: String,
}

fn put_name(buf: &mut [u8], at: usize, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(NAME_FIELD - 1);
    buf[at] = n as u8;
    buf[at + 1..at + 1 + n].copy_from_slice(&b[..n]);
}

fn get_name(buf: &[u8], at: usize) -> std::result::Result<String, String> {
    let n = buf[at] as usize;
    if n >= NAME_FIELD {
        return Err("name field too long".into());
    }
    String::from_utf8(buf[at + 1..at + 1 + n].to_vec()).map_err(|_| "name is not UTF-8".into())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl Header {
    /// Encodes the header, with its checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let flags = if self.in_use { FLAG_IN_USE } else { 0 }
            | if self.crash_safe { FLAG_CRASH_SAFE } else { 0 }
            | if self.synced { FLAG_SYNCED } else { 0 };
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.source_size.to_le_bytes());
        b[32..40].copy_from_slice(&self.source_dev.to_le_bytes());
        b[40..48].copy_from_slice(&self.source_ino.to_le_bytes());
        b[48..56].copy_from_slice(&self.source_mtime_ns.to_le_bytes());
        b[56..64].copy_from_slice(&self.nbits.to_le_bytes());
        b[64..72].copy_from_slice(&self.generation.to_le_bytes());
        b[72..80].copy_from_slice(&self.sequence.to_le_bytes());
        let kind: u32 = match self.kind {
            BitmapKind::Target => 0,
            BitmapKind::Background => 1,
        };
        b[80..84].copy_from_slice(&kind.to_le_bytes());
        b[84..88].copy_from_slice(&self.data_crc.to_le_bytes());
        put_name(&mut b, 88, &self.device);
        put_name(&mut b, 160, &self.target);
        put_name(&mut b, 232, &self.name);
        b[304..320].copy_from_slice(&self.boot_id);
        let crc = crc32fast::hash(&b[..HEADER_LEN - 4]);
        b[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header. The error says what is wrong, for `invalid` reasons.
    pub fn decode(b: &[u8]) -> std::result::Result<Header, String> {
        if b.len() < HEADER_LEN {
            return Err(format!(
                "file is truncated ({} bytes, header needs {HEADER_LEN})",
                b.len()
            ));
        }
        if &b[0..8] != MAGIC {
            return Err("not a fleecefs bitmap (bad magic)".into());
        }
        let crc = crc32fast::hash(&b[..HEADER_LEN - 4]);
        if crc != u32_at(b, HEADER_LEN - 4) {
            return Err("header checksum mismatch".into());
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(format!(
                "format version {version} is not supported (expected {VERSION})"
            ));
        }
        let flags = u32_at(b, 12);
        let kind = match u32_at(b, 80) {
            0 => BitmapKind::Target,
            1 => BitmapKind::Background,
            k => return Err(format!("unknown bitmap kind {k}")),
        };
        Ok(Header {
            in_use: flags & FLAG_IN_USE != 0,
            crash_safe: flags & FLAG_CRASH_SAFE != 0,
            synced: flags & FLAG_SYNCED != 0,
            boot_id: b[304..320].try_into().expect("16 bytes"),
            cluster_size: u64_at(b, 16),
            source_size: u64_at(b, 24),
            source_dev: u64_at(b, 32),
            source_ino: u64_at(b, 40),
            source_mtime_ns: u64_at(b, 48) as i64,
            nbits: u64_at(b, 56),
            generation: u64_at(b, 64),
            sequence: u64_at(b, 72),
            kind,
            data_crc: u32_at(b, 84),
            device: get_name(b, 88)?,
            target: get_name(b, 160)?,
            name: get_name(b, 232)?,
        })
    }
}

/// A random 64-bit id (generation ids).
pub fn random_id() -> u64 {
    let mut b = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|f| f.read_exact_at(&mut b, 0))
        .is_ok()
    {
        return u64::from_le_bytes(b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            in_use: true,
            crash_safe: true,
            synced: false,
            boot_id: [7; 16],
            cluster_size: 65536,
            source_size: 1 << 30,
            source_dev: 42,
            source_ino: 7,
            source_mtime_ns: 123,
            nbits: 16384,
            generation: 99,
            sequence: 3,
            kind: BitmapKind::Target,
            data_crc: 5,
            device: "vm100".into(),
            target: "nightly".into(),
            name: "b1".into(),
        }
    }

    #[test]
    fn header_roundtrip_and_damage() {
        let h = header();
        let b = h.encode();
        assert_eq!(Header::decode(&b), Ok(h));
        for i in [0usize, 9, 20, 100, 4000, 4093] {
            let mut d = b.clone();
            d[i] ^= 1;
            assert!(Header::decode(&d).is_err(), "flip at {i} not detected");
        }
        assert!(Header::decode(&b[..100]).unwrap_err().contains("truncated"));
    }
}

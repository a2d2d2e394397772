//! Bitmap files: one persistent dirty bitmap per file, a 4 KiB header then the bitmap
//! words, mapped with memmap2 so tracking a write is an atomic OR in shared memory.
//!
//! The file format (the 4 KiB header, then the words) is in `header.rs`.
//!
//! # Crash safety (`--crash-safe-bitmaps`)
//! The bits live in a shared file mapping, and a live write sets its bits there before it
//! reaches the source. The mapping's dirty pages belong to the kernel's page cache, so
//! they survive the daemon being killed (kill -9): only a machine crash can lose them.
//! - `on` (default): the header records the kernel's boot id while the bitmap is in use.
//!   Found in use with the same boot id (the daemon died, the machine did not), the
//!   bitmap is kept; with another boot id it is invalid. No cost on the write path.
//! - `sync`: [`TrackedBitmap::mark`] also flushes (msync) the words it newly sets before
//!   it returns, so a bit is on stable storage before the write it covers, and the
//!   bitmap survives machine crashes too. A heap shadow (`durable`) records which bits
//!   are known flushed, so writers that find a bit already set by a concurrent writer
//!   whose flush has not finished yet do not skip ahead of it. Each clean-to-dirty
//!   transition costs a flush (measured in docs/performance.md).
//! - `off`: a bitmap found in use is invalid (QEMU's rule).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::bitmap::Bitmap;
use crate::error::{Error, IoContext, Result};
use crate::secure_path::Dir;
use crate::source::Source;
use crate::sync::Recover;

mod header;
pub use header::{boot_id, random_id, BitmapKind, Header, HEADER_LEN, VERSION};

/// How much of a crash a bitmap in use survives (`--crash-safe-bitmaps`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CrashSafety {
    /// Any unclean stop makes it invalid (QEMU's rule).
    Off,
    /// Survives the daemon's death; a machine crash makes it invalid. Free.
    On,
    /// Survives machine crashes too: every clean-to-dirty transition is flushed.
    Sync,
}

/// A bitmap file open for tracking.
pub struct TrackedBitmap {
    /// The directory it is in: every open, rename and removal is by name under its fd.
    dir: Arc<Dir>,
    /// Its file name in `dir`.
    file_name: Mutex<String>,
    file: File,
    bits: Bitmap,
    /// Bits known to be on stable storage (crash-safe mode only).
    durable: Option<Bitmap>,
    header: Mutex<Header>,
    failed: AtomicBool,
}

fn crc_of(bits: &Bitmap) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for w in bits.word_values() {
        h.update(&w.to_le_bytes());
    }
    h.finalize()
}

/// Why a bitmap file cannot be trusted.
pub type Invalid = String;

impl TrackedBitmap {
    fn map(
        dir: &Arc<Dir>,
        file_name: &str,
        file: File,
        header: Header,
        safety: CrashSafety,
    ) -> Result<TrackedBitmap> {
        let path = dir.display_path(file_name);
        let len = Bitmap::bytes_for(header.nbits).max(8);
        // The file is ours (state dir, 0600) and no other process maps it while we hold
        // the state lock; the mapping is only accessed through atomics.
        let map = crate::sys::map_shared(&file, HEADER_LEN as u64, len)
            .context(|| format!("mapping bitmap {}", path.display()))?;
        let bits = Bitmap::from_mmap(map, 0, header.nbits);
        // Filled by the caller once the bits are on stable storage.
        let durable = (safety == CrashSafety::Sync).then(|| Bitmap::new(header.nbits, false));
        Ok(TrackedBitmap {
            dir: dir.clone(),
            file_name: Mutex::new(file_name.to_string()),
            file,
            bits,
            durable,
            header: Mutex::new(header),
            failed: AtomicBool::new(false),
        })
    }

    /// Creates a new bitmap file `file_name` in `dir` for `source`, all bits set to
    /// `fill`, open and marked in use.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        dir: &Arc<Dir>,
        file_name: &str,
        source: &Source,
        cluster_size: u64,
        nbits: u64,
        kind: BitmapKind,
        device: &str,
        target: &str,
        name: &str,
        fill: bool,
        safety: CrashSafety,
    ) -> Result<TrackedBitmap> {
        let id = source.identity();
        let header = Header {
            in_use: true,
            crash_safe: safety != CrashSafety::Off,
            synced: safety == CrashSafety::Sync,
            boot_id: boot_id(),
            cluster_size,
            source_size: source.size(),
            source_dev: id.dev,
            source_ino: id.ino,
            source_mtime_ns: 0,
            nbits,
            generation: random_id(),
            sequence: 0,
            kind,
            data_crc: 0,
            device: device.to_string(),
            target: target.to_string(),
            name: name.to_string(),
        };
        let tmp_name = std::path::Path::new(file_name)
            .with_extension("new")
            .to_string_lossy()
            .into_owned();
        let tmp = dir.display_path(&tmp_name);
        let path = dir.display_path(file_name);
        // Always a new file (a leftover goes first), never through a symlink.
        dir.remove(&tmp_name)
            .context(|| format!("removing {}", tmp.display()))?;
        let file = dir
            .open(
                &tmp_name,
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
                0o600,
            )
            .context(|| format!("creating bitmap {}", tmp.display()))?;
        let data_len = Bitmap::bytes_for(nbits).max(8) as u64;
        file.set_len(HEADER_LEN as u64 + data_len)
            .and_then(|_| file.write_all_at(&header.encode(), 0))
            .context(|| format!("writing bitmap {}", tmp.display()))?;
        let t = Self::map(dir, &tmp_name, file, header, safety)?;
        t.bits.fill(fill);
        t.bits
            .flush()
            .context(|| format!("flushing bitmap {}", tmp.display()))?;
        if let Some(d) = &t.durable {
            d.copy_from(&t.bits);
        }
        t.file
            .sync_all()
            .context(|| format!("syncing bitmap {}", tmp.display()))?;
        dir.rename(&tmp_name, file_name)
            .and_then(|()| dir.sync())
            .context(|| format!("renaming bitmap into {}", path.display()))?;
        *t.file_name.lock().recover() = file_name.to_string();
        Ok(t)
    }

    /// Opens an existing bitmap file. `Ok(Err(reason))` when the file exists but cannot be
    /// trusted for `source`: the caller records the reason and recreates it.
    pub fn open(
        dir: &Arc<Dir>,
        file_name: &str,
        source: &Source,
        cluster_size: u64,
        safety: CrashSafety,
    ) -> Result<std::result::Result<TrackedBitmap, Invalid>> {
        let path = dir.display_path(file_name);
        let file = match dir.open(file_name, libc::O_RDWR, 0) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Err("the bitmap file is missing".into()))
            }
            Err(e) => return Err(Error::io(format!("opening bitmap {}", path.display()), e)),
        };
        let mut hdr = vec![0u8; HEADER_LEN];
        let n =
            read_up_to(&file, &mut hdr).context(|| format!("reading bitmap {}", path.display()))?;
        let header = match Header::decode(&hdr[..n]) {
            Ok(h) => h,
            Err(reason) => return Ok(Err(format!("the bitmap file is damaged: {reason}"))),
        };
        let id = source.identity();
        let nbits = source.size().div_ceil(cluster_size);
        if header.cluster_size != cluster_size {
            return Ok(Err(format!(
                "it was made with cluster size {}, the device now uses {cluster_size}",
                header.cluster_size
            )));
        }
        if header.source_size != source.size() || header.nbits != nbits {
            return Ok(Err(format!(
                "the source changed size ({} -> {} bytes)",
                header.source_size,
                source.size()
            )));
        }
        if header.source_dev != id.dev || header.source_ino != id.ino {
            return Ok(Err(
                "the source is a different file than when the bitmap was made".into(),
            ));
        }
        let expected_len = (HEADER_LEN + Bitmap::bytes_for(nbits).max(8)) as u64;
        let actual_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if actual_len < expected_len {
            return Ok(Err(format!(
                "the bitmap file is truncated ({actual_len} of {expected_len} bytes)"
            )));
        }
        if header.in_use && !header.crash_safe {
            return Ok(Err(
                "the daemon stopped without a clean shutdown and tracking was not crash-safe"
                    .into(),
            ));
        }
        if header.in_use && !header.synced && header.boot_id != boot_id() {
            return Ok(Err(
                "the machine restarted while the bitmap was in use (bitmaps survive a \
                 daemon crash; with --crash-safe-bitmaps sync they survive a machine crash too)"
                    .into(),
            ));
        }
        let clean = !header.in_use;
        if clean && !id.block_device {
            let now = source.mtime_ns()?;
            if i128::from(header.source_mtime_ns) != now {
                return Ok(Err(
                    "the source was modified while no fleecefs daemon served it".into(),
                ));
            }
        }
        let t = Self::map(dir, file_name, file, header, safety)?;
        if clean && crc_of(&t.bits) != t.header().data_crc {
            return Ok(Err("the bitmap data checksum does not match".into()));
        }
        if let Some(d) = &t.durable {
            // Bits may have been in the page cache only (a daemon that ran without `sync`
            // was killed): flush them before claiming any durable or writing SYNCED.
            t.flush()?;
            d.copy_from(&t.bits);
        }
        if !clean {
            log::warn!(
                "bitmap {} was in use when its daemon stopped on this boot; its bits are intact, so it is kept",
                path.display()
            );
        }
        // Mark it in use before any write is tracked in it.
        {
            let mut h = t.header.lock().recover();
            h.in_use = true;
            h.crash_safe = safety != CrashSafety::Off;
            h.synced = safety == CrashSafety::Sync;
            h.boot_id = boot_id();
            h.source_mtime_ns = 0;
        }
        t.write_header()?;
        Ok(Ok(t))
    }

    fn write_header(&self) -> Result<()> {
        let bytes = self.header().encode();
        self.file
            .write_all_at(&bytes, 0)
            .and_then(|_| self.file.sync_data())
            .context(|| format!("writing the header of bitmap {}", self.path().display()))
    }

    /// A copy of the header.
    pub fn header(&self) -> Header {
        self.header.lock().recover().clone()
    }

    /// The bits.
    pub fn bits(&self) -> &Bitmap {
        &self.bits
    }

    /// Where the file is (for messages: the file is only ever reached through its
    /// directory's fd).
    pub fn path(&self) -> PathBuf {
        self.dir.display_path(&*self.file_name.lock().recover())
    }

    /// Renames the file (durably, within its directory) to `to`.
    pub fn rename_to(&self, to: &str) -> Result<()> {
        let mut n = self.file_name.lock().recover();
        self.dir
            .rename(&*n, to)
            .and_then(|()| self.dir.sync())
            .context(|| format!("renaming bitmap to {}", self.dir.display_path(to).display()))?;
        *n = to.to_string();
        Ok(())
    }

    /// A larger bitmap over the same file, for the device grown to `source_size` bytes
    /// (`nbits` clusters): the file is extended and mapped again. Nothing visible changes
    /// until [`TrackedBitmap::commit_grow`]: bits set through `self` meanwhile land in the
    /// same file pages, which both mappings share.
    pub fn grown(&self, nbits: u64, safety: CrashSafety) -> Result<TrackedBitmap> {
        let path = self.path();
        let file = self
            .file
            .try_clone()
            .context(|| format!("reopening bitmap {}", path.display()))?;
        let len = (HEADER_LEN + Bitmap::bytes_for(nbits).max(8)) as u64;
        let now = file.metadata().map(|m| m.len()).unwrap_or(0);
        if now < len {
            file.set_len(len)
                .context(|| format!("extending bitmap {}", path.display()))?;
        }
        let mut header = self.header();
        header.nbits = nbits;
        // The durable shadow starts empty: `mark` flushes each bit again once, which
        // is always safe.
        let name = self.file_name.lock().recover().clone();
        let t = Self::map(&self.dir, &name, file, header, safety)?;
        t.failed.store(self.failed(), Ordering::Relaxed);
        Ok(t)
    }

    /// Completes a grow while the device's gate is held exclusively: copies the failed
    /// flag again, sets every cluster from `old_nbits` on as dirty, plus the old last
    /// cluster when the old size was not a multiple of the cluster size (its new bytes
    /// are new data), and records the new source size in the header (written by
    /// [`TrackedBitmap::save_header`]).
    pub fn commit_grow(&self, old: &TrackedBitmap, old_size: u64, source_size: u64) {
        if old.failed() {
            self.failed.store(true, Ordering::Relaxed);
        }
        let h = old.header();
        let old_nbits = h.nbits;
        let first = if old_size % h.cluster_size != 0 {
            old_nbits.saturating_sub(1)
        } else {
            old_nbits
        };
        self.bits.set_range(first..self.bits.len());
        let mut mine = self.header.lock().recover();
        *mine = Header {
            nbits: self.bits.len(),
            source_size,
            ..h
        };
    }

    /// Flushes the bits and writes the header (after a grow).
    pub fn save_header(&self) -> Result<()> {
        self.flush()?;
        self.write_header()
    }

    /// Marks the bitmap untrustworthy (a flush or merge failed).
    pub fn mark_failed(&self, why: &str) {
        if self.failed.swap(true, Ordering::Relaxed) {
            return;
        }
        log::error!(
            "bitmap {} cannot be trusted any more: {why}",
            self.path().display()
        );
        // On disk too: in use without crash-safe tracking loads as invalid after a
        // restart or a crash, whatever happens to the rest of the file.
        {
            let mut h = self.header.lock().recover();
            h.in_use = true;
            h.crash_safe = false;
            h.synced = false;
        }
        if let Err(e) = self.write_header() {
            log::error!("{}", crate::error::report(&e));
        }
    }

    /// Whether tracking failed since it was opened (it must not be trusted).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Records that `clusters` were written. In crash-safe mode the bits are on stable
    /// storage when this returns. Never fails the write: a flush error marks the bitmap
    /// failed (it becomes `invalid`) and is logged.
    pub fn mark(&self, clusters: std::ops::Range<u64>) {
        match &self.durable {
            None => {
                if !self.bits.all_in(clusters.clone()) {
                    self.bits.set_range(clusters);
                }
            }
            Some(durable) => {
                if durable.all_in(clusters.clone()) {
                    return;
                }
                self.bits.set_range(clusters.clone());
                let r = self.bits.flush_bits(clusters.clone());
                if let Err(e) = r {
                    self.mark_failed(&format!("flushing it failed: {e}"));
                }
                durable.set_range(clusters);
            }
        }
    }

    /// Replaces the bits with `other`'s (teardown success) or ORs them in (failure), in
    /// memory only: the caller holds the gates, so no write is tracked meanwhile, and
    /// flushes afterwards with [`TrackedBitmap::flush`].
    pub fn merge_bits(&self, other: &Bitmap, replace: bool) {
        if replace {
            if let Some(d) = &self.durable {
                // A bit may only be claimed durable once flushed by `mark` itself; a bit
                // that a concurrent writer sets during a later full flush must not be.
                d.fill(false);
            }
            self.bits.copy_from(other);
        } else {
            self.bits.or_from(other);
        }
    }

    /// Flushes all bits to the file (msync).
    pub fn flush(&self) -> Result<()> {
        self.bits
            .flush()
            .context(|| format!("flushing bitmap {}", self.path().display()))
    }

    /// [`TrackedBitmap::merge_bits`] then [`TrackedBitmap::flush`] (recovery at load).
    pub fn merge_from(&self, other: &Bitmap, replace: bool) -> Result<()> {
        self.merge_bits(other, replace);
        self.flush()
    }

    /// Counts a successful backup.
    pub fn bump_sequence(&self) -> Result<()> {
        self.header.lock().recover().sequence += 1;
        self.write_header()
    }

    /// Clean close: flushes the bits, records their checksum and the source's mtime, and
    /// clears IN_USE. Call after the last write to the source.
    pub fn close_clean(&self, source: &Source) -> Result<()> {
        if self.failed() {
            return Err(Error::invalid(format!(
                "bitmap {} had flush errors; it is left marked in use so it will be invalid",
                self.path().display()
            )));
        }
        self.bits
            .flush()
            .context(|| format!("flushing bitmap {}", self.path().display()))?;
        {
            let mut h = self.header.lock().recover();
            h.data_crc = crc_of(&self.bits);
            h.source_mtime_ns = source.mtime_ns()? as i64;
            h.in_use = false;
        }
        self.write_header()
    }

    /// Deletes the file.
    pub fn remove(&self) -> Result<()> {
        let name = self.file_name.lock().recover().clone();
        self.dir
            .remove(&name)
            .context(|| format!("removing bitmap {}", self.dir.display_path(&name).display()))
    }
}

fn read_up_to(file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Path;

    /// A 1 MiB source in `dir`, `dir` held open, and the path of the bitmap file
    /// `b.bitmap` in it.
    fn fixture(dir: &Path) -> (Source, Arc<Dir>, PathBuf) {
        let src = dir.join("src.img");
        std::fs::write(&src, vec![0u8; 1 << 20]).unwrap();
        let d = Arc::new(Dir::new(File::open(dir).unwrap(), dir.to_path_buf()));
        (Source::open(&src).unwrap(), d, dir.join("b.bitmap"))
    }

    fn create_test_bitmap(dir: &Arc<Dir>, source: &Source, safety: CrashSafety) -> TrackedBitmap {
        TrackedBitmap::create(
            dir,
            "b.bitmap",
            source,
            65536,
            16,
            BitmapKind::Target,
            "d",
            "t",
            "b",
            false,
            safety,
        )
        .unwrap()
    }

    #[test]
    fn a_failed_bitmap_is_invalid_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (source, d, _) = fixture(dir.path());
        let make = || create_test_bitmap(&d, &source, CrashSafety::Sync);
        // a clean close reopens as valid
        let t = make();
        t.mark(3..4);
        t.close_clean(&source).unwrap();
        drop(t);
        let t = TrackedBitmap::open(&d, "b.bitmap", &source, 65536, CrashSafety::Sync)
            .unwrap()
            .unwrap();
        assert!(t.bits().get(3));
        drop(t);
        // a failure while tracking is recorded on disk: even the crash-safe path refuses it
        let t = make();
        t.mark_failed("test");
        assert!(t.close_clean(&source).is_err());
        drop(t);
        let reason = TrackedBitmap::open(&d, "b.bitmap", &source, 65536, CrashSafety::Sync)
            .unwrap()
            .err()
            .unwrap();
        assert!(reason.contains("not crash-safe"), "{reason}");
    }

    #[test]
    fn a_bitmap_in_use_survives_a_daemon_crash_not_a_reboot_unless_synced() {
        let dir = tempfile::tempdir().unwrap();
        let (source, d, path) = fixture(dir.path());
        let left_in_use = |safety: CrashSafety, other_boot: bool| {
            let t = create_test_bitmap(&d, &source, safety);
            t.mark(5..6);
            drop(t); // the daemon dies: no clean close
            if other_boot {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .unwrap();
                let mut b = vec![0u8; HEADER_LEN];
                f.read_exact_at(&mut b, 0).unwrap();
                let mut h = Header::decode(&b).unwrap();
                h.boot_id = [0xee; 16];
                f.write_all_at(&h.encode(), 0).unwrap();
            }
            TrackedBitmap::open(&d, "b.bitmap", &source, 65536, CrashSafety::On).unwrap()
        };
        let kept = left_in_use(CrashSafety::On, false).unwrap();
        assert!(kept.bits().get(5), "the bit set before the crash is gone");
        drop(kept);
        let reason = left_in_use(CrashSafety::On, true).err().unwrap();
        assert!(reason.contains("machine restarted"), "{reason}");
        assert!(left_in_use(CrashSafety::Sync, true).unwrap().bits().get(5));
        assert!(left_in_use(CrashSafety::Off, false).is_err());
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_after_the_check_is_not_followed() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let bitmaps = tmp.path().join("bitmaps");
        let elsewhere = tmp.path().join("root-only");
        std::fs::create_dir(&bitmaps).unwrap();
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("b.bitmap"), b"precious").unwrap();
        std::fs::write(elsewhere.join("c.bitmap"), b"precious").unwrap();
        let (source, d, _) = fixture(&bitmaps);
        let t = create_test_bitmap(&d, &source, CrashSafety::On);
        // Checked and opened; then the directory is swapped for a symlink to another one.
        std::fs::rename(&bitmaps, tmp.path().join("moved")).unwrap();
        symlink(&elsewhere, &bitmaps).unwrap();
        // A path-based open follows the swapped directory (O_NOFOLLOW guards only the
        // last component): what the bitmap file's path would do.
        assert!(OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(bitmaps.join("b.bitmap"))
            .is_ok());
        // Through the held directory fd nothing lands there.
        t.rename_to("c.bitmap").unwrap();
        let again = create_test_bitmap(&d, &source, CrashSafety::On);
        again.remove().unwrap();
        t.remove().unwrap();
        assert!(
            TrackedBitmap::open(&d, "c.bitmap", &source, 65536, CrashSafety::On)
                .unwrap()
                .is_err()
        );
        for f in ["b.bitmap", "c.bitmap"] {
            assert_eq!(
                std::fs::read(elsewhere.join(f)).unwrap(),
                b"precious",
                "{f}"
            );
        }
        assert!(!tmp.path().join("moved/b.bitmap").exists());
        assert!(!tmp.path().join("moved/c.bitmap").exists());
    }
}

//! `fleecefs copy`: the reference backup consumer. It owns reading a snapshot by its
//! dirty map and writing it into an image file, for a full backup (a new sparse file)
//! or an incremental one (only the dirty ranges, onto the previous image), with optional
//! verification, discard of what is safely written, and progress reporting.
//!
//! It needs no daemon: everything goes through the files of the mount
//! (`snapshot/NAME.dirty`, `snapshot/NAME`), with positional I/O only, so
//! [`copy_files`] works on any pair of plain files as well (the unit tests use that).
//!
//! Order per batch of at most [`BATCH`] bytes of a dirty range: read and write every
//! chunk, then (with `--verify` or `--discard`) `fdatasync` DEST, compare DEST with the
//! snapshot, and only then punch the batch on the snapshot. A discarded range can never
//! be read again, so it must be durable in DEST first.
//!
//! With `--format qcow2` DEST is always a new image ([`qcow2`], through the `imago`
//! crate): a full one holding only the data clusters, or with `--incremental --backing
//! PREV` an overlay holding exactly the dirty ranges (data clusters, and zero clusters for
//! all-zero blocks) on PREV, which is only read. [`dest::Dest`] hides the difference.
//!
//! Snapshot reads run on `--jobs` threads ([`reader`]), paced by `--bwlimit`; DEST is
//! written on the calling thread strictly in offset order, so the per-batch order above
//! holds whatever the number of jobs.
//!
//! A failed incremental copy leaves DEST a mix of the old and new image; the caller then
//! tears the access down with `--failure`, so the next access's dirty map covers every
//! range this one did, and applying it onto DEST gives the right image.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;

use crate::cli::{CopyArgs, CopyFormatArg};
use crate::dirtymap;
use crate::error::{Error, IoContext, Result};
use crate::layout::MountLayout;
use crate::units::{format_size, parse_size};

mod batch;
pub mod dest;
pub mod progress;
pub mod qcow2;
pub mod reader;
mod summary;

pub use batch::{is_zero, pieces, zero_runs};
use batch::{snapshot_error, Copier};
use dest::{check_dest_outside, check_qcow2, create_new, lock_dest, open_dest, sync_parent, Dest};
pub(crate) use progress::Progress;
use qcow2::ImageFormat;
pub(crate) use summary::{rate, report_outcome};
pub use summary::{summary_line, CopySummary};

/// Bytes read from the snapshot per `pread` (the one reusable buffer).
pub const CHUNK: usize = 4 << 20;
/// Granularity of zero detection: zero blocks become holes in DEST.
pub const ZERO_BLOCK: usize = 64 << 10;
/// Bytes written between syncs of DEST when verifying or discarding. A multiple of every
/// cluster size, so batches of a cluster-aligned range stay cluster-aligned.
pub const BATCH: u64 = 64 << 20;

/// Snapshot reader threads when `--jobs` is not given (see docs/performance.md).
pub const DEFAULT_JOBS: usize = 2;
/// Most `--jobs`.
pub const MAX_JOBS: usize = 64;

/// What to do besides copying.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// Raw: DEST is the previous image, write only the dirty ranges onto it. qcow2: DEST is
    /// a new overlay on `backing` holding only the dirty ranges.
    pub incremental: bool,
    /// The format of DEST.
    pub format: ImageFormat,
    /// qcow2 incremental: the previous backup (the overlay's backing image).
    pub backing: Option<PathBuf>,
    /// Directories where backing files a qcow2 header names may be, besides the image's
    /// own (`--backing-dir`).
    pub backing_dirs: Vec<PathBuf>,
    /// The device's cluster size (the qcow2 cluster size, capped at 2 MiB).
    pub cluster_size: u64,
    /// Snapshot reader threads.
    pub jobs: usize,
    /// Average snapshot read rate in bytes per second.
    pub bwlimit: Option<u64>,
    /// Punch each batch on the snapshot once it is durable (and verified) in DEST.
    pub discard: bool,
    /// Re-read each batch from DEST and the snapshot and compare them.
    pub verify: bool,
    /// Report progress on stderr (a bar on a terminal, a plain line every 10% otherwise).
    pub progress: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            incremental: false,
            format: ImageFormat::Raw,
            backing: None,
            backing_dirs: Vec::new(),
            cluster_size: crate::units::DEFAULT_CLUSTER,
            jobs: 1,
            bwlimit: None,
            discard: false,
            verify: false,
            progress: false,
        }
    }
}

/// `fleecefs copy`: copies, then prints the summary (one line, or JSON).
pub fn run(a: &CopyArgs) -> Result<()> {
    let format = match a.format {
        CopyFormatArg::Raw => ImageFormat::Raw,
        CopyFormatArg::Qcow2 => ImageFormat::Qcow2,
    };
    if a.backing.is_some() && !(format == ImageFormat::Qcow2 && a.incremental) {
        return Err(Error::invalid(
            "--backing names the previous backup of a qcow2 overlay: it needs --format qcow2 \
             --incremental",
        ));
    }
    if format == ImageFormat::Qcow2 && a.incremental && a.backing.is_none() {
        return Err(Error::invalid(
            "--format qcow2 --incremental writes a new overlay: name the previous backup with \
             --backing PREV",
        ));
    }
    let jobs = a.jobs.unwrap_or(DEFAULT_JOBS);
    if jobs == 0 || jobs > MAX_JOBS {
        return Err(Error::invalid(format!(
            "--jobs {jobs} is out of range: 1 to {MAX_JOBS}"
        )));
    }
    let bwlimit = match &a.bwlimit {
        None => None,
        Some(t) => match parse_size(t) {
            Ok(0) => return Err(Error::invalid("--bwlimit must be more than 0")),
            Ok(n) => Some(n),
            Err(e) => return Err(Error::invalid(format!("--bwlimit: {e}"))),
        },
    };
    let opts = CopyOptions {
        incremental: a.incremental,
        format,
        backing: a.backing.clone(),
        backing_dirs: a.backing_dir.clone(),
        cluster_size: crate::units::DEFAULT_CLUSTER,
        jobs,
        bwlimit,
        discard: a.discard,
        verify: a.verify,
        progress: true,
    };
    let r = copy(&a.mountpoint, &a.name, &a.dest, opts);
    report_outcome(
        &a.mountpoint,
        "copy",
        &format!("copy of {} to {}", a.name, a.dest.display()),
        r,
        a.json,
        summary_line,
    )
}

/// Copies `MOUNTPOINT/snapshot/NAME` into `dest` by the ranges of its dirty map.
pub fn copy(
    mountpoint: &Path,
    name: &str,
    dest: &Path,
    mut opts: CopyOptions,
) -> Result<CopySummary> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(Error::invalid(format!("'{name}' is not a device name")));
    }
    crate::control::client::state_dir_of(mountpoint)?;
    let layout = MountLayout::new(mountpoint);
    let snapshot = layout.snapshot(name);
    let dirty = layout.dirty_map(name);
    match std::fs::metadata(&snapshot) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(if layout.live(name).exists() {
                Error::not_found(format!(
                    "no backup access includes {name}; run fleecefs setup first"
                ))
            } else {
                Error::not_found(format!("no device {name} in {}", mountpoint.display()))
            });
        }
        Err(e) => return Err(Error::io(format!("{}", snapshot.display()), e)),
    }
    let mount_dev = std::fs::metadata(mountpoint)
        .context(|| format!("stat of {}", mountpoint.display()))?
        .dev();
    let existing = opts.incremental && opts.format == ImageFormat::Raw;
    check_dest_outside(dest, mount_dev, existing)?;
    if opts.format == ImageFormat::Qcow2 {
        opts.cluster_size = device_cluster_size(mountpoint, name)?;
    }
    copy_files(&snapshot, &dirty, name, dest, opts)
}

/// The cluster size of device `name`, from the daemon's `status`.
fn device_cluster_size(mountpoint: &Path, name: &str) -> Result<u64> {
    let v = crate::control::client::call(mountpoint, &crate::control::proto::Request::Status {})?;
    let status = crate::engine::Status::deserialize(&v)
        .map_err(|e| Error::invalid(format!("the daemon's reply is not understood: {e}")))?;
    status
        .devices
        .iter()
        .find(|d| d.name == name)
        .map(|d| d.cluster_size)
        .ok_or_else(|| Error::not_found(format!("no device {name} in {}", mountpoint.display())))
}

/// Copies `snapshot` into `dest` by the ranges listed in the dirty map file `dirty`.
/// `name` only names the device in messages and the summary.
pub fn copy_files(
    snapshot: &Path,
    dirty: &Path,
    name: &str,
    dest: &Path,
    opts: CopyOptions,
) -> Result<CopySummary> {
    let start = Instant::now();
    let snap = File::open(snapshot).map_err(|e| snapshot_error(name, None, e))?;
    // Discards go through a write-only handle: it cannot be mapped, so it does not keep
    // mappings of the snapshot from loading pages (docs/usage.md).
    let discarder = if opts.discard {
        Some(
            OpenOptions::new()
                .write(true)
                .open(snapshot)
                .map_err(|e| snapshot_error(name, None, e))?,
        )
    } else {
        None
    };
    let size = snap
        .metadata()
        .context(|| format!("stat of {}", snapshot.display()))?
        .len();
    let text = std::fs::read_to_string(dirty).map_err(|e| snapshot_error(name, None, e))?;
    let ranges = dirtymap::parse(&text).map_err(|e| Error::invalid(format!("{name}: {e}")))?;
    check_ranges(&ranges, size).map_err(|e| Error::invalid(format!("{name}: {e}")))?;
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    if !opts.incremental && total != size {
        return Err(Error::invalid(format!(
            "the backup access of {name} is incremental (its dirty map covers {} of {}): {}",
            format_size(total),
            format_size(size),
            match opts.format {
                ImageFormat::Raw => "use --incremental onto the previous full image",
                ImageFormat::Qcow2 => "use --incremental --backing PREV, the previous backup",
            }
        )));
    }
    let (out, backing) = match opts.format {
        ImageFormat::Raw => {
            let (f, grow_from) = open_dest(dest, size, opts.incremental, &ranges)?;
            // An existing DEST may be someone's disk (a full copy creates a new file).
            if opts.incremental {
                lock_dest(&f, dest)?;
            }
            if let Some(old) = grow_from {
                // The device grew since the previous backup: so does its image (sparse);
                // the dirty map covers the new range (checked), so all of it is written.
                f.set_len(size)
                    .and_then(|_| f.sync_all())
                    .context(|| format!("growing {} from {old} to {size} bytes", dest.display()))?;
                log::info!("{} grown from {old} to {size} bytes", dest.display());
            }
            (
                Dest::Raw {
                    file: f,
                    existing: opts.incremental,
                    punch: true,
                },
                None,
            )
        }
        ImageFormat::Qcow2 => open_qcow2_dest(dest, size, &opts)?,
    };
    let virtual_size = match opts.format {
        ImageFormat::Qcow2 => Some(qcow2::virtual_size(size)),
        ImageFormat::Raw => None,
    };
    if let Some(v) = virtual_size.filter(|&v| v != size) {
        log::info!(
            "{name} is {size} bytes, not a multiple of {}: the qcow2 virtual size is rounded up \
             to {v} bytes (QEMU reads whole sectors; the last {} byte(s) read as zeros)",
            qcow2::SECTOR,
            v - size
        );
    }
    // Every DEST but a raw incremental one is a new file of ours.
    let new_file = !(opts.incremental && opts.format == ImageFormat::Raw);
    let cluster = match &out {
        Dest::Qcow2 { cluster, .. } => Some(*cluster),
        Dest::Raw { .. } => None,
    };
    let mut c = Copier {
        name,
        snap: &snap,
        dest: out,
        dest_path: dest,
        discarder: discarder.as_ref(),
        verify: opts.verify,
        sbuf: Vec::new(),
        vbuf: Vec::new(),
        progress: Progress::new(name, total, opts.progress),
        s: CopySummary {
            name: name.to_string(),
            dest: dest.display().to_string(),
            bytes_total: total,
            bytes_read: 0,
            bytes_written: 0,
            bytes_skipped_zero: 0,
            bytes_discarded: 0,
            ranges: ranges.len() as u64,
            seconds: 0.0,
            incremental: opts.incremental,
            verified: opts.verify,
            format: opts.format.name().to_string(),
            clusters_allocated: None,
            device_size: size,
            virtual_size,
            cluster_size: cluster,
            backing_file: backing.as_ref().map(|b| b.0.clone()),
            backing_format: backing.as_ref().map(|b| b.1.name().to_string()),
            jobs: opts.jobs,
            bwlimit: opts.bwlimit,
        },
    };
    let pacer = opts.bwlimit.map(reader::Pacer::new);
    let r = c.run(&ranges, opts.jobs, pacer.as_ref());
    c.progress.finish(r.is_ok());
    let Copier { dest: out, s, .. } = c;
    let mut s = s;
    s.clusters_allocated = out.clusters();
    // Closing DEST releases its lock (the check below opens it again).
    drop(out);
    let r = r.and_then(|()| {
        if opts.format == ImageFormat::Qcow2 {
            check_qcow2(dest, qcow2::virtual_size(size), size, opts.verify, &opts)
        } else {
            Ok(())
        }
    });
    if let Err(e) = r {
        if new_file {
            // The file is ours and incomplete; left behind it would block the retry.
            let note = match std::fs::remove_file(dest) {
                Ok(()) => format!("the incomplete {} was removed", dest.display()),
                Err(re) => format!(
                    "the incomplete {} could not be removed: {re}",
                    dest.display()
                ),
            };
            return Err(e.with_note(note));
        }
        return Err(e);
    }
    s.seconds = start.elapsed().as_secs_f64();
    Ok(s)
}

/// Creates a qcow2 DEST: a full image, or an overlay on `opts.backing` (checked: it
/// exists, is readable as raw or qcow2, and is not larger than the device). Returns the
/// backing file name and format recorded in DEST.
fn open_qcow2_dest(
    dest: &Path,
    size: u64,
    opts: &CopyOptions,
) -> Result<(Dest, Option<(String, ImageFormat)>)> {
    if std::fs::symlink_metadata(dest).is_ok() {
        return Err(Error::invalid(format!(
            "{} already exists: a qcow2 copy always writes a new image (full or overlay)",
            dest.display()
        )));
    }
    let cluster = qcow2::cluster_for(opts.cluster_size);
    let mut backing = None;
    let mut recorded = None;
    if opts.incremental {
        let Some(prev_path) = &opts.backing else {
            return Err(Error::invalid("--incremental qcow2 needs --backing PREV"));
        };
        let prev = qcow2::open_chain(prev_path, "previous backup", &opts.backing_dirs)?;
        // A qcow2 backup of this device has its size rounded up to whole sectors.
        if prev.size > qcow2::virtual_size(size) {
            return Err(Error::invalid(format!(
                "previous backup {} is {} bytes but the device is {size} bytes: it is not a \
                 backup of this device",
                prev_path.display(),
                prev.size
            )));
        }
        if prev.size < size {
            log::info!(
                "the device grew from {} to {size} bytes since {}: the overlay has the new size",
                prev.size,
                prev_path.display()
            );
        }
        let name = qcow2::backing_name(dest, prev_path)?;
        recorded = Some((name.clone(), prev.format));
        backing = Some((name, prev.format, prev.image));
    }
    let overlay = backing.is_some();
    let f = create_new(dest, "a qcow2 copy always writes a new image")?;
    let img = qcow2::create(f, dest, qcow2::virtual_size(size), cluster, backing)?;
    if let Err(e) = sync_parent(dest) {
        drop(img);
        let _ = std::fs::remove_file(dest);
        return Err(e);
    }
    Ok((
        Dest::Qcow2 {
            img,
            overlay,
            clusters: 0,
            cluster,
        },
        recorded,
    ))
}

/// Ranges must be sorted, disjoint, non-empty and inside the device.
fn check_ranges(ranges: &[(u64, u64)], size: u64) -> std::result::Result<(), String> {
    let mut end = 0u64;
    for (i, &(off, len)) in ranges.iter().enumerate() {
        let e = off.saturating_add(len);
        if len == 0 || off < end || e > size {
            return Err(format!(
                "dirty map range {} ({off} {len}) is empty, unsorted or past the end ({size})",
                i + 1
            ));
        }
        end = e;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 33) as u8 | 1
            })
            .collect()
    }

    struct Setup {
        dir: tempfile::TempDir,
        snap: PathBuf,
        dirty: PathBuf,
        image: Vec<u8>,
    }

    /// A "snapshot" of `len` bytes: noise except zeros in `[len/4, len/2)` and one 4 KiB
    /// zero-free block inside that zero region's last quarter.
    fn setup(len: usize, map: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let mut image = noise(len, 7);
        image[len / 4..len / 2].fill(0);
        let k = len / 2 - len / 16;
        image[k..k + 4096].copy_from_slice(&noise(4096, 9));
        let snap = dir.path().join("disk");
        let dirty = dir.path().join("disk.dirty");
        std::fs::write(&snap, &image).unwrap();
        std::fs::write(&dirty, map).unwrap();
        Setup {
            dir,
            snap,
            dirty,
            image,
        }
    }

    fn opts() -> CopyOptions {
        CopyOptions::default()
    }

    /// A copier of device "disk" from `snap` into `dest` (at `dest_path`), for calling
    /// its `verify` directly.
    fn verifier<'a>(snap: &'a File, dest: Dest, dest_path: &'a Path, s: CopySummary) -> Copier<'a> {
        Copier {
            name: "disk",
            snap,
            dest,
            dest_path,
            discarder: None,
            verify: true,
            sbuf: Vec::new(),
            vbuf: Vec::new(),
            progress: Progress::new("disk", 0, false),
            s,
        }
    }

    #[test]
    fn range_checks() {
        assert!(check_ranges(&[(0, 10), (10, 5)], 15).is_ok());
        assert!(check_ranges(&[], 15).is_ok());
        assert!(check_ranges(&[(0, 10), (5, 5)], 15).is_err());
        assert!(check_ranges(&[(0, 16)], 15).is_err());
        assert!(check_ranges(&[(0, 0)], 15).is_err());
        assert!(check_ranges(&[(u64::MAX, 2)], 15).is_err());
    }

    #[test]
    fn full_copy_is_sparse_and_counts_add_up() {
        let len = 12 << 20;
        let s = setup(len, &format!("0 {len}\n"));
        let dest = s.dir.path().join("full.img");
        let o = CopyOptions {
            verify: true,
            ..opts()
        };
        let r = copy_files(&s.snap, &s.dirty, "disk", &dest, o).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), s.image);
        assert_eq!(r.bytes_total, len as u64);
        assert_eq!(r.bytes_read, len as u64);
        assert_eq!(r.bytes_written + r.bytes_skipped_zero, r.bytes_read);
        // the zero region minus the one 64 KiB block holding data
        assert_eq!(r.bytes_skipped_zero, (len / 4 - ZERO_BLOCK) as u64);
        assert_eq!((r.ranges, r.bytes_discarded), (1, 0));
        assert!(r.verified && !r.incremental);
        let alloc = std::fs::metadata(&dest).unwrap().blocks() * 512;
        assert!(alloc < (len - len / 8) as u64, "allocated {alloc}");
        assert!(summary_line(&r).starts_with("full copy of disk to "));

        // never overwrites, and leaves the existing file alone
        let e = copy_files(&s.snap, &s.dirty, "disk", &dest, opts()).unwrap_err();
        assert!(e.message().contains("already exists"), "{}", e.message());
        assert_eq!(std::fs::read(&dest).unwrap(), s.image);
    }

    #[test]
    fn full_copy_refuses_a_partial_dirty_map() {
        let s = setup(1 << 20, "65536 65536\n");
        let dest = s.dir.path().join("x.img");
        let e = copy_files(&s.snap, &s.dirty, "disk", &dest, opts()).unwrap_err();
        assert!(e.message().contains("--incremental"), "{}", e.message());
        assert!(!dest.exists());
    }

    #[test]
    fn incremental_writes_only_dirty_ranges_and_zeroes_holes() {
        let len = 8 << 20;
        let q = len / 4;
        // dirty: a range of data, a range of zeros (punched), and the unaligned end
        let map = format!("0 65536\n{q} 1048576\n{} {}\n", len - 100_000, 100_000);
        let s = setup(len, &map);
        let dest = s.dir.path().join("prev.img");
        let old = noise(len, 3);
        std::fs::write(&dest, &old).unwrap();
        let o = CopyOptions {
            incremental: true,
            verify: true,
            discard: true,
            ..opts()
        };
        let r = copy_files(&s.snap, &s.dirty, "disk", &dest, o).unwrap();
        let mut want = old.clone();
        for (off, n) in dirtymap::parse(&map).unwrap() {
            let (a, b) = (off as usize, (off + n) as usize);
            want[a..b].copy_from_slice(&s.image[a..b]);
        }
        assert_eq!(std::fs::read(&dest).unwrap(), want);
        assert_eq!(r.ranges, 3);
        assert_eq!(r.bytes_total, 65536 + 1048576 + 100_000);
        assert_eq!(r.bytes_read, r.bytes_total);
        assert_eq!(r.bytes_skipped_zero, 1048576);
        assert_eq!(r.bytes_written, 65536 + 100_000);
        assert_eq!(r.bytes_discarded, r.bytes_total);
        // --discard punched the "snapshot" (a plain file here: zeros)
        let snap = std::fs::read(&s.snap).unwrap();
        assert!(is_zero(&snap[..65536]) && is_zero(&snap[len - 100_000..]));
        assert_eq!(snap[65536..q], s.image[65536..q]);
    }

    #[test]
    fn incremental_needs_the_previous_image() {
        let s = setup(1 << 20, "0 65536\n");
        let o = CopyOptions {
            incremental: true,
            ..opts()
        };
        let missing = s.dir.path().join("missing.img");
        let e = copy_files(&s.snap, &s.dirty, "disk", &missing, o.clone()).unwrap_err();
        assert!(e.message().contains("does not exist"), "{}", e.message());
        assert!(!missing.exists());
        let short = s.dir.path().join("short.img");
        std::fs::write(&short, [1u8; 4096]).unwrap();
        let e = copy_files(&s.snap, &s.dirty, "disk", &short, o).unwrap_err();
        assert!(
            e.message().contains("not an image of this device"),
            "{}",
            e.message()
        );
        assert_eq!(std::fs::read(&short).unwrap(), [1u8; 4096]);
    }

    #[test]
    fn verification_catches_a_mismatch() {
        // DEST damaged after the copy: the verifier names the first differing byte.
        let s = setup(1 << 20, "0 1048576\n");
        let dest = s.dir.path().join("d.img");
        std::fs::write(&dest, &s.image).unwrap();
        let snap = File::open(&s.snap).unwrap();
        let out = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dest)
            .unwrap();
        crate::sys::write_all_at(&out, &[0xEE], 777_777).unwrap();
        let summary =
            copy_files(&s.snap, &s.dirty, "disk", &s.dir.path().join("x"), opts()).unwrap();
        let raw = Dest::Raw {
            file: out,
            existing: true,
            punch: true,
        };
        let mut c = verifier(&snap, raw, &dest, summary);
        assert!(c.verify(0, 777_777).is_ok());
        let e = c.verify(0, 1 << 20).unwrap_err();
        assert!(e.message().contains("at offset 777777"), "{}", e.message());
    }

    #[test]
    fn qcow2_full_and_overlay_read_back_through_the_chain() {
        // Full qcow2 copy, then an overlay with the incremental dirty map: the overlay,
        // read through its backing image, equals the second snapshot; a damaged cluster
        // is caught by verification.
        let s = setup(1 << 20, "0 1048576\n");
        let full = s.dir.path().join("0.qcow2");
        let o = CopyOptions {
            format: ImageFormat::Qcow2,
            verify: true,
            jobs: 3,
            ..opts()
        };
        let r = copy_files(&s.snap, &s.dirty, "disk", &full, o).unwrap();
        assert_eq!(r.format, "qcow2");
        // A zero-free cluster count: [len/4, len/2) is zeros except one 4K block.
        assert_eq!(r.clusters_allocated, Some(16 - 4 + 1));
        // Second point: new data over 64K..128K, zeros over 0..64K.
        let mut image2 = s.image.clone();
        image2[65536..131072].fill(0x42);
        image2[..65536].fill(0);
        std::fs::write(&s.snap, &image2).unwrap();
        std::fs::write(&s.dirty, "0 131072\n").unwrap();
        let top = s.dir.path().join("1.qcow2");
        let o = CopyOptions {
            format: ImageFormat::Qcow2,
            incremental: true,
            backing: Some(full.clone()),
            verify: true,
            ..opts()
        };
        let r = copy_files(&s.snap, &s.dirty, "disk", &top, o).unwrap();
        assert_eq!(r.backing_file.as_deref(), Some("0.qcow2"));
        assert_eq!(r.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(r.clusters_allocated, Some(1));
        assert_eq!(r.bytes_skipped_zero, 65536);
        let chain = qcow2::open_chain(&top, "image", &[]).unwrap();
        let mut got = vec![0u8; 1 << 20];
        chain.image.read(&mut got[..], 0).unwrap();
        assert!(
            got == image2,
            "the overlay does not read as the second snapshot"
        );
        drop(chain);
        // Verification reads back through the chain and names the first bad byte.
        let prev = qcow2::open_chain(&full, "previous", &[]).unwrap();
        let bad = s.dir.path().join("bad.qcow2");
        let img = qcow2::create(
            dest::create_new(&bad, "test").unwrap(),
            &bad,
            1 << 20,
            65536,
            Some(("0.qcow2".into(), prev.format, prev.image)),
        )
        .unwrap();
        img.image.write(&vec![0x43u8; 65536][..], 65536).unwrap();
        let snap = File::open(&s.snap).unwrap();
        let all = s.dir.path().join("all.dirty");
        std::fs::write(&all, "0 1048576\n").unwrap();
        let summary = copy_files(&s.snap, &all, "disk", &s.dir.path().join("x"), opts()).unwrap();
        let qcow2 = Dest::Qcow2 {
            img,
            overlay: true,
            clusters: 0,
            cluster: 65536,
        };
        let mut c = verifier(&snap, qcow2, &bad, summary);
        // The damaged cluster differs from the snapshot at its first byte.
        let e = c.verify(65536, 65536).unwrap_err();
        assert!(e.message().contains("at offset 65536"), "{}", e.message());
    }
}

//! Where a copy writes: a raw file or block device (full: new and sparse; incremental:
//! the previous image, updated in place), or a new qcow2 image (full, or an overlay on the
//! previous backup). The copier sees one interface: data at an offset, zeros over a range,
//! make durable, read back. Also the checks and opening of DEST before a copy starts.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::copy::qcow2::{self, ImageFormat, NewImage};
use crate::error::{Error, IoContext, Result};
use crate::secure_path;
use crate::sys;

/// What became of a zero range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zeroed {
    /// Nothing written: DEST already reads zeros there (a new image), or the range was
    /// punched or marked zero without writing data.
    Skipped,
    /// Zeros were written as data (DEST cannot punch holes).
    Written,
}

/// The destination of a copy.
pub enum Dest {
    /// A raw image.
    Raw {
        /// The open file.
        file: File,
        /// Whether it is the previous image (zeros must be written or punched).
        existing: bool,
        /// Cleared once the file refuses PUNCH_HOLE: zeros are then written.
        punch: bool,
    },
    /// A new qcow2 image; `overlay` when it has a backing image.
    Qcow2 {
        /// The image and a second descriptor of its file.
        img: NewImage,
        /// Whether it has a backing image (zeros must then be recorded).
        overlay: bool,
        /// Data clusters written.
        clusters: u64,
        /// Its cluster size.
        cluster: u64,
    },
}

impl Dest {
    /// Granularity of zero detection: all-zero blocks of this size are not written as data.
    pub fn zero_block(&self) -> usize {
        match self {
            Dest::Raw { .. } => super::ZERO_BLOCK,
            Dest::Qcow2 { cluster, .. } => *cluster as usize,
        }
    }

    /// Writes `buf` at `off`.
    pub fn write(&mut self, buf: &[u8], off: u64, path: &Path) -> Result<()> {
        match self {
            Dest::Raw { file, .. } => sys::write_all_at(file, buf, off),
            Dest::Qcow2 {
                img,
                clusters,
                cluster,
                ..
            } => {
                *clusters += (buf.len() as u64).div_ceil(*cluster);
                img.image.write(buf, off)
            }
        }
        .context(|| format!("writing {} at offset {off}", path.display()))
    }

    /// Makes `[off, off+len)` read as zeros.
    pub fn zero(&mut self, off: u64, len: u64, path: &Path) -> Result<Zeroed> {
        match self {
            Dest::Raw {
                existing: false, ..
            }
            | Dest::Qcow2 { overlay: false, .. } => Ok(Zeroed::Skipped),
            Dest::Qcow2 { img, .. } => {
                img.image
                    .write_zeroes(off, len)
                    .context(|| format!("zeroing {off}+{len} in {}", path.display()))?;
                Ok(Zeroed::Skipped)
            }
            Dest::Raw { file, punch, .. } => {
                if *punch {
                    match sys::fallocate(
                        file,
                        sys::FALLOC_PUNCH_HOLE | sys::FALLOC_KEEP_SIZE,
                        off,
                        len,
                    ) {
                        Ok(()) => return Ok(Zeroed::Skipped),
                        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                            log::info!(
                                "{} cannot punch holes; writing zeros instead",
                                path.display()
                            );
                            *punch = false;
                        }
                        Err(e) => {
                            return Err(Error::io(
                                format!("punching {off}+{len} in {}", path.display()),
                                e,
                            ))
                        }
                    }
                }
                let zeros = vec![0u8; len as usize];
                sys::write_all_at(file, &zeros, off)
                    .context(|| format!("writing {} at offset {off}", path.display()))?;
                Ok(Zeroed::Written)
            }
        }
    }

    /// Makes everything written so far durable: image metadata, then `fdatasync`
    /// (`fsync` with `all`).
    pub fn sync(&mut self, all: bool, path: &Path) -> Result<()> {
        match self {
            Dest::Raw { file, .. } => {
                if all {
                    file.sync_all()
                } else {
                    file.sync_data()
                }
            }
            Dest::Qcow2 { img, .. } => img.image.flush().and_then(|()| img.image.sync()),
        }
        .context(|| format!("syncing {}", path.display()))
    }

    /// Reads `buf.len()` bytes at `off` as DEST's reader sees them (through the backing
    /// chain for an overlay), after dropping the file's cached pages of the range so the
    /// data comes from the disk.
    pub fn read_back(&mut self, buf: &mut [u8], off: u64, path: &Path) -> Result<()> {
        match self {
            Dest::Raw { file, .. } => {
                sys::drop_cached_pages(file, off, buf.len() as u64);
                sys::read_exact_at(file, buf, off)
            }
            Dest::Qcow2 { img, .. } => {
                // Data clusters sit at other host offsets: drop the whole file's pages.
                sys::drop_cached_pages(&img.raw, 0, 0);
                img.image.read(&mut *buf, off)
            }
        }
        .context(|| format!("reading back {} at offset {off}", path.display()))
    }

    /// Data clusters written (qcow2 only).
    pub fn clusters(&self) -> Option<u64> {
        match self {
            Dest::Raw { .. } => None,
            Dest::Qcow2 { clusters, .. } => Some(*clusters),
        }
    }
}
/// Reopens a finished qcow2 DEST by its path alone, as `qemu-img` would: the header, the
/// backing chain it names and the virtual size must all be right, and QEMU must read
/// every byte of the `device_size`-byte device from it (it reads whole sectors only).
/// With `verify`, the bytes past the device's end (up to the virtual size) must read as
/// zeros, as QEMU reads the end of the raw device.
pub(crate) fn check_qcow2(
    dest: &Path,
    size: u64,
    device_size: u64,
    verify: bool,
    opts: &super::CopyOptions,
) -> Result<()> {
    // The chain as written: PREV (the operator named it) and whatever PREV's own chain
    // was read from.
    let mut dirs: Vec<PathBuf> = opts.backing_dirs.clone();
    if let Some(prev) = &opts.backing {
        dirs.extend(secure_path::dir_of(prev));
    }
    let img = qcow2::open_chain(dest, "the new image", &dirs)
        .map_err(|e| Error::invalid(format!("the written image does not reopen: {e}")))?;
    if img.format != ImageFormat::Qcow2 || img.size != size {
        return Err(Error::invalid(format!(
            "the written image {} reopens as {} of {} bytes, not qcow2 of {size}",
            dest.display(),
            img.format.name(),
            img.size
        )));
    }
    if qcow2::qemu_readable(img.size) < device_size {
        return Err(Error::invalid(format!(
            "the written image {} has a virtual size of {} bytes, of which QEMU reads only {}: \
             the device has {device_size}",
            dest.display(),
            img.size,
            qcow2::qemu_readable(img.size)
        )));
    }
    if verify && img.size > device_size {
        let mut tail = vec![0u8; (img.size - device_size) as usize];
        img.image
            .read(&mut tail[..], device_size)
            .context(|| format!("reading back {} at offset {device_size}", dest.display()))?;
        if let Some(i) = tail.iter().position(|&b| b != 0) {
            return Err(Error::invalid(format!(
                "verification failed: {} reads non-zero data at offset {}, past the device's end",
                dest.display(),
                device_size + i as u64
            )));
        }
    }
    Ok(())
}

/// Locks an existing DEST like a source (`sys::lock_exclusive`), so that a copy never
/// writes an image a fleecefs daemon or QEMU is using, nor races another copy.
pub(crate) fn lock_dest(out: &File, dest: &Path) -> Result<()> {
    sys::lock_exclusive(out).or_else(|e| {
        if sys::is_lock_conflict(&e) {
            Err(Error::busy(format!(
                "{} is in use: another process holds a lock on it (a source a fleecefs \
                 daemon serves, a disk QEMU uses, or another copy)",
                dest.display()
            )))
        } else {
            log::warn!(
                "cannot lock {} ({e}): copying without the lock",
                dest.display()
            );
            Ok(())
        }
    })
}

/// Refuses a DEST on the fleecefs mount itself (`mount_dev`: its device number): writing
/// the backup into `live/` would change the image, into `snapshot/` would fail half-way.
pub(crate) fn check_dest_outside(dest: &Path, mount_dev: u64, incremental: bool) -> Result<()> {
    let probe = if incremental {
        dest.to_path_buf()
    } else {
        match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    match std::fs::metadata(&probe) {
        Ok(m) if m.dev() == mount_dev => Err(Error::invalid(format!(
            "{} is on the fleecefs mount: write the backup outside it",
            dest.display()
        ))),
        // Whatever else is wrong with DEST, opening it says so.
        _ => Ok(()),
    }
}

/// Whether the sorted, non-overlapping `ranges` cover `[from, to)` entirely.
fn covers(ranges: &[(u64, u64)], from: u64, to: u64) -> bool {
    let mut pos = from;
    for &(off, len) in ranges {
        if off <= pos && off + len > pos {
            pos = off + len;
        }
    }
    pos >= to
}

/// Creates `dest` (mode 0600), which must not exist yet; `why` says why an existing one
/// is refused.
pub(crate) fn create_new(dest: &Path, why: &str) -> Result<File> {
    let (dir, name) = secure_path::parent_of(dest, "DEST")?;
    secure_path::open_in(
        &dir,
        &name,
        libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
        0o600,
    )
    .map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            Error::invalid(format!("{} already exists: {why}", dest.display()))
        } else {
            Error::io(format!("creating {}", dest.display()), e)
        }
    })
}

/// Creates DEST (full) or opens and checks it (incremental). An incremental DEST must be
/// the device's size, or the previous image of a device that grew since: a smaller
/// regular file that holds every range the dirty map leaves out (a map covering the
/// whole device leaves none, so then only the device's size is accepted). For such a
/// file, also returns DEST's size: the caller grows it.
pub(crate) fn open_dest(
    dest: &Path,
    size: u64,
    incremental: bool,
    ranges: &[(u64, u64)],
) -> Result<(File, Option<u64>)> {
    if !incremental {
        let f = create_new(
            dest,
            "a full copy never overwrites a file \
             (remove it, or use --incremental to update the previous image)",
        )?;
        if let Err(e) = f.set_len(size) {
            drop(f);
            let _ = std::fs::remove_file(dest);
            return Err(Error::io(
                format!("setting the size of {}", dest.display()),
                e,
            ));
        }
        if let Err(e) = sync_parent(dest) {
            drop(f);
            let _ = std::fs::remove_file(dest);
            return Err(e);
        }
        return Ok((f, None));
    }
    let (dir, name) = secure_path::parent_of(dest, "DEST")?;
    let f = secure_path::open_in(&dir, &name, libc::O_RDWR, 0).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::not_found(format!(
                "{} does not exist: --incremental writes onto the image of the previous \
                 backup (make a full copy first)",
                dest.display()
            ))
        } else {
            crate::secure_path::symlink_refused("DEST", dest, e)
        }
    })?;
    let meta = f
        .metadata()
        .context(|| format!("stat of {}", dest.display()))?;
    // A second name could be any file's (a hard link made to it): only a file with one.
    if meta.is_file() && meta.nlink() > 1 {
        return Err(Error::invalid(format!(
            "{} has {} hard links: --incremental writes only onto a file with one name",
            dest.display(),
            meta.nlink()
        )));
    }
    let len = if meta.file_type().is_block_device() {
        sys::block_device_size(&f).context(|| format!("size of {}", dest.display()))?
    } else if meta.is_file() {
        meta.len()
    } else {
        return Err(Error::invalid(format!(
            "{} is not a regular file or block device",
            dest.display()
        )));
    };
    // A smaller image is the previous backup of a device that grew since: it holds every
    // range the dirty map leaves out (so the map covers the rest). A map covering the
    // whole device (a new or recreated bitmap) names no previous backup, so no smaller
    // size is expected: only the device's.
    let whole = covers(ranges, 0, size);
    if len < size && meta.is_file() && !whole && covers(ranges, len, size) {
        return Ok((f, Some(len)));
    }
    if len != size {
        let why = if len < size && meta.is_file() && whole {
            " (the dirty map covers the whole device: there is no previous backup to update, make a full copy to a new file)"
        } else if len < size && meta.is_file() {
            " (and the dirty map does not cover the range the device grew by)"
        } else {
            ""
        };
        return Err(Error::invalid(format!(
            "{} is {len} bytes but the device is {size} bytes{why}: it is not an image of this device",
            dest.display()
        )));
    }
    Ok((f, None))
}

/// Makes a newly created DEST's directory entry durable.
pub(crate) fn sync_parent(dest: &Path) -> Result<()> {
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    File::open(&parent)
        .and_then(|d| d.sync_all())
        .context(|| format!("syncing directory {}", parent.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_new_refuses_an_existing_file_and_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = create_new(&p, "because").unwrap();
        assert_eq!(f.metadata().unwrap().mode() & 0o777, 0o600);
        std::fs::write(&p, b"kept").unwrap();
        let e = create_new(&p, "because").err().unwrap();
        assert!(e.to_string().contains("already exists: because"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"kept");
    }

    #[test]
    fn an_incremental_dest_has_the_device_size_or_the_size_before_it_grew() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![1u8; 4096]).unwrap();
        // The device grew from 4096 to 8192 bytes: the new range is dirty.
        let (_, grow) = open_dest(&p, 8192, true, &[(0, 512), (4096, 4096)]).unwrap();
        assert_eq!(grow, Some(4096));
        // A file missing a clean range is not the previous image.
        let e = open_dest(&p, 8192, true, &[(6144, 2048)]).err().unwrap();
        assert!(
            e.to_string().contains("4096 bytes but the device is 8192"),
            "{e}"
        );
        // The whole device dirty (a new bitmap): nothing smaller than the device.
        let e = open_dest(&p, 8192, true, &[(0, 8192)]).err().unwrap();
        assert!(e.to_string().contains("no previous backup"), "{e}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4096);
        let (_, grow) = open_dest(&p, 4096, true, &[(0, 4096)]).unwrap();
        assert_eq!(grow, None);
    }
}

//! Where a copy writes: a raw file or block device (full: new and sparse; incremental:
//! the previous image, updated in place), or a new qcow2 image (full, or an overlay on the
//! previous backup). The copier sees one interface: data at an offset, zeros over a range,
//! make durable, read back.

use std::fs::File;
use std::path::Path;

use crate::copy::qcow2::NewImage;
use crate::error::{Error, IoContext, Result};
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

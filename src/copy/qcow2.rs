//! qcow2 images through the `imago` crate: creating a full image or an overlay on a
//! previous backup (raw or qcow2, its format recorded in the header), and opening a chain
//! read-only for verification and restore. No qcow2 structure is written here by hand;
//! docs/architecture.md says why imago and not `qemu-img` + `qemu-storage-daemon`.
//!
//! Locks: the files are opened here, locked with OFD locks, and handed to imago (which
//! takes none of its own). DEST holds an exclusive lock while it is written, PREV a
//! shared one while it is read: a fleecefs daemon serving PREV as a source, or another
//! copy writing it, makes the copy fail instead of reading a moving image, and QEMU, whose
//! image locks are OFD locks on single bytes, sees them as conflicting permissions.

use std::fs::File as StdFile;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use imago::file::File;
use imago::format::gate::ImplicitOpenGate;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder,
    StorageOpenOptions,
};

use crate::error::{Error, IoContext, Result};
use crate::sys;

/// An image opened through imago (any format, with its backing chain).
pub type Image = FormatAccess<File>;

/// Opens the backing files a qcow2 header names as the CLI opens every file it is given
/// ([`crate::secure_path::parent_of`], `O_NOFOLLOW`), and only in the directories the
/// operator named: the directory of the image opened, those of the other images on the
/// command line and every `--backing-dir`. A header is the image's writer's word, not the
/// operator's: it cannot make root read another file (a root-only one, into a disk).
#[derive(Clone, Debug)]
struct NoFollowGate {
    /// (st_dev, st_ino) of the directories backing files may be in.
    allowed: std::sync::Arc<Vec<(u64, u64)>>,
}

impl ImplicitOpenGate<File> for NoFollowGate {
    fn open_format<F: FormatDriverBuilder<File>>(&mut self, builder: F) -> io::Result<Image> {
        Ok(FormatAccess::new(builder.open(self.clone())?))
    }

    fn open_storage(&mut self, opts: StorageOpenOptions) -> io::Result<File> {
        let path = opts
            .get_filename()
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "a backing file without a name")
            })?
            .to_path_buf();
        let denied = |e: Error| io::Error::new(io::ErrorKind::PermissionDenied, e.to_string());
        let (dir, name) = crate::secure_path::parent_of(&path, "backing file").map_err(denied)?;
        let m = dir.metadata()?;
        if !self.allowed.contains(&(m.dev(), m.ino())) {
            return Err(denied(Error::invalid(format!(
                "backing file {} is not in the directory of the image that names it nor in a --backing-dir: \
                 fleecefs reads a backing file only where the operator said (keep the chain in one directory, or add --backing-dir {})",
                path.display(),
                path.parent().unwrap_or(Path::new("/")).display()
            ))));
        }
        let flags = if opts.get_writable() {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
        let f = crate::secure_path::open_in(&dir, &name, flags, 0).map_err(|e| {
            denied(crate::secure_path::symlink_refused(
                "backing file",
                &path,
                e,
            ))
        })?;
        File::from_open_file(f, opts)
    }
}

/// The qcow2 magic, `QFI\xfb`, at offset 0.
const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Largest qcow2 cluster QEMU (and imago) accept.
pub const MAX_CLUSTER: u64 = 2 << 20;
/// Smallest qcow2 cluster.
pub const MIN_CLUSTER: u64 = 512;

/// QEMU's sector: the block layer counts every image size in whole sectors.
pub const SECTOR: u64 = 512;

/// The virtual size of a qcow2 image of a `device_size`-byte device: rounded up to whole
/// sectors. QEMU reads a qcow2 image's size rounded *down* to a sector (so an exact size
/// would lose the tail), and reads a raw file's rounded *up* (the tail reads as zeros):
/// rounded up, the qcow2 image reads as QEMU reads the raw device.
pub fn virtual_size(device_size: u64) -> u64 {
    // Past the largest multiple of a sector nothing fits (qcow2 refuses such sizes).
    device_size
        .div_ceil(SECTOR)
        .checked_mul(SECTOR)
        .unwrap_or(u64::MAX / SECTOR * SECTOR)
}

/// The bytes of an image of `size` (its qcow2 header) that QEMU reads.
pub fn qemu_readable(size: u64) -> u64 {
    size / SECTOR * SECTOR
}

/// The formats a backup image can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// Plain bytes at their offsets.
    Raw,
    /// QEMU's qcow2 (possibly with a backing chain).
    Qcow2,
}

impl ImageFormat {
    /// The name QEMU uses (`backing_fmt`, `-f`).
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// The qcow2 cluster size for a fleecefs cluster size: the same, capped at qcow2's
/// largest (a fleecefs cluster of 4M is two qcow2 clusters; dirty ranges stay aligned).
pub fn cluster_for(fleecefs_cluster: u64) -> u64 {
    fleecefs_cluster.clamp(MIN_CLUSTER, MAX_CLUSTER)
}

/// Probes the format of an open file by its first bytes (QEMU's probe for these two).
pub fn probe(f: &StdFile) -> io::Result<ImageFormat> {
    let mut head = [0u8; 4];
    let n = sys::read_at(f, &mut head, 0)?;
    Ok(if n == 4 && head == MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

fn storage(f: StdFile, path: &Path, write: bool) -> io::Result<File> {
    File::from_open_file(f, StorageOpenOptions::new().filename(path).write(write))
}

/// A previous backup opened read-only (with its own backing chain, for qcow2), under a
/// shared lock.
pub struct Prev {
    /// The image, readable through its whole chain.
    pub image: Image,
    /// Its format.
    pub format: ImageFormat,
    /// Its virtual size.
    pub size: u64,
}

/// Opens `path` read-only (the previous backup of an incremental copy, or a restore
/// source) and reads its format and virtual size. `what` names it in messages. The
/// backing files a qcow2 header names are read only in `path`'s directory and in
/// `backing_dirs` (the operator's).
pub fn open_chain(path: &Path, what: &str, backing_dirs: &[PathBuf]) -> Result<Prev> {
    let (dir, name) = crate::secure_path::parent_of(path, what)?;
    let mut allowed = Vec::new();
    let here = dir
        .metadata()
        .context(|| format!("stat of the directory of {}", path.display()))?;
    allowed.push((here.dev(), here.ino()));
    for d in backing_dirs {
        let m = std::fs::metadata(d).context(|| format!("--backing-dir {}", d.display()))?;
        if !m.is_dir() {
            return Err(Error::invalid(format!(
                "--backing-dir {} is not a directory",
                d.display()
            )));
        }
        allowed.push((m.dev(), m.ino()));
    }
    let gate = NoFollowGate {
        allowed: std::sync::Arc::new(allowed),
    };
    let f = crate::secure_path::open_in(&dir, &name, libc::O_RDONLY, 0).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::not_found(format!("{what} {} does not exist", path.display()))
        } else {
            crate::secure_path::symlink_refused(what, path, e)
        }
    })?;
    let meta = f
        .metadata()
        .context(|| format!("stat of {}", path.display()))?;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return Err(Error::invalid(format!(
            "{what} {} is not a regular file or block device",
            path.display()
        )));
    }
    lock_shared(&f, path, what)?;
    let format = probe(&f).context(|| format!("reading {}", path.display()))?;
    let st = storage(f, path, false).context(|| format!("opening {}", path.display()))?;
    let image = match format {
        ImageFormat::Raw => Raw::<File>::builder(st)
            .write(false)
            .open(DenyImplicitOpenGate::default())
            .map(FormatAccess::new),
        // Its backing files are opened read-only as its header names them.
        ImageFormat::Qcow2 => Qcow2::<File>::builder(st)
            .write(false)
            .open(gate)
            .map(FormatAccess::new),
    }
    .map_err(|e| {
        Error::invalid(format!(
            "{what} {} is not a usable {} image: {e}",
            path.display(),
            format.name()
        ))
    })?;
    let size = image.size();
    Ok(Prev {
        image,
        format,
        size,
    })
}

/// A new qcow2 image being written (exclusive lock held through `lock_fd`).
pub struct NewImage {
    /// The image; reads of an overlay go through the backing image.
    pub image: Image,
    /// A second descriptor of the same open file (page-cache advice, the lock).
    pub raw: StdFile,
}

/// Formats `f`, the file `dest` just created (empty; `dest::create_new`), as a qcow2
/// image of `size` bytes with `cluster` byte clusters; with `backing`, an overlay whose
/// header names `backing.0` (as written) with format `backing.1`, and whose reads fall
/// through to `backing.2`. On failure `dest` is removed.
pub fn create(
    f: StdFile,
    dest: &Path,
    size: u64,
    cluster: u64,
    backing: Option<(String, ImageFormat, Image)>,
) -> Result<NewImage> {
    let made = (|| {
        // Nobody else has it yet: the lock cannot conflict; a filesystem without locks is
        // no reason to fail.
        if let Err(e) = sys::lock_exclusive(&f) {
            log::warn!(
                "cannot lock {} ({e}): writing without the lock",
                dest.display()
            );
        }
        let raw = f
            .try_clone()
            .context(|| format!("duplicating {}", dest.display()))?;
        let st = storage(f, dest, true).context(|| format!("opening {}", dest.display()))?;
        let mut b = Qcow2::<File>::create_builder(st)
            .size(size)
            .cluster_size(cluster as usize);
        let mut back = None;
        if let Some((name, fmt, image)) = backing {
            b = b.backing(name, fmt.name().to_string());
            back = Some(image);
        }
        let q = b
            .create_open(DenyImplicitOpenGate::default(), move |img| {
                Ok(Qcow2::<File>::builder(img).backing(back).write(true))
            })
            .context(|| format!("formatting {} as qcow2", dest.display()))?;
        Ok(NewImage {
            image: FormatAccess::new(q),
            raw,
        })
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    made
}

/// Takes a shared OFD lock on a file that is only read.
fn lock_shared(f: &StdFile, path: &Path, what: &str) -> Result<()> {
    sys::lock_shared(f).or_else(|e| {
        if sys::is_lock_conflict(&e) {
            Err(Error::busy(format!(
                "{what} {} is in use: another process holds a write lock on it (a source \
                 a fleecefs daemon serves, or a copy writing it)",
                path.display()
            )))
        } else {
            log::warn!(
                "cannot lock {} ({e}): reading without the lock",
                path.display()
            );
            Ok(())
        }
    })
}

/// The backing file name to record in an overlay `dest` for `prev`: the bare file name
/// when both are in one directory (the chain can then be moved as a whole), else the
/// absolute path.
pub fn backing_name(dest: &Path, prev: &Path) -> Result<String> {
    let abs = std::fs::canonicalize(prev).context(|| format!("resolving {}", prev.display()))?;
    let dest_dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dest_dir =
        std::fs::canonicalize(&dest_dir).context(|| format!("resolving {}", dest_dir.display()))?;
    let text = |p: &Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| Error::invalid(format!("{} is not valid UTF-8", p.display())))
    };
    if abs.parent() == Some(dest_dir.as_path()) {
        if let Some(n) = abs.file_name() {
            return text(Path::new(n));
        }
    }
    text(&abs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_sizes_are_whole_sectors() {
        assert_eq!(virtual_size(0), 0);
        assert_eq!(virtual_size(1), 512);
        assert_eq!(virtual_size(512), 512);
        assert_eq!(virtual_size(1000), 1024);
        assert_eq!(virtual_size(u64::MAX), u64::MAX / 512 * 512);
        assert_eq!(qemu_readable(1000), 512);
        assert_eq!(qemu_readable(1024), 1024);
    }

    #[test]
    fn cluster_sizes_map_onto_qcow2() {
        assert_eq!(cluster_for(4 << 10), 4 << 10);
        assert_eq!(cluster_for(64 << 10), 64 << 10);
        assert_eq!(cluster_for(2 << 20), 2 << 20);
        assert_eq!(cluster_for(64 << 20), 2 << 20);
    }

    #[test]
    fn overlay_reads_through_and_records_its_backing() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        let mut data = vec![7u8; 1 << 20];
        data[4096..8192].fill(0);
        std::fs::write(&base, &data).unwrap();
        let prev = open_chain(&base, "previous image", &[]).unwrap();
        assert_eq!(prev.format, ImageFormat::Raw);
        assert_eq!(prev.size, 1 << 20);
        let top = dir.path().join("top.qcow2");
        let name = backing_name(&top, &base).unwrap();
        assert_eq!(name, "base.raw");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&top)
            .unwrap();
        let img = create(
            f,
            &top,
            1 << 20,
            65536,
            Some((name, prev.format, prev.image)),
        )
        .unwrap();
        img.image.write(&[9u8; 65536][..], 65536).unwrap();
        img.image.write_zeroes(0, 65536).unwrap();
        let mut buf = vec![1u8; 3 << 16];
        img.image.read(&mut buf[..], 0).unwrap();
        assert!(buf[..65536].iter().all(|&b| b == 0));
        assert!(buf[65536..2 * 65536].iter().all(|&b| b == 9));
        assert!(buf[2 * 65536..].iter().all(|&b| b == 7));
        img.image.flush().unwrap();
        drop(img);
        // Reopened from its header alone, the chain reads the same.
        let again = open_chain(&top, "image", &[]).unwrap();
        assert_eq!(again.format, ImageFormat::Qcow2);
        let mut b2 = vec![1u8; 3 << 16];
        again.image.read(&mut b2[..], 0).unwrap();
        assert_eq!(buf, b2);
    }
}

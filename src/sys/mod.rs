//! Every libc call of fleecefs, as thin safe wrappers over what std does not offer.
//! This file: files and their I/O (positional only), fallocate, block devices, holes,
//! locks, filesystem space, the shared mapping of bitmap files; `mount.rs`: FUSE mounts
//! and unmounts; `process.rs`: processes, signals, credentials, limits and thread
//! priorities; `fdpass.rs`: fds passed between processes (`SCM_RIGHTS`). Callers use
//! them all as `crate::sys::NAME`.
//! Each `unsafe` block says why it is sound (`clippy::undocumented_unsafe_blocks` is on).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;

mod fdpass;
mod mount;
mod process;
pub use fdpass::*;
pub use mount::*;
pub use process::*;

/// `fallocate(2)` mode bits as the kernel passes them in FUSE requests.
pub const FALLOC_KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
/// Deallocate the range (must be combined with KEEP_SIZE).
pub const FALLOC_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
/// Zero the range, keeping it allocated.
pub const FALLOC_ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;

/// Calls `fallocate(2)` on `file`.
pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = (to_off(offset)?, to_off(len)?);
    loop {
        // SAFETY: plain syscall on a valid fd.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// Size in bytes of the block device open as `file`.
pub fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 into `size`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Bytes of `[from, to)` of `file` that hold data (not holes), found with
/// `lseek(SEEK_DATA/SEEK_HOLE)`; `None` where the file system cannot say.
pub fn data_bytes_in(file: &File, from: u64, to: u64) -> Option<u64> {
    let mut total = 0;
    let mut pos = from;
    while pos < to {
        let Some(data) = seek_data_or_hole(file, pos, true).ok()?.filter(|&d| d < to) else {
            break;
        };
        let hole = seek_data_or_hole(file, data, false)
            .ok()?
            .unwrap_or(to)
            .min(to);
        total += hole - data;
        pos = hole;
    }
    Some(total)
}

/// Logical block size of the block device open as `file` (`BLKSSZGET`).
pub fn logical_block_size(file: &File) -> io::Result<u64> {
    let mut size: libc::c_int = 0;
    // BLKSSZGET = _IO(0x12, 104)
    const BLKSSZGET: libc::c_ulong = 0x1268;
    // SAFETY: the ioctl writes one int into `size`.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKSSZGET as _,
            &mut size as *mut libc::c_int,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(size).unwrap_or(512))
}

/// Bytes actually allocated to `file` on its filesystem (st_blocks * 512).
pub fn allocated_bytes(file: &File) -> io::Result<u64> {
    Ok(file.metadata()?.blocks() * 512)
}

/// Reads exactly `buf.len()` bytes at `offset`; a short file is an I/O error (EIO), since
/// a device shrinks only through `fleecefs resize --allow-shrink`, which changes the size
/// fleecefs serves first (a live read racing that shrink may get EIO for the cut range).
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    match file.read_exact_at(buf, offset) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
        r => r,
    }
}

/// Reads up to `buf.len()` bytes at `offset` (fewer at the end of the file).
pub fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes all of `buf` at `offset`.
pub fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    file.write_all_at(buf, offset)
}

/// Most iovecs one `preadv`/`pwritev` takes (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

/// `preadv` (`write` false) or `pwritev` of all of `iov` at `offset`, in batches of at
/// most `IOV_MAX`, retried after EINTR and short transfers; EOF before the end is
/// `UnexpectedEof`. `iov` is advanced as it goes.
///
/// # Safety
/// Every iovec must point to memory valid for reads (pwritev) or writes (preadv) of its
/// length for the whole call: the kernel reads or writes it.
pub unsafe fn transfer_all_at(
    file: &File,
    iov: &mut [libc::iovec],
    offset: u64,
    write: bool,
) -> io::Result<()> {
    let (mut done, mut offset) = (0usize, offset);
    while done < iov.len() {
        let batch = &iov[done..iov.len().min(done + IOV_MAX)];
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the caller guarantees every iovec's memory; `batch` is at most IOV_MAX
        // entries of a live slice.
        let n = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), batch.as_ptr(), batch.len() as i32, off)
            } else {
                libc::preadv(file.as_raw_fd(), batch.as_ptr(), batch.len() as i32, off)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let mut n = n as usize;
        offset += n as u64;
        while done < iov.len() && n >= iov[done].iov_len {
            n -= iov[done].iov_len;
            done += 1;
        }
        if n > 0 {
            let v = &mut iov[done];
            // SAFETY: n < v.iov_len: the new base stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
            v.iov_len -= n;
        }
    }
    Ok(())
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Takes an exclusive open-file-description lock on the whole file, held until it is
/// closed; EAGAIN or EACCES if another open file holds any lock on it. Sources are locked
/// so that nobody else writes them (a write that does not go through the mount is never
/// copied before it lands): a second fleecefs daemon is refused, and so is QEMU, whose
/// image locking takes the same kind of lock on single bytes of the file. `fleecefs copy`
/// locks its DEST the same way.
pub fn lock_exclusive(file: &std::fs::File) -> std::io::Result<()> {
    ofd_lock(file, libc::F_WRLCK)
}

/// Takes a shared (read) OFD lock on the whole of `file`: it conflicts with
/// [`lock_exclusive`] held by another open file, not with other shared locks.
pub fn lock_shared(file: &std::fs::File) -> std::io::Result<()> {
    ofd_lock(file, libc::F_RDLCK)
}

/// An OFD lock of `kind` (F_WRLCK, F_RDLCK) on the whole of `file`, without waiting.
fn ofd_lock(file: &std::fs::File, kind: libc::c_int) -> std::io::Result<()> {
    // SAFETY: an all-zero flock is valid; the fields are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    // Length 0: to the end of the file, however large it grows.
    fl.l_len = 0;
    // SAFETY: fcntl on a valid fd with a valid flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether a [`lock_exclusive`] error means another open file holds a lock (as opposed to
/// a filesystem without locks).
pub fn is_lock_conflict(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES))
}

/// Capacity of the filesystem holding `path` (`statvfs(2)`): (block size, blocks, free
/// blocks, blocks available to unprivileged users, inodes, free inodes), blocks in units
/// of the fragment size.
pub fn fs_space(path: &std::path::Path) -> io::Result<(u64, u64, u64, u64, u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: an all-zero statvfs is valid; statvfs fills it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((
        st.f_frsize as u64,
        st.f_blocks as u64,
        st.f_bfree as u64,
        st.f_bavail as u64,
        st.f_files as u64,
        st.f_ffree as u64,
    ))
}

/// `lseek(2)` with SEEK_DATA (`data`) or SEEK_HOLE: the first data (hole) at or after
/// `offset`; `None` when there is none (ENXIO: no data after `offset`, or `offset` at or
/// past the end). Only the offset of the open file description moves, and fleecefs does
/// positional I/O only.
pub fn seek_data_or_hole(file: &File, offset: u64, data: bool) -> io::Result<Option<u64>> {
    let whence = if data {
        libc::SEEK_DATA
    } else {
        libc::SEEK_HOLE
    };
    // SAFETY: plain syscall on a valid fd.
    let r = unsafe { libc::lseek(file.as_raw_fd(), to_off(offset)?, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(e),
    }
}

/// `flock(2)` without waiting: an exclusive or shared lock on the whole file, held until
/// the file is closed. Fails (EWOULDBLOCK) when another open file holds a conflicting one.
pub fn try_flock(file: &File, exclusive: bool) -> io::Result<()> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: flock on a valid fd.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Advises the kernel to drop the clean cached pages of a range of `file` (so that a
/// later read comes from the disk). Only advice: failures are ignored.
pub fn drop_cached_pages(file: &File, offset: u64, len: u64) {
    let (Ok(o), Ok(l)) = (to_off(offset), to_off(len)) else {
        return;
    };
    // SAFETY: plain syscall on a valid fd.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), o, l, libc::POSIX_FADV_DONTNEED);
    }
}

/// A zero-filled memory file (`memfd_create`, close-on-exec) of `len` bytes whose size
/// can no longer change (sealed against shrinking and growing): whoever it is handed to
/// can map it without a later `ftruncate` turning accesses into SIGBUS.
pub fn sealed_memfd(name: &std::ffi::CStr, len: u64) -> io::Result<File> {
    // SAFETY: memfd_create with a valid C string.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is new and owned here.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(len)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on an fd owned by `f`, with an integer argument.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// Whether `file` is a memory file sealed against shrinking (so a mapping of it within
/// its current size stays valid whatever its other holders do).
pub fn cannot_shrink(file: &File) -> bool {
    // SAFETY: fcntl on a valid fd; F_GET_SEALS takes no argument.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

/// Maps `len` bytes of `file` from `offset` shared and writable.
///
/// The caller must make sure that no other process changes the file's size or maps it
/// in a way that breaks its accesses (fleecefs maps only files in its own state
/// directory, 0600, under the state lock, and accesses them only through atomics).
pub fn map_shared(file: &File, offset: u64, len: usize) -> io::Result<memmap2::MmapMut> {
    // SAFETY: see above: the file is private to this daemon while it holds the state
    // lock, so the mapping does not change under it except through this process.
    unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_mut(file)
    }
}

/// Sets a socket's send buffer to `bytes` (the kernel doubles it for its bookkeeping):
/// `SO_SNDBUFFORCE` as root, which may pass `net.core.wmem_max`, else `SO_SNDBUF`,
/// which the kernel caps there.
pub fn set_send_buffer(socket: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let set = |option: libc::c_int| {
        // SAFETY: setsockopt reads one c_int from `value`, a valid local.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(libc::SO_SNDBUFFORCE).or_else(|_| set(libc::SO_SNDBUF))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_buffer_grows() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let want = 4usize << 20;
        set_send_buffer(&a, want).unwrap();
        let mut got: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `got`, a valid local.
        let r = unsafe {
            libc::getsockopt(
                a.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                &mut got as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(r, 0);
        // The kernel doubles the value; without privilege it caps it at wmem_max.
        let cap = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(want);
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let floor = if root { want } else { want.min(cap) };
        assert!(got as usize >= 2 * floor, "SO_SNDBUF {got}, wanted {want}");
    }
}

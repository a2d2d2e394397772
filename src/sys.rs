//! Every libc call of fleecefs, as thin safe wrappers over what std does not offer:
//! fallocate, the size of a block device, allocated blocks, locks, mounts, signals,
//! process credentials, the shared mapping of bitmap files. File I/O here is positional.
//! Each `unsafe` block says why it is sound (`clippy::undocumented_unsafe_blocks` is on).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;

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

/// Sends SIGKILL to the process group `pgid` (a child started in its own group).
pub fn kill_group(pgid: u32) {
    let Ok(p) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if p <= 1 {
        return;
    }
    // SAFETY: plain syscall; a negative pid names the process group. Failure (the group
    // is gone) is harmless.
    unsafe {
        libc::kill(-p, libc::SIGKILL);
    }
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

/// Opens `/dev/fuse` (close-on-exec).
pub fn open_dev_fuse() -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
}

/// Mounts a FUSE filesystem served on `fuse` (an open `/dev/fuse`) at `mountpoint`, as
/// fuser does: type `fuse`, nosuid, nodev, owner root's uid and gid of this process.
pub fn mount_fuse(
    fuse: &File,
    source: &str,
    mountpoint: &std::path::Path,
    extra_options: &str,
) -> io::Result<()> {
    let mode = std::fs::metadata(mountpoint)?.mode();
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut options = format!(
        "fd={},rootmode={mode:o},user_id={uid},group_id={gid}",
        fuse.as_raw_fd()
    );
    if !extra_options.is_empty() {
        options.push(',');
        options.push_str(extra_options);
    }
    let cstr = |s: &[u8]| {
        std::ffi::CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    };
    let (src, mp, ty, opts) = (
        cstr(source.as_bytes())?,
        cstr(mountpoint.as_os_str().as_encoded_bytes())?,
        cstr(b"fuse")?,
        cstr(options.as_bytes())?,
    );
    // SAFETY: mount(2) with valid C strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            mp.as_ptr(),
            ty.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            opts.as_ptr() as *const libc::c_void,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A new `/dev/fuse` fd attached to the connection of `session` (`FUSE_DEV_IOC_CLONE`):
/// it reads requests of that connection with a processing queue of its own.
pub fn fuse_clone(session: &File) -> io::Result<File> {
    let clone = open_dev_fuse()?;
    // FUSE_DEV_IOC_CLONE = _IOR(229, 0, uint32_t)
    const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500;
    let mut fd = session.as_raw_fd() as u32;
    // SAFETY: the ioctl reads one u32 (the source fd) from `fd`.
    let r = unsafe { libc::ioctl(clone.as_raw_fd(), FUSE_DEV_IOC_CLONE as _, &mut fd) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(clone)
}

/// Sends `FUSE_NOTIFY_RESEND` on `fuse`: the kernel puts every request that was read
/// from this connection's fds but not answered back into its queue, to be read again.
/// ENOSYS/EINVAL: the kernel does not know it (before Linux 6.9).
pub fn fuse_notify_resend(fuse: &File) -> io::Result<()> {
    // struct fuse_out_header { u32 len; i32 error; u64 unique }: a notification has
    // unique 0 and its code in `error`; FUSE_NOTIFY_RESEND = 7, no payload.
    const FUSE_NOTIFY_RESEND: i32 = 7;
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: write(2) of a 16-byte local buffer.
    let r = unsafe {
        libc::write(
            fuse.as_raw_fd(),
            header.as_ptr() as *const libc::c_void,
            header.len(),
        )
    };
    if r == 16 {
        Ok(())
    } else if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Err(io::Error::from_raw_os_error(libc::EIO))
    }
}

/// A pipe, both ends close-on-exec: (read, write).
pub fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two fds into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are new and owned by nobody else.
    Ok(unsafe {
        (
            <File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]),
            <File as std::os::fd::FromRawFd>::from_raw_fd(fds[1]),
        )
    })
}

/// In a child between fork and exec: keeps `fds` open across the exec, and asks for
/// SIGKILL when the parent dies. Only async-signal-safe calls.
pub fn child_keep_fds_and_die_with_parent(fds: &[i32], parent: i32) -> io::Result<()> {
    for &fd in fds {
        // SAFETY: fcntl on an fd inherited from the parent.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: prctl with plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The parent may have died before the prctl.
    // SAFETY: getppid cannot fail.
    if unsafe { libc::getppid() } != parent {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// Raises the soft limit of open files (RLIMIT_NOFILE) to the hard limit: a daemon
/// needs a few fds per device and more per device of a backup access, and the usual
/// soft limit (1024) is too low for a few hundred devices. Returns (old, new) soft
/// limits.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    // SAFETY: an all-zero rlimit is valid; getrlimit fills it.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit with a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let old = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit with a valid pointer; raising the soft limit up to the hard
        // one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((old as u64, lim.rlim_cur as u64))
}

/// Sets this process's `oom_score_adj` (-1000 to 1000; lowering it needs
/// CAP_SYS_RESOURCE). Only async-signal-safe calls, so a child may call it between fork
/// and exec: `text` is the value in decimal, prepared before the fork.
pub fn set_oom_score_adj(text: &[u8]) -> io::Result<()> {
    // SAFETY: open of a NUL-terminated path; the fd is closed below.
    let fd = unsafe {
        libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: write from a valid buffer to the fd opened above.
    let n = unsafe { libc::write(fd, text.as_ptr().cast(), text.len()) };
    let err = io::Error::last_os_error();
    // SAFETY: closes the fd opened above.
    unsafe { libc::close(fd) };
    if n == text.len() as isize {
        Ok(())
    } else {
        Err(err)
    }
}

/// Sends `signal` to process `pid`.
pub fn kill(pid: u32, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2) with plain integers.
    if unsafe { libc::kill(pid as libc::pid_t, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes ownership of an fd inherited from the parent process.
///
/// # Safety
/// `fd` must be open and owned by nothing else in this process.
pub unsafe fn inherited_file(fd: i32) -> io::Result<File> {
    // SAFETY: fcntl F_GETFD only checks that the fd is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the caller guarantees ownership; set close-on-exec again.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        Ok(<File as std::os::fd::FromRawFd>::from_raw_fd(fd))
    }
}

/// Sends `message` with `fds` (SCM_RIGHTS) to the datagram socket `path` (a leading `@`
/// is the abstract namespace): systemd's `sd_pid_notify_with_fds`.
pub fn notify_with_fds(path: &std::ffi::OsStr, message: &str, fds: &[i32]) -> io::Result<()> {
    let bytes = path.as_encoded_bytes();
    // SAFETY: an all-zero sockaddr_un is valid; the path is copied in below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    for (i, b) in bytes.iter().enumerate() {
        addr.sun_path[i] = if i == 0 && *b == b'@' {
            0
        } else {
            *b as libc::c_char
        };
    }
    let addr_len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len()) as libc::socklen_t;
    // SAFETY: socket(2) with constant arguments.
    let sock = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `sock` is a new fd owned here.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sock) };
    let mut iov = libc::iovec {
        iov_base: message.as_ptr() as *mut libc::c_void,
        iov_len: message.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = vec![0u8; space.max(1)];
    // SAFETY: an all-zero msghdr is valid; its pointers are set below to live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = &mut addr as *mut libc::sockaddr_un as *mut libc::c_void;
    msg.msg_namelen = addr_len;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer has room for one header with `fds` (CMSG_SPACE).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(cmsg),
                fd_bytes as usize,
            );
        }
    }
    // SAFETY: sendmsg with a msghdr whose buffers outlive the call.
    let r = unsafe {
        libc::sendmsg(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            &msg,
            libc::MSG_NOSIGNAL,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A memory file (`memfd_create`, close-on-exec) holding `bytes`, positioned at 0.
pub fn memfd_with(name: &std::ffi::CStr, bytes: &[u8]) -> io::Result<File> {
    // SAFETY: memfd_create with a valid C string.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is new and owned here.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.write_all_at(bytes, 0)?;
    Ok(f)
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

/// The real user and group ids of this process.
pub fn process_owner() -> (u32, u32) {
    // SAFETY: getuid and getgid take no arguments and cannot fail.
    unsafe { (libc::getuid(), libc::getgid()) }
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes the process `cmd` starts leave our session (and terminal) before it runs.
pub fn new_session_on_exec(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only calls setsid,
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
}

/// A set of signals blocked in the calling thread (and every thread it starts later),
/// to be received with [`wait_signal`].
pub struct BlockedSignals(libc::sigset_t);

/// Blocks `signals` in the calling thread; threads started later inherit the mask.
pub fn block_signals(signals: &[libc::c_int]) -> BlockedSignals {
    // SAFETY: an all-zero sigset_t is a valid value to pass to sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigemptyset, sigaddset and pthread_sigmask only read and write `set`, a
    // valid local; the old mask is not asked for (null).
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    BlockedSignals(set)
}

/// Waits for one of the blocked `signals` and returns it.
pub fn wait_signal(signals: &BlockedSignals) -> Option<libc::c_int> {
    let mut sig: libc::c_int = 0;
    // SAFETY: sigwait reads a valid set and writes one int.
    (unsafe { libc::sigwait(&signals.0, &mut sig) } == 0).then_some(sig)
}

/// Points stdin, stdout and stderr at /dev/null (a daemon that left its terminal).
pub fn redirect_stdio_to_null() {
    // SAFETY: open with a valid C string; dup2 and close on descriptors of this process.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            if null > 2 {
                libc::close(null);
            }
        }
    }
}

/// `umount2(2)` of `path`; `detach` is MNT_DETACH (lazy unmount).
pub fn umount(path: &std::ffi::CStr, detach: bool) -> io::Result<()> {
    let flags = if detach { libc::MNT_DETACH } else { 0 };
    // SAFETY: umount2 with a valid NUL-terminated string.
    if unsafe { libc::umount2(path.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the process's file mode creation mask; returns the old one. The mask is
/// process-wide: call it only while no other thread creates files.
pub fn set_umask(mask: libc::mode_t) -> libc::mode_t {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask) }
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

/// The user id of the process at the other end of a Unix socket (SO_PEERCRED).
pub fn peer_uid(stream: &std::os::unix::net::UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a valid local.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
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

/// Whether stderr is a terminal.
pub fn stderr_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(2) == 1 }
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

/// The minor number of device number `dev` (for a FUSE mount: its connection id).
pub fn dev_minor(dev: u64) -> u32 {
    libc::minor(dev)
}

/// `ioprio_set(2)` class of best-effort I/O (`IOPRIO_CLASS_BE`).
const IOPRIO_CLASS_BE: i32 = 2;
/// `IOPRIO_WHO_PROCESS`: a single thread, by tid (0: the calling thread).
const IOPRIO_WHO_PROCESS: i32 = 1;
/// Lowest best-effort I/O priority level.
pub const IOPRIO_BE_LOWEST: i32 = 7;

/// CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which outlives the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Lowers the calling thread to `SCHED_IDLE`: it runs only on CPU time that no normal
/// thread wants (and a small share when every CPU is busy, so it never starves outright).
/// Affects this thread only: Linux schedules threads, and pid 0 is the caller.
pub fn set_thread_sched_idle() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall with a valid sched_param for the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the calling thread's I/O priority to best-effort `level` (0 highest, 7 lowest).
pub fn set_thread_ioprio_best_effort(level: i32) -> io::Result<()> {
    let value = (IOPRIO_CLASS_BE << 13) | (level & 7);
    // SAFETY: ioprio_set takes three integers; who = 0 is the calling thread.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, value) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Unmounts `mountpoint`; if it is busy, detaches it and aborts the FUSE connection so
/// the session ends anyway.
pub fn force_unmount(mountpoint: &std::path::Path, connection: Option<u32>) {
    let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) else {
        return;
    };
    let Err(e) = umount(&c, false) else {
        return;
    };
    log::warn!(
        "unmounting {}: {e}; detaching it and aborting its FUSE connection",
        mountpoint.display()
    );
    let _ = umount(&c, true);
    if let Some(id) = connection {
        abort_connection(id);
    }
}

/// Detaches the mount and aborts its FUSE connection (when known): what a keeper that
/// gives up leaves is a mount point that can be mounted again.
pub fn detach_and_abort(mountpoint: &std::path::Path, connection: Option<u32>) {
    if let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) {
        let _ = umount(&c, true);
    }
    if let Some(id) = connection {
        abort_connection(id);
    }
}

/// Aborts FUSE connection `id` through fusectl (mounted first if needed).
fn abort_connection(id: u32) {
    let dir = std::path::Path::new("/sys/fs/fuse/connections");
    if !dir.join(id.to_string()).exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"])
            .stderr(std::process::Stdio::null())
            .status();
    }
    if let Err(e) = std::fs::write(dir.join(id.to_string()).join("abort"), b"1") {
        log::error!("cannot abort FUSE connection {id}: {e}");
    }
}

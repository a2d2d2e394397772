//! FUSE mounts: opening `/dev/fuse`, mounting, cloning a connection's fd, asking the
//! kernel to resend unanswered requests, unmounting and aborting a connection.
//! Each `unsafe` block says why it is sound.

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;

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

/// The minor number of device number `dev` (for a FUSE mount: its connection id).
pub fn dev_minor(dev: u64) -> u32 {
    libc::minor(dev)
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

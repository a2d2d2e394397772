//! Passing fds between processes: a `SOCK_SEQPACKET` socket pair whose messages carry
//! fds (`SCM_RIGHTS`); and waiting for a socket to become readable.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A connected pair of `SOCK_SEQPACKET` Unix sockets (message boundaries kept; a read
/// returns 0 once the other end is closed), both close-on-exec.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair writes two fds into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends one message on `sock`, with `fd` attached when given.
pub fn send_with_fd(
    sock: BorrowedFd<'_>,
    message: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let one;
    let fds: &[libc::c_int] = match fd {
        Some(fd) => {
            one = [fd.as_raw_fd()];
            &one
        }
        None => &[],
    };
    send_msg(sock, None, message, fds)
}

/// Sends `message` on `sock` with `fds` attached (`SCM_RIGHTS`, none when empty), to
/// the address `to` (of that many bytes) when given: a datagram socket that is not
/// connected.
pub(super) fn send_msg(
    sock: BorrowedFd<'_>,
    to: Option<(&libc::sockaddr_un, libc::socklen_t)>,
    message: &[u8],
    fds: &[libc::c_int],
) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: message.as_ptr() as *mut libc::c_void,
        iov_len: message.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    // u64 elements: the control buffer must be aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid; its pointers are set below to live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    if let Some((addr, len)) = to {
        msg.msg_name = addr as *const libc::sockaddr_un as *mut libc::c_void;
        msg.msg_namelen = len;
    }
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is aligned for cmsghdr and has room for one header
        // with `fds` (CMSG_SPACE).
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
    loop {
        // SAFETY: sendmsg with a msghdr whose buffers outlive the call.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one message on `sock` into `buf`: its length (0: the other end is closed)
/// and the fds attached (close-on-exec). A message longer than `buf`, or with more
/// control data than room for a few fds, is an error (`EMSGSIZE`); the fds that did
/// arrive are closed.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    const MAX_FDS: u32 = 8;
    let fd_bytes = MAX_FDS * std::mem::size_of::<libc::c_int>() as u32;
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    // u64 elements: the control buffer must be aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; its pointers are set below to live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = (control.len() * 8) as _;
    let n = loop {
        // SAFETY: recvmsg with a msghdr whose buffers outlive the call.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: walks the control messages recvmsg wrote into `control`, within
    // msg_controllen; each SCM_RIGHTS payload is a whole number of ints, each a new fd
    // of this process that nothing else owns.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / std::mem::size_of::<libc::c_int>() {
                    let raw = std::ptr::read_unaligned((data as *const libc::c_int).add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    Ok((n, fds))
}

/// Sets how long a receive on `sock` waits (`SO_RCVTIMEO`) before it fails with
/// `EAGAIN`.
pub fn set_recv_timeout(sock: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt reads one timeval from a valid local.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits at most `timeout` until `fd` is readable (for a listening socket: a connection
/// waits to be accepted). Whether it is.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: poll on one valid pollfd, a local that outlives the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    match r {
        0 => Ok(false),
        n if n > 0 => Ok(true),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    fn received(sock: &UnixDatagram) -> (String, String) {
        let mut buf = [0u8; 128];
        let (n, mut fds) = recv_with_fds(sock.as_fd(), &mut buf).unwrap();
        assert_eq!(fds.len(), 1);
        let mut text = String::new();
        std::fs::File::from(fds.remove(0))
            .read_to_string(&mut text)
            .unwrap();
        (String::from_utf8_lossy(&buf[..n]).into_owned(), text)
    }

    /// A message with an fd to a datagram socket by path and in the abstract namespace
    /// (`@NAME`: the address is exactly as long as the name), as systemd's notify socket.
    #[test]
    fn fds_go_to_a_datagram_socket_by_path_and_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let f = crate::sys::memfd_with(c"t", b"by path").unwrap();
        crate::sys::notify_with_fds(path.as_os_str(), "FDSTORE=1\n", &[f.as_raw_fd()]).unwrap();
        assert_eq!(received(&sock), ("FDSTORE=1\n".into(), "by path".into()));
        let name = format!("fleecefs-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        let f = crate::sys::memfd_with(c"t", b"abstract").unwrap();
        let at = std::ffi::OsString::from(format!("@{name}"));
        crate::sys::notify_with_fds(&at, "x", &[f.as_raw_fd()]).unwrap();
        assert_eq!(received(&sock), ("x".into(), "abstract".into()));
    }
}

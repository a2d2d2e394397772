//! Processes and threads: pipes and fds across exec, signals, credentials, the open-file
//! limit, `oom_score_adj`, systemd notifications, memory files, and the CPU and I/O
//! priority of a thread. Each `unsafe` block says why it is sound.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

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
    super::fdpass::send_msg(
        std::os::fd::AsFd::as_fd(&sock),
        Some((&addr, addr_len)),
        message.as_bytes(),
        fds,
    )
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

/// Sets the process's file mode creation mask; returns the old one. The mask is
/// process-wide: call it only while no other thread creates files.
pub fn set_umask(mask: libc::mode_t) -> libc::mode_t {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask) }
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

/// Whether stderr is a terminal.
pub fn stderr_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(2) == 1 }
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

//! The FUSE floor: the fastest a FUSE server can answer on this machine, measured by
//! `scripts/bench.sh` next to fleecefs (docs/performance.md).
//!
//! It serves one file, `MOUNTPOINT/img`, as a plain pass-through to IMAGE: each read or
//! write is one `pread`/`pwrite`, with no copy-before-write, bitmaps, locks or checks. Opens
//! get the same flags as fleecefs's live files (direct I/O, parallel direct writes), and
//! it uses the same fuser configuration (multi-threaded, cloned `/dev/fuse` fds, 1 MiB
//! requests). Whatever fleecefs does on top costs the difference to this floor.
//!
//! `--uring` serves requests through FUSE-over-io_uring (Linux 6.14+, with the `fuse`
//! module parameter `enable_uring` set) instead of `/dev/fuse` reads: one ring per thread,
//! threads pinned to the CPU whose queue they serve, one ring entry each. Forgets and
//! interrupts still come through `/dev/fuse` (the kernel's design).
//!
//! `--writeback` turns on the FUSE writeback cache instead (page-cached opens, writes
//! acknowledged from the kernel's page cache and flushed to this server later). fleecefs
//! cannot use it (docs/architecture.md, "No writeback cache"); the floor measures what it
//! would buy on this machine.
//!
//! Usage (root): `fuse_floor MOUNTPOINT IMAGE [--uring | --writeback] [--threads N]`; runs until
//! MOUNTPOINT is unmounted. Benchmark tool only: no permission checks beyond the kernel's,
//! no error recovery.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, Session, WriteFlags,
};
use io_uring::{opcode, squeue, types, IoUring};

const MAX_IO: usize = 1 << 20;
const ROOT: u64 = 1;
const IMG: u64 = 2;
const TTL: Duration = Duration::from_secs(1);

/// Requests answered through io_uring (printed at exit, so a run can show it used it).
static URING_REQUESTS: AtomicU64 = AtomicU64::new(0);

fn die(msg: &str) -> ! {
    eprintln!("fuse_floor: {msg}");
    std::process::exit(1)
}

fn attr(ino: u64, size: u64) -> FileAttr {
    let dir = ino == ROOT;
    FileAttr {
        ino: INodeNo(ino),
        size: if dir { 0 } else { size },
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if dir { 0o755 } else { 0o644 },
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

struct Floor {
    image: Arc<File>,
    size: u64,
    uring: bool,
    writeback: bool,
}

impl Filesystem for Floor {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_IO as u32);
        if let Err(max) = config.set_max_readahead(MAX_IO as u32) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        if self.writeback {
            config
                .add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE)
                .map_err(|_| io::Error::other("the kernel does not offer the writeback cache"))?;
        }
        if self.uring {
            config
                .add_capabilities(fuser::InitFlags::FUSE_OVER_IO_URING)
                .map_err(|_| {
                    io::Error::other(
                        "the kernel does not offer FUSE-over-io_uring \
                         (/sys/module/fuse/parameters/enable_uring is off, or Linux < 6.14)",
                    )
                })?;
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == ROOT && name == "img" {
            reply.entry(&TTL, &attr(IMG, self.size), Generation(0))
        } else {
            reply.error(Errno::ENOENT)
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&TTL, &attr(ino.0, self.size))
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let flags = if self.writeback {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        };
        reply.opened(FileHandle(0), flags)
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        thread_local!(static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; MAX_IO]));
        BUF.with_borrow_mut(|buf| {
            let len = (size as usize).min(buf.len());
            match self.image.read_at(&mut buf[..len], offset) {
                Ok(n) => reply.data(&buf[..n]),
                Err(_) => reply.error(Errno::EIO),
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.image.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }
}

// ------------------------------------------------------------------ FUSE-over-io_uring
//
// The kernel ABI (include/uapi/linux/fuse.h, protocol 7.42+): each ring entry registers
// two buffers, a header block and a payload of at least max_write bytes.
//   header block: in_out[128]  (fuse_in_header on requests, fuse_out_header on replies)
//                 op_in[128]   (the opcode's own header, e.g. fuse_write_in)
//                 ring_ent_in_out { flags u64, commit_id u64, payload_sz u32, pad u32, reserved u64 }
//   payload:      the remaining request arguments (names, write data); on replies, every
//                 reply argument (e.g. fuse_write_out), payload_sz bytes.
// Commands (IORING_OP_URING_CMD on the /dev/fuse fd, 128-byte SQEs; the command area holds
// fuse_uring_cmd_req { flags u64, commit_id u64, qid u16, pad[6] }):
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
const OP_IN: usize = 128;
const ENT_IN_OUT: usize = 256;
const HEADER_LEN: usize = 256 + 32;
// Opcodes served; everything else gets ENOSYS.
const FUSE_LOOKUP: u32 = 1;
const FUSE_GETATTR: u32 = 3;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_RELEASE: u32 = 18;
const FUSE_FSYNC: u32 = 20;
const FUSE_FLUSH: u32 = 25;
const FOPEN_DIRECT_IO: u32 = 1 << 0;
const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().unwrap())
}
fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v)
}

/// `struct fuse_attr` (88 bytes) at `at`.
fn put_attr(b: &mut [u8], at: usize, ino: u64, size: u64) {
    b[at..at + 88].fill(0);
    let dir = ino == ROOT;
    let mode = if dir {
        libc::S_IFDIR | 0o755
    } else {
        libc::S_IFREG | 0o644
    };
    put(b, at, &ino.to_ne_bytes());
    put(b, at + 8, &(if dir { 0 } else { size }).to_ne_bytes());
    put(b, at + 60, &mode.to_ne_bytes());
    put(b, at + 64, &1u32.to_ne_bytes()); // nlink
    put(b, at + 80, &4096u32.to_ne_bytes()); // blksize
}

/// One ring entry: a 128-byte SQE for a FUSE uring command on `fd`.
fn uring_cmd(
    fd: RawFd,
    op: u32,
    qid: u16,
    commit_id: u64,
    iov: &[libc::iovec; 2],
) -> squeue::Entry128 {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let sqe = opcode::UringCmd80::new(types::Fd(fd), op)
        .cmd(cmd)
        .addr(Some(iov.as_ptr() as u64))
        .build();
    // The kernel wants sqe->len = 2 (iovec count), a field UringCmd80 does not expose:
    // patch it in the raw 128-byte SQE (offset 24, struct io_uring_sqe).
    // SAFETY: Entry128 is #[repr(C)] of the 64-byte io_uring_sqe and 64 more bytes.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
    // SAFETY: as above; every byte pattern of an SQE is a valid Entry128.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

/// Serves queue `qid` (requests issued on CPU `qid`) with one ring entry until the
/// connection ends.
fn uring_worker(fd: RawFd, qid: u16, image: Arc<File>, size: u64) {
    // SAFETY: plain sched_setaffinity on this thread with a zeroed, then filled, set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(qid as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    let mut ring: IoUring<squeue::Entry128> = match IoUring::builder().build(2) {
        Ok(r) => r,
        Err(e) => die(&format!("io_uring_setup: {e}")),
    };
    let mut header = vec![0u8; HEADER_LEN];
    let mut payload = vec![0u8; MAX_IO + 4096];
    let iov = [
        libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: header.len(),
        },
        libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        },
    ];
    let mut next = uring_cmd(fd, CMD_REGISTER, qid, 0, &iov);
    loop {
        // SAFETY: the SQE points at `iov`, `header` and `payload`, which outlive the ring.
        unsafe { ring.submission().push(&next) }.expect("the ring has room for one entry");
        let mut submitted = false;
        let cqe = loop {
            let r = if submitted {
                ring.submitter().submit_and_wait(1)
            } else {
                ring.submit_and_wait(1)
            };
            match r {
                Ok(_) => submitted = true,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => die(&format!("io_uring_enter: {e}")),
            }
            if let Some(c) = ring.completion().next() {
                break c;
            }
        };
        if cqe.result() < 0 {
            // ENOTCONN/ECANCELED: unmounted. Anything else: the ring could not start, and
            // a floor measured without it would be mislabelled.
            let e = -cqe.result();
            if e != libc::ENOTCONN && e != libc::ECANCELED {
                die(&format!("queue {qid}: {}", io::Error::from_raw_os_error(e)));
            }
            return;
        }
        URING_REQUESTS.fetch_add(1, Ordering::Relaxed);
        let opcode = get_u32(&header, 4);
        let unique = get_u64(&header, 8);
        let nodeid = get_u64(&header, 16);
        let (error, out_len): (i32, usize) = match opcode {
            FUSE_LOOKUP => {
                let name = payload.split(|&c| c == 0).next().unwrap_or(&[]);
                if nodeid == ROOT && name == b"img" {
                    // fuse_entry_out: nodeid, generation, entry_valid, attr_valid,
                    // the two nsec fields, fuse_attr
                    payload[..40].fill(0);
                    put(&mut payload, 0, &IMG.to_ne_bytes());
                    put(&mut payload, 16, &1u64.to_ne_bytes());
                    put(&mut payload, 24, &1u64.to_ne_bytes());
                    put_attr(&mut payload, 40, IMG, size);
                    (0, 128)
                } else {
                    (-libc::ENOENT, 0)
                }
            }
            FUSE_GETATTR => {
                // fuse_attr_out: attr_valid, attr_valid_nsec, dummy, fuse_attr
                payload[..16].fill(0);
                put(&mut payload, 0, &1u64.to_ne_bytes());
                put_attr(&mut payload, 16, nodeid, size);
                (0, 104)
            }
            FUSE_OPEN => {
                // fuse_open_out: fh, open_flags, backing_id
                payload[..16].fill(0);
                let flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
                put(&mut payload, 8, &flags.to_ne_bytes());
                (0, 16)
            }
            FUSE_READ => {
                // fuse_read_in: fh, offset, size, ...
                let offset = get_u64(&header, OP_IN + 8);
                let len = (get_u32(&header, OP_IN + 16) as usize).min(payload.len());
                match image.read_at(&mut payload[..len], offset) {
                    Ok(n) => (0, n),
                    Err(_) => (-libc::EIO, 0),
                }
            }
            FUSE_WRITE => {
                // fuse_write_in: fh, offset, size, ...; the data is the payload
                let offset = get_u64(&header, OP_IN + 8);
                let len = (get_u32(&header, OP_IN + 16) as usize).min(payload.len());
                match image.write_all_at(&payload[..len], offset) {
                    Ok(()) => {
                        // fuse_write_out: size, padding
                        put(&mut payload, 0, &(len as u32).to_ne_bytes());
                        put(&mut payload, 4, &0u32.to_ne_bytes());
                        (0, 8)
                    }
                    Err(_) => (-libc::EIO, 0),
                }
            }
            FUSE_RELEASE | FUSE_FLUSH | FUSE_FSYNC => (0, 0),
            _ => (-libc::ENOSYS, 0),
        };
        // fuse_out_header: len, error, unique
        put(&mut header, 0, &((16 + out_len) as u32).to_ne_bytes());
        put(&mut header, 4, &error.to_ne_bytes());
        put(&mut header, 8, &unique.to_ne_bytes());
        put(
            &mut header,
            ENT_IN_OUT + 16,
            &(out_len as u32).to_ne_bytes(),
        );
        next = uring_cmd(fd, CMD_COMMIT_AND_FETCH, qid, unique, &iov);
    }
}

/// The number of FUSE queues the kernel expects: one per possible CPU.
fn possible_cpus() -> usize {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .unwrap_or_else(|e| die(&format!("/sys/devices/system/cpu/possible: {e}")));
    s.trim()
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap_or(0) + 1 - a.parse::<usize>().unwrap_or(0),
            None => 1,
        })
        .sum()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut positional = Vec::new();
    let mut uring = false;
    let mut writeback = false;
    let mut threads = 8usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--uring" => uring = true,
            "--writeback" => writeback = true,
            "--threads" => {
                threads = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| (1..=64).contains(&n))
                    .unwrap_or_else(|| die("--threads needs a number from 1 to 64"))
            }
            _ => positional.push(a.clone()),
        }
    }
    let [mountpoint, image] = positional.as_slice() else {
        die("usage: fuse_floor MOUNTPOINT IMAGE [--uring | --writeback] [--threads N]")
    };
    if uring && writeback {
        die("--uring and --writeback are separate floors; give one of them");
    }
    let file = File::options()
        .read(true)
        .write(true)
        .open(image)
        .unwrap_or_else(|e| die(&format!("{image}: {e}")));
    let size = file
        .metadata()
        .unwrap_or_else(|e| die(&format!("{image}: {e}")))
        .len();
    let image = Arc::new(file);
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("fuse_floor".into())];
    // With io_uring, /dev/fuse carries only forgets and interrupts: one reader is plenty.
    config.n_threads = Some(if uring { 1 } else { threads });
    config.clone_fd = true;
    let fs = Floor {
        image: image.clone(),
        size,
        uring,
        writeback,
    };
    let session = Session::new(fs, mountpoint, &config)
        .unwrap_or_else(|e| die(&format!("mounting {mountpoint}: {e}")));
    if uring {
        // SAFETY: F_DUPFD_CLOEXEC on the session's open /dev/fuse fd; the duplicate is
        // owned here and shared (as a raw fd) by the workers for the process's lifetime.
        let dup = unsafe { libc::fcntl(session.as_fd().as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            die(&format!("dup /dev/fuse: {}", io::Error::last_os_error()));
        }
        // SAFETY: `dup` is a fresh fd owned by nobody else.
        let dev = Box::leak(Box::new(unsafe { OwnedFd::from_raw_fd(dup) }));
        let per_queue = threads.div_ceil(possible_cpus()).max(1);
        for qid in 0..possible_cpus() {
            for _ in 0..per_queue {
                let (fd, image) = (dev.as_raw_fd(), image.clone());
                std::thread::Builder::new()
                    .name(format!("floor-q{qid}"))
                    .spawn(move || uring_worker(fd, qid as u16, image, size))
                    .unwrap_or_else(|e| die(&format!("spawning a queue thread: {e}")));
            }
        }
    }
    if let Err(e) = session.run() {
        die(&format!("serving {mountpoint}: {e}"));
    }
    if uring {
        eprintln!(
            "fuse_floor: {} requests answered through io_uring",
            URING_REQUESTS.load(Ordering::Relaxed)
        );
    }
}

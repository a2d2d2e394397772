//! A file mapped for the kernel's eyes only: snapshot data sent to a socket straight from
//! the source's page cache (one copy instead of two, `cbw/stream.rs`).
//!
//! fleecefs never reads the mapped memory itself: another process may write the file at
//! any time (and the engine's own live writes do), and a page whose read fails would
//! kill the worker (SIGBUS) if user code touched it. Only the kernel reads it, inside
//! `sendmsg`, where a failed page is a short send or `EFAULT`, never a signal. So the
//! mapping hands out [`Region`]s (address and length), never slices.
//!
//! Every page the kernel copies from stays mapped in the process (counted in its memory)
//! and keeps its page tables (2 MiB per GiB) until the mapping goes: a mapping counts the
//! bytes it has handed out ([`FileMap::handed`]), so that its owner can replace it by a
//! fresh one before that grows with everything a backup ever read.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// A read-only shared mapping of the first `len` bytes of a file.
pub struct FileMap {
    addr: usize,
    len: usize,
    /// Bytes handed out in regions so far.
    handed: AtomicU64,
}

// SAFETY: the mapping is plain memory that this process only hands to the kernel; an
// address and a length are freely shared between threads.
unsafe impl Send for FileMap {}
// SAFETY: as above: no method reads or writes the memory from user space.
unsafe impl Sync for FileMap {}

/// A range of a [`FileMap`]: valid while the map lives.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    addr: usize,
    len: usize,
}

impl Region {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl FileMap {
    /// Maps `len` bytes of `file` (from its start) read-only and shared.
    pub fn new(file: &File, len: u64) -> io::Result<FileMap> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a new mapping at an address the kernel chooses; nothing else is
        // touched. The memory is only ever read by the kernel (see the module docs).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(FileMap {
            addr: p as usize,
            len,
            handed: AtomicU64::new(0),
        })
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: [`FileMap::new`] refuses length 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes `offset..offset + len` of the file, if the map covers them.
    pub fn region(&self, offset: u64, len: usize) -> Option<Region> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        if end > self.len {
            return None;
        }
        self.handed.fetch_add(len as u64, Ordering::Relaxed);
        Some(Region {
            addr: self.addr + start,
            len,
        })
    }

    /// Bytes handed out in regions so far: about what the kernel has mapped of it.
    pub fn handed(&self) -> u64 {
        self.handed.load(Ordering::Relaxed)
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; no Region outlives the map
        // (they are used only during the calls that borrow it).
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

/// Whether pages of `file` mapped shared always show what was written through its fd:
/// true for block devices and for local filesystems whose buffered writes and reads share
/// the page cache (ext2/3/4, XFS, Btrfs, F2FS, tmpfs). Network and FUSE filesystems
/// may write around the page cache (direct I/O, no cache) and are left out.
pub fn mapping_is_coherent(file: &File) -> bool {
    const COHERENT: [i64; 5] = [
        0xEF53,      // ext2, ext3, ext4
        0x5846_5342, // XFS
        0x9123_683E, // Btrfs
        0xF2F5_2010, // F2FS
        0x0102_1994, // tmpfs
    ];
    use std::os::unix::fs::FileTypeExt;
    if file
        .metadata()
        .is_ok_and(|m| m.file_type().is_block_device())
    {
        return true;
    }
    // SAFETY: a zeroed statfs is a valid out-buffer for fstatfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs into `st`, a valid local, for a valid fd.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    COHERENT.contains(&(st.f_type as i64))
}

/// Sends `head` and then `region` on `socket` without blocking: as much as the socket
/// takes now. Returns the bytes sent (0 when the socket is full, or when the kernel
/// could not read the region's first page: the caller sends the rest another way).
pub fn send_nonblocking(socket: &impl AsRawFd, head: &[u8], region: Region) -> io::Result<usize> {
    let iov = [
        libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: region.addr as *mut libc::c_void,
            iov_len: region.len,
        },
    ];
    // SAFETY: a zeroed msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    loop {
        // SAFETY: `msg` points at two iovecs of valid memory: `head` (a live slice) and
        // `region` (inside a live mapping, read by the kernel only).
        let n = unsafe {
            libc::sendmsg(
                socket.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) | Some(libc::EFAULT) => return Ok(0),
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_region_goes_out_with_its_head_and_bounds_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let f = File::open(&path).unwrap();
        let map = FileMap::new(&f, 8192).unwrap();
        assert!(map.region(4096, 4097).is_none());
        assert!(map.region(u64::MAX, 1).is_none());
        let r = map.region(100, 1000).unwrap();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(send_nonblocking(&a, b"head", r).unwrap(), 1004);
        let mut got = vec![0u8; 1004];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], b"head");
        assert_eq!(&got[4..], &data[100..1100]);
    }

    #[test]
    fn local_files_map_coherently_and_proc_files_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("f")).unwrap();
        // The test directory is on one of the listed local filesystems here (ext4 or tmpfs).
        assert!(mapping_is_coherent(&f));
        let proc_file = File::open("/proc/self/status").unwrap();
        assert!(!mapping_is_coherent(&proc_file));
    }

    #[test]
    fn a_full_socket_takes_nothing_and_a_region_past_the_file_end_is_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let map = FileMap::new(&f, 1 << 20).unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        // Pages past the end of the file: the kernel cannot read them (no SIGBUS here).
        let past = map.region(64 << 10, 4096).unwrap();
        assert_eq!(send_nonblocking(&a, b"", past).unwrap(), 0);
        let r = map.region(0, 4096).unwrap();
        let mut sent = 0;
        loop {
            let n = send_nonblocking(&a, b"", r).unwrap();
            if n == 0 {
                break;
            }
            sent += n;
            assert!(sent < 64 << 20, "the socket never filled");
        }
        assert!(sent > 0);
    }
}

//! Helpers for the real-mount tests: a [`Fleece`] guard that owns a temp dir and a real
//! fleecefs mount (always unmounted on drop, even when a test panics), client commands,
//! JSON parsing, and raw syscalls that report errnos.
#![allow(dead_code)]

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// One KiB.
pub const KIB: u64 = 1 << 10;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// The default cluster size of fleecefs.
pub const CLUSTER: u64 = 64 * KIB;
/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_fleecefs");
/// How long a daemon may take to start, answer or exit.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// `fallocate` mode of a discard.
pub const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

// ---- running the binary ------------------------------------------------------------

/// What a finished command left.
#[derive(Debug)]
pub struct Output {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Panics with the command's stderr unless it exited 0; returns itself.
    pub fn expect_ok(self, what: &str) -> Output {
        assert_eq!(
            self.code, 0,
            "{what} failed (exit {}): {}",
            self.code, self.stderr
        );
        self
    }

    /// Asserts a failure with one clear line on stderr that contains `needle`.
    pub fn expect_failure(&self, what: &str, needle: &str) {
        assert_ne!(self.code, 0, "{what} should fail but succeeded: {self:?}");
        let message = self.stderr.trim();
        assert_eq!(
            message.lines().count(),
            1,
            "{what}: expected one line on stderr, got {message:?}"
        );
        assert!(
            message.contains(needle),
            "{what}: stderr {message:?} does not mention {needle:?}"
        );
    }
}

/// Runs `fleecefs ARGS...` and waits for it.
pub fn fleecefs<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    fleecefs_env(args, &[])
}

/// [`fleecefs`] with `env` set for it (fault injection).
pub fn fleecefs_env<I, S>(args: I, env: &[(&str, &str)]) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {BIN}: {e}"));
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Parses the stdout of a `--json` command.
pub fn parse_json(out: &Output, what: &str) -> Value {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{what} printed invalid JSON ({e}): {:?}", out.stdout))
}

/// `v[key]` as a u64, or a panic naming the key.
pub fn json_u64(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key:?} is not a number in {v}"))
}

// ---- the mount guard ---------------------------------------------------------------

/// A temp dir with an empty mount point `mp/`, images, a state dir `state/` and, once
/// mounted, a fleecefs daemon. Dropping it unmounts (`fleecefs unmount`, then
/// `umount -l`) and waits for the daemon to exit.
pub struct Fleece {
    /// The temp dir (removed on drop).
    pub dir: TempDir,
    /// Canonical root of the temp dir.
    pub root: PathBuf,
    /// The mount point.
    pub mp: PathBuf,
    /// The state directory.
    pub state: PathBuf,
    devices: Vec<(String, PathBuf)>,
    foreground: Option<Child>,
}

impl Fleece {
    /// A temp dir with an empty mount point; nothing mounted, no devices.
    pub fn new() -> Fleece {
        let dir = tempfile::Builder::new()
            .prefix("fleecefs-it.")
            .tempdir()
            .expect("creating a temp dir");
        let root = dir.path().canonicalize().expect("resolving the temp dir");
        let mp = root.join("mp");
        fs::create_dir(&mp).expect("creating the mount point");
        Fleece {
            state: root.join("state"),
            mp,
            root,
            dir,
            devices: Vec::new(),
            foreground: None,
        }
    }

    /// A temp dir with one zeroed sparse image per `(name, size)`, mounted.
    pub fn mounted(devices: &[(&str, u64)]) -> Fleece {
        let mut f = Fleece::new();
        for &(name, size) in devices {
            f.add_device(name, size);
        }
        f.mount(&[]).expect_ok("fleecefs mount");
        f
    }

    /// Creates a zeroed sparse image `NAME.img` and adds it as device NAME of the mount.
    pub fn add_device(&mut self, name: &str, size: u64) -> PathBuf {
        let path = self.image(&format!("{name}.img"), size);
        self.devices.push((name.to_string(), path.clone()));
        path
    }

    /// Creates a zeroed sparse file `file` of `size` bytes in the temp dir.
    pub fn image(&self, file: &str, size: u64) -> PathBuf {
        let path = self.root.join(file);
        File::create(&path)
            .and_then(|f| f.set_len(size))
            .unwrap_or_else(|e| panic!("creating image {}: {e}", path.display()));
        path
    }

    /// The arguments of `fleecefs mount` for this mount point, state dir and devices.
    pub fn mount_args(&self, extra: &[&str]) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["mount".into(), self.mp.clone().into()];
        args.push("--state-dir".into());
        args.push(self.state.clone().into());
        for (name, path) in &self.devices {
            let mut spec = OsString::from(format!("{name}="));
            spec.push(path);
            args.push("--device".into());
            args.push(spec);
        }
        args.extend(extra.iter().map(OsString::from));
        args
    }

    /// Runs `fleecefs mount` (background daemon) and returns what it printed.
    pub fn mount(&self, extra: &[&str]) -> Output {
        fleecefs(self.mount_args(extra))
    }

    /// `fleecefs mount` with `env` set for the daemon (fault injection).
    pub fn mount_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Output {
        fleecefs_env(self.mount_args(extra), env)
    }

    /// Starts `fleecefs mount --foreground` as a child of the test (its stderr goes to
    /// `log`) and waits until the mount answers `status`.
    pub fn mount_foreground(&mut self, log: &Path) -> u32 {
        let stderr = File::create(log).expect("creating the foreground log");
        let child = Command::new(BIN)
            .args(self.mount_args(&["--foreground"]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting fleecefs mount --foreground");
        let pid = child.id();
        self.foreground = Some(child);
        wait_until("the foreground daemon to serve", || {
            self.client("status", &[]).code == 0
        });
        pid
    }

    /// Waits for the foreground daemon to exit and returns its status.
    pub fn wait_foreground(&mut self) -> ExitStatus {
        let child = self
            .foreground
            .as_mut()
            .expect("no foreground daemon was started");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for the daemon") {
                self.foreground = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the foreground daemon did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `fleecefs CMD MOUNTPOINT ARGS...`.
    pub fn client(&self, cmd: &str, args: &[&str]) -> Output {
        let mut all: Vec<&OsStr> = vec![OsStr::new(cmd), self.mp.as_os_str()];
        all.extend(args.iter().map(OsStr::new));
        fleecefs(all)
    }

    /// `setup --target TARGET --json [ARGS]`; panics on failure.
    pub fn setup_with(&self, target: &str, args: &[&str]) -> Value {
        let mut all = vec!["--target", target, "--json"];
        all.extend_from_slice(args);
        let out = self.client("setup", &all).expect_ok("fleecefs setup");
        parse_json(&out, "setup --json")
    }

    /// `setup --target TARGET --json` on all devices; panics on failure.
    pub fn setup(&self, target: &str) -> Value {
        self.setup_with(target, &[])
    }

    /// `teardown --target TARGET --success`; panics on failure.
    pub fn teardown(&self, target: &str) {
        self.client("teardown", &["--target", target, "--success"])
            .expect_ok("fleecefs teardown");
    }

    /// `status --json`.
    pub fn status(&self) -> Value {
        let out = self
            .client("status", &["--json"])
            .expect_ok("fleecefs status");
        parse_json(&out, "status --json")
    }

    /// The active access of `status --json` (panics if none).
    pub fn access(&self) -> Value {
        let access = self.status()["access"].clone();
        assert!(!access.is_null(), "no backup access is active");
        access
    }

    /// The daemon's pid, from `status --json`.
    pub fn pid(&self) -> i32 {
        let pid = json_u64(&self.status(), "pid");
        i32::try_from(pid).expect("pid fits in i32")
    }

    /// The worker's pid, from `status --json`: the process that serves requests.
    pub fn worker_pid(&self) -> i32 {
        let pid = json_u64(&self.status(), "worker_pid");
        i32::try_from(pid).expect("pid fits in i32")
    }

    /// The keeper's pid, from `status --json` (killing it ends the worker too).
    pub fn keeper_pid(&self) -> i32 {
        let pid = json_u64(&self.status(), "keeper_pid");
        i32::try_from(pid).expect("pid fits in i32")
    }

    /// `MOUNTPOINT/live/NAME`.
    pub fn live(&self, name: &str) -> PathBuf {
        self.mp.join("live").join(name)
    }

    /// `MOUNTPOINT/snapshot/NAME`.
    pub fn snapshot(&self, name: &str) -> PathBuf {
        self.mp.join("snapshot").join(name)
    }

    /// `MOUNTPOINT/snapshot/NAME.dirty`.
    pub fn dirty_map(&self, name: &str) -> PathBuf {
        self.mp.join("snapshot").join(format!("{name}.dirty"))
    }

    /// The source image of device NAME.
    pub fn source(&self, name: &str) -> PathBuf {
        self.devices
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("no device {name}"))
    }

    /// The default fleecing file of device NAME in an access for TARGET.
    pub fn fleecing_file(&self, name: &str, target: &str) -> PathBuf {
        self.state
            .join("fleecing")
            .join(format!("{name}.{target}.fleece"))
    }

    /// Files in the default fleecing directory (empty if it does not exist).
    pub fn fleecing_files(&self) -> Vec<PathBuf> {
        match fs::read_dir(self.state.join("fleecing")) {
            Ok(entries) => entries
                .map(|e| e.expect("listing the fleecing dir").path())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Whether the state dir lock is free (no daemon holds it).
    pub fn daemon_gone(&self) -> bool {
        lock_is_free(&self.state.join("fleecefs.lock"))
    }
}

impl Default for Fleece {
    fn default() -> Self {
        Fleece::new()
    }
}

impl Drop for Fleece {
    fn drop(&mut self) {
        if mounts_at(&self.mp) > 0 {
            let out = fleecefs([OsStr::new("unmount"), self.mp.as_os_str()]);
            if out.code != 0 || mounts_at(&self.mp) > 0 {
                eprintln!(
                    "fleecefs unmount {} failed ({}); detaching",
                    self.mp.display(),
                    out.stderr.trim()
                );
                while mounts_at(&self.mp) > 0 {
                    let detached = Command::new("umount")
                        .arg("-l")
                        .arg(&self.mp)
                        .status()
                        .map(|s| s.success())
                        .unwrap_or(false);
                    if !detached {
                        eprintln!("umount -l {} failed", self.mp.display());
                        break;
                    }
                }
            }
        }
        if let Some(mut child) = self.foreground.take() {
            let deadline = Instant::now() + TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Let the daemon finish its cleanup before the temp dir goes away.
        let deadline = Instant::now() + TIMEOUT;
        while self.state.exists() && !self.daemon_gone() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---- mounts, processes, waiting ----------------------------------------------------

fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(u8::is_ascii_digit));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// How many mounts `/proc/self/mountinfo` lists at `path`.
pub fn mounts_at(path: &Path) -> usize {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo");
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|mp| unescape_mountinfo(mp) == path.as_os_str().as_bytes())
        .count()
}

/// Whether nobody holds an flock on `lock` (true if it does not exist).
pub fn lock_is_free(lock: &Path) -> bool {
    let Ok(f) = File::open(lock) else {
        return true;
    };
    // SAFETY: flock on a valid fd; a shared lock is released when `f` closes.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) == 0 }
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped).
pub fn process_gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Sends `sig` to `pid`.
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a pid we got from the daemon.
    let r = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        r,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// Polls `done` every 20 ms; panics after [`TIMEOUT`] naming `what`.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- file contents -----------------------------------------------------------------

/// Writes `len` bytes of `byte` at `offset` of `path` (one positional write).
pub fn fill_pattern(path: &Path, offset: u64, len: u64, byte: u8) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {} for writing: {e}", path.display()));
    f.write_all_at(&vec![byte; len as usize], offset)
        .unwrap_or_else(|e| {
            panic!(
                "writing {len} bytes of {byte:#x} at {offset} to {}: {e}",
                path.display()
            )
        });
}

/// Sets `len` bytes at `offset` of an in-memory image to `byte`.
pub fn paint(image: &mut [u8], offset: u64, len: u64, byte: u8) {
    image[offset as usize..(offset + len) as usize].fill(byte);
}

/// Reads exactly `len` bytes at `offset` of `path`.
pub fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("reading {len} bytes at {offset} of {}: {e}", path.display()));
    buf
}

/// Reads the whole file.
pub fn read_all(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Asserts two byte strings are equal, reporting the first difference (not the data).
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    if let Some(i) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        panic!(
            "{what}: first difference at offset {i:#x}: {:#04x}, expected {:#04x}",
            actual[i], expected[i]
        );
    }
}

/// Asserts every byte of `data` is `byte`.
pub fn assert_all(data: &[u8], byte: u8, what: &str) {
    if let Some(i) = data.iter().position(|&b| b != byte) {
        panic!(
            "{what}: byte {i:#x} is {:#04x}, expected {byte:#04x}",
            data[i]
        );
    }
}

/// A buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes starting at a multiple of `align`.
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let storage = vec![0u8; len + align];
        let start = storage.as_ptr().align_offset(align);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// The aligned bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The aligned bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

// ---- raw syscalls (errno, not io::Error) -------------------------------------------

/// An errno value.
pub type Errno = i32;

/// The calling thread's errno.
pub fn errno() -> Errno {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A readable name for an errno, for messages.
pub fn errno_name(e: Errno) -> String {
    format!("{} ({e})", std::io::Error::from_raw_os_error(e))
}

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL bytes")
}

/// `open(2)`.
pub fn open(path: &Path, flags: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: open with a valid C string; the fd is owned by the result.
    let fd = unsafe { libc::open(cpath(path).as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        Err(errno())
    } else {
        // SAFETY: fd was just returned by open and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// `open(2)` that must succeed.
pub fn open_ok(path: &Path, flags: i32) -> OwnedFd {
    open(path, flags)
        .unwrap_or_else(|e| panic!("open {} ({flags:#x}): {}", path.display(), errno_name(e)))
}

/// One `pread(2)` of up to `len` bytes: a short count is returned as is.
pub fn pread(fd: &OwnedFd, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; len];
    let n = pread_into(fd, offset, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// One `pread(2)` into `buf`.
pub fn pread_into(fd: &OwnedFd, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: the buffer is valid for its length.
    let n = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    };
    usize::try_from(n).map_err(|_| errno())
}

/// One `pwrite(2)`.
pub fn pwrite(fd: &OwnedFd, offset: u64, data: &[u8]) -> Result<usize, Errno> {
    // SAFETY: the buffer is valid for its length.
    let n = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            offset as libc::off_t,
        )
    };
    usize::try_from(n).map_err(|_| errno())
}

fn check(r: libc::c_int) -> Result<(), Errno> {
    if r == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// `fallocate(2)`.
pub fn fallocate(fd: &OwnedFd, mode: i32, offset: u64, len: u64) -> Result<(), Errno> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
}

/// `truncate(2)`.
pub fn truncate(path: &Path, len: u64) -> Result<(), Errno> {
    // SAFETY: truncate with a valid C string.
    check(unsafe { libc::truncate(cpath(path).as_ptr(), len as libc::off_t) })
}

/// `fsync(2)`.
pub fn fsync(fd: &OwnedFd) -> Result<(), Errno> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::fsync(fd.as_raw_fd()) })
}

/// `fdatasync(2)`.
pub fn fdatasync(fd: &OwnedFd) -> Result<(), Errno> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::fdatasync(fd.as_raw_fd()) })
}

/// Asserts `r` failed with `expected`.
pub fn assert_errno<T>(r: Result<T, Errno>, expected: Errno, what: &str) {
    match r {
        Err(e) if e == expected => {}
        Err(e) => panic!(
            "{what}: failed with {}, expected {}",
            errno_name(e),
            errno_name(expected)
        ),
        Ok(_) => panic!("{what}: succeeded, expected {}", errno_name(expected)),
    }
}

/// Unwraps `r` or panics naming the call and the errno.
pub fn ok<T>(r: Result<T, Errno>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {}", errno_name(e)))
}

/// Allocated bytes of a file on disk (`st_blocks` * 512).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    m.blocks() * 512
}

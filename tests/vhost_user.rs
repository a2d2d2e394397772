//! The vhost-user-blk export with a real vhost-user client: libblkio's
//! `virtio-blk-vhost-user` driver (the `blkio` crate) connects to the socket of
//! `fleecefs mount --vhost-user-blk NAME=SOCKET` (or `device add --vhost-user-blk`), shares
//! its memory and submits virtio-blk requests on several queues.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::mem::MaybeUninit;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use common::*;

const SIZE: u64 = 16 * MIB;
const BUF: usize = 4 * MIB as usize;

/// A connected libblkio client with one shared memory region of [`BUF`] bytes.
struct Client {
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    blkio: Blkio,
}

impl Client {
    fn connect(socket: &Path, queues: i32, read_only: bool) -> Client {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("the libblkio driver");
        blkio
            .set_str("path", socket.to_str().expect("utf-8 socket path"))
            .expect("setting path");
        blkio
            .set_bool("read-only", read_only)
            .expect("setting read-only");
        blkio.connect().expect("connecting to the export");
        blkio
            .set_i32("num-queues", queues)
            .expect("setting num-queues");
        let started = blkio.start().expect("starting the client");
        let region = blkio
            .alloc_mem_region(BUF)
            .expect("allocating a memory region");
        blkio
            .map_mem_region(&region)
            .expect("mapping the memory region");
        Client {
            queues: started.queues,
            region,
            blkio,
        }
    }

    fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity")
    }

    /// The shared buffer at `at`, `len` bytes.
    fn buf(&mut self, at: usize, len: usize) -> &mut [u8] {
        assert!(at + len <= BUF);
        // SAFETY: the region is BUF bytes of memory the client mapped; `&mut self`
        // keeps other borrows out while no request of ours is in flight.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + at) as *mut u8, len) }
    }

    fn ptr(&self, at: usize) -> *mut u8 {
        (self.region.addr + at) as *mut u8
    }

    /// Waits for `n` completions on queue `q`; returns their (user_data, ret).
    fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut out = Vec::new();
        while out.len() < n {
            let mut c = [const { MaybeUninit::<Completion>::uninit() }; 64];
            let want = (n - out.len()).min(c.len());
            let got = self.queues[q]
                .do_io(&mut c, want, None, None)
                .expect("waiting for completions");
            for done in &c[..got] {
                // SAFETY: do_io initialized the first `got` completions.
                let done = unsafe { done.assume_init_ref() };
                out.push((done.user_data, done.ret));
            }
        }
        out
    }

    fn write(&mut self, q: usize, offset: u64, at: usize, len: usize) -> i32 {
        let p = self.ptr(at);
        self.queues[q].write(offset, p, len, 0, ReqFlags::empty());
        self.wait(q, 1)[0].1
    }

    fn read(&mut self, q: usize, offset: u64, at: usize, len: usize) -> i32 {
        let p = self.ptr(at);
        self.queues[q].read(offset, p, len, 0, ReqFlags::empty());
        self.wait(q, 1)[0].1
    }

    fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait(q, 1)[0].1
    }
}

/// A mount with devices `vm` (and the others of `extra_devices`) exported at `vm.sock`.
fn exported(extra: &[&str]) -> (Fleece, PathBuf) {
    exported_env(extra, &[])
}

/// [`exported`] with `env` set for the daemon (fault injection).
fn exported_env(extra: &[&str], env: &[(&str, &str)]) -> (Fleece, PathBuf) {
    let mut f = Fleece::new();
    f.add_device("vm", SIZE);
    let sock = f.root.join("vm.sock");
    let spec = format!("vm={}", sock.display());
    let mut args = vec!["--vhost-user-blk", spec.as_str()];
    args.extend_from_slice(extra);
    f.mount_env(&args, env)
        .expect_ok("fleecefs mount --vhost-user-blk");
    (f, sock)
}

/// A byte pattern that differs per offset and seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn data_round_trips_on_several_queues_and_live_file_agrees() {
    let (f, sock) = exported(&[]);
    let mode = fs::metadata(&sock)
        .expect("the socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let mut c = Client::connect(&sock, 2, false);
    assert_eq!(c.capacity(), SIZE);
    assert_eq!(c.queues.len(), 2);
    // Many requests in flight on both queues: 64 x 32K writes, alternating queues.
    const N: usize = 64;
    const LEN: usize = 32 * 1024;
    let data = pattern(1, N * LEN);
    c.buf(0, N * LEN).copy_from_slice(&data);
    for i in 0..N {
        let p = c.ptr(i * LEN);
        let offset = (i * 3 * LEN) as u64; // spread, with gaps
        c.queues[i % 2].write(offset, p, LEN, i, ReqFlags::empty());
    }
    for q in 0..2 {
        for (user, ret) in c.wait(q, N / 2) {
            assert_eq!(ret, 0, "write {user}");
        }
    }
    // Read back through the other queue into a second area of the buffer.
    c.buf(0, N * LEN).fill(0);
    for i in 0..N {
        let p = c.ptr(i * LEN);
        c.queues[(i + 1) % 2].read((i * 3 * LEN) as u64, p, LEN, i, ReqFlags::empty());
    }
    for q in 0..2 {
        for (user, ret) in c.wait(q, N / 2) {
            assert_eq!(ret, 0, "read {user}");
        }
    }
    assert_bytes_eq(c.buf(0, N * LEN), &data, "read back over vhost-user");
    // live/vm sees the same bytes, and the gaps stayed zero.
    for i in 0..N {
        let live = read_range(&f.live("vm"), (i * 3 * LEN) as u64, 3 * LEN as u64);
        assert_bytes_eq(&live[..LEN], &data[i * LEN..(i + 1) * LEN], "live/vm");
        assert_all(&live[LEN..], 0, "gap in live/vm");
    }
    // A write through live/vm is seen by the client.
    fill_pattern(&f.live("vm"), MIB, 8192, 0x5a);
    assert_eq!(c.read(0, MIB, 0, 8192), 0);
    assert_all(c.buf(0, 8192), 0x5a, "live write seen over vhost-user");
    // A large request of many pages.
    let big = pattern(7, BUF);
    c.buf(0, BUF).copy_from_slice(&big);
    assert_eq!(c.write(1, 8 * MIB, 0, BUF), 0);
    assert_bytes_eq(
        &read_range(&f.live("vm"), 8 * MIB, BUF as u64),
        &big,
        "4 MiB write",
    );
    // Requests past the end fail; the export keeps serving.
    let r = c.read(0, SIZE, 0, 4096);
    assert!(r < 0, "a read past the end succeeded: {r}");
    assert_eq!(c.read(0, SIZE - 4096, 0, 4096), 0);
    // status --json: the export, connected, with its counters.
    let status = f.status();
    let e = &status["vhost_user_blk"][0];
    assert_eq!(e["device"], "vm", "{status}");
    assert_eq!(e["connected"], true, "{status}");
    assert!(json_u64(e, "requests") >= 2 * N as u64, "{status}");
    assert!(json_u64(e, "queues") >= 1, "{status}");
    let text = f.client("status", &[]).expect_ok("fleecefs status").stdout;
    assert!(
        text.contains(&format!(
            "vhost-user-blk vm on {}: VMM connected",
            sock.display()
        )),
        "{text}"
    );
}

#[test]
fn flush_is_an_fdatasync_of_the_source() {
    let (f, sock) = exported(&[]);
    let mut c = Client::connect(&sock, 1, false);
    c.buf(0, 4096).fill(0x33);
    assert_eq!(c.write(0, 0, 0, 4096), 0);
    let log = f.root.join("strace.log");
    let mut strace = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=fdatasync", "-o"])
        .arg(&log)
        .arg("-p")
        .arg(f.worker_pid().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting strace");
    // strace attaches before it traces: wait until it has written its first line or
    // flush until one fdatasync shows up.
    let mut seen = false;
    for _ in 0..100 {
        assert_eq!(c.flush(0), 0);
        std::thread::sleep(std::time::Duration::from_millis(50));
        if fs::read_to_string(&log).is_ok_and(|t| t.contains("fdatasync(")) {
            seen = true;
            break;
        }
    }
    let _ = strace.kill();
    let _ = strace.wait();
    assert!(
        seen,
        "no fdatasync in {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
}

#[test]
fn discard_and_write_zeroes() {
    let (f, sock) = exported(&[]);
    let mut c = Client::connect(&sock, 1, false);
    let data = pattern(3, 2 * MIB as usize);
    c.buf(0, data.len()).copy_from_slice(&data);
    assert_eq!(c.write(0, 0, 0, data.len()), 0);
    let blocks_before = fs::metadata(f.source("vm")).expect("source").blocks();
    // Discard the first MiB: reads zeros, and the source gave the space back.
    c.queues[0].discard(0, MIB, 0, ReqFlags::empty());
    assert_eq!(c.wait(0, 1)[0].1, 0, "discard");
    assert_eq!(c.read(0, 0, 0, MIB as usize), 0);
    assert_all(c.buf(0, MIB as usize), 0, "discarded range");
    let blocks_after = fs::metadata(f.source("vm")).expect("source").blocks();
    assert!(
        blocks_after < blocks_before,
        "{blocks_after} >= {blocks_before}"
    );
    // Write zeroes without unmapping, then with: both read zeros.
    c.queues[0].write_zeroes(MIB, 64 * KIB, 0, ReqFlags::NO_UNMAP);
    assert_eq!(c.wait(0, 1)[0].1, 0, "write zeroes");
    c.queues[0].write_zeroes(MIB + 128 * KIB, 64 * KIB, 0, ReqFlags::empty());
    assert_eq!(c.wait(0, 1)[0].1, 0, "write zeroes (unmap)");
    let live = read_range(&f.live("vm"), MIB, MIB);
    assert_all(&live[..64 * KIB as usize], 0, "zeroed");
    assert_bytes_eq(
        &live[64 * KIB as usize..128 * KIB as usize],
        &data[(MIB + 64 * KIB) as usize..(MIB + 128 * KIB) as usize],
        "between the zeroed ranges",
    );
    assert_all(
        &live[128 * KIB as usize..192 * KIB as usize],
        0,
        "zeroed (unmap)",
    );
}

#[test]
fn read_only_export_refuses_writes() {
    let mut f = Fleece::new();
    f.add_device("vm", SIZE);
    let sock = f.root.join("ro.sock");
    let spec = format!("vm={},ro", sock.display());
    f.mount(&["--vhost-user-blk", &spec])
        .expect_ok("mount with a read-only export");
    fill_pattern(&f.live("vm"), 0, 4096, 0x77);
    let mut c = Client::connect(&sock, 1, true);
    assert_eq!(c.blkio.get_bool("read-only").ok(), Some(true));
    assert_eq!(c.read(0, 0, 0, 4096), 0);
    assert_all(c.buf(0, 4096), 0x77, "read of a read-only export");
    let r = c.write(0, 0, 0, 4096);
    assert!(r < 0, "a write to a read-only export succeeded");
    assert_all(&read_range(&f.live("vm"), 0, 4096), 0x77, "unchanged");
}

#[test]
fn backup_access_stays_exact_while_the_vm_writes_and_bitmaps_cover_every_write() {
    let (f, sock) = exported(&[]);
    // Before the access: a pattern everywhere.
    let reference = pattern(11, SIZE as usize);
    fs::OpenOptions::new()
        .write(true)
        .open(f.live("vm"))
        .and_then(|l| std::os::unix::fs::FileExt::write_all_at(&l, &reference, 0))
        .expect("writing live/vm");
    f.setup("nightly");
    let mut c = Client::connect(&sock, 2, false);
    let snapshot = f.snapshot("vm");
    let reader = std::thread::spawn(move || read_all(&snapshot));
    // Writes on both queues while the backup reads: 4K blocks at pseudo-random offsets.
    let mut written = Vec::new();
    let mut x: u64 = 12345;
    for round in 0..32 {
        for i in 0..16usize {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let offset = (x >> 33) % (SIZE / 4096) * 4096;
            let at = i * 4096;
            c.buf(at, 4096).fill((round * 16 + i) as u8 | 1);
            let p = c.ptr(at);
            c.queues[i % 2].write(offset, p, 4096, i, ReqFlags::empty());
            written.push(offset);
        }
        for q in 0..2 {
            for (user, ret) in c.wait(q, 8) {
                assert_eq!(ret, 0, "write {user} of round {round}");
            }
        }
    }
    let snap = reader.join().expect("the snapshot reader");
    assert_bytes_eq(&snap, &reference, "snapshot/vm while the VM wrote");
    assert_bytes_eq(
        &read_all(&f.snapshot("vm")),
        &reference,
        "snapshot/vm after",
    );
    f.teardown("nightly");
    // The next access of the target holds exactly what changed: every write is covered.
    let setup = f.setup("nightly");
    let map = fs::read_to_string(f.dirty_map("vm")).expect("the dirty map");
    let ranges: Vec<(u64, u64)> = map
        .lines()
        .map(|l| {
            let mut it = l.split(' ').map(|n| n.parse::<u64>().expect("a number"));
            (it.next().expect("offset"), it.next().expect("length"))
        })
        .collect();
    for off in written {
        assert!(
            ranges.iter().any(|&(o, l)| o <= off && off + 4096 <= o + l),
            "write at {off} is not in the dirty map {map} ({setup})"
        );
    }
    f.teardown("nightly");
}

#[test]
fn bad_export_options_are_refused() {
    let mut f = Fleece::new();
    f.add_device("vm", SIZE);
    let sock = f.root.join("x.sock");
    let unknown = format!("nosuch={}", sock.display());
    f.mount(&["--vhost-user-blk", &unknown])
        .expect_failure("unknown device", "unknown device 'nosuch'");
    f.mount(&["--vhost-user-blk", "vm"])
        .expect_failure("no socket", "expected NAME=SOCKET");
    let file = f.root.join("file");
    fs::write(&file, b"x").expect("a regular file");
    let not_socket = format!("vm={}", file.display());
    f.mount(&["--vhost-user-blk", &not_socket])
        .expect_failure("not a socket", "is not a socket");
    let spec = format!("vm={}", sock.display());
    f.mount(&["--vhost-user-blk", &spec, "--vhost-user-blk", &spec])
        .expect_failure("twice", "given twice");
    assert!(!sock.exists(), "a refused mount left its socket");
    let open_dir = f.root.join("open");
    fs::create_dir(&open_dir).expect("a directory");
    fs::set_permissions(&open_dir, fs::Permissions::from_mode(0o777)).expect("chmod 777");
    let in_open = format!("vm={}", open_dir.join("vm.sock").display());
    f.mount(&["--vhost-user-blk", &in_open])
        .expect_failure("a directory every user can write", "is not safe");
    let missing = format!("vm={}", f.root.join("nodir/vm.sock").display());
    f.mount(&["--vhost-user-blk", &missing])
        .expect_failure("a missing directory", "nodir");
}

/// Two names of one socket file (a '..', a symlinked directory, an NBD socket, the
/// control socket): the second bind would replace the first socket, and the export or
/// listener bound first would be unreachable.
#[test]
fn a_socket_path_named_twice_under_other_names_is_refused() {
    let mut f = Fleece::new();
    f.add_device("vm", SIZE);
    fs::create_dir(f.root.join("sub")).expect("a directory");
    std::os::unix::fs::symlink(&f.root, f.root.join("link")).expect("a symlink");
    let sock = f.root.join("vm.sock");
    let spec = format!("vm={}", sock.display());
    for alias in [f.root.join("sub/../vm.sock"), f.root.join("link/vm.sock")] {
        let other = format!("vm={}", alias.display());
        f.mount(&["--vhost-user-blk", &spec, "--vhost-user-blk", &other])
            .expect_failure(
                &format!("{} and {}", sock.display(), alias.display()),
                "twice",
            );
    }
    let nbd = format!("unix:{}", f.root.join("link/vm.sock").display());
    f.mount(&["--vhost-user-blk", &spec, "--nbd", &nbd])
        .expect_failure("an export at the NBD socket", "twice");
    fs::create_dir(&f.state).expect("the state directory");
    let control = format!("vm={}", f.state.join("control.sock").display());
    f.mount(&["--vhost-user-blk", &control])
        .expect_failure("an export at the control socket", "twice");
    assert!(!sock.exists(), "a refused mount left its socket");
    // device add: two names of one new socket in one command
    f.mount(&[]).expect_ok("mount");
    let img = f.image("b.img", SIZE);
    let dev = format!("b={}", img.display());
    let record = fs::read(f.state.join("devices.json")).expect("the device record");
    let b = format!("b={}", sock.display());
    let b_alias = format!("b={}", f.root.join("sub/../vm.sock").display());
    device_add(
        &f,
        &[&dev, "--vhost-user-blk", &b, "--vhost-user-blk", &b_alias],
    )
    .expect_failure("one socket under two names", "given twice");
    assert_eq!(
        fs::read(f.state.join("devices.json")).expect("record"),
        record
    );
    assert!(!sock.exists(), "a refused device add left its socket");
}

#[test]
fn resize_is_seen_by_the_client() {
    let (f, sock) = exported(&[]);
    let mut c = Client::connect(&sock, 1, false);
    assert_eq!(c.capacity(), SIZE);
    assert!(
        c.read(0, SIZE, 0, 4096) < 0,
        "a read past the end succeeded"
    );
    f.client("resize", &["vm", "+16M"])
        .expect_ok("fleecefs resize +16M");
    assert_eq!(c.capacity(), 2 * SIZE);
    c.buf(0, 4096).fill(0x42);
    assert_eq!(
        c.write(0, SIZE + MIB, 0, 4096),
        0,
        "a write in the new space"
    );
    assert_all(
        &read_range(&f.live("vm"), SIZE + MIB, 4096),
        0x42,
        "live/vm in the new space",
    );
}

#[test]
fn the_keeper_holds_the_socket_across_worker_deaths() {
    // With an NBD listener too: the keeper holds both kinds, each worker sorts them out.
    let mut f = Fleece::new();
    f.add_device("vm", SIZE);
    let (sock, nbd) = (f.root.join("vm.sock"), f.root.join("nbd.sock"));
    let spec = format!("vm={}", sock.display());
    let nbd_spec = format!("unix:{}", nbd.display());
    f.mount(&["--nbd", &nbd_spec, "--vhost-user-blk", &spec])
        .expect_ok("mount with an NBD listener and a vhost-user-blk export");
    let before = fs::metadata(&sock).expect("the socket");
    let nbd_before = fs::metadata(&nbd).expect("the NBD socket").ino();
    // An administrator lets a VMM's group in; a new worker must not undo it.
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o660)).expect("chmod");
    let mut c = Client::connect(&sock, 1, false);
    let data = pattern(21, 64 * 1024);
    c.buf(0, data.len()).copy_from_slice(&data);
    assert_eq!(c.write(0, 3 * MIB, 0, data.len()), 0);
    drop(c);
    for _ in 0..2 {
        let pid = f.worker_pid();
        kill(pid, libc::SIGKILL);
        wait_until("a new worker serving", || {
            let out = f.client("status", &["--json"]);
            out.code == 0 && json_u64(&parse_json(&out, "status"), "worker_pid") != pid as u64
        });
        let now = fs::metadata(&sock).expect("the socket after a worker death");
        assert_eq!(now.ino(), before.ino(), "the socket was created again");
        assert_eq!(
            now.permissions().mode() & 0o777,
            0o660,
            "the socket's mode was reset"
        );
        let nbd_now = fs::metadata(&nbd).expect("the NBD socket").ino();
        assert_eq!(nbd_now, nbd_before, "the NBD socket was created again");
        let mut c = Client::connect(&sock, 1, false);
        assert_eq!(c.read(0, 3 * MIB, 0, data.len()), 0);
        assert_bytes_eq(c.buf(0, data.len()), &data, "data after a worker death");
    }
}

/// `fleecefs device add MP ARGS...`.
fn device_add(f: &Fleece, args: &[&str]) -> Output {
    let mut all = vec![OsStr::new("device"), OsStr::new("add"), f.mp.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    fleecefs(all)
}

/// `fleecefs device remove MOUNTPOINT NAME`.
fn device_remove(f: &Fleece, name: &str) -> Output {
    fleecefs([
        OsStr::new("device"),
        OsStr::new("remove"),
        f.mp.as_os_str(),
        OsStr::new(name),
    ])
}

/// The sockets `status --json` lists as vhost-user-blk exports.
fn exported_sockets(f: &Fleece) -> Vec<String> {
    f.status()["vhost_user_blk"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["socket"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until a worker other than `pid` serves.
fn wait_new_worker(f: &Fleece, pid: i32) {
    wait_until("a new worker serving", || {
        let out = f.client("status", &["--json"]);
        out.code == 0 && json_u64(&parse_json(&out, "status"), "worker_pid") != pid as u64
    });
}

#[test]
fn device_add_exports_and_the_export_outlives_workers_and_mounts() {
    let f = Fleece::mounted(&[("a", SIZE)]);
    let img = f.image("vm.img", SIZE);
    let sock = f.root.join("vm.sock");
    let dev = format!("vm={}", img.display());
    let spec = format!("vm={}", sock.display());
    device_add(&f, &[&dev, "--vhost-user-blk", &spec]).expect_ok("device add --vhost-user-blk");
    let meta = fs::metadata(&sock).expect("the export's socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    assert_eq!(exported_sockets(&f), [sock.display().to_string()]);
    let data = pattern(7, 64 * 1024);
    {
        let mut c = Client::connect(&sock, 2, false);
        assert_eq!(c.capacity(), SIZE);
        c.buf(0, data.len()).copy_from_slice(&data);
        assert_eq!(c.write(1, 5 * MIB, 0, data.len()), 0);
        assert_eq!(c.flush(1), 0);
    }
    assert_bytes_eq(
        &read_range(&f.live("vm"), 5 * MIB, data.len() as u64),
        &data,
        "live/vm after a write over vhost-user",
    );
    // The keeper holds the socket made after the mount: a worker's death keeps it.
    let pid = f.worker_pid();
    kill(pid, libc::SIGKILL);
    wait_new_worker(&f, pid);
    assert_eq!(
        fs::metadata(&sock)
            .expect("the socket after a worker death")
            .ino(),
        meta.ino(),
        "the socket was made again"
    );
    assert_eq!(exported_sockets(&f), [sock.display().to_string()]);
    let mut c = Client::connect(&sock, 1, false);
    assert_eq!(c.read(0, 5 * MIB, 0, data.len()), 0);
    assert_bytes_eq(c.buf(0, data.len()), &data, "data after a worker death");
    drop(c);
    // A planned restart too.
    let pid = f.worker_pid();
    f.client("restart", &[]).expect_ok("fleecefs restart");
    wait_new_worker(&f, pid);
    let mut c = Client::connect(&sock, 1, false);
    assert_eq!(c.read(0, 5 * MIB, 0, data.len()), 0);
    assert_bytes_eq(c.buf(0, data.len()), &data, "data after a restart");
    drop(c);
    // Unmounted, the socket goes; a mount of the recorded devices brings it back.
    fleecefs([OsStr::new("unmount"), f.mp.as_os_str()]).expect_ok("fleecefs unmount");
    assert!(!sock.exists(), "the socket outlived the mount");
    fleecefs([
        OsStr::new("mount"),
        f.mp.as_os_str(),
        OsStr::new("--state-dir"),
        f.state.as_os_str(),
    ])
    .expect_ok("mount of the recorded devices");
    assert_eq!(exported_sockets(&f), [sock.display().to_string()]);
    let mut c = Client::connect(&sock, 1, false);
    assert_eq!(c.read(0, 5 * MIB, 0, data.len()), 0);
    assert_bytes_eq(c.buf(0, data.len()), &data, "data after mounting again");
    drop(c);
    // After a crash (keeper and worker killed) too.
    let (keeper, worker) = (f.keeper_pid(), f.worker_pid());
    kill(keeper, libc::SIGKILL);
    wait_until("the daemon gone", || {
        process_gone(keeper) && process_gone(worker)
    });
    fleecefs([
        OsStr::new("mount"),
        f.mp.as_os_str(),
        OsStr::new("--state-dir"),
        f.state.as_os_str(),
    ])
    .expect_ok("mount after a crash");
    let mut c = Client::connect(&sock, 1, false);
    assert_eq!(c.read(0, 5 * MIB, 0, data.len()), 0);
    assert_bytes_eq(c.buf(0, data.len()), &data, "data after a crash");
    drop(c);
}

#[test]
fn device_remove_ends_the_export_and_disconnects_the_vmm() {
    let f = Fleece::mounted(&[("a", SIZE)]);
    let img = f.image("vm.img", SIZE);
    let sock = f.root.join("vm.sock");
    let dev = format!("vm={}", img.display());
    let spec = format!("vm={}", sock.display());
    device_add(&f, &[&dev, "--vhost-user-blk", &spec]).expect_ok("device add --vhost-user-blk");
    let keeper = f.keeper_pid();
    let sockets_of_keeper = || {
        fs::read_dir(format!("/proc/{keeper}/fd"))
            .expect("the keeper's fds")
            .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy().starts_with("socket:"))
            .count()
    };
    let held = sockets_of_keeper();
    // A VMM connected (a plain connection: the export serves it until it ends).
    let mut vmm = std::os::unix::net::UnixStream::connect(&sock).expect("connecting");
    wait_until("the VMM connected", || {
        f.status()["vhost_user_blk"][0]["connected"] == serde_json::json!(true)
    });
    // Refused for another reason: the export and its VMM stay.
    let refused = |what: &str, why: &str| {
        device_remove(&f, "vm").expect_failure(what, why);
        assert_eq!(
            f.status()["vhost_user_blk"][0]["connected"],
            serde_json::json!(true),
            "a refused removal ended the export"
        );
    };
    f.setup("t");
    refused(
        "device remove during an access",
        "part of the backup access",
    );
    f.teardown("t");
    let open = fs::File::open(f.live("vm")).expect("opening live/vm");
    refused(
        "device remove with live/vm open",
        "live/vm is open (1 handle(s))",
    );
    drop(open);
    // The kernel releases the closed handle asynchronously.
    wait_until("device remove of an exported device", || {
        device_remove(&f, "vm").code == 0
    });
    vmm.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut vmm, &mut byte).expect("reading the ended connection"),
        0,
        "the VMM's connection did not end"
    );
    assert!(!sock.exists(), "the socket outlived the export");
    assert!(
        std::os::unix::net::UnixStream::connect(&sock).is_err(),
        "a connection after device remove"
    );
    assert!(exported_sockets(&f).is_empty(), "status lists the export");
    assert_eq!(sockets_of_keeper(), held - 1, "the keeper kept the socket");
    // The record forgets it: a new worker does not serve it again.
    let pid = f.worker_pid();
    kill(pid, libc::SIGKILL);
    wait_new_worker(&f, pid);
    assert!(!sock.exists() && exported_sockets(&f).is_empty());
}

/// `fleecefs device remove MP NAME` on a thread of its own.
#[cfg(feature = "fault-injection")]
fn remove_in_background(f: &Fleece, name: &str) -> std::thread::JoinHandle<Output> {
    let args = [
        OsStr::new("device").to_owned(),
        OsStr::new("remove").to_owned(),
        f.mp.as_os_str().to_owned(),
        OsStr::new(name).to_owned(),
    ];
    std::thread::spawn(move || fleecefs(args))
}

/// Whether the other end of `stream` closed it within `within`.
#[cfg(feature = "fault-injection")]
fn ended_within(stream: &mut std::os::unix::net::UnixStream, within: std::time::Duration) -> bool {
    stream.set_read_timeout(Some(within)).expect("timeout");
    let mut byte = [0u8; 1];
    matches!(std::io::Read::read(stream, &mut byte), Ok(0))
}

/// `device remove` of an exported device is one step. Held by a fault hook after its
/// checks and before the exports end: an open of live/NAME meanwhile fails with EBUSY, a
/// VMM that connects is turned away, and the removal then goes through (it is never
/// refused after it ended a VMM's connection).
#[cfg(feature = "fault-injection")]
#[test]
fn device_remove_turns_away_opens_and_vmms_while_under_way() {
    let mut f = Fleece::new();
    f.add_device("vm", SIZE);
    let hold = f.root.join("remove.hold");
    let sock = f.root.join("vm.sock");
    let spec = format!("vm={}", sock.display());
    f.mount_env(
        &["--vhost-user-blk", &spec],
        &[("FLEECEFS_FAULT_REMOVE_HOLD", hold.to_str().expect("utf-8"))],
    )
    .expect_ok("fleecefs mount --vhost-user-blk");
    // A VMM connected: live/vm opened while the removal is under way.
    let mut vmm = std::os::unix::net::UnixStream::connect(&sock).expect("connecting");
    wait_until("the VMM connected", || {
        f.status()["vhost_user_blk"][0]["connected"] == serde_json::json!(true)
    });
    let removal = remove_in_background(&f, "vm");
    wait_until("device remove under way", || hold.exists());
    let opened = open(&f.live("vm"), libc::O_RDONLY);
    let connected_meanwhile = !ended_within(&mut vmm, std::time::Duration::from_millis(100));
    fs::remove_file(&hold).expect("letting the removal go on");
    let out = removal.join().expect("the removal's thread");
    let opened = opened.map(drop);
    out.expect_ok("device remove while live/vm was opened");
    assert_errno(
        opened,
        libc::EBUSY,
        "open of live/vm while it is being removed",
    );
    assert!(
        connected_meanwhile,
        "the VMM's connection ended before the removal's checks"
    );
    assert!(
        ended_within(&mut vmm, std::time::Duration::from_secs(10)),
        "the VMM's connection did not end"
    );
    // No VMM connected: one that connects while the removal is under way is turned away.
    let img = f.image("vm2.img", SIZE);
    let sock2 = f.root.join("vm2.sock");
    let dev = format!("vm2={}", img.display());
    let spec2 = format!("vm2={}", sock2.display());
    device_add(&f, &[&dev, "--vhost-user-blk", &spec2]).expect_ok("device add --vhost-user-blk");
    let removal = remove_in_background(&f, "vm2");
    wait_until("device remove under way", || hold.exists());
    let mut late = std::os::unix::net::UnixStream::connect(&sock2).expect("connecting");
    let turned_away = ended_within(&mut late, std::time::Duration::from_secs(5));
    fs::remove_file(&hold).expect("letting the removal go on");
    removal
        .join()
        .expect("the removal's thread")
        .expect_ok("device remove while a VMM connected");
    assert!(
        turned_away,
        "a VMM connected to a device being removed was served"
    );
    assert!(exported_sockets(&f).is_empty(), "status lists an export");
}

#[test]
fn device_add_refuses_bad_exports_and_changes_nothing() {
    let mut f = Fleece::new();
    f.add_device("a", SIZE);
    let taken = f.root.join("a.sock");
    let taken_spec = format!("a={}", taken.display());
    f.mount(&["--vhost-user-blk", &taken_spec])
        .expect_ok("mount with an export");
    let img = f.image("vm.img", SIZE);
    let dev = format!("vm={}", img.display());
    let record = || fs::read(f.state.join("devices.json")).expect("the device record");
    let before = record();
    let open_dir = f.root.join("open");
    fs::create_dir(&open_dir).expect("a directory");
    fs::set_permissions(&open_dir, fs::Permissions::from_mode(0o777)).expect("chmod 777");
    let users_dir = f.root.join("users");
    fs::create_dir(&users_dir).expect("a directory");
    std::os::unix::fs::chown(&users_dir, Some(65534), Some(65534)).expect("chown nobody");
    let file = f.root.join("file");
    fs::write(&file, b"x").expect("a regular file");
    let sock = f.root.join("vm.sock");
    for (spec, says) in [
        (format!("b={}", sock.display()), "'b' is not a device added"),
        ("vm".to_string(), "expected NAME=SOCKET"),
        ("=x".to_string(), "no device name"),
        ("vm=".to_string(), "no socket path"),
        (
            format!("vm={}", open_dir.join("vm.sock").display()),
            "is not safe",
        ),
        (
            format!("vm={}", users_dir.join("vm.sock").display()),
            "owned by uid 65534",
        ),
        (format!("vm={}", file.display()), "exists"),
        (
            format!("vm={}", taken.display()),
            "is already the export of device 'a'",
        ),
        (
            format!("vm={}", f.root.join("nodir/vm.sock").display()),
            "nodir",
        ),
    ] {
        device_add(&f, &[&dev, "--vhost-user-blk", &spec])
            .expect_failure(&format!("--vhost-user-blk {spec}"), says);
        assert_eq!(
            f.status()["devices"].as_array().map(Vec::len),
            Some(1),
            "{spec}"
        );
        assert_eq!(record(), before, "the record changed: {spec}");
        assert_eq!(exported_sockets(&f), [taken.display().to_string()]);
    }
    assert!(!sock.exists(), "a refused export left its socket");
    // A relative socket path straight on the control socket (the command makes it
    // absolute).
    let mut control =
        std::os::unix::net::UnixStream::connect(f.state.join("control.sock")).expect("control");
    let req = serde_json::json!({
        "op": "device_add",
        "devices": [["vm", img.display().to_string()]],
        "vhost_user_blk": [{ "name": "vm", "socket": "vm.sock", "read_only": false }],
    });
    std::io::Write::write_all(&mut control, format!("{req}\n").as_bytes()).expect("request");
    let mut reply = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&control), &mut reply).expect("reply");
    assert!(reply.contains("is not absolute"), "{reply}");
    assert_eq!(record(), before);
    // The same socket twice in one command.
    let spec = format!("vm={}", sock.display());
    device_add(
        &f,
        &[&dev, "--vhost-user-blk", &spec, "--vhost-user-blk", &spec],
    )
    .expect_failure("a socket given twice", "given twice");
    // A device that cannot be added takes its export's socket away again.
    let missing = format!("vm={}", f.root.join("missing.img").display());
    device_add(&f, &[&missing, "--vhost-user-blk", &spec])
        .expect_failure("a missing image", "missing.img");
    assert!(!sock.exists(), "a refused device left its export's socket");
    assert_eq!(record(), before);
    // And then the right command works.
    let out = device_add(
        &f,
        &[&dev, "--vhost-user-blk", &format!("{spec},ro"), "--json"],
    )
    .expect_ok("device add --vhost-user-blk ,ro");
    let added = parse_json(&out, "device add --json");
    assert_eq!(
        added["devices"][0]["vhost_user_blk"],
        serde_json::json!([{ "socket": sock.display().to_string(), "read_only": true }]),
        "{added}"
    );
    let c = Client::connect(&sock, 1, true);
    assert_eq!(c.capacity(), SIZE);
}

#[test]
fn an_export_the_keeper_does_not_hold_is_made_by_the_next_worker_and_then_held() {
    let f = Fleece::mounted(&[("vm", SIZE)]);
    let sock = f.root.join("vm.sock");
    // A record that names an export no keeper holds (written by hand).
    let path = f.state.join("devices.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&fs::read(&path).expect("the record")).expect("JSON");
    record["devices"][0]["vhost_user_blk"] =
        serde_json::json!([{ "socket": sock.display().to_string() }]);
    fs::write(&path, serde_json::to_vec(&record).expect("JSON")).expect("writing the record");
    let pid = f.worker_pid();
    kill(pid, libc::SIGKILL);
    wait_new_worker(&f, pid);
    assert_eq!(exported_sockets(&f), [sock.display().to_string()]);
    let ino = fs::metadata(&sock)
        .expect("the socket made by the new worker")
        .ino();
    let c = Client::connect(&sock, 1, false);
    assert_eq!(c.capacity(), SIZE);
    drop(c);
    // Handed to the keeper: the next worker serves the same socket.
    let pid = f.worker_pid();
    kill(pid, libc::SIGKILL);
    wait_new_worker(&f, pid);
    assert_eq!(fs::metadata(&sock).expect("the socket").ino(), ino);
    let c = Client::connect(&sock, 1, false);
    assert_eq!(c.capacity(), SIZE);
}

/// The inflight region over the protocol: the export offers
/// `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`; `GET_INFLIGHT_FD` gives a memfd of the layout's
/// size (libvhost-user's, per queue `ALIGN_UP(16 x size + 2, 64)`) sealed against
/// shrinking; regions that cannot be used (not sealed, smaller than their queues need,
/// misaligned, more or larger queues than offered) are answered without an error and
/// logged, and the worker keeps serving.
#[test]
fn the_inflight_region_is_offered_and_unusable_regions_do_not_hurt_the_worker() {
    use std::os::fd::AsRawFd;
    use vhost::vhost_user::message::VhostUserInflight;
    use vhost::vhost_user::{
        Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    };
    use vhost::VhostBackend;

    let (f, sock) = exported(&[]);
    let pid = f.worker_pid();
    let connect = || {
        let mut fe = Frontend::connect(&sock, 2).expect("connecting a vhost-user frontend");
        fe.set_owner().expect("SET_OWNER");
        let features = fe.get_features().expect("GET_FEATURES");
        assert_ne!(
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        let offered = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        assert!(
            offered.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
            "INFLIGHT_SHMFD not offered: {offered:?}"
        );
        fe.set_protocol_features(
            VhostUserProtocolFeatures::INFLIGHT_SHMFD | VhostUserProtocolFeatures::REPLY_ACK,
        )
        .expect("SET_PROTOCOL_FEATURES");
        fe
    };
    let mut fe = connect();

    let ask = VhostUserInflight::new(0, 0, 2, 128);
    let (info, file) = fe.get_inflight_fd(&ask).expect("GET_INFLIGHT_FD");
    assert_eq!((info.num_queues, info.queue_size), (2, 128));
    assert_eq!(
        info.mmap_size,
        2 * 2112,
        "two parts of ALIGN_UP(16 x 128 + 2, 64)"
    );
    assert_eq!(info.mmap_offset, 0);
    assert_eq!(file.metadata().expect("the region's size").len(), 2 * 2112);
    // SAFETY: fcntl on a valid fd; F_GET_SEALS takes no argument.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    assert!(
        seals >= 0 && seals & libc::F_SEAL_SHRINK != 0,
        "not sealed: {seals}"
    );
    // The region as the VMM gives it back.
    fe.set_inflight_fd(&info, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD of the region made");

    let plain = tempfile::tempfile().expect("a temp file");
    plain.set_len(2 * 2112).expect("its size");
    let bad = [
        (info, plain.as_raw_fd(), "not sealed"),
        (
            VhostUserInflight::new(2 * 2112, 0, 2, 1024),
            file.as_raw_fd(),
            "too small",
        ),
        (
            VhostUserInflight::new(2112, 8, 1, 128),
            file.as_raw_fd(),
            "misaligned",
        ),
        (
            VhostUserInflight::new(2 * 2112, 2112, 2, 128),
            file.as_raw_fd(),
            "past the end",
        ),
        (
            VhostUserInflight::new(1 << 30, 0, 2, 4096),
            file.as_raw_fd(),
            "queues too large",
        ),
    ];
    for (region, fd, what) in bad {
        fe.set_inflight_fd(&region, fd)
            .unwrap_or_else(|e| panic!("SET_INFLIGHT_FD of a region {what}: {e}"));
    }
    drop(fe);
    let warned = || {
        fs::read_to_string(f.state.join("fleecefs.log"))
            .unwrap_or_default()
            .matches("the VMM's inflight region is not usable")
            .count()
    };
    wait_until("a warning per unusable region", || warned() >= 5);
    assert_eq!(warned(), 5, "one warning per unusable region");
    // More queues than the device has, or queues larger than it takes: no region (the
    // request fails, which ends that connection).
    for (queues, size) in [(64, 128), (2, 4096)] {
        let mut fe = connect();
        assert!(
            fe.get_inflight_fd(&VhostUserInflight::new(0, 0, queues, size))
                .is_err(),
            "a region for {queues} queue(s) of {size}"
        );
    }
    assert_eq!(f.worker_pid(), pid, "the worker died");

    // The same worker serves the next VMM.
    let mut c = Client::connect(&sock, 1, false);
    assert_eq!(c.capacity(), SIZE);
    let data = pattern(33, 4096);
    c.buf(0, data.len()).copy_from_slice(&data);
    assert_eq!(c.write(0, MIB, 0, data.len()), 0);
    assert_eq!(c.flush(0), 0);
    assert_eq!(c.read(0, MIB, 4096, data.len()), 0);
    assert_bytes_eq(
        c.buf(4096, data.len()),
        &data,
        "data after unusable regions",
    );
}

/// A request is served with the guest memory the client mapped before making it
/// available, even when the queue's thread was woken before that mapping: libblkio maps
/// its buffers (`ADD_MEM_REG`) after starting the queues, and a thread that looked at
/// guest memory when it woke and took the request later saw no buffer (the request
/// failed without a status byte, which the client read as success: a write lost, a read
/// of nothing). The queue's thread is made slow to look at its ring, on fresh
/// connections, each writing and reading back.
#[test]
fn a_request_is_served_with_the_memory_mapped_before_it() {
    let (f, sock) = exported_env(&[], &[("FLEECEFS_FAULT_VHOST_SLOW_QUEUE", "100")]);
    for round in 0..3u64 {
        let mut c = Client::connect(&sock, 1, false);
        let data = pattern(100 + round, 4096);
        c.buf(0, data.len()).copy_from_slice(&data);
        assert_eq!(c.write(0, MIB, 0, data.len()), 0);
        assert_eq!(c.read(0, MIB, 4096, data.len()), 0);
        assert_bytes_eq(c.buf(4096, data.len()), &data, "data read back");
        let on_disk = fs::read(f.root.join("vm.img")).expect("the image");
        assert_bytes_eq(
            &on_disk[MIB as usize..MIB as usize + 4096],
            &data,
            "the image",
        );
    }
}

/// A VMM's connection leaves no fd behind in the worker when it ends (the exit event of
/// each queue's thread was registered in its epoll as a raw fd and never closed: two
/// fds per connection).
#[test]
fn connections_that_end_leave_no_fds_in_the_worker() {
    let (f, sock) = exported(&[]);
    let pid = f.worker_pid();
    // The fewest fds over a moment: a connection just ended may still be closing.
    let fds = || {
        (0..10)
            .map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(20));
                fs::read_dir(format!("/proc/{pid}/fd"))
                    .map(|d| d.count())
                    .unwrap_or(0)
            })
            .min()
            .unwrap_or(0)
    };
    let mut after_first = 0;
    for round in 0..20 {
        let mut c = Client::connect(&sock, 1, false);
        assert_eq!(c.flush(0), 0);
        drop(c);
        // The next connection is served once the worker is done with this one.
        let c = Client::connect(&sock, 1, false);
        drop(c);
        if round == 0 {
            after_first = fds();
        }
    }
    // Two fds per connection were left before: 76 more after these 38. The last
    // connection may still be closing on a busy machine: wait (at most 10 s) for the
    // count to come down; leaked fds never do.
    let start = std::time::Instant::now();
    let mut after = fds();
    while after > after_first + 16 && start.elapsed() < std::time::Duration::from_secs(10) {
        after = fds();
    }
    assert!(
        after <= after_first + 16,
        "the worker holds {after} fds after 40 connections, {after_first} after 2"
    );
}

/// A VMM that connects again after a worker's death is kicked and notified on each queue
/// as soon as it hands its eventfds over (as libvhost-user does, "in case of I/O hang
/// after reconnecting"): requests the dead worker left in flight are resubmitted at the
/// queue's first kick, and completions it published may not have been notified; a guest
/// that only waits for them would otherwise wait forever.
#[test]
fn a_connecting_vmm_gets_a_kick_and_a_notification_on_each_queue() {
    use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
    use vhost::VhostBackend;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    let (f, sock) = exported(&[]);
    let queues = json_u64(&f.status()["vhost_user_blk"][0], "queues") as usize;
    let mut fe = Frontend::connect(&sock, queues as u64).expect("connecting a vhost-user frontend");
    fe.set_owner().expect("SET_OWNER");
    let features = fe.get_features().expect("GET_FEATURES");
    fe.set_features(features).expect("SET_FEATURES");
    fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    fe.set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
        .expect("SET_PROTOCOL_FEATURES");
    let signaled = |e: &EventFd| {
        let start = std::time::Instant::now();
        loop {
            match e.read() {
                Ok(n) => return n > 0,
                Err(_) if start.elapsed() < std::time::Duration::from_secs(5) => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(_) => return false,
            }
        }
    };
    for q in 0..queues {
        let call = EventFd::new(EFD_NONBLOCK).expect("an eventfd");
        fe.set_vring_call(q, &call).expect("SET_VRING_CALL");
        assert!(signaled(&call), "queue {q}: no notification");
        let kick = EventFd::new(EFD_NONBLOCK).expect("an eventfd");
        fe.set_vring_kick(q, &kick).expect("SET_VRING_KICK");
        assert!(signaled(&kick), "queue {q}: no kick");
    }
}

/// Guest memory of a raw vhost-user frontend: a shared memory file mapped here, handed to
/// the export as one region at guest address 0.
#[cfg(feature = "fault-injection")]
struct SharedMemory {
    file: fs::File,
    ptr: *mut u8,
    len: usize,
}

#[cfg(feature = "fault-injection")]
impl SharedMemory {
    fn new(len: usize) -> SharedMemory {
        // SAFETY: memfd_create with a valid C string; the fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", errno_name(errno()));
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len as u64).expect("sizing the guest memory");
        // SAFETY: a shared mapping of the whole file, unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", errno_name(errno()));
        SharedMemory {
            file,
            ptr: ptr.cast(),
            len,
        }
    }

    /// The frontend's address of guest address `gpa`.
    fn va(&self, gpa: u64) -> u64 {
        self.ptr as u64 + gpa
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= self.len);
        // SAFETY: inside the mapping; the export only reads these bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(gpa as usize), bytes.len())
        };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: inside the mapping, 2-aligned; the export may write it (volatile).
        u16::from_le(unsafe { std::ptr::read_volatile(self.ptr.add(gpa as usize) as *const u16) })
    }

    fn read_u8(&self, gpa: u64) -> u8 {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: inside the mapping; the export may write it (volatile).
        unsafe { std::ptr::read_volatile(self.ptr.add(gpa as usize)) }
    }
}

#[cfg(feature = "fault-injection")]
impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, not used after this.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// GET_VRING_BASE stops the queue: the export answers it only once the requests it took
/// off the queue are completed (as the vhost-user protocol asks; a VMM that stops a
/// device, to pause or reset it, takes every request below the index it gets as done).
/// Here a write waits 3 s for its copy-before-write (fault injection) when the VMM asks.
#[cfg(feature = "fault-injection")]
#[test]
fn get_vring_base_waits_for_the_requests_taken() {
    use vhost::vhost_user::Frontend;
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    let mut f = Fleece::new();
    f.add_device("vm", SIZE);
    let sock = f.root.join("vm.sock");
    let spec = format!("vm={}", sock.display());
    f.mount_env(
        &["--vhost-user-blk", &spec, "--cbw-buffer", "0"],
        &[("FLEECEFS_FAULT_CBW", "delay=3000")],
    )
    .expect_ok("fleecefs mount --vhost-user-blk");
    f.setup("t");

    // One queue of 8: descriptors at 0, available ring at 0x1000, used ring at 0x2000;
    // a write of 4 KiB at sector 0 (header, data, status).
    const QSIZE: u16 = 8;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;
    const HEADER: u64 = 0x3000;
    const DATA: u64 = 0x4000;
    const STATUS: u64 = 0x6000;
    let mem = SharedMemory::new(64 * 1024);
    let fe = Frontend::connect(&sock, 1).expect("connecting a vhost-user frontend");
    fe.set_owner().expect("SET_OWNER");
    let features = fe.get_features().expect("GET_FEATURES");
    fe.set_features(features & 1 << 32)
        .expect("SET_FEATURES (VERSION_1)");
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: mem.len as u64,
        userspace_addr: mem.va(0),
        mmap_offset: 0,
        mmap_handle: std::os::fd::AsRawFd::as_raw_fd(&mem.file),
    };
    fe.set_mem_table(&[region]).expect("SET_MEM_TABLE");
    fe.set_vring_num(0, QSIZE).expect("SET_VRING_NUM");
    let ring = VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags: 0,
        desc_table_addr: mem.va(0),
        used_ring_addr: mem.va(USED),
        avail_ring_addr: mem.va(AVAIL),
        log_addr: None,
    };
    fe.set_vring_addr(0, &ring).expect("SET_VRING_ADDR");
    fe.set_vring_base(0, 0).expect("SET_VRING_BASE");
    let call = EventFd::new(EFD_NONBLOCK).expect("an eventfd");
    fe.set_vring_call(0, &call).expect("SET_VRING_CALL");
    let kick = EventFd::new(EFD_NONBLOCK).expect("an eventfd");
    fe.set_vring_kick(0, &kick).expect("SET_VRING_KICK");

    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        d
    };
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    let mut table = desc(HEADER, 16, NEXT, 1);
    table.extend(desc(DATA, 4096, NEXT, 2));
    table.extend(desc(STATUS, 1, WRITE, 0));
    mem.write(0, &table);
    let mut header = 1u32.to_le_bytes().to_vec(); // VIRTIO_BLK_T_OUT
    header.extend_from_slice(&[0; 12]); // ioprio, sector 0
    mem.write(HEADER, &header);
    mem.write(DATA, &pattern(5, 4096));
    mem.write(STATUS, &[0xff]);
    mem.write(AVAIL + 4, &0u16.to_le_bytes()); // ring[0]: head 0
    mem.write(AVAIL + 2, &1u16.to_le_bytes()); // idx 1
    kick.write(1).expect("kicking");
    // The queue's thread takes the write, which then waits 3 s for its copy.
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let base = fe.get_vring_base(0).expect("GET_VRING_BASE");
    let (used, status) = (mem.read_u16(USED + 2), mem.read_u8(STATUS));
    assert_eq!(base, 1, "the write was not taken off the queue within 1 s");
    assert_eq!(
        used, 1,
        "GET_VRING_BASE answered while the write it counts as taken was not completed"
    );
    assert_eq!(status, 0, "the write's status");
    assert_bytes_eq(
        &read_range(&f.live("vm"), 0, 4096),
        &pattern(5, 4096),
        "live/vm after the write",
    );
}

/// What a VM writes or zeroes over the export is what `live/NAME` reads afterwards, also
/// through the kernel's page cache (`--live-cache`), which holds the pages an earlier
/// read left there (also one of an earlier worker): the export has the kernel drop the
/// ranges it changes.
#[test]
fn writes_of_the_vm_are_seen_through_the_page_cache_of_live_name() {
    let (f, sock) = exported(&["--live-cache"]);
    let old = read_range(&f.live("vm"), 0, 8192);
    assert_eq!(read_range(&f.live("vm"), 0, 8192), old, "a cached re-read");
    let data = pattern(9, 8192);
    assert_ne!(old, data);
    let mut c = Client::connect(&sock, 1, false);
    c.buf(0, 8192).copy_from_slice(&data);
    assert_eq!(c.write(0, 0, 0, 8192), 0);
    assert_bytes_eq(
        &read_range(&f.live("vm"), 0, 8192),
        &data,
        "live/vm after a write of the VM",
    );
    c.queues[0].write_zeroes(0, 4096, 0, ReqFlags::empty());
    assert_eq!(c.wait(0, 1)[0].1, 0, "write zeroes");
    let now = read_range(&f.live("vm"), 0, 8192);
    assert_all(&now[..4096], 0, "live/vm after the VM zeroed it");
    assert_bytes_eq(&now[4096..], &data[4096..], "live/vm past the zeroed range");
    drop(c);
    // The kernel keeps the pages across workers: the next one drops them too, although
    // nothing opened live/vm since it started.
    let pid = f.worker_pid();
    f.client("restart", &[]).expect_ok("fleecefs restart");
    wait_new_worker(&f, pid);
    let mut c = Client::connect(&sock, 1, false);
    let data = pattern(10, 8192);
    c.buf(0, 8192).copy_from_slice(&data);
    assert_eq!(c.write(0, 0, 0, 8192), 0);
    assert_bytes_eq(
        &read_range(&f.live("vm"), 0, 8192),
        &data,
        "live/vm after a write of the VM served by the next worker",
    );
}

/// A VMM that does not answer the configuration change a resize sends (it asked for
/// replies) holds up that resize, but nothing else: `status` answers meanwhile.
#[test]
fn a_vmm_that_does_not_answer_a_config_change_holds_up_only_the_resize() {
    use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
    use vhost::VhostBackend;

    let (f, sock) = exported(&[]);
    let mut fe = Frontend::connect(&sock, 1).expect("connecting a vhost-user frontend");
    fe.set_owner().expect("SET_OWNER");
    let features = fe.get_features().expect("GET_FEATURES");
    fe.set_features(features).expect("SET_FEATURES");
    fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    fe.set_protocol_features(
        VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::REPLY_ACK,
    )
    .expect("SET_PROTOCOL_FEATURES");
    // The VMM's end of the backend channel: never read, never answered.
    let (vmm_end, backend_end) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
    fe.set_backend_request_fd(&backend_end)
        .expect("SET_BACKEND_REQ_FD");
    drop(backend_end);
    wait_until("the VMM connected", || {
        f.status()["vhost_user_blk"][0]["connected"] == serde_json::json!(true)
    });
    let resize = {
        let args = [
            OsStr::new("resize").to_owned(),
            f.mp.as_os_str().to_owned(),
            OsStr::new("vm").to_owned(),
            OsStr::new("+1M").to_owned(),
        ];
        std::thread::spawn(move || fleecefs(args))
    };
    // The resize is done in the engine and waits for the VMM's answer.
    wait_until("the resize in the engine", || {
        fs::metadata(f.source("vm")).map(|m| m.len()).ok() == Some(SIZE + MIB)
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (tx, rx) = std::sync::mpsc::channel();
    let args = [
        OsStr::new("status").to_owned(),
        f.mp.as_os_str().to_owned(),
        OsStr::new("--json").to_owned(),
    ];
    std::thread::spawn(move || tx.send(fleecefs(args)));
    let status = rx.recv_timeout(std::time::Duration::from_secs(10));
    // The VMM goes away: the resize ends too.
    drop(vmm_end);
    drop(fe);
    resize
        .join()
        .expect("the resize's thread")
        .expect_ok("fleecefs resize");
    status
        .expect("status did not answer while a VMM held up a resize")
        .expect_ok("fleecefs status");
}

/// A worker that takes the mount over has the kernel drop the pages it holds of every
/// live file: the worker before may have changed data without telling the kernel (it
/// died between a VM's write and the notification, or was handing over). Shown with a
/// change made to the source behind the mount's back.
#[test]
fn a_worker_taking_over_drops_the_kernel_pages_of_live_files() {
    let (f, _sock) = exported(&["--live-cache"]);
    let old = read_range(&f.live("vm"), 0, 8192);
    let data = pattern(11, 8192);
    assert_ne!(old, data);
    std::os::unix::fs::FileExt::write_all_at(
        &fs::OpenOptions::new()
            .write(true)
            .open(f.source("vm"))
            .expect("the source"),
        &data,
        0,
    )
    .expect("writing the source");
    assert_eq!(read_range(&f.live("vm"), 0, 8192), old, "a cached re-read");
    let pid = f.worker_pid();
    kill(pid, libc::SIGKILL);
    wait_new_worker(&f, pid);
    wait_until("live/vm as the source holds it", || {
        read_range(&f.live("vm"), 0, 8192) == data
    });
}

/// A VM write whose page-cache notification waits for a read of live/NAME (the page it
/// drops is locked for that read) when a planned restart begins: the drain lets the
/// notification finish, the read being served, before it closes the gate, so the read is
/// not held there with the notification waiting for it (the old worker's thread would
/// sleep in the kernel for good, and the worker never exit).
#[test]
fn a_restart_lets_a_notification_waiting_for_a_read_finish_first() {
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, Instant};

    let hold = hold_path("write");
    let hold_s = hold.to_str().expect("utf-8 path").to_string();
    let (f, sock) = exported_env(
        &["--live-cache"],
        &[("FLEECEFS_FAULT_FUSE_READ_HOLD", hold_s.as_str())],
    );
    let mut c = Client::connect(&sock, 1, false);
    let live = fs::File::open(f.live("vm")).expect("opening live/vm");
    let data = pattern(12, 4096);
    fs::write(&hold, b"").expect("the hold file");
    // A page-cache read of the first page: the kernel locks the page and its FUSE read
    // waits (before the restart gate) while the hold file exists.
    let reader = std::thread::spawn(move || {
        let mut b = vec![0u8; 4096];
        live.read_exact_at(&mut b, 0).map(|()| b)
    });
    std::thread::sleep(Duration::from_millis(500));
    // The VM writes that page: the queue's thread waits in its notification for the
    // page the read holds locked.
    c.buf(0, 4096).copy_from_slice(&data);
    let p = c.ptr(0);
    c.queues[0].write(0, p, 4096, 0, ReqFlags::empty());
    c.queues[0]
        .do_io(&mut [], 0, None, None)
        .expect("submitting the write");
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    restart_releasing(&f, &hold);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "the restart waited for its drain's time limit"
    );
    let read = reader.join().expect("reader").expect("the held read");
    assert_bytes_eq(&read, &data, "the read the notification waited for");
    drop(c);
}

/// A resize drops the kernel's pages of live/NAME; when a read holds one of them locked as
/// a planned restart begins, the drain lets that notification finish (the read being
/// served) before it closes the gate.
#[test]
fn a_restart_lets_the_notification_of_a_resize_finish_first() {
    use std::os::unix::fs::FileExt;
    use std::sync::mpsc;
    use std::time::Duration;

    let hold = hold_path("resize");
    let hold_s = hold.to_str().expect("utf-8 path").to_string();
    let (f, _sock) = exported_env(
        &["--live-cache"],
        &[("FLEECEFS_FAULT_FUSE_READ_HOLD", hold_s.as_str())],
    );
    let live = fs::File::open(f.live("vm")).expect("opening live/vm");
    let before = read_range(&f.source("vm"), 0, 4096);
    fs::write(&hold, b"").expect("the hold file");
    // A page-cache read of the first page, held before the restart gate.
    let reader = std::thread::spawn(move || {
        let mut b = vec![0u8; 4096];
        live.read_exact_at(&mut b, 0).map(|()| b)
    });
    std::thread::sleep(Duration::from_millis(500));
    // The resize's notification waits for the page the read holds locked.
    let (resized_tx, resized_rx) = mpsc::channel();
    let args = [
        OsStr::new("resize").to_owned(),
        f.mp.as_os_str().to_owned(),
        OsStr::new("vm").to_owned(),
        OsStr::new("+1M").to_owned(),
    ];
    std::thread::spawn(move || resized_tx.send(fleecefs(args)));
    std::thread::sleep(Duration::from_millis(500));
    restart_releasing(&f, &hold);
    resized_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the resize's answer")
        .expect_ok("fleecefs resize");
    let read = reader.join().expect("reader").expect("the held read");
    assert_bytes_eq(&read, &before, "the read the notification waited for");
}

/// A path for a fault-injection file, unique to this test process and to `test` (the
/// tests of one process run at once).
fn hold_path(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fleecefs-read-hold-{}-{test}", std::process::id()))
}

/// Starts `fleecefs restart` of `f`'s mount, removes `hold` a second later (the restart
/// has begun: the held read goes on), and waits for the next worker to serve; aborts
/// the mount's FUSE connection (so the cleanup can unmount) and fails if it does not
/// within 40 s.
fn restart_releasing(f: &Fleece, hold: &Path) {
    use std::sync::mpsc;
    use std::time::Duration;
    let pid = f.worker_pid();
    let (tx, rx) = mpsc::channel();
    let mp = f.mp.clone();
    std::thread::spawn(move || tx.send(fleecefs([OsStr::new("restart"), mp.as_os_str()])));
    std::thread::sleep(Duration::from_secs(1));
    let _ = fs::remove_file(hold);
    let answered = rx.recv_timeout(Duration::from_secs(20));
    let ended = answered.is_ok()
        && wait_for(Duration::from_secs(20), || {
            let out = f.client("status", &["--json"]);
            out.code == 0 && json_u64(&parse_json(&out, "status"), "worker_pid") != pid as u64
        });
    if !ended {
        // The old worker cannot exit: free the mount for the cleanup.
        abort_fuse_connection(&f.mp);
        panic!("the restart did not hand over within 40 s");
    }
    answered
        .expect("the restart's answer")
        .expect_ok("fleecefs restart");
}

/// Polls `f` every 50 ms until it holds or `limit` passed; whether it held.
fn wait_for(limit: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

/// Aborts the FUSE connection mounted at `mp` (its requests fail, its waiters wake).
fn abort_fuse_connection(mp: &Path) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mp = mp.to_string_lossy();
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.get(4) == Some(&mp.as_ref()) {
            if let Some((_, minor)) = fields.get(2).and_then(|d| d.split_once(':')) {
                let _ = fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), "1");
            }
        }
    }
}

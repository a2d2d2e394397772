//! Guest first, on real mounts: snapshot reads served by the backup pool
//! (`--backup-priority low`) run on idle-priority threads and still return
//! the point-in-time bytes while live writers overwrite the same clusters.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;

const TARGET: &str = "backup";

/// A small deterministic generator (xorshift64*), so failures can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The daemon's threads named `backup-read-*`: (tid, scheduling policy, I/O priority).
fn backup_threads(pid: i32) -> Vec<(i32, i32, i64)> {
    let mut out = Vec::new();
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).expect("listing the daemon's threads");
    for t in tasks.flatten() {
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("backup-read-") {
            continue;
        }
        let tid: i32 = t.file_name().to_string_lossy().parse().expect("a tid");
        // SAFETY: plain syscalls on a thread id; failures return -1.
        let policy = unsafe { libc::sched_getscheduler(tid) };
        // SAFETY: ioprio_get(IOPRIO_WHO_PROCESS, tid).
        let ioprio = unsafe { libc::syscall(libc::SYS_ioprio_get, 1, tid) };
        out.push((tid, policy, ioprio));
    }
    out
}

/// Reads all of `path` with `pread`s of the sizes in `sizes` (cycling), starting at odd
/// offsets too, and compares every byte with `expected`.
fn check_snapshot(path: &Path, expected: &[u8], sizes: &[usize], what: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut buf = vec![0u8; *sizes.iter().max().unwrap_or(&1)];
    let mut pos = 0usize;
    let mut i = 0;
    while pos < expected.len() {
        let want = sizes[i % sizes.len()].min(expected.len() - pos);
        i += 1;
        let n = f
            .read_at(&mut buf[..want], pos as u64)
            .unwrap_or_else(|e| panic!("{what}: read of {want} at {pos}: {e}"));
        assert!(n > 0, "{what}: read of {want} at {pos} returned 0");
        assert_bytes_eq(
            &buf[..n],
            &expected[pos..pos + n],
            &format!("{what} at {pos}"),
        );
        pos += n;
    }
}

#[test]
fn backup_pool_reads_point_in_time_bytes_at_idle_priority_under_writers() {
    const SIZE: u64 = 32 * MIB;
    let mut f = Fleece::new();
    let image = f.add_device("vm", SIZE);
    let mut before = vec![0u8; SIZE as usize];
    Rng(0x5eed).fill(&mut before);
    fs::write(&image, &before).expect("writing the image");
    f.mount(&["--backup-priority", "low"])
        .expect_ok("fleecefs mount --backup-priority low");

    // --backup-priority low: the pool's threads are SCHED_IDLE with the
    // lowest best-effort I/O priority.
    let threads = backup_threads(f.worker_pid());
    assert_eq!(threads.len(), 4, "backup-read threads: {threads:?}");
    for &(tid, policy, ioprio) in &threads {
        assert_eq!(policy, libc::SCHED_IDLE, "thread {tid}");
        assert_eq!(
            ioprio,
            (2 << 13) | 7,
            "thread {tid}: not best-effort level 7"
        );
    }

    f.setup(TARGET);
    let live = f.live("vm");
    let snap = f.snapshot("vm");
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    // Writers overwrite random 4 KiB blocks and 64 KiB clusters with new bytes, so first
    // touches (copy-before-write) race with the readers all the time.
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (live, stop, written) = (live.clone(), stop.clone(), written.clone());
            std::thread::spawn(move || {
                let file = OpenOptions::new()
                    .write(true)
                    .open(&live)
                    .expect("opening live");
                let mut rng = Rng(0x1234 + w);
                let mut data = vec![0u8; 64 * KIB as usize];
                while !stop.load(Ordering::Relaxed) {
                    let len = if rng.next() % 4 == 0 {
                        64 * KIB
                    } else {
                        4 * KIB
                    };
                    let off = (rng.next() % (SIZE / len)) * len;
                    rng.fill(&mut data[..len as usize]);
                    file.write_all_at(&data[..len as usize], off)
                        .expect("live write");
                    written.fetch_add(len, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let before = Arc::new(before);
    let readers: Vec<_> = [
        vec![MIB as usize],
        vec![128 * 1024 + 4096, 3 * 4096 + 17, 1 << 20],
    ]
    .into_iter()
    .enumerate()
    .map(|(r, sizes)| {
        let (snap, before) = (snap.clone(), before.clone());
        std::thread::spawn(move || {
            for pass in 0..3 {
                check_snapshot(&snap, &before, &sizes, &format!("reader {r} pass {pass}"));
            }
        })
    })
    .collect();
    let reader_results: Vec<_> = readers.into_iter().map(|r| r.join()).collect();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("a writer panicked");
    }
    for r in reader_results {
        r.expect("a reader saw bytes that are not the point-in-time data");
    }
    assert!(
        written.load(Ordering::Relaxed) >= MIB,
        "the writers wrote only {} bytes while the snapshot was read",
        written.load(Ordering::Relaxed)
    );
    let access = f.access();
    assert!(
        json_u64(&access, "copied_bytes") > 0,
        "nothing was copied: {access}"
    );
    // After the writers: the whole snapshot once more, and the dirty map through the pool.
    check_snapshot(
        &snap,
        &before,
        &[MIB as usize],
        "snapshot after the writers",
    );
    let map = fs::read_to_string(f.dirty_map("vm")).expect("reading the dirty map");
    assert!(!map.is_empty(), "empty dirty map");
    f.teardown(TARGET);
    // A handle's reads after teardown stay ESTALE through the pool.
    f.setup(TARGET);
    let file = File::open(&snap).expect("opening the snapshot");
    f.teardown(TARGET);
    f.setup("other");
    let err = file
        .read_at(&mut [0u8; 4096], 0)
        .expect_err("read of an ended access");
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    f.teardown("other");
}

#[test]
fn backup_priority_normal_serves_snapshot_reads_on_the_workers() {
    const SIZE: u64 = 4 * MIB;
    let mut f = Fleece::new();
    let image = f.add_device("vm", SIZE);
    fill_pattern(&image, 0, SIZE, 0x42);
    f.mount(&["--backup-priority", "normal"])
        .expect_ok("fleecefs mount --backup-priority normal");
    assert!(
        backup_threads(f.worker_pid()).is_empty(),
        "a backup pool with normal"
    );
    f.setup(TARGET);
    fill_pattern(&f.live("vm"), MIB, 4096, 0x24);
    assert_all(&read_all(&f.snapshot("vm")), 0x42, "snapshot/vm");
    f.teardown(TARGET);

    let mut g = Fleece::new();
    g.add_device("vm", MIB);
    let out = g.mount(&["--backup-priority", "fast"]);
    out.expect_failure("--backup-priority fast", "--backup-priority");
    let out = g.mount(&["--backup-share", "30"]);
    out.expect_failure(
        "--backup-share without low",
        "--backup-share applies only with --backup-priority low",
    );
    let out = g.mount(&["--backup-priority", "low", "--backup-share", "0"]);
    out.expect_failure("--backup-share 0", "--backup-share");
    let out = g.mount(&["--backup-priority", "low", "--backup-share", "often"]);
    out.expect_failure("--backup-share often", "'auto' or a percentage");
}

/// Whether the daemon `pid` has a thread named `name`.
fn has_thread(pid: i32, name: &str) -> bool {
    fs::read_dir(format!("/proc/{pid}/task"))
        .expect("listing the daemon's threads")
        .flatten()
        .any(|t| {
            fs::read_to_string(t.path().join("comm"))
                .unwrap_or_default()
                .trim()
                == name
        })
}

/// `--backup-share 30` and `auto`: the pool runs at normal CPU priority (paced while the
/// guest is active; the pacing and the controller are unit-tested in src/sched/) and still
/// returns the point-in-time data while a guest writes; `auto` has its controller
/// thread.
#[test]
fn backup_share_runs_the_pool_at_normal_priority_with_exact_data() {
    for share in ["30", "auto"] {
        backup_share_with_exact_data(share);
    }
}

fn backup_share_with_exact_data(share: &str) {
    const SIZE: u64 = 8 * MIB;
    let mut f = Fleece::new();
    let image = f.add_device("vm", SIZE);
    fill_pattern(&image, 0, SIZE, 0x42);
    f.mount(&["--backup-priority", "low", "--backup-share", share])
        .expect_ok(&format!(
            "fleecefs mount --backup-priority low --backup-share {share}"
        ));
    let threads = backup_threads(f.worker_pid());
    assert_eq!(threads.len(), 4, "backup-read threads: {threads:?}");
    assert_eq!(
        has_thread(f.worker_pid(), "backup-pacer"),
        share == "auto",
        "the backup-pacer thread with --backup-share {share}"
    );
    for &(tid, policy, ioprio) in &threads {
        assert_eq!(policy, libc::SCHED_OTHER, "thread {tid}");
        assert_eq!(ioprio, (2 << 13) | 7, "thread {tid}");
    }
    f.setup(TARGET);
    let live = f.live("vm");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let file = OpenOptions::new().write(true).open(&live).expect("live");
            let mut rng = Rng(7);
            let data = vec![0x24u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                let off = (rng.next() % (SIZE / 4096)) * 4096;
                file.write_all_at(&data, off).expect("live write");
            }
        })
    };
    // The guest is active the whole time, so these reads are paced.
    let snap = read_all(&f.snapshot("vm"));
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    assert_all(
        &snap,
        0x42,
        &format!("snapshot/vm under a guest, --backup-share {share}"),
    );
    f.teardown(TARGET);
}

//! Keeper and worker on real mounts: the worker is killed (`kill -9`) or restarted
//! (`fleecefs restart`) many times while writers verify every write and a reader reads;
//! no writer or reader may see an error, and no acknowledged write may be lost.
//!
//! Run with `--nocapture` to see the measured pauses (docs/performance.md).

mod common;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

const DEVICE: u64 = 16 * MIB;
const WRITERS: u64 = 4;
const BLOCK: usize = 64 * 1024;
const REGION: u64 = DEVICE / WRITERS;

/// A small xorshift: random enough for offsets and sleeps, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a load thread saw.
#[derive(Default)]
struct Report {
    name: String,
    ops: u64,
    errors: Vec<String>,
    max_stall: Duration,
    /// Block offset -> the sequence number of the last acknowledged write there.
    acked: HashMap<u64, u64>,
    writer: u64,
    /// Writes that took 2 ms or more: (start, end).
    slow: Vec<(Instant, Instant)>,
}

/// The content of block `offset` after write `seq` of writer `w`.
fn block_content(w: u64, offset: u64, seq: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(32).enumerate() {
        let tag = format!("w{w} o{offset:010} s{seq:08} {i:05}");
        let n = chunk.len().min(tag.len());
        chunk[..n].copy_from_slice(&tag.as_bytes()[..n]);
    }
}

fn fsync(fd: &std::os::fd::OwnedFd) -> Result<(), String> {
    // SAFETY: fsync on an open fd.
    if unsafe { libc::fsync(fd.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(errno_name(errno()))
    }
}

/// A writer of whole blocks in its own region of the live file: O_DIRECT, or buffered
/// with fsync after each write. It reads blocks back now and then and checks them.
fn writer(path: PathBuf, w: u64, direct: bool, stop: Arc<AtomicBool>) -> JoinHandle<Report> {
    std::thread::spawn(move || {
        let mut r = Report {
            name: format!(
                "writer {w} ({})",
                if direct { "O_DIRECT" } else { "buffered+fsync" }
            ),
            writer: w,
            ..Report::default()
        };
        let flags = libc::O_RDWR | if direct { libc::O_DIRECT } else { 0 };
        let fd = open_ok(&path, flags);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (w + 1));
        let mut buf = AlignedBuf::new(BLOCK, 4096);
        let mut seq = 0;
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            let offset = w * REGION + rng.below(REGION / BLOCK as u64) * BLOCK as u64;
            block_content(w, offset, seq, buf.as_mut_slice());
            let t = Instant::now();
            let res = pwrite(&fd, offset, buf.as_slice())
                .map_err(errno_name)
                .and_then(|n| {
                    if n == BLOCK {
                        Ok(())
                    } else {
                        Err(format!("short write {n}"))
                    }
                })
                .and_then(|_| if direct { Ok(()) } else { fsync(&fd) });
            r.max_stall = r.max_stall.max(t.elapsed());
            if t.elapsed() >= Duration::from_millis(2) {
                r.slow.push((t, Instant::now()));
            }
            r.ops += 1;
            match res {
                Ok(()) => {
                    r.acked.insert(offset, seq);
                }
                Err(e) => r.errors.push(format!("write at {offset}: {e}")),
            }
            // Read one acknowledged block back through the mount.
            if seq % 4 == 0 {
                let (&o, &s) = r.acked.iter().next().expect("one write was acknowledged");
                let mut want = vec![0u8; BLOCK];
                block_content(w, o, s, &mut want);
                let t = Instant::now();
                match pread_into(&fd, o, buf.as_mut_slice()) {
                    Ok(n) if n == BLOCK && buf.as_slice() == &want[..] => {}
                    Ok(n) => r
                        .errors
                        .push(format!("read back at {o}: {n} bytes, not write {s}")),
                    Err(e) => r
                        .errors
                        .push(format!("read back at {o}: {}", errno_name(e))),
                }
                r.max_stall = r.max_stall.max(t.elapsed());
            }
        }
        r
    })
}

/// A reader of the whole live file.
fn reader(path: PathBuf, stop: Arc<AtomicBool>) -> JoinHandle<Report> {
    std::thread::spawn(move || {
        let mut r = Report {
            name: "reader".into(),
            ..Report::default()
        };
        let fd = open_ok(&path, libc::O_RDONLY);
        let mut rng = Rng(7);
        let mut buf = vec![0u8; 128 * 1024];
        while !stop.load(Ordering::Relaxed) {
            let offset = rng.below(DEVICE / 4096) * 4096;
            let want = buf.len().min((DEVICE - offset) as usize);
            let t = Instant::now();
            match pread_into(&fd, offset, &mut buf[..want]) {
                Ok(n) if n == want => {}
                Ok(n) => r
                    .errors
                    .push(format!("read at {offset}: {n} of {want} bytes")),
                Err(e) => r
                    .errors
                    .push(format!("read at {offset}: {}", errno_name(e))),
            }
            r.max_stall = r.max_stall.max(t.elapsed());
            r.ops += 1;
        }
        r
    })
}

struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Report>>,
}

impl Load {
    fn start(live: &Path) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads: Vec<_> = (0..WRITERS)
            .map(|w| writer(live.to_path_buf(), w, w % 2 == 0, stop.clone()))
            .collect();
        threads.push(reader(live.to_path_buf(), stop.clone()));
        // Everybody is under way before the first kill.
        std::thread::sleep(Duration::from_millis(200));
        Load { stop, threads }
    }

    /// Stops the load, checks no thread saw an error, and checks every acknowledged
    /// write in the source image. Returns the longest stall and, per event (a kill or a
    /// restart at that instant), the longest time a writer waited past it.
    fn finish(self, source: &Path, events: &[Instant]) -> (Duration, Vec<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        let reports: Vec<Report> = self
            .threads
            .into_iter()
            .map(|t| t.join().expect("a load thread panicked"))
            .collect();
        let image = std::fs::read(source).expect("reading the source image");
        let mut longest = Duration::ZERO;
        let mut checked = 0;
        for r in &reports {
            eprintln!(
                "{}: {} ops, {} errors, longest stall {} ms",
                r.name,
                r.ops,
                r.errors.len(),
                r.max_stall.as_millis()
            );
            assert!(
                r.errors.is_empty(),
                "{}: {:?}",
                r.name,
                &r.errors[..r.errors.len().min(5)]
            );
            assert!(r.ops > 0, "{} did nothing", r.name);
            longest = longest.max(r.max_stall);
            let mut want = vec![0u8; BLOCK];
            for (&o, &s) in &r.acked {
                block_content(r.writer, o, s, &mut want);
                assert!(
                    image[o as usize..o as usize + BLOCK] == want[..],
                    "{}: acknowledged write {s} at {o} is not in the source",
                    r.name
                );
                checked += 1;
            }
        }
        eprintln!(
            "{checked} acknowledged blocks verified in the source; longest stall {} ms",
            longest.as_millis()
        );
        let pauses = events
            .iter()
            .map(|&e| {
                reports
                    .iter()
                    .flat_map(|r| &r.slow)
                    .filter(|(start, end)| *start <= e && e <= *end)
                    .map(|(_, end)| end.duration_since(e).as_millis() as u64)
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        (longest, pauses)
    }
}

fn worker_pid(f: &Fleece) -> i32 {
    json_u64(&f.status(), "worker_pid") as i32
}

/// Polls `status` until the worker has restarted `n` times in all; returns the status.
fn wait_restarts(f: &Fleece, n: u64) -> serde_json::Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let out = f.client("status", &["--json"]);
        if out.code == 0 {
            let v = parse_json(&out, "status --json");
            if v["worker_restarts"].as_u64() == Some(n) && v["last_restart"]["pause_ms"].is_u64() {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no worker restart {n} within {TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn median_max(v: &mut [u64]) -> (u64, u64) {
    v.sort_unstable();
    (v[v.len() / 2], v[v.len() - 1])
}

/// 50 `kill -9` of the worker at random moments under load: no error, no lost write,
/// every recovery under 1 s; same inode numbers and file handles throughout.
#[test]
fn worker_kill_9_under_load() {
    let f = Fleece::mounted(&[("d", DEVICE)]);
    let live = f.live("d");
    let ino = std::fs::metadata(&live).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let load = Load::start(&live);
    let mut rng = Rng(42);
    let mut pauses = Vec::new();
    let mut events = Vec::new();
    for k in 1..=50u64 {
        std::thread::sleep(Duration::from_millis(20 + rng.below(150)));
        let pid = worker_pid(&f);
        events.push(Instant::now());
        kill(pid, libc::SIGKILL);
        let v = wait_restarts(&f, k);
        assert_ne!(json_u64(&v, "worker_pid") as i32, pid);
        let last = &v["last_restart"];
        assert!(
            last["reason"]
                .as_str()
                .is_some_and(|r| r.contains("killed by signal 9")),
            "{last}"
        );
        let pause = json_u64(last, "pause_ms");
        assert!(pause < 1000, "recovery {k} took {pause} ms");
        pauses.push(pause);
    }
    let (stall, mut writer_pauses) = load.finish(&f.source("d"), &events);
    let (wmedian, wmax) = median_max(&mut writer_pauses);
    let (median, max) = median_max(&mut pauses);
    eprintln!(
        "50 worker kills: recovery (death to serving) median {median} ms, max {max} ms; writer pause per kill median {wmedian} ms, max {wmax} ms; longest writer stall {} ms",
        stall.as_millis()
    );
    let v = f.status();
    assert_eq!(json_u64(&v, "worker_restarts"), 50);
    assert_eq!(
        std::fs::metadata(&live)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .ok(),
        ino.ok(),
        "the inode number changed"
    );
}

/// 20 `fleecefs restart` under load: no error, no lost write; each prints its pause.
#[test]
fn planned_restarts_under_load() {
    let f = Fleece::mounted(&[("d", DEVICE)]);
    let live = f.live("d");
    let load = Load::start(&live);
    let mut pauses = Vec::new();
    let mut events = Vec::new();
    for k in 1..=20u64 {
        let before = worker_pid(&f);
        events.push(Instant::now());
        let out = f.client("restart", &[]).expect_ok("fleecefs restart");
        let pause: u64 = out
            .stdout
            .split("writers paused ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("restart printed no pause: {}", out.stdout));
        pauses.push(pause);
        let v = f.status();
        assert_eq!(json_u64(&v, "worker_restarts"), k);
        assert_ne!(json_u64(&v, "worker_pid") as i32, before);
        assert!(v["last_restart"]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("planned restart")));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (stall, mut writer_pauses) = load.finish(&f.source("d"), &events);
    let (wmedian, wmax) = median_max(&mut writer_pauses);
    let (median, max) = median_max(&mut pauses);
    eprintln!(
        "20 planned restarts: pause printed by restart median {median} ms, max {max} ms; writer pause per restart median {wmedian} ms, max {wmax} ms; longest writer stall {} ms",
        stall.as_millis()
    );
    // A clean handover closes the bitmaps cleanly: no crash recovery in the log.
    let log = std::fs::read_to_string(f.state.join("fleecefs.log")).unwrap_or_default();
    assert!(
        !log.contains("unclean"),
        "a planned restart looked like a crash: {log}"
    );
}

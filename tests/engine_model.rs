//! The copy-before-write engine against a reference model (mountpoint-s3 reftests style):
//! a byte vector per device for the live image, plus the frozen copy taken at setup and
//! the set of discarded clusters. No FUSE: the engine is driven directly.
//!
//! Fixed seeds run every time, plus one random seed that is printed, so a failure can be
//! replayed with `FLEECEFS_SEED=<seed>`. The single-threaded model also runs sequences
//! of [`Op`]s from proptest strategies, so that a failing sequence shrinks to a short one.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;

use fleecefs::bitmap_file::CrashSafety;
use fleecefs::engine::{BitmapAction, Engine};
use fleecefs::error::Kind;
use fleecefs::source::BackupRead;
use fleecefs::units::ClusterSize;
use proptest::prelude::*;

mod support;
use support::EngineBuilder;

/// SplitMix64: small, seedable, good enough to drive random operations.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("FLEECEFS_SEED") {
        return vec![s.parse().expect("FLEECEFS_SEED must be a number")];
    }
    let random = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("random seed: {random} (replay with FLEECEFS_SEED={random})");
    vec![1, 2, 3, 0xdead_beef, random]
}

fn make_engine(
    dir: &Path,
    sizes: &[u64],
    cluster: u64,
    initial: &mut Rng,
) -> (Engine, Vec<Vec<u8>>) {
    make_engine_with(
        dir,
        sizes,
        cluster,
        initial,
        CopyMode::Behind,
        BackupRead::Cached,
    )
}

/// `--backup-read` by seed: direct for half of them (by seed / 3, so that both read modes
/// meet every [`CopyMode`]).
fn backup_read_of_seed(seed: u64) -> BackupRead {
    if (seed / 3) % 2 == 0 {
        BackupRead::Cached
    } else {
        BackupRead::Direct
    }
}

/// With `--backup-read direct`, the run must have read some of the snapshot with
/// `O_DIRECT` (else it did not test that path); with `cached`, none of it.
fn assert_direct_reads(engine: &Engine, read: BackupRead, name: &str) {
    let direct: u64 = engine
        .devices()
        .iter()
        .map(|d| d.source().direct_read_bytes())
        .sum();
    match read {
        BackupRead::Direct => assert!(direct > 0, "{name}: no snapshot read was direct"),
        BackupRead::Cached => assert_eq!(direct, 0, "{name}: a cached engine read direct"),
    }
}

/// A zeroed buffer of `len` bytes at a page-aligned address, as the daemon's read
/// buffers are, so that aligned snapshot reads take the direct path of
/// `--backup-read direct`.
fn aligned_buf(len: usize) -> memmap2::MmapMut {
    memmap2::MmapMut::map_anon(len).expect("mapping a read buffer")
}

/// How copy-before-write stores old data.
#[derive(Clone, Copy, Debug)]
enum CopyMode {
    /// In memory first, stored by flusher threads (the daemon's default); the buffer
    /// is kept small (128 KiB) so writers also wait for room in it.
    Behind,
    /// Synchronously on the copy pool (a timeout, no write-behind buffer).
    Pool,
    /// Synchronously in the writer's thread.
    Inline,
}

impl CopyMode {
    /// Each seed picks a mode, so that the fixed seeds 1, 2, 3 cover all three.
    fn of_seed(seed: u64) -> CopyMode {
        [CopyMode::Behind, CopyMode::Pool, CopyMode::Inline][(seed % 3) as usize]
    }
}

/// As [`make_engine`], with copies stored as `mode` says.
fn make_engine_with(
    dir: &Path,
    sizes: &[u64],
    cluster: u64,
    initial: &mut Rng,
    mode: CopyMode,
    read: BackupRead,
) -> (Engine, Vec<Vec<u8>>) {
    let mut builder = EngineBuilder::new(dir).cluster(cluster);
    let mut models = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let mut data = vec![0u8; size as usize];
        initial.fill(&mut data);
        builder = builder.device(&format!("d{i}"), data.clone());
        models.push(data);
    }
    let (cbw_timeout, cbw_buffer) = match mode {
        CopyMode::Behind => (Some(std::time::Duration::from_secs(60)), 128 << 10),
        CopyMode::Pool => (Some(std::time::Duration::from_secs(60)), 0),
        CopyMode::Inline => (None, 0),
    };
    let engine = builder
        .backup_read(read)
        .cbw_timeout(cbw_timeout)
        .cbw_buffer(cbw_buffer)
        .build();
    (engine, models)
}

/// What a snapshot read must return according to the model.
fn expected_snapshot_read(
    frozen: &[u8],
    discarded: &HashSet<u64>,
    cluster: u64,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, Kind> {
    let size = frozen.len() as u64;
    if offset >= size || len == 0 {
        return Ok(Vec::new());
    }
    let end = size.min(offset + len as u64);
    if discarded.contains(&(offset / cluster)) {
        return Err(Kind::Inaccessible);
    }
    let mut stop = offset;
    while stop < end && !discarded.contains(&(stop / cluster)) {
        stop = ((stop / cluster + 1) * cluster).min(end);
    }
    Ok(frozen[offset as usize..stop as usize].to_vec())
}

struct Access {
    id: u64,
    target: String,
    devices: Vec<usize>,
    frozen: Vec<Vec<u8>>,
    discarded: Vec<HashSet<u64>>,
}

/// One operation of the single-threaded model test. Its numbers are raw: the runner maps
/// them onto the device (offsets modulo its size, lengths modulo a few clusters), so
/// every value is valid and a failing sequence shrinks towards fewer operations and
/// smaller numbers.
#[derive(Clone, Debug)]
enum Op {
    /// A live write, often unaligned and odd-length, of bytes drawn from `fill`.
    Write {
        dev: usize,
        off: u64,
        len: u64,
        fill: u64,
    },
    /// A live write that ends past the end of the device: refused, nothing changes.
    WritePastEnd { dev: usize, back: u64 },
    /// Punch hole or zero range on the live image.
    Fallocate {
        dev: usize,
        off: u64,
        len: u64,
        punch: bool,
    },
    /// A live read, checked against the model.
    ReadLive { dev: usize, off: u64, len: u64 },
    /// A snapshot read (past the end too; cluster-aligned if `aligned`), checked against
    /// the frozen model: the data, where it stops, EACCES, ESTALE.
    ReadSnapshot {
        dev: usize,
        off: u64,
        len: u64,
        aligned: bool,
    },
    /// A discard of the snapshot.
    Discard { dev: usize, off: u64, len: u64 },
    /// Teardown (with `success`) when an access is active, else a setup on the devices
    /// of `mask` (bit i: device i; none: the last one).
    SetupOrTeardown { mask: u8, success: bool },
    /// While an access is active: a second setup is refused naming the active target,
    /// and a teardown of another target is not found.
    Refused,
    /// `fleecefs resize`: grow by `1 + by % (3 clusters)` (always during an access of
    /// the device), or shrink (`--allow-shrink`) by up to half when `shrink` and no
    /// access includes it. The snapshot keeps its size and content.
    Resize { dev: usize, by: u64, shrink: bool },
}

impl Op {
    /// An operation drawn from `rng`, in the proportions of [`op_strategy`].
    fn random(rng: &mut Rng) -> Op {
        let dev = rng.next() as usize;
        let (off, len) = (rng.next(), rng.next());
        match rng.below(100) {
            0..=39 => Op::Write {
                dev,
                off,
                len,
                fill: rng.next(),
            },
            40..=44 => Op::WritePastEnd { dev, back: off },
            45..=49 => Op::Fallocate {
                dev,
                off,
                len,
                punch: rng.below(2) == 0,
            },
            50..=59 => Op::ReadLive { dev, off, len },
            60..=79 => Op::ReadSnapshot {
                dev,
                off,
                len,
                aligned: rng.below(8) == 0,
            },
            80..=87 => Op::Discard { dev, off, len },
            88..=93 => Op::SetupOrTeardown {
                mask: rng.next() as u8,
                success: rng.below(2) == 0,
            },
            94..=95 => Op::Resize {
                dev,
                by: off,
                shrink: rng.below(2) == 0,
            },
            _ => Op::Refused,
        }
    }
}

/// Operations in the proportions of the seeded runs (writes and snapshot reads most).
fn op_strategy() -> impl Strategy<Value = Op> {
    // Offsets and lengths in ranges that cover every device and a few clusters, so that
    // they shrink towards 0 (the runner still maps them onto the device).
    let n = || 0u64..(1 << 24);
    let dev = || 0usize..4;
    prop_oneof![
        40 => (dev(), n(), n(), any::<u64>()).prop_map(|(dev, off, len, fill)| Op::Write { dev, off, len, fill }),
        5 => (dev(), 0u64..16).prop_map(|(dev, back)| Op::WritePastEnd { dev, back }),
        5 => (dev(), n(), n(), any::<bool>())
            .prop_map(|(dev, off, len, punch)| Op::Fallocate { dev, off, len, punch }),
        10 => (dev(), n(), n()).prop_map(|(dev, off, len)| Op::ReadLive { dev, off, len }),
        20 => (dev(), n(), n(), any::<bool>())
            .prop_map(|(dev, off, len, aligned)| Op::ReadSnapshot { dev, off, len, aligned }),
        8 => (dev(), n(), n()).prop_map(|(dev, off, len)| Op::Discard { dev, off, len }),
        6 => (any::<u8>(), any::<bool>())
            .prop_map(|(mask, success)| Op::SetupOrTeardown { mask, success }),
        6 => Just(Op::Refused),
        2 => (dev(), n(), any::<bool>()).prop_map(|(dev, by, shrink)| Op::Resize { dev, by, shrink }),
    ]
}

fn copy_mode_strategy() -> impl Strategy<Value = CopyMode> {
    prop_oneof![
        Just(CopyMode::Behind),
        Just(CopyMode::Pool),
        Just(CopyMode::Inline)
    ]
}

#[test]
fn random_operations_match_the_model() {
    for seed in seeds() {
        let mut rng = Rng(seed);
        let cluster = [4096u64, 8192, 65536][rng.below(3) as usize];
        let mode = CopyMode::of_seed(seed);
        let ops: Vec<Op> = (0..4000).map(|_| Op::random(&mut rng)).collect();
        let read = backup_read_of_seed(seed);
        run_ops(&format!("seed {seed}"), cluster, mode, read, seed, &ops);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// The same model as [`random_operations_match_the_model`], with sequences from
    /// proptest strategies: a failing sequence shrinks to a short one that still fails.
    #[test]
    fn operation_sequences_match_the_model(
        cluster in prop_oneof![Just(4096u64), Just(8192), Just(65536)],
        mode in copy_mode_strategy(),
        direct in any::<bool>(),
        image in any::<u64>(),
        ops in proptest::collection::vec(op_strategy(), 1..150),
    ) {
        let read = if direct { BackupRead::Direct } else { BackupRead::Cached };
        run_ops("proptest", cluster, mode, read, image, &ops);
    }
}

/// Runs `ops` on a fresh engine of two devices (one with a partial last cluster, one
/// cluster-aligned) filled from `image_seed`, checking every result against the model;
/// at the end the source files must hold exactly the live model.
fn run_ops(
    name: &str,
    cluster: u64,
    mode: CopyMode,
    read: BackupRead,
    image_seed: u64,
    ops: &[Op],
) {
    let mut rng = Rng(image_seed);
    let dir = tempfile::tempdir().unwrap();
    let mut sizes = vec![cluster * 37 + 1234, cluster * 16];
    let initial_sizes = sizes.clone();
    let (engine, mut live) = make_engine_with(dir.path(), &sizes, cluster, &mut rng, mode, read);
    let mut access: Option<Access> = None;
    let mut buf = aligned_buf((cluster * 4) as usize);
    for (step, op) in ops.iter().enumerate() {
        let ctx = format!("{name} ({mode:?}, {read:?}) step {step} cluster {cluster}: {op:?}");
        match *op {
            Op::Write {
                dev,
                off,
                len,
                fill,
            } => {
                let (d, size) = (dev % sizes.len(), sizes[dev % sizes.len()]);
                let len = (1 + len % (cluster * 3)).min(size) as usize;
                let off = off % (size - len as u64 + 1);
                let mut data = vec![0u8; len];
                Rng(fill).fill(&mut data);
                let n = engine.devices()[d].write_live(off, &data).expect(&ctx);
                assert_eq!(n, len, "{ctx}");
                live[d][off as usize..off as usize + len].copy_from_slice(&data);
            }
            Op::WritePastEnd { dev, back } => {
                // a write crossing the end is cut there (short count); one at or past
                // the end fails and changes nothing
                let (d, size) = (dev % sizes.len(), sizes[dev % sizes.len()]);
                let fits = back % 10;
                let off = size - fits;
                let r = engine.devices()[d].write_live(off, &[1u8; 11]);
                if fits == 0 {
                    assert_eq!(r.unwrap_err().kind(), Kind::PastEnd, "{ctx}");
                } else {
                    assert_eq!(r.expect(&ctx), fits as usize, "{ctx}");
                    live[d][off as usize..].fill(1);
                }
            }
            Op::Fallocate {
                dev,
                off,
                len,
                punch,
            } => {
                let (d, size) = (dev % sizes.len(), sizes[dev % sizes.len()]);
                let off = off % size;
                let len = (1 + len % (cluster * 2)).min(size - off);
                let mode = if punch {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                engine.devices()[d]
                    .fallocate_live(mode, off, len)
                    .expect(&ctx);
                live[d][off as usize..(off + len) as usize].fill(0);
            }
            Op::ReadLive { dev, off, len } => {
                let (d, size) = (dev % sizes.len(), sizes[dev % sizes.len()]);
                let len = 1 + (len % buf.len() as u64) as usize;
                let off = off % size;
                let n = engine.devices()[d]
                    .read_live(off, &mut buf[..len])
                    .expect(&ctx);
                let end = (off as usize + len).min(size as usize);
                assert_eq!(n, end - off as usize, "{ctx}");
                assert!(
                    buf[..n] == live[d][off as usize..end],
                    "{ctx}: live read differs"
                );
            }
            Op::ReadSnapshot {
                dev,
                off,
                len,
                aligned,
            } => {
                let (d, size) = (dev % sizes.len(), sizes[dev % sizes.len()]);
                let Some(a) = &access else { continue };
                let Some(slot) = a.devices.iter().position(|&x| x == d) else {
                    let err = engine.devices()[d]
                        .read_snapshot(a.id, 0, &mut buf[..1])
                        .unwrap_err();
                    assert_eq!(err.kind(), Kind::Stale, "{ctx}");
                    continue;
                };
                let (off, len) = if aligned {
                    // whole pages at a cluster: what a direct read takes
                    let pages = buf.len() as u64 / 4096;
                    (
                        off % (size / cluster + 1) * cluster,
                        ((1 + len % pages) * 4096) as usize,
                    )
                } else {
                    (off % (size + 10), 1 + (len % buf.len() as u64) as usize)
                };
                let got = engine.devices()[d].read_snapshot(a.id, off, &mut buf[..len]);
                let want =
                    expected_snapshot_read(&a.frozen[slot], &a.discarded[slot], cluster, off, len);
                match (got, want) {
                    (Ok(n), Ok(w)) => {
                        assert_eq!(n, w.len(), "{ctx}: snapshot read length at {off}+{len}");
                        assert!(
                            buf[..n] == w[..],
                            "{ctx}: snapshot data differs at {off}+{len}"
                        );
                    }
                    (Err(e), Err(k)) => assert_eq!(e.kind(), k, "{ctx}"),
                    (g, w) => panic!(
                        "{ctx}: got {:?}, expected {:?}",
                        g.map_err(|e| e.to_string()),
                        w.map(|v| v.len())
                    ),
                }
            }
            Op::Discard { dev, off, len } => {
                let (d, size) = (dev % sizes.len(), sizes[dev % sizes.len()]);
                let Some(a) = &mut access else { continue };
                let Some(slot) = a.devices.iter().position(|&x| x == d) else {
                    continue;
                };
                let len = len % (cluster * 5);
                let off = off % size;
                engine.devices()[d]
                    .discard_snapshot(a.id, off, len)
                    .expect(&ctx);
                let cs = ClusterSize::new(cluster).unwrap();
                // the snapshot keeps the size of setup when the device grows
                let snap_size = a.frozen[slot].len() as u64;
                for c in cs.inward(off, len, snap_size) {
                    a.discarded[slot].insert(c);
                }
            }
            Op::SetupOrTeardown { mask, success } => {
                if let Some(a) = access.take() {
                    engine.teardown(&a.target, success).expect(&ctx);
                    for &d in &a.devices {
                        let err = engine.devices()[d]
                            .read_snapshot(a.id, 0, &mut buf[..1])
                            .unwrap_err();
                        assert_eq!(err.kind(), Kind::Stale, "{ctx}");
                    }
                    let left: Vec<_> = std::fs::read_dir(dir.path().join("fleece"))
                        .unwrap()
                        .collect();
                    assert!(left.is_empty(), "{ctx}: fleecing files left after teardown");
                } else {
                    let mut names = Vec::new();
                    let mut devs = Vec::new();
                    for (i, dev) in engine.devices().iter().enumerate() {
                        if mask & (1 << i) != 0 || (i == sizes.len() - 1 && devs.is_empty()) {
                            names.push(dev.name().to_string());
                            devs.push(i);
                        }
                    }
                    let target = format!("t{step}");
                    let report = engine.setup(&target, Some(&names), None).expect(&ctx);
                    assert_eq!(report.devices.len(), devs.len());
                    for (r, &d) in report.devices.iter().zip(&devs) {
                        assert_eq!(r.dirty_bytes, sizes[d], "{ctx}");
                        assert_eq!(r.bitmap_action, BitmapAction::NotUsed);
                    }
                    let (id, _) = engine.active().unwrap();
                    access = Some(Access {
                        id,
                        target,
                        frozen: devs.iter().map(|&d| live[d].clone()).collect(),
                        discarded: devs.iter().map(|_| HashSet::new()).collect(),
                        devices: devs,
                    });
                }
            }
            Op::Resize { dev, by, shrink } => {
                let (d, size) = (dev % sizes.len(), sizes[dev % sizes.len()]);
                let in_access = access.as_ref().is_some_and(|a| a.devices.contains(&d));
                let new = if in_access || !shrink || size < initial_sizes[d] {
                    size + 1 + by % (cluster * 3)
                } else {
                    (size - by % (size / 2 + 1)).max(1)
                };
                let want = fleecefs::engine::SizeRequest::Absolute(new);
                let r = engine.resize(&format!("d{d}"), want, true).expect(&ctx);
                assert_eq!((r.old_size, r.new_size), (size, new), "{ctx}");
                live[d].resize(new as usize, 0);
                sizes[d] = new;
                assert_eq!(engine.devices()[d].size(), new, "{ctx}");
            }
            Op::Refused => {
                if let Some(a) = &access {
                    let err = engine.setup("other", None, None).unwrap_err();
                    assert_eq!(err.kind(), Kind::Busy, "{ctx}");
                    assert!(err.to_string().contains(&a.target), "{ctx}");
                    let err = engine.teardown("nobody", true).unwrap_err();
                    assert_eq!(err.kind(), Kind::NotFound, "{ctx}");
                }
            }
        }
    }
    if name.starts_with("seed") {
        assert_direct_reads(&engine, read, name);
    }
    // The source files hold exactly the live model.
    for (d, size) in sizes.iter().enumerate() {
        let on_disk = std::fs::read(EngineBuilder::image(dir.path(), &format!("d{d}"))).unwrap();
        assert_eq!(on_disk.len() as u64, *size);
        assert!(
            on_disk == live[d],
            "{name}: source {d} differs from the model"
        );
    }
}

/// Several writers share every cluster (each owns interleaved 512-byte sectors, so the
/// model stays exact), readers verify the snapshot continuously, a discarder punches
/// random ranges, and the main thread cycles setup/teardown.
#[test]
fn concurrent_writers_readers_and_discards_match_the_model() {
    for seed in seeds() {
        run_threaded(seed);
    }
}

const SECTOR: u64 = 512;
const WRITERS: u64 = 4;

type Current = (u64, Arc<Vec<Vec<u8>>>, Arc<Mutex<Vec<HashSet<u64>>>>);

struct Shared {
    engine: Engine,
    /// Writers hold this shared per write; setup takes it exclusively so the model
    /// knows the exact frozen image.
    quiesce: RwLock<()>,
    live: Vec<Mutex<Vec<u8>>>,
    /// The current access: id, frozen images, and the clusters whose discard has
    /// started (per device). Readers keep their own clone for the access they read.
    current: RwLock<Option<Current>>,
    stop: AtomicBool,
    snapshot_reads: AtomicU64,
}

fn run_threaded(seed: u64) {
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let cluster = 4096u64;
    let sizes = [cluster * 64 + 700, cluster * 32];
    let mode = CopyMode::of_seed(seed);
    let read = backup_read_of_seed(seed);
    let (engine, live) = make_engine_with(dir.path(), &sizes, cluster, &mut rng, mode, read);
    let shared = Arc::new(Shared {
        engine,
        quiesce: RwLock::new(()),
        live: live.into_iter().map(Mutex::new).collect(),
        current: RwLock::new(None),
        stop: AtomicBool::new(false),
        snapshot_reads: AtomicU64::new(0),
    });
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let s = shared.clone();
        let mut r = Rng(seed ^ ((w + 1) * 0x1234_5678));
        handles.push(thread::spawn(move || {
            let mut ops = 0u64;
            while !s.stop.load(Ordering::Relaxed) {
                let d = r.below(sizes.len() as u64) as usize;
                let size = sizes[d];
                // a sector this writer owns
                let nsec = size.div_ceil(SECTOR);
                let mut sec = r.below(nsec);
                sec -= sec % WRITERS;
                sec += w;
                if sec >= nsec {
                    continue;
                }
                let start = sec * SECTOR;
                let end = (start + SECTOR).min(size);
                let off = start + r.below(end - start);
                let len = 1 + r.below(end - off);
                let mut data = vec![0u8; len as usize];
                r.fill(&mut data);
                let _q = s.quiesce.read().unwrap();
                s.engine.devices()[d].write_live(off, &data).unwrap();
                s.live[d].lock().unwrap()[off as usize..(off + len) as usize]
                    .copy_from_slice(&data);
                ops += 1;
            }
            ops
        }));
    }
    for rd in 0..2u64 {
        let s = shared.clone();
        let mut r = Rng(seed ^ ((rd + 100) * 0x9999));
        handles.push(thread::spawn(move || {
            let mut buf = aligned_buf((cluster * 8) as usize);
            let mut ops = 0;
            while !s.stop.load(Ordering::Relaxed) {
                let Some((id, frozen, discard_started)) = s.current.read().unwrap().clone() else {
                    thread::yield_now();
                    continue;
                };
                let d = r.below(sizes.len() as u64) as usize;
                let size = sizes[d];
                // half of the reads in whole pages (direct reads with --backup-read direct)
                let (off, len) = if r.below(2) == 0 {
                    let pages = buf.len() as u64 / 4096;
                    (r.below(size) / 4096 * 4096, (1 + r.below(pages)) as usize * 4096)
                } else {
                    (r.below(size), 1 + r.below(buf.len() as u64) as usize)
                };
                match s.engine.devices()[d].read_snapshot(id, off, &mut buf[..len]) {
                    Ok(n) => {
                        let end = (off + len as u64).min(size);
                        assert!(n > 0, "seed {seed}: empty snapshot read");
                        assert!(
                            buf[..n] == frozen[d][off as usize..off as usize + n],
                            "seed {seed}: snapshot of d{d} at {off}+{n} is not the point-in-time data"
                        );
                        if off + (n as u64) < end {
                            let next = (off + n as u64) / cluster;
                            assert!(
                                discard_started.lock().unwrap()[d].contains(&next),
                                "seed {seed}: short read at {off}+{n} without a discard"
                            );
                        }
                    }
                    Err(e) if e.kind() == Kind::Inaccessible => {
                        assert!(
                            discard_started.lock().unwrap()[d].contains(&(off / cluster)),
                            "seed {seed}: EACCES at {off} without a discard"
                        );
                    }
                    Err(e) if e.kind() == Kind::Stale => {}
                    Err(e) => panic!("seed {seed}: snapshot read failed: {e}"),
                }
                ops += 1;
                s.snapshot_reads.fetch_add(1, Ordering::Relaxed);
            }
            ops
        }));
    }
    {
        let s = shared.clone();
        let mut r = Rng(seed ^ 0x5555);
        handles.push(thread::spawn(move || {
            let cs = ClusterSize::new(cluster).unwrap();
            let mut ops = 0;
            while !s.stop.load(Ordering::Relaxed) {
                let Some((id, _, discard_started)) = s.current.read().unwrap().clone() else {
                    thread::yield_now();
                    continue;
                };
                if r.below(4) != 0 {
                    thread::yield_now();
                    continue;
                }
                let d = r.below(sizes.len() as u64) as usize;
                let size = sizes[d];
                let off = r.below(size);
                let len = r.below(cluster * 3);
                {
                    let mut started = discard_started.lock().unwrap();
                    for c in cs.inward(off, len, size) {
                        started[d].insert(c);
                    }
                }
                match s.engine.devices()[d].discard_snapshot(id, off, len) {
                    Ok(()) => ops += 1,
                    Err(e) if e.kind() == Kind::Stale => {}
                    Err(e) => panic!("seed {seed}: discard failed: {e}"),
                }
            }
            ops
        }));
    }
    {
        // Grows the devices now and then, during accesses too (writers and readers stay
        // within the first sizes; the grown range reads as zeros until then).
        let s = shared.clone();
        let mut r = Rng(seed ^ 0x7777);
        handles.push(thread::spawn(move || {
            let mut ops = 0;
            while !s.stop.load(Ordering::Relaxed) {
                thread::sleep(std::time::Duration::from_millis(3));
                let d = r.below(sizes.len() as u64) as usize;
                if s.live[d].lock().unwrap().len() as u64 > 4 * sizes[d] {
                    continue;
                }
                let delta = 1 + r.below(cluster * 2);
                // like a write: not while the main thread captures the model at setup
                let _q = s.quiesce.read().unwrap();
                let want = fleecefs::engine::SizeRequest::Grow(delta);
                let rep = s.engine.resize(&format!("d{d}"), want, false).unwrap();
                let mut m = s.live[d].lock().unwrap();
                assert_eq!(rep.old_size, m.len() as u64, "seed {seed}: size of d{d}");
                m.resize(rep.new_size as usize, 0);
                ops += 1;
            }
            ops
        }));
    }
    // The main thread cycles accesses.
    let names: Vec<String> = vec!["d0".into(), "d1".into()];
    for cycle in 0..12 {
        {
            let _q = shared.quiesce.write().unwrap();
            let frozen: Vec<Vec<u8>> = shared
                .live
                .iter()
                .map(|m| m.lock().unwrap().clone())
                .collect();
            shared
                .engine
                .setup(&format!("c{cycle}"), Some(&names), None)
                .unwrap();
            let (id, _) = shared.engine.active().unwrap();
            let started = Arc::new(Mutex::new(vec![HashSet::new(); sizes.len()]));
            *shared.current.write().unwrap() = Some((id, Arc::new(frozen), started));
        }
        thread::sleep(std::time::Duration::from_millis(40));
        *shared.current.write().unwrap() = None;
        shared
            .engine
            .teardown(&format!("c{cycle}"), cycle % 2 == 0)
            .unwrap();
    }
    shared.stop.store(true, Ordering::Relaxed);
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(
        total > 1000,
        "seed {seed}: too few operations ran ({total})"
    );
    assert!(
        shared.snapshot_reads.load(Ordering::Relaxed) > 100,
        "seed {seed}: too few snapshot reads"
    );
    assert_direct_reads(&shared.engine, read, &format!("seed {seed}"));
    for (d, m) in shared.live.iter().enumerate() {
        let on_disk = std::fs::read(EngineBuilder::image(dir.path(), &format!("d{d}"))).unwrap();
        assert!(
            on_disk == *m.lock().unwrap(),
            "seed {seed}: source {d} differs from the model"
        );
    }
}

/// Setup while writers run, without any quiescing: a writer writes an increasing counter
/// to d0 and then d1, over and over. A snapshot taken at one instant for both devices
/// shows counters (a, b) with b <= a <= b + 1, never b > a.
#[test]
fn multi_device_snapshot_is_one_instant() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let cluster = 4096;
    let (engine, _) = make_engine(dir.path(), &[cluster * 4, cluster * 4], cluster, &mut rng);
    for d in engine.devices() {
        d.write_live(0, &0u64.to_le_bytes()).unwrap();
    }
    let engine = Arc::new(engine);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (e, stop) = (engine.clone(), stop.clone());
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                e.devices()[0].write_live(0, &n.to_le_bytes()).unwrap();
                e.devices()[1].write_live(0, &n.to_le_bytes()).unwrap();
            }
            n
        })
    };
    let names: Vec<String> = vec!["d0".into(), "d1".into()];
    let mut seen_progress = 0;
    for i in 0..200 {
        let t = format!("t{i}");
        engine.setup(&t, Some(&names), None).unwrap();
        let (id, _) = engine.active().unwrap();
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        engine.devices()[0].read_snapshot(id, 0, &mut a).unwrap();
        engine.devices()[1].read_snapshot(id, 0, &mut b).unwrap();
        let (a, b) = (u64::from_le_bytes(a), u64::from_le_bytes(b));
        assert!(
            b <= a && a <= b + 1,
            "snapshot {i} is not one instant: d0={a} d1={b}"
        );
        if a > 0 {
            seen_progress += 1;
        }
        // Reading again gives the same values although the writer went on.
        thread::sleep(std::time::Duration::from_micros(200));
        let mut a2 = [0u8; 8];
        engine.devices()[0].read_snapshot(id, 0, &mut a2).unwrap();
        assert_eq!(u64::from_le_bytes(a2), a, "snapshot {i} changed");
        engine.teardown(&t, true).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(
        writes > 200 && seen_progress > 100,
        "writer made too little progress ({writes})"
    );
}

/// Discard releases fleecing space and stops copy-before-write for the range;
/// concurrent first writes to one cluster copy it once.
#[test]
fn discard_frees_space_and_stops_copying() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(9);
    let cluster = 65536u64;
    let size = cluster * 64;
    let (engine, _) = make_engine(dir.path(), &[size], cluster, &mut rng);
    let dev = engine.devices()[0].clone();
    engine.setup("t", None, None).unwrap();
    let (id, _) = engine.active().unwrap();
    let access = dev.access().unwrap();
    // 8 threads write the same uncopied cluster at once: it is copied exactly once.
    let hs: Vec<_> = (0..8u64)
        .map(|i| {
            let dev = dev.clone();
            thread::spawn(move || dev.write_live(i * 512, &[i as u8; 512]).unwrap())
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(access.stats().copied_bytes, cluster);
    // Copy 16 clusters, then discard them: the fleecing file shrinks back.
    dev.write_live(cluster * 16, &vec![1u8; (cluster * 16) as usize])
        .unwrap();
    assert_eq!(access.stats().copied_bytes, cluster * 17);
    assert!(engine.wait_for_copies(std::time::Duration::from_secs(10)));
    let allocated = access.stats().fleecing_allocated;
    assert!(allocated >= cluster * 16, "fleecing holds {allocated}");
    // unaligned discard: only the whole clusters inside go
    dev.discard_snapshot(id, cluster * 16 - 100, cluster * 16 + 200)
        .unwrap();
    assert!(engine.wait_for_copies(std::time::Duration::from_secs(10)));
    let after = access.stats().fleecing_allocated;
    assert!(
        after <= allocated - cluster * 16,
        "fleecing still holds {after}"
    );
    assert_eq!(access.stats().discarded_bytes, cluster * 16);
    // writes into the discarded range copy nothing now
    dev.write_live(cluster * 20, &vec![2u8; cluster as usize])
        .unwrap();
    assert_eq!(access.stats().copied_bytes, cluster * 17);
    // the clusters at the unaligned edges are still readable, the inside is not
    let mut buf = vec![0u8; 100];
    assert_eq!(
        dev.read_snapshot(id, cluster * 16 - 100, &mut buf).unwrap(),
        100
    );
    let e = dev.read_snapshot(id, cluster * 16, &mut buf).unwrap_err();
    assert_eq!(e.kind(), Kind::Inaccessible);
    assert_eq!(dev.read_snapshot(id, cluster * 32, &mut buf).unwrap(), 100);
    // Discards racing the write-behind flushers (copies still in memory, or being
    // written) leave no fleecing space behind once the flushers are done.
    let before = access.stats().fleecing_allocated;
    for round in 0..8u64 {
        let at = cluster * (40 + 2 * round);
        dev.write_live(at, &vec![3u8; (cluster * 2) as usize])
            .unwrap();
        dev.discard_snapshot(id, at, cluster * 2).unwrap();
    }
    assert!(engine.wait_for_copies(std::time::Duration::from_secs(10)));
    let leaked = access.stats().fleecing_allocated.saturating_sub(before);
    assert_eq!(leaked, 0, "discarded copies still hold {leaked} bytes");
    engine.teardown("t", true).unwrap();
}

/// Bitmaps against a model: after any random sequence of writes, setups (with the
/// bitmap, without it, with another name), successful and failed teardowns, clean
/// restarts and crashes (the engine dropped without shutdown), the dirty map of a `used`
/// bitmap covers every cluster written since the last successful backup.
#[test]
fn bitmaps_cover_every_write_since_the_last_success() {
    for seed in seeds() {
        for safety in [CrashSafety::On, CrashSafety::Sync, CrashSafety::Off] {
            run_bitmap_model(seed, safety);
        }
    }
}

fn open_engine(dir: &Path, cluster: u64, crash_safe: CrashSafety) -> Engine {
    EngineBuilder::new(dir)
        .cluster(cluster)
        .existing_device("d0")
        .crash_safe(crash_safe)
        .with_state()
        .clean_leftovers()
        .build()
}

fn dirty_clusters(engine: &Engine, cluster: u64) -> HashSet<u64> {
    let access = engine.devices()[0].access().unwrap();
    let text = access.dirty_map().to_text();
    let mut set = HashSet::new();
    for (off, len) in fleecefs::dirtymap::parse(&text).unwrap() {
        for c in off / cluster..(off + len).div_ceil(cluster) {
            set.insert(c);
        }
    }
    set
}

fn run_bitmap_model(seed: u64, safety: CrashSafety) {
    // A crash here is the engine dropped without shutdown: the daemon dies, the machine
    // (the page cache) does not. `on` and `sync` keep the bitmap, `off` does not.
    let crash_safe = safety;
    let survives_crash = safety != CrashSafety::Off;
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let cluster = 4096u64;
    let size = cluster * 200 + 300;
    let nclusters = size.div_ceil(cluster);
    let mut data = vec![0u8; size as usize];
    rng.fill(&mut data);
    std::fs::write(EngineBuilder::image(dir.path(), "d0"), &data).unwrap();
    let mut engine = Some(open_engine(dir.path(), cluster, crash_safe));
    // Model: clusters written since the last successful backup (None = bitmap must be
    // all dirty: it does not exist yet or was invalidated).
    let mut pending: Option<HashSet<u64>> = None;
    // Whether the bitmap is registered (an invalid one still is).
    let mut exists = false;
    let mut during: HashSet<u64> = HashSet::new();
    let mut in_access = false;
    let mut successes = 0;
    for step in 0..600 {
        let ctx = format!("seed {seed} crash_safe {crash_safe:?} step {step}");
        let e = engine.as_ref().unwrap();
        match rng.below(100) {
            0..=59 => {
                let len = 1 + rng.below(cluster * 3);
                let off = rng.below(size - len);
                e.devices()[0]
                    .write_live(off, &vec![step as u8; len as usize])
                    .expect(&ctx);
                let cs = ClusterSize::new(cluster).unwrap();
                for c in cs.outward(off, len) {
                    if in_access {
                        during.insert(c);
                    } else if let Some(p) = &mut pending {
                        p.insert(c);
                    }
                }
            }
            60..=74 if !in_access => {
                let r = e.setup("t", None, Some("b")).expect(&ctx);
                let action = r.devices[0].bitmap_action;
                let dirty = dirty_clusters(e, cluster);
                match &pending {
                    Some(p) => {
                        assert_eq!(action, BitmapAction::Used, "{ctx}");
                        assert!(
                            dirty.is_superset(p),
                            "{ctx}: dirty map misses {:?}",
                            p.difference(&dirty).collect::<Vec<_>>()
                        );
                        // Nothing else is dirty: the bitmap is exact when nothing failed.
                        assert_eq!(dirty.len(), p.len(), "{ctx}: dirty map has extra clusters");
                    }
                    None => {
                        assert!(
                            action == BitmapAction::New || action == BitmapAction::Invalid,
                            "{ctx}: action {action}"
                        );
                        assert_eq!(dirty.len() as u64, nclusters, "{ctx}");
                        pending = Some((0..nclusters).collect());
                    }
                }
                in_access = true;
                exists = true;
                during.clear();
            }
            75..=84 if in_access => {
                let success = rng.below(2) == 0;
                e.teardown("t", success).expect(&ctx);
                let p = pending.as_mut().unwrap();
                if success {
                    *p = std::mem::take(&mut during);
                    successes += 1;
                } else {
                    p.extend(during.drain());
                }
                in_access = false;
            }
            85..=88 if !in_access => {
                // a backup without the bitmap removes it
                let r = e.setup("t", None, None).expect(&ctx);
                let expect = if exists {
                    BitmapAction::NotUsedRemoved
                } else {
                    BitmapAction::NotUsed
                };
                assert_eq!(r.devices[0].bitmap_action, expect, "{ctx}");
                e.teardown("t", true).expect(&ctx);
                pending = None;
                exists = false;
            }
            89..=93 => {
                // clean restart: an access is torn down as a failure
                engine.take().unwrap().shutdown();
                if in_access {
                    pending.as_mut().unwrap().extend(during.drain());
                    in_access = false;
                }
                engine = Some(open_engine(dir.path(), cluster, crash_safe));
            }
            94..=96 => {
                // crash: dropped without shutdown
                drop(engine.take());
                if in_access {
                    if let Some(p) = &mut pending {
                        p.extend(during.drain());
                    }
                    in_access = false;
                }
                if !survives_crash && pending.is_some() {
                    pending = None; // the next setup must report invalid
                }
                engine = Some(open_engine(dir.path(), cluster, crash_safe));
                if !survives_crash {
                    let st = engine.as_ref().unwrap().status();
                    if let Some(b) = st.bitmaps.first() {
                        assert!(
                            !b.consistent,
                            "{ctx}: a bitmap that was not crash-safe survived a crash"
                        );
                    }
                }
            }
            _ => {}
        }
    }
    assert!(
        successes > 3,
        "seed {seed}: only {successes} successful backups ran"
    );
}

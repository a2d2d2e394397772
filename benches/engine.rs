//! Engine micro-benchmarks without FUSE: copy-before-write of a cluster,
//! bitmap set/test/merge, dirty-map generation for a 1 TiB device. A simple harness
//! (`cargo bench --bench engine`): each case runs for a fixed number of iterations, best of
//! three rounds, and prints one line. Numbers are for this machine only; compare them
//! before and after a change, on the same machine.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleecefs::bitmap::Bitmap;
use fleecefs::dirtymap::DirtyMap;
use fleecefs::units::ClusterSize;

#[path = "../tests/support/mod.rs"]
mod support;
use support::EngineBuilder;

/// Runs `f` `iters` times per round, three rounds; returns the best time per iteration.
fn bench(iters: u64, mut f: impl FnMut(u64)) -> Duration {
    (0..3)
        .map(|_| {
            let start = Instant::now();
            for i in 0..iters {
                f(i);
            }
            start.elapsed() / iters as u32
        })
        .min()
        .unwrap_or_default()
}

fn report(name: &str, per_op: Duration, unit: &str, per: f64) {
    let ns = per_op.as_nanos() as f64;
    let rate = if ns > 0.0 { per * 1e9 / ns } else { 0.0 };
    println!("{name:<58} {:>12.1} µs/op {rate:>14.0} {unit}", ns / 1e3);
}

fn main() {
    const TIB: u64 = 1 << 40;
    const CL: u64 = 65536;
    let nbits = TIB / CL; // 16 Mi clusters, 2 MiB per bitmap
    println!("engine micro-benchmarks (best of 3 rounds)");

    // -- copy-before-write: first touch of a 64 KiB cluster (read old data from the
    //    source, store it, mark it copied, then the 4 KiB write). Stored synchronously
    //    in the fleecing file (--cbw-buffer 0), and through the write-behind buffer (the
    //    default: the writer only reads the old data into memory; flusher threads write
    //    the fleecing file meanwhile, so this measures the writer's side).
    let dir = tempfile::tempdir().expect("temp dir");
    let src = EngineBuilder::image(dir.path(), "d");
    let size = 1u64 << 30;
    std::fs::write(&src, vec![0x5au8; size as usize]).expect("source image");
    let clusters = size / CL;
    let data = [0xa5u8; 4096];
    let mut round = 0;
    let mut engines = Vec::new();
    for (name, buffer) in [
        ("CBW first touch, synchronous (--cbw-buffer 0)", 0),
        ("CBW first touch, write-behind (default)", 16 << 20),
    ] {
        // One engine at a time: a served source is locked (one writer per image).
        engines.clear();
        let engine = EngineBuilder::new(dir.path())
            .cluster(CL)
            .existing_device("d")
            .cbw_buffer(buffer)
            .build();
        let d = engine.devices()[0].clone();
        let first_touch = bench(clusters / 4, |i| {
            if i == 0 {
                round += 1;
                let _ = engine.teardown(&format!("b{}", round - 1), false);
                engine
                    .setup(&format!("b{round}"), None, None)
                    .expect("setup");
            }
            d.write_live(i * 4 * CL, &data).expect("write");
        });
        report(name, first_touch, "writes/s", 1.0);
        engines.push(engine);
    }
    // The rest runs on the default engine, whose access is still set up.
    let engine = engines.pop().expect("engine");
    let d = engine.devices()[0].clone();
    let again = bench(clusters / 4, |i| {
        d.write_live(i * 4 * CL, &data).expect("write");
    });
    report(
        "live 4 KiB write, cluster already copied",
        again,
        "writes/s",
        1.0,
    );
    let (id, _) = engine.active().expect("access");
    let mut buf = vec![0u8; 1 << 20];
    let read = bench(256, |i| {
        black_box(
            d.read_snapshot(id, (i % 1024) << 20, &mut buf)
                .expect("read"),
        );
    });
    report(
        "snapshot read 1 MiB (mix of copied and not)",
        read,
        "MB/s",
        1.048576,
    );
    let _ = engine.teardown(&format!("b{round}"), false);

    // -- bitmaps of a 1 TiB device at 64 KiB clusters
    let b = Bitmap::new(nbits, false);
    let set = bench(1 << 20, |i| {
        black_box(b.set((i * 7919) % nbits));
    });
    report("bitmap set one bit (16 Mi bits)", set, "ops/s", 1.0);
    let test = bench(1 << 20, |i| {
        black_box(b.get((i * 104_729) % nbits));
    });
    report("bitmap test one bit", test, "ops/s", 1.0);
    let other = Bitmap::new(nbits, false);
    other.set_range(0..nbits / 2);
    let merge = bench(20, |_| b.or_from(&other));
    report(
        "bitmap merge (OR) of two 1 TiB bitmaps (2 MiB each)",
        merge,
        "merges/s",
        1.0,
    );
    let copy = bench(20, |_| b.copy_from(&other));
    report("bitmap copy of a 1 TiB bitmap", copy, "copies/s", 1.0);
    let count = bench(20, |_| {
        black_box(b.count_ones());
    });
    report("bitmap count of a 1 TiB bitmap", count, "counts/s", 1.0);

    // -- dirty map of a 1 TiB device: all dirty (one line) and worst case (every other
    //    cluster dirty: 8 Mi lines, ~190 MiB of text generated on the fly)
    let cluster = ClusterSize::new(CL).expect("cluster");
    let full = Arc::new(Bitmap::new(nbits, true));
    let build_full = bench(20, |_| {
        black_box(DirtyMap::new(full.clone(), cluster, TIB));
    });
    report(
        "dirty map index, 1 TiB all dirty",
        build_full,
        "builds/s",
        1.0,
    );
    let sparse = Arc::new(Bitmap::new(nbits, false));
    for c in (0..nbits).step_by(2) {
        sparse.set(c);
    }
    let build_sparse = bench(1, |_| {
        black_box(DirtyMap::new(sparse.clone(), cluster, TIB));
    });
    report(
        "dirty map index, 1 TiB every other cluster dirty",
        build_sparse,
        "builds/s",
        1.0,
    );
    let map = DirtyMap::new(sparse.clone(), cluster, TIB);
    let text_len = map.text_len();
    let mut chunk = vec![0u8; 128 << 10];
    let read_all = bench(1, |_| {
        let mut off = 0;
        loop {
            let n = map.read_at(off, &mut chunk);
            if n == 0 {
                break;
            }
            off += n as u64;
        }
        assert_eq!(off, text_len);
    });
    report(
        &format!(
            "dirty map text, read all {} MiB in 128 KiB reads",
            text_len >> 20
        ),
        read_all,
        "MB/s",
        text_len as f64 / 1e6,
    );
    let random_read = bench(2000, |i| {
        black_box(map.read_at((i * 7_919_993) % text_len, &mut chunk[..4096]));
    });
    report(
        "dirty map text, one 4 KiB read at a random offset",
        random_read,
        "reads/s",
        1.0,
    );
}

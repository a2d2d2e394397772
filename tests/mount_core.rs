//! Real-mount tests of the fleecefs core: every test mounts its own FUSE filesystem
//! through the real `fleecefs` binary in its own temp dir (cargo runs tests in parallel)
//! and checks the filesystem's contract (docs/usage.md) with real syscalls.

mod common;

use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;

const TARGET: &str = "backup";

/// Asserts the counters of the active access.
fn assert_counter(f: &Fleece, key: &str, expected: u64) {
    let access = f.access();
    assert_eq!(json_u64(&access, key), expected, "{key} in {access}");
}

/// QEMU's `image-fleecing` test: the snapshot keeps the old patterns and zeros while the
/// live image takes new writes that overlap them partially.
#[test]
fn image_fleecing_snapshot_keeps_point_in_time_data() {
    const SIZE: u64 = 64 * MIB;
    const PAT: u64 = 64 * KIB;
    let f = Fleece::mounted(&[("vm", SIZE)]);
    let live = f.live("vm");
    let mut before = vec![0u8; SIZE as usize];
    for (byte, offset) in [(0x5d, 0), (0xd5, MIB), (0xdc, 32 * MIB), (0xcd, 0x3ff_0000)] {
        fill_pattern(&live, offset, PAT, byte);
        paint(&mut before, offset, PAT, byte);
    }

    let setup = f.setup(TARGET);
    assert_eq!(setup["target"], TARGET, "{setup}");
    let dev = &setup["devices"][0];
    assert_eq!(dev["name"], "vm", "{setup}");
    assert_eq!(json_u64(dev, "size"), SIZE, "{setup}");
    assert_eq!(json_u64(dev, "dirty_bytes"), SIZE, "{setup}");
    assert_eq!(
        dev["snapshot"],
        f.snapshot("vm").to_str().expect("utf-8 path")
    );
    assert_eq!(
        dev["dirty_map"],
        f.dirty_map("vm").to_str().expect("utf-8 path")
    );
    assert!(dev["bitmap"].is_null(), "{setup}");
    assert_eq!(dev["bitmap_action"], "not-used", "{setup}");

    let mut after = before.clone();
    for (byte, offset) in [
        (0xab, 0),
        (0xad, 0xf_8000),
        (0x1d, 0x200_8000),
        (0xea, 0x3fe_0000),
    ] {
        fill_pattern(&live, offset, PAT, byte);
        paint(&mut after, offset, PAT, byte);
    }

    assert_bytes_eq(&read_all(&f.snapshot("vm")), &before, "snapshot/vm");
    assert_bytes_eq(&read_all(&live), &after, "live/vm");
    assert_bytes_eq(&read_all(&f.source("vm")), &after, "the source image");

    // Clusters touched by the overwrites: 0, 15-16, 512-513, 1022.
    let access = f.access();
    assert_eq!(json_u64(&access, "copied_bytes"), 6 * CLUSTER, "{access}");
    assert!(
        json_u64(&access, "fleecing_allocated") >= 6 * CLUSTER,
        "{access}"
    );
    f.teardown(TARGET);
    assert!(
        f.fleecing_files().is_empty(),
        "teardown left fleecing files"
    );
}

/// Discarding a copied range frees its fleecing space, makes it unreadable, and stops
/// copy-before-write there.
#[test]
fn discard_frees_fleecing_space_and_stops_copying() {
    let f = Fleece::mounted(&[("d", 4 * MIB)]);
    let live = f.live("d");
    fill_pattern(&live, 0, 4 * MIB, 0x11);
    f.setup(TARGET);
    fill_pattern(&live, 2 * CLUSTER, 4 * CLUSTER, 0x22);
    assert_counter(&f, "copied_bytes", 4 * CLUSTER);
    let fleece = f.fleecing_file("d", TARGET);
    let disk_before = allocated(&fleece);
    let reported_before = json_u64(&f.access(), "fleecing_allocated");
    assert!(
        disk_before >= 4 * CLUSTER,
        "fleecing file holds {disk_before}"
    );
    assert!(
        reported_before >= 4 * CLUSTER,
        "status says {reported_before}"
    );

    let snap = open_ok(&f.snapshot("d"), libc::O_RDWR);
    ok(
        fallocate(&snap, PUNCH, 2 * CLUSTER, 4 * CLUSTER),
        "punch hole in snapshot/d",
    );

    let access = f.access();
    assert_eq!(
        json_u64(&access, "discarded_bytes"),
        4 * CLUSTER,
        "{access}"
    );
    let reported_after = json_u64(&access, "fleecing_allocated");
    assert!(
        reported_after + 4 * CLUSTER <= reported_before,
        "fleecing_allocated went from {reported_before} to {reported_after}"
    );
    let disk_after = allocated(&fleece);
    assert!(
        disk_after + 4 * CLUSTER <= disk_before,
        "st_blocks of the fleecing file went from {disk_before} to {disk_after} bytes"
    );

    // Live writes into the discarded range copy nothing; elsewhere they still do.
    fill_pattern(&live, 2 * CLUSTER, 4 * CLUSTER, 0x33);
    assert_counter(&f, "copied_bytes", 4 * CLUSTER);
    fill_pattern(&live, 8 * CLUSTER + 10, 100, 0x44);
    assert_counter(&f, "copied_bytes", 5 * CLUSTER);

    assert_errno(pread(&snap, 2 * CLUSTER, 4096), libc::EACCES, "read at 2C");
    assert_errno(
        pread(&snap, 5 * CLUSTER + 10, 10),
        libc::EACCES,
        "read at 5C+10",
    );
    let head = ok(pread(&snap, 2 * CLUSTER - 4096, 16384), "read into 2C");
    assert_eq!(
        head.len(),
        4096,
        "read should stop where the discard begins"
    );
    assert_all(&head, 0x11, "the data before the discarded range");
    assert_all(
        &read_range(&f.snapshot("d"), 6 * CLUSTER, 3 * CLUSTER),
        0x11,
        "after it",
    );
}

/// An unaligned discard affects only the whole clusters inside it.
#[test]
fn unaligned_discard_aligns_inward() {
    const SIZE: u64 = 6 * CLUSTER + 1000;
    let f = Fleece::mounted(&[("d", SIZE)]);
    let live = f.live("d");
    fill_pattern(&live, 0, SIZE, 0x11);
    f.setup(TARGET);
    let snap = open_ok(&f.snapshot("d"), libc::O_RDWR);
    // Read first, as a backup does before it discards what it has read.
    assert_all(
        &read_all(&f.snapshot("d")),
        0x11,
        "snapshot before discards",
    );

    // [C+100, 3C-100) holds no whole cluster: nothing is discarded.
    ok(
        fallocate(&snap, PUNCH, CLUSTER + 100, 2 * CLUSTER - 200),
        "punch [C+100, 3C-100)",
    );
    // Nor does a punch smaller than a cluster.
    ok(
        fallocate(&snap, PUNCH, 5 * CLUSTER + 100, CLUSTER - 200),
        "punch [5C+100, 6C-100)",
    );
    assert_counter(&f, "discarded_bytes", 0);
    assert_all(
        &read_all(&f.snapshot("d")),
        0x11,
        "snapshot after a no-op discard",
    );

    // [C+100, 4C-100) holds cluster 2 only; [6C-10, SIZE) holds the partial last one.
    ok(
        fallocate(&snap, PUNCH, CLUSTER + 100, 3 * CLUSTER - 200),
        "punch [C+100, 4C-100)",
    );
    ok(
        fallocate(&snap, PUNCH, 6 * CLUSTER - 10, 1010),
        "punch [6C-10, end)",
    );
    assert_counter(&f, "discarded_bytes", CLUSTER + 1000);

    for offset in [
        2 * CLUSTER,
        2 * CLUSTER + CLUSTER / 2,
        3 * CLUSTER - 1,
        6 * CLUSTER,
        SIZE - 1,
    ] {
        assert_errno(
            pread(&snap, offset, 1),
            libc::EACCES,
            &format!("read at {offset}"),
        );
    }
    for offset in [
        0,
        CLUSTER + 100,
        2 * CLUSTER - 1,
        3 * CLUSTER,
        4 * CLUSTER - 100,
        6 * CLUSTER - 1,
    ] {
        let byte = ok(pread(&snap, offset, 1), &format!("read at {offset}"));
        assert_eq!(byte, [0x11], "snapshot byte at {offset}");
    }
    assert_eq!(
        ok(pread(&snap, 2 * CLUSTER - 1, 2), "read across 2C").len(),
        1
    );
    assert_eq!(
        ok(pread(&snap, 6 * CLUSTER - 10, 100), "read across 6C").len(),
        10
    );

    // A 512-byte write into cluster 3 (partly covered by the punch) copies it whole;
    // writing over clusters 1-3 then copies 1 only (2 is discarded); both still read
    // the old data.
    fill_pattern(&live, 3 * CLUSTER + 512, 512, 0x77);
    assert_counter(&f, "copied_bytes", CLUSTER);
    fill_pattern(&live, CLUSTER, 3 * CLUSTER, 0x99);
    assert_counter(&f, "copied_bytes", 2 * CLUSTER);
    assert_all(
        &read_range(&f.snapshot("d"), CLUSTER, CLUSTER),
        0x11,
        "cluster 1",
    );
    assert_all(
        &read_range(&f.snapshot("d"), 3 * CLUSTER, CLUSTER),
        0x11,
        "cluster 3",
    );
    // The dirty map does not change while the access lasts.
    let map = fs::read_to_string(f.dirty_map("d")).expect("reading the dirty map");
    assert_eq!(map, format!("0 {SIZE}\n"));
}

/// The errnos of the contract: EROFS, EPERM, ENOSPC, EOPNOTSUPP, ESTALE, ENOENT.
#[test]
fn errnos_of_snapshot_live_and_dirty_map() {
    const SIZE: u64 = MIB;
    let f = Fleece::mounted(&[("d", SIZE)]);
    f.setup(TARGET);
    let snap_path = f.snapshot("d");
    let snap = open_ok(&snap_path, libc::O_RDWR);
    assert_errno(pwrite(&snap, 0, b"x"), libc::EROFS, "write to snapshot");
    assert_errno(truncate(&snap_path, 0), libc::EROFS, "truncate snapshot");
    assert_errno(truncate(&f.live("d"), 0), libc::EPERM, "shrink live");
    assert_errno(truncate(&f.live("d"), 2 * SIZE), libc::EPERM, "grow live");
    let live = open_ok(&f.live("d"), libc::O_RDWR);
    assert_errno(
        pwrite(&live, SIZE, &[1; 512]),
        libc::ENOSPC,
        "write past end",
    );
    for (mode, name) in [
        (libc::FALLOC_FL_ZERO_RANGE, "zero range"),
        (
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            "zero range keep size",
        ),
        (0, "allocate"),
        (libc::FALLOC_FL_KEEP_SIZE, "allocate keep size"),
    ] {
        assert_errno(
            fallocate(&snap, mode, 0, CLUSTER),
            libc::EOPNOTSUPP,
            &format!("fallocate {name} on snapshot"),
        );
    }
    assert_counter(&f, "discarded_bytes", 0);

    let map = fs::read_to_string(f.dirty_map("d")).expect("reading the dirty map");
    assert_eq!(map, format!("0 {SIZE}\n"));
    for flags in [libc::O_WRONLY, libc::O_RDWR] {
        assert_errno(
            open(&f.dirty_map("d"), flags),
            libc::EROFS,
            "open .dirty for writing",
        );
    }

    let dirty = open_ok(&f.dirty_map("d"), libc::O_RDONLY);
    f.teardown(TARGET);
    assert_errno(
        pread(&snap, 0, 4096),
        libc::ESTALE,
        "snapshot fd after teardown",
    );
    assert_errno(
        pread(&dirty, 0, 100),
        libc::ESTALE,
        ".dirty fd after teardown",
    );
    assert_errno(
        open(&snap_path, libc::O_RDONLY),
        libc::ENOENT,
        "open snapshot",
    );
    let gone = fs::metadata(&snap_path)
        .map(|_| ())
        .map_err(|e| e.raw_os_error().unwrap_or(0));
    assert_errno(gone, libc::ENOENT, "stat snapshot after teardown");
    // A handle of an ended access never reads a newer access's snapshot.
    f.setup("next");
    assert_errno(
        pread(&snap, 0, 4096),
        libc::ESTALE,
        "old snapshot fd in a new access",
    );
}

/// Sets the flag when dropped, also while unwinding.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A multi-device setup freezes every device at the same instant.
#[test]
fn two_devices_are_frozen_at_one_instant() {
    const ROUNDS: usize = 30;
    let f = Fleece::mounted(&[("a", MIB), ("b", MIB)]);
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let (live_a, live_b) = (
        open_ok(&f.live("a"), libc::O_WRONLY),
        open_ok(&f.live("b"), libc::O_WRONLY),
    );
    let counter_at = |name: &str| {
        let bytes = read_range(&f.snapshot(name), 0, 8);
        u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
    };
    let mut seen = Vec::new();
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let bytes = n.to_le_bytes();
                assert_eq!(ok(pwrite(&live_a, 0, &bytes), "write live/a"), 8);
                assert_eq!(ok(pwrite(&live_b, 0, &bytes), "write live/b"), 8);
                written.store(n, Ordering::Relaxed);
            }
        });
        // A panic below must still stop the writer, or the scope never ends.
        let _stop = StopOnDrop(&stop);
        for round in 0..ROUNDS {
            let before = written.load(Ordering::Relaxed);
            wait_until("the writer to make progress", || {
                writer.is_finished() || written.load(Ordering::Relaxed) > before
            });
            let target = format!("t{round}");
            f.setup(&target);
            let (a, b) = (counter_at("a"), counter_at("b"));
            f.teardown(&target);
            assert!(
                a == b || a == b + 1,
                "round {round}: snapshot a = {a}, b = {b}: not one instant"
            );
            seen.push(a);
        }
    });
    seen.dedup();
    assert!(
        seen.len() > ROUNDS / 2,
        "the writer barely moved between setups: {seen:?}"
    );
}

/// O_DIRECT reads and writes of live files work (and copy before write); fsync and
/// fdatasync succeed.
#[test]
fn live_supports_o_direct_and_fsync() {
    let f = Fleece::mounted(&[("d", 4 * MIB)]);
    fill_pattern(&f.live("d"), 0, 4 * MIB, 0x11);
    f.setup(TARGET);
    let fd = open_ok(&f.live("d"), libc::O_RDWR | libc::O_DIRECT);
    let mut buf = AlignedBuf::new(CLUSTER as usize, 4096);
    assert_eq!(
        ok(pread_into(&fd, 0, buf.as_mut_slice()), "O_DIRECT read"),
        buf.as_slice().len()
    );
    assert_all(buf.as_slice(), 0x11, "O_DIRECT read of old data");

    buf.as_mut_slice().fill(0x77);
    let n = ok(pwrite(&fd, 2 * CLUSTER, buf.as_slice()), "O_DIRECT write");
    assert_eq!(n, CLUSTER as usize);
    let n = ok(
        pwrite(&fd, MIB + 4096, &buf.as_slice()[..4096]),
        "O_DIRECT 4K write",
    );
    assert_eq!(n, 4096);
    ok(fsync(&fd), "fsync of live");
    ok(fdatasync(&fd), "fdatasync of live");

    buf.as_mut_slice().fill(0);
    ok(
        pread_into(&fd, 2 * CLUSTER, buf.as_mut_slice()),
        "O_DIRECT read back",
    );
    assert_all(buf.as_slice(), 0x77, "O_DIRECT read back");
    assert_all(
        &read_range(&f.source("d"), 2 * CLUSTER, CLUSTER),
        0x77,
        "source",
    );
    assert_all(
        &read_range(&f.source("d"), MIB + 4096, 4096),
        0x77,
        "source (4K)",
    );
    assert_all(
        &read_range(&f.snapshot("d"), 2 * CLUSTER, CLUSTER),
        0x11,
        "snapshot",
    );
    assert_all(
        &read_range(&f.snapshot("d"), MIB, CLUSTER),
        0x11,
        "snapshot (4K)",
    );
    assert_counter(&f, "copied_bytes", 2 * CLUSTER);

    let buffered = open_ok(&f.live("d"), libc::O_RDWR);
    ok(fsync(&buffered), "fsync of buffered live");
    ok(fdatasync(&buffered), "fdatasync of buffered live");
}

//! The copy-before-write timeout, with copies made slow by the test-only fault hook.
//! One test per binary: the hook is process-wide (`FLEECEFS_FAULT_CBW`).
#![cfg(feature = "fault-injection")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleecefs::cbw::{Device, OnCbwError};
use fleecefs::engine::Engine;

mod support;
use support::EngineBuilder;

const CL: u64 = 65536;

// Timing: the fault hooks make copies and fleecing reads take 1.5 s. A bound that shows
// an operation did not wait for such a stuck one is taken against what is left of the
// 1.5 s when the operation starts (at least 1.2 s), with room for a loaded machine: the
// operation must take less than [`NOT_STUCK`], and the stuck one is given [`SETTLE`] to
// get stuck first.

/// Less than this: the operation did not wait for one stuck for 1.5 s.
const NOT_STUCK: Duration = Duration::from_millis(600);
/// Time for a thread to get stuck in a slow fleecing read before the test goes on.
const SETTLE: Duration = Duration::from_millis(300);

/// A started access (target "t") on a fresh engine whose copies time out after 200 ms,
/// over one 1 MiB device of 0x11 bytes with clusters of `cluster` bytes; `buffer` is
/// the write-behind buffer (0: synchronous copies, on the copy pool). Returns the temp
/// dir (keep it alive), the engine, the access id and the device.
fn started(
    on_error: OnCbwError,
    buffer: u64,
    cluster: u64,
) -> (tempfile::TempDir, Arc<Engine>, u64, Arc<Device>) {
    started_with_timeout(on_error, buffer, cluster, Duration::from_millis(200))
}

/// [`started`] with copies that time out after `timeout`.
fn started_with_timeout(
    on_error: OnCbwError,
    buffer: u64,
    cluster: u64,
    timeout: Duration,
) -> (tempfile::TempDir, Arc<Engine>, u64, Arc<Device>) {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineBuilder::new(dir.path())
        .cluster(cluster)
        .device("a", vec![0x11u8; (CL * 16) as usize])
        .on_cbw_error(on_error)
        .cbw_timeout(Some(timeout))
        .cbw_buffer(buffer)
        .build();
    let e = Arc::new(engine);
    e.setup("t", None, None).unwrap();
    let (id, _) = e.active().unwrap();
    let a = e.devices()[0].clone();
    (dir, e, id, a)
}

/// Makes fleecing reads slow (1.5 s) and starts a snapshot read of 100 bytes at `offset`
/// in a thread; it returns the first byte read.
fn stuck_reader(
    a: &Arc<Device>,
    id: u64,
    offset: u64,
) -> std::thread::JoinHandle<fleecefs::error::Result<u8>> {
    std::env::set_var("FLEECEFS_FAULT_FLEECE_READ", "delay=1500");
    let a = a.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 100];
        a.read_snapshot(id, offset, &mut buf).map(|_| buf[0])
    })
}

#[test]
fn slow_copies_time_out_without_blocking_the_writer_or_corrupting_anything() {
    std::env::set_var("FLEECEFS_FAULT_CBW", "delay=1500");
    // break-guest-write: the write fails with ETIMEDOUT after the timeout, live unchanged
    let (_dir, e, id, a) = started(OnCbwError::BreakGuestWrite, 16 << 20, CL);
    let start = Instant::now();
    let err = a.write_live(0, &[0x22; 100]).unwrap_err();
    let waited = start.elapsed();
    assert_eq!(err.errno(), libc::ETIMEDOUT, "{err}");
    assert!(
        waited < Duration::from_millis(1000),
        "writer waited {waited:?}"
    );
    let mut buf = [0u8; 100];
    a.read_live(0, &mut buf).unwrap();
    assert_eq!(buf, [0x11; 100]);
    // the late copy finishes and stores the right (old) data: the snapshot stays valid
    std::thread::sleep(Duration::from_millis(1600));
    std::env::set_var("FLEECEFS_FAULT_CBW", "");
    a.write_live(0, &[0x22; 100]).unwrap();
    assert_eq!(a.read_snapshot(id, 0, &mut buf).unwrap(), 100);
    assert_eq!(buf, [0x11; 100]);
    assert_eq!(
        e.status().access.unwrap().copied_bytes,
        CL,
        "cluster 0 copied twice or never"
    );
    e.teardown("t", true).unwrap();

    // break-snapshot, synchronous copies: the write succeeds after the timeout and the
    // snapshot breaks
    std::env::set_var("FLEECEFS_FAULT_CBW", "delay=1500");
    let (_dir, e, id, a) = started(OnCbwError::BreakSnapshot, 0, CL);
    let start = Instant::now();
    a.write_live(CL, &[0x33; 100]).unwrap();
    assert!(start.elapsed() < Duration::from_millis(1000));
    let st = e.status().access.unwrap();
    assert!(st.broken && st.broken_reason.unwrap().contains("timeout"));
    // a reader never gets the new data, neither now nor once the late copy has finished
    for _ in 0..2 {
        let err = a.read_snapshot(id, CL, &mut buf).unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
        std::thread::sleep(Duration::from_millis(1600));
    }
    assert!(e.teardown("t", true).is_err());

    // break-snapshot with the write-behind buffer (the default): the write does not wait
    // for the slow fleecing write at all; until the watchdog breaks the access (the
    // fleecing write takes longer than the timeout) readers get the old data from
    // memory, afterwards EIO; never the new data. A timeout of 600 ms here, so that a
    // loaded machine still reads before the watchdog fires, and the break still comes
    // well before the fleecing write ends (1.5 s).
    let timeout = Duration::from_millis(600);
    let (_dir, e, id, a) = started_with_timeout(OnCbwError::BreakSnapshot, 16 << 20, CL, timeout);
    let start = Instant::now();
    a.write_live(CL, &[0x33; 100]).unwrap();
    assert!(
        start.elapsed() < NOT_STUCK,
        "the write waited {:?} for its copy",
        start.elapsed()
    );
    let pending = e.status().access.unwrap().pending_bytes;
    assert_eq!(pending, CL, "the copy is not pending");
    let mut saw_old = false;
    loop {
        match a.read_snapshot(id, CL, &mut buf) {
            Ok(n) => {
                assert_eq!((n, buf), (100, [0x11; 100]), "snapshot read new data");
                saw_old = true;
            }
            Err(err) => {
                assert_eq!(err.errno(), libc::EIO);
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_millis(1300),
            "the watchdog did not break the access"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(saw_old, "the pending copy was never readable");
    let waited = start.elapsed();
    assert!(waited >= timeout, "broken before the timeout: {waited:?}");
    let st = e.status().access.unwrap();
    assert!(st.broken && st.broken_reason.unwrap().contains("timeout"));
    std::thread::sleep(Duration::from_millis(1600)); // the late write finishes
    let pending = e.status().access.unwrap().pending_bytes;
    assert_eq!(pending, 0, "the copy is still pending");
    let err = a.read_snapshot(id, CL, &mut buf).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert!(e.teardown("t", true).is_err());

    // synchronous copies: a reader already waiting for the stripe that a stuck copy holds
    // gets EIO as soon as the writer's timeout breaks the access, not when the copy
    // finally finishes; so a teardown waiting for the gate does not hold up live writes
    // for that long. With write-behind no stripe is held while the fleecing storage is
    // slow, so the reader does not wait at all.
    for buffer in [0, 16 << 20] {
        let (_dir, e, id, a) = started(OnCbwError::BreakSnapshot, buffer, CL);
        let writer = {
            let a = a.clone();
            std::thread::spawn(move || a.write_live(2 * CL, &[0x44; 100]).unwrap())
        };
        std::thread::sleep(Duration::from_millis(50)); // the copy holds the stripe now
        let start = Instant::now();
        let r = a.read_snapshot(id, 2 * CL, &mut buf);
        let waited = start.elapsed();
        match (buffer, r) {
            (0, Err(err)) => assert_eq!(err.errno(), libc::EIO, "{err}"),
            (0, Ok(_)) => panic!("read succeeded while its copy timed out"),
            // had it waited for the stripe, the timeout would have broken the access
            // first (EIO)
            (_, r) => {
                assert_eq!(r.unwrap(), 100);
                assert_eq!(buf, [0x11; 100]);
            }
        }
        assert!(
            waited < NOT_STUCK,
            "reader waited {waited:?} for a stuck copy"
        );
        writer.join().unwrap();
        assert!(e.teardown("t", false).is_ok());
    }

    // A buffer too small for one cluster: the engine copies synchronously (on the copy
    // pool), so the writer is still bounded by the timeout and a reader of the cluster
    // gets EIO once the access breaks, not after the slow copy.
    let (_dir, e, id, a) = started(OnCbwError::BreakSnapshot, 32 << 10, CL);
    let start = Instant::now();
    let writer = {
        let a = a.clone();
        std::thread::spawn(move || {
            a.write_live(3 * CL, &[0x55; 100]).unwrap();
            start.elapsed()
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let err = a.read_snapshot(id, 3 * CL, &mut buf).unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    assert!(
        start.elapsed() < Duration::from_millis(1000),
        "reader waited {:?}",
        start.elapsed()
    );
    let waited = writer.join().unwrap();
    assert!(
        waited < Duration::from_millis(1000),
        "writer waited {waited:?}"
    );
    assert!(e.status().access.unwrap().broken);
    assert!(e.teardown("t", false).is_ok());
    std::env::set_var("FLEECEFS_FAULT_CBW", "");

    // Write-behind, 4 KiB clusters (16 in one 64 KiB lock unit): a snapshot reader stuck
    // reading the fleecing file holds no lock while it reads, so a writer that must copy
    // another cluster of that unit does not wait for it, and nothing breaks. The reader
    // returns the point-in-time data of its cluster.
    let (_dir, e, id, a) = started(OnCbwError::BreakSnapshot, 16 << 20, 4096);
    a.write_live(0, &[0x66; 4096]).unwrap();
    assert!(e.wait_for_copies(Duration::from_secs(5)), "copy not stored");
    let reader = stuck_reader(&a, id, 0);
    std::thread::sleep(SETTLE); // the reader is in the fleecing file
    let start = Instant::now();
    a.write_live(4096, &[0x77; 4096]).unwrap();
    let waited = start.elapsed();
    assert!(
        waited < NOT_STUCK,
        "writer waited {waited:?} for a stuck reader"
    );
    assert!(!e.status().access.unwrap().broken);
    assert_eq!(
        reader.join().unwrap().unwrap(),
        0x11,
        "not the point-in-time data"
    );
    std::env::set_var("FLEECEFS_FAULT_FLEECE_READ", "");
    assert!(e.teardown("t", false).is_ok());

    // Nor does a stuck reader hold up a discard of its own clusters: the discard is done
    // at once, and the reader, finding its cluster discarded after reading it, stops
    // there (EACCES: the first byte is gone) instead of serving data whose fleecing
    // space may be punched already.
    let (_dir, e, id, a) = started(OnCbwError::BreakSnapshot, 16 << 20, CL);
    a.write_live(4 * CL, &[0x88; 100]).unwrap();
    assert!(e.wait_for_copies(Duration::from_secs(5)), "copy not stored");
    let reader = stuck_reader(&a, id, 4 * CL);
    std::thread::sleep(SETTLE); // the reader is in the fleecing file
    let start = Instant::now();
    a.discard_snapshot(id, 4 * CL, CL).unwrap();
    assert!(
        start.elapsed() < NOT_STUCK,
        "discard waited {:?}",
        start.elapsed()
    );
    let r = reader.join().unwrap();
    assert_eq!(
        r.unwrap_err().errno(),
        libc::EACCES,
        "discarded data served"
    );
    std::env::set_var("FLEECEFS_FAULT_FLEECE_READ", "");

    // A snapshot reader stuck reading the fleecing file holds neither teardown nor the
    // live writes after it. The stuck read, overtaken by the teardown, returns ESTALE
    // rather than its data.
    a.write_live(5 * CL, &[0x88; 100]).unwrap();
    assert!(e.wait_for_copies(Duration::from_secs(5)), "copy not stored");
    let reader = stuck_reader(&a, id, 5 * CL);
    std::thread::sleep(SETTLE); // the reader is in the fleecing file
    let start = Instant::now();
    assert!(e.teardown("t", false).is_ok());
    a.write_live(5 * CL, &[0x99; 100]).unwrap();
    let waited = start.elapsed();
    assert!(
        waited < NOT_STUCK,
        "teardown and a write waited {waited:?} for a stuck reader"
    );
    let r = reader.join().unwrap();
    assert_eq!(r.unwrap_err().errno(), libc::ESTALE);
    std::env::set_var("FLEECEFS_FAULT_FLEECE_READ", "");
}

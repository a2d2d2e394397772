//! Online device changes at the engine level (no FUSE): grows racing live writes during an
//! access (the snapshot keeps its size and content, the bitmaps cover every write and the
//! new ranges), device add/remove (open handles, slots never reused, the device record),
//! shrink (bitmaps invalid).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fleecefs::engine::{AddedBitmap, Engine, ResizedBitmaps, SizeRequest};
use fleecefs::source::Source;

mod support;
use support::EngineBuilder;

const CL: u64 = 64 << 10;

/// An engine with a state directory over `DIR/NAME.img` images of the given sizes (a
/// byte pattern, so moved data would show).
fn engine(dir: &Path, images: &[(&str, u64)]) -> Engine {
    let mut b = EngineBuilder::new(dir).cluster(CL).with_state();
    for (name, size) in images {
        let data: Vec<u8> = (0..*size).map(|i| (i * 7 % 251) as u8).collect();
        b = b.device(name, data);
    }
    b.build()
}

fn dirty_ranges(e: &Engine, slot: usize) -> Vec<(u64, u64)> {
    let a = e.device(slot).unwrap().access().unwrap();
    fleecefs::dirtymap::parse(&a.dirty_map().to_text()).unwrap()
}

fn covered(ranges: &[(u64, u64)], from: u64, to: u64) -> bool {
    (from..to)
        .step_by(4096)
        .all(|p| ranges.iter().any(|&(o, l)| o <= p && p < o + l))
}

/// Writers hammer the device (also right at and past its growing end) while it grows
/// five times during an access: every snapshot read returns the content at setup, the
/// snapshot keeps its size, no write past the end at the time succeeds, and the next
/// incremental's dirty map covers every grown range and every written cluster.
#[test]
fn grows_racing_writes_during_an_access_keep_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let size0 = 3 * CL + 1000;
    let e = Arc::new(engine(dir.path(), &[("d", size0)]));
    e.setup("t", None, Some("b")).unwrap();
    e.teardown("t", true).unwrap();
    let at_setup = std::fs::read(dir.path().join("d.img")).unwrap();
    // A full access of another target; target t's bitmap keeps tracking meanwhile.
    let (id, _) = {
        e.setup("full", None, None).unwrap();
        e.active().unwrap()
    };
    let dev = e.device(0).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3u64 {
        let (dev, stop) = (dev.clone(), stop.clone());
        writers.push(std::thread::spawn(move || {
            let mut n = 0u64;
            let mut x = w + 1;
            while !stop.load(Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let size = dev.size();
                // around the end, inside and outside, and anywhere
                let off = match x % 3 {
                    0 => size.saturating_sub(x % 9000),
                    1 => size + x % 5000,
                    _ => (x >> 8) % size,
                };
                let len = 1 + (x >> 20) % 9000;
                // A write crossing the end is cut there (short count); one at or past the
                // end fails (sizes only grow here, so `size` is a lower bound).
                match dev.write_live(off, &vec![(x >> 40) as u8 | 1; len as usize]) {
                    Ok(n) => {
                        let n = n as u64;
                        assert!(
                            n >= 1 && off + n <= dev.size(),
                            "a write past the end succeeded"
                        );
                        assert!(
                            n == len || off + len > size,
                            "a write inside the device was cut"
                        );
                    }
                    Err(_) => assert!(off >= size, "a write starting inside the device failed"),
                }
                n += 1;
            }
            n
        }));
    }
    let mut sizes = vec![size0];
    for k in 0..5u64 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let r = e
            .resize("d", SizeRequest::Grow(CL / 2 + k * 777), false)
            .unwrap();
        assert_eq!(r.old_size, *sizes.last().unwrap());
        sizes.push(r.new_size);
        assert_eq!(r.bitmaps, ResizedBitmaps::Grown);
    }
    stop.store(true, Ordering::Relaxed);
    let writes: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(writes > 50, "only {writes} writes");
    // the snapshot: old size, content at setup
    let acc = dev.access().unwrap();
    assert_eq!(acc.size(), size0);
    let mut buf = vec![0u8; size0 as usize + 4096];
    let n = dev.read_snapshot(id, 0, &mut buf).unwrap();
    assert_eq!(n as u64, size0);
    assert!(
        buf[..n] == at_setup[..],
        "the snapshot changed during the grows"
    );
    e.teardown("full", true).unwrap();
    // the next incremental covers the grown ranges (and the source has the new size)
    let final_size = *sizes.last().unwrap();
    assert_eq!(
        std::fs::metadata(dir.path().join("d.img")).unwrap().len(),
        final_size
    );
    e.setup("t", None, Some("b")).unwrap();
    let ranges = dirty_ranges(&e, 0);
    assert!(
        covered(&ranges, size0 - size0 % CL, final_size),
        "{ranges:?}"
    );
    e.teardown("t", false).unwrap();
    e.shutdown();
}

/// A removal under way (`begin_removal`) refuses opens of its device with EBUSY, and only
/// of that device, and setups, resizes and removals of it; a refused or abandoned removal
/// clears its mark and changes nothing.
#[test]
fn a_removal_under_way_refuses_opens_and_a_refused_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), &[("a", 4 * CL), ("b", 4 * CL)]);
    let (a, b) = (e.device_index("a").unwrap(), e.device_index("b").unwrap());
    let own = e.open_live(a).unwrap();
    {
        let r = e.begin_removal("a").unwrap();
        let Err(err) = e.open_live(a) else {
            panic!("opened a device being removed or removed")
        };
        assert_eq!(err.errno(), libc::EBUSY, "{err}");
        assert!(err.to_string().contains("being removed"), "{err}");
        e.open_live(b).unwrap().handle_released();
        // Nothing else changes the device meanwhile.
        for err in [
            e.begin_removal("a").map(drop).unwrap_err(),
            e.setup("t", None, None).map(drop).unwrap_err(),
            e.resize("a", SizeRequest::Grow(CL), false)
                .map(drop)
                .unwrap_err(),
        ] {
            assert_eq!(err.errno(), libc::EBUSY, "{err}");
            assert!(err.to_string().contains("being removed"), "{err}");
        }
        let err = r.check(0).unwrap_err();
        assert!(err.to_string().contains("is open (1 handle(s))"), "{err}");
        r.check(1).unwrap();
        // Finished with the handle still open: refused.
        let err = r.finish().unwrap_err();
        assert!(err.to_string().contains("is open"), "{err}");
    }
    assert!(
        e.device(a).is_some(),
        "a refused removal removed the device"
    );
    e.open_live(a).unwrap().handle_released();
    {
        let _abandoned = e.begin_removal("a").unwrap();
    }
    e.open_live(a).unwrap().handle_released();
    own.handle_released();
    e.remove_device("a").unwrap();
    let Err(err) = e.open_live(a) else {
        panic!("opened a device being removed or removed")
    };
    assert_eq!(err.errno(), libc::ENOENT, "{err}");
    e.open_live(b).unwrap().handle_released();
}

/// A device is added and removed while another is in an access; open handles block the
/// removal; slots are never reused; the record lists what is served.
#[test]
fn add_and_remove_keep_slots_and_respect_handles_and_accesses() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), &[("a", 4 * CL)]);
    let x = dir.path().join("x.img");
    std::fs::write(&x, vec![1u8; 2 * CL as usize]).unwrap();
    e.setup("t", Some(&["a".to_string()]), None).unwrap();
    let mut slots = Vec::new();
    for _ in 0..3 {
        let r = e.add_devices(&[("x".into(), x.clone())]).unwrap();
        assert_eq!(r.devices.len(), 1);
        let slot = e.device_index("x").unwrap();
        assert!(!slots.contains(&slot), "slot {slot} reused");
        slots.push(slot);
        assert!(
            e.device(slot).unwrap().access().is_none(),
            "x joined the access"
        );
        let d = e.open_live(slot).unwrap();
        d.write_live(0, b"hello").unwrap();
        let err = e.remove_device("x").unwrap_err();
        assert!(err.to_string().contains("is open"), "{err}");
        d.handle_released();
        drop(d);
        e.remove_device("x").unwrap();
        assert!(e.device(slot).is_none());
        // unlocked: another open with a lock succeeds
        drop(Source::open(&x).unwrap());
    }
    let err = e.remove_device("a").unwrap_err();
    assert!(err.to_string().contains("backup access"), "{err}");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("state/devices.json")).unwrap())
            .unwrap();
    assert_eq!(rec["devices"].as_array().unwrap().len(), 1);
    assert_eq!(rec["next_slot"].as_u64().unwrap(), 4);
    // the same file as a served device, a served name: refused, nothing changes
    let a_path = dir.path().join("a.img");
    assert!(e.add_devices(&[("y".into(), a_path)]).is_err());
    assert!(e.add_devices(&[("a".into(), x.clone())]).is_err());
    assert_eq!(e.devices().len(), 1);
    e.teardown("t", false).unwrap();
    e.shutdown();
}

/// A shrink needs the flag, is refused during an access of the device, and makes the
/// device's bitmaps invalid; writes past the new end fail.
#[test]
fn shrink_needs_the_flag_and_invalidates_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), &[("a", 8 * CL)]);
    e.setup("t", None, Some("b")).unwrap();
    let err = e
        .resize("a", SizeRequest::Absolute(4 * CL), true)
        .unwrap_err();
    assert!(err.to_string().contains("cannot shrink"), "{err}");
    e.teardown("t", true).unwrap();
    let err = e
        .resize("a", SizeRequest::Absolute(4 * CL), false)
        .unwrap_err();
    assert!(err.to_string().contains("would cut off its last"), "{err}");
    assert_eq!(e.device(0).unwrap().size(), 8 * CL);
    let r = e.resize("a", SizeRequest::Absolute(4 * CL), true).unwrap();
    assert_eq!(r.bitmaps, ResizedBitmaps::Invalid);
    let f = std::fs::File::open(dir.path().join("a.img")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 4 * CL);
    let d = e.device(0).unwrap();
    assert!(d.write_live(4 * CL, b"x").is_err());
    let mut b = [0u8; 1];
    assert_eq!(f.read_at(&mut b, 4 * CL).unwrap(), 0);
    let st = e.status();
    assert!(st.bitmaps.iter().all(|b| !b.consistent));
    let rep = e.setup("t", None, Some("b")).unwrap();
    assert_eq!(
        rep.devices[0].bitmap_action,
        fleecefs::engine::BitmapAction::Invalid
    );
    e.teardown("t", false).unwrap();
    e.shutdown();
}

/// `device add` reports the bitmaps it found for the device as data: used when the
/// source was not modified while it was not served, invalid (with the reason) when it
/// was; the message form is `TARGET/NAME: used|invalid (REASON)`.
#[test]
fn device_add_reports_its_bitmaps_as_used_or_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), &[("a", 4 * CL), ("c", 4 * CL)]);
    e.setup("t", None, Some("b")).unwrap();
    e.teardown("t", true).unwrap();
    let c = dir.path().join("c.img");
    e.remove_device("c").unwrap();
    let r = e.add_devices(&[("c".into(), c.clone())]).unwrap();
    let used = AddedBitmap {
        target: "t".into(),
        name: "b".into(),
        used: true,
        reason: None,
    };
    assert_eq!(r.devices[0].bitmaps, vec![used.clone()]);
    assert_eq!(AddedBitmap::list(&r.devices[0].bitmaps), "t/b: used");
    e.remove_device("c").unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&c)
        .unwrap()
        .write_all_at(b"changed while not served", 0)
        .unwrap();
    let r = e.add_devices(&[("c".into(), c)]).unwrap();
    let b = &r.devices[0].bitmaps;
    assert_eq!(b.len(), 1);
    assert!(!b[0].used && b[0].reason.is_some(), "{b:?}");
    let text = AddedBitmap::list(b);
    assert!(text.starts_with("t/b: invalid ("), "{text}");
    // JSON: objects, not formatted strings
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["devices"][0]["bitmaps"][0]["used"], false);
    assert_eq!(json["devices"][0]["bitmaps"][0]["name"], "b");
    e.shutdown();
}

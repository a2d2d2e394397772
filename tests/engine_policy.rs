//! Copy-before-write failure policy at the engine level: break-snapshot keeps the live
//! write working and breaks the snapshot; break-guest-write fails the write and keeps
//! the snapshot; the fleecing limit is enforced across devices and given back by discard;
//! a broken access cannot be torn down as a success, and its bitmap keeps every change.

use std::path::Path;

use fleecefs::cbw::OnCbwError;
use fleecefs::engine::{BitmapAction, Engine};
use fleecefs::error::Kind;

mod support;
use support::EngineBuilder;

const CL: u64 = 65536;

fn engine(dir: &Path, on_error: OnCbwError, limit: Option<u64>) -> Engine {
    EngineBuilder::new(dir)
        .cluster(CL)
        .filled_device("a", 0x11, CL * 32)
        .filled_device("b", 0x11, CL * 32)
        .on_cbw_error(on_error)
        .fleecing_limit(limit)
        .with_state()
        .build()
}

#[test]
fn break_snapshot_keeps_writes_working_and_breaks_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), OnCbwError::BreakSnapshot, Some(3 * CL));
    e.setup("t", None, Some("bm")).unwrap();
    e.teardown("t", true).unwrap();
    let (a, b) = (&e.devices()[0].clone(), &e.devices()[1].clone());
    // dirty a: 0, 1, 5 and b: 0, so the incremental exposes (and copies) only those
    for c in [0, 1, 5] {
        a.write_live(c * CL, &[0x21; 10]).unwrap();
    }
    b.write_live(0, &[0x21; 10]).unwrap();
    let r = e.setup("t", None, Some("bm")).unwrap();
    assert_eq!(r.devices[0].dirty_bytes, 3 * CL);
    let (id, _) = e.active().unwrap();
    // two clusters on a, one on b: the shared limit is reached exactly
    a.write_live(0, &vec![0x22; (2 * CL) as usize]).unwrap();
    b.write_live(0, &vec![0x22; CL as usize]).unwrap();
    assert!(e.status().access.unwrap().broken_reason.is_none());
    // the fourth cluster does not fit: the write still succeeds, the access breaks
    a.write_live(5 * CL, &[0x33; 100]).unwrap();
    let mut buf = vec![0u8; 100];
    a.read_live(5 * CL, &mut buf).unwrap();
    assert_eq!(buf, vec![0x33; 100], "the live write did not land");
    let st = e.status().access.unwrap();
    assert!(st.broken);
    assert!(st.broken_reason.unwrap().contains("fleecing limit"));
    assert!(st.broken_at.is_some());
    for d in [a, b] {
        let err = d.read_snapshot(id, 0, &mut buf).unwrap_err();
        assert_eq!(err.kind(), Kind::Broken);
        assert_eq!(err.errno(), libc::EIO);
    }
    // later writes copy nothing and succeed (cluster 9 is outside the map anyway)
    a.write_live(9 * CL, &[1u8; 10]).unwrap();
    assert!(e.status().errors.iter().any(|x| x.contains("broken")));
    // teardown --success is refused (after tearing down), the bitmap keeps every change
    let err = e.teardown("t", true).unwrap_err();
    assert!(err.to_string().contains("cannot be trusted"), "{err}");
    assert!(e.active().is_none());
    let r = e.setup("t", None, Some("bm")).unwrap();
    assert_eq!(r.devices[0].bitmap_action, BitmapAction::Used);
    // a: clusters 0, 1, 5, 9 written during the broken access
    assert_eq!(r.devices[0].dirty_bytes, 4 * CL);
    assert_eq!(r.devices[1].dirty_bytes, CL);
    e.teardown("t", false).unwrap();
}

#[test]
fn break_guest_write_fails_the_write_and_keeps_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), OnCbwError::BreakGuestWrite, Some(2 * CL));
    e.setup("t", None, None).unwrap();
    let (id, _) = e.active().unwrap();
    let a = &e.devices()[0].clone();
    a.write_live(0, &vec![0x22; (2 * CL) as usize]).unwrap();
    let err = a.write_live(4 * CL, &vec![0x44; 512]).unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    let mut buf = vec![0u8; 512];
    a.read_live(4 * CL, &mut buf).unwrap();
    assert_eq!(
        buf,
        vec![0x11; 512],
        "a refused write changed the live data"
    );
    assert!(!e.status().access.unwrap().broken);
    let mut snap = vec![0u8; (5 * CL) as usize];
    assert_eq!(a.read_snapshot(id, 0, &mut snap).unwrap(), snap.len());
    assert!(snap.iter().all(|&x| x == 0x11), "snapshot changed");
    // discarding copied clusters gives the space back: the write goes through now
    a.discard_snapshot(id, 0, CL).unwrap();
    a.write_live(4 * CL, &vec![0x44; 512]).unwrap();
    assert_eq!(a.read_snapshot(id, 4 * CL, &mut buf).unwrap(), 512);
    assert_eq!(buf, vec![0x11; 512]);
    e.teardown("t", true).unwrap();
}

/// Regression: `bitmap remove` of one target during another target's
/// access on some devices must not stop tracking that target's bitmaps on the others.
#[test]
fn bitmap_remove_during_an_access_keeps_other_targets_tracking() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), OnCbwError::BreakSnapshot, None);
    let only = |d: &str| Some(vec![d.to_string()]);
    for t in ["t", "x"] {
        e.setup(t, None, Some("bm")).unwrap();
        e.teardown(t, true).unwrap();
    }
    e.setup("t", only("a").as_deref(), Some("bm")).unwrap();
    e.remove_bitmaps("x").unwrap();
    e.teardown("t", true).unwrap();
    e.devices()[1].write_live(3 * CL, &[1u8; 100]).unwrap();
    let r = e.setup("t", only("b").as_deref(), Some("bm")).unwrap();
    assert_eq!(r.devices[0].bitmap_action, BitmapAction::Used);
    assert_eq!(
        r.devices[0].dirty_bytes, CL,
        "the write to b is missing from t's bitmap"
    );
    e.teardown("t", true).unwrap();
}

/// Copies a directory tree (the state dir at the instant of a simulated crash).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// Until the reply of a successful teardown is delivered, the bitmaps stay a superset of
/// what a failure leaves: a caller that never got the reply (the daemon died, the client
/// went away) treats the backup as failed, and its next incremental must still cover
/// every write since the last backup it kept. A daemon that dies at that point (its state
/// dir copied there, then mounted) recovers that superset; a success whose reply is not
/// delivered counts as a failure; one that is delivered keeps exactly the writes since
/// its setup, including those made while the reply was on its way.
#[test]
fn a_success_counts_only_once_its_reply_is_delivered() {
    for delivered in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path(), OnCbwError::BreakSnapshot, None);
        let only_a = Some(vec!["a".to_string()]);
        e.setup("t", only_a.as_deref(), Some("bm")).unwrap();
        e.teardown("t", true).unwrap();
        let a = e.devices()[0].clone();
        a.write_live(3 * CL, &[1u8; 100]).unwrap(); // before the setup: in the backup
        let r = e.setup("t", only_a.as_deref(), Some("bm")).unwrap();
        assert_eq!(r.devices[0].dirty_bytes, CL);
        a.write_live(7 * CL, &[2u8; 100]).unwrap(); // during the access
        let crashed = dir.path().join("state-at-crash");
        let mut outcome = None;
        e.teardown_reply("t", true, |r| {
            // between the two phases: live writes go on, and the daemon could die here
            a.write_live(9 * CL, &[3u8; 100]).unwrap();
            copy_tree(&dir.path().join("state"), &crashed);
            outcome = Some(r.unwrap().success);
            delivered
        });
        assert_eq!(outcome, Some(true));
        let r = e.setup("t", only_a.as_deref(), Some("bm")).unwrap();
        assert_eq!(r.devices[0].bitmap_action, BitmapAction::Used);
        let want = if delivered { 2 * CL } else { 3 * CL }; // 7, 9 (and 3)
        assert_eq!(r.devices[0].dirty_bytes, want, "delivered: {delivered}");
        e.teardown("t", false).unwrap();
        // the daemon dies between the phases: its state dir as it was then
        drop(a);
        drop(e);
        std::fs::remove_dir_all(dir.path().join("state")).unwrap();
        std::fs::rename(&crashed, dir.path().join("state")).unwrap();
        let e = engine(dir.path(), OnCbwError::BreakSnapshot, None);
        let r = e.setup("t", only_a.as_deref(), Some("bm")).unwrap();
        assert_eq!(r.devices[0].bitmap_action, BitmapAction::Used);
        assert_eq!(r.devices[0].dirty_bytes, 3 * CL, "crash between the phases");
        e.teardown("t", false).unwrap();
    }
}

/// A daemon that dies during an access recovers every write since the last successful
/// backup (bitmap |= background).
#[test]
fn a_crash_during_an_access_recovers_a_superset() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), OnCbwError::BreakSnapshot, None);
    e.setup("t", None, Some("bm")).unwrap();
    e.teardown("t", true).unwrap();
    let a = e.devices()[0].clone();
    a.write_live(3 * CL, &[1u8; 100]).unwrap();
    e.setup("t", None, Some("bm")).unwrap();
    a.write_live(7 * CL, &[2u8; 100]).unwrap();
    drop(a);
    drop(e); // nothing is closed or torn down
    let bg = dir.path().join("state/bitmaps/a@t@bm.background");
    assert!(bg.exists());
    let e = engine(dir.path(), OnCbwError::BreakSnapshot, None);
    assert!(!bg.exists());
    let r = e.setup("t", None, Some("bm")).unwrap();
    assert_eq!(r.devices[0].bitmap_action, BitmapAction::Used);
    assert_eq!(r.devices[0].dirty_bytes, 2 * CL);
    e.teardown("t", false).unwrap();
}

/// After a recorded success, a fleecing file that cannot be deleted is a warning, not a
/// failure (a caller that dropped the backup would lose the writes before its setup),
/// and the next setup removes it.
#[test]
#[cfg_attr(
    not(feature = "root-tests"),
    ignore = "needs root: chattr +i (CAP_LINUX_IMMUTABLE)"
)]
fn cleanup_errors_after_a_recorded_success_are_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), OnCbwError::BreakSnapshot, None);
    e.setup("t", None, Some("bm")).unwrap();
    e.teardown("t", true).unwrap();
    e.devices()[0].write_live(3 * CL, &[1u8; 100]).unwrap();
    e.setup("t", None, Some("bm")).unwrap();
    let fleece = dir.path().join("fleece/a.t.fleece");
    assert!(fleece.exists(), "{}", fleece.display());
    let chattr = |flag: &str| {
        let ok = std::process::Command::new("chattr")
            .arg(flag)
            .arg(&fleece)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "chattr {flag} failed (the test needs ext4-like attributes in /tmp)"
        );
    };
    chattr("+i");
    let r = e.teardown("t", true);
    chattr("-i");
    let r = r.expect("a cleanup error after a recorded success is not a failure");
    assert!(r.success);
    assert!(
        r.warnings.iter().any(|w| w.contains("a.t.fleece")),
        "{:?}",
        r.warnings
    );
    // the success stands: only writes since that setup are dirty
    let r = e.setup("t", None, Some("bm")).unwrap();
    assert_eq!(r.devices[0].bitmap_action, BitmapAction::Used);
    assert_eq!(r.devices[0].dirty_bytes, 0);
    e.teardown("t", false).unwrap();
}

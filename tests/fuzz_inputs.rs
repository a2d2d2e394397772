//! Property-based fuzzing of the two parsers that read untrusted input: the control
//! protocol (any local root process can send anything) and the bitmap file loader (files
//! on disk can be damaged). Neither may panic; a damaged bitmap must never load as valid.
//! Cases proptest found or that were written down by hand are kept below as regressions.

use std::os::unix::fs::FileExt;

use fleecefs::bitmap_file::{BitmapKind, CrashSafety, Header, TrackedBitmap, HEADER_LEN};
use fleecefs::control::proto::{parse_request, Request, MAX_REQUEST};
use fleecefs::source::Source;
use proptest::prelude::*;

fn valid_header(nbits: u64) -> Header {
    Header {
        in_use: false,
        crash_safe: true,
        synced: true,
        boot_id: [1; 16],
        cluster_size: 65536,
        source_size: nbits.saturating_mul(65536),
        source_dev: 1,
        source_ino: 2,
        source_mtime_ns: 3,
        nbits,
        generation: 4,
        sequence: 5,
        kind: BitmapKind::Target,
        data_crc: 6,
        device: "dev".into(),
        target: "tgt".into(),
        name: "bm".into(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn control_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_request(&bytes);
    }

    #[test]
    fn control_parser_handles_json_shaped_input(
        op in "[a-z_]{0,12}",
        target in any::<String>(),
        extra in proptest::option::of("[a-z]{1,8}"),
        success in any::<bool>(),
    ) {
        let mut v = serde_json::json!({"op": op, "target": target, "success": success});
        if let Some(k) = extra {
            v[k] = serde_json::json!(1);
        }
        let line = serde_json::to_vec(&v).unwrap();
        if let Ok(req) = parse_request(&line) {
            // anything accepted round-trips to the same request
            let again = serde_json::to_vec(&req).unwrap();
            prop_assert_eq!(parse_request(&again).unwrap(), req);
        }
    }

    #[test]
    fn header_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
        let _ = Header::decode(&bytes);
    }

    #[test]
    fn any_flipped_header_byte_is_detected(pos in 0usize..HEADER_LEN, bit in 0u8..8) {
        let mut b = valid_header(1000).encode();
        b[pos] ^= 1 << bit;
        prop_assert!(Header::decode(&b).is_err());
    }

}

proptest! {
    // Each case creates files: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn damaged_bitmap_files_never_load_as_valid(
        garbage in proptest::collection::vec(any::<u8>(), 0..6000),
        keep_header in any::<bool>(),
        flip in 0usize..4200,
    ) {
        let (_dir, d, source, path) = bitmap_place();
        let mut bytes = garbage;
        if keep_header {
            // a real, clean bitmap file, then one byte of it damaged
            let t = TrackedBitmap::create(&d, "x.bitmap", &source, 65536, 64, BitmapKind::Target,
                "dev", "tgt", "bm", true, CrashSafety::Sync).unwrap();
            t.close_clean(&source).unwrap();
            drop(t);
            bytes = std::fs::read(&path).unwrap();
            let i = flip % bytes.len();
            bytes[i] ^= 0x40;
        }
        std::fs::write(&path, &bytes).unwrap();
        match TrackedBitmap::open(&d, "x.bitmap", &source, 65536, CrashSafety::Sync) {
            Ok(Ok(_)) => prop_assert!(false, "damaged file loaded as valid"),
            Ok(Err(_reason)) => {}
            Err(e) => prop_assert!(false, "loader failed instead of reporting invalid: {e}"),
        }
    }
}

#[test]
fn regressions_control() {
    // unit variants used to ignore unknown fields ("status" with extras was accepted)
    assert!(parse_request(br#"{"op":"status","x":1}"#).is_err());
    assert!(parse_request(br#"{"op":"bitmap_remove","target":"t","x":1}"#).is_err());
    assert!(parse_request(br#"{"op":"setup","target":"t","devices":[1]}"#).is_err());
    assert!(parse_request(br#"{"op":"setup","target":"t","devices":null}"#).is_ok());
    assert!(parse_request(&vec![b'{'; MAX_REQUEST + 1]).is_err());
    assert!(parse_request(b"\xff\xfe").is_err());
    assert_eq!(
        parse_request(br#"{"op":"bitmap_remove","target":"t"}"#).unwrap(),
        Request::BitmapRemove { target: "t".into() }
    );
}

/// A place for bitmap `x.bitmap`: a temporary directory, held open as the bitmap store
/// holds its directory; a zeroed source of 64 clusters of 64 KiB; the bitmap file's path.
fn bitmap_place() -> (
    tempfile::TempDir,
    std::sync::Arc<fleecefs::secure_path::Dir>,
    Source,
    std::path::PathBuf,
) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, vec![0u8; 64 * 65536]).unwrap();
    let source = Source::open(&src).unwrap();
    let path = dir.path().join("x.bitmap");
    let held = std::sync::Arc::new(fleecefs::secure_path::Dir::new(
        std::fs::File::open(dir.path()).unwrap(),
        dir.path().to_path_buf(),
    ));
    (dir, held, source, path)
}

#[test]
fn regressions_bitmap_loader() {
    let (_dir, d, source, path) = bitmap_place();
    // a header claiming an absurd number of bits (would map terabytes)
    let mut h = valid_header(u64::MAX / 2);
    h.source_size = 64 * 65536;
    let f = std::fs::File::create(&path).unwrap();
    f.write_all_at(&h.encode(), 0).unwrap();
    assert!(matches!(
        TrackedBitmap::open(&d, "x.bitmap", &source, 65536, CrashSafety::Sync),
        Ok(Err(_))
    ));
    // a name length byte past its field
    let mut b = valid_header(64).encode();
    b[88] = 200;
    assert!(Header::decode(&b).is_err());
    // empty and header-only files
    std::fs::write(&path, b"").unwrap();
    assert!(matches!(
        TrackedBitmap::open(&d, "x.bitmap", &source, 65536, CrashSafety::Sync),
        Ok(Err(_))
    ));
    std::fs::write(&path, &b[..HEADER_LEN - 1]).unwrap();
    assert!(matches!(
        TrackedBitmap::open(&d, "x.bitmap", &source, 65536, CrashSafety::Sync),
        Ok(Err(_))
    ));
}

//! A hostile guest: malformed descriptor chains built with `virtio-queue`'s mock queue in
//! guest memory, popped through a real `Queue` and served as the backend serves them.
//! Each must fail alone (`IOERR`, `UNSUPP`, or no status at all when the status byte is
//! not in guest memory or the chain is malformed), touch nothing outside
//! the guest's memory, and leave the device as it was.

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::request::{serve_chain, Malformed, Outcome, Target};
use crate::cbw::Device;
use crate::source::Source;
use crate::units::ClusterSize;

const MEM: u64 = 0x40_0000;
const DATA: u64 = 0x10_0000;
const DEV_SIZE: u64 = 1 << 20;
const W: u16 = VRING_DESC_F_WRITE as u16;

struct Guest {
    mem: GuestMemoryMmap<()>,
    device: Device,
    _dir: tempfile::TempDir,
    image: File,
}

impl Guest {
    fn new() -> Guest {
        Guest::with_regions(&[(0, MEM)])
    }

    /// A guest whose memory is the regions `(start, len)`.
    fn with_regions(regions: &[(u64, u64)]) -> Guest {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("d.img");
        let image = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("an image");
        image.set_len(DEV_SIZE).expect("its size");
        image.write_all_at(&[0xaa; 4096], 0).expect("a pattern");
        let device = Device::new(
            "vm".into(),
            Source::open(&path).expect("the source"),
            ClusterSize::new(65536).expect("a cluster size"),
        );
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .map(|&(start, len)| (GuestAddress(start), len as usize))
            .collect();
        let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).expect("guest memory");
        Guest {
            mem,
            device,
            _dir: dir,
            image,
        }
    }

    fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).expect("header");
    }

    /// Serves the chain `descs` (linked in order unless `raw`); returns the outcome.
    fn serve(
        &self,
        descs: &[(u64, u32, u16)],
        read_only: bool,
        raw: bool,
    ) -> Result<Outcome, Malformed> {
        let q = MockSplitQueue::new(&self.mem, 256);
        let descs: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                RawDescriptor::from(Descriptor::new(addr, len, flags, i as u16 + 1))
            })
            .collect();
        let chain = if raw {
            q.build_multiple_desc_chains(&descs)
        } else {
            q.build_desc_chain(&descs)
        }
        .expect("a chain in the mock queue");
        let target = Target {
            device: &self.device,
            serial: b"vm",
            read_only,
            changed: &|_, _| {},
        };
        serve_chain(&target, &self.mem, chain)
    }

    fn status_at(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).expect("status byte")
    }

    fn image_unchanged(&self) {
        let mut b = vec![0u8; 8192];
        self.image
            .read_exact_at(&mut b, 0)
            .expect("reading the image");
        assert!(b[..4096].iter().all(|&x| x == 0xaa), "the image changed");
        assert!(b[4096..].iter().all(|&x| x == 0), "the image changed");
    }
}

fn status(o: Result<Outcome, Malformed>) -> u8 {
    o.expect("a status").status
}

#[test]
fn well_formed_read_and_write() {
    let g = Guest::new();
    g.header(DATA, VIRTIO_BLK_T_IN, 0);
    let o = g
        .serve(
            &[
                (DATA, 16, 0),
                (DATA + 0x1000, 512, W),
                (DATA + 0x2000, 1, W),
            ],
            false,
            false,
        )
        .expect("served");
    assert_eq!((o.status, o.written), (VIRTIO_BLK_S_OK as u8, 513));
    let mut b = [0u8; 512];
    g.mem
        .read_slice(&mut b, GuestAddress(DATA + 0x1000))
        .expect("data");
    assert!(b.iter().all(|&x| x == 0xaa));
    g.header(DATA, VIRTIO_BLK_T_GET_ID, 0);
    let o = g
        .serve(
            &[(DATA, 16, 0), (DATA + 0x1000, 20, W), (DATA + 0x2000, 1, W)],
            false,
            false,
        )
        .expect("served");
    assert_eq!(o.status, VIRTIO_BLK_S_OK as u8);
    let mut id = [0u8; 20];
    g.mem
        .read_slice(&mut id, GuestAddress(DATA + 0x1000))
        .expect("id");
    assert_eq!(&id[..3], b"vm\0");
}

#[test]
fn a_buffer_spanning_two_regions_is_read_and_written_whole() {
    let half = MEM / 2;
    let g = Guest::with_regions(&[(0, half), (half, half)]);
    let buf = half - 256;
    g.header(DATA, VIRTIO_BLK_T_IN, 0);
    let o = g
        .serve(
            &[(DATA, 16, 0), (buf, 512, W), (DATA + 0x2000, 1, W)],
            false,
            false,
        )
        .expect("served");
    assert_eq!((o.status, o.written), (VIRTIO_BLK_S_OK as u8, 513));
    let mut b = [0u8; 512];
    g.mem.read_slice(&mut b, GuestAddress(buf)).expect("data");
    assert!(
        b.iter().all(|&x| x == 0xaa),
        "the read did not fill both regions"
    );
    g.mem
        .write_slice(&[0x55; 512], GuestAddress(buf))
        .expect("a pattern");
    g.header(DATA, VIRTIO_BLK_T_OUT, 16);
    let o = g
        .serve(
            &[(DATA, 16, 0), (buf, 512, 0), (DATA + 0x2000, 1, W)],
            false,
            false,
        )
        .expect("served");
    assert_eq!(o.status, VIRTIO_BLK_S_OK as u8);
    let mut b = [0u8; 512];
    g.image.read_exact_at(&mut b, 16 * 512).expect("the image");
    assert!(
        b.iter().all(|&x| x == 0x55),
        "the write did not take both regions"
    );
}

/// A descriptor outside guest memory fails the request with IOERR in its status byte:
/// returned without a status, the request would look done to a driver that finds its
/// status byte as it left it (0 is OK). Only a status byte outside guest memory leaves
/// nothing to write.
#[test]
fn descriptors_outside_guest_memory_fail_the_request() {
    let g = Guest::new();
    let status = DATA + 0x2000;
    // Data past the end of guest memory, straddling it, at the end of the address space:
    // of a write, and of a read.
    for (kind, flags) in [(VIRTIO_BLK_T_OUT, 0), (VIRTIO_BLK_T_IN, W)] {
        g.header(DATA, kind, 0);
        for (addr, len) in [(MEM + 0x1000, 512), (MEM - 256, 512), (u64::MAX - 100, 512)] {
            g.mem
                .write_obj(0u8, GuestAddress(status))
                .expect("status byte");
            let o = g
                .serve(
                    &[(DATA, 16, 0), (addr, len, flags), (status, 1, W)],
                    false,
                    false,
                )
                .unwrap_or_else(|e| panic!("type {kind}, data at {addr:#x}+{len}: {e:?}"));
            assert_eq!(
                o.status, VIRTIO_BLK_S_IOERR as u8,
                "data at {addr:#x}+{len}"
            );
            assert_eq!(o.written, 1);
            assert_eq!(g.status_at(status), VIRTIO_BLK_S_IOERR as u8);
        }
    }
    // The status byte itself outside guest memory (or straddling it): nothing to write.
    g.header(DATA, VIRTIO_BLK_T_OUT, 0);
    for addr in [MEM + 0x1000, MEM - 1] {
        let r = g.serve(
            &[(DATA, 16, 0), (DATA + 0x1000, 512, 0), (addr, 2, W)],
            false,
            false,
        );
        assert!(r.is_err(), "a status byte at {addr:#x} was served");
    }
    g.image_unchanged();
}

#[test]
fn requests_past_the_end_or_overflowing_fail_with_ioerr() {
    let g = Guest::new();
    let sectors = DEV_SIZE / 512;
    for (kind, sector) in [
        (VIRTIO_BLK_T_OUT, sectors),
        (VIRTIO_BLK_T_OUT, sectors - 1),
        (VIRTIO_BLK_T_OUT, u64::MAX),
        (VIRTIO_BLK_T_OUT, u64::MAX / 512),
        (VIRTIO_BLK_T_IN, u64::MAX / 512 + 1),
    ] {
        g.header(DATA, kind, sector);
        let o = g.serve(
            &[
                (DATA, 16, 0),
                (
                    DATA + 0x1000,
                    1024,
                    if kind == VIRTIO_BLK_T_IN { W } else { 0 },
                ),
                (DATA + 0x2000, 1, W),
            ],
            false,
            false,
        );
        assert_eq!(
            status(o),
            VIRTIO_BLK_S_IOERR as u8,
            "type {kind} sector {sector}"
        );
        assert_eq!(g.status_at(DATA + 0x2000), VIRTIO_BLK_S_IOERR as u8);
    }
    // Not whole sectors.
    g.header(DATA, VIRTIO_BLK_T_OUT, 0);
    let o = g.serve(
        &[
            (DATA, 16, 0),
            (DATA + 0x1000, 100, 0),
            (DATA + 0x2000, 1, W),
        ],
        false,
        false,
    );
    assert_eq!(status(o), VIRTIO_BLK_S_IOERR as u8);
    // A short header.
    let o = g.serve(&[(DATA, 8, 0), (DATA + 0x2000, 1, W)], false, false);
    assert_eq!(status(o), VIRTIO_BLK_S_IOERR as u8);
    g.image_unchanged();
}

#[test]
fn malformed_chains_fail_without_a_status() {
    let g = Guest::new();
    g.header(DATA, VIRTIO_BLK_T_OUT, 0);
    // No writable byte for the status.
    assert!(g
        .serve(&[(DATA, 16, 0), (DATA + 0x1000, 512, 0)], false, false)
        .is_err());
    // A readable descriptor after a writable one.
    assert!(g
        .serve(
            &[
                (DATA, 16, 0),
                (DATA + 0x2000, 1, W),
                (DATA + 0x1000, 512, 0)
            ],
            false,
            false
        )
        .is_err());
    // A loop: 0 -> 1 -> 0 -> ... ; virtio-queue stops after a queue's worth.
    let looping = [
        (DATA, 16, VRING_DESC_F_NEXT as u16),
        (DATA + 0x2000, 1, W | VRING_DESC_F_NEXT as u16),
    ];
    let q = MockSplitQueue::new(&g.mem, 256);
    let descs: Vec<RawDescriptor> = looping
        .iter()
        .enumerate()
        .map(|(i, &(a, l, f))| RawDescriptor::from(Descriptor::new(a, l, f, (i as u16 + 1) % 2)))
        .collect();
    q.add_desc_chains(&descs, 0).expect("the looping chain");
    let mut queue: Queue = q.create_queue().expect("a queue");
    let chain = queue.iter(&g.mem).expect("avail").next().expect("a chain");
    let n = chain.clone().count();
    assert!(n <= 256, "a looping chain gave {n} descriptors");
    let target = Target {
        device: &g.device,
        serial: b"vm",
        read_only: false,
        changed: &|_, _| {},
    };
    // It repeats readable after writable: malformed, and nothing written to the device.
    assert!(serve_chain(&target, &g.mem, chain).is_err());
    // An indirect descriptor pointing outside guest memory.
    let r = g.serve(
        &[(MEM + 0x10000, 64, VRING_DESC_F_INDIRECT as u16)],
        false,
        true,
    );
    assert!(r.is_err());
    g.image_unchanged();
}

#[test]
fn unsupported_types_and_read_only_writes() {
    let g = Guest::new();
    g.header(DATA, 99, 0);
    let o = g.serve(&[(DATA, 16, 0), (DATA + 0x2000, 1, W)], false, false);
    assert_eq!(status(o), VIRTIO_BLK_S_UNSUPP as u8);
    g.header(DATA, VIRTIO_BLK_T_OUT, 0);
    let o = g.serve(
        &[
            (DATA, 16, 0),
            (DATA + 0x1000, 512, 0),
            (DATA + 0x2000, 1, W),
        ],
        true,
        false,
    );
    assert_eq!(status(o), VIRTIO_BLK_S_IOERR as u8);
    // Discard with the unmap flag (only write zeroes takes it) and with too many segments.
    g.header(DATA, VIRTIO_BLK_T_DISCARD, 0);
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    seg[12..].copy_from_slice(&1u32.to_le_bytes());
    g.mem
        .write_slice(&seg, GuestAddress(DATA + 0x1000))
        .expect("segment");
    let o = g.serve(
        &[(DATA, 16, 0), (DATA + 0x1000, 16, 0), (DATA + 0x2000, 1, W)],
        false,
        false,
    );
    assert_eq!(status(o), VIRTIO_BLK_S_UNSUPP as u8);
    let o = g.serve(
        &[(DATA, 16, 0), (DATA + 0x1000, 32, 0), (DATA + 0x2000, 1, W)],
        false,
        false,
    );
    assert_eq!(status(o), VIRTIO_BLK_S_IOERR as u8);
    g.image_unchanged();
}

//! One virtio-blk request: its descriptor chain taken apart into guest memory slices,
//! and its execution as engine calls on the device.
//!
//! The guest is untrusted. `virtio-queue` bounds a chain (no loops, at most a queue's or
//! an indirect table's worth of descriptors, at most 4 GiB in total); every address and
//! length of a descriptor is then checked against the guest's memory regions here
//! (`get_slices`), and every offset and length derived from the request with checked
//! arithmetic. A request that fails a check fails alone: `IOERR` when its status byte
//! can be written, otherwise it is returned with nothing written.

use std::fs::File;

use smallvec::SmallVec;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::cbw::Device;
use crate::error::{Error, Kind, Result};
use crate::sys;

/// The sector of virtio-blk: offsets and capacity count 512-byte units.
pub const SECTOR: u64 = 512;
/// Most descriptors a request may have (indirect tables allow 65535).
pub const MAX_SEGMENTS: usize = 1024;
/// Most segments a discard or write-zeroes request may carry (`max_discard_seg`,
/// `max_write_zeroes_seg` in the configuration space).
pub const MAX_RANGE_SEGMENTS: u32 = 1;
/// Most sectors one discard or write-zeroes segment may cover (1 GiB).
pub const MAX_RANGE_SECTORS: u32 = 1 << 21;

/// The header every request starts with (`struct virtio_blk_outhdr`).
const HEADER_LEN: usize = 16;
/// One segment of a discard or write-zeroes request.
const RANGE_LEN: usize = 16;
/// Slices a request's readable or writable part usually has (a header, a data buffer, a
/// status byte): up to this many are kept without a heap allocation.
const INLINE_SLICES: usize = 4;

/// Guest memory slices (or their iovecs) of one request.
type Slices<T> = SmallVec<[T; INLINE_SLICES]>;

/// Guest memory of a request: the slices of its readable (driver to device) or its
/// writable descriptors, in chain order.
#[derive(Default)]
pub struct Segments<'a> {
    slices: Slices<VolatileSlice<'a>>,
    len: u64,
}

impl<'a> Segments<'a> {
    fn push(&mut self, s: VolatileSlice<'a>) {
        self.len += s.len() as u64;
        self.slices.push(s);
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The slices covering `[start, start + len)` of these segments.
    fn range(&self, start: u64, len: u64) -> Option<Slices<VolatileSlice<'a>>> {
        if start.checked_add(len)? > self.len {
            return None;
        }
        let (mut skip, mut left) = (start, len);
        let mut out = Slices::new();
        for s in &self.slices {
            if left == 0 {
                break;
            }
            let n = s.len() as u64;
            if skip >= n {
                skip -= n;
                continue;
            }
            let take = (n - skip).min(left);
            out.push(s.subslice(skip as usize, take as usize).ok()?);
            skip = 0;
            left -= take;
        }
        Some(out)
    }

    /// Copies `[start, start + buf.len())` out of guest memory.
    fn read(&self, start: u64, buf: &mut [u8]) -> Option<()> {
        let mut at = 0;
        for s in self.range(start, buf.len() as u64)? {
            s.copy_to(&mut buf[at..at + s.len()]);
            at += s.len();
        }
        Some(())
    }

    /// Copies `data` into guest memory at `start`.
    fn write(&self, start: u64, data: &[u8]) -> Option<()> {
        let mut at = 0;
        for s in self.range(start, data.len() as u64)? {
            s.copy_from(&data[at..at + s.len()]);
            at += s.len();
        }
        Some(())
    }
}

/// A descriptor chain taken apart: readable segments, then writable ones (a readable
/// descriptor after a writable one is malformed).
pub struct Chain<'a> {
    pub readable: Segments<'a>,
    pub writable: Segments<'a>,
    /// A descriptor (not the status byte's) lies outside guest memory: left out, and the
    /// request fails with `IOERR` in its status byte.
    pub unmapped: bool,
}

/// Why a chain cannot even carry a status byte back.
#[derive(Debug)]
pub struct Malformed(pub &'static str);

impl<'a> Chain<'a> {
    /// Maps every descriptor of `descs` (address, length, writable) into `mem`. A
    /// descriptor outside guest memory fails the request: with `IOERR` when the status
    /// byte (the last byte of the last descriptor, writable) is in guest memory, so the
    /// driver never takes an untouched status byte for success; else `Malformed`.
    pub fn map(
        mem: &'a GuestMemoryMmap<()>,
        descs: impl Iterator<Item = (GuestAddress, u32, bool)>,
    ) -> std::result::Result<Chain<'a>, Malformed> {
        let mut chain = Chain {
            readable: Segments::default(),
            writable: Segments::default(),
            unmapped: false,
        };
        let mut count = 0;
        let (mut any_writable, mut last_mapped) = (false, false);
        for (addr, len, writable) in descs {
            count += 1;
            if count > MAX_SEGMENTS {
                return Err(Malformed("too many descriptors"));
            }
            if !writable && any_writable {
                return Err(Malformed("a readable descriptor after a writable one"));
            }
            any_writable |= writable;
            let segments = if writable {
                &mut chain.writable
            } else {
                &mut chain.readable
            };
            // Nearly every descriptor lies in one region: one lookup. One that spans
            // regions (or lies outside them) takes the iterator, which checks each piece.
            last_mapped = match GuestMemoryBackend::get_slice(mem, addr, len as usize) {
                Ok(s) if len > 0 => {
                    segments.push(s);
                    true
                }
                _ => {
                    let pieces: std::result::Result<Slices<VolatileSlice<'a>>, _> =
                        GuestMemoryBackend::get_slices(mem, addr, len as usize).collect();
                    match pieces {
                        Ok(pieces) => {
                            pieces.into_iter().for_each(|s| segments.push(s));
                            true
                        }
                        Err(_) => false,
                    }
                }
            };
            chain.unmapped |= !last_mapped;
        }
        if chain.unmapped && !(last_mapped && any_writable && !chain.writable.is_empty()) {
            return Err(Malformed("a descriptor outside guest memory"));
        }
        Ok(chain)
    }
}

/// What a request came to: the status for the guest and the bytes written into its
/// buffers (the used length, status byte included).
pub struct Outcome {
    pub status: u8,
    pub written: u32,
}

/// The export a request runs against.
pub struct Target<'d> {
    pub device: &'d Device,
    pub serial: &'d [u8],
    pub read_only: bool,
    /// Told each range a request wrote, discarded or zeroed (also when it failed: part
    /// of it may have changed), so that the kernel's cache of `live/NAME` drops it.
    pub changed: &'d dyn Fn(u64, u64),
}

/// Maps a descriptor chain popped from a queue and executes it.
pub fn serve_chain<M>(
    target: &Target<'_>,
    mem: &GuestMemoryMmap<()>,
    chain: virtio_queue::DescriptorChain<M>,
) -> std::result::Result<Outcome, Malformed>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let descs = chain.map(|d| (d.addr(), d.len(), d.is_write_only()));
    Chain::map(mem, descs).and_then(|c| execute(target, &c))
}

/// Executes one request; `Err` only when the chain has no room for a status byte.
pub fn execute(target: &Target<'_>, chain: &Chain<'_>) -> std::result::Result<Outcome, Malformed> {
    let status_at = chain
        .writable
        .len()
        .checked_sub(1)
        .ok_or(Malformed("no status byte"))?;
    let mut header = [0u8; HEADER_LEN];
    let (status, data_written) = match chain.readable.read(0, &mut header) {
        _ if chain.unmapped => (VIRTIO_BLK_S_IOERR as u8, 0),
        None => (VIRTIO_BLK_S_IOERR as u8, 0),
        Some(()) => {
            let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&header[8..16]);
            let sector = u64::from_le_bytes(sector);
            run(target, chain, kind, sector, status_at)
        }
    };
    // `status_at` is inside the writable segments: this cannot fail.
    let _ = chain.writable.write(status_at, &[status]);
    let written = data_written
        .checked_add(1)
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(u32::MAX);
    Ok(Outcome { status, written })
}

/// Runs a parsed request; returns the status and the data bytes written to the guest.
fn run(target: &Target<'_>, chain: &Chain<'_>, kind: u32, sector: u64, data_in: u64) -> (u8, u64) {
    let data_out = chain.readable.len().saturating_sub(HEADER_LEN as u64);
    let ok = VIRTIO_BLK_S_OK as u8;
    let r: Result<u64> = match kind {
        VIRTIO_BLK_T_IN => {
            let r = byte_range(target.device, sector, data_in).and_then(|offset| {
                let slices = chain.writable.range(0, data_in).ok_or_else(bad_chain)?;
                target.device.read_live_with(offset, data_in, |file| {
                    transfer(file, &slices, offset, false)
                })
            });
            r.map(|()| data_in)
        }
        VIRTIO_BLK_T_OUT if target.read_only => Err(read_only()),
        VIRTIO_BLK_T_OUT => byte_range(target.device, sector, data_out).and_then(|offset| {
            let slices = chain
                .readable
                .range(HEADER_LEN as u64, data_out)
                .ok_or_else(bad_chain)?;
            let r = target.device.write_live_with(offset, data_out, |file| {
                transfer(file, &slices, offset, true)
            });
            (target.changed)(offset, data_out);
            r.map(|()| 0)
        }),
        VIRTIO_BLK_T_FLUSH => target.device.sync_live(true).map(|()| 0),
        VIRTIO_BLK_T_GET_ID => {
            let n = data_in.min(u64::from(VIRTIO_BLK_ID_BYTES)) as usize;
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let len = target.serial.len().min(id.len());
            id[..len].copy_from_slice(&target.serial[..len]);
            match chain.writable.write(0, &id[..n]) {
                Some(()) => Ok(n as u64),
                None => Err(bad_chain()),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if target.read_only => Err(read_only()),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            ranges(target, chain, kind == VIRTIO_BLK_T_DISCARD, data_out).map(|()| 0)
        }
        _ => return (VIRTIO_BLK_S_UNSUPP as u8, 0),
    };
    match r {
        Ok(n) => (ok, n),
        Err(e) if e.kind() == Kind::Unsupported => {
            log::debug!("vhost-user-blk {}: {}", target.device.name(), e.message());
            (VIRTIO_BLK_S_UNSUPP as u8, 0)
        }
        Err(e) => {
            log::debug!(
                "vhost-user-blk {}: request failed: {}",
                target.device.name(),
                crate::error::report(&e)
            );
            (VIRTIO_BLK_S_IOERR as u8, 0)
        }
    }
}

/// The byte offset of `sector`, checked: the request must be whole sectors and lie
/// inside the device.
fn byte_range(device: &Device, sector: u64, len: u64) -> Result<u64> {
    let offset = sector
        .checked_mul(SECTOR)
        .ok_or_else(|| Error::invalid(format!("sector {sector} is past any device")))?;
    if len % SECTOR != 0 {
        return Err(Error::invalid(format!(
            "a request of {len} bytes is not whole sectors"
        )));
    }
    let capacity = device.size() / SECTOR * SECTOR;
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(offset),
        _ => Err(Error::new(
            Kind::PastEnd,
            format!("sectors at {offset}+{len} are past the end ({capacity} bytes)"),
        )),
    }
}

/// Discard (a hint: a source that cannot punch holes ignores it) or write zeroes (a
/// hole where the guest allows unmapping, else zeroed blocks; plain zeros where the
/// source takes neither). Both go through the live fallocate path.
fn ranges(target: &Target<'_>, chain: &Chain<'_>, discard: bool, len: u64) -> Result<()> {
    let device = target.device;
    if len == 0
        || len % RANGE_LEN as u64 != 0
        || len / RANGE_LEN as u64 > u64::from(MAX_RANGE_SEGMENTS)
    {
        return Err(Error::invalid(format!(
            "a discard or write-zeroes payload of {len} bytes"
        )));
    }
    for i in 0..len / RANGE_LEN as u64 {
        let mut seg = [0u8; RANGE_LEN];
        chain
            .readable
            .read(HEADER_LEN as u64 + i * RANGE_LEN as u64, &mut seg)
            .ok_or_else(bad_chain)?;
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        if sectors > MAX_RANGE_SECTORS {
            return Err(Error::invalid(format!("{sectors} sectors in one segment")));
        }
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && flags != 0) {
            return Err(Error::new(
                Kind::Unsupported,
                format!("segment flags {flags:#x}"),
            ));
        }
        let bytes = u64::from(sectors) * SECTOR;
        let offset = byte_range(device, sector, bytes)?;
        let unmap = discard || flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        let mode = if unmap {
            sys::FALLOC_PUNCH_HOLE
        } else {
            sys::FALLOC_ZERO_RANGE
        } | sys::FALLOC_KEEP_SIZE;
        let r = match device.fallocate_live(mode, offset, bytes) {
            Ok(()) => Ok(()),
            Err(e) if refused(&e) && discard => Ok(()),
            Err(e) if refused(&e) => write_zeroes(device, offset, bytes),
            Err(e) => Err(e),
        };
        (target.changed)(offset, bytes);
        r?;
    }
    Ok(())
}

/// Whether the source refused a fallocate mode (not a failure of the device).
fn refused(e: &Error) -> bool {
    e.kind() == Kind::Unsupported || matches!(e.errno(), libc::EOPNOTSUPP | libc::EINVAL)
}

/// Zeroes `[offset, offset + len)` with plain writes.
fn write_zeroes(device: &Device, offset: u64, len: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut at = 0;
    while at < len {
        let n = CHUNK.min(len - at) as usize;
        device.write_live(offset + at, &zeros[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// `preadv`/`pwritev` of all of `slices` at `offset`, directly on guest memory.
fn transfer(
    file: &File,
    slices: &[VolatileSlice<'_>],
    offset: u64,
    write: bool,
) -> std::io::Result<()> {
    let mut iov: Slices<libc::iovec> = slices
        .iter()
        .map(|s| libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect();
    // SAFETY: every iovec points into a guest memory slice that `slices` keeps mapped
    // for the duration of the call.
    unsafe { sys::transfer_all_at(file, &mut iov, offset, write) }
}

fn bad_chain() -> Error {
    Error::invalid("the descriptors do not hold the request's data")
}

fn read_only() -> Error {
    Error::new(Kind::ReadOnly, "the export is read-only")
}

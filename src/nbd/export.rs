//! One export: a device of the active access, as NBD sees it. Every operation is an
//! engine call, the same ones the FUSE adapter makes for `snapshot/NAME`:
//! reads are `Device::read_snapshot`, holes are `Device::seek_snapshot` (SEEK_DATA and
//! SEEK_HOLE), trims are `Device::discard_snapshot` (punch hole), the dirty bitmap is
//! the access's dirty map (`NAME.dirty`). An export is bound to one access: once that
//! access has ended, every request fails with ESHUTDOWN and the connection ends. It
//! holds the access only weakly (engine calls name the access by its id): a connection
//! that outlives the teardown, blocked sending a reply to a client that does not take
//! it, does not keep the ended access, and its deleted fleecing file's space, alive.

use std::sync::{Arc, Weak};

use crate::cbw::{Device, DeviceAccess};
use crate::engine::Engine;
use crate::error::{Error, Kind, Result};
use crate::nbd::proto;

/// The meta context of the snapshot's allocation.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The prefix of the meta context of a dirty bitmap, as QEMU names it.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// What the negotiation needs to know of an export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export name (the device name).
    pub name: String,
    /// Its size (the snapshot's).
    pub size: u64,
    /// The cluster size: the preferred block size.
    pub cluster: u32,
    /// The name of the access's bitmap, if it uses one.
    pub bitmap: Option<String>,
    /// The id of the access it belongs to: an export of the same name during another
    /// access is another export.
    pub access: u64,
}

/// The exports the server offers right now.
pub trait Catalog: Send + Sync {
    /// Every export.
    fn list(&self) -> Vec<ExportInfo>;
    /// The export called `name`.
    fn find(&self, name: &str) -> Option<ExportInfo> {
        self.list().into_iter().find(|e| e.name == name)
    }
}

/// The catalog of an engine: one export per device of the active access.
pub struct EngineCatalog(pub Arc<Engine>);

impl Catalog for EngineCatalog {
    fn list(&self) -> Vec<ExportInfo> {
        self.0
            .exposed()
            .into_iter()
            .map(|e| ExportInfo {
                name: e.device.name().to_string(),
                size: e.access.size(),
                cluster: u32::try_from(e.device.cluster().bytes()).unwrap_or(u32::MAX),
                bitmap: e.bitmap,
                access: e.access.id(),
            })
            .collect()
    }
}

/// An export bound to the access it was opened during.
pub struct Export {
    name: String,
    slot: usize,
    engine: Arc<Engine>,
    device: Arc<Device>,
    access: Weak<DeviceAccess>,
    access_id: u64,
    size: u64,
}

/// The refusal of a request on an export whose access has ended.
fn ended(name: &str) -> Error {
    Error::new(
        Kind::Stale,
        format!("the backup access of export '{name}' has ended"),
    )
}

impl Export {
    /// The export `info` describes (the one a client negotiated), if its access is
    /// still the active one.
    pub fn open(engine: &Arc<Engine>, info: &ExportInfo) -> Option<Export> {
        let e = engine
            .exposed()
            .into_iter()
            .find(|e| e.device.name() == info.name && e.access.id() == info.access)?;
        Some(Export {
            name: info.name.clone(),
            slot: e.slot,
            engine: engine.clone(),
            device: e.device,
            access: Arc::downgrade(&e.access),
            access_id: e.access.id(),
            size: e.access.size(),
        })
    }

    /// The export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id of the access it is bound to.
    pub fn access_id(&self) -> u64 {
        self.access_id
    }

    /// The snapshot's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether its access is still the device's (and the device still served).
    pub fn is_current(&self) -> bool {
        let served = self
            .engine
            .device(self.slot)
            .is_some_and(|d| Arc::ptr_eq(&d, &self.device));
        served
            && self
                .device
                .access()
                .is_some_and(|a| std::ptr::eq(Arc::as_ptr(&a), self.access.as_ptr()))
    }

    /// The access, while it is the device's.
    fn current_access(&self) -> Result<Arc<DeviceAccess>> {
        match self.access.upgrade() {
            Some(a) if self.is_current() => Ok(a),
            _ => Err(ended(&self.name)),
        }
    }

    /// Fails with ESHUTDOWN (`Kind::Stale`) once its access has ended.
    pub fn check(&self) -> Result<()> {
        if self.is_current() {
            Ok(())
        } else {
            Err(ended(&self.name))
        }
    }

    /// Reads the snapshot at `offset` into all of `buf`: the whole range or an error
    /// (an inaccessible cluster anywhere in it fails the read, as in QEMU's
    /// snapshot-access; never partial data).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check()?;
        let mut done = 0;
        while done < buf.len() {
            let n = self.device.read_snapshot(
                self.access_id,
                offset + done as u64,
                &mut buf[done..],
            )?;
            if n == 0 {
                return Err(Error::new(
                    Kind::PastEnd,
                    format!("read of export '{}' past its end", self.name),
                ));
            }
            done += n;
        }
        Ok(())
    }

    /// The data and hole segments of `offset..offset+len`: `(start, end, is_data)`, as
    /// SEEK_DATA/SEEK_HOLE report them (an inaccessible range is a hole: map before
    /// reading, and a read that fails there fails the request).
    pub fn segments(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        let end = offset + len;
        let id = self.access_id;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let hole = self
                .device
                .seek_snapshot(id, pos, false, end)?
                .unwrap_or(end)
                .min(end);
            if hole > pos {
                out.push((pos, hole, true));
                pos = hole;
            }
            if pos < end {
                let data = self
                    .device
                    .seek_snapshot(id, pos, true, end)?
                    .unwrap_or(end)
                    .min(end);
                let data = data.max(pos + 1).min(end);
                out.push((pos, data, false));
                pos = data;
            }
        }
        Ok(out)
    }

    /// `base:allocation` extents from `offset` (at most `max` of them, ending at or
    /// before `offset + len`): data (0), holes that read as zeroes (HOLE|ZERO, where
    /// SEEK_HOLE finds them), and ranges that cannot be read (discarded, or outside
    /// the dirty map) as HOLE without ZERO: a reader must not take them for zeroes.
    pub fn allocation(&self, offset: u64, len: u64, max: usize) -> Result<Vec<(u64, u32)>> {
        let access = self.current_access()?;
        let end = offset.saturating_add(len).min(self.size());
        let id = self.access_id;
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let (readable, run_end) = access.accessible_run(pos);
            let run_end = run_end.min(end);
            let (flags, next) = if !readable {
                (proto::STATE_HOLE, run_end)
            } else {
                let hole = self
                    .device
                    .seek_snapshot(id, pos, false, run_end)?
                    .unwrap_or(end);
                if hole > pos {
                    (0, hole.min(run_end))
                } else {
                    let data = self
                        .device
                        .seek_snapshot(id, pos, true, run_end)?
                        .unwrap_or(end);
                    (
                        proto::STATE_HOLE | proto::STATE_ZERO,
                        data.max(pos + 1).min(run_end),
                    )
                }
            };
            push_extent(&mut out, next - pos, flags);
            pos = next;
        }
        self.check()?;
        Ok(out)
    }

    /// `qemu:dirty-bitmap:NAME` extents from `offset`: the frozen bitmap of the access,
    /// dirty (1) or clean (0), exactly the ranges of `NAME.dirty`.
    pub fn dirty(&self, offset: u64, len: u64, max: usize) -> Result<Vec<(u64, u32)>> {
        let access = self.current_access()?;
        let end = offset.saturating_add(len).min(self.size());
        let map = access.dirty_map();
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let (dirty, run_end) = map.run_at(pos);
            let next = run_end.min(end).max(pos + 1);
            push_extent(&mut out, next - pos, u32::from(dirty) * proto::STATE_DIRTY);
            pos = next;
        }
        Ok(out)
    }

    /// Discards `offset..offset+len` of the snapshot (whole clusters inside it): the
    /// fleecing space is freed and reads there fail from now on.
    pub fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check()?;
        self.device.discard_snapshot(self.access_id, offset, len)
    }
}

/// Appends an extent, merging it with the last one when the flags are the same.
fn push_extent(out: &mut Vec<(u64, u32)>, len: u64, flags: u32) {
    match out.last_mut() {
        Some(last) if last.1 == flags => last.0 += len,
        _ => out.push((len, flags)),
    }
}

/// The wire errno of a failed request: the engine's errno mapped as QEMU maps it, and
/// ESHUTDOWN for an access that has ended.
pub fn wire_errno(e: &Error) -> u32 {
    match e.kind() {
        Kind::Stale => proto::ESHUTDOWN,
        _ => proto::wire_errno(e.errno()),
    }
}

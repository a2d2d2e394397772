//! Online changes of the device set: resize, device add, device remove. The lock order
//! and the argument why live I/O, copy-before-write, setup and teardown stay correct are
//! in docs/architecture.md ("Online device changes"). In short: everything here runs
//! under the control mutex; a size changes only under the device's gate (exclusive),
//! and every data operation checks its range under its gate (shared); a device enters
//! the table with its tracking bitmaps already in its gate, and leaves it only with no
//! open handle; the kernel is told with no lock held.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{validate_name, Engine};
use crate::bitmap_file::TrackedBitmap;
use crate::cbw::Device;
use crate::error::{Error, Result};
use crate::source::Source;
use crate::state::{DeviceRecord, RecordedDevice, RecordedExport};
use crate::units::format_size;

/// The size `resize` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeRequest {
    /// The source's size now (after `lvextend`, `losetup -c`, `truncate`).
    Current,
    /// This many bytes.
    Absolute(u64),
    /// This many bytes more than now.
    Grow(u64),
}

/// The result of `resize`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ResizeReport {
    /// Device name.
    pub device: String,
    /// Size before, in bytes.
    pub old_size: u64,
    /// Size now, in bytes.
    pub new_size: u64,
    /// What happened to the device's bitmaps.
    pub bitmaps: ResizedBitmaps,
    /// Names of the bitmaps concerned (`TARGET/NAME`).
    pub bitmap_names: Vec<String>,
}

/// What a resize did to the bitmaps of the device (`bitmaps` of `resize --json`).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ResizedBitmaps {
    /// Every bitmap of the device grew; the new range counts as dirty.
    Grown,
    /// A shrink: every bitmap of the device is invalid (its next backup is full).
    Invalid,
    /// No bitmap changed (the size did not, or the device has none).
    Unchanged,
}

/// A bitmap found in the state dir for a device that `device add` served.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AddedBitmap {
    /// Target ID.
    pub target: String,
    /// Bitmap name.
    pub name: String,
    /// Loaded for incremental backups (`used`); otherwise `invalid`, for `reason`.
    pub used: bool,
    /// Why it is invalid.
    pub reason: Option<String>,
}

impl AddedBitmap {
    /// The bitmaps as a message lists them: comma-separated [`AddedBitmap`]s.
    pub fn list(bitmaps: &[AddedBitmap]) -> String {
        let items: Vec<String> = bitmaps.iter().map(AddedBitmap::to_string).collect();
        items.join(", ")
    }
}

impl std::fmt::Display for AddedBitmap {
    /// `TARGET/NAME: used`, or `TARGET/NAME: invalid (REASON)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}: ", self.target, self.name)?;
        if self.used {
            write!(f, "used")
        } else {
            write!(
                f,
                "invalid ({})",
                self.reason.as_deref().unwrap_or("no reason recorded")
            )
        }
    }
}

/// One device of a `device add` result.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct AddedDevice {
    /// Name.
    pub name: String,
    /// Absolute source path.
    pub source: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Its bitmaps found in the state dir.
    pub bitmaps: Vec<AddedBitmap>,
    /// Its exports recorded with it (served by a frontend).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vhost_user_blk: Vec<RecordedExport>,
}

/// The result of `device add`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DeviceAddReport {
    /// The devices added.
    pub devices: Vec<AddedDevice>,
}

/// The result of `device remove`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DeviceRemoveReport {
    /// Name of the device removed.
    pub device: String,
    /// Its bitmaps, kept in the state dir (`TARGET/NAME`).
    pub bitmaps_kept: Vec<String>,
}

/// Checks a device name as `mount` does.
pub fn check_device_name(name: &str) -> Result<()> {
    validate_name("device name", name)?;
    if crate::layout::is_reserved_device_name(name) {
        return Err(Error::invalid(format!(
            "invalid device name '{name}': names ending in .dirty are taken by the dirty maps (snapshot/NAME.dirty)"
        )));
    }
    Ok(())
}

/// How long `device remove` waits for requests that still hold the device (lookups,
/// getattrs) before it closes the source anyway.
const LAST_REFERENCE_WAIT: Duration = Duration::from_secs(5);

/// The exports of each device (see `Control::exports`).
type Exports = std::collections::BTreeMap<String, Vec<RecordedExport>>;

impl Engine {
    /// The device record of the set in `table`.
    fn device_record(
        table: &[Option<Arc<Device>>],
        next_slot: usize,
        exports: &Exports,
    ) -> DeviceRecord {
        DeviceRecord {
            version: 1,
            next_slot,
            devices: table
                .iter()
                .enumerate()
                .filter_map(|(slot, d)| {
                    d.as_ref().map(|d| RecordedDevice {
                        name: d.name().to_string(),
                        path: d.source().path().to_path_buf(),
                        slot,
                        file: Some((d.source().identity().dev, d.source().identity().ino)),
                        vhost_user_blk: exports.get(d.name()).cloned().unwrap_or_default(),
                    })
                })
                .collect(),
        }
    }

    fn save_record(
        &self,
        table: &[Option<Arc<Device>>],
        next_slot: usize,
        exports: &Exports,
    ) -> Result<()> {
        match &self.state {
            Some(state) => state.record_devices(&Self::device_record(table, next_slot, exports)),
            None => Ok(()),
        }
    }

    /// Records the served set, with `exports` (the frontends' exports of each device),
    /// in the state dir (at mount).
    pub fn save_device_record(&self, exports: &[(String, RecordedExport)]) -> Result<()> {
        let mut control = self.control();
        let mut map = Exports::new();
        for (name, e) in exports {
            map.entry(name.clone()).or_default().push(e.clone());
        }
        self.save_record(&self.table(), control.next_slot, &map)?;
        control.exports = map;
        Ok(())
    }

    /// The exports of every device as recorded: device name, export.
    pub fn exports(&self) -> Vec<(String, RecordedExport)> {
        let control = self.control();
        control
            .exports
            .iter()
            .flat_map(|(n, es)| es.iter().map(move |e| (n.clone(), e.clone())))
            .collect()
    }

    /// `TARGET/NAME` of every registered bitmap of `device` (takes the control mutex).
    fn bitmap_names(&self, device: &str) -> Vec<String> {
        self.status()
            .bitmaps
            .into_iter()
            .filter(|b| b.device == device)
            .map(|b| format!("{}/{}", b.target, b.name))
            .collect()
    }

    /// `fleecefs resize`: changes the size of device `name` while it is served.
    pub fn resize(
        &self,
        name: &str,
        want: SizeRequest,
        allow_shrink: bool,
    ) -> Result<ResizeReport> {
        validate_name("device name", name)?;
        let report = {
            let mut control = self.control_before_shutdown()?;
            let slot = self.known_device_index(name)?;
            self.not_being_removed(slot)?;
            let dev = self.device(slot).ok_or_else(|| self.unknown_device(name))?;
            let source = dev.source();
            let block = source.identity().block_device;
            let old = dev.size();
            let current = source.current_size()?;
            let new = match want {
                SizeRequest::Current => current,
                SizeRequest::Absolute(n) => n,
                SizeRequest::Grow(d) => old.saturating_add(d),
            };
            // Linux file sizes and offsets are signed 64-bit numbers.
            let largest = i64::MAX as u64;
            if new > largest {
                return Err(Error::invalid(format!(
                    "device '{name}' cannot be resized to {new} bytes: no file or device can be \
                     larger than {largest} bytes"
                )));
            }
            if new == 0 {
                return Err(Error::invalid(format!(
                    "device '{name}' cannot be resized to 0 bytes"
                )));
            }
            if block && new != current {
                return Err(Error::invalid(format!(
                    "device '{name}' is the block device {} of {current} bytes ({}): resize the block device first (lvextend, losetup -c ...), then give its new size or no SIZE",
                    source.path().display(),
                    format_size(current)
                )));
            }
            let mut report = ResizeReport {
                device: name.to_string(),
                old_size: old,
                new_size: new,
                bitmaps: ResizedBitmaps::Unchanged,
                bitmap_names: Vec::new(),
            };
            if new == old {
                return Ok(report);
            }
            let in_access = control.active.as_ref().and_then(|a| {
                a.devices
                    .iter()
                    .find(|d| d.index == slot)
                    .map(|_| a.target.clone())
            });
            if new < old {
                if !allow_shrink {
                    let data = if block {
                        String::new()
                    } else {
                        crate::sys::data_bytes_in(source.file(), new, old)
                            .map(|n| format!(", {n} of them holding data (not holes)"))
                            .unwrap_or_default()
                    };
                    return Err(Error::invalid(format!(
                        "shrinking device '{name}' from {old} to {new} bytes would cut off its last {} bytes (offsets {new} to {old} of live/{name}{data}); pass --allow-shrink to cut them (its bitmaps become invalid: the next backup is full)",
                        old - new
                    )));
                }
                if let Some(t) = in_access {
                    return Err(Error::busy(format!(
                        "device '{name}' is part of the backup access of target '{t}': it cannot shrink until that is torn down"
                    )));
                }
                {
                    // No data operation of the device is in flight while the gate is
                    // held: none can write past the new end.
                    let mut gate = dev.lock_gate();
                    if !block {
                        source.truncate_file(new)?;
                    }
                    source.set_size(new);
                    gate.tracking.clear();
                }
                report.bitmaps = ResizedBitmaps::Invalid;
                if let Some(store) = control.bitmaps.as_mut() {
                    let reason = format!("device {name} was shrunk from {old} to {new} bytes");
                    if let Err(e) = store.invalidate_device(name, &reason) {
                        log::error!("{}", crate::error::report(&e));
                    }
                }
                log::warn!(
                    "device {name} shrunk from {old} to {new} bytes; its bitmaps are invalid"
                );
            } else {
                let ad = control
                    .active
                    .as_ref()
                    .and_then(|a| a.devices.iter().find(|d| d.index == slot));
                let extra: Vec<Arc<TrackedBitmap>> =
                    ad.and_then(|d| d.background.clone()).into_iter().collect();
                let nbits = dev.cluster().count(new);
                let pairs = match &control.bitmaps {
                    Some(store) => store.prepare_grow(name, &extra, nbits)?,
                    None => Vec::new(),
                };
                if !block {
                    source.truncate_file(new)?;
                }
                {
                    let mut gate = dev.lock_gate();
                    source.set_size(new);
                    for (o, n) in &pairs {
                        n.commit_grow(o, old, new);
                    }
                    let swap = |t: &Arc<TrackedBitmap>| {
                        pairs
                            .iter()
                            .find(|(o, _)| Arc::ptr_eq(o, t))
                            .map_or_else(|| t.clone(), |(_, n)| n.clone())
                    };
                    gate.tracking = gate.tracking.iter().map(swap).collect();
                    if let Some(store) = control.bitmaps.as_mut() {
                        store.swap_grown(&pairs);
                    }
                    if let Some(a) = control.active.as_mut() {
                        for d in a.devices.iter_mut().filter(|d| d.index == slot) {
                            d.bitmap = d.bitmap.as_ref().map(swap);
                            d.background = d.background.as_ref().map(swap);
                        }
                    }
                }
                // A crash before the headers are written leaves bitmaps whose size
                // differs from the source's: invalid at the next mount, never a miss.
                for (_, n) in &pairs {
                    if let Err(e) = n.save_header() {
                        n.mark_failed(&crate::error::report(&e));
                    }
                }
                if let Some(store) = &control.bitmaps {
                    store.record_failures();
                }
                report.bitmaps = if pairs.is_empty() {
                    ResizedBitmaps::Unchanged
                } else {
                    ResizedBitmaps::Grown
                };
                log::info!("device {name} grown from {old} to {new} bytes");
            }
            report
        };
        report_bitmaps_and_notify(self, name, report)
    }

    /// `fleecefs device add`: serves new devices. All or nothing.
    pub fn add_devices(&self, specs: &[(String, PathBuf)]) -> Result<DeviceAddReport> {
        self.add_devices_with_exports(specs, &[])
    }

    /// [`Engine::add_devices`], recording `exports` of the new devices (device name,
    /// export) with them: the caller has checked them and serves them.
    pub fn add_devices_with_exports(
        &self,
        specs: &[(String, PathBuf)],
        exports: &[(String, RecordedExport)],
    ) -> Result<DeviceAddReport> {
        if let Some((name, _)) = exports
            .iter()
            .find(|(n, _)| !specs.iter().any(|(s, _)| s == n))
        {
            return Err(Error::invalid(format!(
                "an export of device '{name}', which is not added"
            )));
        }
        if specs.is_empty() {
            return Err(Error::invalid("no device to add"));
        }
        for (i, (name, path)) in specs.iter().enumerate() {
            check_device_name(name)?;
            if specs[..i].iter().any(|(n, _)| n == name) {
                return Err(Error::invalid(format!(
                    "device name '{name}' is given twice"
                )));
            }
            if !path.is_absolute() {
                return Err(Error::invalid(format!(
                    "source path {} is not absolute",
                    path.display()
                )));
            }
        }
        let mut control = self.control_before_shutdown()?;
        let served = self.devices();
        for (name, _) in specs {
            if served.iter().any(|d| d.name() == name) {
                return Err(Error::busy(format!("device '{name}' is already served")));
            }
        }
        // Open and lock every source first (closed again on any failure below).
        let mut new: Vec<Arc<Device>> = Vec::new();
        for (name, path) in specs {
            // The same file (also through a symlink or hard link) is the same image;
            // checked before opening, whose lock would refuse it less clearly.
            if let Some(id) = crate::source::identity_of(path) {
                let same = |d: &&Arc<Device>| {
                    let o = d.source().identity();
                    (o.dev, o.ino, o.block_device) == id
                };
                if let Some(other) = served.iter().chain(new.iter()).find(same) {
                    return Err(Error::invalid(format!(
                        "source {} is already served as device '{}' ({})",
                        path.display(),
                        other.name(),
                        other.source().path().display()
                    )));
                }
            }
            let source = Source::open_with(path, self.config.backup_read)?;
            new.push(Arc::new(Device::new(name.clone(), source, self.cluster)));
        }
        let control = &mut *control;
        let mut loaded: Vec<&Arc<Device>> = Vec::new();
        let unload = |store: &mut Option<crate::bitmap_store::BitmapStore>, ds: &[&Arc<Device>]| {
            if let Some(store) = store.as_mut() {
                for d in ds {
                    store.unload_device(d);
                }
            }
        };
        for d in &new {
            if let Some(store) = control.bitmaps.as_mut() {
                if let Err(e) = store.load_device(d) {
                    unload(&mut control.bitmaps, &loaded);
                    return Err(e);
                }
            }
            loaded.push(d);
        }
        let first = control.next_slot;
        let next_slot = first + new.len();
        {
            let mut table = self.table().clone();
            table.resize(next_slot, None);
            for (k, d) in new.iter().enumerate() {
                table[first + k] = Some(d.clone());
            }
            let mut all = control.exports.clone();
            for (name, e) in exports {
                all.entry(name.clone()).or_default().push(e.clone());
            }
            if let Err(e) = self.save_record(&table, next_slot, &all) {
                unload(&mut control.bitmaps, &loaded);
                return Err(e);
            }
            control.exports = all;
        }
        control.next_slot = next_slot;
        // Tracking is in place before the device can be opened.
        for d in &new {
            if let Some(store) = &control.bitmaps {
                d.lock_gate().tracking = store.tracking_for(d.name(), None);
            }
        }
        {
            let mut table = self.table_mut();
            table.resize(next_slot, None);
            for (k, d) in new.iter().enumerate() {
                table[first + k] = Some(d.clone());
            }
        }
        let statuses = control
            .bitmaps
            .as_ref()
            .map(|b| b.status(&new))
            .unwrap_or_default();
        let devices: Vec<AddedDevice> = new
            .iter()
            .map(|d| AddedDevice {
                name: d.name().to_string(),
                source: d.source().path().to_path_buf(),
                size: d.size(),
                bitmaps: statuses
                    .iter()
                    .filter(|b| b.device == d.name())
                    .map(|b| AddedBitmap {
                        target: b.target.clone(),
                        name: b.name.clone(),
                        used: b.consistent,
                        reason: (!b.consistent).then(|| b.reason.clone()).flatten(),
                    })
                    .collect(),
                vhost_user_blk: exports
                    .iter()
                    .filter(|(n, _)| n == d.name())
                    .map(|(_, e)| e.clone())
                    .collect(),
            })
            .collect();
        for d in &devices {
            log::info!(
                "device {} added ({}, {} bytes{}{})",
                d.name,
                d.source.display(),
                d.size,
                if d.bitmaps.is_empty() {
                    ""
                } else {
                    "; bitmaps: "
                },
                AddedBitmap::list(&d.bitmaps)
            );
        }
        Ok(DeviceAddReport { devices })
    }

    /// `fleecefs device remove`: stops serving device `name`; its source is closed (and
    /// unlocked) and its bitmaps stay in the state dir, dormant.
    pub fn remove_device(&self, name: &str) -> Result<DeviceRemoveReport> {
        let removal = self.begin_removal(name)?;
        removal.check(0)?;
        removal.finish()
    }

    /// Starts `device remove` of `name`: refuses an unknown device, one of the active
    /// access, or one being removed already, then marks the device as being removed.
    /// Until the [`Removal`] ends, an open of `live/NAME` fails with EBUSY
    /// ([`Engine::open_live`]), and setup and resize refuse the device, so what
    /// [`Removal::check`] finds holds until [`Removal::finish`]. Dropped unfinished, the
    /// removal clears the mark and has changed nothing.
    pub fn begin_removal(&self, name: &str) -> Result<Removal<'_>> {
        validate_name("device name", name)?;
        let control = self.control_before_shutdown()?;
        let slot = self.known_device_index(name)?;
        in_access_refusal(&control, name, slot)?;
        let dev = {
            let table = self.table_mut();
            let dev = table.get(slot).cloned().flatten();
            if let Some(d) = &dev {
                if d.removing() {
                    return Err(removing_refusal(name));
                }
                // Under the table's write lock: an open either counted its handle
                // before (seen by `check`) or sees the mark.
                d.set_removing(true);
            }
            dev
        };
        let dev = dev.ok_or_else(|| self.unknown_device(name))?;
        Ok(Removal {
            engine: self,
            name: name.to_string(),
            slot,
            dev,
        })
    }

    /// Refuses a control request that changes the device in `slot` (setup, resize) while
    /// `device remove` of it is under way.
    pub(super) fn not_being_removed(&self, slot: usize) -> Result<()> {
        match self.device(slot) {
            Some(d) if d.removing() => Err(removing_refusal(d.name())),
            _ => Ok(()),
        }
    }
}

/// A `device remove` under way: made by [`Engine::begin_removal`], which marks the device
/// as being removed (opens of `live/NAME` fail with EBUSY; setup and resize refuse it)
/// until it is finished or dropped. Dropped unfinished, it clears the mark: nothing else
/// changed.
pub struct Removal<'e> {
    engine: &'e Engine,
    name: String,
    slot: usize,
    dev: Arc<Device>,
}

impl Removal<'_> {
    /// Refuses the removal while `live/NAME` is open, not counting `own_handles` open
    /// handles: those of a frontend that ends its use of the device before
    /// [`Removal::finish`]. No new handle can be opened meanwhile.
    pub fn check(&self, own_handles: u64) -> Result<()> {
        open_refusal(
            &self.name,
            self.dev.open_handles().saturating_sub(own_handles),
        )
    }

    /// Removes the device: refused (and the mark cleared) if `live/NAME` is still open;
    /// otherwise the slot is emptied, the record rewritten, the bitmaps closed clean and
    /// the source closed.
    pub fn finish(self) -> Result<DeviceRemoveReport> {
        let engine = self.engine;
        let (slot, dev, name) = (self.slot, self.dev.clone(), self.name.clone());
        {
            let mut control = engine.control_before_shutdown()?;
            // Setup refuses a device being removed: this holds.
            in_access_refusal(&control, &name, slot)?;
            {
                let mut table = engine.table_mut();
                open_refusal(&name, dev.open_handles())?;
                table[slot] = None;
            }
            let saved = {
                let table = engine.table();
                engine.save_record(&table, control.next_slot, &control.exports)
            };
            if let Err(e) = saved {
                engine.table_mut()[slot] = Some(dev);
                return Err(e);
            }
            control.exports.remove(&name);
            dev.lock_gate().tracking.clear();
            // No handle is open, so no live write is in flight: close the bitmaps clean.
            if let Err(e) = dev.sync_live(false) {
                log::warn!("{}", crate::error::report(&e));
            }
            if let Some(store) = control.bitmaps.as_mut() {
                store.unload_device(&dev);
            }
        }
        drop(self);
        // Requests that looked the device up just before it left the table (lookup,
        // getattr) still hold it; the source closes (and unlocks) with the last one.
        let deadline = Instant::now() + LAST_REFERENCE_WAIT;
        while Arc::strong_count(&dev) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if Arc::strong_count(&dev) > 1 {
            log::warn!(
                "device {name}: a request still holds its source; it is closed when that ends"
            );
        }
        drop(dev);
        if let Some(k) = engine.kernel.get() {
            k.removed(slot, &name);
        }
        log::info!("device {name} removed");
        Ok(DeviceRemoveReport {
            device: name.to_string(),
            bitmaps_kept: engine.bitmap_names(&name),
        })
    }
}

impl Drop for Removal<'_> {
    fn drop(&mut self) {
        let _table = self.engine.table_mut();
        self.dev.set_removing(false);
    }
}

/// A control request for a device whose `device remove` is under way.
fn removing_refusal(name: &str) -> Error {
    Error::busy(format!(
        "device '{name}' is being removed (fleecefs device remove)"
    ))
}

/// `device remove` of the device in `slot` while it is part of the active access.
fn in_access_refusal(control: &super::Control, name: &str, slot: usize) -> Result<()> {
    match control
        .active
        .as_ref()
        .filter(|a| a.devices.iter().any(|d| d.index == slot))
    {
        Some(a) => Err(Error::busy(format!(
            "device '{name}' is part of the backup access of target '{}': tear it down first",
            a.target
        ))),
        None => Ok(()),
    }
}

/// `device remove` while `live/NAME` has `open` handles.
fn open_refusal(name: &str, open: u64) -> Result<()> {
    if open > 0 {
        return Err(Error::busy(format!(
            "live/{name} is open ({open} handle(s)): close it first"
        )));
    }
    Ok(())
}

/// Fills in the bitmap names of a resize report and tells the kernel (no lock held).
fn report_bitmaps_and_notify(
    engine: &Engine,
    name: &str,
    mut report: ResizeReport,
) -> Result<ResizeReport> {
    report.bitmap_names = engine.bitmap_names(name);
    if report.old_size != report.new_size {
        if let (Some(k), Some(slot)) = (engine.kernel.get(), engine.device_index(name)) {
            k.size_changed(slot, name);
        }
    }
    Ok(report)
}

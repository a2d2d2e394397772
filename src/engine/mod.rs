//! The engine: all devices of one daemon, and the lifecycle of the backup access
//! (setup, teardown, status). No FUSE here, and no mount point: tests drive it
//! directly, and the reports name snapshot files relative to the mount (see
//! [`crate::layout`]); the frontend that serves them roots them.
//!
//! - `mod.rs`: [`Engine`], its configuration, start, status and shutdown;
//! - `setup.rs`: [`Engine::setup`];
//! - `teardown.rs`: [`Engine::teardown`] and the two-phase protocol of a success;
//! - `report.rs`: the report types (serialized by the daemon, read back by the CLI).
//!
//! `setup` prepares everything that can fail (fleecing files, bitmaps) first, then takes
//! every device gate exclusively in device index order and installs the accesses while
//! holding them all: no live write is in flight on any of the devices at that moment,
//! so a multi-device snapshot is one instant for all of them. `teardown` removes them
//! the same way. See `cbw/mod.rs` for the data path and the lock order.

mod online;
mod report;
mod setup;
mod teardown;

pub use online::{
    check_device_name, AddedBitmap, DeviceAddReport, DeviceRemoveReport, Removal, ResizeReport,
    ResizedBitmaps, SizeRequest,
};

pub use report::{
    AccessDeviceStatus, AccessStatus, BitmapAction, BitmapRemoveReport, DeviceStatus, MountOptions,
    SetupDevice, SetupReport, Status, TeardownReport,
};

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::SystemTime;

use crate::bitmap_file::TrackedBitmap;
use crate::bitmap_store::BitmapStore;
use crate::cbw::policy::{CopyPool, OnCbwError};
use crate::cbw::writebehind::WriteBehind;
use crate::cbw::Device;
use crate::error::{Error, IoContext, Result};
use crate::state::StateDir;
use crate::sync::Recover;

/// Checks a device name, target ID or bitmap name: 1-64 of `[A-Za-z0-9._-]`, not
/// starting with a dot.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid {what} '{}': use 1-64 characters of A-Z a-z 0-9 . _ - , not starting with a dot",
            name.escape_debug()
        )))
    }
}

/// Settings of the engine that do not change while it runs.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Where fleecing files are created.
    pub fleecing_dir: PathBuf,
    /// Policy when copy-before-write fails or times out.
    pub on_cbw_error: OnCbwError,
    /// Longest a live write waits for copy-before-write (`None`: no limit).
    pub cbw_timeout: Option<std::time::Duration>,
    /// Most fleecing space one access may hold across its devices (`None`: no limit).
    pub fleecing_limit: Option<u64>,
    /// Which crashes bitmaps in use survive (`--crash-safe-bitmaps`).
    pub crash_safe_bitmaps: crate::bitmap_file::CrashSafety,
    /// Bytes of old data held in memory before the fleecing file under break-snapshot
    /// (`--cbw-buffer`; 0: copies are synchronous).
    pub cbw_buffer: u64,
    /// How snapshot reads read the source (`--backup-read`), for devices added later too.
    pub backup_read: crate::source::BackupRead,
}

impl EngineConfig {
    /// The defaults of `fleecefs mount`, except that there is no copy timeout: fleecing
    /// files in `fleecing_dir`, break-snapshot on errors with the write-behind buffer, no
    /// fleecing limit, crash-safe bitmaps.
    pub fn new(fleecing_dir: PathBuf) -> EngineConfig {
        EngineConfig {
            fleecing_dir,
            on_cbw_error: OnCbwError::BreakSnapshot,
            cbw_timeout: None,
            fleecing_limit: None,
            crash_safe_bitmaps: crate::bitmap_file::CrashSafety::On,
            cbw_buffer: crate::cbw::writebehind::DEFAULT_CAPACITY,
            backup_read: crate::source::BackupRead::Cached,
        }
    }
}

/// One device of the active access and its bitmaps.
struct ActiveDevice {
    /// Its slot (gate order).
    index: usize,
    device: Arc<Device>,
    /// The target's bitmap, frozen during the access.
    bitmap: Option<Arc<TrackedBitmap>>,
    /// Records writes made during the access.
    background: Option<Arc<TrackedBitmap>>,
    /// The name of `bitmap` (`setup --bitmap`).
    bitmap_name: Option<String>,
}

struct Active {
    target: String,
    id: u64,
    devices: Vec<ActiveDevice>,
    started_at: u64,
}

struct Control {
    active: Option<Active>,
    next_id: u64,
    bitmaps: Option<BitmapStore>,
    /// Set once shutdown has closed the bitmaps: no new access may start.
    shut_down: bool,
    /// The slot the next added device gets (slots are never reused).
    next_slot: usize,
    /// The frontends' exports of each device, kept in the device record (the engine
    /// only records them; a frontend serves them).
    exports: std::collections::BTreeMap<String, Vec<crate::state::RecordedExport>>,
}

/// One device of the active access, as a frontend exposes it.
pub struct Exposed {
    /// Its slot.
    pub slot: usize,
    /// The device.
    pub device: Arc<Device>,
    /// Its part of the access.
    pub access: Arc<crate::cbw::DeviceAccess>,
    /// The name of the access's bitmap (`setup --bitmap`), if it uses one.
    pub bitmap: Option<String>,
}

/// What the engine tells the kernel when a device changes (the FUSE layer implements
/// it; called with no engine lock held).
pub trait KernelCache: Send + Sync {
    /// `live/NAME` of `slot` has a new size: drop cached attributes and pages, and make
    /// the kernel learn the new size now.
    fn size_changed(&self, slot: usize, name: &str);
    /// `live/NAME` of `slot` is no longer served: drop its cached directory entry.
    fn removed(&self, slot: usize, name: &str);
    /// `[offset, offset + len)` of `live/NAME` of `slot` changed without the kernel seeing
    /// it (a vhost-user-blk request): drop the pages of that range it may hold.
    fn data_changed(&self, slot: usize, offset: u64, len: u64);
}

/// All devices and the access lifecycle.
pub struct Engine {
    /// The served devices by slot (`None`: removed). Written only under `control`.
    devices: RwLock<Vec<Option<Arc<Device>>>>,
    /// Cluster size of every device (devices added later get it too).
    cluster: crate::units::ClusterSize,
    kernel: OnceLock<Box<dyn KernelCache>>,
    /// The options the mount was made with, as `status` shows them (set by the daemon).
    options: OnceLock<MountOptions>,
    config: EngineConfig,
    copy_pool: Option<Arc<CopyPool>>,
    write_behind: Option<Arc<WriteBehind>>,
    state: Option<StateDir>,
    control: Mutex<Control>,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Engine {
    /// An engine over `devices`. `state`, when given, records fleecing files for crash
    /// recovery and holds the persistent bitmaps (which are loaded and start tracking
    /// here); without it, `--bitmap` is refused.
    pub fn new(
        devices: Vec<Device>,
        config: EngineConfig,
        state: Option<StateDir>,
    ) -> Result<Engine> {
        let n = devices.len();
        Self::with_slots(devices.into_iter().enumerate().collect(), n, config, state)
    }

    /// [`Engine::new`] with each device in the slot given (from the device record), and
    /// `next_slot` for the next device added (larger than every slot ever given out).
    pub fn with_slots(
        devices: Vec<(usize, Device)>,
        next_slot: usize,
        config: EngineConfig,
        state: Option<StateDir>,
    ) -> Result<Engine> {
        let cluster = devices
            .first()
            .map(|(_, d)| d.cluster())
            .unwrap_or(crate::units::ClusterSize::DEFAULT);
        let slots: Vec<usize> = devices.iter().map(|(s, _)| *s).collect();
        let devices: Vec<Arc<Device>> = devices.into_iter().map(|(_, d)| Arc::new(d)).collect();
        let next_slot = slots
            .iter()
            .map(|s| s + 1)
            .max()
            .unwrap_or(0)
            .max(next_slot);
        let bitmaps = match &state {
            Some(st) => Some(BitmapStore::load(
                st.bitmap_dir()?,
                &devices,
                config.crash_safe_bitmaps,
            )?),
            None => None,
        };
        if let Some(store) = &bitmaps {
            for d in &devices {
                d.lock_gate().tracking = store.tracking_for(d.name(), None);
            }
        }
        // Write-behind needs room for the old data of one lock unit (one cluster, or
        // 64 KiB of smaller ones); with larger clusters copies stay synchronous.
        let unit = cluster.bytes().max(crate::cbw::LOCK_UNIT_MIN);
        if config.cbw_buffer > 0 && config.cbw_buffer < unit {
            log::info!(
                "copy-before-write is synchronous: a cluster ({unit} bytes) does not fit in the {}-byte write-behind buffer",
                config.cbw_buffer
            );
        }
        let write_behind = match config.on_cbw_error {
            OnCbwError::BreakSnapshot if config.cbw_buffer >= unit && config.cbw_buffer > 0 => {
                Some(Arc::new(
                    WriteBehind::new(config.cbw_buffer, 2, config.cbw_timeout)
                        .context(|| "starting copy-before-write flusher threads".into())?,
                ))
            }
            _ => None,
        };
        // Synchronous copies with a timeout run on the copy pool; write-behind needs none.
        let copy_pool = match (config.cbw_timeout, &write_behind) {
            (Some(_), None) => Some(Arc::new(
                CopyPool::new(4).context(|| "starting copy-before-write threads".into())?,
            )),
            _ => None,
        };
        let mut table: Vec<Option<Arc<Device>>> = vec![None; next_slot];
        for (slot, d) in slots.into_iter().zip(devices) {
            if table[slot].is_some() {
                return Err(Error::invalid(format!("two devices in slot {slot}")));
            }
            table[slot] = Some(d);
        }
        // Above every id given out before with this state directory.
        let next_id = match &state {
            Some(s) => s.last_access_id()?.saturating_add(1),
            None => 1,
        };
        Ok(Engine {
            devices: RwLock::new(table),
            cluster,
            kernel: OnceLock::new(),
            options: OnceLock::new(),
            config,
            copy_pool,
            write_behind,
            state,
            control: Mutex::new(Control {
                active: None,
                next_id,
                bitmaps,
                shut_down: false,
                next_slot,
                exports: Default::default(),
            }),
        })
    }

    /// Records the options the mount was made with, for `status` (once).
    pub fn set_mount_options(&self, options: MountOptions) {
        let _ = self.options.set(options);
    }

    /// Connects the kernel side (once, after the FUSE session exists).
    pub fn set_kernel_cache(&self, k: Box<dyn KernelCache>) {
        let _ = self.kernel.set(k);
    }

    /// Waits until every copy in the write-behind buffer is stored in its fleecing file
    /// (or dropped), at most `timeout`. Returns whether it got there.
    pub fn wait_for_copies(&self, timeout: std::time::Duration) -> bool {
        self.write_behind
            .as_ref()
            .is_none_or(|wb| wb.wait_idle(timeout))
    }

    /// Where fleecing files are created (the mount's `statfs` reports its filesystem).
    pub fn fleecing_dir(&self) -> &std::path::Path {
        &self.config.fleecing_dir
    }

    fn table(&self) -> std::sync::RwLockReadGuard<'_, Vec<Option<Arc<Device>>>> {
        self.devices.read().recover()
    }

    fn table_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Option<Arc<Device>>>> {
        self.devices.write().recover()
    }

    /// The devices served now, in slot order.
    pub fn devices(&self) -> Vec<Arc<Device>> {
        self.table().iter().flatten().cloned().collect()
    }

    /// The devices served now with their slots, in slot order.
    pub fn slots(&self) -> Vec<(usize, Arc<Device>)> {
        self.table()
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.clone().map(|d| (i, d)))
            .collect()
    }

    /// The device in `slot`, if one is served there.
    pub fn device(&self, slot: usize) -> Option<Arc<Device>> {
        self.table().get(slot).cloned().flatten()
    }

    /// The device in `slot` for a new open handle of `live/NAME`, counted under the
    /// table's read lock so that `device remove` sees it. Fails with `NotFound` when no
    /// device is in `slot` (removed), and with `Busy` (EBUSY) while `device remove` of it
    /// is under way ([`Engine::begin_removal`]).
    pub fn open_live(&self, slot: usize) -> Result<Arc<Device>> {
        let table = self.table();
        let Some(d) = table.get(slot).cloned().flatten() else {
            return Err(Error::not_found(format!(
                "no device in slot {slot} (removed)"
            )));
        };
        if d.removing() {
            return Err(Error::busy(format!(
                "device '{}' is being removed",
                d.name()
            )));
        }
        d.handle_opened();
        Ok(d)
    }

    /// `[offset, offset + len)` of the device in `slot` changed other than through the
    /// mount (a frontend wrote, discarded or zeroed it): the kernel drops the pages of
    /// `live/NAME` it may hold for that range, if `live/NAME` was ever opened through the
    /// mount (only then can it hold any).
    pub fn changed_elsewhere(&self, slot: usize, device: &Device, offset: u64, len: u64) {
        if device.opened_through_mount() {
            if let Some(k) = self.kernel.get() {
                k.data_changed(slot, offset, len);
            }
        }
    }

    /// Slot of the device called `name`.
    pub fn device_index(&self, name: &str) -> Option<usize> {
        self.table()
            .iter()
            .position(|d| d.as_ref().is_some_and(|d| d.name() == name))
    }

    /// Slot of the device called `name`, or the error that lists the devices there are.
    fn known_device_index(&self, name: &str) -> Result<usize> {
        self.device_index(name)
            .ok_or_else(|| self.unknown_device(name))
    }

    fn unknown_device(&self, name: &str) -> Error {
        let known: Vec<String> = self
            .devices()
            .iter()
            .map(|d| d.name().to_string())
            .collect();
        Error::not_found(format!(
            "unknown device '{}' (devices: {})",
            name.escape_debug(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().recover()
    }

    /// [`Engine::control`] for a request that changes what is served: refused once
    /// shutdown has begun.
    fn control_before_shutdown(&self) -> Result<MutexGuard<'_, Control>> {
        let control = self.control();
        if control.shut_down {
            return Err(Error::busy("the daemon is shutting down"));
        }
        Ok(control)
    }

    /// Shutdown, after the last live write: tears down any active access as a failure,
    /// then closes every bitmap cleanly (flushed, checksummed, not in use).
    pub fn shutdown(&self) {
        // No new access from here on, even from a control request racing the shutdown.
        let target = {
            let mut control = self.control();
            control.shut_down = true;
            control.active.as_ref().map(|a| a.target.clone())
        };
        if let Some(t) = target {
            log::warn!("shutting down: backup access for target '{t}' is torn down as a failure");
            if let Err(e) = self.teardown(&t, false) {
                log::error!("{}", crate::error::report(&e));
            }
        }
        if let Some(store) = &self.control().bitmaps {
            store.close_all(&self.devices());
        }
    }

    /// The devices of the active access (slot, device, its bitmap's name if the access
    /// uses one), in slot order; empty without an access.
    pub fn exposed(&self) -> Vec<Exposed> {
        self.control()
            .active
            .as_ref()
            .map(|a| {
                a.devices
                    .iter()
                    .filter_map(|d| {
                        let access = d.device.access()?;
                        Some(Exposed {
                            slot: d.index,
                            device: d.device.clone(),
                            access,
                            bitmap: d.bitmap_name.clone(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The active access id and target, if any.
    pub fn active(&self) -> Option<(u64, String)> {
        self.control()
            .active
            .as_ref()
            .map(|a| (a.id, a.target.clone()))
    }

    /// Everything `status` reports.
    pub fn status(&self) -> Status {
        let control = self.control();
        let mut errors = Vec::new();
        let served = self.devices();
        let devices = served
            .iter()
            .map(|d| {
                let error = d.last_error().map(|(e, _)| e);
                if let Some(e) = &error {
                    errors.push(format!("device {}: {e}", d.name()));
                }
                DeviceStatus {
                    name: d.name().to_string(),
                    source: d.source().path().to_path_buf(),
                    size: d.size(),
                    cluster_size: d.cluster().bytes(),
                    error,
                }
            })
            .collect();
        let access = control.active.as_ref().map(|a| {
            let mut s = AccessStatus {
                target: a.target.clone(),
                devices: Vec::new(),
                started_at: a.started_at,
                fleecing_allocated: 0,
                copied_bytes: 0,
                discarded_bytes: 0,
                pending_bytes: 0,
                dirty_bytes: 0,
                broken: false,
                broken_reason: None,
                broken_at: None,
                per_device: Vec::new(),
            };
            for d in &a.devices {
                let dev = &d.device;
                s.devices.push(dev.name().to_string());
                let Some(acc) = dev.access() else { continue };
                let st = acc.stats();
                s.fleecing_allocated += st.fleecing_allocated;
                s.copied_bytes += st.copied_bytes;
                s.discarded_bytes += st.discarded_bytes;
                s.pending_bytes += st.pending_bytes;
                s.dirty_bytes += st.dirty_bytes;
                if let (Some(b), false) = (acc.broken(), s.broken) {
                    s.broken = true;
                    s.broken_reason = Some(b.reason.clone());
                    s.broken_at = Some(secs(b.at));
                    errors.push(format!(
                        "backup access '{}' is broken: {}",
                        a.target, b.reason
                    ));
                }
                s.per_device.push(AccessDeviceStatus {
                    name: dev.name().to_string(),
                    dirty_bytes: st.dirty_bytes,
                    fleecing_allocated: st.fleecing_allocated,
                    copied_bytes: st.copied_bytes,
                    discarded_bytes: st.discarded_bytes,
                    pending_bytes: st.pending_bytes,
                });
            }
            s
        });
        let bitmaps = control
            .bitmaps
            .as_ref()
            .map(|b| b.status(&served))
            .unwrap_or_default();
        for b in &bitmaps {
            if !b.consistent && b.loaded {
                errors.push(format!(
                    "bitmap '{}' of target '{}' on {} is invalid: {}",
                    b.name,
                    b.target,
                    b.device,
                    b.reason.as_deref().unwrap_or("unknown")
                ));
            }
        }
        Status {
            // The engine does not know where it is mounted: the frontend fills this in.
            mountpoint: PathBuf::new(),
            pid: std::process::id(),
            devices,
            bitmaps,
            access,
            errors,
            options: self.options.get().cloned(),
        }
    }

    /// Deletes every bitmap of `target` (its next backup is full).
    pub fn remove_bitmaps(&self, target: &str) -> Result<BitmapRemoveReport> {
        validate_name("target", target)?;
        let mut control = self.control();
        if control.active.as_ref().is_some_and(|a| a.target == target) {
            return Err(Error::busy(format!(
                "target '{target}' has an active backup access; tear it down first"
            )));
        }
        let control = &mut *control;
        let Some(store) = control.bitmaps.as_mut() else {
            return Err(Error::not_found(format!(
                "target '{target}' has no bitmaps"
            )));
        };
        if !store.has_target(target) {
            return Err(Error::not_found(format!(
                "target '{target}' has no bitmaps"
            )));
        }
        let removed = store.remove_target(target)?;
        for (i, d) in self.slots() {
            let mut gate = d.lock_gate();
            // A device of another target's active access keeps that target's frozen bitmap
            // out of tracking and its background bitmap in; every other device tracks all
            // its bitmaps.
            let in_access = control
                .active
                .as_ref()
                .and_then(|a| a.devices.iter().find(|ad| ad.index == i).map(|ad| (a, ad)));
            gate.tracking = match in_access {
                Some((a, ad)) => {
                    let mut t = store.tracking_for(d.name(), Some(&a.target));
                    t.extend(ad.background.clone());
                    t
                }
                None => store.tracking_for(d.name(), None),
            };
        }
        log::info!(
            "removed bitmaps of target '{target}': {}",
            removed.join(", ")
        );
        Ok(BitmapRemoveReport {
            target: target.to_string(),
            removed,
        })
    }
}

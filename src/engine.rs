//! The engine: all devices of one daemon, and the lifecycle of the backup access
//! (setup, teardown, status). No FUSE here: tests drive it directly.
//!
//! `setup` prepares everything that can fail (fleecing files, bitmaps) first, then takes
//! every device gate exclusively in device index order and installs the accesses while
//! holding them all: no live write is in flight on any of the devices at that moment,
//! so a multi-device snapshot is one instant for all of them. `teardown` removes them
//! the same way. See `cbw.rs` for the data path and the lock order.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::Serialize;

use crate::bitmap::Bitmap;
use crate::bitmaps::{BitmapStatus, BitmapStore, Decision};
use crate::cbw::{Device, DeviceAccess};
use crate::error::{Error, IoContext, Kind, Result};
use crate::fleece::FleecingFile;
use crate::persist::TrackedBitmap;
use crate::policy::{Breaker, CbwPolicy, CopyPool, FleecingBudget, OnCbwError};
use crate::state::{AccessRecord, StateDir};
use crate::sys::unix_now;
use crate::writebehind::WriteBehind;

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
    /// The mount point (reports give absolute snapshot paths).
    pub mountpoint: PathBuf,
    /// Which crashes bitmaps in use survive (`--crash-safe-bitmaps`).
    pub crash_safe_bitmaps: crate::persist::CrashSafety,
    /// Bytes of old data held in memory before the fleecing file under break-snapshot
    /// (`--cbw-buffer`; 0: copies are synchronous).
    pub cbw_buffer: u64,
}

impl EngineConfig {
    /// The defaults of `fleecefs mount`, except that there is no copy timeout: fleecing
    /// files in `fleecing_dir`, break-snapshot on errors with the write-behind buffer, no
    /// fleecing limit, crash-safe bitmaps.
    pub fn new(fleecing_dir: PathBuf, mountpoint: PathBuf) -> EngineConfig {
        EngineConfig {
            fleecing_dir,
            on_cbw_error: OnCbwError::BreakSnapshot,
            cbw_timeout: None,
            fleecing_limit: None,
            mountpoint,
            crash_safe_bitmaps: crate::persist::CrashSafety::On,
            cbw_buffer: crate::writebehind::DEFAULT_CAPACITY,
        }
    }
}

/// The result of `bitmap remove`.
#[derive(Serialize, Debug, Clone)]
pub struct BitmapRemoveReport {
    /// Target ID.
    pub target: String,
    /// `DEVICE/NAME` of every bitmap removed.
    pub removed: Vec<String>,
}

/// One device of a `setup` result.
#[derive(Serialize, Debug, Clone)]
pub struct SetupDevice {
    /// Device name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Absolute path of the snapshot file.
    pub snapshot: PathBuf,
    /// Absolute path of the dirty map file.
    pub dirty_map: PathBuf,
    /// The bitmap used, if any.
    pub bitmap: Option<String>,
    /// What was done with the bitmap.
    pub bitmap_action: String,
    /// Bytes the backup must read (sum of the dirty map).
    pub dirty_bytes: u64,
}

/// The result of `setup`.
#[derive(Serialize, Debug, Clone)]
pub struct SetupReport {
    /// Target ID.
    pub target: String,
    /// One entry per device of the access.
    pub devices: Vec<SetupDevice>,
}

/// The result of `teardown`.
#[derive(Serialize, Debug, Clone)]
pub struct TeardownReport {
    /// Target ID.
    pub target: String,
    /// Whether the backup counted as successful.
    pub success: bool,
    /// Devices of the access.
    pub devices: Vec<String>,
    /// Set when the access was broken: the backup cannot be trusted.
    pub broken_reason: Option<String>,
    /// What went wrong after the outcome was recorded (a bitmap that could not be saved,
    /// a fleecing file that could not be removed); the outcome stands.
    pub warnings: Vec<String>,
}

/// A device line of `status`.
#[derive(Serialize, Debug, Clone)]
pub struct DeviceStatus {
    /// Name.
    pub name: String,
    /// Source path.
    pub source: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Last I/O error of the source, if any.
    pub error: Option<String>,
}

/// Per-device numbers of the active access.
#[derive(Serialize, Debug, Clone)]
pub struct AccessDeviceStatus {
    /// Device name.
    pub name: String,
    /// Bytes in the dirty map.
    pub dirty_bytes: u64,
    /// Fleecing bytes allocated on disk.
    pub fleecing_allocated: u64,
    /// Bytes copied before write.
    pub copied_bytes: u64,
    /// Bytes discarded.
    pub discarded_bytes: u64,
    /// Copied bytes still in memory on their way to the fleecing file.
    pub pending_bytes: u64,
}

/// The active access in `status`.
#[derive(Serialize, Debug, Clone)]
pub struct AccessStatus {
    /// Target ID.
    pub target: String,
    /// Device names.
    pub devices: Vec<String>,
    /// Start time, seconds since the epoch.
    pub started_at: u64,
    /// Sum over devices of fleecing bytes allocated.
    pub fleecing_allocated: u64,
    /// Sum over devices of bytes copied before write.
    pub copied_bytes: u64,
    /// Sum over devices of bytes discarded.
    pub discarded_bytes: u64,
    /// Sum over devices of copied bytes still in memory (write-behind).
    pub pending_bytes: u64,
    /// Sum over devices of dirty bytes.
    pub dirty_bytes: u64,
    /// Whether copy-before-write failed and the snapshot is unusable.
    pub broken: bool,
    /// Why it broke.
    pub broken_reason: Option<String>,
    /// When it broke, seconds since the epoch.
    pub broken_at: Option<u64>,
    /// Per-device numbers.
    pub per_device: Vec<AccessDeviceStatus>,
}

/// The whole `status`.
#[derive(Serialize, Debug, Clone)]
pub struct Status {
    /// Mount point.
    pub mountpoint: PathBuf,
    /// Daemon pid.
    pub pid: u32,
    /// Devices.
    pub devices: Vec<DeviceStatus>,
    /// Every bitmap.
    pub bitmaps: Vec<BitmapStatus>,
    /// The active access, if any.
    pub access: Option<AccessStatus>,
    /// Errors worth a look (source I/O errors, broken accesses).
    pub errors: Vec<String>,
}

/// One device of the active access and its bitmaps.
struct ActiveDevice {
    index: usize,
    /// The target's bitmap, frozen during the access.
    bitmap: Option<Arc<TrackedBitmap>>,
    /// Records writes made during the access.
    background: Option<Arc<TrackedBitmap>>,
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
}

/// All devices and the access lifecycle.
pub struct Engine {
    devices: Vec<Arc<Device>>,
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
        let devices: Vec<Arc<Device>> = devices.into_iter().map(Arc::new).collect();
        let bitmaps = match &state {
            Some(st) => Some(BitmapStore::load(
                &st.bitmap_dir()?,
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
        let unit = devices
            .iter()
            .map(|d| d.cluster().bytes().max(crate::cbw::LOCK_UNIT_MIN))
            .max()
            .unwrap_or(crate::cbw::LOCK_UNIT_MIN);
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
        Ok(Engine {
            devices,
            config,
            copy_pool,
            write_behind,
            state,
            control: Mutex::new(Control {
                active: None,
                next_id: 1,
                bitmaps,
                shut_down: false,
            }),
        })
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

    /// The devices, in the order given at mount.
    pub fn devices(&self) -> &[Arc<Device>] {
        &self.devices
    }

    /// Index of the device called `name`.
    pub fn device_index(&self, name: &str) -> Option<usize> {
        self.devices.iter().position(|d| d.name() == name)
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn resolve_devices(&self, names: Option<&[String]>) -> Result<Vec<usize>> {
        let Some(names) = names else {
            return Ok((0..self.devices.len()).collect());
        };
        if names.is_empty() {
            return Err(Error::invalid("--devices names no device"));
        }
        let mut out: Vec<usize> = Vec::new();
        for n in names {
            let i = self.device_index(n).ok_or_else(|| {
                let known: Vec<&str> = self.devices.iter().map(|d| d.name()).collect();
                Error::not_found(format!(
                    "unknown device '{}' (devices: {})",
                    n.escape_debug(),
                    known.join(", ")
                ))
            })?;
            if out.contains(&i) {
                return Err(Error::invalid(format!("device '{n}' is named twice")));
            }
            out.push(i);
        }
        out.sort_unstable();
        Ok(out)
    }

    fn fleecing_path(&self, device: &str, target: &str) -> PathBuf {
        self.config
            .fleecing_dir
            .join(format!("{device}.{target}.fleece"))
    }

    /// Starts a backup access for `target` on `devices` (all when `None`).
    pub fn setup(
        &self,
        target: &str,
        devices: Option<&[String]>,
        bitmap: Option<&str>,
    ) -> Result<SetupReport> {
        validate_name("target", target)?;
        if let Some(b) = bitmap {
            validate_name("bitmap name", b)?;
        }
        let mut control = self.control();
        if control.shut_down {
            return Err(Error::busy("the daemon is shutting down"));
        }
        if let Some(a) = &control.active {
            return Err(Error::busy(format!(
                "a backup access is already active for target '{}'; tear it down first",
                a.target
            )));
        }
        let indices = self.resolve_devices(devices)?;
        let control = &mut *control;
        if bitmap.is_some() && control.bitmaps.is_none() {
            return Err(Error::invalid(
                "--bitmap needs a state directory for the bitmaps",
            ));
        }
        std::fs::create_dir_all(&self.config.fleecing_dir).context(|| {
            format!(
                "creating fleecing directory {}",
                self.config.fleecing_dir.display()
            )
        })?;
        let id = control.next_id;
        control.next_id += 1;
        let started_at = unix_now();
        let record = AccessRecord {
            target: target.to_string(),
            started_at,
            devices: indices
                .iter()
                .map(|&i| {
                    let name = self.devices[i].name();
                    (name.to_string(), self.fleecing_path(name, target))
                })
                .collect(),
        };
        if let Some(state) = &self.state {
            // A teardown that could not delete a fleecing file left its record: clean up
            // now, or refuse, rather than forget those files by overwriting the record.
            if let Some(old) = state.leftover_access()? {
                let removed = state.remove_leftovers(&old).map_err(|e| {
                    Error::busy(format!(
                        "fleecing files of the earlier access '{}' cannot be removed ({}); remove them and retry",
                        old.target,
                        crate::error::report(&e)
                    ))
                })?;
                log::warn!(
                    "removed {} leftover fleecing file(s) of the earlier access '{}'",
                    removed.len(),
                    old.target
                );
            }
            state.record_access(&record)?;
        }
        // Prepare everything that can fail before touching any gate: fleecing files,
        // bitmap decisions (new files), then the registry.
        let mut fleeces: Vec<FleecingFile> = Vec::new();
        let mut decisions: Vec<(String, Decision)> = Vec::new();
        let prepared = (|| -> Result<()> {
            for (&i, (_, path)) in indices.iter().zip(&record.devices) {
                let dev = &self.devices[i];
                fleeces.push(FleecingFile::create(path, dev.size())?);
                if let Some(store) = control.bitmaps.as_mut() {
                    decisions.push((dev.name().to_string(), store.decide(dev, target, bitmap)?));
                }
            }
            if let Some(store) = control.bitmaps.as_mut() {
                store.commit(target, &mut decisions)?;
            }
            Ok(())
        })();
        if let Err(e) = prepared {
            for f in &fleeces {
                let _ = f.remove();
            }
            if let Some(store) = &control.bitmaps {
                for (_, d) in &decisions {
                    store.abandon(d);
                }
            }
            if let Some(state) = &self.state {
                let _ = state.clear_access();
            }
            return Err(e);
        }
        let mut decisions = decisions.into_iter();
        let policy = CbwPolicy {
            on_error: self.config.on_cbw_error,
            timeout: self.config.cbw_timeout,
            pool: self.copy_pool.clone(),
            write_behind: self.write_behind.clone(),
            budget: Arc::new(FleecingBudget::new(self.config.fleecing_limit)),
            breaker: Arc::new(Breaker::default()),
        };
        let mut active_devices = Vec::new();
        let mut report = Vec::new();
        {
            // One instant for all devices: hold every gate, then switch. No write is in
            // flight on any of them, so each frozen bitmap is exact and every later write
            // lands in its background bitmap.
            let mut gates: Vec<_> = indices
                .iter()
                .map(|&i| self.devices[i].lock_gate())
                .collect();
            for ((gate, &i), fleece) in gates.iter_mut().zip(&indices).zip(fleeces) {
                let dev = &self.devices[i];
                let decision = decisions.next().map(|(_, d)| d);
                let (action, bitmap, name, background) = match decision {
                    Some(d) => (d.action, d.bitmap, d.name, d.background),
                    None => ("not-used", None, None, None),
                };
                let frozen = match (&bitmap, action) {
                    (Some(b), "used") => Arc::new(b.bits().to_heap()),
                    _ => Arc::new(Bitmap::new(dev.clusters(), true)),
                };
                let access = Arc::new(DeviceAccess::new(id, dev, frozen, fleece, policy.clone()));
                let snap = self.config.mountpoint.join("snapshot").join(dev.name());
                report.push(SetupDevice {
                    name: dev.name().to_string(),
                    size: dev.size(),
                    dirty_map: snap.with_file_name(format!("{}.dirty", dev.name())),
                    snapshot: snap,
                    bitmap: name,
                    bitmap_action: action.to_string(),
                    dirty_bytes: access.dirty_map().dirty_bytes(),
                });
                gate.access = Some(access);
                if let Some(store) = &control.bitmaps {
                    gate.tracking = store.tracking_for(dev.name(), Some(target));
                    gate.tracking.extend(background.clone());
                }
                active_devices.push(ActiveDevice {
                    index: i,
                    bitmap,
                    background,
                });
            }
        }
        control.active = Some(Active {
            target: target.to_string(),
            id,
            devices: active_devices,
            started_at,
        });
        log::info!(
            "backup access for target '{target}' set up on {}",
            report
                .iter()
                .map(|d| format!("{} ({})", d.name, d.bitmap_action))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(SetupReport {
            target: target.to_string(),
            devices: report,
        })
    }

    /// Ends the access of `target`. A broken access counts as failed whatever `success`
    /// says, and then this returns an error (after cleaning up) unless `success` is false.
    /// [`Engine::teardown_reply`] with a reply that is always delivered.
    pub fn teardown(&self, target: &str, success: bool) -> Result<TeardownReport> {
        let mut out = None;
        self.teardown_reply(target, success, |r| {
            out = Some(r);
            true
        });
        out.expect("teardown_reply always delivers a reply")
    }

    /// Ends the access of `target` and hands the outcome to `deliver`, which returns
    /// whether the caller got it (the control reply was written).
    ///
    /// Until a success has been delivered, the bitmaps must stay a superset of what a
    /// failure would leave: a caller that never learns of the success (the daemon died,
    /// the client went away) treats the backup as failed, and its next incremental must
    /// still cover everything since the last backup it kept. So the success works in two
    /// phases. Before the reply, as for a failure, each target bitmap |= its background,
    /// but the background keeps recording writes. Once the reply is delivered, the target
    /// bitmap := its background (every write since setup) and the sequence is counted. A
    /// crash at any point leaves at most a superset (recovery at mount ORs).
    pub fn teardown_reply(
        &self,
        target: &str,
        success: bool,
        deliver: impl FnOnce(Result<TeardownReport>) -> bool,
    ) {
        if let Err(e) = validate_name("target", target) {
            deliver(Err(e));
            return;
        }
        let mut control = self.control();
        let err = match &control.active {
            Some(a) if a.target == target => None,
            Some(a) => Some(format!(
                "no backup access for target '{target}' (the active one is '{}')",
                a.target
            )),
            None => Some(format!(
                "no backup access for target '{target}' (none is active)"
            )),
        };
        if let Some(msg) = err {
            deliver(Err(Error::not_found(msg)));
            return;
        }
        let active = control.active.take().expect("checked above");
        // The outcome is decided once, here: a break after this instant (a write-behind
        // flusher failing during the teardown) cannot spoil what the backup already read.
        let broken_reason = active.devices.iter().find_map(|d| {
            self.devices[d.index]
                .access()
                .and_then(|a| a.broken().map(|b| b.reason.clone()))
        });
        let effective_success = success && broken_reason.is_none();
        let (accesses, bitmap_errors) =
            self.switch_back(&active, control.bitmaps.as_ref(), effective_success);
        let cleanup = self.finish(&accesses);
        log::info!(
            "backup access for target '{target}' torn down ({})",
            if effective_success {
                "success"
            } else {
                "failure"
            }
        );
        let result = self.teardown_result(
            target,
            &active,
            success,
            effective_success,
            broken_reason,
            bitmap_errors,
            cleanup,
        );
        // Only a delivered reply that says success may apply it.
        let reported = matches!(&result, Ok(r) if r.success);
        let delivered = deliver(result) && reported;
        if effective_success {
            if !delivered {
                log::warn!(
                    "the reply to the successful teardown of target '{target}' was not delivered: its bitmaps keep every write since the previous backup, as after a failure"
                );
            }
            self.complete_success(&active, control.bitmaps.as_ref(), delivered);
        }
        if let Some(store) = &control.bitmaps {
            store.record_failures();
        }
    }

    /// The reply of a teardown. After a success, what goes wrong in the cleanup does not
    /// make the backup a failure (the caller would drop a good backup): warnings.
    #[allow(clippy::too_many_arguments)]
    fn teardown_result(
        &self,
        target: &str,
        active: &Active,
        success: bool,
        effective_success: bool,
        broken_reason: Option<String>,
        bitmap_errors: Vec<Error>,
        cleanup: Result<()>,
    ) -> Result<TeardownReport> {
        if let (true, Some(reason)) = (success, &broken_reason) {
            return Err(Error::new(
                Kind::Broken,
                format!(
                    "the backup of target '{target}' cannot be trusted: its access broke ({reason}); it was torn down as a failure"
                ),
            ));
        }
        let mut warnings = Vec::new();
        for e in bitmap_errors {
            if !effective_success {
                return Err(e);
            }
            warnings.push(format!(
                "{}; that bitmap's next backup is full",
                crate::error::report(&e)
            ));
        }
        match cleanup {
            Err(e) if effective_success => warnings.push(format!(
                "{} (removed at the next setup or mount)",
                crate::error::report(&e)
            )),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        for w in &warnings {
            log::warn!("teardown of target '{target}': {w}");
        }
        Ok(TeardownReport {
            target: target.to_string(),
            success: effective_success,
            devices: active
                .devices
                .iter()
                .map(|d| self.devices[d.index].name().to_string())
                .collect(),
            broken_reason,
            warnings,
        })
    }

    /// Removes the accesses from their gates and puts each frozen bitmap back into
    /// tracking, ORed with its background bitmap while the gates are held, so no write
    /// falls between the two. On `success` the background keeps tracking writes (for
    /// [`Engine::complete_success`]); otherwise it is deleted once the bitmap is flushed.
    /// Returns the accesses and the bitmaps' errors (each such bitmap is marked failed:
    /// invalid from then on).
    fn switch_back(
        &self,
        active: &Active,
        store: Option<&BitmapStore>,
        success: bool,
    ) -> (Vec<Arc<DeviceAccess>>, Vec<Error>) {
        let mut gates: Vec<_> = active
            .devices
            .iter()
            .map(|d| self.devices[d.index].lock_gate())
            .collect();
        let accesses: Vec<Arc<DeviceAccess>> =
            gates.iter_mut().filter_map(|g| g.access.take()).collect();
        for a in &accesses {
            a.retire();
        }
        for (gate, d) in gates.iter_mut().zip(&active.devices) {
            if let (Some(b), Some(bg)) = (&d.bitmap, &d.background) {
                b.merge_bits(bg.bits(), false);
            }
            if let Some(store) = store {
                gate.tracking = store.tracking_for(self.devices[d.index].name(), None);
                if let (true, Some(bg)) = (success, &d.background) {
                    gate.tracking.push(bg.clone());
                }
            }
        }
        drop(gates);
        // Durability after the gates: until each merged bitmap is flushed its background
        // file stays, so a crash now recovers the same superset (bitmap |= background).
        let mut errors = Vec::new();
        for d in &active.devices {
            let (Some(b), Some(bg)) = (&d.bitmap, &d.background) else {
                continue;
            };
            if let Err(e) = b.flush() {
                b.mark_failed(&crate::error::report(&e));
                errors.push(e);
            } else if !success {
                if let Err(e) = Self::remove_background(b, bg) {
                    errors.push(e);
                }
            }
        }
        (accesses, errors)
    }

    /// The second phase of a successful teardown, after its reply: if it was delivered,
    /// each target bitmap := its background (which has recorded every write since setup,
    /// also those since the first phase) and the backup is counted (sequence + 1);
    /// either way the background stops tracking and is deleted. Errors are logged: each
    /// failing bitmap is marked failed (its next backup is full).
    fn complete_success(&self, active: &Active, store: Option<&BitmapStore>, delivered: bool) {
        let mut gates: Vec<_> = active
            .devices
            .iter()
            .map(|d| self.devices[d.index].lock_gate())
            .collect();
        for (gate, d) in gates.iter_mut().zip(&active.devices) {
            if let (true, Some(b), Some(bg)) = (delivered, &d.bitmap, &d.background) {
                b.merge_bits(bg.bits(), true);
            }
            if let Some(store) = store {
                gate.tracking = store.tracking_for(self.devices[d.index].name(), None);
            }
        }
        drop(gates);
        for d in &active.devices {
            let (Some(b), Some(bg)) = (&d.bitmap, &d.background) else {
                continue;
            };
            // Flushed (and counted) before the background goes: a crash before that
            // still finds the background and ORs it in, a superset.
            let done = b
                .flush()
                .and_then(|_| if delivered { b.bump_sequence() } else { Ok(()) })
                .and_then(|_| Self::remove_background(b, bg));
            if let Err(e) = done {
                b.mark_failed(&crate::error::report(&e));
            }
        }
    }

    /// Deletes a background file once its bitmap is flushed. If that fails the bitmap is
    /// marked failed: a background file left behind is merged again at the next mount.
    fn remove_background(b: &TrackedBitmap, bg: &TrackedBitmap) -> Result<()> {
        bg.remove().inspect_err(|e| {
            b.mark_failed(&format!(
                "its background file could not be removed: {}",
                crate::error::report(e)
            ))
        })
    }

    fn finish(&self, accesses: &[Arc<DeviceAccess>]) -> Result<()> {
        let mut first_err = None;
        for a in accesses {
            if let Err(e) = a.fleecing().remove() {
                log::error!("{}", crate::error::report(&e));
                first_err.get_or_insert(e);
            }
        }
        if first_err.is_none() {
            if let Some(state) = &self.state {
                state.clear_access()?;
            }
        }
        first_err.map_or(Ok(()), Err)
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
            store.close_all(&self.devices);
        }
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
        let devices = self
            .devices
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
                let dev = &self.devices[d.index];
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
            .map(|b| b.status(&self.devices))
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
            mountpoint: self.config.mountpoint.clone(),
            pid: std::process::id(),
            devices,
            bitmaps,
            access,
            errors,
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
        for (i, d) in self.devices.iter().enumerate() {
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

//! The engine: all devices of one daemon, and the lifecycle of the backup access
//! (setup, teardown, status). No FUSE here: tests drive it directly.
//!
//! `setup` prepares everything that can fail (fleecing files, bitmaps) first, then takes
//! every device gate exclusively in device index order and installs the accesses while
//! holding them all: no live write is in flight on any of the devices at that moment,
//! so a multi-device snapshot is one instant for all of them. `teardown` removes them
//! the same way. See `cbw.rs` for the data path and the lock order.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::Serialize;

use crate::bitmap::Bitmap;
use crate::cbw::{Device, DeviceAccess, OnCbwError};
use crate::error::{Error, IoContext, Kind, Result};
use crate::state::{AccessRecord, StateDir};
use crate::sys::unix_now;

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
    /// Policy when copy-before-write fails.
    pub on_cbw_error: OnCbwError,
    /// The mount point (reports give absolute snapshot paths).
    pub mountpoint: PathBuf,
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
    /// The active access, if any.
    pub access: Option<AccessStatus>,
    /// Errors worth a look (source I/O errors, broken accesses).
    pub errors: Vec<String>,
}

struct Active {
    target: String,
    id: u64,
    devices: Vec<usize>,
    started_at: u64,
}

struct Control {
    active: Option<Active>,
    next_id: u64,
}

/// All devices and the access lifecycle.
pub struct Engine {
    devices: Vec<Arc<Device>>,
    config: EngineConfig,
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
    /// recovery.
    pub fn new(devices: Vec<Device>, config: EngineConfig, state: Option<StateDir>) -> Engine {
        Engine {
            devices: devices.into_iter().map(Arc::new).collect(),
            config,
            state,
            control: Mutex::new(Control {
                active: None,
                next_id: 1,
            }),
        }
    }

    /// The devices, in the order given at mount.
    pub fn devices(&self) -> &[Arc<Device>] {
        &self.devices
    }

    /// The state directory, if any.
    pub fn state(&self) -> Option<&StateDir> {
        self.state.as_ref()
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
        if let Some(a) = &control.active {
            return Err(Error::busy(format!(
                "a backup access is already active for target '{}'; tear it down first",
                a.target
            )));
        }
        let indices = self.resolve_devices(devices)?;
        if bitmap.is_some() {
            return Err(Error::new(
                Kind::Unsupported,
                "--bitmap needs persistent bitmaps, which this build does not have",
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
            state.record_access(&record)?;
        }
        // Prepare everything that can fail before touching any gate.
        let mut prepared: Vec<(usize, Arc<DeviceAccess>)> = Vec::new();
        for (&i, (_, path)) in indices.iter().zip(&record.devices) {
            let dev = &self.devices[i];
            let frozen = Arc::new(Bitmap::new(dev.clusters(), true));
            match DeviceAccess::new(id, dev, frozen, path, self.config.on_cbw_error) {
                Ok(a) => prepared.push((i, Arc::new(a))),
                Err(e) => {
                    for (_, a) in &prepared {
                        let _ = a.fleecing().remove();
                    }
                    if let Some(state) = &self.state {
                        let _ = state.clear_access();
                    }
                    return Err(e);
                }
            }
        }
        {
            // One instant for all devices: hold every gate, then switch.
            let mut gates: Vec<_> = prepared
                .iter()
                .map(|(i, _)| self.devices[*i].lock_gate())
                .collect();
            for (gate, (_, access)) in gates.iter_mut().zip(&prepared) {
                **gate = Some(access.clone());
            }
        }
        control.active = Some(Active {
            target: target.to_string(),
            id,
            devices: indices.clone(),
            started_at,
        });
        log::info!(
            "backup access for target '{target}' set up on {}",
            record
                .devices
                .iter()
                .map(|d| d.0.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(SetupReport {
            target: target.to_string(),
            devices: prepared
                .iter()
                .map(|(i, a)| {
                    let dev = &self.devices[*i];
                    let snap = self.config.mountpoint.join("snapshot").join(dev.name());
                    SetupDevice {
                        name: dev.name().to_string(),
                        size: dev.size(),
                        dirty_map: snap.with_file_name(format!("{}.dirty", dev.name())),
                        snapshot: snap,
                        bitmap: None,
                        bitmap_action: "not-used".to_string(),
                        dirty_bytes: a.dirty_map().dirty_bytes(),
                    }
                })
                .collect(),
        })
    }

    /// Ends the access of `target`. A broken access counts as failed whatever `success`
    /// says, and then this returns an error (after cleaning up) unless `success` is false.
    pub fn teardown(&self, target: &str, success: bool) -> Result<TeardownReport> {
        validate_name("target", target)?;
        let mut control = self.control();
        match &control.active {
            Some(a) if a.target == target => {}
            Some(a) => {
                return Err(Error::not_found(format!(
                    "no backup access for target '{target}' (the active one is '{}')",
                    a.target
                )))
            }
            None => {
                return Err(Error::not_found(format!(
                    "no backup access for target '{target}' (none is active)"
                )))
            }
        }
        let active = control.active.take().expect("checked above");
        let accesses = self.take_accesses(&active.devices);
        let broken_reason = accesses
            .iter()
            .find_map(|a| a.broken().map(|b| b.reason.clone()));
        let effective_success = success && broken_reason.is_none();
        self.finish(&active, &accesses)?;
        log::info!(
            "backup access for target '{target}' torn down ({})",
            if effective_success {
                "success"
            } else {
                "failure"
            }
        );
        let report = TeardownReport {
            target: target.to_string(),
            success: effective_success,
            devices: active
                .devices
                .iter()
                .map(|&i| self.devices[i].name().to_string())
                .collect(),
            broken_reason: broken_reason.clone(),
        };
        if let (true, Some(reason)) = (success, broken_reason) {
            return Err(Error::new(
                Kind::Broken,
                format!(
                    "the backup of target '{target}' cannot be trusted: its access broke ({reason}); it was torn down as a failure"
                ),
            ));
        }
        Ok(report)
    }

    fn take_accesses(&self, devices: &[usize]) -> Vec<Arc<DeviceAccess>> {
        let mut gates: Vec<_> = devices
            .iter()
            .map(|&i| self.devices[i].lock_gate())
            .collect();
        gates.iter_mut().filter_map(|g| g.take()).collect()
    }

    fn finish(&self, _active: &Active, accesses: &[Arc<DeviceAccess>]) -> Result<()> {
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

    /// Tears down any active access as a failure (shutdown path).
    pub fn shutdown(&self) {
        let target = self.control().active.as_ref().map(|a| a.target.clone());
        if let Some(t) = target {
            log::warn!("shutting down: backup access for target '{t}' is torn down as a failure");
            if let Err(e) = self.teardown(&t, false) {
                log::error!("{}", crate::error::report(&e));
            }
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
                dirty_bytes: 0,
                broken: false,
                broken_reason: None,
                broken_at: None,
                per_device: Vec::new(),
            };
            for &i in &a.devices {
                let dev = &self.devices[i];
                s.devices.push(dev.name().to_string());
                let Some(acc) = dev.access() else { continue };
                let st = acc.stats();
                s.fleecing_allocated += st.fleecing_allocated;
                s.copied_bytes += st.copied_bytes;
                s.discarded_bytes += st.discarded_bytes;
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
                });
            }
            s
        });
        Status {
            mountpoint: self.config.mountpoint.clone(),
            pid: std::process::id(),
            devices,
            access,
            errors,
        }
    }

    /// Deletes every bitmap of `target`.
    pub fn remove_bitmaps(&self, target: &str) -> Result<BitmapRemoveReport> {
        validate_name("target", target)?;
        Err(Error::not_found(format!(
            "target '{target}' has no bitmaps"
        )))
    }

    /// Where fleecing files go.
    pub fn fleecing_dir(&self) -> &Path {
        &self.config.fleecing_dir
    }
}

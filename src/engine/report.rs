//! The reports of the engine: what `setup`, `teardown`, `status` and `bitmap remove`
//! return. The daemon sends them as JSON (docs/usage.md); the CLI reads them back into
//! the same types.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::bitmap_store::{BitmapAction, BitmapStatus};
use crate::layout::MountLayout;

/// The result of `bitmap remove`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BitmapRemoveReport {
    /// Target ID.
    pub target: String,
    /// `DEVICE/NAME` of every bitmap removed.
    pub removed: Vec<String>,
}

/// One device of a `setup` result.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SetupDevice {
    /// Device name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Path of the snapshot file: relative to the mount point from the engine,
    /// absolute once [`SetupReport::at_mount`] has rooted it.
    pub snapshot: PathBuf,
    /// Path of the dirty map file (relative or absolute, as `snapshot`).
    pub dirty_map: PathBuf,
    /// The bitmap used, if any.
    pub bitmap: Option<String>,
    /// What was done with the bitmap.
    pub bitmap_action: BitmapAction,
    /// Bytes the backup must read (sum of the dirty map).
    pub dirty_bytes: u64,
}

/// The result of `setup`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SetupReport {
    /// Target ID.
    pub target: String,
    /// One entry per device of the access.
    pub devices: Vec<SetupDevice>,
}

/// The result of `teardown`.
#[derive(Serialize, Deserialize, Debug, Clone)]
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
#[derive(Serialize, Deserialize, Debug, Clone)]
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
#[derive(Serialize, Deserialize, Debug, Clone)]
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
#[derive(Serialize, Deserialize, Debug, Clone)]
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
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Status {
    /// Mount point (empty from the engine; the frontend that serves it fills it in).
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
    /// The options the mount was made with.
    #[serde(default)]
    pub options: Option<MountOptions>,
}

/// The options a mount was made with, as `status` shows them: the values of `mount`'s
/// flags (defaults included).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MountOptions {
    /// `--cluster-size` in bytes (devices added later get it too).
    pub cluster_size: u64,
    /// `--backup-priority`: `low` or `normal`.
    pub backup_priority: String,
    /// `--backup-share`: a percentage of one CPU (`45`) or `auto`; `None` without it.
    pub backup_share: Option<String>,
    /// `--backup-read`: `cached` or `direct`.
    pub backup_read: String,
    /// `--fleecing-limit` in bytes; `None`: no limit.
    pub fleecing_limit: Option<u64>,
    /// `--fleecing-dir`.
    pub fleecing_dir: PathBuf,
    /// `--crash-safe-bitmaps`: `on`, `sync` or `off`.
    pub crash_safe_bitmaps: String,
    /// `--on-cbw-error`: `break-snapshot` or `break-guest-write`.
    pub on_cbw_error: String,
    /// `--cbw-timeout` in seconds; `None`: no limit.
    pub cbw_timeout_seconds: Option<f64>,
    /// `--cbw-buffer` in bytes.
    pub cbw_buffer: u64,
    /// `--live-cache` given.
    pub live_cache: bool,
    /// `--threads`: FUSE worker threads.
    pub threads: usize,
}

impl SetupReport {
    /// The report with the snapshot and dirty map paths under the mount `layout`.
    pub fn at_mount(mut self, layout: &MountLayout) -> SetupReport {
        for d in &mut self.devices {
            d.snapshot = layout.root().join(&d.snapshot);
            d.dirty_map = layout.root().join(&d.dirty_map);
        }
        self
    }
}

impl Status {
    /// The status as seen at the mount `layout`.
    pub fn at_mount(mut self, layout: &MountLayout) -> Status {
        self.mountpoint = layout.root().to_path_buf();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn setup_report_is_rooted_at_the_mount_and_reads_back() {
        let paths = MountLayout::relative();
        let r = SetupReport {
            target: "t".into(),
            devices: vec![SetupDevice {
                name: "vm".into(),
                size: 4096,
                snapshot: paths.snapshot("vm"),
                dirty_map: paths.dirty_map("vm"),
                bitmap: None,
                bitmap_action: BitmapAction::NotUsedRemoved,
                dirty_bytes: 4096,
            }],
        }
        .at_mount(&MountLayout::new("/mnt/f"));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["devices"][0]["snapshot"], "/mnt/f/snapshot/vm");
        assert_eq!(json["devices"][0]["dirty_map"], "/mnt/f/snapshot/vm.dirty");
        assert_eq!(json["devices"][0]["bitmap_action"], "not-used-removed");
        let back: SetupReport = serde_json::from_value(json).unwrap();
        assert_eq!(
            back.devices[0].dirty_map,
            Path::new("/mnt/f/snapshot/vm.dirty")
        );
    }
}

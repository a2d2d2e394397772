//! The file layout of a mount, spelled in one place: `live/NAME` (the read-write image),
//! `snapshot/NAME` (the point-in-time view during an access) and `snapshot/NAME.dirty`
//! (its dirty map). The FUSE namespace, the engine's reports, the daemon and `copy` all
//! take the names from here.

use std::path::{Path, PathBuf};

/// The directory of the live images.
pub const LIVE_DIR: &str = "live";
/// The directory of the snapshots and dirty maps.
pub const SNAPSHOT_DIR: &str = "snapshot";
/// What a device name gets appended for its dirty map file in [`SNAPSHOT_DIR`].
pub const DIRTY_SUFFIX: &str = ".dirty";

/// The file name of the dirty map of device `name`.
pub fn dirty_map_name(name: &str) -> String {
    format!("{name}{DIRTY_SUFFIX}")
}

/// Whether `name` cannot be a device name because a dirty map file would take it.
pub fn is_reserved_device_name(name: &str) -> bool {
    name.ends_with(DIRTY_SUFFIX)
}

/// The paths of a mount's files under one root: the mount point, or nothing for paths
/// relative to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountLayout {
    root: PathBuf,
}

impl MountLayout {
    /// The layout of the mount at `root`.
    pub fn new(root: impl Into<PathBuf>) -> MountLayout {
        MountLayout { root: root.into() }
    }

    /// Paths relative to the mount point (`snapshot/NAME`).
    pub fn relative() -> MountLayout {
        MountLayout::new(PathBuf::new())
    }

    /// The mount point (empty for [`MountLayout::relative`]).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `ROOT/live`.
    pub fn live_dir(&self) -> PathBuf {
        self.root.join(LIVE_DIR)
    }

    /// `ROOT/live/NAME`.
    pub fn live(&self, name: &str) -> PathBuf {
        self.live_dir().join(name)
    }

    /// `ROOT/snapshot/NAME`.
    pub fn snapshot(&self, name: &str) -> PathBuf {
        self.root.join(SNAPSHOT_DIR).join(name)
    }

    /// `ROOT/snapshot/NAME.dirty`.
    pub fn dirty_map(&self, name: &str) -> PathBuf {
        self.root.join(SNAPSHOT_DIR).join(dirty_map_name(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_a_mount_and_relative_ones() {
        let m = MountLayout::new("/mnt/x");
        assert_eq!(m.live("vm"), Path::new("/mnt/x/live/vm"));
        assert_eq!(m.snapshot("vm"), Path::new("/mnt/x/snapshot/vm"));
        assert_eq!(m.dirty_map("vm"), Path::new("/mnt/x/snapshot/vm.dirty"));
        let r = MountLayout::relative();
        assert_eq!(r.snapshot("vm"), Path::new("snapshot/vm"));
        assert_eq!(m.root().join(r.dirty_map("vm")), m.dirty_map("vm"));
        assert!(is_reserved_device_name("a.dirty"));
        assert!(!is_reserved_device_name("a.dirt"));
    }
}

//! What is counted and marked on a device for the frontends and the engine: the open
//! handles of `live/NAME` (a device with open handles cannot be removed), a removal under
//! way (no new handle is opened), whether `live/NAME` was opened through the mount (the
//! kernel may hold pages of it, which changes by another frontend must drop), and the
//! read-write handles of `snapshot/NAME`.

use std::sync::atomic::Ordering;

use super::Device;

impl Device {
    /// Counts an open handle of `live/NAME` (the engine calls this under its device
    /// table's read lock, so a removal either sees it or happened before).
    pub fn handle_opened(&self) {
        self.open_handles.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts a released handle of `live/NAME`.
    pub fn handle_released(&self) {
        let _ = self
            .open_handles
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Open handles of `live/NAME`.
    pub fn open_handles(&self) -> u64 {
        self.open_handles.load(Ordering::Acquire)
    }

    /// Marks the device as being removed, or no longer (the engine does, under its device
    /// table's write lock, and opens no handle of a device being removed).
    pub fn set_removing(&self, removing: bool) {
        self.removing.store(removing, Ordering::SeqCst);
    }

    /// Whether `device remove` of the device is under way.
    pub fn removing(&self) -> bool {
        self.removing.load(Ordering::SeqCst)
    }

    /// Notes that `live/NAME` was opened through the mount (the FUSE adapter does, at
    /// each open, and for every device when it takes the mount over from an earlier
    /// worker): from then on the kernel may hold pages of it.
    pub fn note_opened_through_mount(&self) {
        self.opened_through_mount.store(true, Ordering::SeqCst);
    }

    /// Whether `live/NAME` was ever opened through the mount.
    pub fn opened_through_mount(&self) -> bool {
        self.opened_through_mount.load(Ordering::SeqCst)
    }

    /// Counts an open (`opened`) or released read-write handle of `snapshot/NAME`.
    pub fn count_rw_snapshot_handle(&self, opened: bool) {
        if opened {
            self.rw_snapshot_handles.fetch_add(1, Ordering::SeqCst);
        } else {
            let _ =
                self.rw_snapshot_handles
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        }
    }

    /// Whether a read-write handle of `snapshot/NAME` is open.
    pub fn rw_snapshot_open(&self) -> bool {
        self.rw_snapshot_handles.load(Ordering::SeqCst) > 0
    }
}

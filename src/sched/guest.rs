//! The guest's activity as the backup scheduler sees it: when a frontend last served a
//! guest request (a read or write of a live device), and how many it served.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The guest counts as active for this long after its last request.
pub const GUEST_WINDOW: Duration = Duration::from_millis(20);

/// Guest requests noted by the frontends of one mount.
pub struct GuestMeter {
    epoch: Instant,
    /// When the guest was last seen, in ns since `epoch`; 0: never.
    seen: AtomicU64,
    /// Guest requests seen so far (the rate `--backup-share auto` steers by), counted
    /// only while `counting` (a controller runs): otherwise the hot path pays a load,
    /// not an increment of a line every worker shares.
    requests: AtomicU64,
    counting: AtomicBool,
}

impl GuestMeter {
    /// A meter that has seen no guest request yet.
    pub fn new(counting: bool) -> GuestMeter {
        GuestMeter {
            epoch: Instant::now(),
            seen: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            counting: AtomicBool::new(counting),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Records one guest request.
    pub fn note(&self) {
        if self.counting.load(Ordering::Relaxed) {
            self.requests.fetch_add(1, Ordering::Relaxed);
        }
        let ns = self.now_ns();
        // Coarse: at most one store per 100 µs, so the workers do not fight over the line.
        let seen = self.seen.load(Ordering::Relaxed);
        if seen == 0 || ns.saturating_sub(seen) > 100_000 {
            self.seen.store(ns.max(1), Ordering::Relaxed);
        }
    }

    /// Whether the guest made a request within the last [`GUEST_WINDOW`].
    pub fn active(&self) -> bool {
        let seen = self.seen.load(Ordering::Relaxed);
        seen != 0 && self.now_ns().saturating_sub(seen) < GUEST_WINDOW.as_nanos() as u64
    }

    /// Guest requests counted so far (0 while not counting).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_for_a_window_after_a_request_and_counts_only_when_asked() {
        let m = GuestMeter::new(false);
        assert!(!m.active(), "never seen");
        m.note();
        assert!(m.active());
        assert_eq!(m.requests(), 0, "not counting");
        std::thread::sleep(GUEST_WINDOW * 2);
        assert!(!m.active(), "quiet for two windows");
        let c = GuestMeter::new(true);
        for _ in 0..5 {
            c.note();
        }
        assert_eq!(c.requests(), 5);
    }
}

//! `teardown`: ends a backup access, and the two-phase protocol of a success.
//!
//! # Two phases
//! Until a success has been delivered, the bitmaps must stay a superset of what a
//! failure would leave: a caller that never learns of the success (the daemon died,
//! the client went away) treats the backup as failed, and its next incremental must
//! still cover everything since the last backup it kept. So the success works in two
//! phases:
//! 1. before the reply ([`Engine::switch_back`]), as for a failure: the accesses leave
//!    their gates (retired), and each target bitmap |= its background, but the
//!    background keeps recording writes;
//! 2. once the reply is delivered (`deliver` returned true; the control socket waits for
//!    the client's acknowledgement), [`Engine::complete_success`]: each target
//!    bitmap := its background (every write since setup) and the sequence is counted.
//!    Undelivered, the background only stops tracking and is deleted: a failure.
//!
//! A crash at any point leaves at most a superset (recovery at mount ORs the background
//! into its bitmap). The outcome is decided once, before phase 1: a break after that
//! instant (a write-behind flusher failing during the teardown) cannot spoil what the
//! backup already read. After a success, what goes wrong in the cleanup (a bitmap that
//! cannot be flushed, a fleecing file that cannot be removed) is a warning in the reply.

use std::sync::Arc;

use crate::bitmap_file::TrackedBitmap;
use crate::bitmap_store::BitmapStore;
use crate::cbw::DeviceAccess;
use crate::engine::report::TeardownReport;
use crate::engine::{validate_name, Active, Engine};
use crate::error::{Error, Kind, Result};

impl Engine {
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
    /// whether the caller got it (the control reply was written). A success is applied
    /// in two phases around the reply: see the module documentation.
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
            d.device
                .access()
                .and_then(|a| a.broken().map(|b| b.reason.clone()))
        });
        let effective_success = success && broken_reason.is_none();
        let (accesses, bitmap_errors) =
            self.switch_back(&active, control.bitmaps.as_ref(), effective_success);
        let cleanup = self.finish(&accesses);
        let devices = active
            .devices
            .iter()
            .map(|d| d.device.name())
            .collect::<Vec<_>>()
            .join(", ");
        let why_failed = match (&broken_reason, success) {
            (Some(reason), _) => format!("its access broke ({reason})"),
            (None, false) => "as requested (--failure)".to_string(),
            (None, true) => String::new(),
        };
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
        // The log is the mount's backup history: every teardown and its outcome.
        if effective_success && delivered {
            log::info!("backup access for target '{target}' torn down: success on {devices}");
        } else if effective_success {
            log::info!(
                "backup access for target '{target}' torn down: failure on {devices} (the reply of the success was not delivered)"
            );
        } else {
            log::info!(
                "backup access for target '{target}' torn down: failure on {devices}, {why_failed}"
            );
        }
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

    /// A planned restart while an access is active (`restart --force`), after the last
    /// live write of this worker: for the bitmaps the access ends as a failure would
    /// (each target bitmap |= its background, the background deleted), and every bitmap
    /// is closed cleanly, so the next worker opens them as after a clean stop, whatever
    /// `--crash-safe-bitmaps` says. The access record and its fleecing files stay: the
    /// next worker restores the access broken ([`Engine::restore_broken`]).
    pub fn hand_over(&self) {
        let mut control = self.control();
        control.shut_down = true;
        if let Some(active) = control.active.take() {
            let (_, errors) = self.switch_back(&active, control.bitmaps.as_ref(), false);
            for e in errors {
                log::error!("{}", crate::error::report(&e));
            }
        }
        if let Some(store) = &control.bitmaps {
            store.close_all(&self.devices());
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
                .map(|d| d.device.name().to_string())
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
            .map(|d| d.device.lock_gate())
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
                gate.tracking = store.tracking_for(d.device.name(), None);
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
            .map(|d| d.device.lock_gate())
            .collect();
        for (gate, d) in gates.iter_mut().zip(&active.devices) {
            if let (true, Some(b), Some(bg)) = (delivered, &d.bitmap, &d.background) {
                b.merge_bits(bg.bits(), true);
            }
            if let Some(store) = store {
                gate.tracking = store.tracking_for(d.device.name(), None);
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
}

//! `setup`: starts a backup access. Everything that can fail (fleecing files, bitmap
//! decisions, the registry, the access record) is prepared first; then every gate of the
//! access is taken in device index order and the accesses are switched in while all are
//! held, so the snapshot of several devices is one instant.

use std::path::PathBuf;
use std::sync::Arc;

use crate::bitmap::Bitmap;
use crate::bitmap_store::{BitmapAction, Decision};
use crate::cbw::policy::{Breaker, FleecingBudget};
use crate::cbw::{CbwPolicy, Device};
use crate::engine::report::{SetupDevice, SetupReport};
use crate::engine::{validate_name, Active, ActiveDevice, Engine};
use crate::error::{Error, Result};
use crate::fleece::FleecingFile;
use crate::layout::MountLayout;
use crate::state::AccessRecord;
use crate::sys::unix_now;

/// What a setup does with the target's bitmaps.
enum Bitmaps<'a> {
    /// A user's setup: use, create or remove the target's bitmap (`--bitmap NAME`).
    Choose(Option<&'a str>),
    /// A broken access restored after a worker death: leave them alone.
    Keep {
        /// Why it is broken.
        reason: &'a str,
        /// The dead worker's id of the access (0: unknown).
        id: u64,
    },
}

impl Engine {
    /// The devices of a setup with their slots, in slot order (gate order).
    fn resolve_devices(&self, names: Option<&[String]>) -> Result<Vec<(usize, Arc<Device>)>> {
        let Some(names) = names else {
            let all = self.slots();
            if all.is_empty() {
                return Err(Error::invalid("no device is served"));
            }
            return Ok(all);
        };
        if names.is_empty() {
            return Err(Error::invalid("--devices names no device"));
        }
        let mut out: Vec<(usize, Arc<Device>)> = Vec::new();
        for n in names {
            let i = self.known_device_index(n)?;
            if out.iter().any(|(j, _)| *j == i) {
                return Err(Error::invalid(format!("device '{n}' is named twice")));
            }
            let d = self.device(i).ok_or_else(|| self.unknown_device(n))?;
            out.push((i, d));
        }
        out.sort_unstable_by_key(|(i, _)| *i);
        Ok(out)
    }

    fn fleecing_path(&self, device: &str, target: &str) -> PathBuf {
        self.config.fleecing_dir.join(fleecing_name(device, target))
    }

    /// Starts a backup access for `target` on `devices` (all when `None`).
    pub fn setup(
        &self,
        target: &str,
        devices: Option<&[String]>,
        bitmap: Option<&str>,
    ) -> Result<SetupReport> {
        self.start_access(target, devices, Bitmaps::Choose(bitmap))
    }

    /// Sets up again, broken at once (`reason`), the access of `target` on `devices`
    /// that was active when the previous worker died, so its snapshot handles and its
    /// teardown find it. It leaves the target's bitmaps as recovery found them and
    /// keeps them tracking every write: they still hold everything since the target's
    /// last successful backup (recovery ORed each background into its bitmap), and the
    /// next setup with them is `used`.
    ///
    /// The restored access keeps the dead worker's access id `id` (0: unknown, a new
    /// one), so snapshot handles opened before the death find it broken (EIO) instead of
    /// gone (ESTALE).
    pub fn restore_broken(
        &self,
        target: &str,
        devices: &[String],
        id: u64,
        reason: &str,
    ) -> Result<SetupReport> {
        self.start_access(target, Some(devices), Bitmaps::Keep { reason, id })
    }

    fn start_access(
        &self,
        target: &str,
        devices: Option<&[String]>,
        bitmaps: Bitmaps<'_>,
    ) -> Result<SetupReport> {
        let (bitmap, keep, restored_id) = match bitmaps {
            Bitmaps::Choose(b) => (b, None, 0),
            Bitmaps::Keep { reason, id } => (None, Some(reason), id),
        };
        validate_name("target", target)?;
        if let Some(b) = bitmap {
            validate_name("bitmap name", b)?;
        }
        let mut control = self.control_before_shutdown()?;
        if let Some(a) = &control.active {
            return Err(Error::busy(format!(
                "a backup access is already active for target '{}'; tear it down first",
                a.target
            )));
        }
        let indices = self.resolve_devices(devices)?;
        for (slot, _) in &indices {
            self.not_being_removed(*slot)?;
        }
        let control = &mut *control;
        if bitmap.is_some() && control.bitmaps.is_none() {
            return Err(Error::invalid(
                "--bitmap needs a state directory for the bitmaps",
            ));
        }
        // Checked at every setup: a directory another user may write would let that
        // user take the fleecing file's name first.
        // Held open: the fleecing files are created and removed under its fd.
        let fleecing_dir = Arc::new(crate::secure_path::trusted_dir(
            &self.config.fleecing_dir,
            "fleecing directory",
            crate::secure_path::Missing::Create,
        )?);
        let id = if restored_id > 0 {
            control.next_id = control.next_id.max(restored_id + 1);
            restored_id
        } else {
            let id = control.next_id;
            control.next_id += 1;
            if let Some(state) = &self.state {
                state.record_access_id(id)?;
            }
            id
        };
        let started_at = unix_now();
        let record = AccessRecord {
            id,
            target: target.to_string(),
            started_at,
            devices: indices
                .iter()
                .map(|(_, d)| {
                    let name = d.name();
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
            for (_, dev) in &indices {
                fleeces.push(FleecingFile::create(
                    &fleecing_dir,
                    &fleecing_name(dev.name(), target),
                    dev.size(),
                )?);
                if let (Some(store), None) = (control.bitmaps.as_mut(), keep) {
                    decisions.push((dev.name().to_string(), store.decide(dev, target, bitmap)?));
                }
            }
            if let (Some(store), None) = (control.bitmaps.as_mut(), keep) {
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
        if let Some(reason) = keep {
            // Before the access is installed: no read ever sees it unbroken.
            policy.breaker.break_with(reason.to_string());
        }
        let mut active_devices = Vec::new();
        let mut report = Vec::new();
        {
            // One instant for all devices: hold every gate, then switch. No write is in
            // flight on any of them, so each frozen bitmap is exact and every later write
            // lands in its background bitmap.
            let mut gates: Vec<_> = indices.iter().map(|(_, d)| d.lock_gate()).collect();
            for ((gate, (i, dev)), fleece) in gates.iter_mut().zip(&indices).zip(fleeces) {
                let i = *i;
                let decision = decisions.next().map(|(_, d)| d);
                let (action, bitmap, name, background) = match decision {
                    Some(d) => (d.action, d.bitmap, d.name, d.background),
                    None => (BitmapAction::NotUsed, None, None, None),
                };
                let frozen = match (&bitmap, action) {
                    (Some(b), BitmapAction::Used) => Arc::new(b.bits().to_heap()),
                    _ => Arc::new(Bitmap::new(dev.clusters(), true)),
                };
                let access = Arc::new(dev.new_access(id, frozen, fleece, policy.clone()));
                let paths = MountLayout::relative();
                report.push(SetupDevice {
                    name: dev.name().to_string(),
                    size: dev.size(),
                    snapshot: paths.snapshot(dev.name()),
                    dirty_map: paths.dirty_map(dev.name()),
                    bitmap: name.clone(),
                    bitmap_action: action,
                    dirty_bytes: access.dirty_map().dirty_bytes(),
                });
                gate.access = Some(access);
                if let Some(store) = &control.bitmaps {
                    // A kept target's bitmaps are not frozen: they go on tracking.
                    let except = if keep.is_some() { None } else { Some(target) };
                    gate.tracking = store.tracking_for(dev.name(), except);
                    gate.tracking.extend(background.clone());
                }
                active_devices.push(ActiveDevice {
                    index: i,
                    device: dev.clone(),
                    bitmap,
                    background,
                    bitmap_name: name,
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
}

/// The file name of the fleecing file of `device` in an access of `target`.
fn fleecing_name(device: &str, target: &str) -> String {
    format!("{device}.{target}.fleece")
}

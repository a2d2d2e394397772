//! The bitmap store: which targets own which bitmaps on which devices, loading them at
//! mount (with crash recovery), and the bitmap side of setup and teardown.
//!
//! The registry `STATE_DIR/bitmaps/registry.json` lists every bitmap (device, target,
//! name), so a bitmap whose file went missing is known and reported `invalid` instead of
//! silently becoming `new`. Files are `DEVICE@TARGET@NAME.bitmap` (names never contain
//! `@`, so file names cannot collide); during an access the background bitmap is
//! `DEVICE@TARGET@NAME.background`, and a bitmap being created is
//! `DEVICE@TARGET@NAME.pending` until setup commits it.
//!
//! Rules (Proxmox VE backup access, QEMU's incremental backup):
//! - while no access uses it, a bitmap records every write to its device;
//! - during an access of its target it is frozen (it defines the dirty map) and writes
//!   go to the background bitmap instead;
//! - teardown success: bitmap := background; failure, shutdown or crash: bitmap |=
//!   background. Either way nothing written since the last successful backup is lost.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bitmap::Bitmap;
use crate::bitmap_file::{BitmapKind, CrashSafety, TrackedBitmap};
use crate::cbw::Device;
use crate::error::{Error, Result};
use crate::secure_path::Dir;
use crate::state::write_atomic;

const REGISTRY: &str = "registry.json";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct RegistryEntry {
    device: String,
    target: String,
    name: String,
    /// Why the bitmap was found invalid, once it was: invalid stays invalid until a
    /// setup replaces it, whatever its file looks like at a later mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    invalid: Option<String>,
}

#[derive(Serialize, Deserialize, Default)]
struct Registry {
    version: u32,
    bitmaps: Vec<RegistryEntry>,
}

/// The invalid reason of a bitmap that failed while it was open (a flush or header
/// write failed, or its background file could not be removed).
const FAILED_WHILE_TRACKING: &str = "writing it failed while it was tracking writes";

/// The state of one registered bitmap.
pub enum BitmapState {
    /// Open and trustworthy.
    Open(Arc<TrackedBitmap>),
    /// Cannot be trusted; the next setup with it recreates it.
    Invalid(String),
    /// Its device is not served by this daemon; left as it is.
    Dormant,
}

/// One registered bitmap.
pub struct Entry {
    /// Device name.
    pub device: String,
    /// Owning target.
    pub target: String,
    /// Bitmap name.
    pub name: String,
    /// State.
    pub state: BitmapState,
    /// A note for status (why it was last recreated).
    pub note: Option<String>,
    /// For a dormant bitmap: the invalid reason the registry holds (kept as it is).
    recorded_invalid: Option<String>,
}

/// A bitmap line of `status`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BitmapStatus {
    /// Device name.
    pub device: String,
    /// Target ID.
    pub target: String,
    /// Bitmap name.
    pub name: String,
    /// Bytes marked dirty.
    pub dirty_bytes: u64,
    /// Whether it can be used for an incremental backup.
    pub consistent: bool,
    /// Why not, or why it was recreated.
    pub reason: Option<String>,
    /// Whether its device is served by this daemon.
    pub loaded: bool,
    /// Generation id (changes when the bitmap is recreated).
    pub generation: Option<u64>,
    /// Successful backups since it was created.
    pub sequence: Option<u64>,
}

/// What setup did with the bitmap of one device: the `bitmap_action` of its report
/// (docs/usage.md), spelled in kebab-case in JSON and tables.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BitmapAction {
    /// No `--bitmap`, and the target had none on this device: a full backup.
    NotUsed,
    /// No `--bitmap`, and the target's bitmap on this device was removed: a full backup.
    NotUsedRemoved,
    /// A new bitmap was created (all dirty): a full backup.
    New,
    /// The bitmap was used: an incremental backup.
    Used,
    /// The bitmap could not be trusted and was recreated (all dirty): a full backup.
    Invalid,
}

impl BitmapAction {
    /// The name used in JSON, tables and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            BitmapAction::NotUsed => "not-used",
            BitmapAction::NotUsedRemoved => "not-used-removed",
            BitmapAction::New => "new",
            BitmapAction::Used => "used",
            BitmapAction::Invalid => "invalid",
        }
    }
}

impl std::fmt::Display for BitmapAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What setup decided for one device.
pub struct Decision {
    /// The `bitmap_action` reported.
    pub action: BitmapAction,
    /// The bitmap the access uses (frozen), if any.
    pub bitmap: Option<Arc<TrackedBitmap>>,
    /// Its name.
    pub name: Option<String>,
    /// The background bitmap that records writes during the access.
    pub background: Option<Arc<TrackedBitmap>>,
    /// A bitmap created by this setup, registered by [`BitmapStore::commit`].
    new_entry: Option<Entry>,
}

/// All bitmaps of one daemon.
pub struct BitmapStore {
    /// `bitmaps/`, held open: every file in it is reached by name under this fd.
    dir: Arc<Dir>,
    crash_safe: CrashSafety,
    entries: Vec<Entry>,
}

fn file_name(device: &str, target: &str, name: &str, ext: &str) -> String {
    format!("{device}@{target}@{name}.{ext}")
}

fn extension(kind: BitmapKind) -> &'static str {
    match kind {
        BitmapKind::Target => "bitmap",
        BitmapKind::Background => "background",
    }
}

/// Deletes files a setup or a bitmap creation left half-done when the daemon died
/// (`*.pending` bitmaps never committed, `*.new` files and `registry.tmp` never renamed
/// into place), and
/// background files of bitmaps the registry does not list (their bitmap was dropped by
/// a setup that failed half-way). No registered bitmap refers to them.
fn remove_unfinished_files(dir: &Dir, registry: &Registry) {
    let entries = match dir.names() {
        Ok(n) => n,
        Err(e) => {
            log::warn!("listing {}: {e}", dir.path().display());
            return;
        }
    };
    let backgrounds: std::collections::HashSet<String> = registry
        .bitmaps
        .iter()
        .map(|r| {
            file_name(
                &r.device,
                &r.target,
                &r.name,
                extension(BitmapKind::Background),
            )
        })
        .collect();
    for e in entries {
        let path = dir.display_path(&e);
        let unfinished = match path.extension().and_then(|x| x.to_str()) {
            Some("pending") | Some("new") => true,
            // save_registry's temporary file (a crash between its write and rename).
            Some("tmp") => e == "registry.tmp",
            Some("background") => !backgrounds.contains(&*e.to_string_lossy()),
            _ => false,
        };
        if unfinished {
            match dir.remove(&e) {
                Ok(()) => log::warn!(
                    "removed {}, left unfinished by a daemon that stopped",
                    path.display()
                ),
                Err(err) => log::warn!("cannot remove {}: {err}", path.display()),
            }
        }
    }
}

/// A bitmap file must be the one the registry says: same device, target, name, role.
fn check_names(
    t: TrackedBitmap,
    r: &RegistryEntry,
    kind: BitmapKind,
) -> std::result::Result<TrackedBitmap, String> {
    let h = t.header();
    if h.device != r.device || h.target != r.target || h.name != r.name || h.kind != kind {
        return Err(format!(
            "the file belongs to bitmap '{}' of target '{}' on {} ({:?}), not to this one",
            h.name, h.target, h.device, h.kind
        ));
    }
    Ok(t)
}

/// Exact dirty bytes of `bits` on a device of `size` bytes with `cluster` clusters.
pub fn dirty_bytes(bits: &Bitmap, cluster: u64, size: u64) -> u64 {
    let n = bits.count_ones() * cluster;
    let last = bits.len().saturating_sub(1);
    if !bits.is_empty() && bits.get(last) {
        n - (bits.len() * cluster - size)
    } else {
        n
    }
}

impl BitmapStore {
    /// Loads the registry in `dir` (held open: every file is reached under its fd) for
    /// the devices served now, recovering interrupted accesses (bitmap |= background)
    /// and checking every bitmap.
    pub fn load(dir: Dir, devices: &[Arc<Device>], crash_safe: CrashSafety) -> Result<BitmapStore> {
        let reg_path = dir.display_path(REGISTRY);
        let read = dir.open(REGISTRY, libc::O_RDONLY, 0).and_then(|mut f| {
            let mut b: Vec<u8> = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut b).map(|_| b)
        });
        let registry: Registry = match read {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                log::error!(
                    "bitmap registry {} is damaged ({e}); bitmaps it listed will be new",
                    reg_path.display()
                );
                Registry::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Registry::default(),
            Err(e) => return Err(Error::io(format!("reading {}", reg_path.display()), e)),
        };
        remove_unfinished_files(&dir, &registry);
        let mut store = BitmapStore {
            dir: Arc::new(dir),
            crash_safe,
            entries: Vec::new(),
        };
        let mut newly_invalid = false;
        for r in registry.bitmaps {
            let state = match devices.iter().find(|d| d.name() == r.device) {
                None => BitmapState::Dormant,
                Some(dev) => {
                    let (state, newly) = store.load_state(dev, &r)?;
                    newly_invalid |= newly;
                    state
                }
            };
            store.entries.push(Entry {
                device: r.device,
                target: r.target,
                name: r.name,
                state,
                note: None,
                recorded_invalid: r.invalid,
            });
        }
        if newly_invalid {
            // Before any write goes untracked: a later mount (say with the right
            // --cluster-size again) must not find the file acceptable and trust it.
            store.save_registry()?;
        }
        Ok(store)
    }

    /// The state of registered bitmap `r` of the served device `dev` (at mount or
    /// device add), and whether it was found invalid just now.
    fn load_state(&self, dev: &Device, r: &RegistryEntry) -> Result<(BitmapState, bool)> {
        let (state, newly) = match &r.invalid {
            Some(reason) => {
                // Found invalid before: its file proves nothing any more (writes went
                // untracked since), and an interrupted access's background is moot.
                let bg = self.name_of(&r.device, &r.target, &r.name, BitmapKind::Background);
                let _ = self.dir.remove(bg);
                (BitmapState::Invalid(reason.clone()), false)
            }
            None => {
                let state = self.load_one(dev, r)?;
                let newly = matches!(state, BitmapState::Invalid(_));
                (state, newly)
            }
        };
        if let BitmapState::Invalid(reason) = &state {
            log::warn!(
                "bitmap '{}' of target '{}' on device {} is invalid: {reason}; the next backup with it is full",
                r.name,
                r.target,
                r.device
            );
        }
        Ok((state, newly))
    }

    /// Device add: loads the dormant bitmaps of `dev` as at mount (`used` if its source
    /// is unchanged since their clean close, else invalid). If the add fails later,
    /// [`BitmapStore::unload_device`] closes them again.
    pub fn load_device(&mut self, dev: &Device) -> Result<()> {
        let mut newly_invalid = false;
        for i in 0..self.entries.len() {
            let e = &self.entries[i];
            if e.device != dev.name() || !matches!(e.state, BitmapState::Dormant) {
                continue;
            }
            let r = RegistryEntry {
                device: e.device.clone(),
                target: e.target.clone(),
                name: e.name.clone(),
                invalid: e.recorded_invalid.clone(),
            };
            let loaded = self.load_state(dev, &r);
            let (state, newly) = match loaded {
                Ok(x) => x,
                Err(err) => {
                    self.unload_device(dev);
                    return Err(err);
                }
            };
            newly_invalid |= newly;
            self.entries[i].state = state;
        }
        if newly_invalid {
            self.save_registry()?;
        }
        Ok(())
    }

    /// Device remove (or a failed add): closes every open bitmap of `dev` cleanly
    /// (flushed, checksummed, source mtime recorded) and makes them dormant, as for a
    /// device not served. Call after the device's last write.
    pub fn unload_device(&mut self, dev: &Device) {
        for e in self.entries.iter_mut().filter(|e| e.device == dev.name()) {
            let state = std::mem::replace(&mut e.state, BitmapState::Dormant);
            match state {
                BitmapState::Open(t) => {
                    if let Err(err) = t.close_clean(dev.source()) {
                        t.mark_failed(&crate::error::report(&err));
                        e.recorded_invalid = Some(FAILED_WHILE_TRACKING.to_string());
                    } else {
                        e.recorded_invalid = None;
                    }
                }
                BitmapState::Invalid(reason) => e.recorded_invalid = Some(reason),
                BitmapState::Dormant => {}
            }
        }
        if let Err(e) = self.save_registry() {
            log::error!("{}", crate::error::report(&e));
        }
    }

    /// Resize, step 1: a grown mapping of every open bitmap of `device` and of `extra`
    /// (the background bitmap of an active access), `nbits` clusters long. Nothing is
    /// visible yet (see [`TrackedBitmap::grown`]).
    pub fn prepare_grow(
        &self,
        device: &str,
        extra: &[Arc<TrackedBitmap>],
        nbits: u64,
    ) -> Result<Vec<(Arc<TrackedBitmap>, Arc<TrackedBitmap>)>> {
        let mut out = Vec::new();
        let open = self
            .entries
            .iter()
            .filter(|e| e.device == device)
            .filter_map(|e| match &e.state {
                BitmapState::Open(t) => Some(t.clone()),
                _ => None,
            });
        for old in open.chain(extra.iter().cloned()) {
            let new = Arc::new(old.grown(nbits, self.crash_safe)?);
            out.push((old, new));
        }
        Ok(out)
    }

    /// Resize, step 2 (under the device's gate): the grown bitmaps replace the old ones.
    pub fn swap_grown(&mut self, pairs: &[(Arc<TrackedBitmap>, Arc<TrackedBitmap>)]) {
        for e in &mut self.entries {
            if let BitmapState::Open(t) = &e.state {
                if let Some((_, new)) = pairs.iter().find(|(old, _)| Arc::ptr_eq(old, t)) {
                    e.state = BitmapState::Open(new.clone());
                }
            }
        }
    }

    /// Shrink: every bitmap of `device` becomes invalid (registry and file header), and
    /// leaves tracking.
    pub fn invalidate_device(&mut self, device: &str, reason: &str) -> Result<()> {
        for e in self.entries.iter_mut().filter(|e| e.device == device) {
            if let BitmapState::Open(t) = &e.state {
                t.mark_failed(reason);
            }
            if !matches!(e.state, BitmapState::Dormant) {
                e.state = BitmapState::Invalid(reason.to_string());
                e.note = None;
            }
        }
        self.save_registry()
    }

    fn name_of(&self, device: &str, target: &str, name: &str, kind: BitmapKind) -> String {
        file_name(device, target, name, extension(kind))
    }

    fn load_one(&self, dev: &Device, r: &RegistryEntry) -> Result<BitmapState> {
        let cluster = dev.cluster().bytes();
        let main_name = self.name_of(&r.device, &r.target, &r.name, BitmapKind::Target);
        let bg_name = self.name_of(&r.device, &r.target, &r.name, BitmapKind::Background);
        let bg_path = self.dir.display_path(&bg_name);
        let main = TrackedBitmap::open(
            &self.dir,
            &main_name,
            dev.source(),
            cluster,
            self.crash_safe,
        )?
        .and_then(|t| check_names(t, r, BitmapKind::Target));
        let interrupted = self
            .dir
            .exists(&bg_name)
            .map_err(|e| Error::io(format!("stat of {}", bg_path.display()), e))?;
        let state = match (main, interrupted) {
            (Err(reason), _) => BitmapState::Invalid(reason),
            (Ok(t), false) => BitmapState::Open(Arc::new(t)),
            (Ok(t), true) => {
                match TrackedBitmap::open(
                    &self.dir,
                    &bg_name,
                    dev.source(),
                    cluster,
                    self.crash_safe,
                )?
                .and_then(|bg| check_names(bg, r, BitmapKind::Background))
                {
                    Ok(bg) => {
                        // Whatever the access's teardown had got to, ORing is safe: a
                        // success is only applied after its reply was delivered, and a
                        // crash before the background is deleted leaves a superset.
                        // merge_from flushes: durable before the background file goes.
                        t.merge_from(bg.bits(), false)?;
                        log::warn!(
                            "backup access of target '{}' on device {} did not end; bitmap '{}' keeps every write since its last successful backup",
                            r.target,
                            r.device,
                            r.name
                        );
                        BitmapState::Open(Arc::new(t))
                    }
                    Err(reason) => BitmapState::Invalid(format!(
                    "the background bitmap of an interrupted backup cannot be trusted: {reason}"
                )),
                }
            }
        };
        if interrupted {
            if let Err(e) = self.dir.remove(&bg_name) {
                log::warn!("removing {}: {e}", bg_path.display());
            }
        }
        Ok(state)
    }

    fn save_registry(&self) -> Result<()> {
        let reg = Registry {
            version: 1,
            bitmaps: self
                .entries
                .iter()
                .map(|e| RegistryEntry {
                    device: e.device.clone(),
                    target: e.target.clone(),
                    name: e.name.clone(),
                    invalid: match &e.state {
                        BitmapState::Invalid(reason) => Some(reason.clone()),
                        BitmapState::Dormant => e.recorded_invalid.clone(),
                        BitmapState::Open(t) if t.failed() => {
                            Some(FAILED_WHILE_TRACKING.to_string())
                        }
                        BitmapState::Open(_) => None,
                    },
                })
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&reg).map_err(|e| Error::invalid(e.to_string()))?;
        write_atomic(&self.dir, REGISTRY, &bytes)
    }

    /// The bitmaps a device's writes must mark, leaving out those of `except_target`
    /// (the target of an access, whose bitmap is frozen or being replaced).
    pub fn tracking_for(
        &self,
        device: &str,
        except_target: Option<&str>,
    ) -> Vec<Arc<TrackedBitmap>> {
        self.entries
            .iter()
            .filter(|e| e.device == device && Some(e.target.as_str()) != except_target)
            .filter_map(|e| match &e.state {
                BitmapState::Open(t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    fn position(&self, device: &str, target: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.device == device && e.target == target)
    }

    /// Decides (and prepares) the bitmap of `target` on `dev` for a setup with `bitmap`.
    /// Creates files but changes no registered state: [`BitmapStore::commit`] does that.
    pub fn decide(&mut self, dev: &Device, target: &str, bitmap: Option<&str>) -> Result<Decision> {
        let pos = self.position(dev.name(), target);
        let cluster = dev.cluster().bytes();
        let mut d = Decision {
            action: BitmapAction::NotUsed,
            bitmap: None,
            name: None,
            background: None,
            new_entry: None,
        };
        let create =
            |kind: BitmapKind, name: &str, ext: &str, fill: bool| -> Result<Arc<TrackedBitmap>> {
                Ok(Arc::new(TrackedBitmap::create(
                    &self.dir,
                    &file_name(dev.name(), target, name, ext),
                    dev.source(),
                    cluster,
                    dev.clusters(),
                    kind,
                    dev.name(),
                    target,
                    name,
                    fill,
                    self.crash_safe,
                )?))
            };
        let Some(name) = bitmap else {
            if pos.is_some() {
                d.action = BitmapAction::NotUsedRemoved;
            }
            return Ok(d);
        };
        match pos.map(|i| &self.entries[i]) {
            Some(e) if e.name == name => match &e.state {
                BitmapState::Open(t) if !t.failed() => {
                    d.action = BitmapAction::Used;
                    d.bitmap = Some(t.clone());
                }
                BitmapState::Open(_) => {
                    d.action = BitmapAction::Invalid;
                    d.new_entry =
                        Some(self.fresh_entry(dev, target, name, Some(FAILED_WHILE_TRACKING)));
                }
                BitmapState::Invalid(reason) => {
                    d.action = BitmapAction::Invalid;
                    d.new_entry = Some(self.fresh_entry(dev, target, name, Some(reason)));
                }
                BitmapState::Dormant => unreachable!("device {} is served", dev.name()),
            },
            Some(e) => {
                log::info!(
                    "target '{target}' switches from bitmap '{}' to '{name}' on {}: the old one is removed",
                    e.name,
                    dev.name()
                );
                d.action = BitmapAction::New;
                d.new_entry = Some(self.fresh_entry(dev, target, name, None));
            }
            None => {
                d.action = BitmapAction::New;
                d.new_entry = Some(self.fresh_entry(dev, target, name, None));
            }
        }
        if let Some(e) = &mut d.new_entry {
            // Replace the file of the same name only once the access is installed.
            let t = create(BitmapKind::Target, name, "pending", true)?;
            e.state = BitmapState::Open(t.clone());
            d.bitmap = Some(t);
        }
        match create(BitmapKind::Background, name, "background", false) {
            Ok(bg) => d.background = Some(bg),
            Err(err) => {
                self.abandon(&d);
                return Err(err);
            }
        }
        d.name = Some(name.to_string());
        Ok(d)
    }

    /// A new registry entry for bitmap `name`: a first one (`invalid: None`), or one that
    /// replaces a bitmap found invalid for the reason `invalid`.
    fn fresh_entry(&self, dev: &Device, target: &str, name: &str, invalid: Option<&str>) -> Entry {
        if let Some(reason) = invalid {
            log::warn!(
                "bitmap '{name}' of target '{target}' on {} is invalid ({reason}): recreated all dirty, this backup is full",
                dev.name()
            );
        }
        Entry {
            device: dev.name().to_string(),
            target: target.to_string(),
            name: name.to_string(),
            state: BitmapState::Invalid("being created".into()),
            recorded_invalid: None,
            note: invalid.map(|reason| {
                format!(
                    "recreated all dirty at {} because {reason}",
                    crate::logger::utc_timestamp(crate::sys::unix_now())
                )
            }),
        }
    }

    /// Deletes the files a decision created (setup failed before it was installed).
    pub fn abandon(&self, d: &Decision) {
        if let Some(BitmapState::Open(t)) = d.new_entry.as_ref().map(|e| &e.state) {
            let _ = t.remove();
        }
        if let Some(bg) = &d.background {
            let _ = bg.remove();
        }
    }

    /// Makes decisions for `target` permanent once the access is installed: registers new
    /// bitmaps under their final names, drops removed ones.
    pub fn commit(&mut self, target: &str, decisions: &mut [(String, Decision)]) -> Result<()> {
        for (device, d) in decisions.iter_mut() {
            let pos = self.position(device, target);
            let keep_existing = d.action == BitmapAction::Used;
            if !keep_existing {
                if let Some(i) = pos {
                    let old = self.entries.remove(i);
                    if let BitmapState::Open(t) = &old.state {
                        if let Err(e) = t.remove() {
                            log::warn!("{}", crate::error::report(&e));
                        }
                    } else {
                        let p =
                            self.name_of(&old.device, &old.target, &old.name, BitmapKind::Target);
                        let _ = self.dir.remove(p);
                    }
                    if d.action == BitmapAction::NotUsedRemoved {
                        log::info!(
                            "removed bitmap '{}' of target '{target}' on {device}",
                            old.name
                        );
                    }
                }
            }
            if let Some(e) = d.new_entry.take() {
                if let BitmapState::Open(t) = &e.state {
                    t.rename_to(&self.name_of(device, target, &e.name, BitmapKind::Target))?;
                }
                self.entries.push(e);
            }
        }
        self.save_registry()
    }

    /// Whether `target` has any registered bitmap.
    pub fn has_target(&self, target: &str) -> bool {
        self.entries.iter().any(|e| e.target == target)
    }

    /// Removes every bitmap of `target` (files and registry); returns `DEVICE/NAME`s.
    pub fn remove_target(&mut self, target: &str) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let mut i = 0;
        while i < self.entries.len() {
            if self.entries[i].target != target {
                i += 1;
                continue;
            }
            let e = self.entries.remove(i);
            let p = self.name_of(&e.device, &e.target, &e.name, BitmapKind::Target);
            if let Err(err) = self.dir.remove(&p) {
                return Err(Error::io(
                    format!("removing bitmap {}", self.dir.display_path(&p).display()),
                    err,
                ));
            }
            removed.push(format!("{}/{}", e.device, e.name));
        }
        self.save_registry()?;
        Ok(removed)
    }

    /// Status lines for every bitmap.
    pub fn status(&self, devices: &[Arc<Device>]) -> Vec<BitmapStatus> {
        let by_name: HashMap<&str, &Arc<Device>> = devices.iter().map(|d| (d.name(), d)).collect();
        self.entries
            .iter()
            .map(|e| {
                let dev = by_name.get(e.device.as_str());
                let mut s = BitmapStatus {
                    device: e.device.clone(),
                    target: e.target.clone(),
                    name: e.name.clone(),
                    dirty_bytes: 0,
                    consistent: false,
                    reason: e.note.clone(),
                    loaded: dev.is_some(),
                    generation: None,
                    sequence: None,
                };
                match (&e.state, dev) {
                    (BitmapState::Open(t), Some(d)) => {
                        s.dirty_bytes = dirty_bytes(t.bits(), d.cluster().bytes(), d.size());
                        s.consistent = !t.failed();
                        if t.failed() {
                            s.reason =
                                Some("flushing it failed; the next backup with it is full".into());
                        }
                        let h = t.header();
                        s.generation = Some(h.generation);
                        s.sequence = Some(h.sequence);
                    }
                    (BitmapState::Invalid(r), _) => s.reason = Some(r.clone()),
                    _ => s.reason = Some("its device is not served by this daemon".into()),
                }
                s
            })
            .collect()
    }

    /// Records bitmaps that failed while open as invalid in the registry, so no later
    /// mount trusts them even if their own header could not be rewritten.
    pub fn record_failures(&self) {
        let failed = self
            .entries
            .iter()
            .any(|e| matches!(&e.state, BitmapState::Open(t) if t.failed()));
        if failed {
            if let Err(e) = self.save_registry() {
                log::error!("{}", crate::error::report(&e));
            }
        }
    }

    /// Clean shutdown: every open bitmap is flushed, checksummed and marked not in use.
    pub fn close_all(&self, devices: &[Arc<Device>]) {
        for e in &self.entries {
            let BitmapState::Open(t) = &e.state else {
                continue;
            };
            let Some(dev) = devices.iter().find(|d| d.name() == e.device) else {
                continue;
            };
            if let Err(err) = dev
                .sync_live(false)
                .and_then(|_| t.close_clean(dev.source()))
            {
                // Not closed cleanly means not trusted: left in use without crash-safe
                // tracking, it loads as invalid.
                t.mark_failed(&crate::error::report(&err));
            }
        }
        self.record_failures();
    }
}

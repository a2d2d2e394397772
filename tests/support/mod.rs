//! Shared code of the engine tests (and the engine benchmark): one builder for an
//! [`Engine`] over image files in a temporary directory, instead of one hand-made copy
//! per test file.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use fleecefs::bitmap_file::CrashSafety;
use fleecefs::cbw::policy::OnCbwError;
use fleecefs::cbw::Device;
use fleecefs::engine::{Engine, EngineConfig};
use fleecefs::error::Kind;
use fleecefs::source::{BackupRead, Source};
use fleecefs::state::StateDir;
use fleecefs::units::ClusterSize;

/// How an image file of a device comes to be.
enum Image {
    /// Written now with these bytes.
    Bytes(Vec<u8>),
    /// Written now, `size` bytes of `byte`, unless the file exists already (a device
    /// reopened by a later engine over the same directory).
    FillIfMissing(u8, u64),
    /// An existing file, as it is.
    Existing,
}

/// Builds an [`Engine`] whose images, fleecing files and state live under `dir`:
/// `DIR/NAME.img` per device, `DIR/fleece`, `DIR/state`.
pub struct EngineBuilder {
    dir: PathBuf,
    cluster: u64,
    devices: Vec<(String, Image)>,
    config: EngineConfig,
    state: bool,
    clean_leftovers: bool,
}

impl EngineBuilder {
    /// No devices yet, 64 KiB clusters, [`EngineConfig::new`] (no copy timeout,
    /// break-snapshot with write-behind, crash-safe bitmaps), no state directory.
    pub fn new(dir: &Path) -> EngineBuilder {
        EngineBuilder {
            dir: dir.to_path_buf(),
            cluster: 64 << 10,
            devices: Vec::new(),
            config: EngineConfig::new(dir.join("fleece")),
            state: false,
            clean_leftovers: false,
        }
    }

    /// The cluster size of every device.
    pub fn cluster(mut self, bytes: u64) -> EngineBuilder {
        self.cluster = bytes;
        self
    }

    /// A device `name` over `DIR/NAME.img`, written now with `data`.
    pub fn device(mut self, name: &str, data: Vec<u8>) -> EngineBuilder {
        self.devices.push((name.to_string(), Image::Bytes(data)));
        self
    }

    /// A device `name` over `DIR/NAME.img` of `size` bytes of `byte`, written only if
    /// the file does not exist yet.
    pub fn filled_device(mut self, name: &str, byte: u8, size: u64) -> EngineBuilder {
        self.devices
            .push((name.to_string(), Image::FillIfMissing(byte, size)));
        self
    }

    /// A device `name` over the existing `DIR/NAME.img`.
    pub fn existing_device(mut self, name: &str) -> EngineBuilder {
        self.devices.push((name.to_string(), Image::Existing));
        self
    }

    /// What a failed or slow copy breaks.
    pub fn on_cbw_error(mut self, on_error: OnCbwError) -> EngineBuilder {
        self.config.on_cbw_error = on_error;
        self
    }

    /// `--cbw-timeout`.
    pub fn cbw_timeout(mut self, timeout: Option<std::time::Duration>) -> EngineBuilder {
        self.config.cbw_timeout = timeout;
        self
    }

    /// `--cbw-buffer` (0: synchronous copies).
    pub fn cbw_buffer(mut self, bytes: u64) -> EngineBuilder {
        self.config.cbw_buffer = bytes;
        self
    }

    /// `--fleecing-limit`.
    pub fn fleecing_limit(mut self, limit: Option<u64>) -> EngineBuilder {
        self.config.fleecing_limit = limit;
        self
    }

    /// `--backup-read`: how snapshot reads read the sources.
    pub fn backup_read(mut self, read: BackupRead) -> EngineBuilder {
        self.config.backup_read = read;
        self
    }

    /// `--crash-safe-bitmaps`.
    pub fn crash_safe(mut self, safety: CrashSafety) -> EngineBuilder {
        self.config.crash_safe_bitmaps = safety;
        self
    }

    /// A state directory at `DIR/state` (bitmaps, the access record).
    pub fn with_state(mut self) -> EngineBuilder {
        self.state = true;
        self
    }

    /// With a state directory: first remove what an access that did not end left (as
    /// the daemon does at start).
    pub fn clean_leftovers(mut self) -> EngineBuilder {
        self.clean_leftovers = true;
        self
    }

    /// The path of the image of device `name`.
    pub fn image(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}.img"))
    }

    /// The engine. Panics on any error: this is test code.
    pub fn build(self) -> Engine {
        let mut devices = Vec::new();
        for (name, image) in self.devices {
            let path = Self::image(&self.dir, &name);
            match image {
                Image::Bytes(data) => std::fs::write(&path, data).expect("writing an image"),
                Image::FillIfMissing(byte, size) if !path.exists() => {
                    std::fs::write(&path, vec![byte; size as usize]).expect("writing an image")
                }
                _ => {}
            }
            devices.push(Device::new(
                name,
                open_source_with(&path, self.config.backup_read),
                ClusterSize::new(self.cluster).expect("a valid cluster size"),
            ));
        }
        let state = self.state.then(|| {
            let state = StateDir::open(&self.dir.join("state")).expect("state directory");
            if self.clean_leftovers {
                if let Some(rec) = state.leftover_access().expect("access record") {
                    state.remove_leftovers(&rec).expect("removing leftovers");
                }
            }
            state
        });
        Engine::new(devices, self.config, state).expect("engine")
    }
}

/// Opens a source, retrying for up to 1 s while it is busy: a child another test thread
/// is spawning (`chattr`) holds copies of this process's fds, and with them the lock of
/// a source a test has just closed, until it execs; and the flusher threads of an engine
/// just dropped may hold its last references for a moment.
pub fn open_source(path: &Path) -> Source {
    open_source_with(path, BackupRead::Cached)
}

/// [`open_source`] with snapshot reads as `read` says.
pub fn open_source_with(path: &Path, read: BackupRead) -> Source {
    for _ in 0..100 {
        match Source::open_with(path, read) {
            Err(e) if e.kind() == Kind::Busy => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            r => return r.expect("opening a source"),
        }
    }
    panic!("{} stayed locked for 1 s", path.display())
}

//! Mounting the FUSE adapter: the mount options and the session thread.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use fuser::{Config, MountOption, Session, SessionACL};

use crate::engine::Engine;
use crate::fuse::FleeceFs;
use crate::keeper::Worker;
use crate::sched::BackupScheduler;

/// How the FUSE session is set up.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// The file system name in the mount table (`fleecefs:STATE_DIR`).
    pub fsname: String,
    /// Other users may use the mount (`--allow-other`); otherwise only the owner.
    pub allow_other: bool,
    /// The owners and modes files and directories show.
    pub access: crate::fuse::namespace::AccessPolicy,
    /// FUSE worker threads.
    pub threads: usize,
    /// Buffered opens of live files use the page cache (`--live-cache`).
    pub live_cache: bool,
    /// Where snapshot and dirty-map reads run (`--backup-priority`, `--backup-share`):
    /// the mount's scheduler, shared with its other frontends.
    pub backup: Arc<BackupScheduler>,
}

/// Serves `engine` at `mountpoint` on the `/dev/fuse` fds the keeper handed `worker`
/// (the keeper mounted: `default_permissions`, and `allow_other` if asked), one FUSE
/// thread per fd, with an owner-only ACL unless `allow_other`; backup reads go through
/// `opts.backup` (`src/sched/`).
pub fn mount(
    engine: Arc<Engine>,
    mountpoint: &Path,
    opts: &SessionOptions,
    worker: &Arc<Worker>,
) -> io::Result<Session<FleeceFs>> {
    let mut fuse_config = Config::default();
    fuse_config.mount_options = vec![
        MountOption::FSName(opts.fsname.clone()),
        MountOption::Subtype("fleecefs".into()),
        MountOption::DefaultPermissions,
    ];
    fuse_config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    fuse_config.n_threads = Some(opts.threads);
    fuse_config.clone_fd = true;
    let session = session(
        FleeceFs::new(engine.clone(), opts.live_cache, opts.backup.clone())
            .with_access_policy(opts.access)
            .with_worker(worker.clone()),
        worker,
        &fuse_config,
    )?;
    // Resizes and removals reach the kernel's caches through the session's notifier.
    engine.set_kernel_cache(Box::new(crate::fuse::KernelNotifier::new(
        session.notifier(),
        mountpoint.to_path_buf(),
    )));
    // Taken over from an earlier worker: the kernel may hold pages of every live file
    // (opened under that worker), which changes by another frontend must drop.
    if worker.negotiated().is_some() {
        for d in engine.devices() {
            d.note_opened_through_mount();
        }
    }
    Ok(session)
}

/// Runs `session` on its own thread (`fuse-session`) until the file system is unmounted.
pub fn spawn(session: Session<FleeceFs>) -> io::Result<JoinHandle<io::Result<()>>> {
    std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || session.run())
}

/// The FUSE session on the keeper's fds: the first worker's handshake, or a later
/// worker's takeover without INIT.
fn session(fs: FleeceFs, w: &Worker, config: &Config) -> io::Result<Session<FleeceFs>> {
    let mut fds = w.take_fuse_fds();
    if fds.is_empty() {
        return Err(io::Error::other("no /dev/fuse fd from the keeper"));
    }
    let clones = fds.split_off(1);
    let first = fds.remove(0);
    let mut config = config.clone();
    config.n_threads = Some(clones.len() + 1);
    let acl = config.acl;
    let session = match w.negotiated() {
        None => Session::from_fd(fs, first, acl, config)?,
        Some(n) => Session::from_fd_initialized(
            fs.with_coherent_direct_io(n.coherent_direct_io),
            first,
            acl,
            config,
        ),
    };
    // A request being copied into a fresh page when the worker is killed would fail with
    // EIO instead of waiting for the next worker (see fuser's prefault_read_buffers).
    Ok(session
        .with_clone_fds(clones)
        .prefault_read_buffers(crate::fuse::MAX_IO as usize + 4096))
}

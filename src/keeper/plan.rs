//! What the keeper is given ([`MountSpec`]) and what it hands each worker
//! ([`WorkerPlan`]).

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{LastRestart, Negotiated};
use crate::error::{Error, Result};
use crate::sys;

/// Environment variable with the number of the memfd that holds a worker's
/// [`WorkerPlan`] (JSON).
pub const PLAN_ENV: &str = "FLEECEFS_WORKER_PLAN";

/// What the keeper mounts and keeps, as the daemon validated it.
#[derive(Debug)]
pub struct MountSpec {
    /// Absolute mount point, checked (or adopted from systemd's fd store).
    pub mountpoint: PathBuf,
    /// Absolute state directory (created if missing; the keeper takes its lock).
    pub state_dir: PathBuf,
    /// The mount source in the mount table (`fleecefs:STATE_DIR`).
    pub fsname: String,
    /// Mount with `allow_other`.
    pub allow_other: bool,
    /// FUSE threads: one `/dev/fuse` fd each (the session fd and its clones).
    pub threads: usize,
    /// The mount point is a stale fleecefs mount to clean up before mounting.
    pub stale_mount: bool,
    /// The keeper is the background daemon: it logs to the state directory's log file,
    /// prints `ready` on stdout once the first worker serves, and leaves the terminal.
    pub background: bool,
    /// `oom_score_adj` of every worker (`--worker-oom-score-adj`).
    pub worker_oom_score_adj: i32,
    /// Listening sockets of the frontends (the NBD server's), bound by the daemon: the
    /// keeper holds them, so that they outlive workers, and hands them to every worker in
    /// this order. It never accepts on them.
    pub listen_fds: Vec<std::os::fd::OwnedFd>,
    /// The devices' sources, open and locked by the daemon: the keeper holds them and
    /// hands them to every worker, so that a source path renamed, replaced or gone since
    /// does not change what a new worker serves.
    pub sources: Vec<HeldSource>,
    /// Named fds for the keeper to hold from the start, as a worker's
    /// [`super::FdChannel::hold`] hands them over later (the vhost-user-blk exports'
    /// listening sockets).
    pub held_fds: Vec<(String, std::os::fd::OwnedFd)>,
}

/// A source the keeper holds for its workers.
#[derive(Debug)]
pub struct HeldSource {
    /// The device name.
    pub name: String,
    /// The path it was opened at (the device record's).
    pub path: PathBuf,
    /// The open, locked file.
    pub file: File,
}

/// A held source as a worker inherits it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SourceFd {
    /// The device name.
    pub name: String,
    /// The path it was opened at.
    pub path: PathBuf,
    /// The inherited fd.
    pub fd: i32,
}

/// A named fd the keeper holds, as a worker inherits it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NamedFd {
    /// The name it was handed over under.
    pub name: String,
    /// The inherited fd.
    pub fd: i32,
}

/// Everything a worker gets from its keeper. `S` is what the worker serves (the daemon's
/// serving options): the keeper carries it without reading it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct WorkerPlan<S> {
    /// The keeper's pid.
    pub keeper_pid: u32,
    /// The keeper's own binary (the default of `restart --binary`).
    pub keeper_binary: PathBuf,
    /// The mount point as the keeper resolved it (the worker must not touch the mount
    /// before it serves).
    pub mountpoint: PathBuf,
    /// The state directory, locked by the keeper.
    pub state_dir: PathBuf,
    /// `/dev/fuse` fds: the session fd, then its clones.
    pub fuse_fds: Vec<i32>,
    /// The listening sockets the keeper holds for the frontends ([`MountSpec`]).
    #[serde(default)]
    pub listen_fds: Vec<i32>,
    /// The sources the keeper holds ([`MountSpec::sources`]).
    #[serde(default)]
    pub sources: Vec<SourceFd>,
    /// The named fds the keeper holds ([`MountSpec::held_fds`] and what workers handed
    /// over since).
    #[serde(default)]
    pub held_fds: Vec<NamedFd>,
    /// Write end of the report pipe.
    pub report_fd: i32,
    /// This worker's end of the fd channel (`None`: a keeper without one).
    #[serde(default)]
    pub fd_channel: Option<i32>,
    /// The state directory lock (shared with the keeper).
    pub lock_fd: i32,
    /// Workers started before this one.
    pub restarts: u64,
    /// The last restart.
    pub last_restart: Option<LastRestart>,
    /// INIT was answered already (by an earlier worker) with these parameters.
    pub negotiated: Option<Negotiated>,
    /// A background mount: log to the state directory's log file.
    pub background: bool,
    /// The fds are in systemd's file descriptor store: a SIGTERM stops the worker
    /// without unmounting.
    pub fd_store: bool,
    /// What to serve.
    pub serve: S,
}

impl<S: Serialize> WorkerPlan<S> {
    /// The plan in a memory file, for a worker to inherit (its number in [`PLAN_ENV`]).
    pub(super) fn to_memfd(&self) -> Result<File> {
        let json = serde_json::to_vec(self)
            .map_err(|e| Error::invalid(format!("cannot encode the worker plan: {e}")))?;
        sys::memfd_with(c"fleecefs-worker-plan", &json)
            .map_err(|e| Error::io("creating the worker plan's memfd", e))
    }
}

impl<S: DeserializeOwned> WorkerPlan<S> {
    /// The plan the keeper handed this process (and the fd it came in is closed).
    pub(super) fn inherited() -> Result<WorkerPlan<S>> {
        let fd: i32 = std::env::var(PLAN_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "'fleecefs worker' is started by the keeper of a mount only ({PLAN_ENV} is not set)"
                ))
            })?;
        std::env::remove_var(PLAN_ENV);
        // SAFETY: the keeper passed this fd to this process; nothing else owns it.
        let mut f = unsafe { sys::inherited_file(fd) }
            .map_err(|e| Error::io(format!("the worker plan's fd {fd}"), e))?;
        let mut json = Vec::new();
        f.read_to_end(&mut json)
            .map_err(|e| Error::io("reading the worker plan", e))?;
        serde_json::from_slice(&json)
            .map_err(|e| Error::invalid(format!("the worker plan is malformed: {e}")))
    }
}

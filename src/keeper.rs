//! Keeper and worker: the mount survives the death of the process that serves it.
//!
//! `fleecefs mount` runs two processes. The **keeper** opens `/dev/fuse`, mounts, makes
//! one clone of the fd per extra FUSE thread (`FUSE_DEV_IOC_CLONE`), and holds all of
//! them for the life of the mount. It starts the **worker** (`fleecefs worker
//! MOUNTPOINT`), which inherits the fds over `exec` and gets a typed [`WorkerPlan`] (in a
//! memfd whose number is in [`PLAN_ENV`]): the fds it inherits, what the keeper knows of
//! the mount, and the serving options, which the keeper carries without reading them. The
//! worker does everything a daemon does: recovery, engine, control socket, FUSE requests.
//! The keeper holds no engine state and serves no request.
//!
//! This module is a lower layer: it knows nothing of the command line, the control
//! socket or the client commands. The daemon hands it a [`MountSpec`] (what to mount)
//! and the serving options; the worker's side gets them back through [`worker_init`] and
//! passes the [`Worker`] link explicitly to whoever needs it.
//!
//! A FUSE connection lives while one process holds one of its fds, and a clone's
//! processing queue (requests read but not answered) is aborted only when its last
//! holder closes it. So when a worker dies, its unanswered requests wait in the kernel;
//! the keeper starts a new worker, which takes the fds over without a second INIT (the
//! parameters negotiated by the first worker are kept by the keeper and handed on), and
//! sends `FUSE_NOTIFY_RESEND` (Linux 6.9+): the kernel queues those requests again, and
//! the new worker answers them. Writers see a pause, not an error.
//!
//! The worker reports to the keeper over a pipe, one [`Report`] per line, and hands it
//! fds to hold (listening sockets made after the mount started, memory regions) over a
//! socket pair, the fd channel (`fdchannel.rs`): every later worker inherits them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

mod binary;
mod fdchannel;
mod fdstore;
mod gate;
mod plan;
mod process;
mod report;
mod worker;

pub use binary::Binary;
pub use fdchannel::FdChannel;
pub use fdstore::{adopt_fd_store, Adopted};
pub use gate::{Gate, Pass, GATE};
pub use plan::{HeldSource, MountSpec, NamedFd, SourceFd, WorkerPlan, PLAN_ENV};
pub use process::run;
pub use report::Report;
pub use worker::{worker_init, KeeperStatus, Worker};

/// Exit code of a worker that handed over for a planned restart.
const EXIT_HANDOVER: i32 = 75;
/// This many counted worker deaths within [`CRASH_WINDOW`] make the keeper give up
/// (every death counts except a SIGKILL after the worker served).
pub const CRASH_LIMIT: usize = 5;
/// See [`CRASH_LIMIT`].
pub const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// The keeper's `oom_score_adj`: the OOM killer takes a worker first (replaced at once);
/// the keeper's death would end the mount.
pub const KEEPER_OOM_SCORE_ADJ: i32 = -900;
/// Longest a worker from a binary that has not served yet may take to serve; then it is
/// killed and the keeper goes back to the binary that served.
pub const START_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a planned restart waits for the requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the first worker negotiated at INIT and later workers must honour.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// FUSE_DIRECT_IO_ALLOW_MMAP was granted (see `FleeceFs::open`).
    pub coherent_direct_io: bool,
    /// The kernel offers FUSE_HAS_RESEND (FUSE_NOTIFY_RESEND).
    pub has_resend: bool,
}

/// The last worker restart, as `status` reports it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LastRestart {
    /// When the old worker died or began to hand over (seconds since the epoch).
    pub at: u64,
    /// Why: `planned restart`, `killed by signal 9`, `exited with status 1`, ...
    pub reason: String,
    /// Milliseconds from then until the new worker served again: the writers' pause.
    #[serde(default)]
    pub pause_ms: Option<u64>,
    /// `at` in milliseconds.
    #[serde(default)]
    pub at_ms: u64,
    /// The binary the worker serving now was started from.
    #[serde(default)]
    pub binary: Option<std::path::PathBuf>,
    /// A planned restart to a new binary that failed: the keeper went back to the binary
    /// that served before.
    #[serde(default)]
    pub fallback: Option<Fallback>,
}

/// A new binary that did not take over (see [`LastRestart::fallback`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Fallback {
    /// The binary tried.
    pub tried: std::path::PathBuf,
    /// Why it was given up: `did not serve within 5 s`, `exited with status 0 before
    /// serving`, a refused binary, ...
    pub reason: String,
}

/// Milliseconds since the epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

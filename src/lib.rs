//! fleecefs: a FUSE filesystem that gives backup tools a consistent point-in-time view
//! of live disk images, by copy-before-write into sparse fleecing files.
//!
//! The engine (`engine/`: the access lifecycle; `cbw/`: the copy path of one device;
//! `bitmap`, `bitmap_file`, `bitmap_store`, `dirtymap`, `fleece`, `source`, `state`)
//! knows nothing of FUSE and is tested directly; `fuse/` translates kernel requests into
//! engine calls, `vhost_user/` virtio-blk requests of a VMM; `sched/` schedules backup reads below the guest for every frontend;
//! `control/` is the daemon's command socket; `daemon` wires them together;
//! `commands`, `copy` (with `copy/`: readers, raw and qcow2 destinations), `restore` and
//! `freeze` (setup's hooks) are the client side. `layout` spells the mount's file names,
//! `units` the cluster arithmetic, `error` the errno table, `secure_path` the trusted-path
//! checks (with their `*at` calls), `sys` every other libc call and `sync` the poison
//! recovery. docs/architecture.md has the module map.
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod bitmap;
pub mod bitmap_file;
pub mod bitmap_store;
pub mod cbw;
pub mod cli;
pub mod commands;
pub mod control;
pub mod copy;
pub mod daemon;
pub mod dirtymap;
pub mod engine;
pub mod error;
pub mod fleece;
pub mod freeze;
pub mod fuse;
pub mod holders;
pub mod keeper;
pub mod layout;
pub mod logger;
pub mod nbd;
pub mod restore;
pub mod sched;
pub mod secure_path;
pub mod source;
pub mod state;
pub mod sync;
pub mod sys;
pub mod units;
pub mod vhost_user;

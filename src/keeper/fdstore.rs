//! systemd's file descriptor store (`FileDescriptorStoreMax=`): the keeper stores its
//! `/dev/fuse` fds there (`FDSTORE=1`, name `fleecefs-fuse`) and the negotiated
//! parameters (a memfd, `fleecefs-init`). When `systemctl restart` starts the service
//! again, systemd passes them back (`LISTEN_FDS`, `LISTEN_FDNAMES`): the new keeper
//! takes the mount over instead of mounting, like a new worker after a death.

use std::fs::File;
use std::io::Read;

use super::Negotiated;
use crate::error::{Error, Result};
use crate::sys;

/// FDNAME of the `/dev/fuse` fds in systemd's file descriptor store.
pub(super) const FD_NAME_FUSE: &str = "fleecefs-fuse";
/// FDNAME of the memfd that holds the [`Negotiated`] parameters (JSON).
pub(super) const FD_NAME_INIT: &str = "fleecefs-init";

/// The FUSE connection handed over by systemd to a keeper started again by
/// `systemctl restart` ([`adopt_fd_store`]); [`super::run`] takes it over.
#[derive(Debug)]
pub struct Adopted {
    pub(super) fds: Vec<File>,
    pub(super) negotiated: Option<Negotiated>,
}

/// The FUSE connection systemd passed to this process, if any. Call before validating
/// the mount: the mount point must not be touched (nobody serves it until a worker does).
pub fn adopt_fd_store() -> Result<Option<Adopted>> {
    let var = |k: &str| std::env::var(k).ok();
    let (Some(pid), Some(n)) = (var("LISTEN_PID"), var("LISTEN_FDS")) else {
        return Ok(None);
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let names = var("LISTEN_FDNAMES").unwrap_or_default();
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    let n: i32 = n
        .parse()
        .map_err(|_| Error::invalid(format!("LISTEN_FDS={n} is not a number")))?;
    let names: Vec<&str> = names.split(':').collect();
    let mut adopted = Adopted {
        fds: Vec::new(),
        negotiated: None,
    };
    for i in 0..n {
        let fd = 3 + i;
        // SAFETY: systemd passed fds 3..3+LISTEN_FDS to this process (LISTEN_PID).
        let f = unsafe { sys::inherited_file(fd) }
            .map_err(|e| Error::io(format!("fd {fd} from systemd"), e))?;
        match names.get(i as usize).copied() {
            Some(FD_NAME_FUSE) => adopted.fds.push(f),
            Some(FD_NAME_INIT) => {
                let mut text = String::new();
                let _ = (&f).read_to_string(&mut text);
                adopted.negotiated = serde_json::from_str(&text).ok();
            }
            _ => {}
        }
    }
    Ok((!adopted.fds.is_empty()).then_some(adopted))
}

/// Sends `fds` to systemd's file descriptor store under `name`, when running under
/// systemd with one (`NOTIFY_SOCKET`). Whether they were stored.
pub(super) fn send(name: &str, fds: &[i32]) -> bool {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    // Only where the unit has a store: systemd 254+ says so ($FDSTORE), the unit file
    // of docs/ says so itself (FLEECEFS_FDSTORE=1). Elsewhere SIGTERM must unmount.
    let has_store = std::env::var("FDSTORE").is_ok_and(|n| n.parse::<u32>().is_ok_and(|n| n > 0))
        || std::env::var("FLEECEFS_FDSTORE").is_ok_and(|v| v == "1");
    if !has_store {
        return false;
    }
    match sys::notify_with_fds(&socket, &format!("FDSTORE=1\nFDNAME={name}\n"), fds) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("cannot store the fds in systemd's file descriptor store: {e}");
            false
        }
    }
}

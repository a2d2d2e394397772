//! The NBD server: one `nbd-accept-N` thread per listener, one `nbd-conn-N` thread per
//! connection, at most [`MAX_CONNECTIONS`] connections (more are closed at once), a
//! handshake limited to [`HANDSHAKE_TIME`] (a client that connects and sends nothing
//! is dropped then), and a registry of the connections for `status`.
//!
//! Threads hold no engine lock while they wait on a socket; a read holds a buffer of at
//! most 32 MiB, so memory is bounded by the connection limit.

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::engine::Engine;
use crate::error::{Error, IoContext, Result};
use crate::nbd::conn::{self, ConnEnv};
use crate::nbd::export::{EngineCatalog, Export};
use crate::nbd::handshake::{self, Refused};
use crate::nbd::link::{Sock, SockKind, Stream};
use crate::nbd::transmit::Mode;
use crate::nbd::Listen;
use crate::sched::BackupScheduler;
use crate::sync::Recover;

/// Connections served at once; more are closed right after `accept`.
pub const MAX_CONNECTIONS: usize = 64;
/// The whole negotiation must end within this time.
pub const HANDSHAKE_TIME: Duration = Duration::from_secs(5);
/// A reply the client does not take for this long ends the connection.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// How the server is configured (`mount --nbd ...`).
#[derive(Clone, Default)]
pub struct NbdConfig {
    /// Where to listen.
    pub listen: Vec<Listen>,
    /// TLS for TCP listeners (`--nbd-tls-creds`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// TCP without TLS (`--nbd-insecure`).
    pub insecure: bool,
}

impl std::fmt::Debug for NbdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdConfig")
            .field("listen", &self.listen)
            .field("tls", &self.tls.is_some())
            .field("insecure", &self.insecure)
            .finish()
    }
}

/// A listening socket.
pub enum Listener {
    /// Unix.
    Unix(UnixListener),
    /// TCP.
    Tcp(TcpListener),
}

/// Creates the listening socket of `l`: a Unix socket (mode 0600, in a directory only
/// root can change; an old socket at the path is replaced, anything else there is
/// refused) or a TCP socket.
pub fn bind(l: &Listen) -> Result<Listener> {
    match l {
        Listen::Unix(p) => {
            let dir = p.parent().ok_or_else(|| {
                Error::invalid(format!("--nbd unix:{}: no directory", p.display()))
            })?;
            crate::secure_path::open_trusted_dir(
                dir,
                "--nbd socket directory",
                crate::secure_path::Missing::Fail,
            )?;
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_socket() => std::fs::remove_file(p)
                    .context(|| format!("removing the old socket {}", p.display()))?,
                Ok(_) => {
                    return Err(Error::invalid(format!(
                        "--nbd unix:{}: the path exists and is not a socket",
                        p.display()
                    )))
                }
                Err(_) => {}
            }
            let old = crate::sys::set_umask(0o177);
            let r = UnixListener::bind(p);
            crate::sys::set_umask(old);
            r.map(Listener::Unix)
                .context(|| format!("listening on {}", p.display()))
        }
        Listen::Tcp(a) => TcpListener::bind(a)
            .map(Listener::Tcp)
            .context(|| format!("listening on tcp:{a}")),
    }
}

/// Binds every listener of `listen`, as fds for the keeper to hold (see `bind`).
pub fn bind_all(listen: &[Listen]) -> Result<Vec<OwnedFd>> {
    listen
        .iter()
        .map(|l| {
            bind(l).map(|b| match b {
                Listener::Unix(u) => OwnedFd::from(u),
                Listener::Tcp(t) => OwnedFd::from(t),
            })
        })
        .collect()
}

/// The listeners of `listen` over `fds`, the sockets [`bind_all`] made (held by the
/// keeper, inherited by this worker), in the same order.
pub fn listeners_from(listen: &[Listen], fds: Vec<OwnedFd>) -> Result<Vec<Listener>> {
    if fds.len() != listen.len() {
        return Err(Error::invalid(format!(
            "the keeper handed over {} listening socket(s) for {} --nbd listener(s)",
            fds.len(),
            listen.len()
        )));
    }
    Ok(listen
        .iter()
        .zip(fds)
        .map(|(l, fd)| match l {
            Listen::Unix(_) => Listener::Unix(UnixListener::from(fd)),
            Listen::Tcp(_) => Listener::Tcp(TcpListener::from(fd)),
        })
        .collect())
}

/// Removes the Unix sockets of `listen` (at shutdown).
pub fn remove_sockets(listen: &[Listen]) {
    for l in listen {
        if let Listen::Unix(p) = l {
            if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// One connection, as `status` shows it.
struct ConnEntry {
    peer: String,
    /// Export name and access id, once negotiated.
    export: Option<(String, u64)>,
    /// The headers the negotiation chose.
    mode: Mode,
    bytes_read: Arc<AtomicU64>,
}

#[derive(Default)]
struct Registry {
    conns: HashMap<u64, ConnEntry>,
    next: u64,
    /// Bytes read by connections that have ended, per (export, access id).
    ended_bytes: HashMap<(String, u64), u64>,
}

/// The server's part of `status --json`.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct NbdStatus {
    /// The listeners (`unix:PATH`, `tcp:ADDR:PORT`).
    pub listeners: Vec<String>,
    /// Every export of the active access.
    pub exports: Vec<NbdExportStatus>,
    /// Connections at the moment (also those still negotiating).
    pub connections: usize,
}

/// One export in `status`.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct NbdExportStatus {
    /// The export name (the device).
    pub name: String,
    /// The peers connected to it (`unix`, or the TCP address), oldest first.
    pub clients: Vec<String>,
    /// The reply mode each of them negotiated, in the order of `clients`: `simple`,
    /// `structured` (structured replies) or `extended` (extended headers).
    #[serde(default)]
    pub client_modes: Vec<String>,
    /// Bytes read from it during this access.
    pub bytes_read: u64,
}

struct Shared {
    engine: Arc<Engine>,
    sched: Arc<BackupScheduler>,
    config: NbdConfig,
    stop: Arc<AtomicBool>,
    registry: Mutex<Registry>,
}

/// The running server.
pub struct NbdServer {
    shared: Arc<Shared>,
    listeners: Vec<String>,
}

impl NbdServer {
    /// Serves `listeners` (bound by [`bind`], in the order of `config.listen`).
    pub fn start(
        engine: Arc<Engine>,
        sched: Arc<BackupScheduler>,
        config: NbdConfig,
        listeners: Vec<Listener>,
    ) -> Result<NbdServer> {
        let names = config.listen.iter().map(|l| l.to_string()).collect();
        let shared = Arc::new(Shared {
            engine,
            sched,
            config,
            stop: Arc::new(AtomicBool::new(false)),
            registry: Mutex::new(Registry::default()),
        });
        for (i, l) in listeners.into_iter().enumerate() {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("nbd-accept-{i}"))
                .spawn(move || accept_loop(&shared, l))
                .context(|| "starting an NBD accept thread".into())?;
        }
        Ok(NbdServer {
            shared,
            listeners: names,
        })
    }

    /// Ends every connection: idle ones at once, busy ones after their current request.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }

    /// Listeners, exports, their clients and bytes read.
    pub fn status(&self) -> NbdStatus {
        let exposed = self.shared.engine.exposed();
        let reg = self.shared.registry.lock().recover();
        let exports = exposed
            .iter()
            .map(|e| {
                let name = e.device.name().to_string();
                let key = (name.clone(), e.access.id());
                let mut s = NbdExportStatus {
                    bytes_read: reg.ended_bytes.get(&key).copied().unwrap_or(0),
                    name,
                    clients: Vec::new(),
                    client_modes: Vec::new(),
                };
                let mut ids: Vec<&u64> = reg.conns.keys().collect();
                ids.sort_unstable();
                for c in ids.into_iter().filter_map(|id| reg.conns.get(id)) {
                    if c.export.as_ref() == Some(&key) {
                        s.clients.push(c.peer.clone());
                        s.client_modes.push(c.mode.name().to_string());
                        s.bytes_read += c.bytes_read.load(Ordering::Relaxed);
                    }
                }
                s
            })
            .collect();
        NbdStatus {
            listeners: self.listeners.clone(),
            exports,
            connections: reg.conns.len(),
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, l: Listener) {
    loop {
        let (kind, tcp) = match &l {
            Listener::Unix(u) => match u.accept() {
                Ok((s, _)) => (SockKind::Unix(s), false),
                Err(e) => {
                    accept_failed(&e);
                    continue;
                }
            },
            Listener::Tcp(t) => match t.accept() {
                Ok((s, _)) => (SockKind::Tcp(s), true),
                Err(e) => {
                    accept_failed(&e);
                    continue;
                }
            },
        };
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let id = {
            let mut reg = shared.registry.lock().recover();
            if reg.conns.len() >= MAX_CONNECTIONS {
                log::debug!("NBD connection refused: {MAX_CONNECTIONS} connections already");
                continue;
            }
            reg.next += 1;
            let id = reg.next;
            reg.conns.insert(
                id,
                ConnEntry {
                    peer: String::new(),
                    export: None,
                    mode: Mode::Simple,
                    bytes_read: Arc::new(AtomicU64::new(0)),
                },
            );
            id
        };
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                connection(&s, id, kind, tcp);
                let mut reg = s.registry.lock().recover();
                if let Some(c) = reg.conns.remove(&id) {
                    if let Some(key) = c.export {
                        *reg.ended_bytes.entry(key).or_default() +=
                            c.bytes_read.load(Ordering::Relaxed);
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("NBD connection dropped: starting its thread: {e}");
            shared.registry.lock().recover().conns.remove(&id);
        }
    }
}

fn accept_failed(e: &std::io::Error) {
    log::warn!("accepting an NBD connection: {e}");
    // EMFILE and the like: do not spin.
    std::thread::sleep(Duration::from_millis(100));
}

fn connection(shared: &Shared, id: u64, kind: SockKind, tcp: bool) {
    let sock = match Sock::new(kind, SEND_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return log::info!("NBD connection: {e}"),
    };
    let peer = sock.peer();
    if let Some(c) = shared.registry.lock().recover().conns.get_mut(&id) {
        c.peer = peer.clone();
    }
    // TLS is offered on TCP when configured, and required unless --nbd-insecure.
    let tls = if tcp { shared.config.tls.clone() } else { None };
    let required = tcp && !shared.config.insecure;
    let mut stream = Stream::new(sock, tls, required);
    if stream
        .set_deadline(Some(Instant::now() + HANDSHAKE_TIME))
        .is_err()
    {
        return;
    }
    let catalog = EngineCatalog(shared.engine.clone());
    let n = match handshake::negotiate(&mut stream, &catalog) {
        Ok(n) => n,
        Err(Refused::Left) => return,
        Err(Refused::Protocol(m)) => return log::info!("NBD client {peer} refused: {m}"),
        Err(Refused::Io(e)) => return log::info!("NBD client {peer}: negotiation failed: {e}"),
    };
    let Some(export) = Export::open(&shared.engine, &n.export) else {
        return log::info!(
            "NBD client {peer}: export '{}' ended during the negotiation",
            n.export.name
        );
    };
    if stream.set_deadline(None).is_err() {
        return;
    }
    let bytes_read = {
        let mut reg = shared.registry.lock().recover();
        let Some(c) = reg.conns.get_mut(&id) else {
            return;
        };
        c.export = Some((export.name().to_string(), export.access_id()));
        c.mode = n.mode;
        c.bytes_read.clone()
    };
    log::info!(
        "NBD client {peer} connected to export '{}' ({})",
        export.name(),
        n.mode.describe()
    );
    let env = ConnEnv {
        sched: shared.sched.clone(),
        stop: shared.stop.clone(),
        bytes_read,
    };
    let name = export.name().to_string();
    match conn::serve(&mut stream, &n, Arc::new(export), &env) {
        Ok(()) => {
            // a clean end: the TLS session too (not after an error: the socket may be
            // one the client no longer reads, and this would wait for it)
            stream.close_tls();
            log::info!("NBD client {peer} of export '{name}' disconnected")
        }
        Err(e) => log::info!("NBD client {peer} of export '{name}': connection ended: {e}"),
    }
}

//! The NBD frontend: the backup access exported over the Network Block Device protocol,
//! one export per device of the active access, named like the device. It translates
//! NBD into the engine calls the FUSE adapter makes for `snapshot/NAME` (reads, SEEK_DATA
//! and SEEK_HOLE, punch-hole discards, the dirty map) and nothing else.
//!
//! - `proto.rs`: the wire format: numbers, flags, negotiation messages;
//! - `transmit.rs`: requests and replies of the transmission phase (compact,
//!   structured, extended headers);
//! - `handshake.rs`: the option negotiation (fixed newstyle, STARTTLS, INFO/GO, meta
//!   contexts, extended headers);
//! - `export.rs`: an export bound to its access, and the catalog of exports;
//! - `conn.rs`: the transmission phase of one connection;
//! - `server.rs`: listeners, the accept and connection threads, their bounds, `status`;
//! - `link.rs`: the sockets (Unix, TCP) and the TLS layer.

pub mod conn;
pub mod export;
pub mod handshake;
pub mod link;
pub mod proto;
pub mod server;
pub mod transmit;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use server::{NbdServer, NbdStatus};

/// A byte stream the server speaks NBD on.
pub trait Transport: handshake::Link + Send {
    /// Blocks a read at most this long (then `WouldBlock`/`TimedOut`).
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
}

/// Where the server listens (`mount --nbd`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Listen {
    /// A Unix socket at this path (`unix:PATH`).
    Unix(PathBuf),
    /// A TCP address (`tcp:ADDR:PORT`).
    Tcp(SocketAddr),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Parses `--nbd`: `unix:PATH` (absolute) or `tcp:ADDR:PORT` (an IP address; IPv6 in
/// brackets).
pub fn parse_listen(s: &str) -> Result<Listen, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        let p = PathBuf::from(p);
        if !p.is_absolute() {
            return Err(format!("'{s}': the socket path must be absolute"));
        }
        return Ok(Listen::Unix(p));
    }
    if let Some(a) = s.strip_prefix("tcp:") {
        return a.parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| {
            format!("'{s}': expected tcp:ADDRESS:PORT with an IP address (IPv6 in brackets)")
        });
    }
    Err(format!("'{s}': expected unix:PATH or tcp:ADDRESS:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            parse_listen("unix:/run/x.sock"),
            Ok(Listen::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            parse_listen("tcp:127.0.0.1:10809"),
            Ok(Listen::Tcp("127.0.0.1:10809".parse().unwrap()))
        );
        assert_eq!(
            parse_listen("tcp:[::1]:10809"),
            Ok(Listen::Tcp("[::1]:10809".parse().unwrap()))
        );
        assert!(parse_listen("unix:rel.sock").is_err());
        assert!(parse_listen("tcp:localhost:10809").is_err());
        assert!(parse_listen("tcp:1.2.3.4").is_err());
        assert!(parse_listen("/x").is_err());
    }
}

//! The sockets NBD runs on: a Unix or TCP stream with an optional deadline for every
//! read (the handshake's time limit), and the TLS layer (`NBD_OPT_STARTTLS`, rustls)
//! over it. TLS credentials come from a directory laid out as QEMU's x509 credentials:
//! `server-cert.pem`, `server-key.pem`, and `ca-cert.pem` when clients must present a
//! certificate the CA signed.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use crate::error::{Error, Result};
use crate::nbd::handshake::Link;
use crate::nbd::Transport;

/// The send buffer of a Unix connection: room for several replies (16 of nbdcopy's
/// 256 KiB reads), so that the connection thread reads the next request's data while
/// the client takes the last reply, instead of sleeping until the client has drained
/// the default 208 KiB. The kernel caps it at `net.core.wmem_max` unless the daemon
/// runs as root. (TCP keeps the kernel's autotuning, which grows to `tcp_wmem`.)
pub const UNIX_SEND_BUFFER: usize = 4 << 20;

/// A connected socket.
pub enum SockKind {
    /// A Unix stream.
    Unix(UnixStream),
    /// A TCP stream.
    Tcp(TcpStream),
}

/// A connected socket whose reads may have a deadline.
pub struct Sock {
    kind: SockKind,
    deadline: Option<Instant>,
}

impl Sock {
    /// Wraps `kind`; sends time out after `send_timeout` (a client that does not read).
    pub fn new(kind: SockKind, send_timeout: Duration) -> io::Result<Sock> {
        match &kind {
            SockKind::Unix(s) => {
                s.set_write_timeout(Some(send_timeout))?;
                if let Err(e) = crate::sys::set_send_buffer(s, UNIX_SEND_BUFFER) {
                    log::debug!("NBD connection: cannot enlarge the send buffer: {e}");
                }
            }
            SockKind::Tcp(s) => {
                s.set_write_timeout(Some(send_timeout))?;
                s.set_nodelay(true)?;
            }
        }
        Ok(Sock {
            kind,
            deadline: None,
        })
    }

    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match &self.kind {
            SockKind::Unix(s) => s.set_read_timeout(t),
            SockKind::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// The peer, for logs and `status`.
    pub fn peer(&self) -> String {
        match &self.kind {
            SockKind::Unix(_) => "unix".to_string(),
            SockKind::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the NBD handshake took too long",
                ));
            }
            self.set_timeout(Some(left))?;
        }
        match &mut self.kind {
            SockKind::Unix(s) => s.read(buf),
            SockKind::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.kind {
            SockKind::Unix(s) => s.write(buf),
            SockKind::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match &mut self.kind {
            SockKind::Unix(s) => s.write_vectored(bufs),
            SockKind::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Inner {
    Plain(Sock),
    Tls(Box<StreamOwned<ServerConnection, Sock>>),
    /// Only between taking the plain socket and installing TLS.
    Gone,
}

/// A connection: plain, or TLS after `STARTTLS`.
pub struct Stream {
    inner: Inner,
    tls: Option<Arc<ServerConfig>>,
    tls_required: bool,
}

impl Stream {
    /// A stream over `sock`; with `tls`, STARTTLS is offered, and required if
    /// `tls_required`.
    pub fn new(sock: Sock, tls: Option<Arc<ServerConfig>>, tls_required: bool) -> Stream {
        Stream {
            inner: Inner::Plain(sock),
            tls,
            tls_required,
        }
    }

    fn sock(&mut self) -> io::Result<&mut Sock> {
        match &mut self.inner {
            Inner::Plain(s) => Ok(s),
            Inner::Tls(t) => Ok(&mut t.sock),
            Inner::Gone => Err(io::Error::other("connection lost in the TLS handshake")),
        }
    }

    /// Shuts the TLS session down (`close_notify`), as the protocol asks of a server that
    /// ends a connection cleanly (`NBD_CMD_DISC`); nothing on a plain connection.
    pub fn close_tls(&mut self) {
        if let Inner::Tls(t) = &mut self.inner {
            t.conn.send_close_notify();
            if let Err(e) = t.flush() {
                log::debug!("NBD connection: sending the TLS close_notify: {e}");
            }
        }
    }

    /// Every read fails with `TimedOut` after `deadline` (`None`: no deadline).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        let s = self.sock()?;
        s.deadline = deadline;
        if deadline.is_none() {
            s.set_timeout(None)?;
        }
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Plain(s) => s.read(buf),
            Inner::Tls(t) => t.read(buf),
            Inner::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Plain(s) => s.write(buf),
            Inner::Tls(t) => t.write(buf),
            Inner::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Plain(s) => s.write_vectored(bufs),
            Inner::Tls(t) => t.write_vectored(bufs),
            Inner::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Inner::Plain(s) => s.flush(),
            Inner::Tls(t) => t.flush(),
            Inner::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Link for Stream {
    fn tls_offered(&self) -> bool {
        self.tls.is_some()
    }
    fn tls_required(&self) -> bool {
        self.tls_required
    }
    fn is_tls(&self) -> bool {
        matches!(self.inner, Inner::Tls(_))
    }
    fn start_tls(&mut self) -> io::Result<()> {
        let config = self
            .tls
            .clone()
            .ok_or_else(|| io::Error::other("TLS is not configured"))?;
        let Inner::Plain(sock) = std::mem::replace(&mut self.inner, Inner::Gone) else {
            return Err(io::Error::other("TLS is already on"));
        };
        let conn = ServerConnection::new(config).map_err(io::Error::other)?;
        let mut t = StreamOwned::new(conn, sock);
        while t.conn.is_handshaking() {
            t.conn.complete_io(&mut t.sock)?;
        }
        self.inner = Inner::Tls(Box::new(t));
        Ok(())
    }
}

impl Transport for Stream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let s = self.sock()?;
        s.deadline = None;
        s.set_timeout(timeout)
    }
}

/// The server's TLS configuration from a QEMU-style x509 credentials directory:
/// `server-cert.pem` (the chain), `server-key.pem`, and, if `ca-cert.pem` is there,
/// client certificates required and verified against it.
pub fn tls_config(dir: &Path) -> Result<Arc<ServerConfig>> {
    // ring, not aws-lc-rs (which needs cmake to build); its provider lacks only the
    // post-quantum key exchanges.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let file = |name: &str| dir.join(name);
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(file("server-cert.pem"))
            .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| {
                Error::invalid(format!(
                    "--nbd-tls-creds: reading {}: {e}",
                    file("server-cert.pem").display()
                ))
            })?;
    if certs.is_empty() {
        return Err(Error::invalid(format!(
            "--nbd-tls-creds: {} holds no certificate",
            file("server-cert.pem").display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(file("server-key.pem")).map_err(|e| {
        Error::invalid(format!(
            "--nbd-tls-creds: reading {}: {e}",
            file("server-key.pem").display()
        ))
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::invalid(format!("--nbd-tls-creds: {e}")))?;
    let ca = file("ca-cert.pem");
    let builder = if ca.exists() {
        let mut roots = rustls::RootCertStore::empty();
        let cas = CertificateDer::pem_file_iter(&ca)
            .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| {
                Error::invalid(format!("--nbd-tls-creds: reading {}: {e}", ca.display()))
            })?;
        for c in cas {
            roots
                .add(c)
                .map_err(|e| Error::invalid(format!("--nbd-tls-creds: {}: {e}", ca.display())))?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::invalid(format!("--nbd-tls-creds: {}: {e}", ca.display())))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        Error::invalid(format!(
            "--nbd-tls-creds: the server key and certificate: {e}"
        ))
    })?;
    Ok(Arc::new(config))
}

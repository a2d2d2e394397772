//! The NBD server in-process over an engine (no FUSE, no root), spoken to byte by byte
//! by a small client: extended headers (64-bit lengths for trim and block status over an
//! export larger than 4 GiB, 64-bit status chunks, one extent with REQ_ONE, the payload
//! form of block status), clients
//! without them unchanged, and hostile requests after extended headers (lengths that
//! overflow or pass the end, misused payload lengths, the wrong magic), each answered
//! with an error or a disconnect, the server serving the next client.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleecefs::engine::Engine;
use fleecefs::nbd::proto::*;
use fleecefs::nbd::server::{Listener, NbdConfig, NbdServer};
use fleecefs::nbd::Listen;
use fleecefs::sched::BackupScheduler;

mod support;
use support::EngineBuilder;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The export of the large tests: 6 GiB, sparse, data at 0 and at 5 GiB.
const BIG: u64 = 6 * GIB;
const FAR: u64 = 5 * GIB;

/// An engine over one sparse image `d` with an access (a new bitmap `b`: all dirty),
/// and an NBD server on a Unix socket.
struct Served {
    _dir: tempfile::TempDir,
    engine: Arc<Engine>,
    server: NbdServer,
    sock: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.stop();
        self.engine.shutdown();
    }
}

fn serve(size: u64, data: &[(u64, u8, u64)]) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let img = EngineBuilder::image(dir.path(), "d");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size).unwrap();
    for &(offset, byte, len) in data {
        f.write_all_at(&vec![byte; len as usize], offset).unwrap();
    }
    drop(f);
    let engine = Arc::new(
        EngineBuilder::new(dir.path())
            .existing_device("d")
            .with_state()
            .build(),
    );
    engine.setup("t", None, Some("b")).unwrap();
    let sock = dir.path().join("nbd.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let config = NbdConfig {
        listen: vec![Listen::Unix(sock.clone())],
        ..NbdConfig::default()
    };
    let server = NbdServer::start(
        engine.clone(),
        Arc::new(BackupScheduler::inline()),
        config,
        vec![Listener::Unix(l)],
    )
    .unwrap();
    Served {
        _dir: dir,
        engine,
        server,
        sock,
    }
}

/// One reply message: a simple reply, or a structured or extended chunk.
#[derive(Debug)]
struct Reply {
    magic: u32,
    flags: u16,
    kind: u16,
    cookie: u64,
    /// The request's offset, repeated in extended chunks.
    offset: Option<u64>,
    /// The error of a simple reply.
    error: u32,
    payload: Vec<u8>,
}

impl Reply {
    fn errno(&self) -> u32 {
        if self.magic == SIMPLE_REPLY_MAGIC {
            self.error
        } else if self.kind == REPLY_TYPE_ERROR {
            u32::from_be_bytes(self.payload[..4].try_into().unwrap())
        } else {
            0
        }
    }
    fn done(&self) -> bool {
        self.magic == SIMPLE_REPLY_MAGIC || self.flags & REPLY_FLAG_DONE != 0
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Headers {
    Simple,
    Structured,
    Extended,
}

struct Client {
    s: UnixStream,
    headers: Headers,
    /// The transmission flags of `NBD_INFO_EXPORT`.
    flags: u16,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl Client {
    fn connect(sock: &Path, headers: Headers, contexts: &[&str]) -> Client {
        let mut c = Client::connect_options(sock, headers, contexts);
        assert_eq!(c.go(), REP_ACK);
        c
    }

    /// The negotiation up to the meta contexts, without picking the export.
    fn connect_options(sock: &Path, headers: Headers, contexts: &[&str]) -> Client {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client {
            s,
            headers,
            flags: 0,
        };
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        match headers {
            Headers::Simple => {}
            Headers::Structured => assert_eq!(c.option(OPT_STRUCTURED_REPLY, &[]), REP_ACK),
            Headers::Extended => assert_eq!(c.option(OPT_EXTENDED_HEADERS, &[]), REP_ACK),
        }
        if !contexts.is_empty() {
            let mut d = 1u32.to_be_bytes().to_vec();
            d.push(b'd');
            d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for q in contexts {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            assert_eq!(c.option(OPT_SET_META_CONTEXT, &d), REP_ACK);
        }
        c
    }

    /// `NBD_OPT_GO` of export `d`: the type of the last reply.
    fn go(&mut self) -> u32 {
        self.option(OPT_GO, &[0, 0, 0, 1, b'd', 0, 0])
    }

    /// Sends an option; the type of the last reply (ACK or an error).
    fn option(&mut self, opt: u32, data: &[u8]) -> u32 {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).unwrap();
            assert_eq!(be64(&h), REPLY_MAGIC);
            let kind = be32(&h[12..]);
            let mut d = vec![0u8; be32(&h[16..]) as usize];
            self.s.read_exact(&mut d).unwrap();
            if kind == REP_INFO && d[..2] == INFO_EXPORT.to_be_bytes() {
                self.flags = u16::from_be_bytes([d[10], d[11]]);
            }
            if kind == REP_ACK || kind & (1 << 31) != 0 {
                return kind;
            }
        }
    }

    /// A request header in the negotiated form (compact: the low 32 bits of `len`).
    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) {
        let b = self.request_bytes(flags, kind, cookie, offset, len);
        self.s.write_all(&b).unwrap();
    }

    /// The bytes of a request header (see `request`).
    fn request_bytes(&self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
        let extended = self.headers == Headers::Extended;
        let magic = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        let mut b = magic.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        if extended {
            b.extend_from_slice(&len.to_be_bytes());
        } else {
            b.extend_from_slice(&(len as u32).to_be_bytes());
        }
        b
    }

    /// The next reply message; a simple reply to a read brings `read_len` bytes.
    fn reply(&mut self, read_len: usize) -> Reply {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).unwrap();
        let magic = be32(&m);
        match magic {
            SIMPLE_REPLY_MAGIC => {
                assert_ne!(self.headers, Headers::Extended, "a simple reply");
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).unwrap();
                let error = be32(&h);
                let mut payload = vec![0u8; if error == 0 { read_len } else { 0 }];
                self.s.read_exact(&mut payload).unwrap();
                Reply {
                    magic,
                    flags: 0,
                    kind: 0,
                    cookie: be64(&h[4..]),
                    offset: None,
                    error,
                    payload,
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                assert_eq!(self.headers, Headers::Structured, "a structured chunk");
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).unwrap();
                let mut payload = vec![0u8; be32(&h[12..]) as usize];
                self.s.read_exact(&mut payload).unwrap();
                Reply {
                    magic,
                    flags: u16::from_be_bytes([h[0], h[1]]),
                    kind: u16::from_be_bytes([h[2], h[3]]),
                    cookie: be64(&h[4..]),
                    offset: None,
                    error: 0,
                    payload,
                }
            }
            EXTENDED_REPLY_MAGIC => {
                assert_eq!(self.headers, Headers::Extended, "an extended chunk");
                let mut h = [0u8; 28];
                self.s.read_exact(&mut h).unwrap();
                let len = be64(&h[20..]);
                assert!(len < 64 * MIB, "payload length {len}");
                let mut payload = vec![0u8; len as usize];
                self.s.read_exact(&mut payload).unwrap();
                Reply {
                    magic,
                    flags: u16::from_be_bytes([h[0], h[1]]),
                    kind: u16::from_be_bytes([h[2], h[3]]),
                    cookie: be64(&h[4..]),
                    offset: Some(be64(&h[12..])),
                    error: 0,
                    payload,
                }
            }
            other => panic!("reply magic {other:#x}"),
        }
    }

    /// Every reply message of one request, up to the final one.
    fn replies(&mut self, cookie: u64, read_len: usize) -> Vec<Reply> {
        let mut out = Vec::new();
        loop {
            let r = self.reply(read_len);
            assert_eq!(r.cookie, cookie);
            let done = r.done();
            out.push(r);
            if done {
                return out;
            }
        }
    }

    /// The errno of a request's reply (0 for success).
    fn errno_of(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) -> u32 {
        self.request(flags, kind, cookie, offset, len);
        let read_len = if kind == CMD_READ { len as usize } else { 0 };
        let r = self.replies(cookie, read_len);
        r.last().unwrap().errno()
    }

    /// Reads `len` bytes at `offset` (holes as zeroes).
    fn read(&mut self, cookie: u64, offset: u64, len: usize) -> Vec<u8> {
        self.request(0, CMD_READ, cookie, offset, len as u64);
        let mut data = vec![0u8; len];
        for r in self.replies(cookie, len) {
            assert_eq!(r.errno(), 0, "read {offset}+{len}: {r:?}");
            if r.magic == SIMPLE_REPLY_MAGIC {
                data.copy_from_slice(&r.payload);
                continue;
            }
            if let Some(o) = r.offset {
                assert_eq!(o, offset, "an extended chunk repeats the request's offset");
            }
            match r.kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let at = (be64(&r.payload) - offset) as usize;
                    data[at..at + r.payload.len() - 8].copy_from_slice(&r.payload[8..]);
                }
                REPLY_TYPE_OFFSET_HOLE | REPLY_TYPE_NONE => {}
                k => panic!("chunk type {k} in a read"),
            }
        }
        data
    }

    /// Block status: per context id, its extents (length, flags).
    fn block_status(
        &mut self,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u64,
    ) -> Vec<(u32, Vec<(u64, u64)>)> {
        self.request(flags, CMD_BLOCK_STATUS, cookie, offset, len);
        self.status_replies(cookie, offset)
    }

    /// Block status in the payload form: the effect length and the context ids follow
    /// the header.
    fn block_status_of(
        &mut self,
        cookie: u64,
        offset: u64,
        len: u64,
        ids: &[u32],
    ) -> Vec<(u32, Vec<(u64, u64)>)> {
        self.status_payload(cookie, offset, len, ids);
        self.status_replies(cookie, offset)
    }

    fn status_payload(&mut self, cookie: u64, offset: u64, len: u64, ids: &[u32]) {
        let mut p = len.to_be_bytes().to_vec();
        for id in ids {
            p.extend_from_slice(&id.to_be_bytes());
        }
        let flags = CMD_FLAG_PAYLOAD_LEN;
        self.request(flags, CMD_BLOCK_STATUS, cookie, offset, p.len() as u64);
        self.s.write_all(&p).unwrap();
    }

    fn status_replies(&mut self, cookie: u64, offset: u64) -> Vec<(u32, Vec<(u64, u64)>)> {
        let mut out = Vec::new();
        for r in self.replies(cookie, 0) {
            assert_eq!(r.errno(), 0, "block status at {offset}: {r:?}");
            let p = &r.payload;
            let mut extents = Vec::new();
            if self.headers == Headers::Extended {
                assert_eq!(r.kind, REPLY_TYPE_BLOCK_STATUS_EXT);
                assert_eq!(r.offset, Some(offset));
                let count = be32(&p[4..]) as usize;
                assert_eq!(p.len(), 8 + 16 * count, "descriptor count");
                for e in p[8..].chunks(16) {
                    extents.push((be64(e), be64(&e[8..])));
                }
            } else {
                assert_eq!(r.kind, REPLY_TYPE_BLOCK_STATUS);
                for e in p[4..].chunks(8) {
                    extents.push((u64::from(be32(e)), u64::from(be32(&e[4..]))));
                }
            }
            out.push((be32(p), extents));
        }
        out
    }

    /// Whether the server closes the connection (no more bytes) within the timeout.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

const CONTEXTS: [&str; 2] = ["base:allocation", "qemu:dirty-bitmap:b"];
const HOLE_ZERO: u64 = (STATE_HOLE | STATE_ZERO) as u64;

fn fleecing_allocated(e: &Engine) -> u64 {
    assert!(e.wait_for_copies(Duration::from_secs(20)));
    e.status()
        .access
        .expect("an active access")
        .fleecing_allocated
}

/// Extended headers: a block status of the whole 6 GiB export in one request, with
/// extents longer than 4 GiB; REQ_ONE; reads with extended chunks; a 6 GiB trim that
/// frees the fleecing space.
#[test]
fn extended_headers_take_64_bit_lengths_past_4_gib() {
    let s = serve(BIG, &[(0, 0xa1, MIB), (FAR, 0xb2, MIB)]);
    let mut c = Client::connect(&s.sock, Headers::Extended, &CONTEXTS);
    let st = c.block_status(0, 1, 0, BIG);
    assert_eq!(
        st,
        [
            (
                1,
                vec![
                    (MIB, 0),
                    (FAR - MIB, HOLE_ZERO),
                    (MIB, 0),
                    (BIG - FAR - MIB, HOLE_ZERO)
                ]
            ),
            (2, vec![(BIG, u64::from(STATE_DIRTY))]),
        ]
    );
    // REQ_ONE: one extent per context, never past the request
    let st = c.block_status(CMD_FLAG_REQ_ONE, 2, MIB, BIG - MIB);
    assert_eq!(
        st,
        [
            (1, vec![(FAR - MIB, HOLE_ZERO)]),
            (2, vec![(BIG - MIB, u64::from(STATE_DIRTY))]),
        ]
    );
    let st = c.block_status(CMD_FLAG_REQ_ONE, 3, FAR + 4096, 8192);
    assert_eq!(
        st,
        [
            (1, vec![(8192, 0)]),
            (2, vec![(8192, u64::from(STATE_DIRTY))])
        ]
    );
    // reads past 4 GiB, data and holes
    assert_eq!(c.read(4, FAR - 4096, 8192), {
        let mut v = vec![0u8; 4096];
        v.extend(vec![0xb2u8; 4096]);
        v
    });
    // writes copy the snapshot's clusters into the fleecing file; a trim of the whole
    // export (a 64-bit length) frees them, and reads there fail from then on
    let dev = s.engine.device(0).unwrap();
    dev.write_live(0, &vec![0x11u8; 256 << 10]).unwrap();
    dev.write_live(FAR, &vec![0x22u8; 256 << 10]).unwrap();
    assert!(fleecing_allocated(&s.engine) >= 512 << 10);
    assert_eq!(c.read(5, FAR, 4096), vec![0xb2u8; 4096]);
    assert_eq!(c.errno_of(0, CMD_TRIM, 6, 0, BIG), 0);
    assert_eq!(fleecing_allocated(&s.engine), 0);
    assert_eq!(c.errno_of(0, CMD_READ, 7, FAR, 4096), EINVAL);
    // the map shows the discarded ranges as holes without zeroes
    let st = c.block_status(CMD_FLAG_REQ_ONE, 8, 0, BIG);
    assert_eq!(st[0], (1, vec![(BIG, u64::from(STATE_HOLE))]));
    c.request(0, CMD_DISC, 9, 0, 0);
    assert!(c.closed());
}

/// Clients without extended headers get what they always got: compact requests,
/// simple or structured replies, 32-bit block status.
#[test]
fn clients_without_extended_headers_are_unchanged() {
    let s = serve(BIG, &[(0, 0xa1, MIB), (FAR, 0xb2, MIB)]);
    let mut c = Client::connect(&s.sock, Headers::Structured, &CONTEXTS);
    // a compact request's 32-bit length: the first 4 GiB - 64 KiB
    let len = u64::from(u32::MAX) - 65535;
    let st = c.block_status(0, 1, 0, len);
    assert_eq!(
        st,
        [
            (1, vec![(MIB, 0), (len - MIB, HOLE_ZERO)]),
            (2, vec![(len, u64::from(STATE_DIRTY))]),
        ]
    );
    assert_eq!(
        c.read(2, FAR + MIB - 4096, 8192)[..4096],
        vec![0xb2u8; 4096]
    );
    assert_eq!(c.errno_of(0, CMD_READ, 3, BIG - 4096, 8192), EINVAL);
    assert_eq!(c.errno_of(0, CMD_WRITE_ZEROES, 4, 0, 4096), EPERM);
    let mut c = Client::connect(&s.sock, Headers::Simple, &[]);
    assert_eq!(c.read(5, FAR, 4096), vec![0xb2u8; 4096]);
    assert_eq!(c.errno_of(0, CMD_BLOCK_STATUS, 6, 0, 4096), EINVAL);
    assert_eq!(c.errno_of(0, CMD_TRIM, 7, BIG, 1), EINVAL);
    assert_eq!(c.errno_of(0, CMD_TRIM, 8, 0, 65536), 0);
}

/// Hostile requests after extended headers: errors that leave the connection serving,
/// or a disconnect where the stream cannot be followed; the server serves the next
/// client.
#[test]
fn hostile_extended_requests_get_an_error_or_a_disconnect() {
    let s = serve(BIG, &[(FAR, 0xb2, MIB)]);
    let mut c = Client::connect(&s.sock, Headers::Extended, &CONTEXTS);
    // ranges whose end overflows or passes the export's end
    assert_eq!(c.errno_of(0, CMD_READ, 1, u64::MAX - 511, 1024), EINVAL);
    assert_eq!(c.errno_of(0, CMD_TRIM, 2, 4096, u64::MAX), EINVAL);
    assert_eq!(c.errno_of(0, CMD_TRIM, 3, BIG + 1, 0), EINVAL);
    assert_eq!(c.errno_of(0, CMD_BLOCK_STATUS, 4, 1, BIG), EINVAL);
    assert_eq!(
        c.errno_of(0, CMD_BLOCK_STATUS, 5, u64::MAX, u64::MAX),
        EINVAL
    );
    assert_eq!(c.errno_of(0, CMD_BLOCK_STATUS, 6, 0, 0), EINVAL);
    // a read over 32 MiB, even inside the export; unknown flags
    assert_eq!(c.errno_of(0, CMD_READ, 7, 0, (32 << 20) + 1), EINVAL);
    assert_eq!(c.errno_of(0, CMD_READ, 8, 0, 5 * GIB), EINVAL);
    assert_eq!(c.errno_of(1 << 6, CMD_READ, 9, 0, 512), EINVAL);
    // the error chunk repeats the request's offset
    c.request(0, CMD_READ, 10, BIG, 4096);
    let r = c.reply(0);
    assert_eq!(
        (r.kind, r.offset, r.errno()),
        (REPLY_TYPE_ERROR, Some(BIG), EINVAL)
    );
    // a payload where the command takes none: read and dropped, EINVAL
    c.request(CMD_FLAG_PAYLOAD_LEN, CMD_READ, 11, 0, 100);
    c.s.write_all(&[0x5a; 100]).unwrap();
    assert_eq!(c.replies(11, 0).last().unwrap().errno(), EINVAL);
    c.request(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 12, 0, 12);
    c.s.write_all(&[0u8; 12]).unwrap();
    assert_eq!(c.replies(12, 0).last().unwrap().errno(), EINVAL);
    // a write with its payload: refused, the connection goes on
    c.request(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 13, 0, 512);
    c.s.write_all(&[0x5a; 512]).unwrap();
    assert_eq!(c.replies(13, 0).last().unwrap().errno(), EPERM);
    assert_eq!(c.read(14, FAR, 4096), vec![0xb2u8; 4096]);
    // a payload too large to skip: EINVAL, then the connection ends
    assert_eq!(
        c.errno_of(CMD_FLAG_PAYLOAD_LEN, CMD_READ, 15, 0, 1 << 40),
        EINVAL
    );
    assert!(c.closed(), "the connection outlived a 1 TiB payload");
    // a compact request after extended headers (and the start of another, so that the
    // server has a whole extended header): the wrong magic, disconnected
    let mut c = Client::connect(&s.sock, Headers::Extended, &[]);
    c.headers = Headers::Simple;
    c.request(0, CMD_READ, 16, 0, 512);
    c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    assert!(c.closed(), "the connection outlived a compact request");
    // the extended magic without extended headers: disconnected
    let mut c = Client::connect(&s.sock, Headers::Structured, &[]);
    c.headers = Headers::Extended;
    c.request(0, CMD_READ, 17, 0, 512);
    assert!(c.closed(), "the connection outlived an extended request");
    // the server and the access are unharmed
    let mut c = Client::connect(&s.sock, Headers::Extended, &CONTEXTS);
    assert_eq!(c.read(18, FAR, 4096), vec![0xb2u8; 4096]);
    assert_eq!(s.server.status().exports[0].name, "d");
    assert!(!s.engine.status().access.unwrap().broken);
}

/// The payload form of block status, offered with extended headers and meta contexts
/// (as QEMU does): only the contexts named, the effect length from the payload; a
/// payload naming an unknown or repeated context, none, or of a bad size: EINVAL, and
/// the connection goes on.
#[test]
fn block_status_payload_picks_the_contexts() {
    let s = serve(BIG, &[(FAR, 0xb2, MIB)]);
    let mut c = Client::connect(&s.sock, Headers::Extended, &CONTEXTS);
    assert_ne!(c.flags & FLAG_BLOCK_STATUS_PAYLOAD, 0);
    let dirty = u64::from(STATE_DIRTY);
    assert_eq!(
        c.block_status_of(1, 0, BIG, &[2]),
        [(2, vec![(BIG, dirty)])]
    );
    assert_eq!(
        c.block_status_of(2, FAR, GIB, &[1]),
        [(1, vec![(MIB, 0), (GIB - MIB, HOLE_ZERO)])]
    );
    // both, named in any order: the negotiated order
    assert_eq!(
        c.block_status_of(3, FAR, 4096, &[2, 1]),
        [(1, vec![(4096, 0)]), (2, vec![(4096, dirty)])]
    );
    for (cookie, ids) in [
        (4, &[2, 2][..]),
        (5, &[3][..]),
        (6, &[][..]),
        (7, &[1, 2, 1][..]),
    ] {
        c.status_payload(cookie, 0, 4096, ids);
        let r = c.replies(cookie, 0);
        assert_eq!(r.last().unwrap().errno(), EINVAL, "ids {ids:?}");
    }
    // an effect length past the end, a payload that is not whole ids
    c.status_payload(8, 4096, BIG, &[1]);
    assert_eq!(c.replies(8, 0).last().unwrap().errno(), EINVAL);
    c.request(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 9, 0, 10);
    c.s.write_all(&[0u8; 10]).unwrap();
    assert_eq!(c.replies(9, 0).last().unwrap().errno(), EINVAL);
    assert_eq!(c.read(10, FAR, 4096), vec![0xb2u8; 4096]);
    // not offered without extended headers, nor without meta contexts
    let c = Client::connect(&s.sock, Headers::Structured, &CONTEXTS);
    assert_eq!(c.flags & FLAG_BLOCK_STATUS_PAYLOAD, 0);
    let c = Client::connect(&s.sock, Headers::Extended, &[]);
    assert_eq!(c.flags & FLAG_BLOCK_STATUS_PAYLOAD, 0);
}

/// A read that succeeds sends the bytes it read: a trim of the range by another
/// connection after the read checked it (but before the reply went out) must not turn
/// data into an `OFFSET_HOLE` (zeroes in the backup). Fault injection slows every read
/// from the fleecing file, so the read of 16 MiB (every other cluster copied: four passes
/// of 32 source runs) takes seconds, and the trim of its first cluster comes after the
/// read's first pass checked that cluster (about 1.9 s) and well before its end (7.7 s).
#[cfg(feature = "fault-injection")]
#[test]
fn a_trim_while_a_read_is_answered_never_turns_its_data_into_a_hole() {
    const SIZE: u64 = 16 * MIB;
    const CLUSTER: u64 = 64 << 10;
    let s = serve(SIZE, &[(0, 0xa5, SIZE)]);
    let dev = s.engine.device(0).unwrap();
    for c in (1..SIZE / CLUSTER).step_by(2) {
        dev.write_live(c * CLUSTER, &vec![0x11u8; CLUSTER as usize])
            .unwrap();
    }
    assert!(fleecing_allocated(&s.engine) >= SIZE / 2);
    // 128 fleecing reads of 60 ms: the first pass (32 source runs) ends after ~1.9 s,
    // the read after ~7.7 s.
    std::env::set_var("FLEECEFS_FAULT_FLEECE_READ", "delay=60");
    let mut reader = Client::connect(&s.sock, Headers::Structured, &[]);
    let mut trimmer = Client::connect(&s.sock, Headers::Structured, &[]);
    reader.request(0, CMD_READ, 1, 0, SIZE);
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(trimmer.errno_of(0, CMD_TRIM, 2, 0, CLUSTER), 0);
    let replies = reader.replies(1, SIZE as usize);
    std::env::remove_var("FLEECEFS_FAULT_FLEECE_READ");
    let last = replies.last().unwrap();
    assert_eq!(
        last.errno(),
        0,
        "the read failed: was the trim early? {last:?}"
    );
    let holes: Vec<u64> = replies
        .iter()
        .filter(|r| r.kind == REPLY_TYPE_OFFSET_HOLE)
        .map(|r| be64(&r.payload))
        .collect();
    assert!(holes.is_empty(), "data sent as holes at {holes:?}");
    for r in replies.iter().filter(|r| r.kind == REPLY_TYPE_OFFSET_DATA) {
        assert!(
            r.payload[8..].iter().all(|&b| b == 0xa5),
            "data at {}",
            be64(&r.payload)
        );
    }
}

/// Meta contexts belong to the export they were chosen on, as in QEMU's server (which
/// drops them when `NBD_OPT_GO` picks another export object): contexts chosen while one
/// access was active are not carried over to an export of the same name of the next
/// access, whose bitmap may be another one. Otherwise the client would get the new
/// access's dirty map under the name of the bitmap it asked for, and an incremental
/// would copy the wrong ranges.
#[test]
fn meta_contexts_chosen_during_one_access_do_not_carry_over_to_the_next() {
    let s = serve(4 * MIB, &[(0, 0xa1, MIB)]);
    let mut c = Client::connect_options(&s.sock, Headers::Structured, &CONTEXTS);
    // the access ends and another one starts under the same export name, with another
    // bitmap, before the client picks the export
    s.engine.teardown("t", true).unwrap();
    s.engine.setup("t", None, Some("c")).unwrap();
    assert_eq!(c.go(), REP_ACK);
    assert_eq!(
        c.errno_of(0, CMD_BLOCK_STATUS, 1, 0, 4096),
        EINVAL,
        "block status answered with contexts chosen during the previous access"
    );
    assert_eq!(c.read(2, 0, 4096), vec![0xa1u8; 4096]);
    // chosen again on the new export, they work
    let mut c = Client::connect(&s.sock, Headers::Structured, &["qemu:dirty-bitmap:c"]);
    assert_eq!(
        c.block_status(0, 3, 0, 4096),
        [(2, vec![(4096, u64::from(STATE_DIRTY))])]
    );
    // a SET_META_CONTEXT that fails forgets the contexts chosen before it, as in QEMU
    let mut c = Client::connect_options(&s.sock, Headers::Structured, &["base:allocation"]);
    let mut d = 1u32.to_be_bytes().to_vec();
    d.push(b'x');
    d.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(c.option(OPT_SET_META_CONTEXT, &d), REP_ERR_UNKNOWN);
    assert_eq!(c.go(), REP_ACK);
    assert_eq!(c.errno_of(0, CMD_BLOCK_STATUS, 4, 0, 4096), EINVAL);
}

/// `status` names the reply mode each connected client negotiated, oldest client first.
#[test]
fn status_shows_the_reply_mode_of_each_client() {
    let s = serve(4 * MIB, &[(0, 0xa1, MIB)]);
    let _simple = Client::connect(&s.sock, Headers::Simple, &[]);
    let _extended = Client::connect(&s.sock, Headers::Extended, &CONTEXTS);
    let _structured = Client::connect(&s.sock, Headers::Structured, &[]);
    let want = ["simple", "extended", "structured"];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut modes = Vec::new();
    while std::time::Instant::now() < deadline {
        // a connection is listed once its thread has opened the export, after GO's ack
        modes = s.server.status().exports[0].client_modes.clone();
        if modes.len() == want.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(modes, want);
    assert_eq!(s.server.status().exports[0].clients, ["unix"; 3]);
}

/// Teardown ends the exports also for a client that keeps sending requests which do not
/// touch the snapshot (flush, or requests refused for their shape): the first request
/// after the teardown gets `ESHUTDOWN` and the connection ends, as for a read; also when
/// a new access already exports a device of the same name (a read then included).
#[test]
fn a_busy_client_is_disconnected_at_teardown_whatever_it_asks() {
    let s = serve(4 * MIB, &[(0, 0xa1, MIB)]);
    s.engine.teardown("t", true).unwrap();
    for (kind, offset, len, next_access) in [
        (CMD_FLUSH, 0, 0, false),
        (CMD_READ, 8 * MIB, 4096, false),
        (CMD_WRITE_ZEROES, 0, 4096, false),
        (99, 0, 0, false),
        (CMD_FLUSH, 0, 0, true),
        (CMD_READ, 0, 4096, true),
        (CMD_TRIM, 0, MIB, true),
    ] {
        s.engine.setup("t", None, None).unwrap();
        let mut c = Client::connect(&s.sock, Headers::Structured, &[]);
        assert_eq!(c.errno_of(0, CMD_FLUSH, 1, 0, 0), 0);
        // The request's first byte goes before the teardown, the rest after it: the
        // connection is inside a request, not idle, so only the request can notice.
        let b = c.request_bytes(0, kind, 2, offset, len);
        c.s.write_all(&b[..1]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        s.engine.teardown("t", true).unwrap();
        if next_access {
            s.engine.setup("t", None, None).unwrap();
        }
        c.s.write_all(&b[1..]).unwrap();
        let r = c.replies(2, 0);
        assert_eq!(
            r.last().unwrap().errno(),
            ESHUTDOWN,
            "command {kind} after the teardown"
        );
        assert!(
            c.closed(),
            "command {kind}: the connection outlived the teardown"
        );
        if next_access {
            // the new access's export is whole: the trim was not applied to it
            let mut c = Client::connect(&s.sock, Headers::Structured, &[]);
            assert_eq!(c.read(3, 0, 4096), vec![0xa1u8; 4096]);
            drop(c);
            s.engine.teardown("t", true).unwrap();
        }
    }
}

/// The fleecing files of the open descriptors of this process under `dir` that have
/// been deleted (a teardown removes the file; its space is freed once the last
/// descriptor closes).
fn deleted_files_open_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy().into_owned();
            if t.starts_with(&*dir.to_string_lossy()) && t.ends_with("(deleted)") {
                out.push(t);
            }
        }
    }
    out
}

/// A connection that outlives the teardown, blocked sending a reply to a client that does
/// not take it (for up to the send timeout, 30 s, or longer for a client that takes a
/// byte now and then), does not keep the ended access alive: the deleted fleecing file
/// is closed, and its space freed, at the teardown.
#[test]
fn a_client_that_does_not_take_its_reply_does_not_hold_the_fleecing_space_after_teardown() {
    const SIZE: u64 = 24 * MIB;
    let s = serve(SIZE, &[(0, 0xa5, SIZE)]);
    let dev = s.engine.device(0).unwrap();
    dev.write_live(0, &vec![0x11u8; (4 * MIB) as usize])
        .unwrap();
    assert!(fleecing_allocated(&s.engine) >= 4 * MIB);
    let mut c = Client::connect(&s.sock, Headers::Structured, &[]);
    // 24 MiB of reply: more than the socket buffers hold; the client reads none of it
    c.request(0, CMD_READ, 1, 0, SIZE);
    std::thread::sleep(Duration::from_millis(1500));
    s.engine.teardown("t", true).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut open = deleted_files_open_under(s._dir.path());
    while !open.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        open = deleted_files_open_under(s._dir.path());
    }
    assert!(
        open.is_empty(),
        "the ended access's fleecing file is still open: {open:?}"
    );
    drop(c);
}

/// An incremental whose dirty clusters are holes of the image (a guest trimmed them since
/// the last backup) between clean clusters with data: the map of a dirty hole ends where
/// the next readable data would begin, and that may be far. Block status and structured
/// reads need it only up to the end of their request; a search that went on to the next
/// readable data each time (one SEEK_DATA of the image per clean cluster with data on
/// the way) made a block status of the whole export quadratic in the number of such
/// clusters (minutes for 16384 of them), and so every read of a dirty hole.
#[test]
fn holes_between_unreadable_data_are_mapped_in_time_linear_in_the_request() {
    const CLUSTER: u64 = 64 << 10;
    const N: u64 = 16384;
    // data (one page) at the start of every odd cluster, holes elsewhere
    let data: Vec<(u64, u8, u64)> = (1..N)
        .step_by(2)
        .map(|c| (c * CLUSTER, 0x5a, 4096))
        .collect();
    let s = serve(N * CLUSTER, &data);
    // the first backup: bitmap b cleared at its teardown
    s.engine.teardown("t", true).unwrap();
    // the guest trims every even cluster (holes already: only the bitmap changes)
    let dev = s.engine.device(0).unwrap();
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    for c in (0..N).step_by(2) {
        dev.fallocate_live(punch, c * CLUSTER, CLUSTER).unwrap();
    }
    s.engine.setup("t", None, Some("b")).unwrap();
    let start = std::time::Instant::now();
    let mut c = Client::connect(&s.sock, Headers::Extended, &CONTEXTS);
    let st = c.block_status(0, 1, 0, N * CLUSTER);
    let hole = u64::from(STATE_HOLE);
    let want: Vec<(u64, u64)> = (0..N)
        .map(|c| (CLUSTER, if c % 2 == 0 { HOLE_ZERO } else { hole }))
        .collect();
    assert_eq!(st[0], (1, want));
    // structured reads of dirty holes: one hole chunk each
    for (i, cl) in (0..N).step_by(2).take(2048).enumerate() {
        c.request(0, CMD_READ, 2 + i as u64, cl * CLUSTER, CLUSTER);
        let r = c.replies(2 + i as u64, 0);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].kind, REPLY_TYPE_OFFSET_HOLE);
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(20), "mapping took {took:?}");
}

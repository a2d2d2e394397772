//! The wire format of the transmission phase: requests and replies in the form the
//! negotiation chose ([`Mode`]). Without extended headers a request is the compact
//! 28-byte header with a 32-bit length, and replies are simple (16 bytes) or structured
//! chunks (20-byte header); after `NBD_OPT_EXTENDED_HEADERS` every request is the 32-byte
//! extended header with a 64-bit length (an effect length, or with
//! `NBD_CMD_FLAG_PAYLOAD_LEN` the length of a payload that follows), and every reply is
//! an extended chunk (32-byte header that repeats the request's offset, 64-bit payload
//! length), block status as `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (64-bit extents).
//! Pure functions over byte slices; what to answer is `conn.rs`'s.

use std::ops::Deref;

use crate::nbd::proto::{
    CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, EXTENDED_REPLY_MAGIC, EXTENDED_REQUEST_MAGIC, MAX_STRING,
    REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_BLOCK_STATUS_EXT, REPLY_TYPE_ERROR,
    REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

/// The headers of the transmission phase, as negotiated (ordered: each includes what
/// the one before allows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Compact requests, simple replies.
    Simple,
    /// Compact requests, structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    Structured,
    /// Extended requests and replies (`NBD_OPT_EXTENDED_HEADERS`).
    Extended,
}

impl Mode {
    /// The size of a request header.
    pub fn request_len(self) -> usize {
        match self {
            Mode::Extended => EXTENDED_REQUEST_LEN,
            _ => REQUEST_LEN,
        }
    }

    /// Whether replies are chunks (structured or extended).
    pub fn chunked(self) -> bool {
        self >= Mode::Structured
    }

    /// Its name in `status --json`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Simple => "simple",
            Mode::Structured => "structured",
            Mode::Extended => "extended",
        }
    }

    /// The words logs use for it.
    pub fn describe(self) -> &'static str {
        match self {
            Mode::Simple => "simple replies",
            Mode::Structured => "structured replies",
            Mode::Extended => "extended headers",
        }
    }
}

/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;

/// One request of the transmission phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// The command.
    pub kind: u16,
    /// The client's cookie, returned in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length: of the payload that follows (a compact write, or `PAYLOAD_LEN`), or of
    /// the range to read, trim or describe. At most 32 bits in compact requests.
    pub len: u64,
}

impl Request {
    /// The bytes of payload that follow the header: a compact write's data, or with
    /// extended headers the length of a request flagged `NBD_CMD_FLAG_PAYLOAD_LEN`
    /// (a write without the flag is taken as having its payload, as QEMU does).
    pub fn payload_len(&self, mode: Mode) -> u64 {
        let flagged = mode == Mode::Extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0;
        if flagged || self.kind == CMD_WRITE {
            self.len
        } else {
            0
        }
    }

    /// Whether `offset..offset+len` lies inside an export of `size` bytes (checked
    /// without overflow).
    pub fn within(&self, size: u64) -> bool {
        self.offset <= size && self.len <= size - self.offset
    }
}

/// Parses a request header of `mode` (`b` is [`Mode::request_len`] bytes); `None` for
/// the wrong magic (also a compact request after extended headers, and the reverse) or
/// the wrong size.
pub fn parse_request(b: &[u8], mode: Mode) -> Option<Request> {
    if b.len() != mode.request_len() {
        return None;
    }
    let magic = u32::from_be_bytes(b[..4].try_into().ok()?);
    let expected = match mode {
        Mode::Extended => EXTENDED_REQUEST_MAGIC,
        _ => REQUEST_MAGIC,
    };
    if magic != expected {
        return None;
    }
    let len = match mode {
        Mode::Extended => u64::from_be_bytes(b[24..32].try_into().ok()?),
        _ => u64::from(u32::from_be_bytes(b[24..28].try_into().ok()?)),
    };
    Some(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().ok()?),
        kind: u16::from_be_bytes(b[6..8].try_into().ok()?),
        cookie: u64::from_be_bytes(b[8..16].try_into().ok()?),
        offset: u64::from_be_bytes(b[16..24].try_into().ok()?),
        len,
    })
}

/// A reply header (and the fixed part of its payload), on the stack.
pub struct Header {
    buf: [u8; 48],
    len: usize,
}

impl Header {
    fn new() -> Header {
        Header {
            buf: [0; 48],
            len: 0,
        }
    }

    fn put(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

impl Deref for Header {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The replies to one request: its cookie, its offset (an extended reply repeats it),
/// and the negotiated mode.
#[derive(Clone, Copy, Debug)]
pub struct ReplyTo {
    /// The negotiated mode.
    pub mode: Mode,
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset.
    pub offset: u64,
}

impl ReplyTo {
    /// The replies to `req` in `mode`.
    pub fn new(mode: Mode, req: &Request) -> ReplyTo {
        ReplyTo {
            mode,
            cookie: req.cookie,
            offset: req.offset,
        }
    }

    /// A simple reply header (data, if any, follows): only without structured replies.
    pub fn simple(&self, error: u32) -> Header {
        let mut h = Header::new();
        h.put(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        h.put(&error.to_be_bytes());
        h.put(&self.cookie.to_be_bytes());
        h
    }

    /// A chunk header for a payload of `len` bytes: structured or extended.
    pub fn chunk(&self, flags: u16, kind: u16, len: u32) -> Header {
        let mut h = Header::new();
        if self.mode == Mode::Extended {
            h.put(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            h.put(&flags.to_be_bytes());
            h.put(&kind.to_be_bytes());
            h.put(&self.cookie.to_be_bytes());
            h.put(&self.offset.to_be_bytes());
            h.put(&u64::from(len).to_be_bytes());
        } else {
            h.put(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            h.put(&flags.to_be_bytes());
            h.put(&kind.to_be_bytes());
            h.put(&self.cookie.to_be_bytes());
            h.put(&len.to_be_bytes());
        }
        h
    }

    /// Success without data: a simple reply, or a final `NBD_REPLY_TYPE_NONE` chunk.
    pub fn done(&self) -> Header {
        if self.mode.chunked() {
            self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
        } else {
            self.simple(0)
        }
    }

    /// A failure: a simple reply with the errno, or a final `NBD_REPLY_TYPE_ERROR` chunk
    /// with the errno and `message` (cut at a character boundary to at most 4096 bytes).
    pub fn error(&self, error: u32, message: &str) -> Vec<u8> {
        if !self.mode.chunked() {
            return self.simple(error).to_vec();
        }
        let mut end = message.len().min(MAX_STRING);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let msg = &message.as_bytes()[..end];
        let mut b = self
            .chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, (6 + msg.len()) as u32)
            .to_vec();
        b.extend_from_slice(&error.to_be_bytes());
        b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        b.extend_from_slice(msg);
        b
    }

    /// An `NBD_REPLY_TYPE_OFFSET_HOLE` chunk (a read is at most 32 MiB: 32-bit sizes).
    pub fn hole(&self, flags: u16, offset: u64, len: u32) -> Header {
        let mut h = self.chunk(flags, REPLY_TYPE_OFFSET_HOLE, 12);
        h.put(&offset.to_be_bytes());
        h.put(&len.to_be_bytes());
        h
    }

    /// The header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk of `len` bytes at `offset`
    /// (the data follows).
    pub fn data(&self, flags: u16, offset: u64, len: u32) -> Header {
        let mut h = self.chunk(flags, REPLY_TYPE_OFFSET_DATA, len + 8);
        h.put(&offset.to_be_bytes());
        h
    }

    /// The status chunk of one meta context: `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (64-bit
    /// lengths and flags, with a descriptor count) with extended headers, else
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`, whose lengths fit 32 bits because a compact
    /// request's length does and no extent reaches past the request.
    pub fn block_status(&self, flags: u16, context: u32, extents: &[(u64, u32)]) -> Vec<u8> {
        let mut b;
        if self.mode == Mode::Extended {
            let len = 8 + 16 * extents.len();
            b = self
                .chunk(flags, REPLY_TYPE_BLOCK_STATUS_EXT, len as u32)
                .to_vec();
            b.reserve(len);
            b.extend_from_slice(&context.to_be_bytes());
            b.extend_from_slice(&(extents.len() as u32).to_be_bytes());
            for (l, f) in extents {
                b.extend_from_slice(&l.to_be_bytes());
                b.extend_from_slice(&u64::from(*f).to_be_bytes());
            }
        } else {
            let len = 4 + 8 * extents.len();
            b = self
                .chunk(flags, REPLY_TYPE_BLOCK_STATUS, len as u32)
                .to_vec();
            b.reserve(len);
            b.extend_from_slice(&context.to_be_bytes());
            for (l, f) in extents {
                let l = u32::try_from(*l).unwrap_or(u32::MAX);
                b.extend_from_slice(&l.to_be_bytes());
                b.extend_from_slice(&f.to_be_bytes());
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::*;

    fn compact(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    fn extended(flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
        let mut b = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn compact_requests_parse_and_bad_magic_fails() {
        let mut b = compact(CMD_FLAG_DF, CMD_READ, 42, 4096, 512);
        let want = Request {
            flags: CMD_FLAG_DF,
            kind: CMD_READ,
            cookie: 42,
            offset: 4096,
            len: 512,
        };
        assert_eq!(parse_request(&b, Mode::Simple), Some(want));
        assert_eq!(parse_request(&b, Mode::Structured), Some(want));
        // a compact request where an extended one is due: refused
        assert_eq!(parse_request(&b, Mode::Extended), None);
        b[3] ^= 1;
        assert_eq!(parse_request(&b, Mode::Simple), None);
    }

    #[test]
    fn extended_requests_carry_64_bit_lengths() {
        let b = extended(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 7, 1 << 33, 5 << 30);
        let r = parse_request(&b, Mode::Extended).unwrap();
        assert_eq!(r.len, 5 << 30);
        assert_eq!(r.offset, 1 << 33);
        assert_eq!(r.payload_len(Mode::Extended), 0);
        // the extended magic in compact mode, or a short header: refused
        assert_eq!(parse_request(&b[..28], Mode::Simple), None);
        assert_eq!(parse_request(&b[..28], Mode::Extended), None);
        // PAYLOAD_LEN makes the length a payload's; only with extended headers
        let p = extended(CMD_FLAG_PAYLOAD_LEN, CMD_READ, 1, 0, 100);
        let r = parse_request(&p, Mode::Extended).unwrap();
        assert_eq!(r.payload_len(Mode::Extended), 100);
        let w = parse_request(&compact(0, CMD_WRITE, 1, 0, 512), Mode::Simple).unwrap();
        assert_eq!(w.payload_len(Mode::Simple), 512);
        let w = parse_request(&extended(0, CMD_WRITE, 1, 0, 512), Mode::Extended).unwrap();
        assert_eq!(w.payload_len(Mode::Extended), 512);
    }

    #[test]
    fn bounds_are_checked_without_overflow() {
        let r = |offset, len| Request {
            flags: 0,
            kind: CMD_READ,
            cookie: 0,
            offset,
            len,
        };
        assert!(r(0, 100).within(100));
        assert!(r(100, 0).within(100));
        assert!(!r(1, 100).within(100));
        assert!(!r(101, 0).within(100));
        assert!(!r(u64::MAX, 2).within(u64::MAX));
        assert!(!r(2, u64::MAX).within(u64::MAX));
        assert!(!r(u64::MAX - 511, 1024).within(1 << 40));
    }

    #[test]
    fn replies_have_their_layout() {
        let req = Request {
            flags: 0,
            kind: CMD_READ,
            cookie: 9,
            offset: 8192,
            len: 100,
        };
        let s = ReplyTo::new(Mode::Simple, &req);
        let st = ReplyTo::new(Mode::Structured, &req);
        let x = ReplyTo::new(Mode::Extended, &req);
        let r = s.simple(EPERM);
        assert_eq!(&r[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[4..8], &1u32.to_be_bytes());
        assert_eq!(s.done().len(), 16);
        assert_eq!(s.error(EINVAL, "no").len(), 16);
        let e = st.error(EINVAL, "no");
        assert_eq!(e.len(), 20 + 6 + 2);
        assert_eq!(&e[16..20], &8u32.to_be_bytes());
        let long = "é".repeat(3000);
        let e = st.error(EINVAL, &long);
        assert!(e.len() <= 20 + 6 + MAX_STRING);
        assert!(std::str::from_utf8(&e[26..]).is_ok());
        let d = st.data(0, 8192, 100);
        assert_eq!(&d[16..20], &108u32.to_be_bytes());
        assert_eq!(st.hole(0, 0, 5).len(), 32);
        assert_eq!(st.done().len(), 20);
        let b = st.block_status(REPLY_FLAG_DONE, 2, &[(4096, 3), (512, 0)]);
        assert_eq!(b.len(), 20 + 4 + 16);
        assert_eq!(&b[6..8], &REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
        // extended: 32-byte headers that repeat the request's offset, 64-bit lengths
        let n = x.done();
        assert_eq!(n.len(), 32);
        assert_eq!(&n[..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&n[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&n[8..16], &9u64.to_be_bytes());
        assert_eq!(&n[16..24], &8192u64.to_be_bytes());
        assert_eq!(&n[24..32], &0u64.to_be_bytes());
        let e = x.error(EINVAL, "no");
        assert_eq!(e.len(), 32 + 6 + 2);
        assert_eq!(&e[24..32], &8u64.to_be_bytes());
        assert_eq!(&e[32..36], &EINVAL.to_be_bytes());
        let d = x.data(0, 12288, 100);
        assert_eq!(d.len(), 40);
        assert_eq!(&d[16..24], &8192u64.to_be_bytes());
        assert_eq!(&d[24..32], &108u64.to_be_bytes());
        assert_eq!(&d[32..40], &12288u64.to_be_bytes());
        assert_eq!(x.hole(0, 0, 5).len(), 44);
        let b = x.block_status(0, 2, &[(6 << 30, 3), (512, 0)]);
        assert_eq!(b.len(), 32 + 8 + 32);
        assert_eq!(&b[6..8], &REPLY_TYPE_BLOCK_STATUS_EXT.to_be_bytes());
        assert_eq!(&b[24..32], &40u64.to_be_bytes());
        assert_eq!(&b[32..36], &2u32.to_be_bytes());
        assert_eq!(&b[36..40], &2u32.to_be_bytes());
        assert_eq!(&b[40..48], &(6u64 << 30).to_be_bytes());
        assert_eq!(&b[48..56], &3u64.to_be_bytes());
    }
}

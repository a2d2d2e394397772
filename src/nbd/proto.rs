//! The NBD wire format (the NetworkBlockDevice project's `doc/proto.md`, with its
//! `EXTENDED_HEADERS` extension): magics, option and command numbers, flags, the errno
//! mapping, and the encoding of the negotiation's messages (the transmission phase's
//! requests and replies are in `transmit.rs`). Pure functions over byte slices, so tests
//! pass a `Vec<u8>`; no policy (what to answer is in `handshake.rs` and `conn.rs`).

/// `NBDMAGIC`: the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the magic of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of an option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a compact request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of an extended request (after `NBD_OPT_EXTENDED_HEADERS`).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// The magic of an extended reply chunk (after `NBD_OPT_EXTENDED_HEADERS`).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flags (server): fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flags (server): the client may omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flags: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
/// Client flags: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 2;

/// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is accepted.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_TRIM` is accepted.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_FLAG_DF` is accepted.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Several connections see the same data, and a flush on one covers them all.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Block status takes a payload that picks the contexts to describe (extended headers).
pub const FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Ends the negotiation without an export.
pub const OPT_ABORT: u32 = 2;
/// Lists the exports.
pub const OPT_LIST: u32 = 3;
/// Upgrades the connection to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describes an export.
pub const OPT_INFO: u32 = 6;
/// Describes and selects an export.
pub const OPT_GO: u32 = 7;
/// Structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Lists meta contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Selects meta contexts for `NBD_CMD_BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Extended headers: 32-byte requests and replies with 64-bit lengths.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option replies.
pub const REP_ACK: u32 = 1;
/// One export of `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// One item of `NBD_OPT_INFO`/`GO`.
pub const REP_INFO: u32 = 3;
/// One meta context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Unknown option.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Refused by the server's policy.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Malformed option.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// TLS is required first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// The option is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
/// Extended headers are required (or, for `STRUCTURED_REPLY`, already negotiated).
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

/// Info types.
pub const INFO_EXPORT: u16 = 0;
/// The export's name.
pub const INFO_NAME: u16 = 1;
/// The export's description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write (refused).
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim: a discard of the snapshot.
pub const CMD_TRIM: u16 = 4;
/// Write zeroes (refused).
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes: do not punch.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Read: one data chunk, no holes.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: one extent per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Extended headers: the length is that of a payload after the header.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply flag: the last chunk.
pub const REPLY_FLAG_DONE: u16 = 1;
/// Structured reply chunk types.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Extents of one meta context (32-bit lengths).
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Extents of one meta context (64-bit lengths and flags; extended headers only).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// An error for the whole request.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// Error numbers on the wire.
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Out of memory.
pub const ENOMEM: u32 = 12;
/// Invalid request (also what QEMU's server sends for errnos it does not map).
pub const EINVAL: u32 = 22;
/// No space.
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Not supported.
pub const ENOTSUP: u32 = 95;
/// The server is shutting down (or the export went away).
pub const ESHUTDOWN: u32 = 108;

/// `base:allocation` extent flags: a hole, and reads as zeroes.
pub const STATE_HOLE: u32 = 1;
/// Reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME`: the extent is dirty.
pub const STATE_DIRTY: u32 = 1;

/// Longest export name or meta context query accepted (the protocol's limit).
pub const MAX_STRING: usize = 4096;
/// Longest option payload accepted; a longer one is refused and the client dropped.
pub const MAX_OPTION: u32 = 64 * 1024;
/// Largest read (and `NBD_INFO_BLOCK_SIZE` maximum): 32 MiB, as in QEMU.
pub const MAX_REQUEST: u32 = 32 << 20;

/// The errno on the wire for a system errno, as QEMU's server maps it
/// (`system_errno_to_nbd_errno`): anything without its own number becomes EINVAL,
/// so a read of an inaccessible range (EACCES) gets EINVAL from both.
pub fn wire_errno(errno: i32) -> u32 {
    match errno {
        0 => 0,
        libc::EPERM | libc::EROFS => EPERM,
        libc::EIO => EIO,
        libc::ENOMEM => ENOMEM,
        libc::EDQUOT | libc::EFBIG | libc::ENOSPC => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::EOPNOTSUPP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EINVAL,
    }
}

/// The server's greeting: magics and handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// The header of one option from the client: `IHAVEOPT`, option, length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option number.
    pub option: u32,
    /// The length of its data.
    pub len: u32,
}

/// Parses an option header; `None` for a wrong magic.
pub fn parse_option_header(b: &[u8; 16]) -> Option<OptionHeader> {
    if u64::from_be_bytes(b[..8].try_into().ok()?) != IHAVEOPT {
        return None;
    }
    Some(OptionHeader {
        option: u32::from_be_bytes(b[8..12].try_into().ok()?),
        len: u32::from_be_bytes(b[12..16].try_into().ok()?),
    })
}

/// An option reply: header and data.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A cursor over option data that fails (`None`) instead of reading past the end.
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Cursor<'a> {
        Cursor { data }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.data.len() {
            return None;
        }
        let (a, b) = self.data.split_at(n);
        self.data = b;
        Some(a)
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.bytes(2)?.try_into().ok()?))
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.bytes(4)?.try_into().ok()?))
    }

    /// A string with a u32 length before it, at most [`MAX_STRING`] bytes of UTF-8
    /// without NUL (the protocol's strings; QEMU's server refuses a NUL too).
    pub fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        let b = self.bytes(n)?;
        if b.contains(&0) {
            return None;
        }
        std::str::from_utf8(b).ok()
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The data of `NBD_OPT_INFO`/`NBD_OPT_GO`: the export name and the info types asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export name.
    pub name: String,
    /// The info types the client asked for.
    pub requests: Vec<u16>,
}

/// Parses `NBD_OPT_INFO`/`NBD_OPT_GO` data; `None` when malformed.
pub fn parse_info_request(data: &[u8]) -> Option<InfoRequest> {
    let mut c = Cursor::new(data);
    let name = c.string()?.to_string();
    let n = c.u16()?;
    let mut requests = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        requests.push(c.u16()?);
    }
    c.is_empty().then_some(InfoRequest { name, requests })
}

/// The data of `NBD_OPT_LIST_META_CONTEXT`/`SET_META_CONTEXT`.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest {
    /// The export name.
    pub name: String,
    /// The queries (empty: all contexts, for LIST).
    pub queries: Vec<String>,
}

/// Parses meta context option data; `None` when malformed (also more than 256 queries).
/// A query longer than a protocol string is skipped, as QEMU's server skips it (no
/// context has such a name).
pub fn parse_meta_request(data: &[u8]) -> Option<MetaRequest> {
    let mut c = Cursor::new(data);
    let name = c.string()?.to_string();
    let n = c.u32()?;
    if n > 256 {
        return None;
    }
    let mut queries = Vec::new();
    for _ in 0..n {
        let mut peek = Cursor { data: c.data };
        let len = peek.u32()? as usize;
        if len > MAX_STRING {
            peek.bytes(len)?;
            c = peek;
            continue;
        }
        queries.push(c.string()?.to_string());
    }
    c.is_empty().then_some(MetaRequest { name, queries })
}

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    for v in [min, preferred, max] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`: a text.
pub fn info_text(kind: u16, text: &str) -> Vec<u8> {
    let mut b = kind.to_be_bytes().to_vec();
    b.extend_from_slice(text.as_bytes());
    b
}

/// `NBD_REP_SERVER`: one export of a list.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

/// `NBD_REP_META_CONTEXT`: a context id and its name.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_is_newstyle_with_no_zeroes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
    }

    #[test]
    fn option_headers_need_the_magic() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(b"IHAVEOPT");
        b[8..12].copy_from_slice(&7u32.to_be_bytes());
        b[12..].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&b),
            Some(OptionHeader { option: 7, len: 9 })
        );
        b[0] = b'X';
        assert_eq!(parse_option_header(&b), None);
    }

    fn info_data(name: &[u8], declared: u32, reqs: &[u16]) -> Vec<u8> {
        let mut d = declared.to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn info_requests_parse_and_hostile_ones_fail() {
        let d = info_data(b"vda", 3, &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            parse_info_request(&d),
            Some(InfoRequest {
                name: "vda".into(),
                requests: vec![3, 1]
            })
        );
        // name length past the end, over the limit, trailing bytes, truncated, not UTF-8
        assert_eq!(parse_info_request(&info_data(b"vda", 300, &[])), None);
        assert_eq!(parse_info_request(&info_data(b"vda", u32::MAX, &[])), None);
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_info_request(&long), None);
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        assert_eq!(parse_info_request(&info_data(&[0xff], 1, &[])), None);
        assert_eq!(parse_info_request(&[]), None);
        let huge = vec![b'a'; MAX_STRING + 1];
        assert_eq!(
            parse_info_request(&info_data(&huge, huge.len() as u32, &[])),
            None
        );
        // a count of info requests larger than the data
        let mut d = info_data(b"x", 1, &[]);
        let n = d.len();
        d[n - 2..].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(parse_info_request(&d), None);
    }

    #[test]
    fn meta_requests_parse_and_hostile_ones_fail() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vda");
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let m = parse_meta_request(&d).unwrap();
        assert_eq!(m.name, "vda");
        assert_eq!(m.queries, ["base:allocation", "qemu:dirty-bitmap:"]);
        assert_eq!(parse_meta_request(&d[..d.len() - 3]), None);
        // a NUL in a query: malformed; a query over 4096 bytes: skipped
        let q = |query: &[u8]| {
            let mut d = 3u32.to_be_bytes().to_vec();
            d.extend_from_slice(b"vda");
            d.extend_from_slice(&2u32.to_be_bytes());
            d.extend_from_slice(&(query.len() as u32).to_be_bytes());
            d.extend_from_slice(query);
            d.extend_from_slice(&4u32.to_be_bytes());
            d.extend_from_slice(b"base");
            parse_meta_request(&d)
        };
        assert_eq!(q(b"a\0b"), None);
        assert_eq!(q(&vec![b'x'; MAX_STRING + 1]).unwrap().queries, ["base"]);
        // a huge query count is refused before any allocation
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&d), None);
    }

    #[test]
    fn errnos_map_as_in_qemu() {
        assert_eq!(wire_errno(libc::EACCES), EINVAL);
        assert_eq!(wire_errno(libc::EROFS), EPERM);
        assert_eq!(wire_errno(libc::EPERM), EPERM);
        assert_eq!(wire_errno(libc::ESTALE), EINVAL);
        assert_eq!(wire_errno(libc::ESHUTDOWN), ESHUTDOWN);
        assert_eq!(wire_errno(libc::EIO), EIO);
        assert_eq!(wire_errno(libc::ENOSPC), ENOSPC);
    }
}

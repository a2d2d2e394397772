//! Negotiations against a scripted client: what the server answers, and hostile input.

use super::*;
use crate::nbd::proto::*;
use crate::nbd::transmit::Mode;

/// A link whose input is a script and whose output is recorded.
struct Script {
    input: std::io::Cursor<Vec<u8>>,
    output: Vec<u8>,
    tls_offered: bool,
    tls_required: bool,
    tls: bool,
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Link for Script {
    fn tls_offered(&self) -> bool {
        self.tls_offered
    }
    fn tls_required(&self) -> bool {
        self.tls_required
    }
    fn is_tls(&self) -> bool {
        self.tls
    }
    fn start_tls(&mut self) -> io::Result<()> {
        self.tls = true;
        Ok(())
    }
}

struct Fixed(Vec<ExportInfo>);

impl Catalog for Fixed {
    fn list(&self) -> Vec<ExportInfo> {
        self.0.clone()
    }
}

fn catalog() -> Fixed {
    Fixed(vec![ExportInfo {
        name: "vda".into(),
        size: 1 << 20,
        cluster: 65536,
        bitmap: Some("b1".into()),
        access: 1,
    }])
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn info(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

fn meta(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Negotiates with a client that sends `flags`, then `options`, on a link with TLS
/// `tls` (offered, required): the outcome, and every byte the server sent.
fn negotiate_script(
    flags: u32,
    options: &[Vec<u8>],
    tls: (bool, bool),
) -> (Result<Negotiated, Refused>, Vec<u8>) {
    let mut input = flags.to_be_bytes().to_vec();
    for o in options {
        input.extend_from_slice(o);
    }
    let mut s = Script {
        input: std::io::Cursor::new(input),
        output: Vec::new(),
        tls_offered: tls.0,
        tls_required: tls.1,
        tls: false,
    };
    let r = negotiate(&mut s, &catalog());
    (r, s.output)
}

fn run(
    flags: u32,
    options: &[Vec<u8>],
    tls: (bool, bool),
) -> (Result<Negotiated, Refused>, Vec<OptReply>) {
    let (r, output) = negotiate_script(flags, options, tls);
    assert_eq!(&output[..18], &greeting());
    // Parse the option replies that follow.
    let mut replies = Vec::new();
    let mut rest = &output[18..];
    while rest.len() >= 20 && rest[..8] == REPLY_MAGIC.to_be_bytes() {
        let opt = u32::from_be_bytes(rest[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(rest[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
        replies.push((opt, kind, rest[20..20 + len].to_vec()));
        rest = &rest[20 + len..];
    }
    (r, replies)
}

/// An option reply: option, reply type, data.
type OptReply = (u32, u32, Vec<u8>);

const FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

#[test]
fn go_with_structured_replies_and_both_contexts() {
    let (r, replies) = run(
        FLAGS,
        &[
            option(OPT_STRUCTURED_REPLY, &[]),
            option(
                OPT_SET_META_CONTEXT,
                &meta("vda", &["base:allocation", "qemu:dirty-bitmap:b1"]),
            ),
            option(OPT_GO, &info("vda", &[INFO_BLOCK_SIZE])),
        ],
        (false, false),
    );
    let n = r.unwrap();
    assert_eq!(n.mode, Mode::Structured);
    assert_eq!(n.contexts, [CONTEXT_ALLOCATION, CONTEXT_DIRTY]);
    assert_eq!(n.export.name, "vda");
    let kinds: Vec<u32> = replies.iter().map(|r| r.1).collect();
    assert_eq!(
        kinds,
        [
            REP_ACK,
            REP_META_CONTEXT,
            REP_META_CONTEXT,
            REP_ACK,
            REP_INFO,
            REP_INFO,
            REP_ACK
        ]
    );
    assert_eq!(&replies[2].2[4..], b"qemu:dirty-bitmap:b1");
    // NBD_INFO_EXPORT: size and flags, multi-conn and trim, not read-only
    let e = &replies[4].2;
    assert_eq!(u64::from_be_bytes(e[2..10].try_into().unwrap()), 1 << 20);
    let flags = u16::from_be_bytes(e[10..12].try_into().unwrap());
    assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
    assert_ne!(flags & FLAG_SEND_TRIM, 0);
    assert_ne!(flags & FLAG_SEND_DF, 0);
    assert_eq!(flags & FLAG_READ_ONLY, 0);
    // block sizes 1, cluster, 32 MiB
    let b = &replies[5].2;
    assert_eq!(&b[2..6], &1u32.to_be_bytes());
    assert_eq!(&b[6..10], &65536u32.to_be_bytes());
    assert_eq!(&b[10..14], &(32u32 << 20).to_be_bytes());
}

#[test]
fn unknown_export_unknown_option_and_list() {
    let (r, replies) = run(
        FLAGS,
        &[
            option(OPT_LIST, &[]),
            option(99, b"junk"),
            option(OPT_GO, &info("nope", &[])),
            option(OPT_LIST_META_CONTEXT, &meta("vda", &[])),
            option(OPT_LIST_META_CONTEXT, &meta("vda", &["qemu:"])),
            option(OPT_ABORT, &[]),
        ],
        (false, false),
    );
    assert!(matches!(r, Err(Refused::Left)));
    let kinds: Vec<(u32, u32)> = replies.iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(
        kinds,
        [
            (OPT_LIST, REP_SERVER),
            (OPT_LIST, REP_ACK),
            (99, REP_ERR_UNSUP),
            (OPT_GO, REP_ERR_UNKNOWN),
            (OPT_LIST_META_CONTEXT, REP_META_CONTEXT),
            (OPT_LIST_META_CONTEXT, REP_META_CONTEXT),
            (OPT_LIST_META_CONTEXT, REP_ACK),
            (OPT_LIST_META_CONTEXT, REP_META_CONTEXT),
            (OPT_LIST_META_CONTEXT, REP_ACK),
            (OPT_ABORT, REP_ACK),
        ]
    );
    assert_eq!(&replies[0].2[4..], b"vda");
    assert_eq!(&replies[7].2[4..], b"qemu:dirty-bitmap:b1");
}

#[test]
fn set_meta_context_needs_structured_replies() {
    let (r, replies) = run(
        FLAGS,
        &[
            option(OPT_SET_META_CONTEXT, &meta("vda", &["base:allocation"])),
            option(OPT_GO, &info("vda", &[])),
        ],
        (false, false),
    );
    assert_eq!(replies[0].1, REP_ERR_INVALID);
    let n = r.unwrap();
    assert_eq!(n.mode, Mode::Simple);
    assert!(n.contexts.is_empty());
}

#[test]
fn a_client_that_closes_mid_negotiation_has_left() {
    let (r, _) = run(
        FLAGS,
        &[
            option(OPT_STRUCTURED_REPLY, &[]),
            option(OPT_SET_META_CONTEXT, &meta("vda", &["base:allocation"])),
        ],
        (false, false),
    );
    // the client closed after two options: it left
    assert!(matches!(r, Err(Refused::Left)));
}

#[test]
fn tls_required_refuses_everything_but_starttls() {
    let (r, replies) = run(
        FLAGS,
        &[
            option(OPT_LIST, &[]),
            option(OPT_GO, &info("vda", &[])),
            option(OPT_STARTTLS, &[]),
            option(OPT_GO, &info("vda", &[])),
        ],
        (true, true),
    );
    assert!(r.is_ok());
    let kinds: Vec<u32> = replies.iter().map(|r| r.1).collect();
    assert_eq!(
        kinds,
        [
            REP_ERR_TLS_REQD,
            REP_ERR_TLS_REQD,
            REP_ACK,
            REP_INFO,
            REP_INFO,
            REP_ACK
        ]
    );
    // EXPORT_NAME before TLS: dropped
    let (r, _) = run(FLAGS, &[option(OPT_EXPORT_NAME, b"vda")], (true, true));
    assert!(matches!(r, Err(Refused::Protocol(_))));
    // STARTTLS without credentials: refused by policy
    let (_, replies) = run(FLAGS, &[option(OPT_STARTTLS, &[])], (false, false));
    assert_eq!(replies[0].1, REP_ERR_POLICY);
}

#[test]
fn hostile_negotiations_end_with_a_refusal() {
    // not fixed newstyle; unknown client flags
    assert!(matches!(
        run(0, &[], (false, false)).0,
        Err(Refused::Protocol(_))
    ));
    assert!(matches!(
        run(0x80, &[], (false, false)).0,
        Err(Refused::Protocol(_))
    ));
    // bad option magic
    let mut bad = option(OPT_LIST, &[]);
    bad[0] = 0;
    assert!(matches!(
        run(FLAGS, &[bad], (false, false)).0,
        Err(Refused::Protocol(_))
    ));
    // an option over the size limit: refused without reading it
    let mut huge = IHAVEOPT.to_be_bytes().to_vec();
    huge.extend_from_slice(&OPT_GO.to_be_bytes());
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    let (r, replies) = run(FLAGS, &[huge], (false, false));
    assert!(matches!(r, Err(Refused::Protocol(_))));
    assert_eq!(replies[0].1, REP_ERR_TOO_BIG);
    // data shorter than its length says: the client left
    let mut short = option(OPT_GO, &info("vda", &[]));
    short.truncate(short.len() - 3);
    assert!(matches!(
        run(FLAGS, &[short], (false, false)).0,
        Err(Refused::Left)
    ));
    // malformed GO data: invalid, and the negotiation goes on
    let (_, replies) = run(
        FLAGS,
        &[option(OPT_GO, &[0, 0, 0, 9, b'v'])],
        (false, false),
    );
    assert_eq!(replies[0].1, REP_ERR_INVALID);
    // endless options: cut at the limit
    let many: Vec<Vec<u8>> = (0..MAX_OPTIONS + 5)
        .map(|_| option(OPT_STRUCTURED_REPLY, &[]))
        .collect();
    assert!(matches!(
        run(FLAGS, &many, (false, false)).0,
        Err(Refused::Protocol(_))
    ));
    // EXPORT_NAME of an unknown export: closed
    assert!(matches!(
        run(FLAGS, &[option(OPT_EXPORT_NAME, b"zz")], (false, false)).0,
        Err(Refused::Protocol(_))
    ));
}

#[test]
fn export_name_without_no_zeroes_pads() {
    let (r, output) = negotiate_script(
        FLAG_C_FIXED_NEWSTYLE,
        &[option(OPT_EXPORT_NAME, b"vda")],
        (false, false),
    );
    assert_eq!(r.unwrap().export.name, "vda");
    assert_eq!(output.len(), 18 + 8 + 2 + 124);
}

#[test]
fn extended_headers_with_or_without_structured_replies() {
    // alone, as QEMU's client asks: then meta contexts and GO
    let (r, replies) = run(
        FLAGS,
        &[
            option(OPT_EXTENDED_HEADERS, &[]),
            option(
                OPT_SET_META_CONTEXT,
                &meta("vda", &["base:allocation", "qemu:dirty-bitmap:b1"]),
            ),
            option(OPT_GO, &info("vda", &[])),
        ],
        (false, false),
    );
    let n = r.unwrap();
    assert_eq!(n.mode, Mode::Extended);
    assert_eq!(n.contexts, [CONTEXT_ALLOCATION, CONTEXT_DIRTY]);
    assert_eq!(replies[0], (OPT_EXTENDED_HEADERS, REP_ACK, Vec::new()));
    // after structured replies; a second one, structured replies after it, data: errors
    // that leave what was negotiated
    let (r, replies) = run(
        FLAGS,
        &[
            option(OPT_STRUCTURED_REPLY, &[]),
            option(OPT_EXTENDED_HEADERS, b"x"),
            option(OPT_EXTENDED_HEADERS, &[]),
            option(OPT_EXTENDED_HEADERS, &[]),
            option(OPT_STRUCTURED_REPLY, &[]),
            option(OPT_GO, &info("vda", &[])),
        ],
        (false, false),
    );
    assert_eq!(r.unwrap().mode, Mode::Extended);
    let kinds: Vec<(u32, u32)> = replies.iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(
        kinds[..5],
        [
            (OPT_STRUCTURED_REPLY, REP_ACK),
            (OPT_EXTENDED_HEADERS, REP_ERR_INVALID),
            (OPT_EXTENDED_HEADERS, REP_ACK),
            (OPT_EXTENDED_HEADERS, REP_ERR_INVALID),
            (OPT_STRUCTURED_REPLY, REP_ERR_EXT_HEADER_REQD),
        ]
    );
    // a second STRUCTURED_REPLY is refused as QEMU refuses it
    let (r, replies) = run(
        FLAGS,
        &[
            option(OPT_STRUCTURED_REPLY, &[]),
            option(OPT_STRUCTURED_REPLY, &[]),
            option(OPT_GO, &info("vda", &[])),
        ],
        (false, false),
    );
    assert_eq!(r.unwrap().mode, Mode::Structured);
    assert_eq!(replies[1].1, REP_ERR_INVALID);
}

#[test]
fn extended_headers_end_export_name_and_need_tls_first() {
    // NBD_OPT_EXPORT_NAME after extended headers: the connection is dropped
    let (r, _) = run(
        FLAGS,
        &[
            option(OPT_EXTENDED_HEADERS, &[]),
            option(OPT_EXPORT_NAME, b"vda"),
        ],
        (false, false),
    );
    assert!(matches!(r, Err(Refused::Protocol(_))));
    // before the required TLS: refused; STARTTLS forgets what came before it
    let (r, replies) = run(
        FLAGS,
        &[
            option(OPT_EXTENDED_HEADERS, &[]),
            option(OPT_STARTTLS, &[]),
            option(OPT_GO, &info("vda", &[])),
        ],
        (true, true),
    );
    assert_eq!(replies[0].1, REP_ERR_TLS_REQD);
    assert_eq!(r.unwrap().mode, Mode::Simple);
    let (r, _) = run(
        FLAGS,
        &[
            option(OPT_STRUCTURED_REPLY, &[]),
            option(OPT_EXTENDED_HEADERS, &[]),
            option(OPT_SET_META_CONTEXT, &meta("vda", &["base:allocation"])),
            option(OPT_STARTTLS, &[]),
            option(OPT_GO, &info("vda", &[])),
        ],
        (true, false),
    );
    let n = r.unwrap();
    assert_eq!(n.mode, Mode::Simple);
    assert!(n.contexts.is_empty());
}

#[test]
fn dont_fragment_only_with_chunked_replies() {
    // simple replies: no SEND_DF (as QEMU), in INFO and after EXPORT_NAME
    let (_, replies) = run(FLAGS, &[option(OPT_GO, &info("vda", &[]))], (false, false));
    let flags = u16::from_be_bytes(replies[0].2[10..12].try_into().unwrap());
    assert_eq!(flags & FLAG_SEND_DF, 0);
    assert_ne!(flags & FLAG_SEND_TRIM, 0);
    let (r, output) = negotiate_script(FLAGS, &[option(OPT_EXPORT_NAME, b"vda")], (false, false));
    r.unwrap();
    let flags = u16::from_be_bytes(output[18 + 8..18 + 10].try_into().unwrap());
    assert_eq!(flags & FLAG_SEND_DF, 0);
    // extended headers: SEND_DF; the payload form of block status only with contexts
    let (_, replies) = run(
        FLAGS,
        &[
            option(OPT_EXTENDED_HEADERS, &[]),
            option(OPT_INFO, &info("vda", &[])),
            option(OPT_SET_META_CONTEXT, &meta("vda", &["base:allocation"])),
            option(OPT_GO, &info("vda", &[])),
        ],
        (false, false),
    );
    let flags: Vec<u16> = replies
        .iter()
        .filter(|r| r.1 == REP_INFO && r.2[..2] == INFO_EXPORT.to_be_bytes())
        .map(|r| u16::from_be_bytes(r.2[10..12].try_into().unwrap()))
        .collect();
    assert_eq!(flags.len(), 2);
    assert_ne!(flags[0] & FLAG_SEND_DF, 0);
    assert_ne!(flags[0] & FLAG_BLOCK_STATUS_PAYLOAD, 0);
    assert_ne!(flags[1] & FLAG_BLOCK_STATUS_PAYLOAD, 0);
    // GO without meta contexts: not offered
    let (_, replies) = run(
        FLAGS,
        &[
            option(OPT_EXTENDED_HEADERS, &[]),
            option(OPT_GO, &info("vda", &[])),
        ],
        (false, false),
    );
    let flags = u16::from_be_bytes(replies[1].2[10..12].try_into().unwrap());
    assert_eq!(flags & FLAG_BLOCK_STATUS_PAYLOAD, 0);
    assert_ne!(flags & FLAG_SEND_DF, 0);
}

#[test]
fn an_unknown_export_is_named_in_at_most_a_short_message() {
    // a name of the longest length accepted, with a control character: the error's
    // message stays a protocol string (at most 4096 bytes), the name cut and escaped
    let name = format!("\u{1b}{}", "x".repeat(MAX_STRING - 1));
    let (r, replies) = run(
        FLAGS,
        &[
            option(OPT_STRUCTURED_REPLY, &[]),
            option(OPT_GO, &info(&name, &[])),
            option(OPT_SET_META_CONTEXT, &meta(&name, &["base:allocation"])),
            option(OPT_ABORT, &[]),
        ],
        (false, false),
    );
    assert!(matches!(r, Err(Refused::Left)));
    for (opt, kind, message) in &replies[1..3] {
        assert_eq!(*kind, REP_ERR_UNKNOWN, "option {opt}");
        let message = std::str::from_utf8(message).unwrap();
        assert!(
            message.len() <= 200,
            "option {opt}: {} bytes",
            message.len()
        );
        assert!(!message.contains('\u{1b}'), "{message}");
        assert!(message.contains("\\u{1b}xxx"), "{message}");
    }
}

#[test]
fn a_namespace_alone_lists_its_contexts_but_selects_none() {
    let (r, replies) = run(
        FLAGS,
        &[
            option(OPT_STRUCTURED_REPLY, &[]),
            option(OPT_LIST_META_CONTEXT, &meta("vda", &["base:", "qemu:"])),
            option(
                OPT_SET_META_CONTEXT,
                &meta("vda", &["base:", "qemu:dirty-bitmap:"]),
            ),
            option(OPT_GO, &info("vda", &[])),
        ],
        (false, false),
    );
    let contexts = |opt| {
        replies
            .iter()
            .filter(|(o, kind, _)| *o == opt && *kind == REP_META_CONTEXT)
            .map(|(_, _, d)| String::from_utf8(d[4..].to_vec()).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        contexts(OPT_LIST_META_CONTEXT),
        ["base:allocation", "qemu:dirty-bitmap:b1"]
    );
    assert!(contexts(OPT_SET_META_CONTEXT).is_empty());
    assert!(r.unwrap().contexts.is_empty());
}

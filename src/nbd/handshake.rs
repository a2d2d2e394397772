//! The fixed newstyle negotiation: greeting, client flags, then options until the
//! client picks an export (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`) or leaves. Where the
//! protocol leaves a choice, this does what QEMU's server does (`nbd/server.c`): an
//! unknown option gets `NBD_REP_ERR_UNSUP`, an unknown export `NBD_REP_ERR_UNKNOWN`,
//! `SET_META_CONTEXT` before `STRUCTURED_REPLY` or `EXTENDED_HEADERS`
//! `NBD_REP_ERR_INVALID`, and while TLS is required every option but `STARTTLS` and
//! `ABORT` `NBD_REP_ERR_TLS_REQD`. `EXTENDED_HEADERS` is accepted with or without
//! structured replies before it (a second one is `NBD_REP_ERR_INVALID`;
//! `STRUCTURED_REPLY` after it `NBD_REP_ERR_EXT_HEADER_REQD`; `EXPORT_NAME` after it
//! ends the connection); `STARTTLS` forgets the headers and contexts negotiated before.
//! Meta contexts belong to the export they were chosen on, as QEMU's belong to its
//! export object: `NBD_OPT_GO` of another export, or of the export of the same name
//! during a later access, starts without any; a `SET_META_CONTEXT` that fails forgets
//! those chosen before.
//! With extended headers and meta contexts, INFO/GO offer the payload form of block
//! status (`NBD_FLAG_BLOCK_STATUS_PAYLOAD`), as QEMU's server does.
//!
//! Bounded: at most [`MAX_OPTIONS`] options, each at most [`proto::MAX_OPTION`] bytes
//! (a larger one is refused and the client dropped); the caller bounds the time.

use std::io::{self, Read, Write};

use crate::nbd::export::{Catalog, ExportInfo, BASE_ALLOCATION, DIRTY_BITMAP_PREFIX};
use crate::nbd::proto;
use crate::nbd::transmit::Mode;

/// Options a client may send before it picks an export.
pub const MAX_OPTIONS: usize = 256;

/// The context id of `base:allocation`.
pub const CONTEXT_ALLOCATION: u32 = 1;
/// The context id of the export's dirty bitmap.
pub const CONTEXT_DIRTY: u32 = 2;

/// A connection the negotiation runs on: a byte stream that may become TLS.
pub trait Link: Read + Write {
    /// Whether `STARTTLS` is offered (TLS credentials are configured).
    fn tls_offered(&self) -> bool;
    /// Whether TLS is required before anything else.
    fn tls_required(&self) -> bool;
    /// Whether the connection is TLS already.
    fn is_tls(&self) -> bool;
    /// Runs the TLS handshake as the server (after `NBD_REP_ACK` to `STARTTLS`).
    fn start_tls(&mut self) -> io::Result<()>;
}

/// What the client picked.
#[derive(Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The export.
    pub export: ExportInfo,
    /// The headers of the transmission phase.
    pub mode: Mode,
    /// The meta contexts selected (ids) for `NBD_CMD_BLOCK_STATUS`.
    pub contexts: Vec<u32>,
}

impl Negotiated {
    /// The end of a negotiation that picked `export`: the meta contexts `set` count if
    /// they were set for this export (of this access).
    fn new(export: ExportInfo, mode: Mode, set: Option<(ExportInfo, Vec<u32>)>) -> Negotiated {
        let contexts = match set {
            Some((e, ids)) if e == export => ids,
            _ => Vec::new(),
        };
        Negotiated {
            export,
            mode,
            contexts,
        }
    }
}

/// How a negotiation ended without an export.
#[derive(Debug)]
pub enum Refused {
    /// The client left (`NBD_OPT_ABORT`, or it closed the connection).
    Left,
    /// The client broke the protocol; the message says how.
    Protocol(String),
    /// The connection failed.
    Io(io::Error),
}

impl From<io::Error> for Refused {
    fn from(e: io::Error) -> Refused {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Refused::Left
        } else {
            Refused::Io(e)
        }
    }
}

/// The transmission flags of every export: trim (discard) and flush, several
/// connections at once, no `READ_ONLY` (a read-only export could not be trimmed:
/// QEMU's backup-access export is writable for the same reason), writes refused.
pub const TRANSMISSION_FLAGS: u16 = proto::FLAG_HAS_FLAGS
    | proto::FLAG_SEND_FLUSH
    | proto::FLAG_SEND_TRIM
    | proto::FLAG_CAN_MULTI_CONN;

/// The transmission flags for a client that negotiated `mode`, as QEMU sets them:
/// `SEND_DF` only with structured replies or extended headers (a simple reply cannot be
/// fragmented anyway), the payload form of block status only with extended headers and
/// `payload_form` (INFO, or GO after meta contexts of this export).
fn transmission_flags(mode: Mode, payload_form: bool) -> u16 {
    let mut flags = TRANSMISSION_FLAGS;
    if mode.chunked() {
        flags |= proto::FLAG_SEND_DF;
    }
    if mode == Mode::Extended && payload_form {
        flags |= proto::FLAG_BLOCK_STATUS_PAYLOAD;
    }
    flags
}

/// The meta contexts of `export` that `query` selects, with their ids: `base:allocation`
/// and the bitmap's own name; for LIST also a namespace alone (`base:`, `qemu:`,
/// `qemu:dirty-bitmap:`: its contexts), which SET takes as selecting none, as QEMU's
/// server does. An empty query list (only for LIST) selects all.
fn select_contexts(export: &ExportInfo, queries: &[String], set: bool) -> Vec<(u32, String)> {
    let mut all = vec![(CONTEXT_ALLOCATION, BASE_ALLOCATION.to_string())];
    if let Some(b) = &export.bitmap {
        all.push((CONTEXT_DIRTY, format!("{DIRTY_BITMAP_PREFIX}{b}")));
    }
    if queries.is_empty() {
        return all;
    }
    let mut out: Vec<(u32, String)> = Vec::new();
    for q in queries {
        for (id, name) in &all {
            let hit = match q.as_str() {
                "base:" => !set && *id == CONTEXT_ALLOCATION,
                "qemu:" | "qemu:dirty-bitmap:" => !set && *id == CONTEXT_DIRTY,
                _ => q == name,
            };
            if hit && !out.iter().any(|(i, _)| i == id) {
                out.push((*id, name.clone()));
            }
        }
    }
    out
}

fn reply(link: &mut impl Link, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    link.write_all(&proto::option_reply(option, kind, data))?;
    link.flush()
}

fn error_reply(link: &mut impl Link, option: u32, kind: u32, message: &str) -> io::Result<()> {
    reply(link, option, kind, message.as_bytes())
}

/// The error reply to `option` naming an export `name` the catalog does not have: the
/// name escaped and cut at 80 characters, as QEMU's server does, so that the message stays
/// a protocol string (at most 4096 bytes) whatever the client sent.
fn unknown_export(link: &mut impl Link, option: u32, name: &str) -> io::Result<()> {
    let mut shown: String = name.chars().take(80).collect::<String>();
    shown = shown.escape_debug().to_string();
    if name.chars().nth(80).is_some() {
        shown.push_str("...");
    }
    let message = format!("no export '{shown}' (no backup access, or no such device)");
    error_reply(link, option, proto::REP_ERR_UNKNOWN, &message)
}

/// The answer to NBD_OPT_STRUCTURED_REPLY (`wanted` structured replies) or
/// NBD_OPT_EXTENDED_HEADERS (`wanted` extended headers) with `data`, in `mode`: the new
/// mode, or the error reply's type and message. Extended headers include structured
/// replies, so they may follow them, but not the other way round.
fn requested_mode(mode: Mode, wanted: Mode, data: &[u8]) -> Result<Mode, (u32, &'static str)> {
    if !data.is_empty() {
        return Err((proto::REP_ERR_INVALID, "no data expected"));
    }
    match (mode, wanted) {
        (Mode::Extended, Mode::Structured) => Err((
            proto::REP_ERR_EXT_HEADER_REQD,
            "extended headers already negotiated",
        )),
        (Mode::Extended, _) => Err((
            proto::REP_ERR_INVALID,
            "extended headers already negotiated",
        )),
        (Mode::Structured, Mode::Structured) => Err((
            proto::REP_ERR_INVALID,
            "structured replies already negotiated",
        )),
        _ => Ok(wanted),
    }
}

/// Runs the negotiation on `link` against `catalog`.
pub fn negotiate(link: &mut impl Link, catalog: &dyn Catalog) -> Result<Negotiated, Refused> {
    link.write_all(&proto::greeting())?;
    link.flush()?;
    let mut flags = [0u8; 4];
    link.read_exact(&mut flags)?;
    let flags = u32::from_be_bytes(flags);
    if flags & proto::FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(Refused::Protocol(
            "the client does not speak fixed newstyle".into(),
        ));
    }
    if flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(Refused::Protocol(format!(
            "unknown client flags {flags:#x}"
        )));
    }
    let no_zeroes = flags & proto::FLAG_C_NO_ZEROES != 0;
    let mut mode = Mode::Simple;
    // The meta contexts set, and the export they were set for (its name and access:
    // the export of the same name during another access is another export).
    let mut contexts: Option<(ExportInfo, Vec<u32>)> = None;
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; 16];
        link.read_exact(&mut h)?;
        let h = proto::parse_option_header(&h)
            .ok_or_else(|| Refused::Protocol("bad option magic".into()))?;
        if h.len > proto::MAX_OPTION {
            let _ = error_reply(
                link,
                h.option,
                proto::REP_ERR_TOO_BIG,
                "option data too large",
            );
            return Err(Refused::Protocol(format!(
                "option {} with {} bytes of data",
                h.option, h.len
            )));
        }
        let mut data = vec![0u8; h.len as usize];
        link.read_exact(&mut data)?;
        let tls_pending = link.tls_required() && !link.is_tls();
        match h.option {
            proto::OPT_ABORT => {
                let _ = reply(link, h.option, proto::REP_ACK, &[]);
                return Err(Refused::Left);
            }
            proto::OPT_STARTTLS => {
                if h.len != 0 {
                    error_reply(link, h.option, proto::REP_ERR_INVALID, "no data expected")?;
                } else if link.is_tls() {
                    error_reply(link, h.option, proto::REP_ERR_INVALID, "TLS is already on")?;
                } else if !link.tls_offered() {
                    error_reply(
                        link,
                        h.option,
                        proto::REP_ERR_POLICY,
                        "TLS is not configured for this listener",
                    )?;
                } else {
                    reply(link, h.option, proto::REP_ACK, &[])?;
                    link.start_tls()?;
                    // Everything negotiated in clear text is forgotten.
                    mode = Mode::Simple;
                    contexts = None;
                }
            }
            proto::OPT_EXPORT_NAME if tls_pending => {
                return Err(Refused::Protocol(
                    "NBD_OPT_EXPORT_NAME before the required TLS".into(),
                ));
            }
            _ if tls_pending => {
                error_reply(link, h.option, proto::REP_ERR_TLS_REQD, "TLS is required")?;
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    error_reply(link, h.option, proto::REP_ERR_INVALID, "no data expected")?;
                    continue;
                }
                for e in catalog.list() {
                    reply(
                        link,
                        h.option,
                        proto::REP_SERVER,
                        &proto::rep_server(&e.name),
                    )?;
                }
                reply(link, h.option, proto::REP_ACK, &[])?;
            }
            proto::OPT_STRUCTURED_REPLY | proto::OPT_EXTENDED_HEADERS => {
                let wanted = if h.option == proto::OPT_STRUCTURED_REPLY {
                    Mode::Structured
                } else {
                    Mode::Extended
                };
                match requested_mode(mode, wanted, &data) {
                    Ok(m) => {
                        mode = m;
                        reply(link, h.option, proto::REP_ACK, &[])?;
                    }
                    Err((kind, message)) => error_reply(link, h.option, kind, message)?,
                }
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                let set = h.option == proto::OPT_SET_META_CONTEXT;
                if set && mode.chunked() {
                    // A SET forgets the contexts chosen before, also when it fails.
                    contexts = None;
                }
                let Some(m) = proto::parse_meta_request(&data) else {
                    error_reply(link, h.option, proto::REP_ERR_INVALID, "malformed request")?;
                    continue;
                };
                if set && !mode.chunked() {
                    error_reply(
                        link,
                        h.option,
                        proto::REP_ERR_INVALID,
                        "NBD_OPT_SET_META_CONTEXT needs structured replies or extended \
                         headers first",
                    )?;
                    continue;
                }
                let Some(export) = catalog.find(&m.name) else {
                    unknown_export(link, h.option, &m.name)?;
                    continue;
                };
                // SET with no queries selects nothing; LIST with none lists all.
                let selected = if set && m.queries.is_empty() {
                    Vec::new()
                } else {
                    select_contexts(&export, &m.queries, set)
                };
                for (id, name) in &selected {
                    reply(
                        link,
                        h.option,
                        proto::REP_META_CONTEXT,
                        &proto::rep_meta_context(if set { *id } else { 0 }, name),
                    )?;
                }
                if set {
                    contexts = Some((export, selected.iter().map(|(id, _)| *id).collect()));
                }
                reply(link, h.option, proto::REP_ACK, &[])?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let Some(r) = proto::parse_info_request(&data) else {
                    error_reply(link, h.option, proto::REP_ERR_INVALID, "malformed request")?;
                    continue;
                };
                let Some(export) = catalog.find(&r.name) else {
                    unknown_export(link, h.option, &r.name)?;
                    continue;
                };
                // INFO always offers it, GO with meta contexts of this export (as QEMU)
                let payload_form = h.option == proto::OPT_INFO
                    || contexts
                        .as_ref()
                        .is_some_and(|(e, ids)| *e == export && !ids.is_empty());
                let flags = transmission_flags(mode, payload_form);
                send_info(link, h.option, &export, flags, &r.requests)?;
                reply(link, h.option, proto::REP_ACK, &[])?;
                if h.option == proto::OPT_GO {
                    return Ok(Negotiated::new(export, mode, contexts));
                }
            }
            proto::OPT_EXPORT_NAME if mode == Mode::Extended => {
                // The protocol forbids it after extended headers; no error reply exists.
                return Err(Refused::Protocol(
                    "NBD_OPT_EXPORT_NAME after extended headers".into(),
                ));
            }
            proto::OPT_EXPORT_NAME => {
                let name = std::str::from_utf8(&data).unwrap_or("");
                let Some(export) = catalog
                    .find(name)
                    .filter(|_| data.len() <= proto::MAX_STRING)
                else {
                    // The protocol has no error reply for this option: close.
                    return Err(Refused::Protocol(format!(
                        "NBD_OPT_EXPORT_NAME of an unknown export '{}'",
                        name.escape_debug()
                    )));
                };
                link.write_all(&export.size.to_be_bytes())?;
                link.write_all(&transmission_flags(mode, false).to_be_bytes())?;
                if !no_zeroes {
                    link.write_all(&[0u8; 124])?;
                }
                link.flush()?;
                return Ok(Negotiated::new(export, mode, contexts));
            }
            other => {
                error_reply(
                    link,
                    other,
                    proto::REP_ERR_UNSUP,
                    &format!("option {other} is not supported"),
                )?;
            }
        }
    }
    Err(Refused::Protocol(format!(
        "more than {MAX_OPTIONS} options without choosing an export"
    )))
}

/// The `NBD_REP_INFO` replies of INFO/GO: always the size and `flags` and the block
/// sizes (minimum 1, preferred the cluster size, maximum 32 MiB); name and description
/// when asked for.
fn send_info(
    link: &mut impl Link,
    option: u32,
    e: &ExportInfo,
    flags: u16,
    asked: &[u16],
) -> io::Result<()> {
    reply(
        link,
        option,
        proto::REP_INFO,
        &proto::info_export(e.size, flags),
    )?;
    let preferred = e.cluster.clamp(1, proto::MAX_REQUEST);
    reply(
        link,
        option,
        proto::REP_INFO,
        &proto::info_block_size(1, preferred, proto::MAX_REQUEST),
    )?;
    if asked.contains(&proto::INFO_NAME) {
        reply(
            link,
            option,
            proto::REP_INFO,
            &proto::info_text(proto::INFO_NAME, &e.name),
        )?;
    }
    if asked.contains(&proto::INFO_DESCRIPTION) {
        let text = "fleecefs snapshot of a backup access";
        reply(
            link,
            option,
            proto::REP_INFO,
            &proto::info_text(proto::INFO_DESCRIPTION, text),
        )?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;

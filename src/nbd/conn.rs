//! The transmission phase of one connection: requests in order, one at a time, each
//! answered before the next is read (so a connection holds at most one request's
//! buffer). Several connections read in parallel (`NBD_FLAG_CAN_MULTI_CONN`).
//!
//! Reads run where the mount's backup scheduler (`src/sched/`) puts backup reads: on its
//! pool with `--backup-priority low`, else on this thread, as FUSE's snapshot reads do.
//! The connection thread waits for the read, then sends the reply in one vectored
//! write (headers and data together).
//!
//! Requests and replies take the form the negotiation chose (`transmit::Mode`): with
//! extended headers, lengths are 64 bits. Reads stay at most 32 MiB; trims and block
//! status take any length inside the export. Every request is checked as QEMU's server
//! checks it, before any work: a payload (a write's data, or any request flagged
//! `NBD_CMD_FLAG_PAYLOAD_LEN`) over 32 MiB gets EINVAL and ends the connection (it
//! cannot be skipped); block status reads its payload form (an effect length and the
//! contexts to describe); any other payload is read and dropped and the request fails
//! (EINVAL, EPERM for a write); a range past the end or whose end overflows, unknown
//! flags, or a read over 32 MiB get EINVAL and the connection goes on.
//!
//! The connection ends cleanly when the client sends `NBD_CMD_DISC` or closes, when
//! its export's access ends (checked while it waits for a request, and before every
//! request, whatever it asks: ESHUTDOWN), or when the server stops; a request header with the wrong
//! magic (also a compact one after extended headers) ends it at once. A client that
//! stops in the middle of a request for longer than [`STALL`] is dropped; writes to a
//! client that does not read time out the same way (the socket's send timeout).

use std::io::{self, IoSlice, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Kind};
use crate::nbd::export::{wire_errno, Export};
use crate::nbd::handshake::{Negotiated, CONTEXT_ALLOCATION, CONTEXT_DIRTY};
use crate::nbd::proto;
use crate::nbd::transmit::{self, Mode, ReplyTo, Request};
use crate::nbd::Transport;
use crate::sched::BackupScheduler;

/// How often an idle connection checks that its export and the server are still there.
pub const IDLE_CHECK: Duration = Duration::from_millis(500);
/// How long a client may stall in the middle of a request.
pub const STALL: Duration = Duration::from_secs(30);
/// Extents per meta context in one block status reply (QEMU sends up to 128 Ki).
const MAX_EXTENTS: usize = 16384;

/// What a connection shares with the server.
pub struct ConnEnv {
    /// The mount's backup scheduling: where reads run.
    pub sched: Arc<BackupScheduler>,
    /// Set when the server stops.
    pub stop: Arc<AtomicBool>,
    /// Bytes read by this connection (summed per export by `status`).
    pub bytes_read: Arc<AtomicU64>,
}

/// The read buffer: anonymous memory (page-aligned, as direct reads of the source
/// need), grown to the largest request seen, at most [`proto::MAX_REQUEST`].
struct Buf(Option<memmap2::MmapMut>);

impl Buf {
    fn get(&mut self, len: usize) -> io::Result<&mut [u8]> {
        if self.0.as_ref().is_none_or(|m| m.len() < len) {
            self.0 = None;
            self.0 = Some(memmap2::MmapMut::map_anon(len.max(65536))?);
        }
        match self.0.as_mut() {
            Some(m) => Ok(&mut m[..len]),
            None => Err(io::Error::other("no read buffer")),
        }
    }
}

enum Wait {
    /// A request header (its first [`Mode::request_len`] bytes).
    Request([u8; transmit::EXTENDED_REQUEST_LEN]),
    End,
}

/// Reads `buf` whole, retrying read timeouts for at most [`STALL`] in all.
fn read_patiently(link: &mut impl Read, buf: &mut [u8]) -> io::Result<()> {
    let start = Instant::now();
    let mut got = 0;
    while got < buf.len() {
        match link.read(&mut buf[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if is_timeout(&e) && start.elapsed() < STALL => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Waits for the next request header of `len` bytes; `End` when the client closed, or
/// (while no byte of a request has come) the export's access ended or the server stops.
fn next_request(
    link: &mut impl Transport,
    len: usize,
    export: &Export,
    env: &ConnEnv,
) -> io::Result<Wait> {
    let mut h = [0u8; transmit::EXTENDED_REQUEST_LEN];
    loop {
        match link.read(&mut h[..len]) {
            Ok(0) => return Ok(Wait::End),
            Ok(n) => {
                read_patiently(link, &mut h[n..len])?;
                return Ok(Wait::Request(h));
            }
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {
                if env.stop.load(Ordering::Relaxed) || !export.is_current() {
                    return Ok(Wait::End);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Wait::End),
            Err(e) => return Err(e),
        }
    }
}

/// How a request was answered.
enum Outcome {
    /// Go on with the next request.
    Next,
    /// End the connection (after the reply).
    End,
}

/// Serves requests on `link` for the export chosen in `n` until the connection ends.
pub fn serve(
    link: &mut impl Transport,
    n: &Negotiated,
    export: Arc<Export>,
    env: &ConnEnv,
) -> io::Result<()> {
    link.set_read_timeout(Some(IDLE_CHECK))?;
    let mut buf = Buf(None);
    let len = n.mode.request_len();
    loop {
        let h = match next_request(link, len, &export, env)? {
            Wait::Request(h) => h,
            Wait::End => return Ok(()),
        };
        let Some(req) = transmit::parse_request(&h[..len], n.mode) else {
            log::info!(
                "NBD client of export '{}' sent a bad request magic {:#010x} ({}): \
                 disconnected",
                export.name(),
                u32::from_be_bytes([h[0], h[1], h[2], h[3]]),
                n.mode.describe()
            );
            return Ok(());
        };
        match handle(link, n, &export, env, &mut buf, req)? {
            Outcome::Next => {}
            Outcome::End => return Ok(()),
        }
    }
}

fn einval(message: String) -> Error {
    Error::new(Kind::Invalid, message)
}

/// The flags each command accepts (QEMU's `valid_flags`): FUA everywhere, DF on reads
/// with chunked replies, REQ_ONE on block status, PAYLOAD_LEN on writes and block status
/// with extended headers.
fn allowed_flags(kind: u16, mode: Mode) -> u16 {
    let extra = match kind {
        proto::CMD_READ if mode.chunked() => proto::CMD_FLAG_DF,
        proto::CMD_WRITE if mode == Mode::Extended => proto::CMD_FLAG_PAYLOAD_LEN,
        proto::CMD_BLOCK_STATUS if mode == Mode::Extended => {
            proto::CMD_FLAG_REQ_ONE | proto::CMD_FLAG_PAYLOAD_LEN
        }
        proto::CMD_BLOCK_STATUS => proto::CMD_FLAG_REQ_ONE,
        _ => 0,
    };
    proto::CMD_FLAG_FUA | extra
}

/// The refusal of a request by its shape (length, bounds, flags), before any work, in
/// QEMU's order.
fn check_shape(req: &Request, mode: Mode, size: u64) -> Result<(), Error> {
    if req.kind == proto::CMD_READ && req.len > u64::from(proto::MAX_REQUEST) {
        return Err(einval(format!(
            "read of {} bytes is over the 32 MiB limit",
            req.len
        )));
    }
    if !req.within(size) {
        return Err(einval(format!(
            "request {}+{} is past the end of the export ({size} bytes)",
            req.offset, req.len
        )));
    }
    if req.flags & !allowed_flags(req.kind, mode) != 0 {
        return Err(einval(format!(
            "unsupported flags {:#x} for command {}",
            req.flags, req.kind
        )));
    }
    Ok(())
}

fn handle(
    link: &mut impl Transport,
    n: &Negotiated,
    export: &Arc<Export>,
    env: &ConnEnv,
    buf: &mut Buf,
    req: Request,
) -> io::Result<Outcome> {
    let to = ReplyTo::new(n.mode, &req);
    if req.kind == proto::CMD_DISC {
        return Ok(Outcome::End);
    }
    // Once the access has ended, every request ends the connection, also those that do
    // not touch the snapshot (a flush, a refused request): a client that keeps sending
    // them is never idle long enough for `next_request` to notice.
    if let Err(e) = export.check() {
        return send_error(link, &to, &e);
    }
    let payload = req.payload_len(n.mode);
    if payload > u64::from(proto::MAX_REQUEST) {
        // Too large to skip: answer, then end the connection.
        let e = einval(format!(
            "payload of {payload} bytes is over the 32 MiB limit"
        ));
        send_error(link, &to, &e)?;
        return Ok(Outcome::End);
    }
    let mut req = req;
    // The contexts a block status describes: those its payload names, else all.
    let mut picked: Option<Vec<u32>> = None;
    if payload > 0 && req.kind == proto::CMD_BLOCK_STATUS {
        match status_payload(link, n, payload)? {
            Ok((len, ids)) => (req.len, picked) = (len, Some(ids)),
            Err(e) => return send_error(link, &to, &e),
        }
    } else if payload > 0 {
        read_skip(link, payload)?;
        if req.kind != proto::CMD_WRITE {
            // No other command takes a payload here (as QEMU: EINVAL for the flag).
            return send_error(
                link,
                &to,
                &einval(format!(
                    "command {} with a payload of {payload} bytes (NBD_CMD_FLAG_PAYLOAD_LEN)",
                    req.kind
                )),
            );
        }
    }
    let size = export.size();
    match req.kind {
        proto::CMD_WRITE | proto::CMD_WRITE_ZEROES => send_error(
            link,
            &to,
            &Error::new(
                Kind::NotPermitted,
                "the export of a snapshot cannot be written",
            ),
        ),
        proto::CMD_READ => match check_shape(&req, n.mode, size) {
            Err(e) => send_error(link, &to, &e),
            Ok(()) => read(link, n, export, env, buf, req),
        },
        // Nothing to flush; checked as any request (FUA allowed, a range inside the
        // export ignored), as QEMU's server does.
        proto::CMD_FLUSH => match check_shape(&req, n.mode, size) {
            Err(e) => send_error(link, &to, &e),
            Ok(()) => send_ok(link, &to),
        },
        proto::CMD_TRIM => {
            if let Err(e) = check_shape(&req, n.mode, size) {
                return send_error(link, &to, &e);
            }
            match export.trim(req.offset, req.len) {
                Ok(()) => send_ok(link, &to),
                Err(e) => send_error(link, &to, &e),
            }
        }
        proto::CMD_BLOCK_STATUS => {
            let contexts = picked.as_deref().unwrap_or(&n.contexts);
            if let Err(e) = check_shape(&req, n.mode, size) {
                return send_error(link, &to, &e);
            }
            if !n.mode.chunked() || contexts.is_empty() {
                return send_error(
                    link,
                    &to,
                    &einval("block status without a meta context".into()),
                );
            }
            if req.len == 0 {
                return send_error(link, &to, &einval("block status of length 0".into()));
            }
            block_status(link, n, export, req, contexts)
        }
        other => send_error(
            link,
            &to,
            &einval(format!("command {other} is not supported")),
        ),
    }
}

fn read_skip(link: &mut impl Transport, mut n: u64) -> io::Result<()> {
    let mut b = [0u8; 65536];
    while n > 0 {
        let k = n.min(b.len() as u64) as usize;
        read_patiently(link, &mut b[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// A successful reply without data.
fn send_ok(link: &mut impl Transport, to: &ReplyTo) -> io::Result<Outcome> {
    link.write_all(&to.done())?;
    link.flush()?;
    Ok(Outcome::Next)
}

/// A failed request: the errno QEMU would send, with the message in a structured or
/// extended reply. An access that ended also ends the connection.
fn send_error(link: &mut impl Transport, to: &ReplyTo, e: &Error) -> io::Result<Outcome> {
    let errno = wire_errno(e);
    log::debug!("NBD request failed: {}", crate::error::report(e));
    link.write_all(&to.error(errno, &crate::error::report(e)))?;
    link.flush()?;
    Ok(if e.kind() == Kind::Stale {
        Outcome::End
    } else {
        Outcome::Next
    })
}

type ReadResult = Result<Vec<(u64, u64, bool)>, Error>;

/// The read itself, and its data/hole segments for a structured reply. The range is
/// mapped before it is read: a trim (from another connection) after the read would make
/// what was just read a hole, sent as zeroes; mapped first, a trim of a data segment
/// fails the read instead, and a hole of the snapshot (zeroes at setup, or unreadable:
/// then the read fails) stays one.
fn read_and_map(export: &Export, buf: &mut [u8], req: Request, sparse: bool) -> ReadResult {
    let segments = if sparse {
        export.segments(req.offset, req.len)?
    } else {
        vec![(req.offset, req.offset + req.len, true)]
    };
    export.read(req.offset, buf)?;
    Ok(segments)
}

fn read(
    link: &mut impl Transport,
    n: &Negotiated,
    export: &Arc<Export>,
    env: &ConnEnv,
    buf: &mut Buf,
    req: Request,
) -> io::Result<Outcome> {
    // At most 32 MiB (checked by `check_shape`).
    let len = req.len as usize;
    let to = ReplyTo::new(n.mode, &req);
    let sparse = n.mode.chunked() && req.flags & proto::CMD_FLAG_DF == 0;
    let result = match &env.sched {
        // A pool: the read runs there, below the guest (`--backup-priority low`).
        sched if sched.pooled() && len > 0 => {
            // The read runs on the backup pool; its buffer goes there and back.
            let mut owned = std::mem::replace(buf, Buf(None));
            owned.get(len)?;
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let export = export.clone();
            sched.run_backup_read(move || {
                let r = match owned.0.as_mut() {
                    Some(m) => read_and_map(&export, &mut m[..len], req, sparse),
                    None => Err(Error::new(Kind::Io, "no read buffer")),
                };
                let _ = tx.send((owned, r));
            });
            let (back, r) = rx
                .recv()
                .map_err(|_| io::Error::other("backup pool dropped a read"))?;
            *buf = back;
            r
        }
        _ => {
            let b = buf.get(len)?;
            read_and_map(export, b, req, sparse)
        }
    };
    let segments = match result {
        Ok(s) => s,
        Err(e) => return send_error(link, &to, &e),
    };
    env.bytes_read.fetch_add(req.len, Ordering::Relaxed);
    let data = buf.get(len)?;
    // The whole reply in one vectored write: headers and data leave in one system call
    // and reach the client together (it wakes once per reply, not once per chunk).
    if !n.mode.chunked() {
        let header = to.simple(0);
        write_all_vectored(link, &mut [IoSlice::new(&header), IoSlice::new(data)])?;
        link.flush()?;
        return Ok(Outcome::Next);
    }
    if segments.is_empty() {
        return send_ok(link, &to);
    }
    let last = segments.len() - 1;
    let headers: Vec<transmit::Header> = segments
        .iter()
        .enumerate()
        .map(|(i, &(start, end, is_data))| {
            let flags = if i == last { proto::REPLY_FLAG_DONE } else { 0 };
            let seg_len = (end - start) as u32;
            if is_data {
                to.data(flags, start, seg_len)
            } else {
                to.hole(flags, start, seg_len)
            }
        })
        .collect();
    let mut slices = Vec::with_capacity(2 * headers.len());
    for (h, &(start, end, is_data)) in headers.iter().zip(&segments) {
        slices.push(IoSlice::new(h));
        if is_data {
            let from = (start - req.offset) as usize;
            slices.push(IoSlice::new(&data[from..(end - req.offset) as usize]));
        }
    }
    write_all_vectored(link, &mut slices)?;
    link.flush()?;
    Ok(Outcome::Next)
}

/// The payload form of block status (extended headers, `NBD_FLAG_BLOCK_STATUS_PAYLOAD`):
/// an effect length, then the ids of the contexts to describe, each negotiated and
/// named once; the ids come back in the negotiated order. Anything else is read,
/// dropped and refused (EINVAL), as QEMU does.
fn status_payload(
    link: &mut impl Transport,
    n: &Negotiated,
    payload: u64,
) -> io::Result<Result<(u64, Vec<u32>), Error>> {
    let most = 8 + 4 * n.contexts.len() as u64;
    if payload % 4 != 0 || payload < 8 || payload > most {
        read_skip(link, payload)?;
        return Ok(Err(einval(format!(
            "block status payload of {payload} bytes: expected an effect length and at \
             most {} context ids",
            n.contexts.len()
        ))));
    }
    // At most 8 bytes and 4 per negotiated context.
    let mut b = vec![0u8; payload as usize];
    read_patiently(link, &mut b)?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&b[..8]);
    let mut ids: Vec<u32> = Vec::new();
    for c in b[8..].chunks_exact(4) {
        let id = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        if !n.contexts.contains(&id) || ids.contains(&id) {
            return Ok(Err(einval(format!(
                "block status payload: context id {id} is not negotiated or named twice"
            ))));
        }
        ids.push(id);
    }
    if ids.is_empty() {
        return Ok(Err(einval("block status payload names no context".into())));
    }
    let ids = n.contexts.iter().copied().filter(|i| ids.contains(i));
    Ok(Ok((u64::from_be_bytes(len), ids.collect())))
}

/// Writes every byte of `slices`, as few system calls as the socket takes (std's
/// `write_all_vectored` is not stable yet).
fn write_all_vectored(link: &mut impl Transport, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match link.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One status chunk per context of `contexts`, 64-bit with extended headers; with
/// `NBD_CMD_FLAG_REQ_ONE` one extent each, never past the request's end.
fn block_status(
    link: &mut impl Transport,
    n: &Negotiated,
    export: &Export,
    req: Request,
    contexts: &[u32],
) -> io::Result<Outcome> {
    let to = ReplyTo::new(n.mode, &req);
    let max = if req.flags & proto::CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_EXTENTS
    };
    let mut chunks = Vec::new();
    for &id in contexts {
        let extents = match id {
            CONTEXT_ALLOCATION => export.allocation(req.offset, req.len, max),
            CONTEXT_DIRTY => export.dirty(req.offset, req.len, max),
            _ => continue,
        };
        match extents {
            Ok(e) => chunks.push((id, e)),
            Err(e) => return send_error(link, &to, &e),
        }
    }
    let last = chunks.len().saturating_sub(1);
    for (i, (id, extents)) in chunks.iter().enumerate() {
        let flags = if i == last { proto::REPLY_FLAG_DONE } else { 0 };
        link.write_all(&to.block_status(flags, *id, extents))?;
    }
    link.flush()?;
    Ok(Outcome::Next)
}

//! Serves the control socket: one thread accepts, one short-lived thread per connection
//! (at most [`MAX_CLIENTS`] at once). A client that sends garbage, too much, nothing, or
//! disconnects mid-request gets an error reply or is dropped, with one log line; the
//! daemon keeps serving.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::proto::{parse_request, Request, Response, ACK, MAX_REQUEST};
use crate::engine::{Engine, SizeRequest};
use crate::error::{report, Error};
use crate::keeper::{KeeperStatus, Worker};
use crate::layout::MountLayout;
use crate::sys;

/// Most connections handled at once.
pub const MAX_CLIENTS: usize = 16;
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Adds a frontend's part to the `status` reply (the NBD server's listeners and exports).
pub type StatusExtra = Box<dyn Fn(&mut serde_json::Value) + Send + Sync>;

/// Runs a request against the engine. `handle` sends teardowns to
/// [`Engine::teardown_reply`] instead, which must know whether the reply arrived.
fn dispatch(
    engine: &Engine,
    layout: &MountLayout,
    worker: &Worker,
    extra: Option<&StatusExtra>,
    req: Request,
) -> Response {
    let result: Result<serde_json::Value, Error> = match req {
        Request::Setup {
            target,
            devices,
            bitmap,
        } => engine
            .setup(&target, devices.as_deref(), bitmap.as_deref())
            .map(|r| serde_json::to_value(r.at_mount(layout)).unwrap_or_default()),
        // Not reached from `handle` (see above); kept so the match stays exhaustive.
        Request::Teardown {
            target, success, ..
        } => engine
            .teardown(&target, success)
            .map(|r| serde_json::to_value(r).unwrap_or_default()),
        Request::Status {} => {
            let mut v = serde_json::to_value(engine.status().at_mount(layout)).unwrap_or_default();
            add_keeper_status(&mut v, &worker.status());
            crate::vhost_user::add_status(&mut v);
            if let Some(add) = extra {
                add(&mut v);
            }
            Ok(v)
        }
        // Not reached from `handle` either: it exits the process after the reply.
        Request::Restart { .. } => Err(Error::invalid("restart is handled by the connection")),
        Request::BitmapRemove { target } => engine
            .remove_bitmaps(&target)
            .map(|r| serde_json::to_value(r).unwrap_or_default()),
        Request::Resize {
            device,
            size,
            grow_by,
            allow_shrink,
        } => {
            let want = match (size, grow_by) {
                (Some(_), Some(_)) => Err(Error::invalid("give a size or a growth, not both")),
                (Some(n), None) => Ok(SizeRequest::Absolute(n)),
                (None, Some(d)) => Ok(SizeRequest::Grow(d)),
                (None, None) => Ok(SizeRequest::Current),
            };
            want.and_then(|w| engine.resize(&device, w, allow_shrink))
                .inspect(|_| crate::vhost_user::size_changed(&device))
                .map(|r| serde_json::to_value(r).unwrap_or_default())
        }
        Request::DeviceAdd {
            devices,
            vhost_user_blk,
        } => {
            let specs: Vec<(String, std::path::PathBuf)> = devices
                .into_iter()
                .map(|(n, p)| (n, std::path::PathBuf::from(p)))
                .collect();
            crate::vhost_user::add_devices(&specs, &vhost_user_blk)
                .map(|r| serde_json::to_value(r).unwrap_or_default())
        }
        // The device's vhost-user-blk exports end first.
        Request::DeviceRemove { device } => {
            crate::vhost_user::remove_device(engine, &device).map(|r| {
                // The keeper lets go of the source too (its lock with it).
                worker.device_removed(&device);
                serde_json::to_value(r).unwrap_or_default()
            })
        }
    };
    response(result)
}

/// Writes the reply; whether it reached the client's socket.
fn reply(stream: &mut UnixStream, resp: &Response) -> bool {
    let mut line = serde_json::to_vec(resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    match stream.write_all(&line).and_then(|_| stream.flush()) {
        Ok(()) => true,
        Err(e) => {
            log::info!("control client went away before the reply: {e}");
            false
        }
    }
}

/// Writes a teardown's reply and says whether the client has it. With `ack`, that is
/// when the client's [`ACK`] line arrives (within the read timeout). Without, it is when
/// the reply is written, and the write side is then shut at once, so that a client
/// reading to the end has the whole reply before the daemon applies a success.
fn teardown_delivered(stream: &mut UnixStream, resp: &Response, ack: bool) -> bool {
    if !reply(stream, resp) {
        return false;
    }
    if !ack {
        let _ = stream.shutdown(std::net::Shutdown::Write);
        return true;
    }
    let got = read_line_within(stream, ACK.len() + 1, READ_TIMEOUT);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    match got {
        Ok(line) if line.trim_ascii() == ACK.as_bytes() => true,
        Ok(_) => {
            log::info!("control client did not acknowledge the teardown reply");
            false
        }
        Err(e) => {
            log::info!("control client did not acknowledge the teardown reply: {e}");
            false
        }
    }
}

/// Reads one line from `stream`: at most `limit` bytes and its newline (one byte more
/// says the line is too long), all within `timeout` from now. The time limit is for the
/// whole line, not for each read, so a client that sends a byte now and then cannot hold
/// its slot (one of [`MAX_CLIENTS`]) for longer than that. Ends early at end of file.
fn read_line_within(stream: &UnixStream, limit: usize, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let late = || {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no complete line within {} s ({} bytes received)",
                    timeout.as_secs(),
                    line.len()
                ),
            )
        };
        if left.is_zero() {
            return Err(late());
        }
        stream.set_read_timeout(Some(left))?;
        let want = (limit + 1 - line.len()).min(buf.len());
        let n = match (&*stream).read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(late())
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(line);
        }
        if let Some(i) = buf[..n].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..=i]);
            return Ok(line);
        }
        line.extend_from_slice(&buf[..n]);
        if line.len() > limit {
            return Ok(line);
        }
    }
}

/// Adds the keeper fields to a `status` reply; `pid` stays the daemon's: the keeper, the
/// process that mounted and holds the lock.
fn add_keeper_status(v: &mut serde_json::Value, k: &KeeperStatus) {
    let Some(obj) = v.as_object_mut() else { return };
    obj.insert("pid".into(), serde_json::json!(k.keeper_pid));
    obj.insert("keeper_pid".into(), serde_json::json!(k.keeper_pid));
    obj.insert("worker_pid".into(), serde_json::json!(k.worker_pid));
    obj.insert(
        "worker_restarts".into(),
        serde_json::json!(k.worker_restarts),
    );
    obj.insert("last_restart".into(), serde_json::json!(k.last_restart));
}

fn response<T: serde::Serialize>(result: Result<T, Error>) -> Response {
    match result {
        Ok(data) => Response {
            ok: true,
            error: None,
            data: Some(serde_json::to_value(data).unwrap_or_default()),
        },
        Err(e) => Response::failure(report(&e)),
    }
}

fn handle(
    engine: &Engine,
    layout: &MountLayout,
    worker: &Worker,
    extra: Option<&StatusExtra>,
    mut stream: UnixStream,
) {
    let me = sys::euid();
    match sys::peer_uid(&stream) {
        Some(uid) if uid == 0 || uid == me => {}
        other => {
            log::warn!("refused control request from uid {other:?}: only root or the daemon's user may use it");
            reply(
                &mut stream,
                &Response::failure("permission denied: only root may control fleecefs"),
            );
            return;
        }
    }
    let line = match read_line_within(&stream, MAX_REQUEST, READ_TIMEOUT) {
        Ok(line) => line,
        Err(e) => {
            log::warn!("dropped control client: {e}");
            return;
        }
    };
    if line.is_empty() {
        log::info!("control client disconnected without a request");
        return;
    }
    if line.len() > MAX_REQUEST {
        log::warn!("refused control request larger than {MAX_REQUEST} bytes");
        reply(
            &mut stream,
            &Response::failure(format!("request is larger than {MAX_REQUEST} bytes")),
        );
        return;
    }
    let resp = match parse_request(line.trim_ascii_end()) {
        // A teardown needs to know whether its reply arrived (Engine::teardown_reply).
        Ok(Request::Teardown {
            target,
            success,
            ack,
        }) => {
            log::debug!("control request: teardown {target} success={success} ack={ack}");
            engine.teardown_reply(&target, success, |r| {
                teardown_delivered(&mut stream, &response(r), ack)
            });
            return;
        }
        Ok(Request::Restart { binary, force }) => {
            log::info!("control request: restart binary={binary:?} force={force}");
            worker.handle_restart(engine, binary, force, |r| {
                reply(&mut stream, &response(r));
            });
            return;
        }
        Ok(req) => {
            log::debug!("control request: {req:?}");
            dispatch(engine, layout, worker, extra, req)
        }
        Err(msg) => {
            log::warn!("refused control request: {msg}");
            Response::failure(msg)
        }
    };
    reply(&mut stream, &resp);
}

/// Accepts connections forever (until the process exits).
pub fn serve(
    listener: UnixListener,
    engine: Arc<Engine>,
    layout: MountLayout,
    worker: Arc<Worker>,
    extra: Option<StatusExtra>,
) {
    let layout = Arc::new(layout);
    let extra = Arc::new(extra);
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                log::warn!("control socket accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            active.fetch_sub(1, Ordering::AcqRel);
            log::warn!("refused control client: {MAX_CLIENTS} already connected");
            reply(
                &mut stream,
                &Response::failure("daemon busy: too many control clients"),
            );
            continue;
        }
        let (engine, layout, worker, mine) = (
            engine.clone(),
            layout.clone(),
            worker.clone(),
            active.clone(),
        );
        let extra = extra.clone();
        let spawned = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                handle(&engine, &layout, &worker, extra.as_ref().as_ref(), stream);
                mine.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            log::warn!("cannot start control handler: {e}");
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_one_deadline_however_the_bytes_trickle() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            for _ in 0..30 {
                if client.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let start = Instant::now();
        let e = read_line_within(&server, 100, Duration::from_millis(800)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        drop(server);
        writer.join().unwrap();
    }

    #[test]
    fn lines_long_lines_and_end_of_file() {
        let (mut client, server) = UnixStream::pair().unwrap();
        client.write_all(b"hello\nrest").unwrap();
        let got = read_line_within(&server, 100, Duration::from_secs(5)).unwrap();
        assert_eq!(got, b"hello\n");
        let (mut client, server) = UnixStream::pair().unwrap();
        client.write_all(&[b'a'; 50]).unwrap();
        let got = read_line_within(&server, 10, Duration::from_secs(5)).unwrap();
        assert_eq!(got.len(), 11);
        drop(client);
        let (client, server) = UnixStream::pair().unwrap();
        drop(client);
        assert!(read_line_within(&server, 10, Duration::from_secs(5))
            .unwrap()
            .is_empty());
    }
}

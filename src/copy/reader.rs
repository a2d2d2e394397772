//! Reading the snapshot for a copy: chunks in a fixed order, by one thread or by `jobs`
//! threads in parallel, handed to the writer strictly in order, optionally paced to an
//! average rate (`--bwlimit`).
//!
//! With several jobs, each reader first takes a free buffer, then the next chunk index,
//! reads it and sends it to the writer, which keeps early arrivals until their turn. At
//! most `2 * jobs` buffers exist, so memory stays bounded; no deadlock is possible because
//! an index is only handed out together with a buffer, so the chunk the writer waits for
//! is always held by a reader that can finish it. When the writer stops (done or failed)
//! it drops its channel ends: readers see that at their next step and exit.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sync::Recover;
use crate::sys;

/// One chunk of the snapshot to read: offset and length.
pub type Chunk = (u64, usize);

/// Paces reads to an average of `rate` bytes per second: each read reserves its bytes and
/// waits until the time at which that many bytes are due since the start.
pub struct Pacer {
    rate: u64,
    start: Instant,
    reserved: Mutex<u64>,
}

impl Pacer {
    /// A pacer starting now.
    pub fn new(rate: u64) -> Pacer {
        Pacer {
            rate: rate.max(1),
            start: Instant::now(),
            reserved: Mutex::new(0),
        }
    }

    /// Waits until `len` more bytes may be read.
    pub fn wait(&self, len: u64) {
        let before = {
            let mut r = self.reserved.lock().recover();
            let b = *r;
            *r += len;
            b
        };
        let due = self.start + Duration::from_secs_f64(before as f64 / self.rate as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

/// Reads every chunk of `snap` and calls `f(index, data)` for each, in order, on the
/// calling thread. A read error is passed to `f` as `Err` (with the chunk), which decides
/// what it means; an `Err` from `f` stops everything and is returned.
pub fn for_each_chunk<F>(
    snap: &File,
    chunks: &[Chunk],
    jobs: usize,
    pacer: Option<&Pacer>,
    mut f: F,
) -> Result<()>
where
    F: FnMut(usize, io::Result<&[u8]>) -> Result<()>,
{
    let max = chunks.iter().map(|c| c.1).max().unwrap_or(0);
    let read = |buf: &mut Vec<u8>, (off, len): Chunk| {
        if let Some(p) = pacer {
            p.wait(len as u64);
        }
        sys::read_exact_at(snap, &mut buf[..len], off)
    };
    if jobs <= 1 || chunks.len() <= 1 {
        let mut buf = vec![0u8; max];
        for (i, &c) in chunks.iter().enumerate() {
            let r = read(&mut buf, c);
            f(i, r.map(|()| &buf[..c.1]))?;
        }
        return Ok(());
    }
    let next = AtomicUsize::new(0);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..(2 * jobs).min(chunks.len()) {
        // The receiver is alive here.
        let _ = free_tx.send(vec![0u8; max]);
    }
    let free_rx = Mutex::new(free_rx);
    let (done_tx, done_rx) = mpsc::channel::<(usize, Vec<u8>, io::Result<()>)>();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            let done_tx = done_tx.clone();
            let (free_rx, next, read) = (&free_rx, &next, &read);
            s.spawn(move || loop {
                let got = free_rx.lock().recover().recv();
                let Ok(mut buf) = got else { return };
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&c) = chunks.get(i) else { return };
                let r = read(&mut buf, c);
                if done_tx.send((i, buf, r)).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);
        let free_tx = free_tx;
        let done_rx = done_rx;
        let mut early: BTreeMap<usize, (Vec<u8>, io::Result<()>)> = BTreeMap::new();
        let mut result = Ok(());
        for (want, &(_, len)) in chunks.iter().enumerate() {
            let (buf, r) = loop {
                if let Some(x) = early.remove(&want) {
                    break x;
                }
                match done_rx.recv() {
                    Ok((i, buf, r)) if i == want => break (buf, r),
                    Ok((i, buf, r)) => {
                        early.insert(i, (buf, r));
                    }
                    Err(_) => {
                        result = Err(Error::invalid("internal: the snapshot readers ended early"));
                        break (Vec::new(), Ok(()));
                    }
                }
            };
            if result.is_err() {
                break;
            }
            if let Err(e) = f(want, r.map(|()| &buf[..len])) {
                result = Err(e);
                break;
            }
            let _ = free_tx.send(buf);
        }
        // Stop the readers: no more indices, no more buffers, nobody to send to.
        next.store(chunks.len(), Ordering::Relaxed);
        drop(free_tx);
        drop(done_rx);
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        (f, data)
    }

    #[test]
    fn chunks_arrive_in_order_whatever_the_jobs() {
        let (f, data) = file_of(1 << 20);
        let chunks: Vec<Chunk> = (0..100).map(|i| (i * 10000, 10000 - i as usize)).collect();
        for jobs in [1, 2, 3, 8] {
            let mut seen = Vec::new();
            for_each_chunk(f.as_file(), &chunks, jobs, None, |i, r| {
                let b = r.unwrap();
                let (off, len) = chunks[i];
                assert_eq!(b, &data[off as usize..off as usize + len]);
                seen.push(i);
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, (0..100).collect::<Vec<_>>(), "jobs {jobs}");
        }
    }

    #[test]
    fn an_error_stops_the_readers_and_is_returned() {
        let (f, _) = file_of(1 << 16);
        // Chunk 5 reads past the end: EIO, passed to the callback, which fails.
        let chunks: Vec<Chunk> = (0..50).map(|i| ((i % 10) * 4096, 4096)).collect();
        let mut bad = chunks.clone();
        bad[5] = (1 << 16, 4096);
        for jobs in [1, 4] {
            let mut n = 0;
            let e = for_each_chunk(f.as_file(), &bad, jobs, None, |_, r| {
                n += 1;
                r.map(|_| ()).map_err(|e| Error::io("read", e))
            })
            .unwrap_err();
            assert!(e.to_string().contains("read"), "{e}");
            assert_eq!(
                n, 6,
                "jobs {jobs}: chunks 0-5 were handed over, then it stopped"
            );
        }
    }

    #[test]
    fn pacing_holds_the_average_rate() {
        let (f, _) = file_of(1 << 20);
        let chunks: Vec<Chunk> = (0..16).map(|i| (i * 65536, 65536)).collect();
        // 1 MiB at 4 MiB/s: the last chunk is due at 15/16 * 0.25 s.
        let p = Pacer::new(4 << 20);
        let t = Instant::now();
        for_each_chunk(f.as_file(), &chunks, 2, Some(&p), |_, r| {
            r.map(|_| ()).map_err(|e| Error::io("read", e))
        })
        .unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert!(secs >= 0.23, "{secs}");
    }
}

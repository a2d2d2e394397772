//! The benchmark's block client (scripts/bench.sh, BENCH_ONLY=frontends): random 4K
//! requests, a read/write mix, a queue depth per queue on several queues, through
//! libblkio (the `blkio` crate): `virtio-blk-vhost-user` for a vhost-user-blk socket,
//! `io_uring` for a file (buffered, or `O_DIRECT` with `--direct`).
//!
//! Usage: blkio_bench DRIVER PATH [--seconds S] [--queues N] [--qd D] [--read-pct P]
//!        [--bs B] [--direct] [--fio-json NAME]
//! Prints one JSON object: iops, read/write counts, latency percentiles (µs); with
//! `--fio-json NAME`, the part of fio's JSON output that `bench_report` reads instead (one
//! job NAME, reads and writes apart, `lat_ns` with percentiles 50, 99, 99.9).

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

struct Opts {
    driver: String,
    path: String,
    seconds: f64,
    queues: usize,
    qd: usize,
    read_pct: u64,
    bs: usize,
    direct: bool,
    fio_json: Option<String>,
}

fn opts() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let driver = args.next().ok_or("DRIVER missing")?;
    let path = args.next().ok_or("PATH missing")?;
    let mut o = Opts {
        driver,
        path,
        seconds: 10.0,
        queues: 2,
        qd: 32,
        read_pct: 70,
        bs: 4096,
        direct: false,
        fio_json: None,
    };
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--seconds" => o.seconds = val()?.parse().map_err(|e| format!("{e}"))?,
            "--queues" => o.queues = val()?.parse().map_err(|e| format!("{e}"))?,
            "--qd" => o.qd = val()?.parse().map_err(|e| format!("{e}"))?,
            "--read-pct" => o.read_pct = val()?.parse().map_err(|e| format!("{e}"))?,
            "--bs" => o.bs = val()?.parse().map_err(|e| format!("{e}"))?,
            "--direct" => o.direct = true,
            "--fio-json" => o.fio_json = Some(val()?),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(o)
}

/// What one queue did: latencies in ns of its reads and of its writes.
type QueueResult = Result<(Vec<u64>, Vec<u64>), String>;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One queue's loop: keeps `qd` requests in flight until `end`; returns the latencies in
/// ns of its reads and of its writes.
fn run_queue(
    mut q: Blkioq,
    base: usize,
    o: &Opts,
    blocks: u64,
    end: Instant,
    seed: u64,
) -> QueueResult {
    let mut rng = Rng(seed | 1);
    let mut started = vec![Instant::now(); o.qd];
    let (mut rlat, mut wlat) = (Vec::with_capacity(1 << 20), Vec::with_capacity(1 << 19));
    let submit = |q: &mut Blkioq, slot: usize, rng: &mut Rng| -> bool {
        let offset = rng.next() % blocks * o.bs as u64;
        let buf = (base + slot * o.bs) as *mut u8;
        let read = rng.next() % 100 < o.read_pct;
        if read {
            q.read(offset, buf, o.bs, slot, ReqFlags::empty());
        } else {
            q.write(offset, buf, o.bs, slot, ReqFlags::empty());
        }
        read
    };
    let mut kinds = vec![false; o.qd];
    for (slot, kind) in kinds.iter_mut().enumerate() {
        started[slot] = Instant::now();
        *kind = submit(&mut q, slot, &mut rng);
    }
    let mut inflight = o.qd;
    let mut c = [const { MaybeUninit::<Completion>::uninit() }; 64];
    while inflight > 0 {
        let n = q
            .do_io(&mut c, 1, None, None)
            .map_err(|e| format!("do_io: {e:?}"))?;
        let now = Instant::now();
        for done in &c[..n] {
            // SAFETY: do_io initialized the first `n` completions.
            let done = unsafe { done.assume_init_ref() };
            if done.ret != 0 {
                return Err(format!("request failed: {}", done.ret));
            }
            let slot = done.user_data;
            let ns = now.duration_since(started[slot]).as_nanos() as u64;
            if kinds[slot] {
                rlat.push(ns);
            } else {
                wlat.push(ns);
            }
            if now < end {
                started[slot] = Instant::now();
                kinds[slot] = submit(&mut q, slot, &mut rng);
            } else {
                inflight -= 1;
            }
        }
    }
    Ok((rlat, wlat))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("blkio_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let o = opts()?;
    let mut b = Blkio::new(&o.driver).map_err(|e| format!("{e:?}"))?;
    b.set_str("path", &o.path)
        .map_err(|e| format!("path: {e:?}"))?;
    if o.direct {
        b.set_bool("direct", true)
            .map_err(|e| format!("direct: {e:?}"))?;
    }
    b.connect().map_err(|e| format!("connect: {e:?}"))?;
    b.set_i32("num-queues", o.queues as i32)
        .map_err(|e| format!("num-queues: {e:?}"))?;
    let started = b.start().map_err(|e| format!("start: {e:?}"))?;
    let capacity = b.get_u64("capacity").map_err(|e| format!("{e:?}"))?;
    let per_queue = o.qd * o.bs;
    let len = (per_queue * o.queues).next_multiple_of(2 << 20);
    let region = b.alloc_mem_region(len).map_err(|e| format!("{e:?}"))?;
    b.map_mem_region(&region).map_err(|e| format!("{e:?}"))?;
    let blocks = capacity / o.bs as u64;
    let end = Instant::now() + Duration::from_secs_f64(o.seconds);
    let t0 = Instant::now();
    let results: Vec<QueueResult> = std::thread::scope(|s| {
        let handles: Vec<_> = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                let base = region.addr + i * per_queue;
                let o = &o;
                s.spawn(move || run_queue(q, base, o, blocks, end, 0x9e37 + i as u64 * 7919))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a queue thread panicked".into()))
            })
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let (mut rlat, mut wlat) = (Vec::new(), Vec::new());
    for r in results {
        let (r, w) = r?;
        rlat.extend(r);
        wlat.extend(w);
    }
    let (reads, writes) = (rlat.len(), wlat.len());
    if let Some(name) = &o.fio_json {
        let dir = |lat: &mut Vec<u64>| {
            lat.sort_unstable();
            let n = lat.len();
            let bytes = n as f64 * o.bs as f64;
            format!(
                "{{\"io_bytes\": {bytes:.0}, \"bw_bytes\": {:.0}, \"iops\": {:.1}, \"total_ios\": {n}, \"lat_ns\": {{\"mean\": {:.1}, \"percentile\": {{\"50.000000\": {}, \"99.000000\": {}, \"99.900000\": {}}}}}}}",
                bytes / secs,
                n as f64 / secs,
                lat.iter().sum::<u64>() as f64 / n.max(1) as f64,
                pct(lat, 0.5),
                pct(lat, 0.99),
                pct(lat, 0.999)
            )
        };
        println!(
            "{{\"jobs\": [{{\"jobname\": \"{}\", \"read\": {}, \"write\": {}}}]}}",
            name.escape_debug(),
            dir(&mut rlat),
            dir(&mut wlat)
        );
        return Ok(());
    }
    let mut lat = rlat;
    lat.extend(wlat);
    lat.sort_unstable();
    let p = |q: f64| pct(&lat, q) as f64 / 1000.0;
    println!(
        "{{\"iops\": {:.0}, \"reads\": {reads}, \"writes\": {writes}, \"seconds\": {secs:.2}, \"lat_us\": {{\"mean\": {:.1}, \"p50\": {:.1}, \"p99\": {:.1}, \"p999\": {:.1}}}}}",
        (reads + writes) as f64 / secs,
        lat.iter().sum::<u64>() as f64 / lat.len().max(1) as f64 / 1000.0,
        p(0.5),
        p(0.99),
        p(0.999)
    );
    Ok(())
}

/// The `q` quantile of sorted latencies (0 if there are none).
fn pct(sorted: &[u64], q: f64) -> u64 {
    match sorted.len() {
        0 => 0,
        n => sorted[((n as f64 * q) as usize).min(n - 1)],
    }
}

//! The benchmark's report: turns what `scripts/bench.sh` measured into the markdown tables
//! of docs/performance.md.
//!
//! The driver (`scripts/bench.sh`) sets systems up, runs fio and keeps the raw results in
//! one directory: fio's JSON as `SYSTEM.WORKLOAD.json`, `scale.txt` (key=value lines),
//! `fleecefs.mem.txt` (VmRSS/VmHWM lines) and `micro.txt` (`cargo bench --bench engine`).
//! This program only reads them: it sums fio's jobs, weighs latencies, computes the ratios
//! against qemu, direct and the FUSE floor, checks the targets, and prints the tables.
//!
//! Usage:
//! - `bench_report summary FIO_JSON SYSTEM WORKLOAD`: one line per fio run, for the log;
//! - `bench_report pid`: the serving worker's pid from `fleecefs status --json` on stdin;
//! - `bench_report tables RESULTS_DIR "SYSTEMS" "FLOORS"`: all tables, with the guest-first
//!   phases and the writer scaling line when they ran (SYSTEMS as in
//!   `BENCH_SYSTEMS`; FLOORS the FUSE floors that ran, in order, possibly "");
//! - `bench_report cpu FIO_JSON TICKS HZ`: `cpu_us_per_request=X`, the daemon's CPU time
//!   (TICKS clock ticks of HZ per second) per request of every job of the run, which the
//!   driver keeps as `SYSTEM.WORKLOAD.cpu` beside the JSON;
//! - `bench_report merge JSON...`: one fio-shaped JSON with the jobs of all (the
//!   vhost-user-blk guest's and fio's reader, run side by side).
//!
//! A new workload needs a `wl_NAME` function in the driver and, to appear in the main table,
//! one entry in [`ROWS`] (targets in [`TARGETS`]).

use serde::Deserialize;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "usage: bench_report summary FIO_JSON SYSTEM WORKLOAD | pid | tables RESULTS_DIR SYSTEMS FLOORS | cpu FIO_JSON TICKS HZ | merge JSON...";

/// The system whose guest is a vhost-user-blk client: it runs only the guest-first phases.
const VHOST_SYSTEM: &str = "fleecefs_vhost";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = run(&args).and_then(|text| {
        std::io::stdout()
            .lock()
            .write_all(text.as_bytes())
            .map_err(|e| format!("cannot write the report: {e}"))
    });
    match out {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_report: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<String, String> {
    match args {
        [cmd, file, system, workload] if cmd == "summary" => {
            let path = Path::new(file);
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let fio = FioOutput::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            let cpu = std::fs::read_to_string(path.with_extension("cpu"))
                .ok()
                .and_then(|t| parse_cpu(&t));
            Ok(summary_line(&fio, system, workload, cpu))
        }
        [cmd, file, ticks, hz] if cmd == "cpu" => {
            let path = Path::new(file);
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let fio = FioOutput::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            let num = |v: &str| {
                v.parse::<f64>()
                    .map_err(|_| format!("not a number: {}", v.escape_debug()))
            };
            let us = cpu_us_per_request(&fio, num(ticks)?, num(hz)?)
                .ok_or_else(|| format!("{}: no requests", path.display()))?;
            Ok(format!("cpu_us_per_request={us:.2}\n"))
        }
        [cmd, files @ ..] if cmd == "merge" && !files.is_empty() => merge(files),
        [cmd] if cmd == "pid" => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| format!("cannot read stdin: {e}"))?;
            Ok(format!("{}\n", status_pid(&text)?))
        }
        [cmd, dir, systems, floors] if cmd == "tables" => {
            let res = Results {
                dir: PathBuf::from(dir),
            };
            let systems: Vec<&str> = systems.split_whitespace().collect();
            let floors: Vec<&str> = floors.split_whitespace().collect();
            tables(&res, &systems, &floors)
        }
        _ => Err(USAGE.to_string()),
    }
}

// ---------------------------------------------------------------- fio's JSON

/// The part of fio's `--output-format=json` that the report reads.
#[derive(Debug, Deserialize)]
struct FioOutput {
    jobs: Vec<FioJob>,
}

#[derive(Debug, Deserialize)]
struct FioJob {
    jobname: String,
    read: FioDir,
    write: FioDir,
}

/// One direction of one job.
#[derive(Debug, Deserialize)]
struct FioDir {
    io_bytes: f64,
    /// Requests completed.
    #[serde(default)]
    total_ios: f64,
    bw_bytes: f64,
    iops: f64,
    lat_ns: FioLat,
}

#[derive(Debug, Deserialize)]
struct FioLat {
    mean: f64,
    /// With `--lat_percentiles=1`: percentile ("99.000000") -> ns.
    #[serde(default)]
    percentile: Option<HashMap<String, f64>>,
}

impl FioLat {
    /// The `p`th percentile in µs (`p` as fio prints it, e.g. "99.900000").
    fn pct_us(&self, p: &str) -> Option<f64> {
        self.percentile.as_ref()?.get(p).map(|ns| ns / 1e3)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

impl FioOutput {
    fn parse(text: &str) -> Result<FioOutput, String> {
        serde_json::from_str(text).map_err(|e| format!("not fio JSON output: {e}"))
    }
}

impl FioJob {
    fn dir(&self, d: Dir) -> &FioDir {
        match d {
            Dir::Read => &self.read,
            Dir::Write => &self.write,
        }
    }
}

/// Throughput, IOPS and mean latency of a set of fio jobs.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stats {
    mb_s: f64,
    iops: f64,
    lat_us: f64,
}

impl Stats {
    fn of(d: &FioDir) -> Stats {
        Stats {
            mb_s: d.bw_bytes / 1e6,
            iops: d.iops,
            lat_us: d.lat_ns.mean / 1e3,
        }
    }
}

/// The jobs named `job` (all if `None`), in direction `dir` (both if `None`), summed:
/// MB/s and IOPS add up, latency is the mean weighted by IOPS. Directions that did no I/O
/// do not count; `None` if nothing did.
fn stats(fio: &FioOutput, job: Option<&str>, dir: Option<Dir>) -> Option<Stats> {
    let dirs: &[Dir] = match dir {
        Some(Dir::Read) => &[Dir::Read],
        Some(Dir::Write) => &[Dir::Write],
        None => &[Dir::Read, Dir::Write],
    };
    let (mut mb_s, mut iops, mut lat_w) = (0.0, 0.0, 0.0);
    for j in &fio.jobs {
        if job.is_some_and(|name| name != j.jobname) {
            continue;
        }
        for &d in dirs {
            let s = j.dir(d);
            if s.io_bytes == 0.0 {
                continue;
            }
            let st = Stats::of(s);
            mb_s += st.mb_s;
            iops += st.iops;
            lat_w += st.lat_us * st.iops;
        }
    }
    if iops == 0.0 {
        return None;
    }
    Some(Stats {
        mb_s,
        iops,
        lat_us: lat_w / iops,
    })
}

/// The first job of a single-job run, in the direction it did I/O (write if any).
fn first_job(fio: &FioOutput) -> Option<Stats> {
    let j = fio.jobs.first()?;
    let d = if j.write.io_bytes != 0.0 {
        &j.write
    } else {
        &j.read
    };
    Some(Stats::of(d))
}

/// The daemon's CPU time per request, µs: `ticks` clock ticks (`hz` a second) over the
/// requests of every job of `fio`; `None` without requests.
fn cpu_us_per_request(fio: &FioOutput, ticks: f64, hz: f64) -> Option<f64> {
    let n: f64 = fio
        .jobs
        .iter()
        .map(|j| j.read.total_ios + j.write.total_ios)
        .sum();
    (n > 0.0 && hz > 0.0).then(|| ticks / hz * 1e6 / n)
}

/// The value of a `SYSTEM.WORKLOAD.cpu` file.
fn parse_cpu(text: &str) -> Option<f64> {
    text.trim()
        .strip_prefix("cpu_us_per_request=")?
        .parse()
        .ok()
}

/// The jobs of several fio-shaped JSON files in one.
fn merge(files: &[String]) -> Result<String, String> {
    let mut jobs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| format!("cannot read {}: {e}", f.escape_debug()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", f.escape_debug()))?;
        match v.get("jobs").and_then(|j| j.as_array()) {
            Some(j) => jobs.extend(j.iter().cloned()),
            None => return Err(format!("{}: no jobs", f.escape_debug())),
        }
    }
    Ok(format!("{}\n", serde_json::json!({ "jobs": jobs })))
}

fn summary_line(fio: &FioOutput, system: &str, workload: &str, cpu: Option<f64>) -> String {
    let mut parts = Vec::new();
    for j in &fio.jobs {
        for (d, name) in [(Dir::Read, "read"), (Dir::Write, "write")] {
            let s = j.dir(d);
            if s.io_bytes != 0.0 {
                let st = Stats::of(s);
                parts.push(format!(
                    "{} {name} {:.1} MB/s {:.0} IOPS {:.1} us",
                    j.jobname, st.mb_s, st.iops, st.lat_us
                ));
            }
        }
    }
    if let Some(us) = cpu {
        parts.push(format!("daemon CPU {us:.2} us/request"));
    }
    format!("   {system:<9} {workload:<16} {}\n", parts.join("; "))
}

/// The pid of the process that serves the I/O: the worker (`worker_pid`), not the keeper
/// (`pid`), whose RSS, storage reads and profile say nothing about the data path; `pid`
/// when there is no worker field.
fn status_pid(text: &str) -> Result<u64, String> {
    #[derive(Deserialize)]
    struct Status {
        pid: u64,
        #[serde(default)]
        worker_pid: Option<u64>,
    }
    serde_json::from_str::<Status>(text)
        .map(|s| s.worker_pid.unwrap_or(s.pid))
        .map_err(|e| format!("no pid in 'fleecefs status --json' output: {e}"))
}

// ---------------------------------------------------------------- the results directory

struct Results {
    dir: PathBuf,
}

impl Results {
    /// A file's text, `None` if it does not exist.
    fn text(&self, name: &str) -> Result<Option<String>, String> {
        let path = self.dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// fio's output of `system` running `workload`, `None` if it did not run.
    fn fio(&self, system: &str, workload: &str) -> Result<Option<FioOutput>, String> {
        let name = format!("{system}.{workload}.json");
        match self.text(&name)? {
            None => Ok(None),
            Some(t) => FioOutput::parse(&t)
                .map(Some)
                .map_err(|e| format!("{}: {e}", self.dir.join(&name).display())),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.dir.join(name).exists()
    }
}

// ---------------------------------------------------------------- formatting

fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        None => "-".to_string(),
        Some(v) => format!("{v:.decimals$}"),
    }
}

/// `a / b` by throughput, `None` if either is missing or `b` is zero.
fn ratio(a: Option<Stats>, b: Option<Stats>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b.mb_s != 0.0 => Some(a.mb_s / b.mb_s),
        _ => None,
    }
}

fn ratio_cell(r: Option<f64>) -> String {
    match r {
        Some(r) if r != 0.0 => format!("{r:.2}x"),
        _ => "-".to_string(),
    }
}

// ---------------------------------------------------------------- the main table

/// One line of the main table: a workload's fio run, or some jobs of it in one direction.
struct Row {
    workload: &'static str,
    job: Option<&'static str>,
    dir: Option<Dir>,
    label: &'static str,
}

const fn row(workload: &'static str, label: &'static str) -> Row {
    Row {
        workload,
        job: None,
        dir: None,
        label,
    }
}

const ROWS: &[Row] = &[
    row(
        "snap_seqread",
        "snapshot seq read 1M (access, nothing copied yet)",
    ),
    row(
        "cbw_first",
        "live 4K randwrite, access, first touch (every write copies)",
    ),
    row(
        "cbw_again",
        "live 4K randwrite, access, same clusters again",
    ),
    row("randwrite_noacc", "live 4K randwrite, no access"),
    row("seqwrite_noacc", "live 1M seq write, no access"),
    row("seqread_noacc", "live 1M seq read, no access"),
    Row {
        workload: "mixed_buffered",
        job: Some("snapread"),
        dir: Some(Dir::Read),
        label: "snapshot read 1M, while 2 live 4K writers run",
    },
    Row {
        workload: "mixed_buffered",
        job: Some("livewrite"),
        dir: Some(Dir::Write),
        label: "... the 2 live 4K writers (buffered), total",
    },
    Row {
        workload: "mixed_odirect",
        job: Some("snapread"),
        dir: Some(Dir::Read),
        label: "snapshot read 1M, while 2 live 4K O_DIRECT writers run",
    },
    Row {
        workload: "mixed_odirect",
        job: Some("livewrite"),
        dir: Some(Dir::Write),
        label: "... the 2 live 4K writers (O_DIRECT), total",
    },
];

/// A performance target: fleecefs's throughput on a workload at least `need` times that of
/// `against`.
struct Target {
    name: &'static str,
    workload: &'static str,
    against: &'static str,
    need: f64,
}

const TARGETS: &[Target] = &[
    Target {
        name: "snapshot seq read vs qemu",
        workload: "snap_seqread",
        against: "qemu",
        need: 3.0,
    },
    Target {
        name: "snapshot seq read vs direct",
        workload: "snap_seqread",
        against: "direct",
        need: 0.5,
    },
    Target {
        name: "live 4K randwrite, access, first touch vs qemu",
        workload: "cbw_first",
        against: "qemu",
        need: 3.0,
    },
    Target {
        name: "live 4K randwrite, no access vs qemu",
        workload: "randwrite_noacc",
        against: "qemu",
        need: 3.0,
    },
    Target {
        name: "live 4K randwrite, no access vs direct",
        workload: "randwrite_noacc",
        against: "direct",
        need: 0.4,
    },
    Target {
        name: "live 1M seq write, no access vs direct",
        workload: "seqwrite_noacc",
        against: "direct",
        need: 0.7,
    },
    Target {
        name: "live 1M seq read, no access vs direct",
        workload: "seqread_noacc",
        against: "direct",
        need: 0.7,
    },
];

/// The stats of every system on every row: `[row][system]`.
fn measure(res: &Results, systems: &[&str]) -> Result<Vec<Vec<Option<Stats>>>, String> {
    let mut cache: HashMap<(String, &str), Option<FioOutput>> = HashMap::new();
    let mut out = Vec::new();
    for r in ROWS {
        let mut line = Vec::new();
        for &s in systems {
            let key = (s.to_string(), r.workload);
            if !cache.contains_key(&key) {
                let fio = res.fio(s, r.workload)?;
                cache.insert(key.clone(), fio);
            }
            let st = cache
                .get(&key)
                .and_then(|f| f.as_ref())
                .and_then(|f| stats(f, r.job, r.dir));
            line.push(st);
        }
        out.push(line);
    }
    Ok(out)
}

/// The main table (every system, the ratios fleecefs/qemu and fleecefs/direct when those
/// systems ran) and the targets table.
fn main_table(systems: &[&str], m: &[Vec<Option<Stats>>]) -> String {
    let idx = |name: &str| systems.iter().position(|&s| s == name);
    let (fl, q, d) = (idx("fleecefs"), idx("qemu"), idx("direct"));
    let vs: Vec<(&str, usize, usize)> = [("qemu", fl, q), ("direct", fl, d)]
        .into_iter()
        .filter_map(|(name, a, b)| Some((name, a?, b?)))
        .collect();

    let mut hdr = vec!["workload".to_string()];
    for s in systems {
        hdr.extend([format!("{s} MB/s"), "IOPS".into(), "lat µs".into()]);
    }
    for (name, _, _) in &vs {
        hdr.push(format!("fleecefs/{name}"));
    }
    let mut t = String::new();
    let _ = writeln!(t, "| {} |", hdr.join(" | "));
    let _ = writeln!(t, "|{}", "---|".repeat(hdr.len()));
    let ran = |line: &Vec<Option<Stats>>| line.iter().any(Option::is_some);
    for (r, line) in ROWS.iter().zip(m) {
        // A workload that ran on no system (BENCH_ONLY) has no row.
        if !ran(line) {
            continue;
        }
        let mut cells = vec![r.label.to_string()];
        for v in line {
            cells.push(fmt(v.map(|v| v.mb_s), 1));
            cells.push(fmt(v.map(|v| v.iops), 0));
            cells.push(fmt(v.map(|v| v.lat_us), 1));
        }
        for &(_, a, b) in &vs {
            cells.push(ratio_cell(ratio(line[a], line[b])));
        }
        let _ = writeln!(t, "| {} |", cells.join(" | "));
    }

    let _ = writeln!(t);
    let _ = writeln!(t, "| target | measured | required | met |");
    let _ = writeln!(t, "|---|---|---|---|");
    for tg in TARGETS {
        let row = ROWS
            .iter()
            .position(|r| r.workload == tg.workload && r.job.is_none());
        if row.is_some_and(|i| !ran(&m[i])) {
            continue;
        }
        let r = match (fl, idx(tg.against)) {
            (Some(a), Some(b)) => ROWS
                .iter()
                .position(|r| r.workload == tg.workload && r.job.is_none())
                .and_then(|i| ratio(m[i][a], m[i][b])),
            _ => None,
        };
        let _ = writeln!(t, "{}", target_line(tg, r));
    }
    t
}

fn target_line(tg: &Target, r: Option<f64>) -> String {
    let met = match r {
        None => "?",
        Some(r) if r >= tg.need => "yes",
        Some(_) => "**no**",
    };
    let measured = r.map_or("-".to_string(), |r| format!("{r:.2}x"));
    format!("| {} | {measured} | >= {}x | {met} |", tg.name, tg.need)
}

// ---------------------------------------------------------------- scale, memory

/// The scale table from `scale.txt` (key=value lines written by the driver).
fn scale_table(text: &str) -> Result<String, String> {
    let kv: HashMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.trim().split_once('='))
        .collect();
    let num = |k: &str| -> Result<u64, String> {
        let v = kv.get(k).ok_or(format!("scale.txt: no {k}"))?;
        v.trim()
            .parse()
            .map_err(|_| format!("scale.txt: {k}={v} is not a number"))
    };
    let cluster = num("cluster")?;
    if cluster == 0 {
        return Err("scale.txt: cluster=0".to_string());
    }
    let bitmap_mib = (num("device_bytes")? / cluster) as f64 / 8.0 / 1048576.0;
    let mut t = String::new();
    let _ = writeln!(t);
    let _ = writeln!(t, "| scale | mount | setup | daemon RSS during access (peak) | RSS limit: 64 MiB + 3 bitmaps of {bitmap_mib:.0} MiB per device | met |");
    let _ = writeln!(t, "|---|---|---|---|---|---|");
    for (k, label) in [
        ("one1t", "1 device of 1 TiB (sparse)"),
        ("sixteen", "16 devices of 1 TiB each (sparse)"),
    ] {
        if !kv.contains_key(format!("{k}.mount_ms").as_str()) {
            continue;
        }
        let m = num(&format!("{k}.mount_ms"))?;
        let s = num(&format!("{k}.setup_ms"))?;
        let rss = num(&format!("{k}.rss_kb"))? as f64 / 1024.0;
        let hwm = num(&format!("{k}.hwm_kb"))? as f64 / 1024.0;
        let limit = 64.0 + 3.0 * bitmap_mib * num(&format!("{k}.devices"))? as f64;
        let ok = m < 1000 && s < 100 && hwm < limit;
        let _ = writeln!(
            t,
            "| {label} | {m} ms (< 1000) | {s} ms (< 100) | {rss:.1} MiB ({hwm:.1} MiB) | {limit:.0} MiB | {} |",
            if ok { "yes" } else { "**no**" }
        );
    }
    Ok(t)
}

/// `VmRSS:  1234 kB` lines of the fleecefs daemon at unmount, as one line.
fn mem_line(text: &str) -> String {
    let parts: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some(format!("{} {} kB", w.next()?, w.next()?))
        })
        .collect();
    format!(
        "\nfleecefs daemon of the workloads above, at unmount: {}\n",
        parts.join(", ")
    )
}

// ---------------------------------------------------------------- the FUSE floor

fn floor_name(s: &str) -> &str {
    match s {
        "floor" => "floor (/dev/fuse)",
        "floor_uring" => "floor (io_uring)",
        "floor_wb" => "floor (writeback cache)",
        other => other,
    }
}

/// The no-access live workloads on direct, qemu (if they ran), the floors and fleecefs,
/// with fleecefs against the `/dev/fuse` floor and every floor against direct.
fn floor_table(res: &Results, floors: &[&str]) -> Result<String, String> {
    let mut systems: Vec<&str> = ["direct", "qemu"]
        .into_iter()
        .filter(|s| res.has(&format!("{s}.randwrite_noacc.json")))
        .collect();
    systems.extend(floors);
    systems.push("fleecefs");

    let mut t = String::new();
    let names: Vec<&str> = systems.iter().map(|s| floor_name(s)).collect();
    let vs_direct: Vec<String> = floors
        .iter()
        .map(|f| format!("{} / direct", floor_name(f)))
        .collect();
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "| no access, the FUSE floor | {} | fleecefs / floor (/dev/fuse) | {} |",
        names.join(" | "),
        vs_direct.join(" | ")
    );
    let _ = writeln!(
        t,
        "|---|{}",
        "---|".repeat(systems.len() + 1 + floors.len())
    );
    for (wl, label, iops) in [
        ("randwrite_noacc", "live 4K randwrite", true),
        ("seqwrite_noacc", "live 1M seq write", false),
        ("seqread_noacc", "live 1M seq read", false),
    ] {
        let mut v: HashMap<&str, Option<Stats>> = HashMap::new();
        for &s in &systems {
            v.insert(s, res.fio(s, wl)?.as_ref().and_then(first_job));
        }
        let get = |s: &str| v.get(s).copied().flatten();
        let (unit, key): (&str, fn(&Stats) -> f64) = if iops {
            ("IOPS", |s| s.iops)
        } else {
            ("MB/s", |s| s.mb_s)
        };
        let rel = |a: Option<Stats>, b: Option<Stats>| match (a, b) {
            (Some(a), Some(b)) if key(&b) != 0.0 => format!("{:.2}x", key(&a) / key(&b)),
            _ => "-".to_string(),
        };
        let cells: Vec<String> = systems
            .iter()
            .map(|&s| match get(s) {
                None => "-".to_string(),
                Some(st) => format!("{:.0} {unit} ({:.1} µs)", key(&st), st.lat_us),
            })
            .collect();
        let r1 = rel(get("fleecefs"), get("floor"));
        let r2: Vec<String> = floors.iter().map(|&f| rel(get(f), get("direct"))).collect();
        let _ = writeln!(
            t,
            "| {label} | {} | {r1} | {} |",
            cells.join(" | "),
            r2.join(" | ")
        );
    }
    Ok(t)
}

// ---------------------------------------------------------------- guest first

/// The three phases of the VM-like load: fio workload name and label.
const GUEST_PHASES: &[(&str, &str)] = &[
    ("guest_idle", "idle (no access)"),
    ("guest_access", "access, no reader (first touches copy)"),
    ("guest_backup", "access + full-speed 1 MiB snapshot reader"),
];

/// One phase of the VM-like load: the guest group (both jobs, `group_reporting`) and the
/// reader, if it ran.
#[derive(Debug, Clone, Copy, PartialEq)]
struct GuestPhase {
    read_iops: f64,
    write_iops: f64,
    /// Write latency percentiles (total latency), µs: p50, p99, p99.9.
    write_pct: [Option<f64>; 3],
    /// Read latency p99, µs.
    read_p99: Option<f64>,
    reader_mb_s: Option<f64>,
    /// The daemon's CPU time per request (guest's and reader's), µs.
    cpu_us: Option<f64>,
}

const PCTS: [&str; 3] = ["50.000000", "99.000000", "99.900000"];

fn guest_phase(fio: &FioOutput) -> Option<GuestPhase> {
    let g = fio.jobs.iter().find(|j| j.jobname == "guest")?;
    let reader = stats(fio, Some("reader"), Some(Dir::Read)).map(|s| s.mb_s);
    Some(GuestPhase {
        read_iops: g.read.iops,
        write_iops: g.write.iops,
        write_pct: PCTS.map(|p| g.write.lat_ns.pct_us(p)),
        read_p99: g.read.lat_ns.pct_us(PCTS[1]),
        reader_mb_s: reader,
        cpu_us: None,
    })
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".to_string(),
        Some(us) => format!("{:.2}", us / 1e3),
    }
}

/// A guest-first goal: name, measured ratio, requirement, test, unit ("%" or "x").
type Goal = (
    &'static str,
    Option<f64>,
    &'static str,
    fn(f64) -> bool,
    &'static str,
);

/// The guest-first tables: each system's three phases, then fleecefs against the
/// guest-first goals. Empty if no guest phase ran.
fn guest_table(res: &Results, systems: &[&str]) -> Result<String, String> {
    let mut phases: HashMap<(&str, &str), GuestPhase> = HashMap::new();
    for &s in systems {
        for &(wl, _) in GUEST_PHASES {
            if let Some(mut p) = res.fio(s, wl)?.as_ref().and_then(guest_phase) {
                p.cpu_us = res
                    .text(&format!("{s}.{wl}.cpu"))?
                    .and_then(|t| parse_cpu(&t));
                phases.insert((s, wl), p);
            }
        }
    }
    if phases.is_empty() {
        return Ok(String::new());
    }
    let mut t = String::new();
    let _ = writeln!(t);
    let _ = writeln!(t, "| guest first: VM-like load on live | system | guest read IOPS | guest write IOPS | write IOPS vs idle | write p50 ms | write p99 ms | write p99.9 ms | read p99 ms | reader MB/s | daemon CPU µs/request |");
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|---|");
    for &s in systems {
        let idle = phases.get(&(s, "guest_idle")).copied();
        for &(wl, label) in GUEST_PHASES {
            let Some(p) = phases.get(&(s, wl)) else {
                continue;
            };
            let kept = match idle {
                Some(i) if i.write_iops > 0.0 => {
                    format!("{:.0}%", 100.0 * p.write_iops / i.write_iops)
                }
                _ => "-".to_string(),
            };
            let _ = writeln!(
                t,
                "| {label} | {s} | {:.0} | {:.0} | {kept} | {} | {} | {} | {} | {} | {} |",
                p.read_iops,
                p.write_iops,
                ms(p.write_pct[0]),
                ms(p.write_pct[1]),
                ms(p.write_pct[2]),
                ms(p.read_p99),
                fmt(p.reader_mb_s, 1),
                fmt(p.cpu_us, 2)
            );
        }
    }
    let get = |s: &str, wl: &str| phases.get(&(s, wl)).copied();
    let (Some(idle), f_access, f_backup) = (
        get("fleecefs", "guest_idle"),
        get("fleecefs", "guest_access"),
        get("fleecefs", "guest_backup"),
    ) else {
        return Ok(t);
    };
    let q_backup = get("qemu", "guest_backup");
    let p99 = |p: &GuestPhase| p.write_pct[1];
    let rel = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    };
    let goals: [Goal; 4] = [
        (
            "guest write IOPS during the backup, share of idle",
            f_backup.and_then(|b| rel(Some(b.write_iops), Some(idle.write_iops))),
            ">= 80%",
            |r| r >= 0.8,
            "%",
        ),
        (
            "guest write p99 during the backup, vs idle",
            f_backup.and_then(|b| rel(p99(&b), p99(&idle))),
            "<= 2x",
            |r| r <= 2.0,
            "x",
        ),
        (
            "reader MB/s during the backup, vs qemu's",
            rel(
                f_backup.and_then(|b| b.reader_mb_s),
                q_backup.and_then(|b| b.reader_mb_s),
            ),
            ">= 3x",
            |r| r >= 3.0,
            "x",
        ),
        (
            "first touch: guest write p99 during the access without a reader, vs idle",
            f_access.and_then(|a| rel(p99(&a), p99(&idle))),
            "<= 3x",
            |r| r <= 3.0,
            "x",
        ),
    ];
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "| guest-first goal (fleecefs) | measured | required | met |"
    );
    let _ = writeln!(t, "|---|---|---|---|");
    for (name, r, need, ok, unit) in goals {
        let (measured, met) = match r {
            None => ("-".to_string(), "?"),
            Some(r) => (
                if unit == "%" {
                    format!("{:.0}%", r * 100.0)
                } else {
                    format!("{r:.2}x")
                },
                if ok(r) { "yes" } else { "**no**" },
            ),
        };
        let _ = writeln!(t, "| {name} | {measured} | {need} | {met} |");
    }
    Ok(t)
}

/// The writer scaling line: 4 KiB random buffered writes without an access, 1, 4 and 16
/// writer threads, IOPS per system. Empty if it did not run.
fn writers_table(res: &Results, systems: &[&str]) -> Result<String, String> {
    let ns = [1, 4, 16];
    let mut cells: Vec<Vec<Option<f64>>> = Vec::new();
    for &s in systems {
        let mut line = Vec::new();
        for n in ns {
            line.push(
                res.fio(s, &format!("scale_w{n}"))?
                    .as_ref()
                    .and_then(|f| stats(f, None, Some(Dir::Write)))
                    .map(|st| st.iops),
            );
        }
        cells.push(line);
    }
    if cells.iter().flatten().all(Option::is_none) {
        return Ok(String::new());
    }
    let mut t = String::new();
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "| live 4K randwrite, no access, IOPS | 1 writer | 4 writers | 16 writers | 16 vs 1 |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|");
    for (s, line) in systems.iter().zip(&cells) {
        let r = match (line[0], line[2]) {
            (Some(a), Some(b)) if a != 0.0 => format!("{:.2}x", b / a),
            _ => "-".to_string(),
        };
        let _ = writeln!(
            t,
            "| {s} | {} | {} | {} | {r} |",
            fmt(line[0], 0),
            fmt(line[1], 0),
            fmt(line[2], 0)
        );
    }
    Ok(t)
}

// ---------------------------------------------------------------- bitmap cost

const BITMAP_VARIANTS: &[(&str, &str)] = &[
    ("none", "no bitmap"),
    ("on", "bitmap, --crash-safe-bitmaps on (default)"),
    ("sync", "bitmap, --crash-safe-bitmaps sync"),
    ("off", "bitmap, --crash-safe-bitmaps off"),
];

/// IOPS (rounded) and mean latency in µs (one decimal) of a bitmap-cost run.
fn bitmap_point(fio: &FioOutput) -> Option<(i64, f64)> {
    let w = &fio.jobs.first()?.write;
    let lat = (w.lat_ns.mean / 1e3 * 10.0).round_ties_even() / 10.0;
    Some((w.iops.round_ties_even() as i64, lat))
}

/// The first-touch replay without a bitmap and under each `--crash-safe-bitmaps` mode
/// (`bitmap_VARIANT.bitmap.json`); empty if the bitmap cost did not run.
fn bitmap_table(res: &Results) -> Result<String, String> {
    let mut points = Vec::new();
    for &(v, label) in BITMAP_VARIANTS {
        if let Some(p) = res
            .fio(&format!("bitmap_{v}"), "bitmap")?
            .as_ref()
            .and_then(bitmap_point)
        {
            points.push((v, label, p));
        }
    }
    let Some(&(_, _, (base, _))) = points.iter().find(|p| p.0 == "none") else {
        return Ok(String::new());
    };
    let mut t = String::new();
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "| dirty bitmap (first-touch replay, no access) | IOPS | mean µs | vs no bitmap |"
    );
    let _ = writeln!(t, "|---|---|---|---|");
    for (_, label, (iops, lat)) in points {
        let vs = if base == 0 {
            "-".to_string()
        } else {
            format!("{:.2}x", iops as f64 / base as f64)
        };
        let _ = writeln!(t, "| {label} | {iops} | {lat:.1} | {vs} |");
    }
    Ok(t)
}

// ---------------------------------------------------------------- all tables

fn tables(res: &Results, systems: &[&str], floors: &[&str]) -> Result<String, String> {
    // The vhost-user-blk guest's system has only guest-first phases.
    let fio_systems: Vec<&str> = systems
        .iter()
        .copied()
        .filter(|&s| s != VHOST_SYSTEM)
        .collect();
    let m = measure(res, &fio_systems)?;
    // A guest-only run (BENCH_ONLY=guest) has none of the main table's workloads.
    let mut t = if m.iter().flatten().any(Option::is_some) {
        main_table(&fio_systems, &m)
    } else {
        String::new()
    };
    t += &guest_table(res, systems)?;
    t += &writers_table(res, &fio_systems)?;
    if let Some(sc) = res.text("scale.txt")? {
        t += &scale_table(&sc)?;
    }
    if let Some(mem) = res.text("fleecefs.mem.txt")? {
        t += &mem_line(&mem);
    }
    if !floors.is_empty() {
        t += &floor_table(res, floors)?;
    }
    t += &bitmap_table(res)?;
    if let Some(micro) = res.text("micro.txt")?.filter(|m| !m.is_empty()) {
        let _ = write!(t, "\n```\n{micro}```\n");
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// fio JSON with one job per (name, read (bytes, bw, iops, lat_ns), write (...)).
    fn fio_json(jobs: &[(&str, [f64; 4], [f64; 4])]) -> String {
        let dir = |d: [f64; 4]| {
            format!(
                r#"{{"io_bytes": {}, "bw_bytes": {}, "iops": {}, "lat_ns": {{"min": 1, "mean": {}}}, "runtime": 1}}"#,
                d[0], d[1], d[2], d[3]
            )
        };
        let jobs: Vec<String> = jobs
            .iter()
            .map(|(n, r, w)| {
                format!(
                    r#"{{"jobname": "{n}", "groupid": 0, "read": {}, "write": {}, "trim": {}}}"#,
                    dir(*r),
                    dir(*w),
                    dir([0.0; 4])
                )
            })
            .collect();
        format!(
            r#"{{"fio version": "fio-3.33", "jobs": [{}], "disk_util": []}}"#,
            jobs.join(",")
        )
    }

    const NONE: [f64; 4] = [0.0, 0.0, 0.0, 0.0];

    fn parse(jobs: &[(&str, [f64; 4], [f64; 4])]) -> FioOutput {
        FioOutput::parse(&fio_json(jobs)).unwrap()
    }

    #[test]
    fn parses_fio_json_and_rejects_other_text() {
        let f = parse(&[("a", [1e6, 2e6, 3.0, 4000.0], NONE)]);
        assert_eq!(f.jobs[0].jobname, "a");
        assert_eq!(f.jobs[0].read.bw_bytes, 2e6);
        assert_eq!(f.jobs[0].read.lat_ns.mean, 4000.0);
        assert!(FioOutput::parse("fio: some error\n").is_err());
        assert!(FioOutput::parse(r#"{"jobs": [{"jobname": "x"}]}"#).is_err());
    }

    #[test]
    fn stats_sums_jobs_and_weighs_latency_by_iops() {
        // two writers: 100 IOPS at 10 us and 300 IOPS at 30 us -> 400 IOPS at 25 us
        let f = parse(&[
            ("w", NONE, [1.0, 1e6, 100.0, 10_000.0]),
            ("w", NONE, [1.0, 3e6, 300.0, 30_000.0]),
        ]);
        let s = stats(&f, None, None).unwrap();
        assert_eq!(s.mb_s, 4.0);
        assert_eq!(s.iops, 400.0);
        assert!((s.lat_us - 25.0).abs() < 1e-9);
    }

    #[test]
    fn stats_filters_by_job_and_direction_and_skips_idle_directions() {
        let f = parse(&[
            ("snapread", [1.0, 5e8, 500.0, 2e6], NONE),
            ("livewrite", NONE, [1.0, 4e6, 1000.0, 8000.0]),
        ]);
        let r = stats(&f, Some("snapread"), Some(Dir::Read)).unwrap();
        assert_eq!((r.mb_s, r.iops, r.lat_us), (500.0, 500.0, 2000.0));
        let w = stats(&f, Some("livewrite"), Some(Dir::Write)).unwrap();
        assert_eq!((w.mb_s, w.iops, w.lat_us), (4.0, 1000.0, 8.0));
        assert_eq!(stats(&f, Some("snapread"), Some(Dir::Write)), None);
        assert_eq!(stats(&f, Some("nosuchjob"), None), None);
        // both jobs, both directions
        assert_eq!(stats(&f, None, None).unwrap().iops, 1500.0);
    }

    #[test]
    fn first_job_prefers_the_written_direction() {
        let f = parse(&[("a", [1.0, 9e6, 9.0, 9000.0], [1.0, 2e6, 2.0, 2000.0])]);
        assert_eq!(first_job(&f).unwrap().iops, 2.0);
        let f = parse(&[("a", [1.0, 9e6, 9.0, 9000.0], NONE)]);
        assert_eq!(first_job(&f).unwrap().iops, 9.0);
    }

    #[test]
    fn ratio_is_by_throughput_and_none_without_a_base() {
        let s = |mb_s| {
            Some(Stats {
                mb_s,
                iops: 1.0,
                lat_us: 1.0,
            })
        };
        assert_eq!(ratio(s(30.0), s(10.0)), Some(3.0));
        assert_eq!(ratio(s(30.0), s(0.0)), None);
        assert_eq!(ratio(None, s(1.0)), None);
        assert_eq!(ratio_cell(Some(0.456)), "0.46x");
        assert_eq!(ratio_cell(Some(0.0)), "-");
        assert_eq!(ratio_cell(None), "-");
    }

    #[test]
    fn target_lines() {
        let tg = &TARGETS[1]; // snapshot seq read vs direct, 0.5
        assert_eq!(
            target_line(tg, Some(0.5)),
            "| snapshot seq read vs direct | 0.50x | >= 0.5x | yes |"
        );
        assert_eq!(
            target_line(&TARGETS[0], Some(2.994)),
            "| snapshot seq read vs qemu | 2.99x | >= 3x | **no** |"
        );
        assert_eq!(
            target_line(tg, None),
            "| snapshot seq read vs direct | - | >= 0.5x | ? |"
        );
    }

    #[test]
    fn summary_line_lists_every_active_direction() {
        let f = parse(&[
            ("snapread", [1.0, 1_198_400_000.0, 1143.2, 870_300.0], NONE),
            ("livewrite", NONE, [1.0, 459_400_000.0, 112_146.0, 8_700.0]),
        ]);
        assert_eq!(
            summary_line(&f, "direct", "mixed_buffered", None),
            "   direct    mixed_buffered   snapread read 1198.4 MB/s 1143 IOPS 870.3 us; livewrite write 459.4 MB/s 112146 IOPS 8.7 us\n"
        );
    }

    #[test]
    fn status_pid_reads_the_pid_or_fails() {
        assert_eq!(
            status_pid(r#"{"pid": 4242, "mountpoint": "/m", "devices": []}"#),
            Ok(4242)
        );
        assert_eq!(
            status_pid(r#"{"pid": 4242, "keeper_pid": 4242, "worker_pid": 4250}"#),
            Ok(4250)
        );
        assert_eq!(status_pid(r#"{"pid": 4242, "worker_pid": null}"#), Ok(4242));
        assert!(status_pid(r#"{"mountpoint": "/m"}"#).is_err());
        assert!(status_pid("").is_err());
    }

    #[test]
    fn main_table_columns_and_ratios_follow_the_systems() {
        let one = |mb_s| {
            Some(Stats {
                mb_s,
                iops: 2.0,
                lat_us: 3.0,
            })
        };
        // every row: direct 100 MB/s, fleecefs 50 MB/s
        let m: Vec<Vec<Option<Stats>>> = ROWS.iter().map(|_| vec![one(100.0), one(50.0)]).collect();
        let t = main_table(&["direct", "fleecefs"], &m);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "| workload | direct MB/s | IOPS | lat µs | fleecefs MB/s | IOPS | lat µs | fleecefs/direct |"
        );
        assert_eq!(lines[1], "|---|---|---|---|---|---|---|---|");
        assert_eq!(
            lines[2],
            "| snapshot seq read 1M (access, nothing copied yet) | 100.0 | 2 | 3.0 | 50.0 | 2 | 3.0 | 0.50x |"
        );
        // targets against qemu: unknown without qemu; against direct: measured
        assert!(t.contains("| snapshot seq read vs qemu | - | >= 3x | ? |"));
        assert!(t.contains("| snapshot seq read vs direct | 0.50x | >= 0.5x | yes |"));
        assert!(t.contains("| live 1M seq read, no access vs direct | 0.50x | >= 0.7x | **no** |"));
    }

    #[test]
    fn scale_table_limits() {
        let kv = "one1t.mount_ms=12\none1t.setup_ms=3\none1t.rss_kb=20480\none1t.hwm_kb=30720\n\
                  one1t.devices=1\nsixteen.mount_ms=40\nsixteen.setup_ms=150\nsixteen.rss_kb=1024\n\
                  sixteen.hwm_kb=1024\nsixteen.devices=16\ndevice_bytes=1099511627776\ncluster=65536\n";
        let t = scale_table(kv).unwrap();
        // 2^40 / 2^16 bits = 2 MiB per bitmap
        assert!(t.contains("RSS limit: 64 MiB + 3 bitmaps of 2 MiB per device |"));
        assert!(t.contains(
            "| 1 device of 1 TiB (sparse) | 12 ms (< 1000) | 3 ms (< 100) | 20.0 MiB (30.0 MiB) | 70 MiB | yes |"
        ));
        // setup over 100 ms fails the row; limit 64 + 3 * 2 * 16
        assert!(t.contains("| 150 ms (< 100) | 1.0 MiB (1.0 MiB) | 160 MiB | **no** |"));
        assert!(scale_table("cluster=x\ndevice_bytes=1\n").is_err());
        assert!(scale_table("device_bytes=1\n").is_err());
    }

    #[test]
    fn mem_line_joins_the_status_lines() {
        assert_eq!(
            mem_line("VmHWM:\t   51234 kB\nVmRSS:\t   40000 kB\n"),
            "\nfleecefs daemon of the workloads above, at unmount: VmHWM: 51234 kB, VmRSS: 40000 kB\n"
        );
    }

    #[test]
    fn bitmap_point_rounds_like_the_table() {
        let f = parse(&[("bitmap", NONE, [1.0, 1.0, 2500.5, 12_345.0])]);
        // IOPS rounded half to even, latency to one decimal
        assert_eq!(bitmap_point(&f), Some((2500, 12.3)));
    }

    /// A results directory with direct and fleecefs no-access runs, one floor and the
    /// bitmap cost: the floor and bitmap tables' lines.
    #[test]
    fn floor_and_bitmap_tables_from_a_results_directory() {
        let dir = tempfile::tempdir().unwrap();
        let put = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        for (sys, scale) in [("direct", 4.0), ("floor", 2.0), ("fleecefs", 1.0)] {
            put(
                &format!("{sys}.randwrite_noacc.json"),
                fio_json(&[("w", NONE, [1.0, 4e6 * scale, 1000.0 * scale, 5000.0])]),
            );
            put(
                &format!("{sys}.seqwrite_noacc.json"),
                fio_json(&[("w", NONE, [1.0, 1e8 * scale, 100.0 * scale, 7000.0])]),
            );
            put(
                &format!("{sys}.seqread_noacc.json"),
                fio_json(&[("r", [1.0, 2e8 * scale, 200.0 * scale, 9000.0], NONE)]),
            );
        }
        for (v, iops) in [
            ("none", 1000.0),
            ("on", 900.0),
            ("sync", 100.0),
            ("off", 950.0),
        ] {
            put(
                &format!("bitmap_{v}.bitmap.json"),
                fio_json(&[("bitmap", NONE, [1.0, 1.0, iops, 20_000.0])]),
            );
        }
        let res = Results {
            dir: dir.path().to_path_buf(),
        };
        let floor = floor_table(&res, &["floor"]).unwrap();
        let lines: Vec<&str> = floor.lines().collect();
        assert_eq!(lines[0], "");
        assert_eq!(
            lines[1],
            "| no access, the FUSE floor | direct | floor (/dev/fuse) | fleecefs | fleecefs / floor (/dev/fuse) | floor (/dev/fuse) / direct |"
        );
        assert_eq!(lines[2], "|---|---|---|---|---|---|");
        assert_eq!(
            lines[3],
            "| live 4K randwrite | 4000 IOPS (5.0 µs) | 2000 IOPS (5.0 µs) | 1000 IOPS (5.0 µs) | 0.50x | 0.50x |"
        );
        assert_eq!(
            lines[5],
            "| live 1M seq read | 800 MB/s (9.0 µs) | 400 MB/s (9.0 µs) | 200 MB/s (9.0 µs) | 0.50x | 0.50x |"
        );

        let bm = bitmap_table(&res).unwrap();
        assert!(bm.contains("| no bitmap | 1000 | 20.0 | 1.00x |"));
        assert!(bm.contains("| bitmap, --crash-safe-bitmaps sync | 100 | 20.0 | 0.10x |"));
        // the rows keep their order: none, on, sync, off
        let on = bm.find("on (default)").unwrap();
        let off = bm.find("bitmaps off").unwrap();
        assert!(on < off);

        // without the bitmap runs there is no bitmap table; a broken file is an error
        std::fs::remove_file(dir.path().join("bitmap_none.bitmap.json")).unwrap();
        assert_eq!(bitmap_table(&res).unwrap(), "");
        put("fleecefs.seqread_noacc.json", "fio: error".to_string());
        let e = floor_table(&res, &["floor"]).unwrap_err();
        assert!(e.contains("fleecefs.seqread_noacc.json"), "{e}");
    }

    /// fio JSON of a guest phase: the guest group (read IOPS, write IOPS, write p50/p99/
    /// p99.9 in ns) and, with `reader_bw`, a reader group.
    fn guest_json(r_iops: f64, w_iops: f64, w_pct: [f64; 3], reader_bw: Option<f64>) -> String {
        let lat = |pct: [f64; 3]| {
            format!(
                r#"{{"mean": 1, "percentile": {{"50.000000": {}, "99.000000": {}, "99.900000": {}}}}}"#,
                pct[0], pct[1], pct[2]
            )
        };
        let dir = |iops: f64, pct: [f64; 3]| {
            format!(
                r#"{{"io_bytes": {}, "bw_bytes": {}, "iops": {iops}, "lat_ns": {}}}"#,
                iops * 4096.0,
                iops * 4096.0,
                lat(pct)
            )
        };
        let mut jobs = vec![format!(
            r#"{{"jobname": "guest", "read": {}, "write": {}}}"#,
            dir(r_iops, [1e5, 2e6, 3e6]),
            dir(w_iops, w_pct)
        )];
        if let Some(bw) = reader_bw {
            jobs.push(format!(
                r#"{{"jobname": "reader", "read": {{"io_bytes": 1, "bw_bytes": {bw}, "iops": 1, "lat_ns": {{"mean": 1}}}}, "write": {{"io_bytes": 0, "bw_bytes": 0, "iops": 0, "lat_ns": {{"mean": 0}}}}}}"#
            ));
        }
        format!(r#"{{"jobs": [{}]}}"#, jobs.join(","))
    }

    #[test]
    fn guest_table_phases_and_goals() {
        let dir = tempfile::tempdir().unwrap();
        let put = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        let res = Results {
            dir: dir.path().to_path_buf(),
        };
        assert_eq!(guest_table(&res, &["qemu", "fleecefs"]).unwrap(), "");
        put(
            "fleecefs.guest_idle.json",
            guest_json(7000.0, 3000.0, [5e5, 2e6, 4e6], None),
        );
        put(
            "fleecefs.guest_access.json",
            guest_json(6000.0, 2500.0, [6e5, 7e6, 9e6], None),
        );
        put(
            "fleecefs.guest_backup.json",
            guest_json(6500.0, 2700.0, [5e5, 3e6, 5e6], Some(900e6)),
        );
        put(
            "qemu.guest_backup.json",
            guest_json(700.0, 300.0, [5e6, 9e6, 1e7], Some(100e6)),
        );
        put(
            "fleecefs.guest_idle.cpu",
            "cpu_us_per_request=3.50\n".to_string(),
        );
        let t = guest_table(&res, &["qemu", "fleecefs"]).unwrap();
        assert!(t.contains(
            "| idle (no access) | fleecefs | 7000 | 3000 | 100% | 0.50 | 2.00 | 4.00 | 2.00 | - | 3.50 |"
        ), "{t}");
        assert!(t.contains(
            "| access + full-speed 1 MiB snapshot reader | fleecefs | 6500 | 2700 | 90% | 0.50 | 3.00 | 5.00 | 2.00 | 900.0 | - |"
        ), "{t}");
        // qemu without its idle phase: no share of idle
        assert!(t.contains("| qemu | 700 | 300 | - |"), "{t}");
        assert!(
            t.contains(
                "| guest write IOPS during the backup, share of idle | 90% | >= 80% | yes |"
            ),
            "{t}"
        );
        assert!(
            t.contains("| guest write p99 during the backup, vs idle | 1.50x | <= 2x | yes |"),
            "{t}"
        );
        assert!(
            t.contains("| reader MB/s during the backup, vs qemu's | 9.00x | >= 3x | yes |"),
            "{t}"
        );
        assert!(t.contains("| first touch: guest write p99 during the access without a reader, vs idle | 3.50x | <= 3x | **no** |"), "{t}");
    }

    #[test]
    fn cpu_per_request_counts_every_job_and_merge_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.json");
        let b = dir.path().join("b.json");
        std::fs::write(
            &a,
            r#"{"jobs": [{"jobname": "guest", "read": {"io_bytes": 1, "bw_bytes": 1, "iops": 1, "total_ios": 700, "lat_ns": {"mean": 1}}, "write": {"io_bytes": 1, "bw_bytes": 1, "iops": 1, "total_ios": 300, "lat_ns": {"mean": 1}}}]}"#,
        )
        .unwrap();
        std::fs::write(
            &b,
            r#"{"jobs": [{"jobname": "reader", "read": {"io_bytes": 1, "bw_bytes": 1, "iops": 1, "total_ios": 1000, "lat_ns": {"mean": 1}}, "write": {"io_bytes": 0, "bw_bytes": 0, "iops": 0, "total_ios": 0, "lat_ns": {"mean": 0}}}]}"#,
        )
        .unwrap();
        let merged = merge(&[a.display().to_string(), b.display().to_string()]).unwrap();
        let fio = FioOutput::parse(&merged).unwrap();
        assert_eq!(fio.jobs.len(), 2);
        // 2000 requests, 10 ticks of 100 a second: 0.1 s / 2000 = 50 µs
        assert_eq!(cpu_us_per_request(&fio, 10.0, 100.0), Some(50.0));
        assert_eq!(parse_cpu("cpu_us_per_request=50.00\n"), Some(50.0));
        let out = run(&[
            "cpu".into(),
            a.display().to_string(),
            "10".into(),
            "100".into(),
        ]);
        assert_eq!(out.unwrap(), "cpu_us_per_request=100.00\n");
    }

    #[test]
    fn writers_table_lists_each_system() {
        let dir = tempfile::tempdir().unwrap();
        let res = Results {
            dir: dir.path().to_path_buf(),
        };
        assert_eq!(writers_table(&res, &["fleecefs"]).unwrap(), "");
        for (n, iops) in [(1, 1000.0), (4, 1500.0), (16, 2000.0)] {
            std::fs::write(
                dir.path().join(format!("fleecefs.scale_w{n}.json")),
                fio_json(&[("writers", NONE, [1.0, iops * 4096.0, iops, 1.0])]),
            )
            .unwrap();
        }
        let t = writers_table(&res, &["qemu", "fleecefs"]).unwrap();
        assert!(
            t.contains("| fleecefs | 1000 | 1500 | 2000 | 2.00x |"),
            "{t}"
        );
        assert!(t.contains("| qemu | - | - | - | - |"), "{t}");
    }
}

#!/usr/bin/env bash
# The frontends comparison (docs/performance.md, "Frontends: vhost-user-blk"): the way
# virtio-blk queues drive a disk, 4K random requests 70% reads / 30% writes, queue depth
# 32 on each of 2 queues, through libblkio (examples/blkio_bench.rs), on a 1 GiB image
# kept in the page cache, in ROUNDS rounds of:
#   image-buffered     the image itself, io_uring, buffered (the page-cache limit)
#   image-direct       the image itself, io_uring, O_DIRECT
#   qsd-export         qemu-storage-daemon --export vhost-user-blk of the image
#   qsd-export-cbw     the same with a copy-before-write filter and an access (a
#                      snapshot-access node over a raw fleecing file; first touches copy)
#   fleecefs-live      fleecefs live/NAME over FUSE (io_uring, O_DIRECT), no access
#   fleecefs-live-cbw  the same with an access
#   fleecefs-export    fleecefs --vhost-user-blk, no access
#   fleecefs-export-cbw  the same with an access (fleecefs setup)
# Each line: IOPS, mean/p50/p99 latency (µs) and, for daemons, CPU time per request
# (utime+stime of the daemon's process over the run / requests). Raw JSON lines go to
# $OUT/frontends.jsonl. Run as root.
#   BIN=target/release/fleecefs   RUNTIME=10 (seconds per run)   ROUNDS=3   SIZE_MB=1024
#   OUT=target/bench
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-$PWD/target/release/fleecefs}
CLIENT=$PWD/target/release/examples/blkio_bench
RT=${RUNTIME:-10}
ROUNDS=${ROUNDS:-3}
SIZE_MB=${SIZE_MB:-1024}
OUT=${OUT:-$PWD/target/bench}
[ -x "$BIN" ] || cargo build --release --quiet
[ -x "$CLIENT" ] || cargo build --release --quiet --example blkio_bench
command -v qemu-storage-daemon >/dev/null || { echo "bench-frontends: qemu-storage-daemon is missing (apt-get install qemu-system-common)" >&2; exit 1; }
D=$(mktemp -d /tmp/fleecefs-frontends.XXXXXX)
chmod 700 "$D"
QSD=""
cleanup() {
    [ -z "$QSD" ] || kill "$QSD" 2>/dev/null || true
    "$BIN" unmount "$D/m" 2>/dev/null || true
    rm -rf "$D"
}
trap cleanup EXIT
mkdir -p "$D/m" "$OUT"
head -c $((SIZE_MB << 20)) /dev/urandom >"$D/img"
JSONL=$OUT/frontends.jsonl
: >"$JSONL"
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # clock ticks
HZ=$(getconf CLK_TCK)

# measure NAME PID DRIVER PATH [client args]: one run, one JSON line
measure() {
    local name=$1 pid=$2 c0=0 c1=0 out
    shift 2
    cat "$D/img" >/dev/null                 # the source stays in the page cache
    [ "$pid" = - ] || c0=$(cpu "$pid")
    out=$("$CLIENT" "$@" --seconds "$RT" --queues 2 --qd 32 --read-pct 70)
    [ "$pid" = - ] || c1=$(cpu "$pid")
    python3 - "$name" "$round" "$out" "$((c1 - c0))" "$HZ" "$pid" <<'EOF' | tee -a "$JSONL"
import json, sys
name, rnd, out, ticks, hz, pid = sys.argv[1:]
d = json.loads(out)
d["name"], d["round"] = name, int(rnd)
n = d["reads"] + d["writes"]
d["cpu_us_per_request"] = None if pid == "-" else round(int(ticks) / int(hz) * 1e6 / max(n, 1), 2)
print(json.dumps(d))
EOF
}

qsd_start() {
    rm -f "$D/qsd.pid" "$D/q.sock"
    qemu-storage-daemon "$@" --pidfile "$D/qsd.pid" --daemonize
    QSD=$(cat "$D/qsd.pid")
}
qsd_stop() { kill "$QSD"; while kill -0 "$QSD" 2>/dev/null; do sleep 0.1; done; QSD=""; }
QSD_SRC=(--blockdev "file,node-name=f,filename=$D/img" --blockdev "raw,node-name=src,file=f")
QSD_EXPORT="addr.type=unix,addr.path=$D/q.sock,writable=on,num-queues=2"
fleecefs_worker() { "$BIN" status "$D/m" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["worker_pid"])'; }

for round in $(seq "$ROUNDS"); do
    measure image-buffered - io_uring "$D/img"
    measure image-direct - io_uring "$D/img" --direct

    qsd_start "${QSD_SRC[@]}" --export "vhost-user-blk,id=e,node-name=src,$QSD_EXPORT"
    measure qsd-export "$QSD" virtio-blk-vhost-user "$D/q.sock"
    qsd_stop
    rm -f "$D/fl.raw"
    truncate -s $((SIZE_MB << 20)) "$D/fl.raw"
    qsd_start "${QSD_SRC[@]}" \
        --blockdev "file,node-name=fl-file,filename=$D/fl.raw,discard=unmap" \
        --blockdev "raw,node-name=fl,file=fl-file,discard=unmap" \
        --blockdev "copy-before-write,node-name=cbw,file=src,target=fl,discard=unmap,on-cbw-error=break-snapshot,cbw-timeout=45" \
        --blockdev "snapshot-access,node-name=snap,file=cbw,discard=unmap" \
        --export "vhost-user-blk,id=e,node-name=cbw,$QSD_EXPORT"
    measure qsd-export-cbw "$QSD" virtio-blk-vhost-user "$D/q.sock"
    qsd_stop

    "$BIN" mount "$D/m" --state-dir "$D/s" --device vm="$D/img" --vhost-user-blk vm="$D/vm.sock" >/dev/null 2>&1
    W=$(fleecefs_worker)
    measure fleecefs-live "$W" io_uring "$D/m/live/vm" --direct
    "$BIN" setup "$D/m" --target t >/dev/null
    measure fleecefs-live-cbw "$W" io_uring "$D/m/live/vm" --direct
    "$BIN" teardown "$D/m" --target t --failure >/dev/null
    measure fleecefs-export "$W" virtio-blk-vhost-user "$D/vm.sock"
    "$BIN" setup "$D/m" --target t >/dev/null
    measure fleecefs-export-cbw "$W" virtio-blk-vhost-user "$D/vm.sock"
    "$BIN" teardown "$D/m" --target t --failure >/dev/null
    "$BIN" unmount "$D/m" >/dev/null
done

python3 - "$JSONL" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
names = list(dict.fromkeys(r["name"] for r in rows))
print("| path | IOPS per round | p99 µs per round | CPU µs/request |")
print("|---|---|---|---|")
for n in names:
    rs = [r for r in rows if r["name"] == n]
    cpu = [r["cpu_us_per_request"] for r in rs if r["cpu_us_per_request"] is not None]
    print("| %s | %s | %s | %s |" % (n, ", ".join("%dk" % round(r["iops"] / 1000) for r in rs),
          ", ".join("%.0f" % r["lat_us"]["p99"] for r in rs), ", ".join("%.1f" % c for c in cpu) or "-"))
EOF

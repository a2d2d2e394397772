#!/usr/bin/env bash
# CPU cost of a snapshot read (docs/performance.md, "CPU cost of a snapshot read"): mounts
# a 1 GiB cached image, sets up an access, and reads snapshot/d with fio (1 MiB psync reads,
# RUNTIME seconds, no guest I/O). Prints the rate and the CPU time per MiB of the daemon's
# worker (/proc/PID/stat utime+stime) and of the whole machine (/proc/stat busy time).
#   BIN=target/release/fleecefs  the binary      RUNTIME=10  seconds of reading
#   OPTS="..."                   extra mount options (e.g. "--backup-priority low")
#   PERF=1                       also `perf record -a -g` 4 s of it (report in $D/perf.data)
# Run as root on a quiet machine: it measures the CPUs, so anything else running counts.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-$PWD/target/release/fleecefs}
RT=${RUNTIME:-10}
[ -x "$BIN" ] || { echo "bench-readcost: build first (cargo build --release): $BIN" >&2; exit 1; }
command -v fio >/dev/null || { echo "bench-readcost: fio is missing (apt-get install fio)" >&2; exit 1; }
D=$(mktemp -d /tmp/fleecefs-readcost.XXXXXX)
cleanup() { "$BIN" unmount "$D/m" 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT
mkdir -p "$D/m"
head -c $((1024 << 20)) /dev/urandom >"$D/src.img"
# shellcheck disable=SC2086
"$BIN" mount "$D/m" --state-dir "$D/s" --device d="$D/src.img" ${OPTS:-}
"$BIN" setup "$D/m" --target t >/dev/null
W=$("$BIN" status "$D/m" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["worker_pid"])')
cat "$D/src.img" >/dev/null                          # the source stays in the page cache
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }    # utime + stime, clock ticks
busy() { awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8, $5+$6}' /proc/stat; }
read -r T0 I0 < <(busy); C0=$(cpu "$W")
fio --name=r --filename="$D/m/snapshot/d" --rw=read --bs=1M --ioengine=psync --time_based \
    --runtime="$RT" --output-format=json >"$D/fio.json" &
FIO=$!
if [ -n "${PERF:-}" ]; then sleep 2; perf record -a -g -o "$D/perf.data" -- sleep 4 >/dev/null 2>&1; fi
wait $FIO
read -r T1 I1 < <(busy); C1=$(cpu "$W")
HZ=$(getconf CLK_TCK)
python3 - "$D/fio.json" "$RT" "$HZ" "$C0" "$C1" "$T0" "$T1" "$I0" "$I1" <<'PY'
import json, sys
f, rt, hz, c0, c1, t0, t1, i0, i1 = sys.argv[1], *map(float, sys.argv[2:])
mib = json.load(open(f))["jobs"][0]["read"]["io_bytes"] / 1048576
daemon = (c1 - c0) / hz
machine = ((t1 - t0) - (i1 - i0)) / hz
print(f"{mib:.0f} MiB in {rt:.0f} s: {mib / rt:.0f} MiB/s; CPU per MiB: daemon {daemon / mib * 1e6:.0f} us, whole machine {machine / mib * 1e6:.0f} us")
PY
"$BIN" teardown "$D/m" --target t --success >/dev/null

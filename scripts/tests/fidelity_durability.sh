#!/usr/bin/env bash
# A write to live/NAME with O_DSYNC or RWF_DSYNC semantics is
# fdatasync'ed on the source before the reply (O_SYNC, RWF_SYNC: fsync), in every mode
# (direct I/O, --live-cache buffered and O_DIRECT opens); plain writes sync nothing.
# Checked by tracing the daemon: in each worker thread, every pwrite to the source is
# followed by an fdatasync/fsync of the source before the write's reply (a 24-byte
# writev to /dev/fuse).
source "$(dirname "$0")/lib.sh"
command -v strace >/dev/null || fail "strace is missing (scripts/test.sh installs it)"

M=$((1 << 20))
head -c $((16 * M)) /dev/zero >"$T/a.img"

# writes KIND COUNT : COUNT 4 KiB writes of one kind to live/d
writes() {
    python3 - "$T/mp/live/d" "$1" "$2" <<'PY'
import os, sys
path, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
buf = os.urandom(4096)
flags = {"dsync": os.O_DSYNC, "sync": os.O_SYNC, "odirect-dsync": os.O_DSYNC | os.O_DIRECT}.get(kind, 0)
fd = os.open(path, os.O_WRONLY | flags)
rwf = {"rwf-dsync": os.RWF_DSYNC, "rwf-sync": os.RWF_SYNC}.get(kind, 0)
import mmap
m = mmap.mmap(-1, 4096)  # page-aligned buffer (O_DIRECT)
m.write(buf)
for i in range(n):
    os.pwritev(fd, [m], i * 4096, rwf)
os.close(fd)
PY
}

# check TRACE WANT_DATASYNC WANT_FSYNC : every source write in TRACE synced before its
# reply; at least this many fdatasync and fsync calls on the source, and none of a kind
# not wanted (plain writes: no sync at all)
check() {
    python3 - "$1" "$2" "$3" "$SRCFD" <<'PY' || fail "trace check failed for $1"
import re, sys
trace, want_ds, want_fs, src = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pending, ds, fs, writes, bad = {}, 0, 0, 0, 0
for line in open(trace):
    m = re.match(r"(\d+)\s+(\w+)\((\d+)(.*)", line)
    if not m:
        continue
    tid, call, fd, rest = m.groups()
    if call == "pwrite64" and fd == src:
        pending[tid] = True
        writes += 1
    elif call in ("fdatasync", "fsync") and fd == src:
        pending[tid] = False
        if call == "fdatasync":
            ds += 1
        else:
            fs += 1
    elif call == "writev" and line.rstrip().endswith("= 24"):
        if pending.get(tid):
            bad += 1
        pending[tid] = False
print(f"{trace}: {writes} source writes, {ds} fdatasync, {fs} fsync, {bad} replied before a sync")
if bad and (want_ds or want_fs):
    sys.exit(1)
# --live-cache: after a buffered O_(D)SYNC write the kernel also sends its own fsync
ok = ds >= want_ds and fs >= want_fs and (ds == 0 or want_ds) and (fs == 0 or want_fs)
if not ok:
    print(f"want {want_ds} fdatasync and {want_fs} fsync (or more of the wanted kind only)")
    sys.exit(1)
PY
}

# attached PID TRACER : waits (30 s at most) until TRACER traces every thread of PID
attached() {
    local t all
    for _ in $(seq 300); do
        all=1
        for t in /proc/"$1"/task/*; do
            grep -q "^TracerPid:[[:space:]]*$2\$" "$t/status" 2>/dev/null || all=
        done
        [ -n "$all" ] && return 0
        sleep 0.1
    done
    return 1
}
run_mode() {
    local mode=$1
    shift
    fmount "$T/mp" --state-dir "$T/st" --device d="$T/a.img" "$@"
    # the worker serves the requests and holds the source (the keeper only the mount)
    PID=$(status_json "$T/mp" 'd["worker_pid"]')
    SRCFD=
    for f in /proc/"$PID"/fd/*; do
        [ "$(readlink "$f")" = "$T/a.img" ] && SRCFD=$(basename "$f")
    done
    [ -n "$SRCFD" ] || fail "no source fd in the daemon"
    for kind in plain dsync sync rwf-dsync rwf-sync odirect-dsync; do
        strace -f -qq -p "$PID" -e trace=pwrite64,fdatasync,fsync,writev -o "$T/tr.$mode.$kind" &
        local st=$!
        attached "$PID" "$st" || fail "strace did not attach to the worker in 30 s"
        writes "$kind" 5
        sleep 0.3
        kill "$st"
        wait "$st" 2>/dev/null || true
        case $kind in
        plain) check "$T/tr.$mode.$kind" 0 0 ;;
        dsync | rwf-dsync | odirect-dsync) check "$T/tr.$mode.$kind" 5 0 ;;
        sync | rwf-sync) check "$T/tr.$mode.$kind" 0 5 ;;
        esac
    done
    "$FLEECEFS" unmount "$T/mp"
}

run_mode direct
run_mode cache --live-cache
echo "fidelity_durability: ok"

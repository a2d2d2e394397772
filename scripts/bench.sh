#!/usr/bin/env bash
# fleecefs benchmark: the same fio workloads, in one run, on
#   direct    the source image itself (the physical limit on this machine),
#   qemu      qemu-storage-daemon: copy-before-write filter + snapshot-access node over a
#             raw fleecing file, live and snapshot exported with --export fuse (writable),
#   fleecefs  this project, release build.
#   fleecefs_vhost  the same, but the guest-first phases' guest is a vhost-user-blk client
#             (libblkio, examples/blkio_bench.rs) on `--vhost-user-blk` instead of fio on
#             live/NAME; it runs only the guest-first phases.
# Sources stay in the page cache (fio --invalidate=0) so the layer is measured, not the
# disk. Prints a markdown table (MB/s, IOPS, mean latency per system, the ratios
# fleecefs/qemu and fleecefs/direct, the performance targets) and a scale line.
#
# This script is the driver: it sets the systems up, runs the workloads and keeps the raw
# results (fio JSON and a few text files) in one directory; examples/bench_report.rs reads
# them and prints every table (it can be re-run on BENCH_OUT/json, see its header).
#
# Run as root on Debian:  scripts/bench.sh
# Environment:
#   BENCH_RUNTIME=10          seconds per time-based workload
#   BENCH_SIZE_MB=1024        source image size (MiB; the targets are for 1 GiB)
#   BENCH_TMPDIR=/tmp         where the temporary directory goes
#   BENCH_OUT=target/bench    where results (fio JSON, results.md, perf reports) are kept
#   BENCH_SYSTEMS="direct qemu fleecefs fleecefs_vhost"
#   BENCH_PERF=SYSTEM:WORKLOAD[,...]  perf record -g that system's daemon during that
#                             workload (e.g. fleecefs:cbw_first); reports in BENCH_OUT
#   BENCH_NO_INSTALL=1        do not apt-get anything
#   BENCH_FLEECEFS_OPTS="..." extra 'fleecefs mount' options (e.g. "--cbw-timeout 0")
#   BENCH_FLEECEFS_BIN=PATH   use this fleecefs binary, build nothing (before/after a change)
#   BENCH_REV=HEAD            benchmark this commit (exported with git archive, built in
#                             BENCH_OUT) instead of the working tree
#   BENCH_FLOOR=0             skip the FUSE floor (examples/fuse_floor.rs: a pass-through
#                             FUSE server, over /dev/fuse, over io_uring and with the
#                             writeback cache, on the no-access live workloads; what any
#                             FUSE server can reach here)
#   BENCH_ONLY=guest          only the guest-first workloads: the VM-like load
#                             in three phases (idle, access, access + full-speed snapshot
#                             reader) and the writer scaling line, on BENCH_SYSTEMS (then
#                             "qemu fleecefs fleecefs_vhost" by default); no floor, bitmap cost, micro-
#                             benchmarks or scale line. About 2.5 minutes of measuring.
#   BENCH_ONLY=frontends      only the frontends comparison (scripts/bench-frontends.sh):
#                             libblkio 4K random 70/30, QD32 x 2 queues, on the image
#                             (buffered, O_DIRECT), qemu-storage-daemon's vhost-user-blk
#                             export (with and without a copy-before-write filter),
#                             live/NAME, and fleecefs's vhost-user-blk export (with and
#                             without an access), 3 rounds; a full run ends with it too
#                             (BENCH_FRONTENDS=0: not)
#   BENCH_GUEST_RUNTIME=15    seconds per guest phase
#   BENCH_REWARM=0            do not read the source back into the page cache before each
#                             workload (see settle)
#   BENCH_ONLY=nbd            only the NBD path (also part of a full run): nbdcopy of the
#                             whole snapshot from fleecefs's NBD export (mount --nbd) and
#                             from qemu-storage-daemon's NBD export of its snapshot-access
#                             node over a copy-before-write filter, and cp of snapshot/NAME,
#                             NBD_PASSES (3) alternating passes each; a table of MB/s
#                             and CPU time per GiB of server and client
#   BENCH_MICRO=0             skip the engine micro-benchmarks (cargo bench --bench engine;
#                             they always build the working tree, whatever
#                             BENCH_FLEECEFS_BIN or BENCH_REV say)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

RUNTIME=${BENCH_RUNTIME:-10}
CAP=$((RUNTIME * 3))      # upper bound for the size-based (one pass per open) workloads
PASSES=3                  # read passes of the whole image, each with its own open()
SIZE_MB=${BENCH_SIZE_MB:-1024}   # source image size (the targets: 1 GiB)
CLUSTER=65536
OUT=${BENCH_OUT:-$REPO/target/bench}
ONLY=${BENCH_ONLY:-}
case $ONLY in
    "") SYSTEMS=${BENCH_SYSTEMS:-direct qemu fleecefs fleecefs_vhost} ;;
    guest) SYSTEMS=${BENCH_SYSTEMS:-qemu fleecefs fleecefs_vhost} ;;
    nbd) SYSTEMS="" ;;
    # the frontends comparison alone (scripts/bench-frontends.sh, see there)
    frontends) exec env BIN="${BENCH_FLEECEFS_BIN:-}" RUNTIME="${BENCH_RUNTIME:-10}" SIZE_MB="${BENCH_SIZE_MB:-1024}" \
        OUT="${BENCH_OUT:-$REPO/target/bench}" bash "$REPO/scripts/bench-frontends.sh" ;;
    *) printf 'bench: BENCH_ONLY=%s: the selections are "guest", "nbd" and "frontends"\n' "$ONLY" >&2; exit 1 ;;
esac
GUEST_RUNTIME=${BENCH_GUEST_RUNTIME:-15}
PERF=${BENCH_PERF:-}
FLEECEFS=$REPO/target/release/fleecefs
REPORT=$REPO/target/release/examples/bench_report   # the report program
BLKIO=$REPO/target/release/examples/blkio_bench     # the vhost-user-blk guest

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }
now_ns() { date +%s%N; }

[ "$(id -u)" = 0 ] || die "run as root (it mounts FUSE filesystems)"
[ -e /dev/fuse ] || die "/dev/fuse is missing (modprobe fuse)"

# ---------------------------------------------------------------- setup and cleanup

install_deps() {
    [ -n "${BENCH_NO_INSTALL:-}" ] && return 0
    local need=()
    command -v fio >/dev/null || need+=(fio)
    command -v qemu-storage-daemon >/dev/null || need+=(qemu-utils)
    command -v findmnt >/dev/null || need+=(util-linux)
    command -v nbdcopy >/dev/null || need+=(libnbd-bin)
    if [ -n "$PERF" ] && ! command -v perf >/dev/null; then need+=(linux-perf); fi
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=600 update -qq
        apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${need[@]}" >/dev/null
    fi
}

W=""            # the temporary directory
QSD_PID=""      # the running qemu-storage-daemon, if any
FMOUNTS=()      # fleecefs mount points to unmount
PERF_PID=""
FIO_PID=""
BLKIO_PID=""
FLOOR_PID=""    # the running fuse_floor, if any
URING_PARAM=/sys/module/fuse/parameters/enable_uring
URING_SAVED=""  # enable_uring's value before the floor changed it

cleanup() {
    set +e
    if [ -n "$FIO_PID" ]; then kill "$FIO_PID" 2>/dev/null; wait "$FIO_PID" 2>/dev/null; fi
    if [ -n "$BLKIO_PID" ]; then kill "$BLKIO_PID" 2>/dev/null; wait "$BLKIO_PID" 2>/dev/null; fi
    [ -n "$PERF_PID" ] && kill -INT "$PERF_PID" 2>/dev/null && wait "$PERF_PID" 2>/dev/null
    qsd_stop
    floor_stop
    for m in "${FMOUNTS[@]}"; do
        if mountpoint -q "$m"; then
            "$FLEECEFS" unmount "$m" 2>/dev/null || umount -l "$m"
        fi
    done
    if [ -n "$W" ] && [ -d "$W" ]; then
        # anything still mounted under the temp dir (qemu exports, fleecefs)
        findmnt -rn -o TARGET | grep "^$W/" | sort -r | while read -r m; do umount -l "$m"; done
        rm -rf "$W"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Lets dirty pages of the previous workload reach the disk before the next one starts, and
# reads the source back into the page cache: the kernel may drop idle page cache behind
# the benchmark's back (this VM runs DAMON proactive reclaim: about 3% of an idle 1 GiB
# file was gone after 60 s), and a copy-before-write that has to read its old cluster from
# the disk takes milliseconds: the first-touch stalls (docs/performance.md).
# BENCH_REWARM=0 leaves the cache alone.
settle() {
    sync
    if [ "${BENCH_REWARM:-1}" != 0 ] && [ -n "${SRC:-}" ]; then cat "$SRC" >/dev/null; fi
    sleep 1
}

# ---------------------------------------------------------------- fio

# run_fio WORKLOAD fio-args...: runs fio for the current system ($SYS), JSON into $RES.
run_fio() {
    local name=$1; shift
    settle
    local io0 cpu0
    io0=$(daemon_read_bytes)
    cpu0=$(daemon_cpu_ticks)
    perf_start "$name"
    # in the background so that a signal reaches our trap at once (bash defers traps
    # while a foreground child runs, and fio exits 0 on Ctrl-C)
    fio --output-format=json --output="$RES/$SYS.$name.json" \
        --ioengine=psync --invalidate=0 --fallocate=none --size=${SIZE_MB}M "$@" >/dev/null &
    FIO_PID=$!
    wait "$FIO_PID" || die "fio failed: $SYS $name (see $RES/$SYS.$name.json)"
    FIO_PID=""
    perf_stop "$name"
    note_daemon_cpu "$name" "$cpu0"
    # Storage reads of the daemon during the workload (/proc/PID/io read_bytes): the
    # source is meant to be in the page cache, so anything here is page cache that the
    # kernel dropped (e.g. DAMON's proactive reclaim) and the daemon had to read from
    # the disk, in milliseconds instead of microseconds.
    local io1
    io1=$(daemon_read_bytes)
    if [ -n "$io0" ] && [ -n "$io1" ]; then
        echo "daemon_read_bytes=$((io1 - io0))" >"$RES/$SYS.$name.io"
        [ "$io1" -gt "$io0" ] && log "$SYS $name: the daemon read $(((io1 - io0) >> 10)) KiB from storage"
    fi
    summary_line "$name"
}

# utime+stime of the current system's daemon in clock ticks (empty if there is none).
daemon_cpu_ticks() {
    local pid
    pid=$(daemon_pid 2>/dev/null) || return 0
    [ -n "$pid" ] && awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null
    return 0
}

# note_daemon_cpu WORKLOAD TICKS0: the daemon's CPU time per request of the workload just
# run (its utime+stime since TICKS0 over the requests of every job in the fio JSON), into
# $RES/$SYS.WORKLOAD.cpu ("cpu_us_per_request=X"; bench_report shows it).
note_daemon_cpu() {
    local t1
    t1=$(daemon_cpu_ticks)
    [ -n "$2" ] && [ -n "$t1" ] || return 0
    "$REPORT" cpu "$RES/$SYS.$1.json" "$(($t1 - $2))" "$(getconf CLK_TCK)" >"$RES/$SYS.$1.cpu" ||
        rm -f "$RES/$SYS.$1.cpu"
}

# read_bytes of the current system's daemon (empty if there is none).
daemon_read_bytes() {
    local pid
    pid=$(daemon_pid 2>/dev/null) || return 0
    [ -n "$pid" ] && awk '/^read_bytes/{print $2}' "/proc/$pid/io" 2>/dev/null
    return 0
}

summary_line() {
    "$REPORT" summary "$RES/$SYS.$1.json" "$SYS" "$1" >&2
}

# perf record of the current system's daemon during the workloads named in BENCH_PERF.
perf_start() {
    case ",$PERF," in *",$SYS:$1,"*) ;; *) return 0 ;; esac
    local pid
    pid=$(daemon_pid) || return 0
    command -v perf >/dev/null || { log "perf is not installed (apt-get install linux-perf)"; return 0; }
    perf record -g -p "$pid" -o "$OUT/perf-$SYS-$1.data" 2>"$OUT/perf-$SYS-$1.log" &
    PERF_PID=$!
    sleep 1
}

perf_stop() {
    [ -n "$PERF_PID" ] || return 0
    kill -INT "$PERF_PID"; wait "$PERF_PID" || true
    PERF_PID=""
    # call graphs merged over the worker threads, then a flat profile
    { perf report -i "$OUT/perf-$SYS-$1.data" --stdio --no-children --sort dso,symbol \
        --percent-limit 1.5 2>/dev/null || true; } | grep -v '^$' | head -60 >"$OUT/perf-$SYS-$1.txt" || true
    { perf report -i "$OUT/perf-$SYS-$1.data" --stdio --no-children --sort dso,symbol -g none \
        2>/dev/null || true; } | grep -v '^$' | head -40 >"$OUT/perf-$SYS-$1-flat.txt" || true
    log "perf report of $SYS during $1: $OUT/perf-$SYS-$1.txt"
}

# ---------------------------------------------------------------- workloads
# A workload is a small function wl_NAME that runs fio once (run_fio NAME fio-args...) on
# $LIVE and/or $SNAP of the current system and sets nothing else; fio's JSON lands in
# $RES/$SYS.NAME.json. NOACC_WORKLOADS and ACCESS_PHASES (below the workloads) say which
# run, in which order; bench_report's ROWS table says how each is shown. To add one: write
# wl_NAME, list it in a phase (or add a phase: a fresh access), add a row to ROWS.

# Reads through FUSE must not be served by the FUSE file's own page cache, or the kernel
# is measured instead of the layer: every read workload makes $PASSES passes over the
# whole image, fio opens the file for each pass, and for the FUSE systems it drops the
# FUSE file's cached pages first (RINV=1: fio --invalidate=1 on live/NAME or
# snapshot/NAME, posix_fadvise DONTNEED; that is the FUSE file's cache, the source file
# stays in the page cache). For direct, RINV=0: the source itself stays cached.
RINV=0

# Snapshot sequential read, 1 MiB.
wl_snap_seqread() {
    run_fio snap_seqread --name=snapread --filename="$SNAP" --rw=read --bs=1M \
        --loops=$PASSES --runtime=$CAP --invalidate=$RINV
}

# Live 4 KiB random write, access active, first touch: one write into every cluster
# (except cluster 0, used by verify_cbw), in a fixed random order, so every write copies.
wl_cbw_first() {
    run_fio cbw_first --name=cbwfirst --filename="$LIVE" --read_iolog="$IOLOG" \
        --replay_redirect="$LIVE" --replay_no_stall=1
}

# The same writes again: every cluster is copied already.
wl_cbw_again() {
    run_fio cbw_again --name=cbwagain --filename="$LIVE" --read_iolog="$IOLOG" \
        --replay_redirect="$LIVE" --replay_no_stall=1
}

wl_randwrite_noacc() {
    run_fio randwrite_noacc --name=randwrite --filename="$LIVE" --rw=randwrite --bs=4k \
        --time_based --runtime=$RUNTIME
}

wl_seqwrite_noacc() {
    run_fio seqwrite_noacc --name=seqwrite --filename="$LIVE" --rw=write --bs=1M \
        --time_based --runtime=$RUNTIME
}

wl_seqread_noacc() {
    run_fio seqread_noacc --name=seqread --filename="$LIVE" --rw=read --bs=1M \
        --loops=$PASSES --runtime=$CAP --invalidate=$RINV
}

# Snapshot read (as wl_snap_seqread) while two 4 KiB random writers run on live; all stop
# when the reader is done. mixed NAME DIRECT: DIRECT 1 for O_DIRECT on live.
mixed() {
    run_fio "$1" --exitall \
        --name=snapread --filename="$SNAP" --rw=read --bs=1M --loops=$PASSES --runtime=$CAP \
        --invalidate=$RINV \
        --name=livewrite --filename="$LIVE" --rw=randwrite --bs=4k --numjobs=2 \
        --direct="$2" --time_based --runtime=$CAP
}
wl_mixed_buffered() { mixed mixed_buffered 0; }
wl_mixed_odirect() { mixed mixed_odirect 1; }

# Guest first: a VM-like load on live, the way a VM's disk is driven (fio
# io_uring, O_DIRECT, queue depth 32, 2 jobs, 4 KiB random, 70% reads), measured in three
# phases of GUEST_RUNTIME seconds each: without an access (guest_idle), during a fresh
# access without a reader (guest_access: the first touches copy), and during a fresh
# access while a backup reader streams the snapshot with 1 MiB reads as fast as it can
# (guest_backup; it starts over at the end of the image). The guest jobs are one fio group
# (group_reporting), so their latency percentiles are those of both jobs together; the
# reader is a group of its own.
GUEST_JOB=(--name=guest --ioengine=io_uring --direct=1 --iodepth=32 --numjobs=2 --bs=4k
    --rw=randrw --rwmixread=70 --time_based --group_reporting --lat_percentiles=1
    --percentile_list=50:99:99.9)
wl_guest_idle() {
    [ "$SYS" = fleecefs_vhost ] && { run_guest_vhost guest_idle; return; }
    run_fio guest_idle "${GUEST_JOB[@]}" --filename="$LIVE" --runtime="$GUEST_RUNTIME"
}
wl_guest_access() {
    [ "$SYS" = fleecefs_vhost ] && { run_guest_vhost guest_access; return; }
    run_fio guest_access "${GUEST_JOB[@]}" --filename="$LIVE" --runtime="$GUEST_RUNTIME"
}
READER_JOB=(--name=reader --new_group --rw=read --bs=1M --time_based --runtime="$GUEST_RUNTIME")
wl_guest_backup() {
    [ -n "$SNAP" ] || return 0
    [ "$SYS" = fleecefs_vhost ] && { run_guest_vhost guest_backup "${READER_JOB[@]}" --filename="$SNAP" --invalidate=$RINV; return; }
    run_fio guest_backup "${GUEST_JOB[@]}" --filename="$LIVE" --runtime="$GUEST_RUNTIME" \
        "${READER_JOB[@]}" --filename="$SNAP" --invalidate=$RINV
}

# run_guest_vhost WORKLOAD [fio args of a reader]: the guest-first load with the guest on
# the vhost-user-blk export (system fleecefs_vhost): libblkio's virtio-blk client, the
# load of GUEST_JOB (4 KiB random, 70% reads, 2 queues of depth 32) for GUEST_RUNTIME
# seconds, with fio running the reader beside it if given. One fio-shaped JSON (the
# client's job "guest" and fio's jobs) as for the other systems.
run_guest_vhost() {
    local name=$1 cpu0; shift
    settle
    cpu0=$(daemon_cpu_ticks)
    "$BLKIO" virtio-blk-vhost-user "$VSOCK" --seconds "$GUEST_RUNTIME" --queues 2 --qd 32 \
        --read-pct 70 --fio-json guest >"$RES/$SYS.$name.guest.json" &
    BLKIO_PID=$!
    if [ $# -gt 0 ]; then
        fio --output-format=json --output="$RES/$SYS.$name.reader.json" --ioengine=psync \
            --invalidate=0 --fallocate=none --size=${SIZE_MB}M "$@" >/dev/null &
        FIO_PID=$!
        wait "$FIO_PID" || die "fio failed: $SYS $name (see $RES/$SYS.$name.reader.json)"
        FIO_PID=""
    fi
    wait "$BLKIO_PID" || die "the vhost-user-blk guest failed: $SYS $name"
    BLKIO_PID=""
    if [ $# -gt 0 ]; then
        "$REPORT" merge "$RES/$SYS.$name.guest.json" "$RES/$SYS.$name.reader.json" >"$RES/$SYS.$name.json"
    else
        cp "$RES/$SYS.$name.guest.json" "$RES/$SYS.$name.json"
    fi
    note_daemon_cpu "$name" "$cpu0"
    summary_line "$name"
}

# The scaling line: 4 KiB random buffered writes on live without an access, with 1, 4 and
# 16 writer threads (psync). On a 2-CPU machine this mostly shows the limit: the writers
# and the daemon's workers share the same two CPUs.
scale_writers() {
    run_fio "scale_w$1" --name=writers --filename="$LIVE" --rw=randwrite --bs=4k \
        --numjobs="$1" --group_reporting --time_based --runtime="$RUNTIME"
}
wl_scale_w1() { scale_writers 1; }
wl_scale_w4() { scale_writers 4; }
wl_scale_w16() { scale_writers 16; }

# Checks the copy-before-write of the system under test: after a write to live, the
# snapshot still shows the old data of that cluster, also in a read that spans it and
# the uncopied clusters after it (1 MiB: the copied cluster 0 and 15 uncopied ones). The
# snapshot is read with O_DIRECT, so the second read reaches the daemon, not the page
# cache of the first.
verify_cbw() {
    [ "$SYS" = direct ] && return 0
    dd if="$SNAP" of="$W/v.before" bs=1M count=1 iflag=direct status=none
    dd if="$LIVE" of="$W/v.live" bs=1M count=1 status=none
    cmp -s "$W/v.before" "$W/v.live" || die "$SYS: snapshot differs from live at setup"
    dd if=/dev/urandom of="$LIVE" bs=4K count=1 conv=notrunc status=none
    dd if="$SNAP" of="$W/v.after" bs=1M count=1 iflag=direct status=none
    dd if="$LIVE" of="$W/v.live" bs=1M count=1 status=none
    cmp -s "$W/v.before" "$W/v.after" || die "$SYS: snapshot changed after a live write (no CBW?)"
    cmp -s "$W/v.before" "$W/v.live" && die "$SYS: live write did not land"
    log "$SYS: copy-before-write verified (live changed, snapshot kept the old data)"
}

# The phases: the workloads without an access (also run on the FUSE floors), then one
# entry per access (each a fresh access: setup, its steps in order, teardown).
NOACC_WORKLOADS="wl_randwrite_noacc wl_seqwrite_noacc wl_seqread_noacc"
FLOOR_WORKLOADS=$NOACC_WORKLOADS    # what the FUSE floors run
ACCESS_PHASES=(
    "verify_cbw wl_snap_seqread wl_cbw_first wl_cbw_again"  # clean snapshot, then CBW writes
    "wl_mixed_buffered"                                     # reader against buffered writers
    "wl_mixed_odirect"                                      # reader against O_DIRECT writers
)
# Guest first: run by every system that has an access (not direct).
GUEST_NOACC="wl_guest_idle wl_scale_w1 wl_scale_w4 wl_scale_w16"
GUEST_PHASES=(
    "verify_cbw wl_guest_access"    # the VM-like load during an access, no reader
    "wl_guest_backup"               # ... and with a full-speed snapshot reader
)
if [ "$ONLY" = guest ]; then
    NOACC_WORKLOADS=$GUEST_NOACC
    # plus the snapshot read without any guest I/O: full speed (work-conserving)?
    ACCESS_PHASES=("verify_cbw wl_snap_seqread wl_guest_access" "wl_guest_backup")
else
    NOACC_WORKLOADS="$NOACC_WORKLOADS $GUEST_NOACC"
    ACCESS_PHASES+=("${GUEST_PHASES[@]}")
fi

# run_steps FUNCTION...: runs each (a workload or a check) in order.
run_steps() {
    local step
    for step in "$@"; do "$step"; done
}

# ---------------------------------------------------------------- system: direct

direct_live_only() { LIVE=$SRC; SNAP=""; }
direct_access_start() { SNAP=$SRC; }
direct_access_end() { :; }
direct_stop() { :; }

# ---------------------------------------------------------------- system: qemu

QLIVE="" QSNAP="" QFLEECE=""

# The node graphs. Without an access: the source as a raw node, exported.
QSD_SOURCE=()
QSD_LIVE_ONLY=()
QSD_ACCESS=()
qemu_config() {
    QLIVE=$W/qemu/live QSNAP=$W/qemu/snap QFLEECE=$W/qemu/fleece.raw
    QSD_SOURCE=(
        --blockdev "file,node-name=src-file,filename=$SRC"
        --blockdev "raw,node-name=src,file=src-file"
    )
    QSD_LIVE_ONLY=(
        "${QSD_SOURCE[@]}"
        --export "fuse,id=live,node-name=src,mountpoint=$QLIVE,writable=on"
    )
    # With an access: copy-before-write filter over the source, old data into a raw
    # fleecing file of the same size; snapshot-access reads the point-in-time view. The
    # failure policy is fleecefs's default (and Proxmox VE's): break the snapshot, 45 s.
    QSD_ACCESS=(
        "${QSD_SOURCE[@]}"
        --blockdev "file,node-name=fl-file,filename=$QFLEECE,discard=unmap"
        --blockdev "raw,node-name=fl,file=fl-file,discard=unmap"
        --blockdev "copy-before-write,node-name=cbw,file=src,target=fl,discard=unmap,on-cbw-error=break-snapshot,cbw-timeout=45"
        --blockdev "snapshot-access,node-name=snap,file=cbw,discard=unmap"
        --export "fuse,id=live,node-name=cbw,mountpoint=$QLIVE,writable=on"
        --export "fuse,id=snap,node-name=snap,mountpoint=$QSNAP,writable=on"
    )
    mkdir -p "$W/qemu"
    touch "$QLIVE" "$QSNAP"    # fuse export mount points are regular files
}

qsd_start() {
    rm -f "$W/qsd.pid"
    qemu-storage-daemon "$@" --pidfile "$W/qsd.pid" --daemonize \
        || die "qemu-storage-daemon did not start"
    QSD_PID=$(cat "$W/qsd.pid")
    mountpoint -q "$QLIVE" || die "qemu-storage-daemon: $QLIVE is not mounted"
}

qsd_stop() {
    [ -n "$QSD_PID" ] || return 0
    kill "$QSD_PID" 2>/dev/null || true
    local i
    for i in $(seq 100); do
        kill -0 "$QSD_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$QSD_PID" 2>/dev/null || true
    for m in "$QLIVE" "$QSNAP"; do mountpoint -q "$m" && umount -l "$m"; done
    QSD_PID=""
}

qemu_live_only() {
    qemu_config
    qsd_start "${QSD_LIVE_ONLY[@]}"
    LIVE=$QLIVE SNAP=""
}

qemu_access_start() {
    qsd_stop
    rm -f "$QFLEECE"
    qemu-img create -q -f raw "$QFLEECE" ${SIZE_MB}M
    qsd_start "${QSD_ACCESS[@]}"
    mountpoint -q "$QSNAP" || die "qemu-storage-daemon: $QSNAP is not mounted"
    LIVE=$QLIVE SNAP=$QSNAP
}

qemu_access_end() { qsd_stop; }
qemu_stop() { qsd_stop; }

# ---------------------------------------------------------------- system: fleecefs

FMNT="" ACCESS_N=0

fleecefs_live_only() {
    FMNT=$W/$SYS/mnt
    mkdir -p "$FMNT"
    # shellcheck disable=SC2086
    "$FLEECEFS" mount "$FMNT" --state-dir "$W/$SYS/state" --device "vm=$SRC" ${BENCH_FLEECEFS_OPTS:-}
    FMOUNTS+=("$FMNT")
    LIVE=$FMNT/live/vm SNAP=""
}

fleecefs_access_start() {
    ACCESS_N=$((ACCESS_N + 1))
    "$FLEECEFS" setup "$FMNT" --target "bench$ACCESS_N" >/dev/null
    SNAP=$FMNT/snapshot/vm
}

fleecefs_access_end() {
    "$FLEECEFS" status "$FMNT" --json >"$RES/fleecefs.status$ACCESS_N.json"
    "$FLEECEFS" teardown "$FMNT" --target "bench$ACCESS_N" --failure >/dev/null
}

fleecefs_stop() {
    local pid
    pid=$(daemon_pid)
    grep -E '^(VmRSS|VmHWM)' "/proc/$pid/status" >"$RES/fleecefs.mem.txt"
    "$FLEECEFS" unmount "$FMNT"
}

# fleecefs_vhost: the same mount with the device also exported over vhost-user-blk.
VSOCK=""
fleecefs_vhost_live_only() {
    VSOCK=$W/$SYS/vm.sock
    mkdir -p "$W/$SYS"
    BENCH_FLEECEFS_OPTS="${BENCH_FLEECEFS_OPTS:-} --vhost-user-blk vm=$VSOCK" fleecefs_live_only
}
fleecefs_vhost_access_start() { fleecefs_access_start; }
fleecefs_vhost_access_end() { fleecefs_access_end; }
fleecefs_vhost_stop() {
    "$FLEECEFS" unmount "$FMNT"
}

# The pid of the current system's daemon (fleecefs: the worker that serves the I/O, not
# the keeper).
daemon_pid() {
    case $SYS in
        qemu) [ -n "$QSD_PID" ] && echo "$QSD_PID" ;;
        floor*) [ -n "$FLOOR_PID" ] && echo "$FLOOR_PID" ;;
        fleecefs | fleecefs_vhost) "$FLEECEFS" status "$FMNT" --json | "$REPORT" pid ;;
        *) return 1 ;;
    esac
}

# ---------------------------------------------------------------- one system, all workloads

run_system() {
    SYS=$1
    local noacc=$NOACC_WORKLOADS phases=("${ACCESS_PHASES[@]}")
    if [ "$SYS" = fleecefs_vhost ]; then
        noacc=wl_guest_idle
        phases=("${GUEST_PHASES[@]}")
    fi
    log "system $SYS"
    echo "$SYS: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RES/load.txt"
    if [ "$SYS" = direct ]; then RINV=0; else RINV=1; fi
    cat "$SRC" >/dev/null                     # source into the page cache
    "${SYS}_live_only"                        # no access
    # shellcheck disable=SC2086
    run_steps $noacc
    local phase
    for phase in "${phases[@]}"; do
        # the guest phases with an access mean nothing on the raw file
        [ "$SYS" = direct ] && case $phase in *wl_guest_*) continue ;; esac
        "${SYS}_access_start"
        # shellcheck disable=SC2086
        run_steps $phase
        "${SYS}_access_end"
    done
    "${SYS}_stop"
}

# ---------------------------------------------------------------- the FUSE floor

# How fast any FUSE server can be on this machine: examples/fuse_floor.rs serves the
# source as MOUNT/img with one pread/pwrite per request and nothing else, with fleecefs's
# fuser configuration and open flags. Measured on the no-access live workloads, over
# /dev/fuse (floor), with the FUSE writeback cache (floor_wb: writes acknowledged from the
# kernel's page cache, which fleecefs cannot use) and, where the kernel has it, over
# FUSE-over-io_uring (floor_uring; the fuse module's enable_uring parameter is switched on
# for it and restored after).
FLOOR=$REPO/target/release/examples/fuse_floor
FLOOR_SYSTEMS=""

floor_stop() {
    [ -n "$FLOOR_PID" ] || return 0
    mountpoint -q "$W/floor" && umount "$W/floor"
    wait "$FLOOR_PID" 2>/dev/null || true
    FLOOR_PID=""
    if [ -n "$URING_SAVED" ]; then echo "$URING_SAVED" >"$URING_PARAM"; URING_SAVED=""; fi
}

floor_run() {
    SYS=$1; shift
    log "system $SYS (the FUSE floor)"
    mkdir -p "$W/floor"
    cat "$SRC" >/dev/null
    "$FLOOR" "$W/floor" "$SRC" "$@" 2>"$RES/$SYS.log" &
    FLOOR_PID=$!
    local i
    for i in $(seq 100); do
        [ -e "$W/floor/img" ] && break
        kill -0 "$FLOOR_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [ ! -e "$W/floor/img" ]; then
        log "$SYS did not start: $(tail -1 "$RES/$SYS.log")"
        floor_stop
        return 0
    fi
    RINV=1
    LIVE=$W/floor/img
    # shellcheck disable=SC2086
    run_steps $FLOOR_WORKLOADS
    floor_stop
    log "$SYS: $(tail -1 "$RES/$SYS.log")"
    FLOOR_SYSTEMS="$FLOOR_SYSTEMS $SYS"
}

fuse_floor() {
    [ "${BENCH_FLOOR:-1}" = 0 ] && return 0
    floor_run floor
    floor_run floor_wb --writeback
    if [ -w "$URING_PARAM" ]; then
        URING_SAVED=$(cat "$URING_PARAM")
        echo 1 >"$URING_PARAM"
        floor_run floor_uring --uring
    else
        log "no FUSE-over-io_uring in this kernel ($URING_PARAM): floor_uring skipped"
    fi
}

# ---------------------------------------------------------------- bitmap cost

# The cost of dirty bitmaps: the first-touch replay (one 4 KiB write into every
# cluster, no access), on fleecefs without a bitmap and with a clean bitmap under each
# --crash-safe-bitmaps mode: on (default; bits in shared memory, survive a daemon crash),
# sync (one msync per clean-to-dirty transition: every write here), off. fio's JSON goes
# to bitmap_VARIANT.bitmap.json.
bitmap_cost() {
    log "bitmap cost: first-touch replay without a bitmap and with --crash-safe-bitmaps on, sync, off"
    local variant opts
    for variant in none on sync off; do
        case $variant in
            none) opts="" ;;
            *) opts="--crash-safe-bitmaps $variant" ;;
        esac
        SYS=bitmap_$variant
        FMNT=$W/bitmap/mnt
        mkdir -p "$FMNT"
        rm -rf "$W/bitmap/state"
        # shellcheck disable=SC2086
        "$FLEECEFS" mount "$FMNT" --state-dir "$W/bitmap/state" --device "vm=$SRC" $opts ${BENCH_FLEECEFS_OPTS:-}
        FMOUNTS+=("$FMNT")
        if [ "$variant" != none ]; then
            # a full backup leaves the bitmap clean: every replayed write dirties a cluster
            "$FLEECEFS" setup "$FMNT" --target bm --bitmap bm >/dev/null
            "$FLEECEFS" teardown "$FMNT" --target bm --success >/dev/null
        fi
        run_fio bitmap --name=bitmap --filename="$FMNT/live/vm" --read_iolog="$IOLOG" \
            --replay_redirect="$FMNT/live/vm" --replay_no_stall=1
        "$FLEECEFS" unmount "$FMNT"
    done
}

# ---------------------------------------------------------------- scale

# mount_setup_rss NAME DEVICE-ARGS...: mount, setup, some I/O, RSS; key=value lines.
mount_setup_rss() {
    local name=$1; shift
    local mnt=$W/scale/$name t0 t1 t2 pid
    mkdir -p "$mnt"
    t0=$(now_ns)
    "$FLEECEFS" mount "$mnt" --state-dir "$W/scale/$name.state" "$@"
    t1=$(now_ns)
    FMOUNTS+=("$mnt")
    "$FLEECEFS" setup "$mnt" --target scale >/dev/null
    t2=$(now_ns)
    # some I/O during the access: 16 MiB of CBW writes spread over the first device,
    # 64 MiB of snapshot reads
    local first
    first=$(ls "$mnt/live" | head -1)
    local i
    for i in $(seq 0 15); do
        dd if=/dev/urandom of="$mnt/live/$first" bs=1M count=1 seek=$((i * 4099)) conv=notrunc status=none
    done
    dd if="$mnt/snapshot/$first" of=/dev/null bs=1M count=64 status=none
    pid=$("$FLEECEFS" status "$mnt" --json | "$REPORT" pid)
    echo "$name.mount_ms=$(((t1 - t0) / 1000000))"
    echo "$name.setup_ms=$(((t2 - t1) / 1000000))"
    echo "$name.rss_kb=$(awk '/^VmRSS/{print $2}' "/proc/$pid/status")"
    echo "$name.hwm_kb=$(awk '/^VmHWM/{print $2}' "/proc/$pid/status")"
    "$FLEECEFS" teardown "$mnt" --target scale --failure >/dev/null
    "$FLEECEFS" unmount "$mnt"
}

scale_test() {
    log "scale: one 1 TiB sparse device; 16 sparse devices of 1 TiB each"
    mkdir -p "$W/scale"
    truncate -s 1T "$W/scale/big.img"
    local args=() i
    for i in $(seq 1 16); do
        truncate -s 1T "$W/scale/d$i.img"
        args+=(--device "d$i=$W/scale/d$i.img")
    done
    {
        mount_setup_rss one1t --device "big=$W/scale/big.img"
        echo "one1t.devices=1"
        mount_setup_rss sixteen "${args[@]}"
        echo "sixteen.devices=16"
        echo "device_bytes=$((1 << 40))"
        echo "cluster=$CLUSTER"
    } >"$RES/scale.txt"
    rm -f "$W"/scale/*.img
}

# ---------------------------------------------------------------- the NBD path

NBD_PASSES=${NBD_PASSES:-3}

# mbps BYTES NS : MB/s (10^6 bytes per second)
mbps() { awk -v b="$1" -v ns="$2" 'BEGIN { printf "%.0f", b / (ns / 1e9) / 1e6 }'; }
# median of its arguments
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# CPU time (user + system, clock ticks) of a process, exited threads included.
proc_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# CPU time (clock ticks) of this shell's waited-for children (nbdcopy, cp).
child_ticks() { awk '{ print $16 + $17 }' "/proc/$$/stat"; }
# per_gib TICKS: CPU seconds per GiB read
per_gib() { awk -v t="$1" -v hz="$(getconf CLK_TCK)" -v b="$((SIZE_MB << 20))" 'BEGIN { printf "%.2f", t / hz / (b / 1073741824) }'; }

# The backup provider's read path, whole snapshot, no writer: nbdcopy to null: from
# fleecefs's export (multi-conn: nbdcopy opens one connection per thread, at most 4, so
# 2 on a 2-CPU machine) and from qemu-storage-daemon's export of snapshot-access over
# copy-before-write, exported writable as the backup-access design does for discard (so
# QEMU does not offer multi-conn and nbdcopy uses one connection); and cp of
# snapshot/NAME to /dev/null. Both daemons lock the source, so they take turns: each
# pass mounts fleecefs (its nbdcopy and cp), then starts qemu-storage-daemon (its
# nbdcopy). Besides MB/s, the CPU time per GiB of the server (the fleecefs worker, the
# qemu-storage-daemon process) and of the client (nbdcopy, cp) over each copy.
# Table in $RES/nbd.md.
nbd_bench() {
    command -v nbdcopy >/dev/null || die "nbdcopy is not installed (libnbd-bin)"
    local d=$W/nbd bytes=$((SIZE_MB << 20)) pass t s0 c0 pid f=() q=() c=()
    local fs=() fc=() qs=() qc=() cs=() cc=()
    mkdir -p "$d/mnt"
    log "NBD: fleecefs --nbd and qemu-storage-daemon --nbd-server, $NBD_PASSES passes"
    for pass in $(seq "$NBD_PASSES"); do
        # shellcheck disable=SC2086
        "$FLEECEFS" mount "$d/mnt" --state-dir "$d/state" --device "vm=$SRC" \
            --nbd "unix:$d/f.sock" ${BENCH_FLEECEFS_OPTS:-}
        FMOUNTS+=("$d/mnt")
        "$FLEECEFS" setup "$d/mnt" --target nbdbench >/dev/null
        pid=$("$FLEECEFS" status "$d/mnt" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["worker_pid"])')
        settle
        s0=$(proc_ticks "$pid") c0=$(child_ticks)
        t=$(now_ns); nbdcopy "nbd+unix:///vm?socket=$d/f.sock" null: || die "nbdcopy from fleecefs failed"
        f+=("$(mbps "$bytes" $(($(now_ns) - t)))")
        fs+=("$(per_gib $(($(proc_ticks "$pid") - s0)))") fc+=("$(per_gib $(($(child_ticks) - c0)))")
        settle
        s0=$(proc_ticks "$pid") c0=$(child_ticks)
        t=$(now_ns); cp "$d/mnt/snapshot/vm" /dev/null || die "cp of the snapshot failed"
        c+=("$(mbps "$bytes" $(($(now_ns) - t)))")
        cs+=("$(per_gib $(($(proc_ticks "$pid") - s0)))") cc+=("$(per_gib $(($(child_ticks) - c0)))")
        "$FLEECEFS" teardown "$d/mnt" --target nbdbench --failure >/dev/null
        "$FLEECEFS" unmount "$d/mnt"
        rm -f "$d/fleece.raw"
        qemu-img create -q -f raw "$d/fleece.raw" ${SIZE_MB}M
        rm -f "$W/qsd.pid"
        qemu-storage-daemon \
            --blockdev "file,node-name=src-file,filename=$SRC" \
            --blockdev "raw,node-name=src,file=src-file" \
            --blockdev "file,node-name=fl-file,filename=$d/fleece.raw,discard=unmap" \
            --blockdev "raw,node-name=fl,file=fl-file,discard=unmap" \
            --blockdev "copy-before-write,node-name=cbw,file=src,target=fl,discard=unmap,on-cbw-error=break-snapshot,cbw-timeout=45" \
            --blockdev "snapshot-access,node-name=snap,file=cbw,discard=unmap" \
            --nbd-server "addr.type=unix,addr.path=$d/q.sock" \
            --export "nbd,id=snap,node-name=snap,name=vm,writable=on" \
            --pidfile "$W/qsd.pid" --daemonize || die "qemu-storage-daemon did not start"
        QSD_PID=$(cat "$W/qsd.pid")
        settle
        s0=$(proc_ticks "$QSD_PID") c0=$(child_ticks)
        t=$(now_ns); nbdcopy "nbd+unix:///vm?socket=$d/q.sock" null: || die "nbdcopy from qemu failed"
        q+=("$(mbps "$bytes" $(($(now_ns) - t)))")
        qs+=("$(per_gib $(($(proc_ticks "$QSD_PID") - s0)))") qc+=("$(per_gib $(($(child_ticks) - c0)))")
        qsd_stop
        log "NBD pass $pass: fleecefs ${f[-1]}, qemu ${q[-1]}, cp ${c[-1]} MB/s"
    done
    local fm qm cm
    fm=$(median "${f[@]}") qm=$(median "${q[@]}") cm=$(median "${c[@]}")
    {
        echo "### NBD: the whole ${SIZE_MB} MiB snapshot, no writer"
        echo
        echo "| path | passes (MB/s) | median MB/s | fleecefs NBD / this | server CPU s/GiB (median) | client CPU s/GiB (median) |"
        echo "|---|---|---|---|---|---|"
        echo "| fleecefs NBD export, nbdcopy (multi-conn) | ${f[*]} | $fm | 1.00 | $(median "${fs[@]}") | $(median "${fc[@]}") |"
        echo "| qemu-storage-daemon NBD export of snapshot-access, nbdcopy (1 connection) | ${q[*]} | $qm | $(awk -v a="$fm" -v b="$qm" 'BEGIN { printf "%.2f", a / b }') | $(median "${qs[@]}") | $(median "${qc[@]}") |"
        echo "| cp of fleecefs snapshot/NAME to /dev/null | ${c[*]} | $cm | $(awk -v a="$fm" -v b="$cm" 'BEGIN { printf "%.2f", a / b }') | $(median "${cs[@]}") | $(median "${cc[@]}") |"
        echo
        echo "Server: the fleecefs worker or the qemu-storage-daemon process; client: nbdcopy or cp."
        echo "Targets: fleecefs NBD >= 2x qemu-storage-daemon's NBD export, and >= cp of snapshot/NAME."
    } >"$RES/nbd.md"
}

# ---------------------------------------------------------------- report

machine_info() {
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "- memory (free -g): $(free -g | awk '/^Mem:/{print $2 " GiB total, " $7 " GiB available"}')"
    echo "- kernel: $(uname -r)"
    echo "- fleecefs: $FLEECEFS_DESC, release build, mount options: ${BENCH_FLEECEFS_OPTS:-defaults (64K clusters, 8 threads, --cbw-timeout 45, --on-cbw-error break-snapshot)}"
    echo "- qemu-storage-daemon: $(qemu-storage-daemon --version | head -1)"
    echo "- fio: $(fio --version)"
    echo "- load average (1, 5, 15 min) at start: $LOAD_START; before each system: $(paste -sd';' "$RES/load.txt" | sed 's/;/; /g'); at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- guest phases: fio ${GUEST_JOB[*]}, ${GUEST_RUNTIME} s each (fleecefs_vhost: the same load from libblkio's virtio-blk-vhost-user client, examples/blkio_bench.rs, on --vhost-user-blk); reader: 1 MiB sequential reads of the snapshot (psync), as fast as it goes"
    echo "- daemon CPU per request: utime+stime of the daemon process (fleecefs: the worker) over the workload, divided by the requests of all its jobs"
    echo "- fio: ioengine=psync, buffered unless noted, --invalidate=0 (sources stay in the page cache), ${RUNTIME} s per time-based workload; read workloads: $PASSES passes over the image, one open each, FUSE file's own cache dropped before each (--invalidate=1 on the FUSE file)"
}

# ---------------------------------------------------------------- main

FLEECEFS_DESC=""
build_fleecefs() {
    if [ -n "${BENCH_FLEECEFS_BIN:-}" ]; then
        FLEECEFS=$(realpath "$BENCH_FLEECEFS_BIN")
        FLEECEFS_DESC="binary $FLEECEFS ($("$FLEECEFS" --version))"
    elif [ -n "${BENCH_REV:-}" ]; then
        local rev src
        rev=$(git -C "$REPO" rev-parse --short "$BENCH_REV")
        src=$OUT/src-$rev
        log "building fleecefs $rev (release, from git archive into $src)"
        rm -rf "$src"
        mkdir -p "$src"
        git -C "$REPO" archive "$rev" | tar -x -C "$src"
        (cd "$src" && CARGO_TARGET_DIR=$OUT/build cargo build --release --quiet)
        FLEECEFS=$OUT/build/release/fleecefs
        FLEECEFS_DESC="$rev (git archive of that commit)"
    else
        log "building fleecefs (release, working tree)"
        cargo build --release --quiet
        FLEECEFS_DESC=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
        if ! git -C "$REPO" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null ||
            [ -n "$(git -C "$REPO" ls-files --others --exclude-standard -- src)" ]; then
            FLEECEFS_DESC="$FLEECEFS_DESC + uncommitted changes in src/ (working tree)"
        fi
    fi
}

main() {
    install_deps
    for t in fio qemu-storage-daemon qemu-img findmnt mountpoint; do
        command -v "$t" >/dev/null || die "$t is not installed"
    done
    mkdir -p "$OUT"
    build_fleecefs
    if [ "$ONLY" != nbd ]; then
        log "building the report program and the vhost-user-blk client (examples/, release)"
        (cd "$REPO" && cargo build --release --quiet --example bench_report --example blkio_bench)
    fi
    if [ "${BENCH_FLOOR:-1}" != 0 ] && [ -z "$ONLY" ]; then
        log "building the FUSE floor (examples/fuse_floor.rs, release)"
        (cd "$REPO" && cargo build --release --quiet --example fuse_floor)
    fi
    W=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/fleecefs-bench.XXXXXX")
    RES=$W/results
    mkdir -p "$RES"
    LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
    log "temp dir $W, load average $LOAD_START"

    SRC=$W/source.img
    log "creating a ${SIZE_MB} MiB random source image"
    head -c $((SIZE_MB << 20)) /dev/urandom >"$SRC"
    # One 4 KiB write into every cluster but the first, in a fixed random order.
    IOLOG=$W/first-touch.iolog
    {
        echo "fio version 2 iolog"
        echo "file add"
        echo "file open"
        seq 1 $((SIZE_MB * 1048576 / CLUSTER - 1)) | shuf --random-source=<(yes) |
            awk -v c=$CLUSTER 'BEGIN{srand(5)} {printf "file write %d 4096\n", $1 * c + int(rand() * 16) * 4096}'
        echo "file close"
    } >"$IOLOG"

    local s start=$SECONDS
    if [ "$ONLY" = nbd ]; then
        echo "nbd: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RES/load.txt"
        nbd_bench
        { echo "## fleecefs benchmark: the NBD path"; echo; machine_info; echo; cat "$RES/nbd.md"; } |
            tee "$OUT/results-nbd.md"
        return 0
    fi
    for s in $SYSTEMS; do run_system "$s"; done
    if [ "$ONLY" != guest ]; then
        case " $SYSTEMS " in *" fleecefs "*) fuse_floor; bitmap_cost ;; esac
        if [ "${BENCH_MICRO:-1}" != 0 ]; then
            log "engine micro-benchmarks (cargo bench --bench engine, no FUSE)"
            (cd "$REPO" && cargo bench --quiet --bench engine 2>/dev/null) >"$RES/micro.txt" || log "micro-benchmarks failed"
        fi
        scale_test
        if [ "${BENCH_FRONTENDS:-1}" != 0 ]; then
            log "the frontends comparison (scripts/bench-frontends.sh)"
            (cd "$REPO" && cargo build --release --quiet --example blkio_bench)
            BIN=$FLEECEFS RUNTIME=$RUNTIME SIZE_MB=$SIZE_MB OUT=$RES bash "$REPO/scripts/bench-frontends.sh" >"$RES/frontends.md" ||
                log "the frontends comparison failed"
        fi
    fi
    case " $SYSTEMS " in *" qemu "*" fleecefs "* | *" fleecefs "*" qemu "*) [ "$ONLY" = guest ] || nbd_bench ;; esac
    log "done in $((SECONDS - start)) s"

    # the raw results first, so that a report can be printed again from them
    rm -rf "$OUT/json"
    cp -r "$RES" "$OUT/json"
    log "tables again: $REPORT tables $OUT/json \"$SYSTEMS\" \"${FLOOR_SYSTEMS# }\""
    {
        echo "## fleecefs benchmark"
        echo
        machine_info
        echo
        "$REPORT" tables "$RES" "$SYSTEMS" "$FLOOR_SYSTEMS"
        if [ -e "$RES/nbd.md" ]; then echo; cat "$RES/nbd.md"; fi
    } | tee "$OUT/results.md"
}

main "$@"

#!/usr/bin/env bash
# Soak test (bounded; not part of scripts/test.sh): several writers keep writing the live
# image while backups cycle: setup -> read everything in chunks, discarding each chunk
# after reading -> verify against the point-in-time image -> teardown. At the end: no
# leaked file descriptors, threads or fleecing files, and the daemon's RSS did not grow.
# Usage: scripts/soak.sh [SECONDS]   (default 180)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "soak: run as root" >&2; exit 1; }
DURATION=${1:-180}
WRITERS=4
SIZE_MB=256
cargo build --release --quiet
BIN=$PWD/target/release/fleecefs
D=$(mktemp -d /tmp/fleecefs-soak.XXXXXX)
cleanup() {
    touch "$D/stop"
    wait 2>/dev/null || true
    "$BIN" unmount "$D/mnt" 2>/dev/null || umount -l "$D/mnt" 2>/dev/null || true
    rm -rf "$D"
}
trap cleanup EXIT
fail() { echo "SOAK FAIL: $*" >&2; exit 1; }

head -c $((SIZE_MB << 20)) /dev/urandom >"$D/src.img"
mkdir "$D/mnt"
"$BIN" mount "$D/mnt" --state-dir "$D/state" --device disk=$D/src.img --cbw-timeout 30
PID=$("$BIN" status "$D/mnt" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')

writer() {  # writer ID : random 4K-64K writes, pausable via $D/pause
    local id=$1 blocks=$((SIZE_MB * 256))
    while [ ! -e "$D/stop" ]; do
        if [ -e "$D/pause" ]; then touch "$D/paused.$id"; sleep 0.01; continue; fi
        rm -f "$D/paused.$id"
        dd if=/dev/urandom of="$D/mnt/live/disk" bs=4K count=$((1 + RANDOM % 16)) \
            seek=$(( (RANDOM * 32768 + RANDOM) % (blocks - 16) )) conv=notrunc status=none
    done
}
for i in $(seq $WRITERS); do writer "$i" & done
pause_all() {
    touch "$D/pause"
    for i in $(seq $WRITERS); do while [ ! -e "$D/paused.$i" ]; do sleep 0.01; done; done
}
resume_all() { rm -f "$D/pause" "$D"/paused.*; }
sample() {  # prints "fds threads rss_kb"
    echo "$(ls /proc/$PID/fd | wc -l) $(awk '/^Threads/{print $2}' /proc/$PID/status) $(awk '/^VmRSS/{print $2}' /proc/$PID/status)"
}

end=$(( $(date +%s) + DURATION ))
cycle=0
chunk=$((8 << 20))
while [ "$(date +%s)" -lt "$end" ]; do
    cycle=$((cycle + 1))
    pause_all
    cp "$D/src.img" "$D/ref.img"
    "$BIN" setup "$D/mnt" --target soak >/dev/null
    resume_all
    rm -f "$D/copy.img"
    for ((off = 0; off < SIZE_MB << 20; off += chunk)); do
        dd if="$D/mnt/snapshot/disk" of="$D/copy.img" bs=1M iflag=skip_bytes,count_bytes oflag=seek_bytes \
            skip=$off seek=$off count=$chunk conv=notrunc status=none
        fallocate -p -o $off -l $chunk "$D/mnt/snapshot/disk"
    done
    cmp "$D/copy.img" "$D/ref.img" || fail "cycle $cycle: snapshot differs from the point-in-time image"
    fleece=$("$BIN" status "$D/mnt" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["access"]["fleecing_allocated"])')
    "$BIN" teardown "$D/mnt" --target soak --success >/dev/null
    [ -z "$(ls "$D/state/fleecing")" ] || fail "cycle $cycle: fleecing files left"
    read -r fds threads rss <<<"$(sample)"
    [ $cycle = 1 ] && { fds0=$fds; threads0=$threads; rss1=$rss; }
    [ $cycle = 3 ] && rss3=$rss
    echo "cycle $cycle ok: fds $fds threads $threads rss ${rss} KiB, fleecing after discards $fleece bytes"
done
touch "$D/stop"; wait
read -r fds threads rss <<<"$(sample)"
[ "$cycle" -ge 3 ] || fail "only $cycle cycles ran; give it more time"
[ "$fds" -le "$fds0" ] || fail "file descriptors leaked: $fds0 -> $fds"
[ "$threads" -le "$threads0" ] || fail "threads leaked: $threads0 -> $threads"
# RSS may settle during the first cycles (thread buffers, page tables); after that it
# must stay flat: allow 8 MiB of noise.
[ "$rss" -le $((rss3 + 8192)) ] || fail "RSS grew: ${rss3} KiB after cycle 3, ${rss} KiB at the end"
echo "soak ok: $cycle cycles in ${DURATION}s with $WRITERS writers; fds $fds0->$fds, threads $threads0->$threads, RSS ${rss1}/${rss3}->${rss} KiB"

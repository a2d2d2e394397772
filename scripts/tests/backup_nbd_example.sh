#!/usr/bin/env bash
# scripts/backup-nbd-example.sh, the NBD backup provider, driven the way a management layer
# drives it (setup with a bitmap, the bitmap action mapped to new/reuse/none, the provider,
# teardown by its result): a full run and an incremental run, both while a writer runs,
# give the image at their setup, and leave no fleecing space (each range is trimmed); a
# failed run (the previous image is missing for an incremental) tears down as a failure and
# the next run repairs; a run without a bitmap (none) is full; the bandwidth limit paces.
# The mount reads on the backup pool with O_DIRECT (--backup-priority low, --backup-read
# direct), the path a provider should not feel on the guest.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
EX=$(cd "$(dirname "$0")/.." && pwd)/backup-nbd-example.sh
S=$T/nbd.sock
L=$T/mnt/live/disk
B=$T/backup
IMG=$B/disk.img
# provider [BITMAP] [BWLIMIT] : set up (with bitmap BITMAP unless empty), run the provider
# with the status the bitmap action maps to, tear down with its result; returns its status
provider() {
    local bitmap=${1-nightly} bw=${2:-0} action status rc=0
    if [ -n "$bitmap" ]; then
        "$FLEECEFS" setup "$T/mnt" --target t --bitmap "$bitmap" --json >"$T/setup.json"
        action=$(js "$T/setup.json" 'd["devices"][0]["bitmap_action"]')
    else
        "$FLEECEFS" setup "$T/mnt" --target t --json >"$T/setup.json"
        action=not-used
    fi
    case $action in
    new | invalid) status=new ;;
    used) status=reuse ;;
    *) status=none ;;
    esac
    touch "$T/setup-done"
    bash "$EX" "$S" disk "$status" "${bitmap:-none}" "$bw" "$B" >"$T/out" 2>"$T/err" || rc=$?
    if [ "$rc" = 0 ]; then
        [ "$(status_json "$T/mnt" 'd["access"]["fleecing_allocated"]')" = 0 ] ||
            fail "fleecing space left after the provider trimmed every range"
        "$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null
    else
        "$FLEECEFS" teardown "$T/mnt" --target t --failure >/dev/null
    fi
    return $rc
}
# during_writes REF : pauses the writer, saves the image as REF, runs the provider and lets
# the writer go on once the access is set up; the backup must equal REF
during_writes() {
    pause_writer
    cp "$T/src.img" "$1"
    rm -f "$T/setup-done"
    (while [ ! -e "$T/setup-done" ]; do sleep 0.005; done; resume_writer) &
    local waiter=$!
    provider || fail "the provider failed: $(cat "$T/err")"
    wait "$waiter"
    cmp "$IMG" "$1" || fail "the backup differs from the image at setup ($(cat "$T/out"))"
}
put() { dd if=/dev/urandom of="$L" bs=1K seek=$(($1 * 1024)) count="$2" conv=notrunc status=none; }

truncate -s $((64 * M)) "$T/src.img"
random_mib "$T/src.img" 0 8
fmount "$T/mnt" --state-dir "$T/state" --device disk="$T/src.img" --nbd "unix:$S" \
    --backup-priority low --backup-read direct   # reads on the backup pool, O_DIRECT
mkdir "$B"
expect_rc 2 "usage:" bash "$EX" "$S" disk
expect_rc 2 "bitmap status" bash "$EX" "$S" disk maybe b 0 "$B"

# 1. full (new), then incremental (reuse), while a writer runs in [0,16M)
start_writer "$L" 4096
sleep 0.2
during_writes "$T/ref1.img"
grep -q "full backup" "$T/out" || fail "first run: $(cat "$T/out")"
[ "$(stat -c %b "$IMG")" -lt $((40 * M / 512)) ] || fail "the full image is not sparse"
sleep 0.3
during_writes "$T/ref2.img"
grep -q "incremental backup" "$T/out" || fail "second run: $(cat "$T/out")"
stop_writer

# 2. a failed run (the previous image is gone): failure teardown; the next run repairs
put 2 64
put 40 256
mv "$IMG" "$T/saved.img"
provider && fail "an incremental without the previous image succeeded"
grep -q "is missing" "$T/err" || fail "wrong failure: $(cat "$T/err")"
mv "$T/saved.img" "$IMG"
provider || fail "the run after the failure failed: $(cat "$T/err")"
grep -q "incremental backup" "$T/out" || fail "run after the failure: $(cat "$T/out")"
cmp "$IMG" "$T/src.img" || fail "the run after the failure did not repair the image"

# 3. no bitmap: a full backup (none); with a bandwidth limit of 8 MiB/s, 8 MiB of data take >= 0.9 s
rm "$IMG"
start=$(date +%s%N)
provider "" $((8 * M)) || fail "the run without a bitmap failed: $(cat "$T/err")"
elapsed=$(( ($(date +%s%N) - start) / 1000000 ))
grep -q "full backup" "$T/out" || fail "run without a bitmap: $(cat "$T/out")"
cmp "$IMG" "$T/src.img" || fail "the full backup without a bitmap differs"
[ "$elapsed" -ge 900 ] || fail "the bandwidth limit did not pace: ${elapsed} ms for 8 MiB at 8 MiB/s"
echo "ok: backup-nbd-example.sh: full + incremental during writes, space freed, failure repaired, none, bwlimit"

#!/usr/bin/env bash
# scripts/backup-example.sh against a real mount: a full run and an incremental run, both
# while a writer runs, give the image at their setup; a run whose dd fails in the middle and
# a run killed with SIGTERM both tear down with --failure (no access left, the bitmap keeps
# the writes), and the next run (action "used") repairs the half-updated image.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
EX=$(cd "$(dirname "$0")/.." && pwd)/backup-example.sh
L=$T/mnt/live/disk
B=$T/backup
IMG=$B/disk.img
export FLEECEFS
# example [ENV...] : runs the example script in the background (pid in $EXPID)
example() { env "$@" bash "$EX" "$T/mnt" disk "$B" nightly >"$T/out" 2>"$T/err" & EXPID=$!; }
no_access() { [ "$(status_json "$T/mnt" 'd["access"] is None')" = True ] || fail "$1: an access is still active"; }
bitmap_dirty() { status_json "$T/mnt" '[b["dirty_bytes"] for b in d["bitmaps"] if b["name"] == "nightly"][0]'; }
# run_during_writes REF : pauses the writer, saves the image as REF, runs the example and
# lets the writer go on once the access is set up; the example must succeed
run_during_writes() {
    pause_writer
    cp "$T/src.img" "$1"
    example
    while [ ! -e "$T/mnt/snapshot/disk" ] && kill -0 "$EXPID" 2>/dev/null; do sleep 0.005; done
    resume_writer
    wait "$EXPID" || fail "backup-example.sh failed: $(cat "$T/err")"
    no_access "after a successful run"
    cmp "$IMG" "$1" || fail "the backup differs from the image at setup ($(cat "$T/out"))"
}
# put OFFSET_MIB COUNT_KIB : random KiB into live/disk
put() { dd if=/dev/urandom of="$L" bs=1K seek=$(($1 * 1024)) count="$2" conv=notrunc status=none; }

truncate -s $((64 * M)) "$T/src.img"
random_mib "$T/src.img" 0 8
random_mib "$T/src.img" 16 8
fmount "$T/mnt" --state-dir "$T/state" --device disk=$T/src.img
mkdir "$B"
expect_fail_with "usage:" bash "$EX" "$T/mnt" disk

# 1. full, then incremental, while a writer runs in [0,16M)
start_writer "$L" 2048
sleep 0.2
run_during_writes "$T/ref1.img"
grep -q "^disk: full (new) backup in $IMG" "$T/out" || fail "first run: $(cat "$T/out")"
[ "$(stat -c %b "$IMG")" -lt $((40 * M / 512)) ] || fail "the full image is not sparse"
[ ! -e "$IMG.new" ] || fail "$IMG.new left behind"
sleep 0.3
run_during_writes "$T/ref2.img"
grep -q "^disk: incremental backup" "$T/out" || fail "second run: $(cat "$T/out")"
stop_writer

# 2. dd fails on the second range: --failure teardown, the bitmap keeps the writes
put 2 64
put 20 128
put 40 256
mkdir "$T/bin"
printf '#!/bin/sh\nn=$(cat %s 2>/dev/null || echo 0); echo $((n + 1)) >%s\n[ "$n" = 0 ] || { echo "dd: injected failure" >&2; exit 1; }\nexec /bin/dd "$@"\n' \
    "$T/ddcount" "$T/ddcount" >"$T/bin/dd"
chmod +x "$T/bin/dd"
example PATH="$T/bin:$PATH"
wait "$EXPID" && fail "the run with a failing dd succeeded"
grep -q "injected failure" "$T/err" || fail "dd was not the failure: $(cat "$T/err")"
grep -q "torn down as a failure" "$T/err" || fail "no --failure teardown: $(cat "$T/err")"
no_access "after a failed run"
dirty=$(bitmap_dirty)
[ "$dirty" -ge $((448 << 10)) ] || fail "bitmap holds $dirty bytes after a failed run, want >= 448 KiB"
cmp -s "$IMG" "$T/src.img" && fail "the failed run copied everything"

# 3. killed (SIGTERM) while dd runs: --failure teardown as well
put 30 64
printf '#!/bin/sh\ntouch %s; sleep 1\nexec /bin/dd "$@"\n' "$T/indd" >"$T/bin/dd"
example PATH="$T/bin:$PATH"
while [ ! -e "$T/indd" ]; do sleep 0.01; done
kill -TERM "$EXPID"
rc=0
wait "$EXPID" || rc=$?
[ "$rc" = 143 ] || fail "killed run exited $rc, want 143"
grep -q "torn down as a failure" "$T/err" || fail "no --failure teardown after SIGTERM: $(cat "$T/err")"
no_access "after a killed run"
[ "$(bitmap_dirty)" -ge $((dirty + (64 << 10))) ] || fail "bitmap lost writes after the killed run"

# 4. the next run is incremental and repairs the image
example
wait "$EXPID" || fail "the run after the failures failed: $(cat "$T/err")"
grep -q "^disk: incremental backup" "$T/out" || fail "run after failures: $(cat "$T/out")"
cmp "$IMG" "$T/src.img" || fail "the run after the failures did not repair the image"
no_access "at the end"
echo "ok: backup-example.sh: full + incremental during writes, dd failure and SIGTERM tear down as failures, next run repairs"

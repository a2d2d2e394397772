#!/usr/bin/env bash
# Never break the writer: the fleecing dir on a 1 MiB tmpfs (real ENOSPC), the
# --fleecing-limit, and a copy-before-write timeout (copies slowed by the test-only
# fault hook), under --on-cbw-error break-snapshot and break-guest-write.
source "$(dirname "$0")/lib.sh"

mkdir -p "$T/tiny"
mount -t tmpfs -o size=1m,mode=0700 tmpfs "$T/tiny"
MOUNTS+=("$T/tiny")        # the cleanup trap falls back to umount -l for it

status_field() {  # status_field PY_EXPR (s = status JSON)
    "$FLEECEFS" status "$T/mnt" --json | python3 -c "import json,sys; s=json.load(sys.stdin); print($1)"
}
# Under break-snapshot, old data first goes to memory (the --cbw-buffer write-behind) and a
# flusher thread stores it; a failed or slow fleecing write breaks the access from there,
# shortly after the live write returned.
wait_broken() {  # wait_broken SECONDS
    local i
    for ((i = 0; i < $1 * 10; i++)); do
        [ "$(status_field 's["access"]["broken"]')" = True ] && return 0
        sleep 0.1
    done
    return 1
}
new_image() { head -c $((32 << 20)) /dev/urandom >"$T/src.img"; cp "$T/src.img" "$T/ref.img"; }

# --- break-snapshot (default): ENOSPC in the fleecing dir --------------------------
new_image
fmount "$T/mnt" --state-dir "$T/state" --fleecing-dir "$T/tiny" --device disk=$T/src.img
"$FLEECEFS" setup "$T/mnt" --target t >/dev/null
# 4 MiB of writes need 4 MiB of fleecing space: more than the tmpfs has
dd if=/dev/urandom of="$T/new.bin" bs=1M count=4 status=none
dd if="$T/new.bin" of="$T/mnt/live/disk" bs=64K conv=notrunc,fsync status=none ||
    fail "a live write failed under break-snapshot"
cmp -n $((4 << 20)) "$T/new.bin" "$T/src.img" || fail "live writes did not reach the source"
wait_broken 5 || fail "access not broken after ENOSPC"
status_field 's["access"]["broken_reason"]' | grep -qi "no space" || fail "reason does not name ENOSPC"
[ "$(status_field 's["access"]["broken_at"] is not None')" = True ] || fail "no broken_at"
"$FLEECEFS" status "$T/mnt" | grep -q BROKEN || fail "status table does not show the broken access"
err=$(dd if="$T/mnt/snapshot/disk" of=/dev/null bs=64K count=1 skip=100 2>&1) && fail "snapshot read of a broken access succeeded"
echo "$err" | grep -q "Input/output error" || fail "snapshot read error is not EIO: $err"
if "$FLEECEFS" teardown "$T/mnt" --target t --success 2>"$T/err"; then fail "teardown --success of a broken access succeeded"; fi
grep -q "cannot be trusted" "$T/err" || fail "teardown message: $(cat "$T/err")"
[ -z "$(ls "$T/tiny")" ] || fail "fleecing files left behind"
"$FLEECEFS" unmount "$T/mnt"

# --- break-guest-write: ENOSPC fails the write, the snapshot stays valid ------------
new_image
fmount "$T/mnt" --state-dir "$T/state" --fleecing-dir "$T/tiny" --device disk=$T/src.img \
    --on-cbw-error break-guest-write
"$FLEECEFS" setup "$T/mnt" --target t >/dev/null
if dd if="$T/new.bin" of="$T/mnt/live/disk" bs=64K conv=notrunc,fsync oflag=direct status=none 2>"$T/err"; then
    fail "writes beyond the fleecing space succeeded under break-guest-write"
fi
grep -q "No space left on device" "$T/err" || fail "write error is not ENOSPC: $(cat "$T/err")"
[ "$(status_field 's["access"]["broken"]')" = False ] || fail "access broken under break-guest-write"
cp "$T/mnt/snapshot/disk" "$T/copy.img"
cmp "$T/copy.img" "$T/ref.img" || fail "snapshot differs from the point-in-time image"
# the refused write left the live image unchanged past what was accepted
cmp -s -i $((2 << 20)):$((2 << 20)) -n $((2 << 20)) "$T/src.img" "$T/ref.img" ||
    fail "live data changed beyond the fleecing space"
"$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null || fail "teardown of a valid access failed"
"$FLEECEFS" unmount "$T/mnt"

# --- --fleecing-limit ----------------------------------------------------------------
new_image
fmount "$T/mnt" --state-dir "$T/state" --device disk=$T/src.img --fleecing-limit 512K \
    --on-cbw-error break-guest-write
"$FLEECEFS" setup "$T/mnt" --target t >/dev/null
dd if="$T/new.bin" of="$T/mnt/live/disk" bs=64K count=8 conv=notrunc status=none || fail "writes within the limit failed"
if dd if="$T/new.bin" of="$T/mnt/live/disk" bs=64K count=1 seek=8 conv=notrunc status=none 2>"$T/err"; then
    fail "a write past the fleecing limit succeeded"
fi
grep -q "No space left on device" "$T/err" || fail "limit error is not ENOSPC: $(cat "$T/err")"
fallocate -p -o 0 -l $((256 << 10)) "$T/mnt/snapshot/disk"     # give space back
dd if="$T/new.bin" of="$T/mnt/live/disk" bs=64K count=1 seek=8 conv=notrunc status=none ||
    fail "discard did not give fleecing space back"
"$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null
"$FLEECEFS" unmount "$T/mnt"

# --- timeout (copies slowed to 3 s by the fault hook; timeout 0.5 s) -----------------
grep -q FLEECEFS_FAULT_CBW "$FLEECEFS" ||
    fail "$FLEECEFS has no fault hook: build it with 'cargo build --features fault-injection'"
for variant in break-snapshot break-snapshot-sync break-guest-write; do
    policy=${variant%-sync}
    buffer=16M
    [ $variant = break-snapshot-sync ] && buffer=0     # synchronous copies
    new_image
    FLEECEFS_FAULT_CBW=delay=3000 fmount "$T/mnt" --state-dir "$T/state" --device disk=$T/src.img \
        --cbw-timeout 0.5 --on-cbw-error $policy --cbw-buffer $buffer
    "$FLEECEFS" setup "$T/mnt" --target t >/dev/null
    start=$(date +%s%N)
    rc=0
    dd if="$T/new.bin" of="$T/mnt/live/disk" bs=4K count=1 conv=notrunc oflag=direct status=none 2>"$T/err" || rc=$?
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    [ "$ms" -lt 2500 ] || fail "$variant: the writer waited ${ms} ms for a slow copy"
    if [ $variant = break-snapshot ]; then
        # write-behind: the writer does not wait for the fleecing write at all
        [ "$ms" -lt 400 ] || fail "$variant: the writer waited ${ms} ms for a write-behind copy"
    fi
    if [ $policy = break-snapshot ]; then
        [ $rc = 0 ] || fail "$variant: write failed on timeout: $(cat "$T/err")"
        wait_broken 3 || fail "$variant: access not broken by the timeout"
        status_field 's["access"]["broken_reason"]' | grep -q timeout || fail "reason does not say timeout"
        dd if="$T/mnt/snapshot/disk" of=/dev/null bs=4K count=1 status=none 2>/dev/null && fail "broken snapshot readable"
        sleep 3     # the late copy finishes: still nothing readable
        dd if="$T/mnt/snapshot/disk" of=/dev/null bs=4K count=1 status=none 2>/dev/null && fail "snapshot readable after a late copy"
        "$FLEECEFS" teardown "$T/mnt" --target t --failure >/dev/null || fail "teardown --failure of a broken access failed"
    else
        [ $rc != 0 ] || fail "break-guest-write: write succeeded despite the timeout"
        grep -q "timed out" "$T/err" || fail "write error is not ETIMEDOUT: $(cat "$T/err")"
        cmp -n 4096 "$T/src.img" "$T/ref.img" || fail "a timed-out write changed the live data"
        sleep 3     # the late copy finishes with the old data: the snapshot is intact
        cmp "$T/mnt/snapshot/disk" "$T/ref.img" || fail "snapshot differs after a late copy"
        "$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null
    fi
    "$FLEECEFS" unmount "$T/mnt"
done
echo "ok: ENOSPC and limit under both policies, timeouts bounded (write-behind, synchronous, break-guest-write), late copies harmless"

#!/usr/bin/env bash
# cp and dd copy a snapshot while a writer keeps writing the live image; the copies are
# byte-for-byte the image as it was at setup.
source "$(dirname "$0")/lib.sh"

head -c $((32 << 20)) /dev/urandom >"$T/src.img"
fmount "$T/mnt" --state-dir "$T/state" --device disk=$T/src.img
start_writer "$T/mnt/live/disk" 8192
setup_during_writes "$T/mnt" "$T/src.img" cptest
before=$BEFORE

cp "$T/mnt/snapshot/disk" "$T/copy-cp.img"
dd if="$T/mnt/snapshot/disk" of="$T/copy-dd.img" bs=1M status=none
after=$(writes)
stop_writer

cmp "$T/copy-cp.img" "$T/ref.img" || fail "cp copy differs from the point-in-time image"
cmp "$T/copy-dd.img" "$T/ref.img" || fail "dd copy differs from the point-in-time image"
[ "$after" -gt "$before" ] || fail "the writer made no writes during the copy ($before -> $after)"
cmp -s "$T/src.img" "$T/ref.img" && fail "the live image did not change"
"$FLEECEFS" status "$T/mnt" --json | grep -q '"copied_bytes": [1-9]' || fail "nothing was copied before write"
teardown_clean cptest
echo "ok: snapshot copies match while $((after - before)) writes ran"

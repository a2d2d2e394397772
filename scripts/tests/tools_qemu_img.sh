#!/usr/bin/env bash
# `qemu-img info` and `qemu-img convert -f raw -O qcow2` of a snapshot while a writer keeps
# writing (and punching and zeroing) the live image; `qemu-img compare` finds the qcow2 identical to the point-in-time
# image.
source "$(dirname "$0")/lib.sh"
command -v qemu-img >/dev/null || fail "qemu-img is not installed (Debian: qemu-utils)"

M=$((1 << 20))
# 32 MiB: random data except zeros in [8M,12M) and [24M,32M), so convert meets zero runs
truncate -s $((32 * M)) "$T/src.img"
random_mib "$T/src.img" 0 8
random_mib "$T/src.img" 12 12

fmount "$T/mnt" --state-dir "$T/state" --device disk=$T/src.img
start_writer "$T/mnt/live/disk" 4096 # block numbers up to 8190: all of the image is written
sleep 0.3
pause_writer
cp "$T/src.img" "$T/ref.img" # the point-in-time image
"$FLEECEFS" setup "$T/mnt" --target qemu >/dev/null
# the guest discards and zeroes data ranges: the snapshot must keep the old data
fallocate -p -o $((2 * M)) -l $M "$T/mnt/live/disk" || fail "fallocate -p on live failed"
fallocate -z -o $((16 * M)) -l $M "$T/mnt/live/disk" || fail "fallocate -z on live failed"
resume_writer
before=$(writes_now)

qemu-img info -f raw "$T/mnt/snapshot/disk" >"$T/info.txt" 2>&1 || fail "qemu-img info failed: $(cat "$T/info.txt")"
grep -q "file format: raw" "$T/info.txt" || fail "qemu-img info: no raw format: $(cat "$T/info.txt")"
grep -q "virtual size: .*($((32 * M)) bytes)" "$T/info.txt" || fail "qemu-img info: wrong size: $(cat "$T/info.txt")"
qemu-img convert -f raw -O qcow2 "$T/mnt/snapshot/disk" "$T/copy.qcow2" 2>"$T/convert.err" ||
    fail "qemu-img convert failed: $(cat "$T/convert.err")"
after=$(writes_now)
# keep writing while compare runs against the (still active) snapshot too
qemu-img compare -f raw -F raw "$T/ref.img" "$T/mnt/snapshot/disk" >"$T/cmp-snap.txt" 2>&1 ||
    fail "qemu-img compare of the snapshot itself: $(cat "$T/cmp-snap.txt")"
stop_writer

qemu-img compare -f raw -F qcow2 "$T/ref.img" "$T/copy.qcow2" >"$T/cmp.txt" 2>&1 ||
    fail "qemu-img compare: $(cat "$T/cmp.txt")"
grep -q "Images are identical" "$T/cmp.txt" || fail "qemu-img compare: $(cat "$T/cmp.txt")"
grep -q "Images are identical" "$T/cmp-snap.txt" || fail "qemu-img compare (snapshot): $(cat "$T/cmp-snap.txt")"
# and byte for byte, independently of qemu-img's reading of the qcow2
qemu-img convert -f qcow2 -O raw "$T/copy.qcow2" "$T/back.raw"
cmp "$T/back.raw" "$T/ref.img" || fail "the qcow2 converted back to raw differs from the point-in-time image"
[ "$after" -gt "$before" ] || fail "the writer made no writes during qemu-img convert ($before -> $after)"
cmp -s "$T/src.img" "$T/ref.img" && fail "the live image did not change during the backup"
"$FLEECEFS" status "$T/mnt" --json | grep -q '"copied_bytes": [1-9]' || fail "nothing was copied before write"
teardown_clean qemu
echo "ok: qemu-img info/convert/compare of the snapshot: identical while $((after - before)) writes ran"

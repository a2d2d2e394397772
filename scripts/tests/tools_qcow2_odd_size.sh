#!/usr/bin/env bash
# qcow2 copies of a device whose size is not a multiple of 512 bytes. QEMU reads a raw
# image's size rounded up to whole 512-byte sectors (the tail reads as zeros) and a qcow2
# image's size rounded down, so the qcow2 virtual size is rounded up and the output says
# so. `qemu-img compare` of the image as it was at setup with the full backup, and of the
# next point with an incremental overlay, says identical; `qemu-img convert -O raw` gives
# back every byte including the last ones; `fleecefs restore` takes the padded backup.
# A restore of a backup of another size names the resize to make first.
source "$(dirname "$0")/lib.sh"

N=$(((3 << 20) + 1000))      # 3 MiB + 1000 bytes: the last sector is partial
V=$(((3 << 20) + 1024))      # rounded up
head -c $N /dev/urandom >"$T/src.img"
fmount "$T/mnt" --state-dir "$T/state" --device d="$T/src.img"
L=$T/mnt/live/d
B=$T/backup
mkdir -p "$B"

# full backup
cp "$T/src.img" "$T/ref1.raw"
"$FLEECEFS" setup "$T/mnt" --target t --bitmap t >/dev/null
dd if=/dev/urandom of="$L" bs=1 count=200 seek=$((N - 200)) conv=notrunc status=none # after setup
out=$("$FLEECEFS" copy "$T/mnt" d "$B/full.qcow2" --format qcow2 --verify) || fail "full qcow2 copy failed"
case "$out" in
*"virtual size rounded up from $N to $V bytes"*) ;;
*) fail "the copy does not say that the virtual size is rounded up: $out" ;;
esac
"$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null
[ "$(qemu-img info --output=json "$B/full.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')" = $V ] ||
    fail "the full image's virtual size is not $V"
qemu-img compare "$T/ref1.raw" "$B/full.qcow2" >"$T/cmp.log" 2>&1 || fail "qemu-img compare of the full backup: $(cat "$T/cmp.log")"
qemu-img convert -O raw "$B/full.qcow2" "$T/full.raw"
[ "$(stat -c %s "$T/full.raw")" = $V ] || fail "qemu-img convert gives $(stat -c %s "$T/full.raw") bytes, not $V"
cmp -n $N "$T/ref1.raw" "$T/full.raw" || fail "qemu-img convert of the full backup lost data"
[ "$(tail -c $((V - N)) "$T/full.raw" | tr -d '\0' | wc -c)" = 0 ] || fail "the padding is not zeros"

# incremental overlay: the last bytes changed
cp "$T/src.img" "$T/ref2.raw"
"$FLEECEFS" setup "$T/mnt" --target t --bitmap t >/dev/null
"$FLEECEFS" copy "$T/mnt" d "$B/inc.qcow2" --format qcow2 --incremental --backing "$B/full.qcow2" \
    --verify --json >"$T/inc.json" || fail "incremental qcow2 copy failed"
"$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null
[ "$(js "$T/inc.json" 'd["virtual_size"], d["device_size"]')" = "$V $N" ] || fail "--json: $(cat "$T/inc.json")"
qemu-img compare "$T/ref2.raw" "$B/inc.qcow2" >"$T/cmp.log" 2>&1 || fail "qemu-img compare of the overlay: $(cat "$T/cmp.log")"
qemu-img convert -O raw "$B/inc.qcow2" "$T/inc.raw"
cmp -n $N "$T/ref2.raw" "$T/inc.raw" || fail "qemu-img convert of the overlay lost data"

# an overlay on a raw backup of the exact size (QEMU reads the raw file rounded up too)
"$FLEECEFS" bitmap remove "$T/mnt" --target t >/dev/null
"$FLEECEFS" setup "$T/mnt" --target t --bitmap t >/dev/null
"$FLEECEFS" copy "$T/mnt" d "$B/base.raw" 2>/dev/null >/dev/null || fail "full raw copy failed"
"$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null
[ "$(stat -c %s "$B/base.raw")" = $N ] || fail "the raw copy is not $N bytes"
dd if=/dev/urandom of="$L" bs=1 count=300 seek=$((N - 300)) conv=notrunc status=none
cp "$L" "$T/ref3.raw"
"$FLEECEFS" setup "$T/mnt" --target t --bitmap t >/dev/null
"$FLEECEFS" copy "$T/mnt" d "$B/onraw.qcow2" --format qcow2 --incremental --backing "$B/base.raw" \
    --verify >/dev/null 2>&1 || fail "qcow2 overlay on a raw backup failed"
"$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null
qemu-img compare "$T/ref3.raw" "$B/onraw.qcow2" >"$T/cmp.log" 2>&1 || fail "qemu-img compare of the overlay on raw: $(cat "$T/cmp.log")"
qemu-img convert -O raw "$B/onraw.qcow2" "$T/onraw.raw"
cmp -n $N "$T/ref3.raw" "$T/onraw.raw" || fail "qemu-img convert of the overlay on raw lost data"

# restore the full backup (padded) onto the device
"$FLEECEFS" restore "$T/mnt" d "$B/full.qcow2" --verify >/dev/null || fail "restore of the padded qcow2 backup failed"
cmp "$T/ref1.raw" "$L" || fail "after restore live/d differs from the full backup's point"

# a backup of another size: the message names the resize to make first
head -c $((2 << 20)) /dev/urandom >"$B/small.raw"
expect_rc 1 "fleecefs resize $T/mnt d 2097152 --allow-shrink" "$FLEECEFS" restore "$T/mnt" d "$B/small.raw"
head -c $((4 << 20)) /dev/urandom >"$B/big.raw"
expect_rc 1 "fleecefs resize $T/mnt d 4194304\`" "$FLEECEFS" restore "$T/mnt" d "$B/big.raw"
cmp "$T/ref1.raw" "$L" || fail "a refused restore changed live/d"
echo "ok: qcow2 of a $N-byte device: virtual size $V, qemu-img compare/convert identical, restore"

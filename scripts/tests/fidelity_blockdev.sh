#!/usr/bin/env bash
# Issue 12 item 8: caller errors are not device errors, and fallocate on a block-device
# source does what it does on a regular file.
#  - Unaligned punch hole and zero range on a block device: the partial edges are zeroed,
#    the aligned middle discarded/zeroed; the snapshot keeps the point-in-time data.
#  - Plain allocation (`fallocate -l`) inside the device succeeds (all of it is allocated).
#  - Refused requests (past the end, unsupported modes) fail with their errno and are not
#    listed under `errors` in `status`.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
head -c $((8 * M)) /dev/urandom >"$T/b.img"
cp "$T/b.img" "$T/model.img"
loop_attach "$T/b.img"
fmount "$T/mp" --state-dir "$T/st" --device b="$LOOPDEV"
L="$T/mp/live/b"
"$FLEECEFS" setup "$T/mp" --target t >/dev/null
cp "$T/b.img" "$T/ref.img"

# the same operations on a regular file are the model
both() {
    fallocate "$@" "$L" || fail "fallocate $* on a block device's live file failed"
    fallocate "$@" "$T/model.img"
}
both -p -o 1000 -l 70000
both -z -o 100001 -l 300007
both -p -o $((2 * M + 512)) -l 1
both -z -o $((3 * M)) -l $((M + 4097))
both -p -o $((8 * M - 3000)) -l 3000
both -l $((8 * M))
both -o $((M + 3)) -l 5
cmp "$L" "$T/model.img" || fail "live/b differs from a regular file after the same fallocates"
cmp "$T/b.img" "$T/model.img" || fail "the source differs from the model"
cmp "$T/mp/snapshot/b" "$T/ref.img" || fail "the snapshot changed"

# caller errors: their errno, and no entry in status errors
expect_fail_with "No space" fallocate -o $((8 * M - 4096)) -l 8192 "$L"
expect_fail_with "not supported" fallocate -c -o 0 -l 65536 "$L"
expect_fail_with "not supported" fallocate -i -o 0 -l 65536 "$L"
errors=$(status_json "$T/mp" 'len(d["errors"])')
[ "$errors" = 0 ] || fail "status lists caller errors as device errors: $(status_json "$T/mp" 'd["errors"]')"
"$FLEECEFS" teardown "$T/mp" --target t --failure >/dev/null
"$FLEECEFS" unmount "$T/mp"

# a source that refuses a mode (tmpfs has no zero range): EOPNOTSUPP, as on the file
# itself, and not a device error
mkdir -p "$T/tmpfs"
mount -t tmpfs -o size=64m tmpfs "$T/tmpfs"
MOUNTS+=("$T/tmpfs") # lazily detached at exit if still mounted
head -c $((4 * M)) /dev/urandom >"$T/tmpfs/c.img"
fmount "$T/mp2" --state-dir "$T/st2" --device c="$T/tmpfs/c.img"
expect_fail_with "not supported" fallocate -z -o 0 -l 65536 "$T/mp2/live/c"
errors=$(status_json "$T/mp2" 'len(d["errors"])')
[ "$errors" = 0 ] || fail "status lists a refused fallocate mode as a device error: $(status_json "$T/mp2" 'd["errors"]')"
"$FLEECEFS" unmount "$T/mp2"
umount "$T/tmpfs"
echo "fidelity_blockdev: ok"

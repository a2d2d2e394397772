#!/usr/bin/env bash
# Caller errors are not device errors, and fallocate on a block-device
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

# SEEK_DATA/SEEK_HOLE on a block-device source (which has no SEEK_HOLE of its own): live/
# is all data; an incremental snapshot's data is its accessible clusters, so
# `cp --sparse=always` and `qemu-img convert` read only those (the others answer EACCES)
head -c $((8 * M)) /dev/urandom >"$T/s.img"
loop_attach "$T/s.img"
fmount "$T/mp3" --state-dir "$T/st3" --device s="$LOOPDEV" --cluster-size 64K
L3=$T/mp3/live/s
# seek FILE WHENCE OFFSET : the offset lseek returns, or the errno name
seek() {
    python3 -c '
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    print(os.lseek(fd, int(sys.argv[3]), os.SEEK_DATA if sys.argv[2] == "data" else os.SEEK_HOLE))
except OSError as e:
    print(errno.errorcode[e.errno])' "$@"
}
[ "$(seek "$L3" data 0)" = 0 ] || fail "SEEK_DATA 0 on live/s of a block device: $(seek "$L3" data 0)"
[ "$(seek "$L3" data 4097)" = 4097 ] || fail "SEEK_DATA 4097 on live/s: $(seek "$L3" data 4097)"
[ "$(seek "$L3" hole 0)" = $((8 * M)) ] || fail "SEEK_HOLE 0 on live/s: $(seek "$L3" hole 0)"
[ "$(seek "$L3" data $((8 * M)))" = ENXIO ] || fail "SEEK_DATA at the end of live/s: $(seek "$L3" data $((8 * M)))"
cp --sparse=always "$L3" "$T/live-copy.img" || fail "cp --sparse=always of live/s failed"
cmp "$L3" "$T/live-copy.img" || fail "cp --sparse=always of live/s differs"
"$FLEECEFS" setup "$T/mp3" --target t --bitmap t >/dev/null
"$FLEECEFS" teardown "$T/mp3" --target t --success >/dev/null
dd if=/dev/urandom of="$L3" bs=64K count=2 seek=10 conv=notrunc status=none   # [640K, 768K)
dd if=/dev/urandom of="$L3" bs=64K count=1 seek=100 conv=notrunc status=none  # [6400K, 6464K)
"$FLEECEFS" setup "$T/mp3" --target t --bitmap t >/dev/null
cp "$L3" "$T/ref3.img"   # the image at setup (nothing writes now)
S3=$T/mp3/snapshot/s
[ "$(cat "$S3.dirty")" = "$(printf '%s\n' "655360 131072" "6553600 65536")" ] || fail "unexpected dirty map: $(cat "$S3.dirty")"
[ "$(seek "$S3" data 0)" = 655360 ] || fail "SEEK_DATA 0 on the snapshot: $(seek "$S3" data 0)"
[ "$(seek "$S3" hole 655360)" = 786432 ] || fail "SEEK_HOLE 655360 on the snapshot: $(seek "$S3" hole 655360)"
[ "$(seek "$S3" data 786432)" = 6553600 ] || fail "SEEK_DATA 786432 on the snapshot: $(seek "$S3" data 786432)"
[ "$(seek "$S3" hole 6553600)" = 6619136 ] || fail "SEEK_HOLE 6553600 on the snapshot: $(seek "$S3" hole 6553600)"
[ "$(seek "$S3" data 6619136)" = ENXIO ] || fail "SEEK_DATA past the last dirty range: $(seek "$S3" data 6619136)"
# what a sparse copy of the incremental snapshot must hold: the dirty ranges, zeros elsewhere
truncate -s $((8 * M)) "$T/want3.img"
dd if="$T/ref3.img" of="$T/want3.img" bs=64K skip=10 seek=10 count=2 conv=notrunc status=none
dd if="$T/ref3.img" of="$T/want3.img" bs=64K skip=100 seek=100 count=1 conv=notrunc status=none
cp --sparse=always "$S3" "$T/snap-cp.img" || fail "cp --sparse=always of an incremental snapshot of a block device failed"
cmp "$T/snap-cp.img" "$T/want3.img" || fail "cp --sparse=always of the incremental snapshot differs from its dirty ranges"
qemu-img convert -f raw -O raw "$S3" "$T/snap-qemu.img" || fail "qemu-img convert of an incremental snapshot of a block device failed"
cmp "$T/snap-qemu.img" "$T/want3.img" || fail "qemu-img convert of the incremental snapshot differs from its dirty ranges"
"$FLEECEFS" teardown "$T/mp3" --target t --success >/dev/null
"$FLEECEFS" unmount "$T/mp3"
echo "fidelity_blockdev: ok"

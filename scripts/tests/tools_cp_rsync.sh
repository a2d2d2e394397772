#!/usr/bin/env bash
# Two backups the way people run them: a first access copied in full with `rsync -a
# --inplace`; then changes, and a second access copied while a writer keeps writing the
# live image, with `cp --sparse=always` and with `rsync -a --inplace --no-whole-file` (delta
# transfer onto the first backup, rsync's usual size+mtime quick check deciding whether the
# file changed). Both copies are the point-in-time image of the second access, and the cp
# copy keeps the image's zero regions as holes.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
# 64 MiB image: random data in [0,8M) and [16M,24M), zeros elsewhere (48 MiB of zeros)
truncate -s $((64 * M)) "$T/src.img"
random_mib "$T/src.img" 0 8
random_mib "$T/src.img" 16 8

fmount "$T/mnt" --state-dir "$T/state" --device disk=$T/src.img
# first backup: full, with rsync -a
cp "$T/src.img" "$T/ref1.img"
"$FLEECEFS" setup "$T/mnt" --target full >/dev/null
mkdir "$T/backup"
rsync -a --inplace "$T/mnt/snapshot/disk" "$T/backup/disk" || fail "first rsync failed"
"$FLEECEFS" teardown "$T/mnt" --target full --success >/dev/null
cmp "$T/backup/disk" "$T/ref1.img" || fail "the first rsync backup differs from the image"
sleep 1.1 # the next backup is at least a second later (mtime granularity of rsync's check)

# change the image: 2 MiB rewritten in a data region, 1 MiB written into a zero region
random_mib "$T/mnt/live/disk" 4 2
random_mib "$T/mnt/live/disk" 10 1

# with 2048 blocks of 4 KiB the writer stays in [0,8M): [24M,64M) stays zero in the
# point-in-time image
start_writer "$T/mnt/live/disk" 2048
setup_during_writes "$T/mnt" "$T/src.img" tools
before=$BEFORE

cp --sparse=always "$T/mnt/snapshot/disk" "$T/copy-cp.img"
mid=$(writes_now)
rsync -a --inplace --no-whole-file --bwlimit=8m --stats "$T/mnt/snapshot/disk" "$T/backup/disk" >"$T/rsync.log" ||
    fail "rsync failed: $(cat "$T/rsync.log")"
after=$(writes_now)
stop_writer

cmp "$T/copy-cp.img" "$T/ref.img" || fail "cp --sparse=always copy differs from the point-in-time image"
cmp "$T/backup/disk" "$T/ref.img" ||
    fail "rsync -a --inplace onto the first backup differs from the point-in-time image (rsync: $(grep -E 'files transferred|Literal' "$T/rsync.log" | tr '\n' ' '))"
[ "$mid" -gt "$before" ] || fail "the writer made no writes during cp ($before -> $mid)"
[ "$after" -gt "$mid" ] || fail "the writer made no writes during rsync ($mid -> $after)"
cmp -s "$T/src.img" "$T/ref.img" && fail "the live image did not change during the backup"
# rsync really did a delta transfer: most data matched the old copy, the changes were sent
matched=$(sed -n 's/^Matched data: \([0-9,]*\) bytes.*/\1/p' "$T/rsync.log" | tr -d ,)
literal=$(sed -n 's/^Literal data: \([0-9,]*\) bytes.*/\1/p' "$T/rsync.log" | tr -d ,)
[ -n "$matched" ] && [ -n "$literal" ] || fail "no rsync stats: $(cat "$T/rsync.log")"
[ "$matched" -ge $((56 * M)) ] || fail "rsync matched only $matched bytes: no delta transfer"
[ "$literal" -ge $((3 * M)) ] || fail "rsync sent only $literal literal bytes for >= 3 MiB of changes"
# sparse: [24M,64M) and most of [11M,16M) are zeros in the image, so >= 44 MiB must be holes
alloc=$(($(stat -c %b "$T/copy-cp.img") * 512))
[ "$alloc" -le $((20 * M)) ] || fail "cp --sparse=always copy allocates $alloc bytes of a 64 MiB image with >= 44 MiB of zeros"
"$FLEECEFS" status "$T/mnt" --json | grep -q '"copied_bytes": [1-9]' || fail "nothing was copied before write"
teardown_clean tools
echo "ok: cp (sparse, $((alloc / M)) MiB allocated) and rsync (delta: $((matched / M)) MiB matched) copies match while $((mid - before)) + $((after - mid)) writes ran"

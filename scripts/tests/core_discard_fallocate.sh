#!/usr/bin/env bash
# `fallocate -p` on snapshot/NAME is discard: the fleecing file shrinks, discarded ranges
# read as EACCES, live writes there copy nothing, and other fallocate modes (-z, plain
# allocate) fail with EOPNOTSUPP. (How an unaligned punch rounds to clusters is a rule of
# the engine: tests/mount_core.rs, unaligned_discard_aligns_inward.)
source "$(dirname "$0")/lib.sh"

K=1024
M=$((1 << 20))
C=$((64 * K))
head -c $((32 * M)) /dev/urandom >"$T/src.img"
cp "$T/src.img" "$T/ref.img"
fmount "$T/mnt" --state-dir "$T/state" --device disk=$T/src.img --cluster-size 64K
S=$T/mnt/snapshot/disk
L=$T/mnt/live/disk
FL=$T/state/fleecing/disk.dtest.fleece
"$FLEECEFS" setup "$T/mnt" --target dtest >/dev/null
[ -f "$FL" ] || fail "no fleecing file $FL"

copied() { status_json "$T/mnt" 'd["access"]["copied_bytes"]'; }
discarded() { status_json "$T/mnt" 'd["access"]["discarded_bytes"]'; }
blocks() { stat -c %b "$FL"; }
dubytes() { du -B1 "$FL" | cut -f1; }
# live_write OFFSET LENGTH : random bytes into live/disk
live_write() {
    head -c "$2" /dev/urandom | dd of="$L" bs=64K seek="$1" oflag=seek_bytes conv=notrunc \
        iflag=fullblock status=none
}
# snap_read OFFSET LENGTH OUT : dd of a snapshot range (fails if dd fails)
snap_read() {
    dd if="$S" of="$3" bs="$2" skip="$1" count=1 iflag=skip_bytes,fullblock status=none
}
# check_snap OFFSET LENGTH : the snapshot range reads as the point-in-time image
check_snap() {
    snap_read "$1" "$2" "$T/part" || fail "snapshot read at $1+$2 failed"
    cmp -s "$T/part" <(dd if="$T/ref.img" bs="$2" skip="$1" count=1 iflag=skip_bytes,fullblock status=none) ||
        fail "snapshot range $1+$2 differs from the point-in-time image"
}
# expect_eacces OFFSET : a snapshot read at OFFSET fails with Permission denied
expect_eacces() {
    expect_fail_with "Permission denied" dd if="$S" of=/dev/null bs=4096 skip="$1" count=1 \
        iflag=skip_bytes status=none
}

# 1. Copy 4 MiB into the fleecing file, then discard the first 2 MiB of it.
live_write 0 $((4 * M))
[ "$(copied)" = $((4 * M)) ] || fail "copied_bytes $(copied) after a 4 MiB live write, want $((4 * M))"
b0=$(blocks)
du0=$(dubytes)
[ $((b0 * 512)) -ge $((4 * M)) ] || fail "fleecing file holds $((b0 * 512)) bytes, want >= 4 MiB"
check_snap 0 $((2 * M)) # read it first, as a backup does (it may now be in the page cache)
fallocate -p -o 0 -l $((2 * M)) "$S" || fail "fallocate -p on the snapshot failed"
b1=$(blocks)
du1=$(dubytes)
[ $((b1 * 512)) -le $((b0 * 512 - 2 * M)) ] ||
    fail "stat %b of the fleecing file went $b0 -> $b1 blocks after discarding 2 MiB of copied data"
[ "$du1" -le $((du0 - 2 * M)) ] || fail "du of the fleecing file went $du0 -> $du1 after discarding 2 MiB"
[ "$(discarded)" = $((2 * M)) ] || fail "discarded_bytes $(discarded), want $((2 * M))"
# discarded ranges fail with EACCES, the rest still reads the point-in-time data
expect_eacces 0
expect_eacces $((M + 4096))
expect_eacces $((2 * M - 4096))
check_snap $((2 * M)) $((2 * M))
# a live write into the discarded (already copied) range copies nothing
c=$(copied)
live_write $((M / 2)) $C
[ "$(copied)" = "$c" ] || fail "live write into a discarded copied range: copied_bytes $c -> $(copied)"

# 2. Discard a range that was never copied; live writes there must copy nothing, while a
#    write next to it does copy (so the check can see copying).
fallocate -p -o $((8 * M)) -l $M "$S"
[ "$(discarded)" = $((3 * M)) ] || fail "discarded_bytes $(discarded), want $((3 * M))"
expect_eacces $((8 * M))
c=$(copied)
b=$(blocks)
live_write $((8 * M)) $M
[ "$(copied)" = "$c" ] || fail "live write into a discarded range raised copied_bytes $c -> $(copied)"
[ "$(blocks)" = "$b" ] || fail "live write into a discarded range grew the fleecing file $b -> $(blocks)"
live_write $((9 * M)) $C
[ "$(copied)" = $((c + C)) ] || fail "live write of one cluster next to it: copied_bytes $c -> $(copied)"
check_snap $((9 * M)) $C

# 3. Other fallocate modes on the snapshot fail with EOPNOTSUPP and change nothing.
expect_fail_with "Operation not supported" fallocate -z -o $((2 * M)) -l $M "$S"
expect_fail_with "Operation not supported" fallocate -o $((2 * M)) -l $M "$S"
check_snap $((2 * M)) $((2 * M))
[ "$(discarded)" = $((3 * M)) ] || fail "discarded_bytes $(discarded) after the refused modes"

"$FLEECEFS" teardown "$T/mnt" --target dtest --success >/dev/null
[ ! -e "$FL" ] || fail "fleecing file left after teardown"
echo "ok: discard freed $(((b0 - b1) * 512)) fleecing bytes, EACCES and EOPNOTSUPP as specified"

#!/usr/bin/env bash
# `fleecefs copy --bwlimit RATE` and `--jobs N`. A 200 MiB full copy at --bwlimit 40M
# averages within 15% of 40 MiB/s (measured outside the program, by wall-clock time); the
# copies with --jobs 1, 4 and 8, raw and qcow2, all equal the point-in-time image.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
head -c $((200 * M)) /dev/urandom >"$T/src.img"
dd if=/dev/zero of="$T/src.img" bs=1M seek=50 count=30 conv=notrunc status=none
fmount "$T/mnt" --state-dir "$T/state" --device disk=$T/src.img
"$FLEECEFS" setup "$T/mnt" --target t >/dev/null

start=$(date +%s.%N)
"$FLEECEFS" copy "$T/mnt" disk "$T/limited.img" --bwlimit 40M --jobs 4 --json >"$T/l.json" 2>/dev/null || fail "copy --bwlimit failed"
end=$(date +%s.%N)
rate=$(python3 -c "print(round(200 / ($end - $start), 1))")
python3 -c "import sys; r = $rate; sys.exit(0 if 40 * 0.85 <= r <= 40 * 1.15 else 1)" ||
    fail "--bwlimit 40M copied 200 MiB at $rate MiB/s"
cmp "$T/limited.img" "$T/src.img" || fail "the rate-limited copy differs"
grep -q '"bwlimit": 41943040' "$T/l.json" || fail "--json has no bwlimit: $(cat "$T/l.json")"

for j in 1 4 8; do
    "$FLEECEFS" copy "$T/mnt" disk "$T/j$j.img" --jobs $j >/dev/null 2>&1 || fail "copy --jobs $j failed"
    cmp "$T/j$j.img" "$T/src.img" || fail "copy --jobs $j differs"
    "$FLEECEFS" copy "$T/mnt" disk "$T/j$j.qcow2" --format qcow2 --jobs $j >/dev/null 2>&1 || fail "qcow2 copy --jobs $j failed"
    qemu-img check -q "$T/j$j.qcow2" || fail "qemu-img check of the qcow2 copy --jobs $j"
    qemu-img convert -O raw "$T/j$j.qcow2" "$T/j$j.raw"
    cmp "$T/j$j.raw" "$T/src.img" || fail "qcow2 copy --jobs $j differs"
    rm -f "$T/j$j.img" "$T/j$j.qcow2" "$T/j$j.raw"
done
"$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null
echo "ok: --bwlimit 40M: $rate MiB/s over 200 MiB; --jobs 1/4/8 raw and qcow2 identical"

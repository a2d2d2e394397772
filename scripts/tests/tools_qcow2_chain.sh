#!/usr/bin/env bash
# `fleecefs copy --format qcow2`: a full image (cluster size = the mount's 128K, only the
# clusters holding data allocated) and three incremental overlays, each on the previous
# backup, one copied during writes with --discard --verify. Each image passes
# `qemu-img check`, `qemu-img info --backing-chain` shows the chain with its formats,
# `qemu-img convert -O raw` of each gives that point's snapshot byte for byte, each
# overlay allocates exactly the access's dirty ranges, PREV is never changed. An overlay on
# a raw backup, on a smaller one (the device grew), and the refusals (existing DEST,
# missing PREV, larger PREV, flag misuse) exit 1 leaving nothing behind.
# Then `fleecefs restore` writes each point back onto live/disk in turn (ranges already
# equal are skipped) and live/disk equals that point's snapshot each time.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
C=$((128 << 10))
L=$T/mnt/live/disk
B=$T/backup
mkdir -p "$B"
put() { dd if="$3" of="$L" bs=1K seek=$(($1 * 1024)) count="$2" iflag=fullblock conv=notrunc status=none; }
# top_ranges IMAGE : the ranges allocated in IMAGE itself (data or zero clusters, depth 0),
# merged, as "OFFSET LENGTH" lines
top_ranges() {
    qemu-img map --output=json "$1" | python3 -c '
import json, sys
out = []
for e in json.load(sys.stdin):
    if e["depth"] != 0 or not (e["data"] or e["zero"]) or e.get("present") is False:
        continue
    if out and out[-1][0] + out[-1][1] == e["start"]:
        out[-1][1] += e["length"]
    else:
        out.append([e["start"], e["length"]])
for o, l in out:
    print(o, l)'
}
# data_clusters IMAGE : allocated data clusters of a single-layer qcow2 image
data_clusters() {
    qemu-img map --output=json "$1" | python3 -c '
import json, sys
print(sum(e["length"] for e in json.load(sys.stdin) if e["data"] and e["depth"] == 0) // '$C')'
}
# nonzero_clusters RAW : clusters of RAW holding a non-zero byte
nonzero_clusters() {
    python3 -c '
import sys
n = 0
with open(sys.argv[1], "rb") as f:
    while True:
        b = f.read('$C')
        if not b:
            break
        n += b.count(0) != len(b)
print(n)' "$1"
}
# check_image IMAGE REF : qemu-img check passes and the image reads as REF
check_image() {
    qemu-img check -q "$1" || fail "qemu-img check $1"
    rm -f "$T/conv.raw"
    qemu-img convert -O raw "$1" "$T/conv.raw"
    cmp "$T/conv.raw" "$2" || fail "qemu-img convert -O raw $1 differs from $2"
}
setup_chain() {
    "$FLEECEFS" setup "$T/mnt" --target chain --bitmap b --json >"$T/setup.json"
    cp "$T/mnt/snapshot/disk.dirty" "$T/dirty"
}

# 32 MiB: random data in [0,8M) and [16M,24M), a few scattered clusters, zeros elsewhere
truncate -s $((32 * M)) "$T/src.img"
random_mib "$T/src.img" 0 8
random_mib "$T/src.img" 16 8
for k in 25 26 28 30; do
    head -c 4096 /dev/urandom | dd of="$T/src.img" bs=4096 seek=$((k * 256 + 7)) conv=notrunc status=none
done
fmount "$T/mnt" --state-dir "$T/state" --cluster-size 128K --device disk="$T/src.img"

# usage errors: exit 1 before anything is written
setup_chain
expect_rc 1 "--backing names the previous backup" "$FLEECEFS" copy "$T/mnt" disk "$B/x" --backing "$B/y"
expect_rc 1 "--backing PREV" "$FLEECEFS" copy "$T/mnt" disk "$B/x" --format qcow2 --incremental
expect_rc 1 "--jobs 0 is out of range" "$FLEECEFS" copy "$T/mnt" disk "$B/x" --jobs 0
expect_rc 1 "--bwlimit" "$FLEECEFS" copy "$T/mnt" disk "$B/x" --bwlimit 10Q
expect_rc 1 "--bwlimit must be more than 0" "$FLEECEFS" copy "$T/mnt" disk "$B/x" --bwlimit 0
expect_rc 2 "invalid value" "$FLEECEFS" copy "$T/mnt" disk "$B/x" --format vmdk
[ -z "$(ls "$B")" ] || fail "a refused copy left $(ls "$B")"

# 0. full qcow2 copy
cp "$T/src.img" "$T/ref0.img"
"$FLEECEFS" copy "$T/mnt" disk "$B/0.qcow2" --format qcow2 --verify --json >"$T/c0.json" || fail "full qcow2 copy failed"
check_image "$B/0.qcow2" "$T/ref0.img"
[ "$(qemu-img info --output=json "$B/0.qcow2" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["format"], d["cluster-size"], d["virtual-size"], "backing-filename" in d)')" = "qcow2 $C $((32 * M)) False" ] ||
    fail "full image: $(qemu-img info "$B/0.qcow2")"
want=$(nonzero_clusters "$T/ref0.img")
got=$(data_clusters "$B/0.qcow2")
[ "$got" = "$want" ] || fail "full image allocates $got clusters, $want hold data"
[ "$(js "$T/c0.json" "d['format'] == 'qcow2' and d['clusters_allocated'] == $want and d['cluster_size'] == $C and d['bytes_written'] == $want * $C and d['bytes_read'] == 32 << 20 and 'backing_file' not in d and not d['incremental'] and d['verified']")" = True ] ||
    fail "full --json: $(cat "$T/c0.json")"
expect_rc 1 "already exists" "$FLEECEFS" copy "$T/mnt" disk "$B/0.qcow2" --format qcow2
check_image "$B/0.qcow2" "$T/ref0.img"
"$FLEECEFS" teardown "$T/mnt" --target chain --success >/dev/null

# incremental N: writes, setup, overlay on the previous backup
incremental() { # N PREV EXTRA-ARGS...
    local n=$1 prev=$2
    shift 2
    local sum_before
    sum_before=$(md5sum <"$prev")
    "$FLEECEFS" copy "$T/mnt" disk "$B/$n.qcow2" --format qcow2 --incremental --backing "$prev" --json "$@" \
        >"$T/c$n.json" || fail "incremental $n failed"
    [ "$(md5sum <"$prev")" = "$sum_before" ] || fail "incremental $n changed its backing file $prev"
    check_image "$B/$n.qcow2" "$T/ref$n.img"
    top_ranges "$B/$n.qcow2" >"$T/top"
    cmp -s "$T/top" "$T/dirty" || fail "overlay $n allocates $(cat "$T/top") but the dirty ranges are $(cat "$T/dirty")"
    [ "$(js "$T/c$n.json" "d['backing_file'] == '$(basename "$prev")' and d['backing_format'] == 'qcow2' and d['incremental'] and d['bytes_read'] == $(awk '{s += $2} END {print s}' "$T/dirty")")" = True ] ||
        fail "incremental $n --json: $(cat "$T/c$n.json")"
}
put 12 192 /dev/urandom # new data in a zero region
put 2 256 /dev/zero     # zeros over data: zero clusters in the overlay
put 31 1024 /dev/urandom
cp "$T/src.img" "$T/ref1.img"
setup_chain
expect_rc 1 "use --incremental --backing PREV" "$FLEECEFS" copy "$T/mnt" disk "$B/1.qcow2" --format qcow2
expect_rc 1 "does not exist" "$FLEECEFS" copy "$T/mnt" disk "$B/1.qcow2" --format qcow2 --incremental --backing "$B/none.qcow2"
truncate -s $((33 * M)) "$T/big.raw"
expect_rc 1 "not a backup of this device" "$FLEECEFS" copy "$T/mnt" disk "$B/1.qcow2" --format qcow2 --incremental --backing "$T/big.raw"
expect_rc 1 "in use" "$FLEECEFS" copy "$T/mnt" disk "$B/1.qcow2" --format qcow2 --incremental --backing "$T/src.img"
[ ! -e "$B/1.qcow2" ] || fail "a refused incremental left its DEST"
incremental 1 "$B/0.qcow2" --verify
"$FLEECEFS" teardown "$T/mnt" --target chain --success >/dev/null

put 5 64 /dev/urandom
put 24 3000 /dev/urandom
cp "$T/src.img" "$T/ref2.img"
setup_chain
incremental 2 "$B/1.qcow2" --jobs 4
"$FLEECEFS" teardown "$T/mnt" --target chain --success >/dev/null

# incremental 3 during writes, with --discard --verify
put 20 512 /dev/urandom
start_writer "$L" 4096
sleep 0.3
pause_writer
cp "$T/src.img" "$T/ref3.img"
setup_chain
resume_writer
incremental 3 "$B/2.qcow2" --discard --verify --jobs 3
discarded=$(status_json "$T/mnt" 'd["access"]["discarded_bytes"]')
stop_writer
[ "$discarded" = "$(awk '{s += $2} END {print s}' "$T/dirty")" ] || fail "incremental 3 discarded $discarded"
"$FLEECEFS" teardown "$T/mnt" --target chain --success >/dev/null
qemu-img info --backing-chain --output=json "$B/3.qcow2" | python3 -c '
import json, sys
chain = json.load(sys.stdin)
names = [c["filename"].rsplit("/", 1)[-1] for c in chain]
assert names == ["3.qcow2", "2.qcow2", "1.qcow2", "0.qcow2"], names
assert [c.get("backing-filename-format") for c in chain] == ["qcow2"] * 3 + [None], chain
' || fail "backing chain: $(qemu-img info --backing-chain "$B/3.qcow2")"

# an overlay on a raw backup, and on a smaller one (the device grew): a full access
cp "$T/src.img" "$T/ref4.img"
"$FLEECEFS" setup "$T/mnt" --target other >/dev/null
cp "$T/ref3.img" "$T/base.raw"
"$FLEECEFS" copy "$T/mnt" disk "$B/raw-top.qcow2" --format qcow2 --incremental --backing "$T/base.raw" --json >"$T/rt.json" ||
    fail "overlay on raw failed"
check_image "$B/raw-top.qcow2" "$T/ref4.img"
[ "$(js "$T/rt.json" "d['backing_format'] == 'raw' and d['backing_file'] == '$T/base.raw'")" = True ] || fail "raw backing: $(cat "$T/rt.json")"
head -c $((16 * M)) "$T/ref3.img" >"$T/small.raw"
"$FLEECEFS" copy "$T/mnt" disk "$B/grown.qcow2" --format qcow2 --incremental --backing "$T/small.raw" >/dev/null ||
    fail "overlay on a smaller backup failed"
check_image "$B/grown.qcow2" "$T/ref4.img"
"$FLEECEFS" teardown "$T/mnt" --target other --success >/dev/null

# restore: each point of the chain in turn onto live/disk
restore_point() { # FROM REF EXTRA-ARGS...
    local from=$1 ref=$2
    shift 2
    "$FLEECEFS" restore "$T/mnt" disk "$from" --json "$@" >"$T/r.json" 2>"$T/r.err" || fail "restore $from: $(cat "$T/r.err")"
    cmp "$L" "$ref" || fail "live/disk after restoring $from differs from $ref"
}
for n in 0 1 2 3; do
    restore_point "$B/$n.qcow2" "$T/ref$n.img" --verify
    grep -q "fleecefs: restore disk: 100%" "$T/r.err" || fail "no progress on stderr: $(cat "$T/r.err")"
done
# ranges already equal are compared, not written
restore_point "$B/3.qcow2" "$T/ref3.img"
[ "$(js "$T/r.json" "d['bytes_written'] == 0 and d['bytes_skipped_equal'] == 32 << 20 and d['format'] == 'qcow2'")" = True ] ||
    fail "restoring the same point again wrote: $(cat "$T/r.json")"
restore_point "$B/2.qcow2" "$T/ref2.img"
diff=$(cmp -l "$T/ref2.img" "$T/ref3.img" | wc -l || true)
[ "$(js "$T/r.json" "0 < d['bytes_written'] <= 8 << 20")" = True ] || fail "restoring 3 -> 2 ($diff bytes differ) wrote: $(cat "$T/r.json")"
# a raw backup, then an incremental of bitmap b: it must cover what the restores wrote
cp "$T/ref1.img" "$T/one.raw"
restore_point "$T/one.raw" "$T/ref1.img"
[ "$(js "$T/r.json" "d['format'] == 'raw'")" = True ] || fail "raw restore: $(cat "$T/r.json")"
setup_chain
cp "$T/ref1.img" "$T/ref5.img"
incremental 5 "$B/3.qcow2"
# refusals: during an access, another opener (unless --force), wrong size, missing
expect_rc 1 "a backup access includes disk" "$FLEECEFS" restore "$T/mnt" disk "$B/0.qcow2"
"$FLEECEFS" teardown "$T/mnt" --target chain --success >/dev/null
exec 7<"$L"
# (this shell holds fd 7, and so does the subshell that runs the command: either may be
# the one named, whichever has the lower pid)
expect_rc 1 "(bash) and 1 other(s): stop it first, or use --force" \
    "$FLEECEFS" restore "$T/mnt" disk "$B/0.qcow2"
cmp -s "$L" "$T/ref1.img" || fail "a refused restore changed live/disk"
restore_point "$B/0.qcow2" "$T/ref0.img" --force
exec 7<&-
expect_rc 1 "resize the device first" "$FLEECEFS" restore "$T/mnt" disk "$T/small.raw"
expect_rc 1 "does not exist" "$FLEECEFS" restore "$T/mnt" disk "$B/none.qcow2"
expect_rc 1 "no device nodisk" "$FLEECEFS" restore "$T/mnt" nodisk "$B/0.qcow2"
cmp -s "$L" "$T/ref0.img" || fail "a refused restore changed live/disk"
echo "ok: qcow2 chain: full ($want clusters) + 3 overlays check, convert and allocate exactly the dirty ranges; raw and smaller backing; refusals; restore of points 0-3, raw, skip of equal ranges, bitmap covers restores"

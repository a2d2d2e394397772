#!/usr/bin/env bash
# QEMU iotest 257's bitmap sequence, black-box through the mount (64 MiB image, 64 KiB
# clusters). G1, G2, G3 are groups of clusters written between backups. For teardown
# --success and --failure, the dirty cluster counts match QEMU's (6 at setup, then 7
# or 10 after teardown, 12 or 15 after G3), and a full backup plus the incrementals,
# applied in order with dd from the dirty maps, reproduce the image at each setup.
source "$(dirname "$0")/lib.sh"

G1="0 15 16 512 513 1022"
G2="1 14 15 513 514 1022 1023"
G3="1 2 3 13 14 514 515 1020"
CL=65536

write_group() {  # write_group "CLUSTERS" : a 4 KiB random write inside each cluster
    for c in $1; do
        dd if=/dev/urandom of="$T/mnt/live/disk" bs=4096 count=1 seek=$((c * 16 + RANDOM % 16)) \
            conv=notrunc status=none
    done
}
bitmap_dirty_bytes() {
    "$FLEECEFS" status "$T/mnt" --json | python3 -c '
import json, sys
for b in json.load(sys.stdin)["bitmaps"]:
    if b["name"] == "b0":
        print(b["dirty_bytes"])'
}
setup_json() {  # setup_json : prints "ACTION DIRTY_BYTES"
    "$FLEECEFS" setup "$T/mnt" --target t257 --bitmap b0 --json | python3 -c '
import json, sys
d = json.load(sys.stdin)["devices"][0]
print(d["bitmap_action"], d["dirty_bytes"])'
}
apply_incremental() {  # apply_incremental DEST : dd every dirty range of the snapshot
    local n=0
    while read -r off len; do
        dd if="$T/mnt/snapshot/disk" of="$1" bs=1M iflag=skip_bytes,count_bytes oflag=seek_bytes \
            skip="$off" seek="$off" count="$len" conv=notrunc status=none
        n=$((n + 1))
    done <"$T/mnt/snapshot/disk.dirty"
    [ "$n" -gt 0 ] || fail "empty dirty map"
}

run() {
    local outcome=$1 after_teardown=$2 after_g3=$3
    rm -rf "$T/state" "$T/src.img"
    head -c $((64 << 20)) /dev/urandom >"$T/src.img"
    fmount "$T/mnt" --state-dir "$T/state" --device disk=$T/src.img

    # full backup, creating the bitmap
    read -r action bytes <<<"$(setup_json)"
    [ "$action" = new ] || fail "$outcome: first setup action is $action, not new"
    [ "$bytes" = $((64 << 20)) ] || fail "$outcome: full backup covers $bytes bytes"
    cp "$T/mnt/snapshot/disk" "$T/backup.img"
    cmp "$T/backup.img" "$T/src.img" || fail "$outcome: full backup differs"
    "$FLEECEFS" teardown "$T/mnt" --target t257 --success >/dev/null
    [ "$(bitmap_dirty_bytes)" = 0 ] || fail "$outcome: bitmap not clean after the full backup"

    write_group "$G1"
    cp "$T/src.img" "$T/ref1.img"
    read -r action bytes <<<"$(setup_json)"
    [ "$action" = used ] || fail "$outcome: action is $action, not used"
    [ "$bytes" = $((6 * CL)) ] || fail "$outcome: incremental 1 covers $bytes bytes, not 6 clusters"
    write_group "$G2"                                  # during the access
    cp "$T/backup.img" "$T/backup1.img"
    apply_incremental "$T/backup1.img"
    cmp "$T/backup1.img" "$T/ref1.img" || fail "$outcome: full + incremental 1 differs from the image at setup"
    "$FLEECEFS" teardown "$T/mnt" --target t257 "--$outcome" >/dev/null
    [ "$(bitmap_dirty_bytes)" = $((after_teardown * CL)) ] ||
        fail "$outcome: $(($(bitmap_dirty_bytes) / CL)) dirty clusters after teardown, expected $after_teardown"
    [ "$outcome" = success ] && cp "$T/backup1.img" "$T/backup.img"   # the chain moves on

    write_group "$G3"
    [ "$(bitmap_dirty_bytes)" = $((after_g3 * CL)) ] ||
        fail "$outcome: $(($(bitmap_dirty_bytes) / CL)) dirty clusters after G3, expected $after_g3"
    cp "$T/src.img" "$T/ref2.img"
    read -r action bytes <<<"$(setup_json)"
    [ "$action" = used ] && [ "$bytes" = $((after_g3 * CL)) ] || fail "$outcome: second incremental: $action $bytes"
    apply_incremental "$T/backup.img"
    cmp "$T/backup.img" "$T/ref2.img" || fail "$outcome: chain of incrementals differs from the image at setup"
    "$FLEECEFS" teardown "$T/mnt" --target t257 --success >/dev/null
    "$FLEECEFS" unmount "$T/mnt"
}

run success 7 12
run failure 10 15
echo "ok: iotest 257 sequence (success 6/7/12, failure 6/10/15), incrementals reproduce each setup"

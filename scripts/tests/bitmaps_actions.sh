#!/usr/bin/env bash
# Every bitmap action through the CLI, and bitmaps across restarts and crashes:
# not-used, new, used, not-used-removed, a new name, invalid (corrupt file, truncated
# file, source modified or resized while unmounted, crash without crash-safe tracking),
# used after a clean restart and after kill -9 (crash-safe), invalid staying invalid at
# later mounts (wrong cluster size once, damaged background file), bitmap remove.
source "$(dirname "$0")/lib.sh"

CL=65536
mnt() { fmount "$T/mnt" --state-dir "$T/state" --device disk=$T/src.img "$@"; }
action() {  # action [SETUP ARGS] : setup, print "ACTION DIRTY_BYTES", teardown --success
    local out
    out=$("$FLEECEFS" setup "$T/mnt" --target tgt --json "$@")
    "$FLEECEFS" teardown "$T/mnt" --target tgt --success >/dev/null
    python3 -c 'import json,sys; d=json.loads(sys.argv[1])["devices"][0]; print(d["bitmap_action"], d["dirty_bytes"])' "$out"
}
expect() {  # expect WANT_ACTION WANT_BYTES [SETUP ARGS]
    local want=$1 bytes=$2
    shift 2
    local got
    got=$(action "$@")
    [ "$got" = "$want $bytes" ] || fail "setup $*: got '$got', expected '$want $bytes'"
}
dirty_clusters() {  # write one 4K block into each of the given clusters
    for c in "$@"; do
        dd if=/dev/urandom of="$T/mnt/live/disk" bs=4096 count=1 seek=$((c * 16)) conv=notrunc status=none
    done
}
status_field() {  # status_field PY_EXPR : evaluate against status JSON as `s`
    "$FLEECEFS" status "$T/mnt" --json | python3 -c "import json,sys; s=json.load(sys.stdin); print($1)"
}
crash() {  # kill -9 the daemon (its keeper), and a moment for it to be gone
    kill -9 "$(status_field 's["keeper_pid"]')"
    sleep 0.2
}
FULL=$((64 << 20))
head -c $FULL /dev/urandom >"$T/src.img"
mnt

expect not-used $FULL
expect new $FULL --bitmap b1
dirty_clusters 3 7
expect used $((2 * CL)) --bitmap b1
expect used 0 --bitmap b1
[ "$(status_field 'len(s["bitmaps"])')" = 1 ] || fail "status does not list the bitmap"
[ "$(status_field 's["bitmaps"][0]["consistent"]')" = True ] || fail "bitmap not consistent"
expect new $FULL --bitmap b2                       # another name replaces b1
[ "$(status_field '[b["name"] for b in s["bitmaps"]]')" = "['b2']" ] || fail "b1 was not removed"
expect not-used-removed $FULL
[ "$(status_field 'len(s["bitmaps"])')" = 0 ] || fail "bitmap not removed"

# clean restart keeps `used` with exactly the writes made
expect new $FULL --bitmap b1
dirty_clusters 5
"$FLEECEFS" unmount "$T/mnt"
mnt
dirty_clusters 9
expect used $((2 * CL)) --bitmap b1

# kill -9 with the default tracking (bits in the page cache survive the daemon):
# still `used`, every write present
dirty_clusters 11 12
crash
mnt
expect used $((2 * CL)) --bitmap b1

# kill -9 with --crash-safe-bitmaps sync: used too
"$FLEECEFS" unmount "$T/mnt"
mnt --crash-safe-bitmaps sync
dirty_clusters 20
crash
mnt --crash-safe-bitmaps sync
expect used $CL --bitmap b1

# kill -9 without crash-safe tracking: invalid
"$FLEECEFS" unmount "$T/mnt"
mnt --crash-safe-bitmaps off
dirty_clusters 1
crash
mnt --crash-safe-bitmaps off
[ "$(status_field 's["bitmaps"][0]["consistent"]')" = False ] || fail "bitmap consistent after a crash without crash-safe tracking"
expect invalid $FULL --bitmap b1
status_field 's["bitmaps"][0]["reason"]' | grep -q "recreated" || fail "status does not say why the bitmap was recreated"
expect used 0 --bitmap b1

# invalid is sticky: kill -9, a mount with the wrong cluster size (invalid: writes go
# untracked), then the right one again; the bitmap file itself still looks fine (in use,
# crash-safe, this boot), but it missed writes and must stay invalid
"$FLEECEFS" unmount "$T/mnt"
mnt
dirty_clusters 30
crash
mnt --cluster-size 128K
status_field 's["bitmaps"][0]["reason"]' | grep -q "cluster size" || fail "no reason given for the wrong cluster size"
dirty_clusters 40                                   # untracked by b1
"$FLEECEFS" unmount "$T/mnt"
mnt
[ "$(status_field 's["bitmaps"][0]["consistent"]')" = False ] || fail "a bitmap found invalid was trusted at the next mount"
expect invalid $FULL --bitmap b1
expect used 0 --bitmap b1

# an interrupted access with a damaged background file: invalid, and it stays invalid
dirty_clusters 2
"$FLEECEFS" setup "$T/mnt" --target tgt --bitmap b1 >/dev/null
dirty_clusters 3
crash
bg=$(ls "$T"/state/bitmaps/*.background)
printf 'garbage' | dd of="$bg" bs=1 seek=0 conv=notrunc status=none
mnt
status_field 's["bitmaps"][0]["reason"]' | grep -q "background" || fail "a damaged background file is not reported"
"$FLEECEFS" unmount "$T/mnt"
mnt
[ "$(status_field 's["bitmaps"][0]["consistent"]')" = False ] || fail "invalid after a damaged background was trusted at the next mount"
expect invalid $FULL --bitmap b1

# the source modified while no daemon serves it
"$FLEECEFS" unmount "$T/mnt"
dd if=/dev/urandom of="$T/src.img" bs=4096 count=1 seek=100 conv=notrunc status=none
mnt
status_field 's["bitmaps"][0]["reason"]' | grep -q "modified" || fail "no reason given for the modified source"
expect invalid $FULL --bitmap b1

# the source resized while unmounted
"$FLEECEFS" unmount "$T/mnt"
truncate -s $((FULL + CL)) "$T/src.img"
FULL=$((FULL + CL))
mnt
expect invalid $FULL --bitmap b1
expect used 0 --bitmap b1

# a corrupt bitmap file, then a truncated one
"$FLEECEFS" unmount "$T/mnt"
f=$(ls "$T"/state/bitmaps/*.bitmap)
printf '\xff' | dd of="$f" bs=1 seek=4100 conv=notrunc status=none   # inside the words
mnt
expect invalid $FULL --bitmap b1
"$FLEECEFS" unmount "$T/mnt"
truncate -s 100 "$f"
mnt
expect invalid $FULL --bitmap b1

# a lost bitmap file
"$FLEECEFS" unmount "$T/mnt"
rm -f "$f"
mnt
status_field 's["bitmaps"][0]["reason"]' | grep -q "missing" || fail "a missing bitmap file is not reported"
expect invalid $FULL --bitmap b1

# a background file of no registered bitmap (left by a setup that failed half-way) is
# removed at mount
"$FLEECEFS" unmount "$T/mnt"
printf 'junk' >"$T/state/bitmaps/disk@gone@old.background"
mnt
[ ! -e "$T/state/bitmaps/disk@gone@old.background" ] || fail "an orphaned background file was kept"

# bitmap remove
"$FLEECEFS" bitmap remove "$T/mnt" --target tgt >/dev/null
[ "$(status_field 'len(s["bitmaps"])')" = 0 ] || fail "bitmap remove left a bitmap"
expect new $FULL --bitmap b1
if "$FLEECEFS" bitmap remove "$T/mnt" --target nobody 2>"$T/err"; then fail "removing bitmaps of an unknown target succeeded"; fi
grep -q "has no bitmaps" "$T/err" || fail "unclear message: $(cat "$T/err")"
echo "ok: not-used, new, used, not-used-removed, invalid (7 causes, sticky), restart and crash behaviour"

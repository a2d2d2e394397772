#!/usr/bin/env bash
# A fleecing file that teardown cannot delete (made immutable): teardown --success still
# exits 0, since the success is recorded (a caller that dropped the backup would lose the
# writes before its setup), with one warning line; the next mount serves anyway; the next
# setup refuses while the file stays undeletable, and removes it once it can.
source "$(dirname "$0")/lib.sh"
command -v chattr >/dev/null || fail "chattr is not installed (Debian: e2fsprogs)"
trap 'rc=$?; set +e; chattr -i "$T"/st/fleecing/* 2>/dev/null; (exit $rc); cleanup' EXIT

M=$((1 << 20))
head -c $((8 * M)) /dev/urandom >"$T/src.img"
fmount "$T/mnt" --state-dir "$T/st" --device d=$T/src.img
"$FLEECEFS" setup "$T/mnt" --target t --bitmap b >/dev/null
"$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null
dd if=/dev/urandom of="$T/mnt/live/d" bs=4k count=1 seek=100 conv=notrunc status=none
"$FLEECEFS" setup "$T/mnt" --target t --bitmap b >/dev/null
f=$T/st/fleecing/d.t.fleece
[ -e "$f" ] || fail "no fleecing file $f"
chattr +i "$f" || fail "chattr +i $f failed (the test needs a filesystem with attributes under /tmp)"

rc=0
"$FLEECEFS" teardown "$T/mnt" --target t --success >"$T/out" 2>"$T/err" || rc=$?
[ "$rc" = 0 ] || fail "teardown --success exits $rc after recording the success: $(cat "$T/err")"
grep -q "torn down as a success" "$T/out" || fail "teardown output: $(cat "$T/out")"
[ "$(wc -l <"$T/err")" = 1 ] && grep -q "^fleecefs: warning: .*d.t.fleece" "$T/err" ||
    fail "teardown did not warn in one line about the fleecing file: $(cat "$T/err")"

"$FLEECEFS" unmount "$T/mnt"
fmount "$T/mnt" --state-dir "$T/st" --device d=$T/src.img ||
    fail "mount refused because of an undeletable leftover fleecing file"
grep -q "is kept and the next setup tries again" "$T/st/fleecefs.log" ||
    fail "mount did not log the kept leftover: $(tail -3 "$T/st/fleecefs.log")"
rc=0
"$FLEECEFS" setup "$T/mnt" --target t --bitmap b >/dev/null 2>"$T/err" || rc=$?
[ "$rc" = 1 ] && grep -q "d.t.fleece" "$T/err" ||
    fail "setup with an undeletable leftover: exit $rc: $(cat "$T/err")"

chattr -i "$f"
out=$("$FLEECEFS" setup "$T/mnt" --target t --bitmap b --json)
got=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1])["devices"][0]; print(d["bitmap_action"], d["dirty_bytes"])' "$out")
[ "$got" = "used 0" ] || fail "after the recorded success the bitmap should be used and clean: $got"
"$FLEECEFS" teardown "$T/mnt" --target t --failure >/dev/null
echo "ok: a fleecing file teardown cannot delete: success kept with a warning, mount serves, setup retries"

#!/usr/bin/env bash
# `fleecefs copy`, the built-in consumer. A full copy with --verify --discard while a
# writer runs reproduces the point-in-time image, keeps its zeros as holes, discards every
# dirty byte (status: discarded_bytes = dirty_bytes, fleecing space back near 0); a
# bitmap chain (full, then two incrementals onto it, one during writes) reproduces the
# image at each setup; --json numbers add up; errors exit 1 with a reason, usage errors 2.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
S=$T/mnt/snapshot/disk
L=$T/mnt/live/disk
# expect_rc RC TEXT CMD... : CMD exits with RC and says TEXT on stderr
# setup_bitmap : `setup --target chain --bitmap b --json`, prints "ACTION DIRTY_BYTES"
setup_bitmap() {
    "$FLEECEFS" setup "$T/mnt" --target chain --bitmap b --json | python3 -c '
import json, sys
d = json.load(sys.stdin)["devices"][0]
print(d["bitmap_action"], d["dirty_bytes"])'
}
# put OFFSET_MIB COUNT_KIB SOURCE : writes COUNT_KIB KiB from SOURCE into live/disk
put() { dd if="$3" of="$L" bs=1K seek=$(($1 * 1024)) count="$2" iflag=fullblock conv=notrunc status=none; }

# 64 MiB image: random data in [0,8M) and [16M,24M), zeros elsewhere
truncate -s $((64 * M)) "$T/src.img"
random_mib "$T/src.img" 0 8
random_mib "$T/src.img" 16 8
fmount "$T/mnt" --state-dir "$T/state" --device disk=$T/src.img

# 0. errors before any access
expect_rc 1 "no backup access includes disk; run fleecefs setup first" "$FLEECEFS" copy "$T/mnt" disk "$T/x.img"
expect_rc 1 "no device nodisk" "$FLEECEFS" copy "$T/mnt" nodisk "$T/x.img"
expect_rc 1 "is not a fleecefs mount point" "$FLEECEFS" copy "$T" disk "$T/x.img"
expect_rc 2 "required arguments" "$FLEECEFS" copy "$T/mnt" disk
expect_rc 2 "unexpected argument" "$FLEECEFS" copy "$T/mnt" disk "$T/x.img" --bogus
[ ! -e "$T/x.img" ] || fail "a failed copy left $T/x.img"

# 1. full copy with --verify --discard while a writer runs in [0,8M)
start_writer "$L" 2048
setup_during_writes "$T/mnt" "$T/src.img" full
before=$BEFORE
"$FLEECEFS" copy "$T/mnt" disk "$T/full.img" --verify --discard --json >"$T/full.json" ||
    fail "full copy failed"
after=$(writes_now)
sleep 0.2 # more live writes into the discarded snapshot: they must copy nothing
dirty=$(status_json "$T/mnt" 'd["access"]["dirty_bytes"]')
discarded=$(status_json "$T/mnt" 'd["access"]["discarded_bytes"]')
fleecing=$(status_json "$T/mnt" 'd["access"]["fleecing_allocated"]')
stop_writer
cmp "$T/full.img" "$T/ref.img" || fail "full copy differs from the point-in-time image"
[ "$after" -gt "$before" ] || fail "the writer made no writes during the copy ($before -> $after)"
cmp -s "$T/src.img" "$T/ref.img" && fail "the live image did not change during the copy"
[ "$dirty" = $((64 * M)) ] || fail "full access dirty_bytes $dirty"
[ "$discarded" = "$dirty" ] || fail "discarded_bytes $discarded after --discard, dirty_bytes $dirty"
[ "$fleecing" -le $((256 << 10)) ] || fail "fleecing_allocated $fleecing after discarding everything"
# sparse: [24M,64M) and much of [8M,16M) are zeros in the image
alloc=$(($(stat -c %b "$T/full.img") * 512))
[ "$alloc" -le $((24 * M)) ] || fail "full copy allocates $alloc bytes of 64 MiB (>= 40 MiB zeros)"
[ "$(stat -c %s "$T/full.img")" = $((64 * M)) ] || fail "full copy size $(stat -c %s "$T/full.img")"
[ "$(js "$T/full.json" 'd["bytes_total"] == d["bytes_read"] == d["bytes_discarded"] == 64 << 20 and d["bytes_written"] + d["bytes_skipped_zero"] == d["bytes_read"] and d["bytes_skipped_zero"] >= 40 << 20 and d["ranges"] == 1 and d["verified"] and not d["incremental"] and d["name"] == "disk" and d["dest"].endswith("full.img") and d["seconds"] > 0')" = True ] ||
    fail "full copy --json does not add up: $(cat "$T/full.json")"
expect_rc 1 "already exists" "$FLEECEFS" copy "$T/mnt" disk "$T/full.img"
cmp -s "$T/full.img" "$T/ref.img" || fail "a refused full copy changed the existing DEST"
# one error line, which says that the incomplete DEST was removed (no second line)
expect_rc 1 "not readable (EACCES)" "$FLEECEFS" copy "$T/mnt" disk "$T/again.img"
err=$("$FLEECEFS" copy "$T/mnt" disk "$T/again.img" 2>&1 >/dev/null) && fail "a copy of a discarded snapshot succeeded"
[ "$(printf '%s\n' "$err" | grep -vc '^fleecefs: copy disk:')" = 1 ] || fail "more than the one error line: $err"
case "$err" in *"not readable (EACCES)"*"again.img was removed"*) ;; *) fail "the error does not say DEST was removed: $err" ;; esac
[ ! -e "$T/again.img" ] || fail "a failed full copy left its incomplete DEST"
"$FLEECEFS" teardown "$T/mnt" --target full --success >/dev/null

# 2. bitmap chain: full copy creating bitmap b
read -r action bytes <<<"$(setup_bitmap)"
[ "$action" = new ] && [ "$bytes" = $((64 * M)) ] || fail "first bitmap setup: $action $bytes"
cp "$T/src.img" "$T/ref0.img"
"$FLEECEFS" copy "$T/mnt" disk "$T/chain.img" >"$T/line" || fail "chain full copy failed"
grep -q "^full copy of disk to " "$T/line" || fail "summary line: $(cat "$T/line")"
cmp "$T/chain.img" "$T/ref0.img" || fail "chain full copy differs"
"$FLEECEFS" teardown "$T/mnt" --target chain --success >/dev/null

# incremental 1: new data in a zero region, zeros over data (must become zeros in DEST)
put 30 192 /dev/urandom
put 2 256 /dev/zero
put 63 1024 /dev/urandom
cp "$T/src.img" "$T/ref1.img"
read -r action bytes <<<"$(setup_bitmap)"
[ "$action" = used ] || fail "second bitmap setup action $action, not used"
[ "$bytes" -lt $((4 * M)) ] || fail "incremental 1 covers $bytes bytes"
expect_rc 1 "--incremental" "$FLEECEFS" copy "$T/mnt" disk "$T/x.img"
expect_rc 1 "does not exist" "$FLEECEFS" copy "$T/mnt" disk "$T/missing.img" --incremental
head -c $M /dev/zero >"$T/small.img"
expect_rc 1 "not an image of this device" "$FLEECEFS" copy "$T/mnt" disk "$T/small.img" --incremental
# DEST must not be the served image, nor anything on the mount: each would undo the
# guest's writes or discard the snapshot; refused before anything is written
cp "$T/src.img" "$T/src.before"
expect_rc 1 "in use" "$FLEECEFS" copy "$T/mnt" disk "$T/src.img" --incremental
expect_rc 1 "on the fleecefs mount" "$FLEECEFS" copy "$T/mnt" disk "$T/mnt/live/disk" --incremental
expect_rc 1 "on the fleecefs mount" "$FLEECEFS" copy "$T/mnt" disk "$T/mnt/snapshot/disk" --incremental
cmp -s "$T/src.img" "$T/src.before" || fail "a refused copy changed the source"
"$FLEECEFS" status "$T/mnt" --json >"$T/st.json"
[ "$(js "$T/st.json" 'd["access"]["discarded_bytes"]')" = 0 ] || fail "a refused copy discarded: $(cat "$T/st.json")"
"$FLEECEFS" copy "$T/mnt" disk "$T/chain.img" --incremental --verify --json >"$T/inc1.json" ||
    fail "incremental 1 failed"
cmp "$T/chain.img" "$T/ref1.img" || fail "full + incremental 1 differs from the image at setup"
[ "$(js "$T/inc1.json" "d['bytes_total'] == d['bytes_read'] == $bytes and d['bytes_written'] + d['bytes_skipped_zero'] == $bytes and d['bytes_skipped_zero'] >= 256 << 10 and d['bytes_discarded'] == 0 and d['incremental'] and d['verified'] and d['ranges'] == 3")" = True ] ||
    fail "incremental --json does not add up (dirty $bytes): $(cat "$T/inc1.json")"
"$FLEECEFS" teardown "$T/mnt" --target chain --success >/dev/null

# incremental 2: during writes, with --discard
start_writer "$L" 2048
sleep 0.3
pause_writer
cp "$T/src.img" "$T/ref2.img"
read -r action bytes <<<"$(setup_bitmap)"
[ "$action" = used ] || fail "third bitmap setup action $action, not used"
resume_writer
"$FLEECEFS" copy "$T/mnt" disk "$T/chain.img" --incremental --discard --json >"$T/inc2.json" ||
    fail "incremental 2 failed"
discarded=$(status_json "$T/mnt" 'd["access"]["discarded_bytes"]')
stop_writer
cmp "$T/chain.img" "$T/ref2.img" || fail "chain of incrementals differs from the image at setup"
[ "$discarded" = "$bytes" ] || fail "incremental 2 discarded $discarded of $bytes"
[ "$(js "$T/inc2.json" "d['bytes_discarded'] == d['bytes_total'] == $bytes")" = True ] ||
    fail "incremental 2 --json: $(cat "$T/inc2.json")"
"$FLEECEFS" teardown "$T/mnt" --target chain --success >/dev/null
expect_rc 1 "no backup access includes disk" "$FLEECEFS" copy "$T/mnt" disk "$T/chain.img" --incremental
cmp -s "$T/chain.img" "$T/ref2.img" || fail "a refused incremental changed DEST"
echo "ok: fleecefs copy: full --verify --discard during $((after - before)) writes ($((alloc / M)) MiB allocated of 64), chain of 2 incrementals ($((bytes / 1024)) KiB last), errors 1, usage 2"

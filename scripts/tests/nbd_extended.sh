#!/usr/bin/env bash
# The NBD export with a client that negotiates extended headers (QEMU 8.2 or newer: its
# NBD client asks for them first): QEMU's trace shows NBD_OPT_EXTENDED_HEADERS
# acknowledged and 64-bit block status chunks, the daemon logs the mode and status --json
# shows it per client (beside a libnbd client's structured replies); a full backup
# with qemu-img convert while a writer changes live/NAME; qemu-img map of
# qemu:dirty-bitmap:B equals snapshot/NAME.dirty (full and incremental); reads of
# ranges outside the dirty map fail; trims with qemu-io discard free the fleecing space;
# well-formed and hostile requests get the same answers from fleecefs as from qemu-nbd.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
HERE=$(cd "$(dirname "$0")" && pwd)
PY=/usr/bin/python3
S=$T/nbd.sock
U="nbd+unix:///disk?socket=$S"
L=$T/mnt/live/disk
OPTS="driver=nbd,export=disk,server.type=unix,server.path=$S"

# qemu-img map of the dirty bitmap as "START LENGTH" lines of the dirty ranges (QEMU
# reports dirty as "data": false)
dirty_map() {
    qemu-img map --output=json --image-opts "$OPTS,x-dirty-bitmap=qemu:dirty-bitmap:b1" |
        $PY -c 'import json, sys
for e in json.load(sys.stdin):
    if not e["data"]:
        print(e["start"], e["length"])'
}
fleecing_allocated() { status_json "$T/mnt" 'd["access"]["fleecing_allocated"]'; }

truncate -s $((64 * M)) "$T/src.img"
random_mib "$T/src.img" 0 8
random_mib "$T/src.img" 40 4
fmount "$T/mnt" --state-dir "$T/state" --device disk="$T/src.img" --nbd "unix:$S"

# 1. Full backup while a writer changes live/disk; extended headers negotiated.
cp "$T/src.img" "$T/at_setup1.img"
"$FLEECEFS" setup "$T/mnt" --target nightly --bitmap b1 >/dev/null
# Well-formed and hostile requests with extended headers get the answers qemu-nbd gives
# for the same image (errnos, extent counts, disconnects).
cp --sparse=always "$T/src.img" "$T/peer.img"
timeout 120 qemu-nbd -k "$T/qemu.sock" -x disk -f raw -e 8 --persistent "$T/peer.img" &
QEMU_NBD=$!
for _ in $(seq 400); do [ -S "$T/qemu.sock" ] && break; sleep 0.05; done
timeout 60 $PY "$HERE/nbd/extended_peer.py" "$T/qemu.sock" disk >"$T/peer.qemu" ||
    fail "the requests against qemu-nbd failed: $(cat "$T/peer.qemu")"
kill $QEMU_NBD
timeout 60 $PY "$HERE/nbd/extended_peer.py" "$S" disk >"$T/peer.fleecefs" ||
    fail "the requests against fleecefs failed: $(cat "$T/peer.fleecefs")"
diff "$T/peer.qemu" "$T/peer.fleecefs" || fail "fleecefs answers otherwise than qemu-nbd"
grep -q "read with a 1 TiB payload: errno 22, then closed" "$T/peer.fleecefs" || fail "$(cat "$T/peer.fleecefs")"
start_writer "$L" $((64 * M / 4096))
qemu-img --trace 'nbd_receive_option_reply' convert -f raw -O raw "$U" "$T/full.img" 2>"$T/trace"
grep -q 'option reply 11 (extended headers), type 1 (ack)' "$T/trace" ||
    fail "QEMU did not negotiate extended headers: $(cat "$T/trace")"
cmp "$T/full.img" "$T/at_setup1.img" || fail "qemu-img convert backup differs from the image at setup"
grep -q "connected to export 'disk' (extended headers)" "$T/state/fleecefs.log" ||
    fail "the daemon did not log extended headers: $(grep NBD "$T/state/fleecefs.log")"
# status --json names the reply mode of each connected client: qemu-io (extended headers)
# and libnbd 1.14 (structured replies), both held open while status is asked
qemu-io -f raw -c 'sleep 60000' "$U" >/dev/null 2>&1 &
HOLD_QEMU=$!
$PY -c 'import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
time.sleep(60)' "$U" >/dev/null 2>&1 &
HOLD_LIBNBD=$!
modes() { status_json "$T/mnt" 'sorted(d["nbd"]["exports"][0]["client_modes"])'; }
for _ in $(seq 100); do [ "$(modes)" = "['extended', 'structured']" ] && break; sleep 0.1; done
[ "$(modes)" = "['extended', 'structured']" ] ||
    fail "status does not show each client's mode: $("$FLEECEFS" status "$T/mnt" --json)"
[ "$(status_json "$T/mnt" 'len(d["nbd"]["exports"][0]["clients"])')" = 2 ] || fail "status does not list both clients"
kill $HOLD_QEMU $HOLD_LIBNBD
wait $HOLD_QEMU $HOLD_LIBNBD 2>/dev/null || true
# the dirty bitmap over extended headers: 64-bit block status chunks, NAME.dirty's ranges
qemu-img --trace 'nbd_receive_reply_chunk_header' map --output=json --image-opts \
    "$OPTS,x-dirty-bitmap=qemu:dirty-bitmap:b1" >/dev/null 2>"$T/trace"
grep -q 'type = 6 (block status (64-bit))' "$T/trace" ||
    fail "no 64-bit block status chunk: $(cat "$T/trace")"
dirty_map >"$T/dirty.qemu"
diff "$T/dirty.qemu" "$T/mnt/snapshot/disk.dirty" || fail "qemu-img map x-dirty-bitmap differs from disk.dirty"
# base:allocation over extended headers: data where the image at setup has data
qemu-img map --output=json "$U" | $PY -c 'import json, sys
print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))' >"$T/data_bytes"
[ "$(cat "$T/data_bytes")" -ge $((12 * M)) ] || fail "base:allocation shows $(cat "$T/data_bytes") data bytes"
stop_writer
"$FLEECEFS" teardown "$T/mnt" --target nightly --success >/dev/null

# 2. Incremental: the dirty ranges over extended headers, a read outside them fails,
# and a discard of each range through qemu-io frees the fleecing space.
dd if=/dev/urandom of="$L" bs=64K count=5 seek=300 conv=notrunc status=none
dd if=/dev/urandom of="$L" bs=4K count=3 seek=2000 conv=notrunc status=none
cp "$T/src.img" "$T/at_setup2.img"
"$FLEECEFS" setup "$T/mnt" --target nightly --bitmap b1 >"$T/setup2"
grep -q used "$T/setup2" || fail "the bitmap was not used: $(cat "$T/setup2")"
dirty_map >"$T/dirty.qemu"
diff "$T/dirty.qemu" "$T/mnt/snapshot/disk.dirty" || fail "qemu-img map x-dirty-bitmap differs from disk.dirty"
# (the writer of the full backup dirtied other clusters too)
$PY - "$T/dirty.qemu" <<'PY' || fail "a written range is not dirty: $(cat "$T/dirty.qemu")"
import sys
ranges = [tuple(map(int, l.split())) for l in open(sys.argv[1])]
for start, length in ((300 << 16, 5 << 16), (2000 * 4096, 3 * 4096)):
    assert any(s <= start and start + length <= s + n for s, n in ranges), start
PY
# the writer copies the dirty clusters into the fleecing file
dd if=/dev/urandom of="$L" bs=64K count=8 seek=298 conv=notrunc status=none
dd if=/dev/urandom of="$L" bs=64K count=2 seek=124 conv=notrunc status=none
for _ in $(seq 100); do [ "$(fleecing_allocated)" -gt 0 ] && break; sleep 0.1; done   # write-behind
[ "$(fleecing_allocated)" -gt 0 ] || fail "nothing was copied into the fleecing file"
# the first cluster outside the dirty map (the writer may have dirtied any cluster)
clean=$($PY - "$T/dirty.qemu" <<'PY'
import sys
ranges = [tuple(map(int, l.split())) for l in open(sys.argv[1])]
c = 0
while any(s <= c < s + n for s, n in ranges):
    c += 65536
print(c)
PY
)
qemu-io -f raw -c "read $clean 64k" "$U" >"$T/outside" 2>&1 && fail "a read outside the dirty map succeeded"
grep -q 'Invalid argument' "$T/outside" || fail "a read outside the dirty map: $(cat "$T/outside")"
cp "$T/full.img" "$T/incr.img"
while read -r start len; do
    # QEMU's NBD client reads the range (a raw node with offset and size over it)
    qemu-img convert -O raw --image-opts \
        "driver=raw,offset=$start,size=$len,file.driver=nbd,file.export=disk,file.server.type=unix,file.server.path=$S" \
        "$T/range" || fail "reading the dirty range $start+$len failed"
    dd if="$T/range" of="$T/incr.img" bs=1 seek="$start" conv=notrunc status=none
    qemu-io -f raw -c "discard $start $len" "$U" >"$T/discard" 2>&1 || fail "discard failed: $(cat "$T/discard")"
    grep -q "^discard $len/$len bytes at offset $start" "$T/discard" || fail "discard: $(cat "$T/discard")"
    qemu-io -f raw -c "read $start $len" "$U" >/dev/null 2>&1 && fail "a discarded range can still be read"
done <"$T/dirty.qemu"
cmp "$T/incr.img" "$T/at_setup2.img" || fail "full + incremental differs from the image at setup"
[ "$(fleecing_allocated)" = 0 ] ||
    fail "fleecing space left after discarding every range: $("$FLEECEFS" status "$T/mnt" --json)"
"$FLEECEFS" teardown "$T/mnt" --target nightly --success >/dev/null
echo "nbd_extended: ok"

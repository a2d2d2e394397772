#!/usr/bin/env bash
# The NBD export of the backup access over a Unix socket, with the tools people use:
# nbdinfo --list and --map (base:allocation against SEEK_DATA/SEEK_HOLE of snapshot/NAME,
# qemu:dirty-bitmap against NAME.dirty), full backups with nbdcopy and qemu-img convert
# while a writer changes live/NAME, an incremental with libnbd (dirty ranges onto the
# previous backup, a trim after each, reads outside fail with EINVAL), status --json,
# no export without an access, hostile clients that leave the daemon serving, and a
# teardown that ends the connections (idle ones, and one with reads in flight).
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
HERE=$(cd "$(dirname "$0")" && pwd)
PY=/usr/bin/python3   # the system python, where python3-libnbd lives
S=$T/nbd.sock
U="nbd+unix:///disk?socket=$S"
L=$T/mnt/live/disk

truncate -s $((64 * M)) "$T/src.img"
random_mib "$T/src.img" 0 8
random_mib "$T/src.img" 40 4
fmount "$T/mnt" --state-dir "$T/state" --device disk="$T/src.img" --nbd "unix:$S"
[ "$(stat -c %a "$S")" = 600 ] || fail "the socket is not mode 0600"
[ "$(status_json "$T/mnt" 'd["nbd"]["listeners"]')" = "['unix:$S']" ] || fail "status lists no listener"

# No access: no export.
[ -z "$(nbdinfo --list "nbd+unix://?socket=$S" 2>/dev/null | grep 'export=')" ] || fail "an export without an access"
expect_fail_with "" nbdinfo "$U"

# 1. Full backup, while a writer changes live/disk.
cp "$T/src.img" "$T/at_setup1.img"
"$FLEECEFS" setup "$T/mnt" --target nightly --bitmap b1 >/dev/null
start_writer "$L" $((64 * M / 4096))
nbdinfo --list "nbd+unix://?socket=$S" >"$T/list"
grep -q 'export="disk"' "$T/list" || fail "nbdinfo --list shows no export: $(cat "$T/list")"
grep -q 'qemu:dirty-bitmap:b1' "$T/list" || fail "no dirty bitmap context: $(cat "$T/list")"
grep -q 'can_multi_conn: true' "$T/list" || fail "no multi-conn"
grep -q 'can_trim: true' "$T/list" || fail "no trim"
grep -q 'block_size_preferred: 65536' "$T/list" || fail "preferred block size is not the cluster size"
nbdcopy "$U" "$T/full_nbdcopy.img"
cmp "$T/full_nbdcopy.img" "$T/at_setup1.img" || fail "nbdcopy backup differs from the image at setup"
qemu-img convert -f raw -O raw "$U" "$T/full_qemu.img"
cmp "$T/full_qemu.img" "$T/at_setup1.img" || fail "qemu-img convert backup differs from the image at setup"
# base:allocation agrees with SEEK_DATA/SEEK_HOLE of snapshot/disk (a cluster copied
# since setup counts as data in both: the writer pauses while they are compared)
pause_writer
nbdinfo --map "$U" | awk '{ print $1, $2, ($3 == 0 ? "data" : "hole") }' >"$T/map.nbd"
$PY - "$T/mnt/snapshot/disk" >"$T/map.seek" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
pos = 0
while pos < size:
    try:
        d = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError:
        d = size
    if d > pos:
        print(pos, d - pos, "hole")
    if d >= size:
        break
    h = os.lseek(fd, d, os.SEEK_HOLE)
    print(d, h - d, "data")
    pos = h
PY
diff "$T/map.nbd" "$T/map.seek" || fail "nbdinfo --map differs from SEEK_DATA/SEEK_HOLE"
grep -q data "$T/map.nbd" && grep -q hole "$T/map.nbd" || fail "the map has no data or no hole"
resume_writer
# the dirty bitmap is NAME.dirty (all of it, for a new bitmap)
nbdinfo --map=qemu:dirty-bitmap:b1 "$U" | awk '$3 == 1 { print $1, $2 }' >"$T/dirty.nbd"
diff "$T/dirty.nbd" "$T/mnt/snapshot/disk.dirty" || fail "the dirty bitmap differs from disk.dirty"
[ "$(status_json "$T/mnt" 'd["nbd"]["exports"][0]["bytes_read"] >= 12 * 2**20')" = True ] ||
    fail "status does not count the bytes read: $("$FLEECEFS" status "$T/mnt" --json)"
"$FLEECEFS" status "$T/mnt" | grep -q "^  export disk: .* read" || fail "status (text) lists no NBD export"
# Hostile clients; afterwards the export still serves and the access is intact.
timeout 120 $PY "$HERE/nbd/hostile.py" "$S" disk || fail "a hostile client was not handled"
nbdinfo "$U" >/dev/null || fail "the export does not answer after the hostile clients"
[ "$(status_json "$T/mnt" 'd["access"]["broken"]')" = False ] || fail "the access broke"
stop_writer
"$FLEECEFS" teardown "$T/mnt" --target nightly --success >/dev/null
expect_fail_with "" nbdinfo "$U"

# 2. Incremental with libnbd while the writer goes on; trims free the fleecing space.
dd if=/dev/urandom of="$L" bs=64K count=5 seek=300 conv=notrunc status=none
dd if=/dev/urandom of="$L" bs=4K count=3 seek=2000 conv=notrunc status=none
cp "$T/src.img" "$T/at_setup2.img"
"$FLEECEFS" setup "$T/mnt" --target nightly --bitmap b1 >"$T/setup2"
grep -q used "$T/setup2" || fail "the bitmap was not used: $(cat "$T/setup2")"
nbdinfo --map=qemu:dirty-bitmap:b1 "$U" | awk '$3 == 1 { print $1, $2 }' >"$T/dirty.nbd"
diff "$T/dirty.nbd" "$T/mnt/snapshot/disk.dirty" || fail "the dirty bitmap differs from disk.dirty"
# QEMU's way: qemu-img map with x-dirty-bitmap reports dirty ranges as "data": false
qemu-img map --output=json --image-opts \
    "driver=nbd,export=disk,server.type=unix,server.path=$S,x-dirty-bitmap=qemu:dirty-bitmap:b1" |
    $PY -c 'import json, sys
for e in json.load(sys.stdin):
    if not e["data"]:
        print(e["start"], e["length"])' >"$T/dirty.qemu"
diff "$T/dirty.qemu" "$T/mnt/snapshot/disk.dirty" || fail "qemu-img map x-dirty-bitmap differs from disk.dirty"
start_writer "$L" $((64 * M / 4096))
cp "$T/full_nbdcopy.img" "$T/incr.img"
$PY "$HERE/nbd/incremental.py" "$S" disk b1 "$T/incr.img" >"$T/incr.out" ||
    fail "the incremental over NBD failed"
stop_writer
cmp "$T/incr.img" "$T/at_setup2.img" || fail "full + incremental differs from the image at setup"
[ "$(status_json "$T/mnt" 'd["access"]["fleecing_allocated"]')" = 0 ] ||
    fail "fleecing space left after trimming every range: $("$FLEECEFS" status "$T/mnt" --json)"

# A teardown while reads are in flight: each read finishes or fails, the reader ends
# within seconds and the teardown does not wait on it.
"$FLEECEFS" teardown "$T/mnt" --target nightly --success >/dev/null
"$FLEECEFS" setup "$T/mnt" --target nightly >/dev/null
$PY - "$S" "$T/busy" >"$T/busy.out" 2>&1 <<'PY' &
import nbd, sys
h = nbd.NBD()
h.set_export_name("disk")
h.connect_unix(sys.argv[1])
size, n, pos = h.get_size(), 0, 0
open(sys.argv[2], "w").close()
try:
    while True:
        h.pread(8 << 20, pos)
        pos = (pos + (8 << 20)) % size
        n += 1
except nbd.Error as e:
    print("ended after %d reads: %s" % (n, e))
PY
BUSY=$!
while [ ! -e "$T/busy" ]; do kill -0 $BUSY 2>/dev/null || fail "the reader did not connect: $(cat "$T/busy.out")"; sleep 0.01; done
sleep 0.3
timeout 20 "$FLEECEFS" teardown "$T/mnt" --target nightly --success >/dev/null || fail "teardown hung on a reading client"
timeout 20 tail --pid=$BUSY -f /dev/null || fail "the reader hung after teardown"
wait $BUSY || fail "the reader failed: $(cat "$T/busy.out")"
grep -q "ended after [1-9]" "$T/busy.out" || fail "the reader: $(cat "$T/busy.out")"
"$FLEECEFS" setup "$T/mnt" --target nightly --bitmap b1 >/dev/null

# Teardown ends the connections: an idle client finds its connection closed (not an
# error reply from a dead export), within a bounded time.
$PY - "$S" "$T/held" >"$T/held.out" 2>&1 <<'PY' &
import errno, nbd, os, sys, time
h = nbd.NBD()
h.set_export_name("disk")
h.connect_unix(sys.argv[1])
open(sys.argv[2], "w").close()
while os.path.exists(sys.argv[2]):
    time.sleep(0.01)
try:
    h.pread(512, 0)
    sys.exit("a read after teardown returned data")
except nbd.Error as e:
    assert e.errnum != errno.EINVAL, e
    print("closed:", e)
PY
HELD=$!
while [ ! -e "$T/held" ]; do kill -0 $HELD 2>/dev/null || fail "the client did not connect: $(cat "$T/held.out")"; sleep 0.01; done
[ "$(status_json "$T/mnt" 'len(d["nbd"]["exports"][0]["clients"])')" = 1 ] || fail "status shows no client"
"$FLEECEFS" teardown "$T/mnt" --target nightly --success >/dev/null
# idle connections notice within 0.5 s; a busy machine may take longer to show it
for _ in $(seq 300); do
    [ "$(status_json "$T/mnt" 'd["nbd"]["connections"]')" = 0 ] && break
    sleep 0.1
done
[ "$(status_json "$T/mnt" 'd["nbd"]["connections"]')" = 0 ] || fail "the idle connection outlived the teardown by 30 s"
rm "$T/held"
timeout 20 tail --pid=$HELD -f /dev/null || fail "the client hung after teardown"
wait $HELD || fail "the connection was not ended by the teardown: $(cat "$T/held.out")"
grep -q closed "$T/held.out" || fail "$(cat "$T/held.out")"
echo "nbd_export: ok"

#!/usr/bin/env bash
# Operating without downtime: grow a device under load (ext4 inside, grown
# online through a loop device, fio writing), grow during a backup access, 20 device
# add/remove cycles while another device is written and backed up, the refusals, and
# kill -9 right after `device add` and after `resize`.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
F=$FLEECEFS
MNT=$T/mnt
# dirty_covers FILE FROM TO : the dirty map FILE covers [FROM, TO)
dirty_covers() {
    python3 - "$1" "$2" "$3" <<'EOF'
import sys
rs = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
pos, to = int(sys.argv[2]), int(sys.argv[3])
for off, ln in rs:
    if off <= pos < off + ln:
        pos = off + ln
sys.exit(0 if pos >= to else 1)
EOF
}
size_of() { stat -c %s "$1"; }
# lockable FILE : a POSIX (fcntl) write lock on FILE can be taken now, i.e. no daemon holds
# its OFD lock (flock(1) locks do not conflict with those, so they prove nothing)
lockable() {
    python3 -c 'import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR); fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)' "$1" 2>/dev/null
}

# ---- 1. grow under load: ext4 through a loop device, fio writing -----------------------
ext4_on_live vm 48 # L: live/vm, E: its ext4 mounted through $LOOPDEV
mkdir "$E/old"
for i in $(seq 20); do head -c $((RANDOM * 8)) /dev/urandom >"$E/old/f$i"; done
sync -f "$E"

# the full backup before the growth
"$F" setup "$MNT" --target nightly --bitmap b >/dev/null
"$F" copy "$MNT" vm "$T/vm.backup" >/dev/null 2>&1 || fail "full copy of vm failed"
cmp "$T/vm.backup" "$MNT/snapshot/vm" || fail "the full backup differs from its snapshot"
"$F" teardown "$MNT" --target nightly --success >/dev/null

fio --name=load --filename="$E/fio.dat" --size=8M --rw=randwrite --bs=4k --direct=1 \
    --time_based --runtime=60 --ioengine=psync --output="$T/fio.log" &
FIO=$!
sleep 1
old=$(size_of "$L")
"$F" resize "$MNT" vm +40M >"$T/resize.out" || fail "resize +40M failed"
new=$(size_of "$L")
[ "$new" = $((old + 40 * M)) ] || fail "live/vm is $new bytes after growing $old by 40M"
[ "$(size_of "$T/vm.img")" = "$new" ] || fail "the source was not extended"
losetup -c "$LOOPDEV" || fail "losetup -c failed"
[ "$(blockdev --getsize64 "$LOOPDEV")" = "$new" ] || fail "$LOOPDEV did not see the new size"
online=yes
if ! resize2fs "$LOOPDEV" >"$T/resize2fs.log" 2>&1; then
    # Online resizing needs CAP_SYS_RESOURCE, which some containers drop: then grow the
    # ext4 offline on the same loop device (fio pauses), and go on as before.
    grep -q "Permission denied to resize" "$T/resize2fs.log" || fail "online resize2fs failed: $(cat "$T/resize2fs.log")"
    online="no (no CAP_SYS_RESOURCE here: resized offline through the loop device)"
    kill -INT $FIO
    wait $FIO 2>/dev/null || true
    umount "$E"
    e2fsck -fp "$LOOPDEV" >/dev/null 2>&1 || true
    resize2fs "$LOOPDEV" >"$T/resize2fs.log" 2>&1 || fail "resize2fs failed: $(cat "$T/resize2fs.log")"
    mount -o noatime "$LOOPDEV" "$E" || fail "remounting the grown ext4 failed"
    fio --name=load --filename="$E/fio.dat" --size=8M --rw=randwrite --bs=4k --direct=1 \
        --time_based --runtime=60 --ioengine=psync --output="$T/fio.log" &
    FIO=$!
fi
[ "$(df -B1 --output=size "$E" | tail -1)" -gt $((old + 8 * M)) ] || fail "the ext4 did not grow: $(df "$E")"
mkdir "$E/new"
# 50 MiB more than the old filesystem could hold: most of it lands in the new space
for i in $(seq 10); do head -c $((5 * M)) /dev/urandom >"$E/new/g$i"; done
sync -f "$E"
kill -0 $FIO 2>/dev/null || fail "fio stopped during the growth: $(tail "$T/fio.log")"
# the incremental after the growth, while fio keeps writing. An incremental snapshot
# can only be read by its dirty map, so the reference for "byte-identical" is the live
# image read while the ext4 is frozen around the setup (nothing writes it meanwhile).
fsfreeze -f "$E"
"$F" setup "$MNT" --target nightly --bitmap b --json >"$T/setup2.json"
cp --sparse=always "$L" "$T/vm.at-setup"
fsfreeze -u "$E"
grep -q '"bitmap_action": "used"' "$T/setup2.json" || fail "the grown bitmap was not used: $(cat "$T/setup2.json")"
dirty_covers "$MNT/snapshot/vm.dirty" "$old" "$new" || fail "the incremental's dirty map does not cover the new range"
"$F" copy "$MNT" vm "$T/vm.backup" --incremental --verify >/dev/null 2>&1 || fail "incremental copy onto the smaller image failed"
[ "$(size_of "$T/vm.backup")" = "$new" ] || fail "copy --incremental did not grow DEST"
cmp "$T/vm.backup" "$T/vm.at-setup" || fail "full + incremental restore differs from the snapshot after growth"
"$F" teardown "$MNT" --target nightly --success >/dev/null
kill -0 $FIO 2>/dev/null || fail "fio stopped early: $(tail "$T/fio.log")"
kill -INT $FIO
wait $FIO 2>/dev/null || true
umount "$E"
loop_detach "$LOOPDEV"
e2fsck -fn "$T/vm.backup" >"$T/fsck.log" 2>&1 || true   # a crash-consistent copy; informative only
echo "ok: grew vm $((old / M)) -> $((new / M)) MiB under fio, ext4 grown (online: $online), full + incremental restore byte-identical"
"$F" unmount "$MNT"

# ---- 2. grow during an access; an open handle sees the new size ------------------------
head -c $((4 * M)) /dev/urandom >"$T/d.img"
truncate -s $((4 * M + 1000)) "$T/d.img"    # not a multiple of the cluster size
fmount "$MNT" --state-dir "$T/state2" --device d=$T/d.img
D=$MNT/live/d
old=$(size_of "$D")
cp "$T/d.img" "$T/d.at-setup"
"$F" setup "$MNT" --target g --bitmap gb >/dev/null
"$F" copy "$MNT" d "$T/d.backup" >/dev/null 2>&1
"$F" teardown "$MNT" --target g --success >/dev/null
cp "$T/d.img" "$T/d.at-setup"
"$F" setup "$MNT" --target g --bitmap gb >/dev/null
python3 - "$D" "$F" "$MNT" <<'EOF' || { cat "$T/state2/fleecefs.log" >&2; dmesg | tail -5 >&2; fail "an open handle of live/d did not see the new size"; }
import os, subprocess, sys
fd = os.open(sys.argv[1], os.O_RDWR)
before = os.fstat(fd).st_size
subprocess.run([sys.argv[2], "resize", sys.argv[3], "d", "+2M"], check=True, stdout=subprocess.DEVNULL)
after = os.fstat(fd).st_size
assert after == before + (2 << 20), (before, after)
# write across the old end (into the old partial cluster) and into the new range
os.pwrite(fd, b"\x5a" * 70000, before - 1000)
os.pwrite(fd, b"\xa5" * 4096, after - 4096)
os.close(fd)
EOF
new=$(size_of "$D")
[ "$new" = $((old + 2 * M)) ] || fail "live/d is $new after +2M"
[ "$(size_of "$MNT/snapshot/d")" = "$old" ] || fail "the snapshot changed size during the access"
# incremental: only the dirty ranges are readable; they hold the content at setup
python3 - "$MNT/snapshot/d" "$T/d.at-setup" <<'EOF' || fail "the snapshot changed content after the grow"
import sys
snap, ref = open(sys.argv[1], "rb"), open(sys.argv[2], "rb")
for line in open(sys.argv[1] + ".dirty"):
    off, ln = map(int, line.split())
    snap.seek(off); ref.seek(off)
    assert snap.read(ln) == ref.read(ln), off
EOF
"$F" teardown "$MNT" --target g --success >/dev/null
dd if=/dev/urandom of="$D" bs=4096 count=1 seek=10 conv=notrunc status=none
cp "$D" "$T/d.at-setup"
"$F" setup "$MNT" --target g --bitmap gb >/dev/null
dirty_covers "$MNT/snapshot/d.dirty" "$old" "$new" || fail "the next incremental does not cover the grown range"
"$F" copy "$MNT" d "$T/d.backup" --incremental >/dev/null 2>&1 || fail "incremental after a grow during an access failed"
cmp "$T/d.backup" "$T/d.at-setup" || fail "incremental after a grow during an access differs from its snapshot"
"$F" teardown "$MNT" --target g --success >/dev/null
echo "ok: grow during an access: snapshot kept $old bytes and its content; next incremental restores $new bytes"

# ---- 4. refusals (same mount) -----------------------------------------------------------
truncate -s $((2 * M)) "$T/x.img"
cp "$T/state2/devices.json" "$T/rec.before"
expect_fail_with "unknown device 'nope'" "$F" resize "$MNT" nope +1M
expect_fail_with "would cut off its last" "$F" resize "$MNT" d 1M
expect_fail_with "unknown size suffix" "$F" resize "$MNT" d 12Q
expect_fail_with "not a size" "$F" resize "$MNT" d +abc
for huge in 18446744073709551615 9223372036854775808 +18446744073709551615; do
    expect_rc 1 "cannot be resized to" "$F" resize "$MNT" d "$huge"
    err=$("$F" resize "$MNT" d "$huge" 2>&1 || true)
    case "$err" in
    *"no file or device can be larger than 9223372036854775807 bytes") ;;
    *) fail "resize to $huge: $err" ;;
    esac
done
rc=0
"$F" resize "$MNT" 2>/dev/null || rc=$?
[ "$rc" = 2 ] || fail "resize without NAME exits $rc, not 2"
expect_fail_with "already served" "$F" device add "$MNT" d=$T/x.img
expect_fail_with "already served as device 'd'" "$F" device add "$MNT" y=$T/d.img
expect_fail_with "invalid device name" "$F" device add "$MNT" "a b=$T/x.img"
expect_fail_with "taken by the dirty maps" "$F" device add "$MNT" x.dirty=$T/x.img
expect_fail_with "cannot be opened" "$F" device add "$MNT" x=$T/missing.img
expect_fail_with "is given twice" "$F" device add "$MNT" x=$T/x.img x=$T/x.img
# a source another process holds a lock on (QEMU, another daemon)
python3 -c 'import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR); fcntl.lockf(fd, fcntl.LOCK_EX); open(sys.argv[2], "w").close(); time.sleep(30)' "$T/x.img" "$T/locked" &
LOCKER=$!
while [ ! -e "$T/locked" ]; do sleep 0.02; done
expect_fail_with "is in use" "$F" device add "$MNT" x=$T/x.img
kill $LOCKER; wait $LOCKER 2>/dev/null || true
expect_fail_with "unknown device 'x'" "$F" device remove "$MNT" x
cmp "$T/rec.before" "$T/state2/devices.json" || fail "a refused command changed the device record"
[ "$(ls "$MNT/live")" = d ] || fail "a refused device add changed live/: $(ls "$MNT/live")"
"$F" device add "$MNT" x=$T/x.img >/dev/null
lockable "$T/x.img" && fail "the source of an added device is not locked"
exec 5<"$MNT/live/x"
expect_fail_with "live/x is open" "$F" device remove "$MNT" x
expect_fail_with "process $$ (bash)" "$F" device remove "$MNT" x
exec 5<&-
# a loop device holds it with no process descriptor: the message names it
loop_attach "$MNT/live/x"
expect_fail_with "held by loop device $LOOPDEV (attached) (detach with 'losetup -d $LOOPDEV')" "$F" device remove "$MNT" x
err=$("$F" device remove "$MNT" x 2>&1 || true)
case "$err" in *MOUNTPOINT*) fail "device remove names a placeholder: $err" ;; esac
loop_detach "$LOOPDEV"
"$F" setup "$MNT" --target xt --devices x --bitmap xb >/dev/null
expect_fail_with "part of the backup access of target 'xt'" "$F" device remove "$MNT" x
expect_fail_with "cannot shrink until" "$F" resize "$MNT" x 1M --allow-shrink
"$F" copy "$MNT" x "$T/x.backup" >/dev/null 2>&1
"$F" teardown "$MNT" --target xt --success >/dev/null
# removed: its bitmap stays and belongs to no served device; added again: used
"$F" device remove "$MNT" x >/dev/null
lockable "$T/x.img" || fail "the source of a removed device is still locked"
[ "$(status_json "$MNT" '[b["loaded"] for b in d["bitmaps"] if b["device"]=="x"]')" = "[False]" ] ||
    fail "the bitmap of a removed device is not listed as not loaded"
"$F" device add "$MNT" x=$T/x.img >/dev/null
"$F" setup "$MNT" --target xt --devices x --bitmap xb --json >"$T/xs.json"
grep -q '"bitmap_action": "used"' "$T/xs.json" || fail "the bitmap of a re-added unchanged device is not used"
"$F" teardown "$MNT" --target xt --success >/dev/null
# modified while not served: invalid
"$F" device remove "$MNT" x >/dev/null
dd if=/dev/urandom of="$T/x.img" bs=4096 count=1 conv=notrunc status=none
"$F" device add "$MNT" x=$T/x.img >/dev/null
"$F" setup "$MNT" --target xt --devices x --bitmap xb --json >"$T/xs.json"
grep -q '"bitmap_action": "invalid"' "$T/xs.json" || fail "the bitmap of a device modified while removed is not invalid"
"$F" teardown "$MNT" --target xt --success >/dev/null
# resize --json
"$F" resize "$MNT" x +1M --json | python3 -c 'import json,sys; d=json.load(sys.stdin); assert (d["device"], d["old_size"], d["new_size"], d["bitmaps"], d["bitmap_names"]) == ("x", 2 << 20, 3 << 20, "grown", ["xt/xb"]), d' ||
    fail "resize --json"
# a shrink with --allow-shrink makes the device's bitmaps invalid
"$F" resize "$MNT" x 1M --allow-shrink >/dev/null
[ "$(size_of "$MNT/live/x")" = $M ] && [ "$(size_of "$T/x.img")" = $M ] || fail "shrink did not take"
[ "$(status_json "$MNT" '[b["consistent"] for b in d["bitmaps"] if b["device"]=="x"]')" = "[False]" ] ||
    fail "the bitmap of a shrunk device is still consistent"
rc=0
dd if=/dev/zero of="$MNT/live/x" bs=4096 count=1 seek=$((M / 4096)) conv=notrunc status=none 2>/dev/null || rc=$?
[ "$rc" != 0 ] || fail "a write past the new end succeeded"
"$F" device remove "$MNT" x --json | grep -q '"device": "x"' || fail "device remove --json"
# bitmaps of a removed device go with bitmap remove
"$F" bitmap remove "$MNT" --target xt >/dev/null || fail "bitmap remove of a removed device's bitmaps"
[ "$(status_json "$MNT" 'len(d["bitmaps"])')" = 1 ] || fail "bitmap remove left the removed device's bitmap"
lockable "$T/x.img" || fail "the source of a removed device is still locked"
"$F" unmount "$MNT"
echo "ok: refusals (unknown, shrink, bad SIZE, open, in an access, duplicate names and files) change nothing; bitmaps of removed devices kept, used or invalid when added back"

# ---- 3. 20 add/remove cycles while another device is written and backed up --------------
head -c $((8 * M)) /dev/urandom >"$T/w.img"
truncate -s $((2 * M)) "$T/c.img"
fmount "$MNT" --state-dir "$T/state3" --device w=$T/w.img
start_writer "$MNT/live/w" 2048
cycles() {
    local i ino
    for i in $(seq "$1"); do
        "$F" device add "$MNT" c=$T/c.img >/dev/null || fail "device add, cycle $i"
        ino=$(stat -c %i "$MNT/live/c")
        grep -qx "$ino" "$T/inos" 2>/dev/null && fail "inode $ino of live/c reused (cycle $i)"
        echo "$ino" >>"$T/inos"
        dd if=/dev/urandom of="$MNT/live/c" bs=4096 count=4 seek=$((RANDOM % 500)) conv=notrunc status=none ||
            fail "write to the added device, cycle $i"
        [ ! -e "$MNT/snapshot/c" ] || fail "the added device joined the running access"
        "$F" device remove "$MNT" c >/dev/null || fail "device remove, cycle $i"
        [ ! -e "$MNT/live/c" ] || fail "live/c still there after remove, cycle $i"
    done
}
w0=$(writes_now)
"$F" setup "$MNT" --target wt --bitmap wb --devices w >/dev/null
cycles 10
"$F" copy "$MNT" w "$T/w.backup" >/dev/null 2>&1 || fail "full copy of w during the cycles failed"
cmp "$T/w.backup" "$MNT/snapshot/w" || fail "full backup of w differs from its snapshot"
"$F" teardown "$MNT" --target wt --success >/dev/null
pause_writer
"$F" setup "$MNT" --target wt --bitmap wb --devices w --json >"$T/ws.json"
cp "$MNT/live/w" "$T/w.at-setup"
resume_writer
grep -q '"bitmap_action": "used"' "$T/ws.json" || fail "w's bitmap was not used"
cycles 10
"$F" copy "$MNT" w "$T/w.backup" --incremental >/dev/null 2>&1 || fail "incremental copy of w failed"
cmp "$T/w.backup" "$T/w.at-setup" || fail "full + incremental of w differs from its snapshot"
"$F" teardown "$MNT" --target wt --success >/dev/null
stop_writer
[ "$(writes_now)" -gt "$w0" ] || fail "the writer of w made no progress"
echo "ok: 20 add/remove cycles (inodes never reused) while w was written ($(( $(writes_now) - w0 )) writes) and backed up full + incremental, byte-identical"
"$F" unmount "$MNT"

# ---- 5. kill -9 right after device add, and right after resize -------------------------
truncate -s $((4 * M)) "$T/k1.img"
truncate -s $((3 * M)) "$T/k2.img"
fmount "$MNT" --state-dir "$T/state4" --device k1=$T/k1.img
"$F" setup "$MNT" --target kt --bitmap kb >/dev/null
"$F" teardown "$MNT" --target kt --success >/dev/null
"$F" device add "$MNT" k2=$T/k2.img >/dev/null
kill -9 "$(cat "$T/state4/fleecefs.lock")"
sleep 0.2
"$F" mount "$MNT" --state-dir "$T/state4" 2>"$T/m1.err" || fail "mount after kill -9: $(cat "$T/m1.err")"
[ "$(ls "$MNT/live" | tr '\n' ' ')" = "k1 k2 " ] || fail "after kill -9 right after device add, live/ holds: $(ls "$MNT/live")"
"$F" resize "$MNT" k1 +1M >/dev/null
kill -9 "$(cat "$T/state4/fleecefs.lock")"
sleep 0.2
"$F" mount "$MNT" --state-dir "$T/state4" 2>"$T/m2.err" || fail "mount after kill -9: $(cat "$T/m2.err")"
[ "$(size_of "$MNT/live/k1")" = $((5 * M)) ] || fail "after kill -9 right after resize, live/k1 is $(size_of "$MNT/live/k1") bytes"
[ "$(ls "$MNT/live" | tr '\n' ' ')" = "k1 k2 " ] || fail "the device set changed across the second kill -9"
"$F" setup "$MNT" --target kt --bitmap kb --devices k1 --json >"$T/ks.json"
grep -q '"bitmap_action": "used"' "$T/ks.json" || fail "k1's grown bitmap did not survive kill -9: $(cat "$T/ks.json") $(cat "$T/m2.err")"
dirty_covers "$MNT/snapshot/k1.dirty" $((4 * M)) $((5 * M)) || fail "k1's grown range is not dirty after kill -9"
"$F" teardown "$MNT" --target kt --failure >/dev/null
"$F" unmount "$MNT"
# --device states the set explicitly and says what differs from the record
fmount "$MNT" --state-dir "$T/state4" --device k1=$T/k1.img 2>"$T/m3.err"
grep -q "differ from the device set last served.*no longer served k2" "$T/m3.err" ||
    fail "mount --device did not tell what differs from the record: $(cat "$T/m3.err")"
[ "$(ls "$MNT/live")" = k1 ] || fail "mount --device k1 serves $(ls "$MNT/live")"
echo "ok: kill -9 after device add and after resize: the next mount serves the new set and size, grown bitmap kept"
"$F" unmount "$MNT"

# ---- 6. a block device source: SIZE must be its new size, no SIZE takes it --------------
truncate -s $((8 * M)) "$T/blk.img"
loop_attach "$T/blk.img"
B=$LOOPDEV
fmount "$MNT" --state-dir "$T/state6" --device blk=$B
"$F" setup "$MNT" --target bt --bitmap bb >/dev/null
"$F" teardown "$MNT" --target bt --success >/dev/null
truncate -s $((12 * M)) "$T/blk.img"
losetup -c "$B"
expect_fail_with "resize the block device first" "$F" resize "$MNT" blk 16M
expect_fail_with "resize the block device first" "$F" resize "$MNT" blk +1M
[ "$(size_of "$MNT/live/blk")" = $((8 * M)) ] || fail "a refused block device resize changed live/blk"
"$F" resize "$MNT" blk >/dev/null || fail "resize of a grown block device without SIZE failed"
[ "$(size_of "$MNT/live/blk")" = $((12 * M)) ] || fail "live/blk is $(size_of "$MNT/live/blk") after losetup -c and resize"
dd if=/dev/urandom of="$MNT/live/blk" bs=64k count=2 seek=$((10 * M / 65536)) conv=notrunc status=none ||
    fail "writing the new range of the block device failed"
"$F" setup "$MNT" --target bt --bitmap bb >/dev/null
dirty_covers "$MNT/snapshot/blk.dirty" $((8 * M)) $((12 * M)) || fail "the grown range of the block device is not dirty"
"$F" teardown "$MNT" --target bt --failure >/dev/null
"$F" unmount "$MNT"
echo "ok: block device source: wrong SIZE refused, no SIZE takes its new size after losetup -c, new range dirty"

# ---- 7. --live-cache: page-cached opens see the grown file and its new data -------------
head -c 1000000 /dev/urandom >"$T/pc.img"
fmount "$MNT" --state-dir "$T/state7" --device pc=$T/pc.img --live-cache
python3 - "$MNT/live/pc" "$F" "$MNT" "$T/pc.img" <<'EOF' || fail "a page-cached open did not see the grown device correctly"
import os, subprocess, sys
fd = os.open(sys.argv[1], os.O_RDWR)
before = os.pread(fd, 1 << 20, 0)       # fills the page cache, the last page partial
subprocess.run([sys.argv[2], "resize", sys.argv[3], "pc", "2M"], check=True, stdout=subprocess.DEVNULL)
assert os.fstat(fd).st_size == 2 << 20
os.pwrite(fd, b"\x77" * 5000, 1999000)
after = os.pread(fd, 3 << 20, 0)
assert len(after) == 2 << 20 and after[:1000000] == before
assert after == open(sys.argv[4], "rb").read()
os.close(fd)
EOF
"$F" unmount "$MNT"
echo "ok: --live-cache: a page-cached open reads the grown device as the source holds it"

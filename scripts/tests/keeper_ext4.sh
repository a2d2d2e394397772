#!/usr/bin/env bash
# ext4 inside live/NAME through a loop device survives 10 kill -9 of the worker under a
# file-writing load (write, fsync, rename): no writer sees an error, the kernel logs no
# I/O error, every file reads back the same after a remount, and e2fsck -fn is clean.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
ext4_on_live # L: live/disk, E: its ext4 mounted through $LOOPDEV
dmesg_before=$(dmesg 2>/dev/null | grep -c "I/O error" || true)

# 3 writers: files of random size, a checksum line once the file is synced
rm -f "$T/stop"
writer() {
    local w=$1 i=0 f
    mkdir -p "$E/w$w"
    while [ ! -e "$T/stop" ]; do
        i=$((i + 1))
        f=$E/w$w/f$((i % 40))
        head -c $((RANDOM * 8 + 1)) /dev/urandom >"$f.tmp" || { echo "w$w: write $i failed" >>"$T/errors"; return; }
        sync "$f.tmp" || { echo "w$w: sync $i failed" >>"$T/errors"; return; }
        mv "$f.tmp" "$f" || { echo "w$w: rename $i failed" >>"$T/errors"; return; }
    done
}
for w in 1 2 3; do writer $w & done
sleep 0.5
for k in $(seq 10); do
    sleep "0.$((RANDOM % 5))$((RANDOM % 10))"
    kill -9 "$(status_json "$T/mnt" 'd["worker_pid"]')"
    for _ in $(seq 200); do
        [ "$(status_json "$T/mnt" 'd["worker_restarts"]' 2>/dev/null)" = "$k" ] && break
        sleep 0.05
    done
    [ "$(status_json "$T/mnt" 'd["worker_restarts"]')" = "$k" ] || fail "no worker restart $k"
done
touch "$T/stop"
wait
[ ! -s "$T/errors" ] || fail "writers failed: $(cat "$T/errors")"
# every file reads back (a file with lost blocks would fail or differ from its size)
sync -f "$E"
(cd "$E" && sha256sum w*/f* >"$T/sums") || fail "reading the files back failed"
umount "$E"
mount -o noatime "$LOOPDEV" "$E" || fail "remounting the ext4 failed"
(cd "$E" && sha256sum -c --quiet "$T/sums") || fail "files changed across a remount"
umount "$E"
loop_detach "$LOOPDEV"
e2fsck -fn "$L" >"$T/fsck.out" 2>&1 || fail "e2fsck is not clean after 10 worker kills: $(tail -5 "$T/fsck.out")"
dmesg_after=$(dmesg 2>/dev/null | grep -c "I/O error" || true)
[ "$dmesg_after" = "$dmesg_before" ] || fail "the kernel logged I/O errors: $(dmesg | grep "I/O error" | tail -3)"
echo "ok: ext4 on a loop device over live/disk survived 10 worker kills under file writes; e2fsck clean"

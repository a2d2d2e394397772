#!/usr/bin/env bash
# A real filesystem inside the live image: ext4 made on live/NAME, loop-mounted, 200 files
# written and synced, then churn (create/delete/rewrite, occasional sync) runs while a backup
# is set up and the snapshot copied with cp. The copy is a crash-consistent ext4: e2fsck -fn
# passes or only the journal needs replaying, and the files synced before setup are intact;
# a second read of the snapshot after more churn is byte-identical to the first copy.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
ext4_on_live # L: live/disk, E: its ext4 mounted through $LOOPDEV

mkdir "$E/data" "$E/churn"
for i in $(seq 200); do
    head -c $((RANDOM % 65536 + 1)) /dev/urandom >"$E/data/f$i"
done
(cd "$E" && sha256sum data/*) >"$T/sums"
sync -f "$E"
# A freeze writes the journal back to the filesystem's home blocks, so the synced files
# are readable even from a copy mounted without journal replay (-o noload) below.
fsfreeze -f "$E" && fsfreeze -u "$E"

# churn: 3 workers create, delete and rewrite files and directories under churn/W, each
# syncing every few operations so that writes keep reaching the image during the copy
rm -f "$T/churn.stop"
churn() {
    local w=$1 i=0 n d=$E/churn/$1
    mkdir -p "$d"
    while [ ! -e "$T/churn.stop" ]; do
        i=$((i + 1))
        n=$((RANDOM % 100))
        case $((RANDOM % 6)) in
        0 | 1) head -c $((RANDOM * 4 + 1)) /dev/urandom >"$d/c$n" ;;
        2) rm -f "$d/c$n" ;;
        3) if [ -e "$d/c$n" ]; then
            dd if=/dev/urandom of="$d/c$n" bs=4096 count=2 seek=$((RANDOM % 8)) conv=notrunc status=none
        fi ;;
        4) mkdir -p "$d/d$n" && head -c $((RANDOM + 1)) /dev/urandom >"$d/d$n/f$RANDOM" ;;
        5) rm -rf "$d/d$n" ;;
        esac
        [ $((i % 8)) != 0 ] || sync -f "$E"
        echo $i >"$T/churn.$w.tmp" && mv "$T/churn.$w.tmp" "$T/churn.$w"
    done
}
CHURN=()
for w in 1 2 3; do
    churn $w &
    CHURN+=($!)
done
churn_n() { cat "$T"/churn.[0-9] 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
while [ "$(churn_n)" -lt 50 ]; do sleep 0.05; done

c0=$(churn_n)
"$FLEECEFS" setup "$T/mnt" --target ext4 >/dev/null || fail "setup during churn failed"
c1=$(churn_n)
cp --sparse=always "$T/mnt/snapshot/disk" "$T/copy.img"
c2=$(churn_n)
# more churn, then the snapshot read again (dd, other block size) is still the same image
while [ "$(churn_n)" -lt $((c2 + 60)) ]; do sleep 0.05; done
dd if="$T/mnt/snapshot/disk" of="$T/copy2.img" bs=12k status=none
touch "$T/churn.stop"
for p in "${CHURN[@]}"; do
    wait "$p" || fail "a churn worker failed on the live ext4 (exit $?)"
done
c3=$(churn_n)
[ "$c2" -gt "$c0" ] || fail "no churn around setup and the copy ($c0 -> $c1 -> $c2)"
[ "$c3" -gt "$c2" ] || fail "no churn after the copy ($c2 -> $c3)"
cmp "$T/copy.img" "$T/copy2.img" || fail "two copies of the snapshot differ: it changed while the ext4 was churned"
cmp -s "$T/copy.img" "$L" && fail "the live image did not change during the backup"
copied=$(status_json "$T/mnt" 'd["access"]["copied_bytes"]')
[ "$copied" -gt 0 ] || fail "nothing was copied before write during churn"

umount "$E" || fail "unmounting the live ext4 failed"
loop_detach "$LOOPDEV" || fail "detaching $LOOPDEV failed"
# the live image itself is a clean ext4 after all that
e2fsck -fn "$L" >"$T/fsck-live.log" 2>&1 || fail "e2fsck -fn of the live image: $(tail -20 "$T/fsck-live.log")"
teardown_clean ext4

# check the copy: clean, or only a journal to replay
recovery=no
dumpe2fs -h "$T/copy.img" 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery' && recovery=yes
rc=0
e2fsck -fn "$T/copy.img" >"$T/fsck-n.log" 2>&1 || rc=$?
[ "$rc" = 0 ] || [ "$recovery" = yes ] ||
    fail "e2fsck -fn of the copy exits $rc and no journal needs replaying: $(tail -20 "$T/fsck-n.log")"
if [ "$recovery" = yes ]; then
    # replay only the journal on a scratch copy: the result must then be clean (nothing
    # else repaired) and hold the synced files
    cp --sparse=always "$T/copy.img" "$T/scratch.img"
    rcy=0
    e2fsck -E journal_only -y "$T/scratch.img" >"$T/fsck-y.log" 2>&1 || rcy=$?
    [ "$rcy" -lt 4 ] || fail "replaying the journal of the copy failed (exit $rcy): $(tail -20 "$T/fsck-y.log")"
    e2fsck -fn "$T/scratch.img" >"$T/fsck-n2.log" 2>&1 ||
        fail "e2fsck -fn after replaying only the journal fails: $(tail -20 "$T/fsck-n2.log")"
    mkdir "$T/scratch-mnt"
    LOOPS+=("$T/scratch-mnt")
    mount -o ro,loop "$T/scratch.img" "$T/scratch-mnt" || fail "mounting the repaired copy failed"
    (cd "$T/scratch-mnt" && sha256sum --quiet -c "$T/sums") >"$T/sums-y.log" 2>&1 ||
        fail "files synced before setup differ in the repaired copy: $(head "$T/sums-y.log")"
    umount "$T/scratch-mnt"
fi
opts=ro
[ "$recovery" = no ] || opts=ro,noload
mkdir "$T/copy-mnt"
LOOPS+=("$T/copy-mnt")
mount -o "$opts,loop" "$T/copy.img" "$T/copy-mnt" || fail "mounting the copy ($opts) failed"
(cd "$T/copy-mnt" && sha256sum --quiet -c "$T/sums") >"$T/sums.log" 2>&1 ||
    fail "files synced before setup differ in the copy: $(head "$T/sums.log")"
umount "$T/copy-mnt"
rcy=${rcy:-none}
echo "ok: ext4 copy taken during churn ($((c2 - c0)) ops, $((copied / M)) MiB copied before write): e2fsck exit $rc (journal replay needed: $recovery, journal-only replay exit $rcy), 200 synced files intact"

#!/usr/bin/env bash
# restic backs up the snapshot/ directory into a local repository twice, as a daily backup
# does: a first access, then changes and a second access while a writer keeps writing the
# live image. Each restored snapshot is the point-in-time image of its access (the second
# backup must notice that snapshot/disk changed: restic reuses the previous content of files
# whose size, mtime, ctime and inode look unchanged).
source "$(dirname "$0")/lib.sh"
command -v restic >/dev/null || fail "restic is not installed (Debian: restic)"

M=$((1 << 20))
export RESTIC_PASSWORD=fleecefs-test RESTIC_CACHE_DIR=$T/cache
truncate -s $((32 * M)) "$T/src.img"
random_mib "$T/src.img" 0 24

fmount "$T/mnt" --state-dir "$T/state" --device disk=$T/src.img
restic -r "$T/repo" init >"$T/restic.log" 2>&1 || fail "restic init: $(cat "$T/restic.log")"
# first backup
cp "$T/src.img" "$T/ref1.img"
"$FLEECEFS" setup "$T/mnt" --target restic >/dev/null
restic -r "$T/repo" backup "$T/mnt/snapshot" >"$T/restic.log" 2>&1 || fail "first restic backup: $(cat "$T/restic.log")"
"$FLEECEFS" teardown "$T/mnt" --target restic --success >/dev/null
first=$(restic -r "$T/repo" snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
sleep 1.1 # the next backup is at least a second later

# second backup, during writes
start_writer "$T/mnt/live/disk" 4096 # 4096 blocks of 4 KiB: the first 16 MiB
setup_during_writes "$T/mnt" "$T/src.img" restic
before=$BEFORE
restic -r "$T/repo" backup "$T/mnt/snapshot" >"$T/backup2.log" 2>&1 || fail "second restic backup: $(cat "$T/backup2.log")"
after=$(writes_now)
stop_writer
teardown_clean restic

restic -r "$T/repo" restore latest --target "$T/restore" >"$T/restic.log" 2>&1 ||
    fail "restic restore: $(cat "$T/restic.log")"
R=$T/restore$T/mnt/snapshot
[ -f "$R/disk" ] || fail "restored tree has no snapshot/disk: $(find "$T/restore" | head)"
cmp "$R/disk" "$T/ref.img" ||
    fail "the restored second backup differs from its point-in-time image; restic said: $(grep -E '^Files:' "$T/backup2.log")"
[ "$(cat "$R/disk.dirty")" = "0 $((32 * M))" ] || fail "restored disk.dirty is '$(cat "$R/disk.dirty")'"
restic -r "$T/repo" restore "$first" --target "$T/restore1" >"$T/restic.log" 2>&1 ||
    fail "restic restore $first: $(cat "$T/restic.log")"
cmp "$T/restore1$T/mnt/snapshot/disk" "$T/ref1.img" || fail "the restored first backup differs from its image"
[ "$after" -gt "$before" ] || fail "the writer made no writes during restic backup ($before -> $after)"
cmp -s "$T/src.img" "$T/ref.img" && fail "the live image did not change during the backup"
echo "ok: two restic backups of snapshot/ restore their point-in-time images ($((after - before)) writes during the second)"

#!/usr/bin/env bash
# Shutdown during an active backup access: plain `umount MOUNTPOINT`, SIGINT and SIGTERM
# end the daemon (exit 0 where we can see it), tear the access down as a failure, remove
# the fleecing files, and a new mount on the same state dir works with no recovery needed.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
head -c $((16 * M)) /dev/urandom >"$T/src.img"
MP=$T/mnt
ST=$T/state
FL=$ST/fleecing/disk.shut.fleece

# start_access : setup plus live writes, so the fleecing file holds copied data
start_access() {
    "$FLEECEFS" setup "$MP" --target shut >/dev/null || fail "setup failed"
    random_mib "$MP/live/disk" 3 2
    # the copies reach the fleecing file through the write-behind buffer, a little later
    local i
    for i in $(seq 300); do
        [ "$(stat -c %b "$FL")" -gt 0 ] && break
        sleep 0.1
    done
    [ "$(stat -c %b "$FL")" -gt 0 ] || fail "the fleecing file holds no data after 30 s"
    [ "$(status_json "$MP" 'd["access"]["copied_bytes"]')" = $((2 * M)) ] || fail "copied_bytes is not 2 MiB"
    PID=$(status_json "$MP" 'd["pid"]')
    kill -0 "$PID" || fail "no daemon with pid $PID"
}
# wait_gone PID HOW : the daemon exits within 10 s, the mount is gone, the access was torn
# down as a failure and its files removed
wait_gone() {
    local i
    for i in $(seq 100); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    ! kill -0 "$1" 2>/dev/null || fail "$2: daemon $1 still runs after 10 s"
    ! grep -q " $MP " /proc/mounts || fail "$2: $MP is still mounted"
    [ -z "$(ls -A "$ST/fleecing")" ] || fail "$2: fleecing files left: $(ls "$ST/fleecing")"
    [ ! -e "$ST/access.json" ] || fail "$2: the access record is left"
    [ ! -e "$ST/control.sock" ] || fail "$2: the control socket is left"
    [ -z "$(ls -A "$MP")" ] || fail "$2: the mount point is not empty after shutdown"
}
# remount HOW : a new mount on the same state dir works without any recovery
remount() {
    local lines
    lines=$(wc -l <"$ST/fleecefs.log")
    fmount "$MP" --state-dir "$ST" --device disk=$T/src.img || fail "$1: mounting again failed"
    [ "$(status_json "$MP" 'd["access"]')" = None ] || fail "$1: the new mount has a backup access"
    if tail -n +$((lines + 1)) "$ST/fleecefs.log" | grep -q "unclean shutdown"; then
        fail "$1: the next mount had to recover: $(tail -n +$((lines + 1)) "$ST/fleecefs.log")"
    fi
}
torn_down_logged() {
    grep -q "torn down as a failure" "$1" || fail "$2: the log does not say the access was torn down: $(cat "$1")"
}

# 1. plain umount of the background daemon
fmount "$MP" --state-dir "$ST" --device disk=$T/src.img
start_access
cp --sparse=always "$MP/snapshot/disk" "$T/copy.img" # a backup read, done
umount "$MP" || fail "umount $MP failed"
wait_gone "$PID" "umount"
torn_down_logged "$ST/fleecefs.log" "umount"
remount "umount"

# 2. SIGINT while a backup reads the snapshot (the daemon must not hang on it; the open
#    snapshot no longer reads afterwards)
start_access
exec 3<"$MP/snapshot/disk"
dd bs=4096 count=1 status=none <&3 >/dev/null || fail "the open snapshot does not read"
sleep 30 4<"$MP/snapshot/disk" &
HOLDER=$!
sleep 0.2
kill -INT "$PID"
wait_gone "$PID" "SIGINT with an open snapshot"
! dd bs=4096 count=1 status=none <&3 >/dev/null 2>&1 || fail "the open snapshot still reads after shutdown"
exec 3<&-
kill "$HOLDER" 2>/dev/null || true
wait "$HOLDER" 2>/dev/null || true
torn_down_logged "$ST/fleecefs.log" "SIGINT"
remount "SIGINT"

# 3. foreground daemons (our children, so the exit status is visible): umount, then SIGINT,
#    then SIGTERM
fg_daemon() {
    "$FLEECEFS" unmount "$MP" || fail "fleecefs unmount failed"
    "$FLEECEFS" mount "$MP" --state-dir "$ST" --device disk=$T/src.img --foreground 2>"$T/fg.log" &
    FG=$!
    local i
    for i in $(seq 100); do
        "$FLEECEFS" status "$MP" >/dev/null 2>&1 && break
        kill -0 "$FG" 2>/dev/null || fail "the foreground daemon exited: $(cat "$T/fg.log")"
        sleep 0.1
    done
    start_access
    [ "$PID" = "$FG" ] || fail "status pid $PID is not the foreground daemon $FG"
}
for how in umount INT TERM; do
    fg_daemon
    if [ "$how" = umount ]; then
        umount "$MP" || fail "umount of the foreground mount failed"
    else
        kill -"$how" "$FG"
    fi
    rc=0
    wait "$FG" || rc=$?
    [ "$rc" = 0 ] || fail "foreground daemon exits $rc after $how: $(cat "$T/fg.log")"
    wait_gone "$FG" "foreground $how"
    torn_down_logged "$T/fg.log" "foreground $how"
    remount "foreground $how"
done
echo "ok: umount, SIGINT and SIGTERM during an access end the daemon cleanly (exit 0) and the state dir mounts again"

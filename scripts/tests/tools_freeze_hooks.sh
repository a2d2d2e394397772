#!/usr/bin/env bash
# Freeze hooks around `fleecefs setup`, with an ext4 inside live/disk (loop device) and a
# writing load. With --freeze-cmd "fsfreeze -f E" --thaw-cmd "fsfreeze -u E" the snapshot
# copy passes `e2fsck -fn` and its superblock has no needs_recovery flag: nothing to
# replay. Without the hook the copy of the mounted filesystem has needs_recovery set.
# That flag is what is asserted both ways: ext4 sets it on disk for as long as it is
# mounted read-write and clears it only in a freeze (after flushing the journal), so it is
# deterministic; whether e2fsck -n then finds errors without the replay depends on timing,
# so that is not asserted. Also: a failing, hanging (timeout) and missing freeze command
# fail the setup with nothing set up, the thaw runs exactly when the freeze command
# started, --freeze-optional goes on unfrozen, a failing thaw is reported, the hooks'
# output reaches the daemon's log file, and --json reports frozen and the duration.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
ext4_on_live # L: live/disk, E: its ext4 mounted through $LOOPDEV
no_access() {
    [ "$(status_json "$T/mnt" 'd["access"]')" = None ] || fail "$1: an access is set up"
}

# a writing load: files written and synced all the time
rm -f "$T/load.stop"
(
    i=0
    while [ ! -e "$T/load.stop" ]; do
        i=$((i + 1))
        head -c $((RANDOM * 2 + 1)) /dev/urandom >"$E/f$((i % 50))" 2>/dev/null || true
        [ $((i % 4)) != 0 ] || sync -f "$E" 2>/dev/null || true
    done
) &
LOAD=$!
sleep 0.5

# with the hook
"$FLEECEFS" setup "$T/mnt" --target a --json \
    --freeze-cmd "sh -c 'echo freezing-now; fsfreeze -f $E'" --thaw-cmd "fsfreeze -u $E" >"$T/a.json" ||
    fail "setup with freeze hooks failed"
[ "$(js "$T/a.json" 'd["frozen"] is True and 0 < d["freeze_seconds"] < 10')" = True ] || fail "--json: $(cat "$T/a.json")"
timeout 10 touch "$E/after-thaw" || fail "the filesystem is still frozen after setup"
cp "$T/mnt/snapshot/disk" "$T/frozen.img"
"$FLEECEFS" teardown "$T/mnt" --target a --success >/dev/null
dumpe2fs -h "$T/frozen.img" 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery' &&
    fail "the snapshot taken while frozen needs journal recovery"
e2fsck -fn "$T/frozen.img" >"$T/fsck.log" 2>&1 || fail "e2fsck -fn of the frozen snapshot: $(cat "$T/fsck.log")"
grep -q "freeze command: freezing-now" "$T/state/fleecefs.log" || fail "the freeze command's output is not in the log"

# without the hook
"$FLEECEFS" setup "$T/mnt" --target b --json >"$T/b.json" || fail "setup without hooks failed"
[ "$(js "$T/b.json" 'd["frozen"] is False and "freeze_seconds" not in d')" = True ] || fail "--json: $(cat "$T/b.json")"
cp "$T/mnt/snapshot/disk" "$T/plain.img"
"$FLEECEFS" teardown "$T/mnt" --target b --success >/dev/null
dumpe2fs -h "$T/plain.img" 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery' ||
    fail "the snapshot of the mounted ext4 without the hook does not need journal recovery"
touch "$T/load.stop"
wait "$LOAD" || true

# failing, hanging, missing freeze commands: exit 1, nothing set up; thaw iff started
TH=$T/thawed
thaws() { cat "$TH" 2>/dev/null | wc -l; }
thaw_cmd="sh -c 'echo x >> $TH'"
expect_rc 1 "nothing was set up" "$FLEECEFS" setup "$T/mnt" --target c --freeze-cmd "sh -c 'echo cannot >&2; exit 4'" --thaw-cmd "$thaw_cmd"
no_access "failing freeze"
[ "$(thaws)" = 1 ] || fail "thaw ran $(thaws) times after a failing freeze"
start=$(date +%s)
expect_rc 1 "did not finish within 1.0s" "$FLEECEFS" setup "$T/mnt" --target c --freeze-cmd "sleep 60" --thaw-cmd "$thaw_cmd" --freeze-timeout 1
[ $(($(date +%s) - start)) -lt 20 ] || fail "a hanging freeze command held the setup $(($(date +%s) - start))s"
no_access "hanging freeze"
[ "$(thaws)" = 2 ] || fail "thaw ran $(thaws) times after two started freezes"
expect_rc 1 "cannot be started" "$FLEECEFS" setup "$T/mnt" --target c --freeze-cmd "/nonexistent/freeze" --thaw-cmd "$thaw_cmd"
no_access "missing freeze"
[ "$(thaws)" = 2 ] || fail "thaw ran for a freeze command that never started"
# --freeze-optional: set up unfrozen
"$FLEECEFS" setup "$T/mnt" --target d --json --freeze-cmd false --thaw-cmd "$thaw_cmd" --freeze-optional >"$T/d.json" 2>/dev/null ||
    fail "--freeze-optional setup failed"
[ "$(js "$T/d.json" 'd["frozen"] is False and "false" in d["freeze_error"]')" = True ] || fail "--json: $(cat "$T/d.json")"
[ "$(thaws)" = 3 ] || fail "thaw did not run after an optional failed freeze"
"$FLEECEFS" teardown "$T/mnt" --target d --success >/dev/null
# a failing thaw: the access stands, exit 1 says so
expect_rc 1 "is set up, but the thaw command 'false' failed" "$FLEECEFS" setup "$T/mnt" --target e --freeze-cmd true --thaw-cmd false
[ "$(status_json "$T/mnt" 'd["access"]["target"]')" = e ] || fail "the access is not set up after a failed thaw"
"$FLEECEFS" teardown "$T/mnt" --target e --success >/dev/null
# usage
expect_rc 2 "--thaw-cmd" "$FLEECEFS" setup "$T/mnt" --target f --freeze-cmd true
expect_rc 1 "--freeze-timeout" "$FLEECEFS" setup "$T/mnt" --target f --freeze-cmd true --thaw-cmd true --freeze-timeout 0
expect_rc 1 "unterminated" "$FLEECEFS" setup "$T/mnt" --target f --freeze-cmd "sh -c 'x" --thaw-cmd true
no_access "usage errors"
# restore refuses a device a loop device is attached to (no process has it open)
"$FLEECEFS" copy "$T/mnt" disk "$T/x.img" >/dev/null 2>&1 && fail "copy without an access succeeded"
cp "$T/plain.img" "$T/back.raw"
expect_rc 1 "is open by loop device $LOOPDEV (attached)" "$FLEECEFS" restore "$T/mnt" disk "$T/back.raw"
echo "ok: freeze hooks: frozen snapshot clean (e2fsck -fn, no needs_recovery), unfrozen needs recovery; failing/hanging/missing/optional/thaw failure"

# Keeper and worker (docs/architecture.md, "Keeper and worker"): kills of the worker
# during a backup access (the access breaks, the next incremental is exact), the keeper
# killed (the mount ends, the next mount recovers), a crash loop (clean give-up), and the
# crash-recovery fixes: a mount right after kill -9 waits for the dying daemon,
# bitmaps/registry.tmp is removed at recovery.
source "$(dirname "$0")/lib.sh"
M=$((1 << 20))
head -c $((32 * M)) /dev/urandom >"$T/src.img"
mnt() { fmount "$T/m" --state-dir "$T/s" --device d=$T/src.img "$@"; }
field() { status_json "$T/m" "$1"; }
gone() {  # gone PID : until process PID has exited (10 s at most)
    local i
    for i in $(seq 200); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.05
    done
    fail "process $1 still runs"
}

# --- kills during an access ------------------------------------------------------------
mnt
"$FLEECEFS" setup "$T/m" --target t --bitmap b >/dev/null
"$FLEECEFS" copy "$T/m" d "$T/full.img" >/dev/null
"$FLEECEFS" teardown "$T/m" --target t --success >/dev/null
dd if=/dev/urandom of="$T/m/live/d" bs=64K count=16 seek=3 conv=notrunc status=none
"$FLEECEFS" setup "$T/m" --target t --bitmap b >/dev/null
dd if=/dev/urandom of="$T/m/live/d" bs=64K count=8 seek=100 conv=notrunc status=none
kill -9 "$(field 'd["worker_pid"]')"
wait_restarts "$T/m" 1
dd if=/dev/urandom of="$T/m/live/d" bs=64K count=8 seek=200 conv=notrunc status=none
kill -9 "$(field 'd["worker_pid"]')"           # a second kill while the access is broken
wait_restarts "$T/m" 2
[ "$(field 'd["access"]["target"]')" = t ] || fail "the access is gone after the kills"
[ "$(field 'd["access"]["broken_reason"]')" = "daemon restarted" ] ||
    fail "the access is not broken (daemon restarted): $(field 'd["access"]')"
field 'd["last_restart"]["reason"]' | grep -q "killed by signal 9" || fail "last_restart: $(field 'd["last_restart"]')"
expect_fail_with "Input/output error" dd if="$T/m/snapshot/d" of=/dev/null bs=64K count=1 status=none
expect_fail_with "cannot be trusted" "$FLEECEFS" teardown "$T/m" --target t --success
dd if=/dev/urandom of="$T/m/live/d" bs=64K count=4 seek=300 conv=notrunc status=none
# the next incremental covers everything since the full backup: byte-identical
"$FLEECEFS" setup "$T/m" --target t --bitmap b --json >"$T/setup.json"
[ "$(js "$T/setup.json" 'd["devices"][0]["bitmap_action"]')" = used ] ||
    fail "the setup after the broken access is not incremental: $(cat "$T/setup.json")"
"$FLEECEFS" copy "$T/m" d "$T/full.img" --incremental >/dev/null
cmp "$T/full.img" "$T/src.img" || fail "the backup differs from the source"
"$FLEECEFS" teardown "$T/m" --target t --success >/dev/null
# restart refuses during an access, --force breaks it
"$FLEECEFS" setup "$T/m" --target t2 >/dev/null
expect_fail_with "a backup access is active for target 't2'" "$FLEECEFS" restart "$T/m"
"$FLEECEFS" restart "$T/m" --force | grep -q "writers paused" || fail "restart --force printed no pause"
[ "$(field 'd["access"]["broken_reason"]')" = "daemon restarted" ] || fail "restart --force did not break the access"
"$FLEECEFS" teardown "$T/m" --target t2 --failure >/dev/null
expect_fail_with "is not an executable file" "$FLEECEFS" restart "$T/m" --binary "$T/src.img"
expect_fail_with "is not a fleecefs binary" "$FLEECEFS" restart "$T/m" --binary /bin/true

# --- a device added at run time survives a worker death and a planned restart ----------
# (later workers serve the recorded device set, not the mount's --device options)
head -c $((4 * M)) /dev/urandom >"$T/extra.img"
"$FLEECEFS" device add "$T/m" e="$T/extra.img" >/dev/null
restarts=$(field 'd["worker_restarts"]')
kill -9 "$(field 'd["worker_pid"]')"
wait_restarts "$T/m" $((restarts + 1))
[ "$(ls "$T/m/live" | tr '\n' ' ')" = "d e " ] || fail "after a worker kill, live/ holds: $(ls "$T/m/live")"
"$FLEECEFS" restart "$T/m" >/dev/null
[ "$(ls "$T/m/live" | tr '\n' ' ')" = "d e " ] || fail "after a planned restart, live/ holds: $(ls "$T/m/live")"
cmp "$T/m/live/e" "$T/extra.img" || fail "live/e differs from its source after the restarts"
# a resize survives a worker death too
"$FLEECEFS" resize "$T/m" e +1M >/dev/null
restarts=$(field 'd["worker_restarts"]')
kill -9 "$(field 'd["worker_pid"]')"
wait_restarts "$T/m" $((restarts + 1))
[ "$(stat -c %s "$T/m/live/e")" = $((5 * M)) ] || fail "after a worker kill, live/e is $(stat -c %s "$T/m/live/e") bytes, not the resized 5 MiB"
"$FLEECEFS" device remove "$T/m" e >/dev/null

# --- the keeper killed: the mount ends (ENOTCONN), the next mount recovers --------------
keeper=$(field 'd["keeper_pid"]')
worker=$(field 'd["worker_pid"]')
[ "$(field 'd["pid"]')" = "$keeper" ] || fail "status pid is not the keeper's"
kill -9 "$keeper"
gone "$worker"                                   # the worker dies with its keeper
expect_fail_with "Transport endpoint is not connected" cat "$T/m/live/d"
mnt 2>"$T/err" || fail "mount after the keeper was killed: $(cat "$T/err")"
cmp "$T/m/live/d" "$T/src.img" || fail "live differs from the source after recovery"

# --- a mount right after kill -9 of the daemon waits for it to finish dying -------------
# (refused for some ms with "in use" before: the killed daemon's threads were exiting)
for round in 1 2 3 4 5; do
    kill -9 "$(field 'd["keeper_pid"]')" "$(field 'd["worker_pid"]')"
    mnt 2>"$T/err" || fail "round $round: mount right after kill -9: $(cat "$T/err")"
done

# --- recovery removes a registry.tmp left by a crash during setup -----------------------
"$FLEECEFS" unmount "$T/m"
echo '{"half": ' >"$T/s/bitmaps/registry.tmp"
mnt
[ ! -e "$T/s/bitmaps/registry.tmp" ] || fail "bitmaps/registry.tmp was not removed at recovery"
"$FLEECEFS" unmount "$T/m"

# --- crash loop: workers that die at start end in a clean give-up -----------------------
FLEECEFS_FAULT_WORKER_DIE_FROM=1 mnt
keeper=$(field 'd["keeper_pid"]')
kill -9 "$(field 'd["worker_pid"]')"
gone "$keeper"
grep -q "giving up on $T/m: the worker died 5 times within 60 s" "$T/s/fleecefs.log" ||
    fail "no give-up in the log: $(tail -5 "$T/s/fleecefs.log")"
! grep -q " $T/m " /proc/mounts || fail "the mount is still there after the give-up"
[ "$(grep -c "exited with status 3: starting a new worker" "$T/s/fleecefs.log")" = 5 ] || fail "not 5 deaths at start"
mnt 2>"$T/err" || fail "mount after the give-up: $(cat "$T/err")"
cmp "$T/m/live/d" "$T/src.img" || fail "live differs from the source after the give-up"
"$FLEECEFS" unmount "$T/m"
pgrep -f -- "(mount|worker) $T/m" >/dev/null && fail "processes left after unmount: $(pgrep -af -- "(mount|worker) $T/m")"
# --- a kernel without FUSE_NOTIFY_RESEND (simulated): a warning, and today's behaviour --
FLEECEFS_FAULT_NO_RESEND=1 mnt 2>"$T/err"
grep -q "lacks FUSE_NOTIFY_RESEND" "$T/err" || fail "mount did not warn about the missing FUSE_NOTIFY_RESEND: $(cat "$T/err")"
expect_fail_with "lacks FUSE_NOTIFY_RESEND" "$FLEECEFS" restart "$T/m"
keeper=$(field 'd["keeper_pid"]')
kill -9 "$(field 'd["worker_pid"]')"
gone "$keeper"                                   # no restart: the mount ends
grep -q "cannot resend its requests" "$T/s/fleecefs.log" || fail "no give-up without resend: $(tail -3 "$T/s/fleecefs.log")"
! grep -q " $T/m " /proc/mounts || fail "the mount is still there without resend"
mnt 2>"$T/err" || fail "mount after a worker death without resend: $(cat "$T/err")"
"$FLEECEFS" unmount "$T/m"
echo "ok: kills during an access (broken, exact incremental), restart refusals and --force, keeper killed, mount right after kill -9, registry.tmp, crash loop give-up, no FUSE_NOTIFY_RESEND"

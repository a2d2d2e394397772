#!/usr/bin/env bash
# Process limits of the keeper and its workers: the OOM killer's adjustment (the keeper
# protects itself, each worker gets --worker-oom-score-adj, again after a restart), and
# the limit of open files (raised to the hard limit: 300 devices with bitmaps set up
# under a soft limit of 1024).
source "$(dirname "$0")/lib.sh"
field() { status_json "$1" "$2"; }
oom() { cat "/proc/$1/oom_score_adj"; }

# --- oom_score_adj ------------------------------------------------------------------------
head -c $((1 << 20)) /dev/zero >"$T/a.img"
fmount "$T/m1" --state-dir "$T/s1" --device a="$T/a.img"
# Lowering oom_score_adj needs CAP_SYS_RESOURCE (bit 24): without it (some containers)
# the keeper must say it could not.
if (($(printf '%d' "0x$(awk '/^CapEff/ {print $2}' /proc/self/status)") & (1 << 24))); then
    keeper_oom=-900
else
    keeper_oom=0
    grep -q "cannot set the keeper's oom_score_adj to -900" "$T/s1/fleecefs.log" ||
        fail "no warning in the log although the keeper cannot lower its oom_score_adj"
fi
[ "$(oom "$(field "$T/m1" 'd["keeper_pid"]')")" = $keeper_oom ] || fail "keeper oom_score_adj is not $keeper_oom"
[ "$(oom "$(field "$T/m1" 'd["worker_pid"]')")" = 0 ] || fail "default worker oom_score_adj is not 0"
"$FLEECEFS" unmount "$T/m1"
fmount "$T/m1" --state-dir "$T/s1" --device a="$T/a.img" --worker-oom-score-adj 300
keeper=$(field "$T/m1" 'd["keeper_pid"]')
worker=$(field "$T/m1" 'd["worker_pid"]')
[ "$(oom "$worker")" = 300 ] || fail "worker oom_score_adj is $(oom "$worker"), not 300"
echo 700 >"/proc/$worker/oom_score_adj"          # changed by hand: the next worker resets it
kill -9 "$worker"
wait_restarts "$T/m1" 1
worker2=$(field "$T/m1" 'd["worker_pid"]')
[ "$worker2" != "$worker" ] || fail "no new worker"
[ "$(oom "$worker2")" = 300 ] || fail "restarted worker oom_score_adj is $(oom "$worker2"), not 300"
[ "$(oom "$keeper")" = $keeper_oom ] || fail "keeper oom_score_adj is $(oom "$keeper") after the restart"
"$FLEECEFS" restart "$T/m1" >/dev/null
[ "$(oom "$(field "$T/m1" 'd["worker_pid"]')")" = 300 ] || fail "worker oom_score_adj after a planned restart is not 300"
expect_fail_with "worker-oom-score-adj" "$FLEECEFS" mount "$T/m2" --state-dir "$T/s2" \
    --device a="$T/a.img" --worker-oom-score-adj 1001
"$FLEECEFS" unmount "$T/m1"

# --- open files: 300 devices with bitmaps under a soft limit of 1024 ---------------------
# The state directory on tmpfs: creating 600 bitmap files costs no fsync there.
mkdir -p "$T/s3"
mount -t tmpfs -o size=64M,mode=0700 tmpfs "$T/s3"
args=()
for i in $(seq 300); do
    head -c 65536 /dev/zero >"$T/i$i"
    args+=(--device "d$i=$T/i$i")
done
MOUNTS+=("$T/m3")
mkdir -p "$T/m3"
(ulimit -S -n 1024 && "$FLEECEFS" mount "$T/m3" --state-dir "$T/s3" "${args[@]}")
worker=$(field "$T/m3" 'd["worker_pid"]')
grep -q "^Max open files  *$(ulimit -H -n) " "/proc/$worker/limits" ||
    fail "the worker's soft limit of open files is not the hard one: $(grep 'open files' "/proc/$worker/limits")"
"$FLEECEFS" setup "$T/m3" --target t --bitmap b >/dev/null
"$FLEECEFS" teardown "$T/m3" --target t --success >/dev/null
"$FLEECEFS" unmount "$T/m3"
umount "$T/s3"
echo "keeper_limits: OK"

#!/usr/bin/env bash
# Commands right after a worker death: while the keeper holds the mount, `status`,
# `setup` and `teardown` wait for the next worker (bounded) and succeed, never advising
# `umount -l`; a keeper that does not bring a worker up in time gets an error that says
# not to unmount; only with no keeper left does the error suggest `umount -l`.
source "$(dirname "$0")/lib.sh"
head -c $((4 << 20)) /dev/urandom >"$T/src.img"
fmount "$T/m" --state-dir "$T/s" --device d="$T/src.img"
field() { status_json "$T/m" "$1"; }
kill_worker() { kill -9 "$(field 'd["worker_pid"]')"; }
# run CMD... : CMD must succeed; its stderr must not mention umount
run() {
    local err rc=0
    err=$("$@" 2>&1 >/dev/null) || rc=$?
    [ "$rc" = 0 ] || fail "right after a worker kill, '$*' failed ($rc): $err"
    case "$err" in *umount*) fail "'$*' advised: $err" ;; esac
}

for i in $(seq 8); do
    kill_worker
    run "$FLEECEFS" status "$T/m"
    kill_worker
    run "$FLEECEFS" setup "$T/m" --target t
    kill_worker
    run "$FLEECEFS" teardown "$T/m" --target t --failure
done
[ "$(field 'd["worker_restarts"]')" = 24 ] || fail "worker_restarts is $(field 'd["worker_restarts"]'), not 24"

# A keeper that cannot start a worker (stopped here) holds the mount: no umount advice.
keeper=$(field 'd["keeper_pid"]')
worker=$(field 'd["worker_pid"]')
kill -STOP "$keeper"
kill -9 "$worker"
export FLEECEFS_FAULT_WORKER_START_WAIT_MS=1500
expect_fail_with "its keeper (pid $keeper) still holds the mount: do not unmount" "$FLEECEFS" status "$T/m"
err=$("$FLEECEFS" status "$T/m" 2>&1) || true
case "$err" in *"umount -l"*) fail "advised umount -l while the keeper lives: $err" ;; esac
kill -CONT "$keeper"
unset FLEECEFS_FAULT_WORKER_START_WAIT_MS
run "$FLEECEFS" status "$T/m"

# No keeper: the mount is dead, and only now the advice is to unmount.
kill -9 "$keeper"
while kill -0 "$keeper" 2>/dev/null; do sleep 0.05; done
expect_fail_with "umount -l $T/m" "$FLEECEFS" status "$T/m"
echo "keeper_commands_during_restart: OK"

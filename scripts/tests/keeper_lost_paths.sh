#!/usr/bin/env bash
# A worker started again must not depend on paths that changed since the mount:
#   - a mount started from a directory that was deleted since survives a worker kill
#     (workers start with cwd /);
#   - a source whose path no longer resolves does not take the other devices away: after
#     a worker kill the others are served, and the log names the device left out and why.
source "$(dirname "$0")/lib.sh"
head -c $((4 << 20)) /dev/urandom >"$T/a.img"
head -c $((4 << 20)) /dev/urandom >"$T/b.img"
cp "$T/b.img" "$T/b.ref"
mkdir "$T/cwd"
(cd "$T/cwd" && fmount "$T/m" --state-dir "$T/s" --device a=../a.img --device b=../b.img)
MOUNTS+=("$T/m")
rmdir "$T/cwd"
worker() { status_json "$T/m" 'd["worker_pid"]'; }
restarts() { status_json "$T/m" 'd["worker_restarts"]'; }
wait_restarts() {  # wait_restarts N : until the worker has been restarted N times (20 s)
    for _ in $(seq 400); do
        [ "$(restarts 2>/dev/null || echo -1)" -ge "$1" ] 2>/dev/null && return 0
        sleep 0.05
    done
    fail "no restart number $1 (log: $(tail -5 "$T/s/fleecefs.log"))"
}
kill -9 "$(worker)"
wait_restarts 1
cmp "$T/m/live/b" "$T/b.ref" || fail "live/b after a kill, mount started from a deleted directory"

rm "$T/a.img"
kill -9 "$(worker)"
wait_restarts 2
cmp "$T/m/live/b" "$T/b.ref" || fail "live/b is not served after device a's source vanished"
grep -q "device 'a' is not served: .*a.img" "$T/s/fleecefs.log" ||
    fail "the log does not say why device a is not served: $(tail -5 "$T/s/fleecefs.log")"
"$FLEECEFS" unmount "$T/m"
echo "ok: a worker kill after the mount's directory was deleted, and after a source vanished"

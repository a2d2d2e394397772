#!/usr/bin/env bash
# Snapshot handles opened before a worker death: a handle of the access active at the
# death reads EIO (the access comes back broken under the same id), and a handle of an
# access that ended before the death reads ESTALE, never the snapshot of an access set
# up after it. The death itself is logged as a warning with the writers' pause.
source "$(dirname "$0")/lib.sh"
head -c $((4 << 20)) /dev/urandom >"$T/src.img"
fmount "$T/m" --state-dir "$T/s" --device d="$T/src.img"
field() { status_json "$T/m" "$1"; }
HOLDERS=()
# A failure ends the readers first: their open files would keep the mount alive.
fail() { kill "${HOLDERS[@]}" 2>/dev/null || true; echo "FAIL: $*" >&2; exit 1; }
# hold NAME : opens snapshot/d in a background process that reads 64 KiB through that
# handle once $T/NAME.go exists, and writes "ok" or the errno name to $T/NAME.out
hold() {
    python3 - "$T/m/snapshot/d" "$T/$1" <<'EOF' &
import errno, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
open(sys.argv[2] + ".opened", "w").close()
end = time.time() + 60
while not os.path.exists(sys.argv[2] + ".go") and time.time() < end:
    time.sleep(0.02)
try:
    os.pread(fd, 65536, 0)
    r = "ok"
except OSError as e:
    r = errno.errorcode[e.errno]
open(sys.argv[2] + ".out", "w").write(r)
EOF
    HOLDERS+=($!)
    while [ ! -e "$T/$1.opened" ]; do sleep 0.02; done
}
result() {  # result NAME : lets NAME read and prints what it got
    local i
    touch "$T/$1.go"
    for i in $(seq 500); do
        [ -e "$T/$1.out" ] && break
        sleep 0.02
    done
    cat "$T/$1.out" 2>/dev/null || echo "no result"
}

# A handle of an access that ended before the death.
"$FLEECEFS" setup "$T/m" --target a >/dev/null
hold ended
"$FLEECEFS" teardown "$T/m" --target a --success >/dev/null
# A handle of the access active at the death.
"$FLEECEFS" setup "$T/m" --target b >/dev/null
hold active
worker=$(field 'd["worker_pid"]')
kill -9 "$worker"
wait_restarts "$T/m" 1
[ "$(result active)" = EIO ] || fail "a handle of the access broken by the death read: $(cat "$T/active.out"), not EIO"
"$FLEECEFS" teardown "$T/m" --target b --failure >/dev/null
# Accesses set up after the death never answer a handle of an earlier one.
"$FLEECEFS" setup "$T/m" --target c >/dev/null
[ "$(result ended)" = ESTALE ] || fail "a handle of an access ended before the death read: $(cat "$T/ended.out"), not ESTALE"
"$FLEECEFS" teardown "$T/m" --target c --success >/dev/null
wait

# The recovered death is a warning, with the pause.
log="$T/s/fleecefs.log"
grep -q "warning: worker $worker killed by signal 9: starting a new worker" "$log" ||
    fail "no warning for the death in the log: $(grep -i "worker $worker" "$log")"
grep -qE "warning: worker [0-9]+ serving after a restart \(worker $worker killed by signal 9\): writers paused [0-9]+ ms" "$log" ||
    fail "no warning with the pause in the log: $(grep "serving after" "$log")"
! grep -q "error: worker $worker" "$log" || fail "the recovered death is logged as an error"
echo "keeper_snapshot_handles: OK"

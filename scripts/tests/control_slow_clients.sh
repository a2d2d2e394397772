#!/usr/bin/env bash
# Clients that send a byte every 8 s cannot hold the control socket: the 10 s limit is
# for the whole request, so 16 of them (every slot) are dropped after it and a command
# gets through while they are still sending.
source "$(dirname "$0")/lib.sh"

head -c $((4 << 20)) /dev/urandom >"$T/src.img"
fmount "$T/mnt" --state-dir "$T/state" --device disk="$T/src.img"
python3 - "$T/state/control.sock" "$T/stop" "$T/connected" <<'PY' &
import os, socket, sys, time
socks = []
for _ in range(16):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    socks.append(s)
open(sys.argv[3], "w").close()
end = time.time() + 60
while time.time() < end and not os.path.exists(sys.argv[2]):
    for s in socks:
        try:
            s.send(b" ")
        except OSError:
            pass
    for _ in range(80):  # 8 s
        if os.path.exists(sys.argv[2]):
            break
        time.sleep(0.1)
PY
SLOW=$!
for _ in $(seq 300); do
    [ -e "$T/connected" ] && break
    kill -0 "$SLOW" 2>/dev/null || fail "the slow clients could not connect"
    sleep 0.1
done
[ -e "$T/connected" ] || fail "the slow clients did not connect in 30 s"
# every slot is taken now (a connection waiting for one is served after them)
if "$FLEECEFS" status "$T/mnt" >/dev/null 2>&1; then fail "status answered while 16 clients held every slot"; fi
start=$(date +%s)
ok=
while [ $(( $(date +%s) - start )) -lt 30 ]; do
    if "$FLEECEFS" status "$T/mnt" >/dev/null 2>"$T/err"; then
        ok=1
        break
    fi
    sleep 0.5
done
took=$(( $(date +%s) - start ))
touch "$T/stop"
kill -0 "$SLOW" 2>/dev/null || fail "the slow clients ended early"
wait "$SLOW" || true
[ -n "$ok" ] || fail "16 clients sending a byte every 8 s blocked 'status' for 30 s: $(cat "$T/err")"
echo "control_slow_clients: status answered after ${took} s"

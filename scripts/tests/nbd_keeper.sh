#!/usr/bin/env bash
# The keeper holds the NBD listening sockets: after kill -9 of the worker (and after a
# planned restart) the same sockets (same inode, never rebound) serve again, a client that
# connects while no worker runs is served by the next one, and the socket is removed at
# unmount.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
S=$T/nbd.sock
U="nbd+unix:///disk?socket=$S"
P=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
field() { status_json "$T/mnt" "$1"; }

truncate -s $((16 * M)) "$T/src.img"
random_mib "$T/src.img" 0 2
fmount "$T/mnt" --state-dir "$T/state" --device disk="$T/src.img" --nbd "unix:$S" \
    --nbd "tcp:127.0.0.1:$P" --nbd-insecure
inode=$(stat -c %i "$S")
"$FLEECEFS" setup "$T/mnt" --target t >/dev/null
nbdcopy "$U" "$T/a.img" && cmp "$T/a.img" "$T/src.img" || fail "no backup before the kill"
"$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null

# kill -9 of the worker: the next worker serves the same sockets
worker=$(field 'd["worker_pid"]')
kill -9 "$worker"
# Connect once the worker is dead (a zombie or reaped) and maybe before the next one
# serves: the connection waits in the listen backlog. (Connecting while the killed
# worker may still run can lose the connection to it: its accept returns, then it dies.)
for _ in $(seq 1000); do
    ! kill -0 "$worker" 2>/dev/null || grep -q "^State:.*Z" "/proc/$worker/status" 2>/dev/null && break
    sleep 0.01
done
nbdinfo --list "nbd+unix://?socket=$S" >"$T/list" 2>&1 || fail "a client during the restart failed: $(cat "$T/list")"
wait_restarts "$T/mnt" 1
[ "$(stat -c %i "$S")" = "$inode" ] || fail "the socket was bound again (new inode)"
"$FLEECEFS" setup "$T/mnt" --target t >/dev/null
nbdcopy "$U" "$T/b.img" && cmp "$T/b.img" "$T/src.img" || fail "no backup over the same socket after kill -9"
nbdinfo "nbd://127.0.0.1:$P/disk" >/dev/null || fail "the TCP listener does not serve after kill -9"
"$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null

# a planned restart: the same again
"$FLEECEFS" restart "$T/mnt" >/dev/null
wait_restarts "$T/mnt" 2
[ "$(stat -c %i "$S")" = "$inode" ] || fail "the socket was bound again after restart"
"$FLEECEFS" setup "$T/mnt" --target t >/dev/null
nbdinfo "$U" >/dev/null || fail "the export does not answer after a planned restart"
"$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null

"$FLEECEFS" unmount "$T/mnt"
[ ! -e "$S" ] || fail "the socket is left after unmount"
echo "nbd_keeper: ok"

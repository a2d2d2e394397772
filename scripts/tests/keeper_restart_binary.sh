#!/usr/bin/env bash
# restart --binary and what the keeper runs:
#   - a relative path, a binary owned by another user, one writable by others, and one in
#     a directory another user can write are refused with one line, and nothing restarts;
#   - the keeper runs the file it verified: replacing the path afterwards (a rename over
#     it) does not change what the next worker runs after a kill -9;
#   - a new binary whose worker never serves is killed after the start bound, one whose
#     worker exits 0 before serving does not end the mount: the keeper goes back to the
#     binary that served, `restart` says so with the reason and exits non-zero, and a
#     writer waits no longer than the bound.
source "$(dirname "$0")/lib.sh"
other_user
head -c $((4 << 20)) /dev/urandom >"$T/a.img"
fmount "$T/m" --state-dir "$T/s" --device a="$T/a.img"
worker() { status_json "$T/m" 'd["worker_pid"]'; }
restarts() { status_json "$T/m" 'd["worker_restarts"]'; }

# --- refused binaries -------------------------------------------------------------------
mkdir -m 0755 "$T/bin"
cp "$FLEECEFS" "$T/bin/fleecefs"
chmod 0755 "$T/bin/fleecefs"
w0=$(worker)
(cd "$T/bin" && expect_fail_with "is not an absolute path" "$FLEECEFS" restart "$T/m" --binary fleecefs)
cp "$FLEECEFS" "$T/bin/user-owned" && chown "$U" "$T/bin/user-owned"
expect_fail_with "is owned by uid $UID_U, not root" "$FLEECEFS" restart "$T/m" --binary "$T/bin/user-owned"
cp "$FLEECEFS" "$T/bin/world" && chmod 0777 "$T/bin/world"
expect_fail_with "is writable by every user" "$FLEECEFS" restart "$T/m" --binary "$T/bin/world"
mkdir -m 0775 "$T/groupdir" && chgrp "$U" "$T/groupdir" && cp "$FLEECEFS" "$T/groupdir/fleecefs"
expect_fail_with "is writable by its group" "$FLEECEFS" restart "$T/m" --binary "$T/groupdir/fleecefs"
for b in fleecefs user-owned world; do
    err=$("$FLEECEFS" restart "$T/m" --binary "$T/bin/$b" 2>&1 >/dev/null || true)
    [ "$b" = fleecefs ] && continue
    [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] || fail "not one line for $b: $err"
done
wait_restarts "$T/m" 1
[ "$(restarts)" = 1 ] || fail "a refused binary restarted the worker ($(restarts) restarts)"

# --- the verified file runs, not what the path names later ------------------------------
# The restart above ran $T/bin/fleecefs; now the path is renamed over by a fake.
cat >"$T/bin/fake" <<FAKE
#!/bin/sh
[ "\$1" = --version ] && { echo "fleecefs 0-fake"; exit 0; }
touch "$T/fake-ran"
exec sleep 600
FAKE
chmod 0755 "$T/bin/fake"
cp "$T/bin/fake" "$T/bin/swap" && mv "$T/bin/swap" "$T/bin/fleecefs"
w1=$(worker)
kill -9 "$w1"
wait_restarts "$T/m" 2
dd if=/dev/zero of="$T/m/live/a" bs=64K count=1 conv=notrunc,fsync status=none ||
    fail "live/a does not take writes after the kill"
[ ! -e "$T/fake-ran" ] || fail "the keeper ran the file that replaced the verified binary"

# --- a new binary that never serves, one that exits 0 before serving --------------------
cat >"$T/bin/exit0" <<'FAKE'
#!/bin/sh
[ "$1" = --version ] && { echo "fleecefs 0-fake"; exit 0; }
exit 0
FAKE
chmod 0755 "$T/bin/exit0"
rm -f "$T/fake-ran"
for fake in fake exit0; do
    before=$(restarts)
    # A writer during the restart: it waits while no worker serves, and no longer than the
    # start bound (5 s) plus the fallback worker's start.
    ( sleep 0.5; start=$(date +%s%N)
      dd if=/dev/zero of="$T/m/live/a" bs=64K count=1 conv=notrunc,fsync status=none
      echo $(( ($(date +%s%N) - start) / 1000000 )) >"$T/writer-ms" ) &
    wpid=$!
    expect_fail_with "restart fell back: the worker from $T/bin/$fake" \
        "$FLEECEFS" restart "$T/m" --binary "$T/bin/$fake"
    err=$("$FLEECEFS" status "$T/m" --json | python3 -c 'import json,sys; d=json.load(sys.stdin); f=d["last_restart"]["fallback"]; print(f["reason"], d["last_restart"]["binary"])')
    case "$fake:$err" in
    fake:"did not serve within 5 s $T/bin/fleecefs") ;;
    exit0:"exited with status 0 before serving $T/bin/fleecefs") ;;
    *) fail "$fake: fallback reason and binary: $err" ;;
    esac
    wait "$wpid" || fail "$fake: the writer failed"
    ms=$(cat "$T/writer-ms")
    [ "$ms" -lt 15000 ] || fail "$fake: the writer waited $ms ms"
    [ "$(restarts)" -ge $((before + 2)) ] || fail "$fake: no fallback worker"
    cmp -n 65536 /dev/zero "$T/m/live/a" || fail "$fake: live/a does not read back"
done
[ -e "$T/fake-ran" ] || fail "the hanging fake was never run (the test did not test it)"
"$FLEECEFS" unmount "$T/m"
echo "ok: refused binaries, the verified file runs after a rename over it, fallback from a binary that hangs or exits 0"

#!/usr/bin/env bash
# A worker started again serves what the mount served, whatever the paths name now:
#   - a mount started from a directory that was deleted since survives a worker kill
#     (workers start with cwd /);
#   - a source renamed and replaced by another file: the next worker serves the original
#     file (the keeper holds the sources open and hands them over), and writes land in it;
#   - a source deleted: still served from the keeper's open file;
#   - a device added later (opened by path again) whose source was replaced is refused,
#     and one whose source vanished is left out; neither takes the others away, and the
#     log says why.
source "$(dirname "$0")/lib.sh"
for d in a b c; do head -c $((4 << 20)) /dev/urandom >"$T/$d.img"; cp "$T/$d.img" "$T/$d.ref"; done
mkdir "$T/cwd"
(cd "$T/cwd" && fmount "$T/m" --state-dir "$T/s" --device a=../a.img --device b=../b.img \
    --device c="$T/c.img")
MOUNTS+=("$T/m")
rmdir "$T/cwd"
worker() { status_json "$T/m" 'd["worker_pid"]'; }
restarts() { status_json "$T/m" 'd["worker_restarts"]'; }
kill_worker() {  # kill -9 the worker and wait for the next one
    local n
    n=$(($(restarts) + 1))
    kill -9 "$(worker)"
    for _ in $(seq 400); do
        [ "$(restarts 2>/dev/null || echo -1)" -ge "$n" ] 2>/dev/null && return 0
        sleep 0.05
    done
    fail "no restart number $n (log: $(tail -5 "$T/s/fleecefs.log"))"
}
kill_worker
cmp "$T/m/live/b" "$T/b.ref" || fail "live/b after a kill, mount started from a deleted directory"

# c.img renamed away and a new file put in its place
mv "$T/c.img" "$T/c-old.img"
head -c $((4 << 20)) /dev/zero >"$T/c.img"
kill_worker
cmp "$T/m/live/c" "$T/c.ref" || fail "live/c is not the original file after its path was replaced"
head -c 65536 /dev/urandom >"$T/block"
dd if="$T/block" of="$T/m/live/c" bs=64K count=1 conv=notrunc,fsync status=none
cmp -n 65536 "$T/block" "$T/c-old.img" || fail "a write to live/c did not land in the original file"
cmp -s -n 65536 "$T/block" "$T/c.img" && fail "a write to live/c landed in the new file at its path"

# a.img deleted
rm "$T/a.img"
kill_worker
cmp "$T/m/live/a" "$T/a.ref" || fail "live/a is not served after its source was deleted"

# a device added later (not held by the keeper) whose source is renamed and replaced:
# the next worker opens it by path, sees another file and refuses it loudly
head -c $((4 << 20)) /dev/urandom >"$T/e.img"
"$FLEECEFS" device add "$T/m" e="$T/e.img" >/dev/null
mv "$T/e.img" "$T/e-old.img"
head -c $((4 << 20)) /dev/zero >"$T/e.img"
kill_worker
cmp -s "$T/m/live/e" "$T/e.img" && fail "live/e serves the file now at its path"
dd if="$T/block" of="$T/m/live/e" bs=64K count=1 conv=notrunc,fsync status=none 2>/dev/null &&
    fail "a write to live/e succeeded after its source was replaced"
cmp -s -n $((4 << 20)) "$T/e.img" /dev/zero || fail "a write to live/e landed in the new file at its path"
grep -q "device 'e' is not served: .*e.img is no longer the file this mount served" "$T/s/fleecefs.log" ||
    fail "the log does not say why device e is not served: $(tail -5 "$T/s/fleecefs.log")"
cmp "$T/m/live/b" "$T/b.ref" || fail "live/b is not served after device e's source was replaced"

# a device added later (not held by the keeper) whose source vanishes
head -c $((4 << 20)) /dev/urandom >"$T/d.img"
"$FLEECEFS" device add "$T/m" d="$T/d.img" >/dev/null
rm "$T/d.img"
kill_worker
cmp "$T/m/live/b" "$T/b.ref" || fail "live/b is not served after device d's source vanished"
grep -q "device 'd' is not served: .*d.img" "$T/s/fleecefs.log" ||
    fail "the log does not say why device d is not served: $(tail -5 "$T/s/fleecefs.log")"
"$FLEECEFS" unmount "$T/m"
echo "ok: worker kills after the mount's directory was deleted, a source replaced, a source deleted, an added source replaced, an added source vanished"

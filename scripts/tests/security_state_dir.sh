#!/usr/bin/env bash
# The root daemon never acts through a path an unprivileged user controls: a state or
# fleecing directory (or one above it) that a user owns or may write is refused with its
# path and why; symlinks planted in the state directory (lock, log, bitmaps/, fleecing/,
# a temp file) are never followed; an access record naming another file does not delete
# it; a client refuses a control socket in a directory a user could write; under
# `umask 000` every directory is 0700 and every file 0600; a pre-existing log is narrowed
# to 0600.
source "$(dirname "$0")/lib.sh"

other_user
chmod 755 "$T" # the user must reach its directories below

head -c $((4 << 20)) /dev/urandom >"$T/src.img"
mkdir "$T/m1" "$T/m2" "$T/m5"
echo precious >"$T/victim"
victim_intact() { [ "$(cat "$T/victim" 2>/dev/null)" = precious ] || fail "$1: the victim file was changed or removed"; }

# 1. A state directory a user made (under a sticky /tmp-like dir), with the issue's plants:
# a symlinked lock, a log symlink and an access record naming the victim.
mkdir -m 1777 "$T/pub"
as_user mkdir "$T/pub/st"
as_user ln -s "$T/victim" "$T/pub/st/fleecefs.lock"
as_user ln -s "$T/victim" "$T/pub/st/fleecefs.log"
printf '{"target":"t","started_at":1,"devices":[["disk","%s"]]}' "$T/victim" >"$T/acc.json"
as_user cp "$T/acc.json" "$T/pub/st/access.json"
expect_fail_with "owned by uid $UID_U" "$FLEECEFS" mount "$T/m1" --state-dir "$T/pub/st" --device disk="$T/src.img"
expect_fail_with "$T/pub/st" "$FLEECEFS" mount "$T/m1" --state-dir "$T/pub/st" --device disk="$T/src.img"
victim_intact "user-owned state dir"
# ... and one of root's below a directory the user owns, or that its group may write
as_user mkdir "$T/pub/upar"
mkdir "$T/pub/upar/st"
expect_fail_with "not safe: $T/pub/upar is owned by uid $UID_U" \
    "$FLEECEFS" mount "$T/m1" --state-dir "$T/pub/upar/st" --device disk="$T/src.img"
# ... and a user's symlink (in the sticky dir) to a directory of root's
mkdir -m 700 "$T/rootst"
as_user ln -s "$T/rootst" "$T/pub/link"
expect_fail_with "$T/pub/link is a symlink owned by uid $UID_U" \
    "$FLEECEFS" mount "$T/m1" --state-dir "$T/pub/link" --device disk="$T/src.img"
[ -z "$(ls -A "$T/rootst")" ] || fail "files were made through a user's symlink to the state dir"
mkdir -m 770 "$T/grp"
expect_fail_with "writable by its group" "$FLEECEFS" mount "$T/m1" --state-dir "$T/grp" --device disk="$T/src.img"
[ ! -e "$T/grp/fleecefs.lock" ] || fail "a refused state dir got a lock file"

# 2. Root's own state directory with planted symlinks (what a user could plant in one it
# could write): none is followed.
mkdir -m 700 "$T/st"
ln -s "$T/victim" "$T/st/fleecefs.lock"
expect_fail_with "symlink" "$FLEECEFS" mount "$T/m2" --state-dir "$T/st" --device disk="$T/src.img"
victim_intact "symlinked lock"
rm "$T/st/fleecefs.lock"
mkdir -m 700 "$T/rootonly"
ln -s "$T/rootonly" "$T/st/bitmaps"
expect_fail_with "$T/st/bitmaps is a symlink" "$FLEECEFS" mount "$T/m2" --state-dir "$T/st" --device disk="$T/src.img"
rm "$T/st/bitmaps"
ln -s "$T/rootonly" "$T/st/fleecing"
expect_fail_with "$T/st/fleecing is a symlink" "$FLEECEFS" mount "$T/m2" --state-dir "$T/st" --device disk="$T/src.img"
rm "$T/st/fleecing"
[ -z "$(ls -A "$T/rootonly")" ] || fail "files were created through a symlink: $(ls "$T/rootonly")"
# the log and an access record naming the victim: the mount serves, neither is touched
ln -s "$T/victim" "$T/st/fleecefs.log"
cp "$T/acc.json" "$T/st/access.json"
fmount "$T/m2" --state-dir "$T/st" --device disk="$T/src.img" 2>"$T/m2.err"
victim_intact "log symlink / access record"
[ -L "$T/st/fleecefs.log" ] || fail "the log symlink was replaced"
"$FLEECEFS" unmount "$T/m2"
rm "$T/st/fleecefs.log"

# 3. umask 000: directories 0700, files 0600; a temp file planted as a symlink in
# bitmaps/ is replaced, not written through. A log that exists 0644 becomes 0600.
echo "old line" >"$T/st/fleecefs.log"
chmod 644 "$T/st/fleecefs.log"
umask 000
fmount "$T/m3" --state-dir "$T/st" --device disk="$T/src.img"
umask 022
"$FLEECEFS" setup "$T/m3" --target t1 --bitmap b >/dev/null
"$FLEECEFS" teardown "$T/m3" --target t1 --success >/dev/null
for d in "$T/st" "$T/st/bitmaps" "$T/st/fleecing"; do
    [ "$(stat -c %a "$d")" = 700 ] || fail "$d is mode $(stat -c %a "$d") under umask 000, not 700"
done
for f in "$T"/st/*.json "$T"/st/bitmaps/* "$T/st/fleecefs.log" "$T/st/fleecefs.lock"; do
    m=$(stat -c %a "$f" 2>/dev/null) || continue # removed meanwhile
    [ "$m" = 600 ] || fail "$f is mode $(stat -c %a "$f") under umask 000, not 600"
done
[ "$(stat -c %a "$T/st/control.sock")" = 600 ] || fail "control.sock is not 0600"
ln -s "$T/victim" "$T/st/bitmaps/registry.tmp"
"$FLEECEFS" setup "$T/m3" --target t2 --bitmap b >/dev/null
"$FLEECEFS" teardown "$T/m3" --target t2 --success >/dev/null
victim_intact "registry.tmp symlink"

# 4. A state directory a user can write since the mount: the client refuses to talk to
# a control.sock the user replaced (it would answer root's teardown --success).
chown "$U" "$T/st"
mv "$T/st/control.sock" "$T/real.sock"
as_user /usr/bin/python3 - "$T/st/control.sock" "$T/pub/answered" <<'PY' &
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o777)
s.listen(4)
s.settimeout(8)
try:
    c, _ = s.accept()
    open(sys.argv[2], "w").write("yes")
    c.recv(4096)
    c.sendall(b'{"ok":true,"data":{}}\n')
    c.close()
except socket.timeout:
    pass
PY
FAKE=$!
for _ in $(seq 100); do [ -S "$T/st/control.sock" ] && break; sleep 0.05; done
expect_fail_with "owned by uid $UID_U" "$FLEECEFS" teardown "$T/m3" --target t3 --success
expect_fail_with "$T/st is not safe: it is owned by uid $UID_U" "$FLEECEFS" status "$T/m3"
kill "$FAKE" 2>/dev/null || true
wait "$FAKE" 2>/dev/null || true
[ ! -e "$T/pub/answered" ] || fail "a root command talked to a user's control socket"
rm -f "$T/st/control.sock"
mv "$T/real.sock" "$T/st/control.sock"
chown root "$T/st"
"$FLEECEFS" status "$T/m3" >/dev/null || fail "status after the state dir is root's again"

# 5. --fleecing-dir: world-writable (a user could take DEVICE.TARGET.fleece first) or a
# user's is refused at mount; one that becomes world-writable later is refused at setup.
mkdir -m 1777 "$T/flpub"
expect_fail_with "--fleecing-dir $T/flpub is not safe: it is writable by every user" \
    "$FLEECEFS" mount "$T/m5" --state-dir "$T/st5" --fleecing-dir "$T/flpub" --device disk="$T/src.img"
as_user mkdir "$T/pub/fl"
expect_fail_with "owned by uid $UID_U" \
    "$FLEECEFS" mount "$T/m5" --state-dir "$T/st5" --fleecing-dir "$T/pub/fl" --device disk="$T/src.img"
mkdir -m 700 "$T/fl"
"$FLEECEFS" unmount "$T/m3"
fmount "$T/m5" --state-dir "$T/st5" --fleecing-dir "$T/fl" --device disk="$T/src.img"
chmod 1777 "$T/fl"
as_user touch "$T/fl/disk.t5.fleece"
expect_fail_with "writable by every user" "$FLEECEFS" setup "$T/m5" --target t5
chmod 700 "$T/fl"
rm "$T/fl/disk.t5.fleece"
"$FLEECEFS" setup "$T/m5" --target t5 >/dev/null
"$FLEECEFS" teardown "$T/m5" --target t5 --failure >/dev/null
echo "security_state_dir: ok"

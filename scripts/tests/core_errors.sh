#!/usr/bin/env bash
# Every bad CLI input fails with a non-zero exit and a one-line message on stderr, and
# leaves nothing new mounted or changed. --version and every command's --help work, and
# each command's --help shows an example.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
head -c $((4 * M)) /dev/urandom >"$T/a.img"
head -c $((4 * M)) /dev/urandom >"$T/b.img"
mkdir -p "$T/mp" "$T/mp2" "$T/dir" "$T/full"
echo keep >"$T/full/file"
nmounts() { grep -c " $T/" /proc/mounts || true; }

# bad CMD... : CMD exits non-zero (1 unless $RC says otherwise) with exactly one stderr
# line containing each of the words in $WANT (|-separated), and no mount appears
bad() {
    local before rc=0 want=${RC:-1} w
    before=$(nmounts)
    "$@" >"$T/out" 2>"$T/err" || rc=$?
    [ "$rc" = "$want" ] || fail "exit $rc (want $want) from: $* ; stderr: $(cat "$T/err")"
    [ "$(wc -l <"$T/err")" = 1 ] || fail "stderr of '$*' is not one line: $(cat "$T/err")"
    IFS='|' read -ra words <<<"${WANT:-}"
    for w in "${words[@]}"; do
        grep -qF -- "$w" "$T/err" || fail "stderr of '$*' does not mention '$w': $(cat "$T/err")"
    done
    [ "$(nmounts)" = "$before" ] || fail "'$*' left a new mount: $(grep " $T/" /proc/mounts)"
}

# mount errors
WANT="missing.img" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device d=$T/missing.img
WANT="$T/dir" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device d=$T/dir
WANT="a/b" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device a/b=$T/a.img
WANT=".a|invalid device name" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device .a=$T/a.img
WANT="invalid device name" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device "$(printf 'x%.0s' $(seq 65))=$T/a.img"
WANT="NAME=PATH" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device "$T/a.img"
WANT="'d'" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device d=$T/a.img --device d=$T/b.img
WANT="$T/full|empty" bad "$FLEECEFS" mount "$T/full" --state-dir "$T/st" --device d=$T/a.img
[ "$(cat "$T/full/file")" = keep ] || fail "the non-empty mount point was changed"
WANT="$T/nomp|does not exist" bad "$FLEECEFS" mount "$T/nomp" --state-dir "$T/st" --device d=$T/a.img
[ ! -e "$T/nomp" ] || fail "a missing mount point was created"
WANT="3000" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device d=$T/a.img --cluster-size 3000
WANT="cluster" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device d=$T/a.img --cluster-size 128M
WANT="--cluster-size" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device d=$T/a.img --cluster-size 1X
WANT="--cbw-buffer|5G" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device d=$T/a.img --cbw-buffer 5G
WANT="--cbw-buffer|one cluster" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device d=$T/a.img --cbw-buffer 32K
WANT="--cbw-buffer|lots" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device d=$T/a.img --cbw-buffer lots
WANT="cluster" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device d=$T/a.img --cluster-size 2K
WANT="--cbw-timeout|too short" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device d=$T/a.img --cbw-timeout 1e-12
WANT="--cbw-timeout -1|out of range" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device d=$T/a.img --cbw-timeout -1
WANT="'-1'|--threads" RC=2 bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device d=$T/a.img --threads -1
WANT="d.dirty" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device d=$T/a.img --device d.dirty=$T/b.img
# the same file twice, through a symlink or a hard link
ln -s "$T/a.img" "$T/a.link"
ln "$T/a.img" "$T/a.hard"
WANT="$T/a.link|given twice" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device d=$T/a.img --device e=$T/a.link
WANT="$T/a.hard|given twice" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --device d=$T/a.img --device e=$T/a.hard
# state and fleecing directories: world-writable state dir, fleecing dir missing or a file,
# either inside the mount point through a symlink or '..'
mkdir -p "$T/open" && chmod 1777 "$T/open"
WANT="$T/open|every user" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/open" --device d=$T/a.img
[ "$(stat -c %a "$T/open")" = 1777 ] || fail "a refused mount changed the mode of the state dir"
WANT="$T/nofl" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --fleecing-dir "$T/nofl" --device d=$T/a.img
[ ! -e "$T/nofl" ] || fail "a missing fleecing dir was created"
WANT="$T/a.img|not a directory" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st" --fleecing-dir "$T/a.img" --device d=$T/a.img
ln -s "$T/mp" "$T/mp.link"
WANT="inside the mount point" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/mp.link/st" --device d=$T/a.img
WANT="inside the mount point" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/dir/../mp/st" --device d=$T/a.img
# no command
WANT="needs a command|mount, setup" RC=2 bad "$FLEECEFS"
WANT="needs a command|remove" RC=2 bad "$FLEECEFS" bitmap
WANT="fleecefs bitmap remove --help" RC=2 bad "$FLEECEFS" bitmap remove "$T/mp"
[ -z "$(ls -A "$T/mp")" ] || fail "failed mounts left files in the mount point"
[ ! -e "$T/st" ] || fail "failed mounts created the state dir: $(ls -A "$T/st")"
daemons() { pgrep -f -- "(mount|worker) $T/" | wc -l; }
[ "$(daemons)" = 0 ] || fail "failed mounts left processes: $(pgrep -af -- "(mount|worker) $T/")"

# a working mount, then a second daemon on its state dir
fmount "$T/mp" --state-dir "$T/st" --device d=$T/a.img --device e=$T/b.img
pid=$(status_json "$T/mp" 'd["pid"]')
head -c $((4 * M)) /dev/urandom >"$T/c.img"
lock_before=$(cat "$T/st/fleecefs.lock")
WANT="$T/st|$pid|in use" bad "$FLEECEFS" mount "$T/mp2" --state-dir "$T/st" --device d=$T/c.img
[ "$(cat "$T/st/fleecefs.lock")" = "$lock_before" ] || fail "a refused second daemon changed the lock file"
# the sources are locked while served: a second daemon on another state dir is refused
# (two writers would defeat copy-before-write), and so is QEMU writing the image
WANT="$T/a.img|in use" bad "$FLEECEFS" mount "$T/mp2" --state-dir "$T/st2" --device d=$T/a.img
WANT="$T/a.link|in use" bad "$FLEECEFS" mount "$T/mp2" --state-dir "$T/st2" --device c=$T/c.img --device d=$T/a.link
[ ! -e "$T/st2" ] || fail "a refused mount created its state dir"
if command -v qemu-io >/dev/null; then
    rc=0
    qemu-io -f raw -c 'write 0 4k' "$T/a.img" >"$T/qemu.out" 2>&1 || rc=$?
    [ "$rc" != 0 ] && grep -qi "lock" "$T/qemu.out" || fail "qemu-io wrote a served source: $(cat "$T/qemu.out")"
fi
[ "$(status_json "$T/mp" 'd["pid"]')" = "$pid" ] || fail "the first daemon is gone after a second mount attempt"
[ "$(daemons)" = 2 ] || fail "daemons (a keeper and its worker) after a refused second mount: $(pgrep -af -- "(mount|worker) $T/")"
# mounting on top of a busy fleecefs mount point is refused too
WANT="$T/mp|already a fleecefs mount" bad "$FLEECEFS" mount "$T/mp" --state-dir "$T/st2" --device d=$T/c.img

# setup / teardown / status errors
no_access() { [ "$(status_json "$T/mp" 'd["access"]')" = None ] || fail "$1 left a backup access"; }
WANT="t1" bad "$FLEECEFS" teardown "$T/mp" --target t1 --failure
no_access "teardown without an access"
WANT="unknown device 'x'" bad "$FLEECEFS" setup "$T/mp" --target t --devices x
no_access "setup with an unknown device"
WANT="'x'" bad "$FLEECEFS" setup "$T/mp" --target t --devices d,x
no_access "setup with one unknown device of two"
WANT="'d'" bad "$FLEECEFS" setup "$T/mp" --target t --devices d,d
no_access "setup naming a device twice"
for tg in a/b ../../x .hidden ""; do
    WANT="'$tg'" bad "$FLEECEFS" setup "$T/mp" --target "$tg"
    no_access "setup with target '$tg'"
done
[ -z "$(ls -A "$T/mp/snapshot")" ] || fail "snapshot/ is not empty after a failed setup"
[ -z "$(find "$T/st" -name '*.fleece')" ] || fail "a failed setup left fleecing files"
"$FLEECEFS" setup "$T/mp" --target first >/dev/null || fail "setup failed"
WANT="first" bad "$FLEECEFS" setup "$T/mp" --target second
WANT="first" bad "$FLEECEFS" setup "$T/mp" --target first
[ "$(status_json "$T/mp" 'd["access"]["target"]')" = first ] || fail "a refused setup changed the access"
[ "$(ls "$T/st/fleecing" | sort | tr '\n' ' ')" = "d.first.fleece e.first.fleece " ] ||
    fail "fleecing files after a refused setup: $(ls "$T/st/fleecing")"
WANT="'zz'" bad "$FLEECEFS" teardown "$T/mp" --target zz --success
[ "$(status_json "$T/mp" 'd["access"]["target"]')" = first ] || fail "a failed teardown ended the access"
# a usage error: exit 2 and one line naming the missing flags
rc=0
"$FLEECEFS" teardown "$T/mp" --target first >/dev/null 2>"$T/err" || rc=$?
[ "$rc" = 2 ] || fail "teardown without --success/--failure exits $rc, want 2: $(cat "$T/err")"
[ "$(wc -l <"$T/err")" = 1 ] && grep -q -- "^fleecefs: error: .*--success|--failure" "$T/err" ||
    fail "teardown usage error does not name --success|--failure: $(cat "$T/err")"
[ "$(status_json "$T/mp" 'd["access"]["target"]')" = first ] || fail "a teardown usage error ended the access"
[ -e "$T/mp/snapshot/d" ] || fail "snapshot/d is gone after failed teardowns"
WANT="$T/dir|not a fleecefs mount" bad "$FLEECEFS" status "$T/dir"
WANT="$T/dir" bad "$FLEECEFS" setup "$T/dir" --target t
WANT="$T/dir" bad "$FLEECEFS" teardown "$T/dir" --target t --success
WANT="$T/dir" bad "$FLEECEFS" unmount "$T/dir"
WANT="$T/nomp" bad "$FLEECEFS" status "$T/nomp"
"$FLEECEFS" teardown "$T/mp" --target first --failure >/dev/null || fail "teardown failed"
no_access "teardown"

# --version and --help with an example line for every command (leaves of the command tree)
"$FLEECEFS" --version | grep -qE '^fleecefs [0-9]+\.[0-9]+\.[0-9]+' || fail "--version: $("$FLEECEFS" --version)"
commands() { "$FLEECEFS" "$@" --help | sed -n '/^Commands:/,/^$/p' | awk 'NR > 1 && $1 != "help" && NF {print $1}'; }
n=0
for c in $(commands); do
    subs=$(commands "$c")
    for s in ${subs:--}; do
        args=("$c")
        [ "$s" = - ] || args+=("$s")
        "$FLEECEFS" "${args[@]}" --help >"$T/help" 2>&1 || fail "fleecefs ${args[*]} --help failed"
        grep -q "^Example" "$T/help" || fail "fleecefs ${args[*]} --help has no example"
        grep -q "^  fleecefs ${args[*]} " "$T/help" || fail "fleecefs ${args[*]} --help has no example line"
        n=$((n + 1))
    done
done
for c in mount setup teardown status unmount; do
    "$FLEECEFS" "$c" --help | grep -q "^  fleecefs $c " || fail "fleecefs $c --help has no example line"
done
[ "$n" -ge 5 ] || fail "only $n commands found in fleecefs --help"
echo "ok: bad inputs give one-line errors and change nothing; --version and $n commands' --help with examples"

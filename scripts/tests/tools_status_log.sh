#!/usr/bin/env bash
# What a user sees of a mount and its history. `mount` and `unmount` print one line each;
# `status` shows the options the mount was made with (text and --json); `findmnt -t
# fuse.fleecefs` lists the mount; the log (STATE_DIR/fleecefs.log) holds, at the default
# level, every setup, every teardown with its outcome, and each copy and restore result
# (success and failure), in the line format docs/formats.md spells, with warnings spelled
# "warning" there and on the terminal. Sizes and rates in the output are binary (K/M/G,
# M/s), as docs/usage.md says.
source "$(dirname "$0")/lib.sh"

DOCS=$(cd "$(dirname "$0")/../../docs" && pwd)
M=$((1 << 20))
head -c $((4 * M)) /dev/urandom >"$T/d.img"
mkdir -p "$T/mnt"
MOUNTS+=("$T/mnt")
out=$("$FLEECEFS" mount "$T/mnt" --state-dir "$T/state" --device d="$T/d.img" \
    --backup-priority low --backup-share auto --fleecing-limit 1G --crash-safe-bitmaps sync)
[ "$(printf '%s\n' "$out" | wc -l)" = 1 ] || fail "mount printed more than one line: $out"
[ "$out" = "mounted $T/mnt: 1 device(s): d (log $T/state/fleecefs.log)" ] || fail "mount printed: $out"
LOG=$T/state/fleecefs.log

# findmnt, as the README says
# (-P: one KEY="VALUE" line per mount, so other mounts' longer names cannot change the
# column widths this line is matched with)
findmnt -t fuse.fleecefs -n -P -o TARGET,SOURCE | grep -qxF "TARGET=\"$T/mnt\" SOURCE=\"fleecefs:$T/state\"" ||
    fail "findmnt -t fuse.fleecefs does not list the mount: $(findmnt -t fuse.fleecefs -n -P -o TARGET,SOURCE)"

# status: options
st=$("$FLEECEFS" status "$T/mnt")
want="options: cluster size 64K, backup priority low, backup share auto, backup read cached, fleecing limit 1G, crash-safe bitmaps sync, on cbw error break-snapshot, cbw timeout 45s, cbw buffer 16M"
printf '%s\n' "$st" | grep -qxF "$want" || fail "status does not show the options: $st"
[ "$(status_json "$T/mnt" '(lambda o: (o["backup_priority"], o["backup_share"], o["backup_read"], o["fleecing_limit"], o["cluster_size"], o["crash_safe_bitmaps"]))(d["options"])')" = \
    "('low', 'auto', 'cached', 1073741824, 65536, 'sync')" ] || fail "status --json options: $(status_json "$T/mnt" 'd["options"]')"

# a full backup with a copy, a failed copy, a failed backup, a restore
"$FLEECEFS" setup "$T/mnt" --target night --bitmap night >/dev/null
summary=$("$FLEECEFS" copy "$T/mnt" d "$T/full.img" --verify 2>/dev/null) || fail "copy failed"
case "$summary" in
*"/s)"*) ;;
*) fail "no rate in the copy summary: $summary" ;;
esac
printf '%s\n' "$summary" | grep -Eq '\(([0-9]+|[0-9]+\.[0-9][KMGT])/s\)' || fail "the copy's rate is not binary (K/M/G per second): $summary"
printf '%s\n' "$summary" | grep -q 'MB/s' && fail "the copy's rate is in decimal MB/s: $summary"
"$FLEECEFS" copy "$T/mnt" d "$T/full.img" >/dev/null 2>&1 && fail "a copy onto an existing file succeeded"
"$FLEECEFS" teardown "$T/mnt" --target night --success >/dev/null
"$FLEECEFS" setup "$T/mnt" --target night --bitmap night >/dev/null
"$FLEECEFS" teardown "$T/mnt" --target night --failure >/dev/null
"$FLEECEFS" restore "$T/mnt" d "$T/full.img" >/dev/null 2>&1 || fail "restore failed"
# a warning reads "warning" on the terminal (as every other warning line) and in the log
err=$("$FLEECEFS" setup "$T/mnt" --target late --freeze-cmd false --thaw-cmd true --freeze-optional 2>&1 >/dev/null) ||
    fail "setup with an optional failing freeze failed"
case "$err" in
"fleecefs: warning: the freeze command 'false' failed"*) ;;
*) fail "the warning of an optional failed freeze reads: $err" ;;
esac
out=$("$FLEECEFS" unmount "$T/mnt")   # with the access active: a warning in the log
[ "$out" = "unmounted $T/mnt" ] || fail "unmount printed: $out"

# the log, at the default level
has() { grep -qE "$1" "$LOG" || fail "not in the log: $2; the log: $(cat "$LOG")"; }
ts='^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z'
has "$ts fleecefs\[[0-9]+\] info: backup access for target 'night' set up on d \(new\)" "the first setup"
has "$ts fleecefs\[[0-9]+\] info: backup access for target 'night' torn down: success on d$" "the successful teardown"
has "$ts fleecefs\[[0-9]+\] info: backup access for target 'night' set up on d \(used\)" "the second setup"
has "$ts fleecefs\[[0-9]+\] info: backup access for target 'night' torn down: failure on d, as requested" "the failed teardown"
has "$ts fleecefs-copy\[[0-9]+\] info: full copy of d to $T/full.img: 4M in 1 range\(s\)" "the copy's summary"
has "$ts fleecefs-copy\[[0-9]+\] error: copy of d to $T/full.img failed: " "the failed copy"
has "$ts fleecefs\[[0-9]+\] warning: shutting down: backup access for target 'late' is torn down as a failure" "the shutdown's warning"
has "$ts fleecefs-restore\[[0-9]+\] info: restored $T/full.img \(raw\) onto d: " "the restore"
# every line has the documented shape; the documented example has it too
bad=$(grep -Ev "$ts fleecefs(-setup|-copy|-restore)?\[[0-9]+\] (error|warning|info|debug|trace): " "$LOG" || true)
[ -z "$bad" ] || fail "log lines not in the documented format: $bad"
example=$(grep -o '`[0-9]\{4\}-[0-9-]*T[0-9:]*Z fleecefs\[[0-9]*\] [a-z]*: [^`]*`' "$DOCS/formats.md" | head -1 | tr -d '`')
[ -n "$example" ] || fail "docs/formats.md has no example log line"
printf '%s\n' "$example" | grep -Eq "$ts fleecefs\[[0-9]+\] info: backup access for target '[a-z]+' set up on [a-z0-9]+ \([a-z-]+\)$" ||
    fail "the log line docs/formats.md shows is not what the daemon writes: $example"
# a broken access fails every snapshot read: that does not fill the log (one line per
# request would), the break itself is there
truncate -s $((4 * M)) "$T/e.img"
fmount "$T/mnt2" --state-dir "$T/state2" --device e="$T/e.img" --fleecing-limit 128K >/dev/null
"$FLEECEFS" setup "$T/mnt2" --target b >/dev/null
dd if=/dev/urandom of="$T/mnt2/live/e" bs=64K count=8 conv=notrunc status=none   # past the limit
[ "$(status_json "$T/mnt2" 'd["access"]["broken"]')" = True ] || fail "the access did not break"
for _ in $(seq 50); do dd if="$T/mnt2/snapshot/e" of=/dev/null bs=4K count=1 iflag=direct status=none 2>/dev/null && fail "a broken snapshot was read"; done
"$FLEECEFS" teardown "$T/mnt2" --target b --failure >/dev/null 2>&1 || true
"$FLEECEFS" unmount "$T/mnt2" >/dev/null
[ "$(grep -c "request failed" "$T/state2/fleecefs.log")" = 0 ] || fail "failed snapshot reads fill the log: $(grep -c "request failed" "$T/state2/fleecefs.log") lines"
echo "ok: mount/unmount one line, status options, findmnt, log of setups, teardowns, copies, restore"

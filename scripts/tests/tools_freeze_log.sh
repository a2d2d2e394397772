#!/usr/bin/env bash
# The freeze and thaw commands' output reaches the daemon's log file before `fleecefs
# setup` exits, every time: 20 setups in a row, each with a freeze and a thaw command
# that print a line of their own, on stdout and on stderr; after each setup returns both
# commands' lines (and their "succeeded" lines after them) are in the log.
source "$(dirname "$0")/lib.sh"

truncate -s 4M "$T/d.img"
fmount "$T/mnt" --state-dir "$T/state" --device d="$T/d.img"
LOG=$T/state/fleecefs.log
missing=()
for i in $(seq 20); do
    "$FLEECEFS" setup "$T/mnt" --target t \
        --freeze-cmd "echo freeze-out-$i" \
        --thaw-cmd "sh -c 'echo thaw-out-$i; echo thaw-err-$i >&2'" >/dev/null ||
        fail "setup $i with hooks failed"
    for want in "freeze command: freeze-out-$i" "thaw command: thaw-out-$i" "thaw command: thaw-err-$i"; do
        grep -qF "$want" "$LOG" || missing+=("run $i: '$want'")
    done
    # the output comes before the command's end
    out=$(grep -nF "thaw command: thaw-out-$i" "$LOG" | head -1 | cut -d: -f1 || true)
    end=$(grep -nF "thaw command 'sh -c echo thaw-out-$i; echo thaw-err-$i >&2' succeeded" "$LOG" | head -1 | cut -d: -f1 || true)
    [ -n "$end" ] || missing+=("run $i: the thaw's 'succeeded' line")
    [ -z "$out" ] || [ -z "$end" ] || [ "$out" -lt "$end" ] || missing+=("run $i: thaw output after its 'succeeded' line")
    "$FLEECEFS" teardown "$T/mnt" --target t --success >/dev/null
done
[ ${#missing[@]} = 0 ] || fail "not in the log when setup returned (${#missing[@]}): ${missing[*]}"
echo "ok: freeze and thaw output in the log after each of 20 setups"

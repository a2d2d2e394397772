#!/usr/bin/env bash
# A worker death (kill -9) or `restart --force` during an incremental backup access keeps
# the target's bitmap: the access comes back broken, and after its teardown the next
# setup is `used`, its dirty map covering every write before the access and during it
# (before and after the death). In every --crash-safe-bitmaps mode; `off` keeps nothing
# across a death (the bitmap lives in memory), so there the next setup is `invalid`
# (a full backup, said so), never `new`.
source "$(dirname "$0")/lib.sh"
K=$((1 << 10))
CL=$((64 * K))
head -c $((4 << 20)) /dev/urandom >"$T/src.img"
field() { status_json "$T/m" "$1"; }
# write CLUSTER : writes one cluster of random data at CLUSTER of live/d
write() { dd if=/dev/urandom of="$T/m/live/d" bs=$CL count=1 seek="$1" conv=notrunc,fsync status=none; }
# covered CLUSTER : whether the dirty map of the access includes CLUSTER
covered() {
    python3 - "$T/m/snapshot/d.dirty" "$(($1 * CL))" <<'EOF'
import sys
off = int(sys.argv[2])
for line in open(sys.argv[1]):
    o, n = map(int, line.split())
    if o <= off < o + n:
        sys.exit(0)
sys.exit(1)
EOF
}
setup_action() {  # setup_action : sets target t up with bitmap b, prints its bitmap_action
    "$FLEECEFS" setup "$T/m" --target t --bitmap b --json >"$T/setup.json"
    js "$T/setup.json" 'd["devices"][0]["bitmap_action"]'
}

for mode in on sync off; do
    for how in kill restart; do
        what="--crash-safe-bitmaps $mode, $how"
        rm -rf "$T/s"
        fmount "$T/m" --state-dir "$T/s" --device d="$T/src.img" --crash-safe-bitmaps "$mode"
        a=$(setup_action)
        [ "$a" = new ] || fail "$what: first setup is '$a', not new"
        "$FLEECEFS" teardown "$T/m" --target t --success >/dev/null
        write 3                                   # before the access
        a=$(setup_action)
        [ "$a" = used ] || fail "$what: second setup is '$a', not used"
        covered 3 || fail "$what: the dirty map of the second setup misses cluster 3"
        write 20                                  # during the access, before the death
        restarts=$(field 'd["worker_restarts"]')
        if [ "$how" = kill ]; then
            kill -9 "$(field 'd["worker_pid"]')"
            wait_restarts "$T/m" $((restarts + 1))
        else
            "$FLEECEFS" restart "$T/m" --force >/dev/null
        fi
        [ "$(field 'd["access"]["broken_reason"]')" = "daemon restarted" ] ||
            fail "$what: the access did not come back broken: $(field 'd["access"]')"
        [ "$(field '[b["name"] for b in d["bitmaps"]]')" = "['b']" ] ||
            fail "$what: the bitmap is gone right after the restart: $(field 'd["bitmaps"]')"
        write 40                                  # during the access, after the death
        "$FLEECEFS" teardown "$T/m" --target t --failure >/dev/null
        write 50                                  # after the access
        a=$(setup_action)
        if [ "$mode" = off ] && [ "$how" = kill ]; then
            [ "$a" = invalid ] || fail "$what: setup after the death is '$a', not invalid"
        else
            [ "$a" = used ] || fail "$what: setup after the broken access is '$a', not used"
            for c in 3 20 40 50; do
                covered $c || fail "$what: the dirty map misses cluster $c: $(cat "$T/m/snapshot/d.dirty")"
            done
            ! covered 10 || fail "$what: the dirty map covers cluster 10, never written: $(cat "$T/m/snapshot/d.dirty")"
        fi
        "$FLEECEFS" teardown "$T/m" --target t --success >/dev/null
        "$FLEECEFS" unmount "$T/m"
    done
done
echo "keeper_bitmaps_survive: OK"

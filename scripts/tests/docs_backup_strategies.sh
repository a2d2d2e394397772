#!/usr/bin/env bash
# docs/backup-strategies.md, run as written: its sh blocks are taken from the file (found
# by what they contain), with /backup, /restore, /mnt/fleece, /var/lib/fleecefs and the
# image path moved into a temporary directory, `fleecefs` the binary under test and `date`
# answering the night being simulated. Strategy 1 (a raw image, full then incremental),
# strategy 2 (a qcow2 chain of four nights, restore of a point, then both retention
# examples in the order given, each remaining point checked with qemu-img convert, and a
# second backup on the same day next to the first), strategy 3's three freeze examples on
# ext4 filesystems (frozen, or unfrozen when the optional freeze is missing), and strategy
# 4's mount. An incremental snapshot refuses whole-file reads (EACCES), as the restic note
# says.
source "$(dirname "$0")/lib.sh"

DOC=$(cd "$(dirname "$0")/../.." && pwd)/docs/backup-strategies.md
M=$((1 << 20))
# block TEXT : the sh block of the doc that contains TEXT, paths moved under $T
block() {
    python3 - "$DOC" "$1" "$T" <<'PY'
import re, sys
doc, want, t = sys.argv[1], sys.argv[2], sys.argv[3]
found = []
for ind, body in re.findall(r'^( *)```sh\n(.*?)^\1```', open(doc).read(), flags=re.S | re.M):
    if want in body:
        found.append("\n".join(l[len(ind):] for l in body.splitlines()))
if len(found) != 1:
    sys.exit(f"{len(found)} sh blocks of {doc} contain {want!r}")
text = found[0]
for old, new in [("/var/lib/images/vm100.raw", t + "/vm100.img"), ("/var/lib/fleecefs", t + "/state4"), ("/srv/", t + "/srv/"),
                 ("/mnt/fleece", t + "/mnt4"), ("/backup", t + "/backup"), ("/restore", t + "/restore")]:
    text = text.replace(old, new)
print(text)
PY
}
fleecefs() { "$FLEECEFS" "$@"; }
# the night being simulated: NOW=YYYYMMDDTHHMM
date() {
    case "$*" in
    +%Y%m%dT%H%M) echo "$NOW" ;;
    +%Y%m%d) echo "${NOW%%T*}" ;;
    *) command date "$@" ;;
    esac
}
# run TEXT : runs doc lines in this shell (they set D and prev), stopping at the first error
run() {
    local rc=0
    (set -e; eval "$1") || rc=$?
    [ "$rc" = 0 ] || fail "the doc's commands failed (exit $rc):
$1"
}
# night N : writes to the image, then sets up the access (ref$N: the image at setup)
night() {
    dd if=/dev/urandom of="$T/mnt/live/vm100" bs=64K count=3 seek=$((RANDOM % 120)) conv=notrunc status=none
    dd if=/dev/urandom of="$T/mnt/live/vm100" bs=4K count=1 seek=$((RANDOM % 2000)) conv=notrunc status=none
    cp "$T/mnt/live/vm100" "$T/ref$1"
    "$FLEECEFS" setup "$T/mnt" --target nightly --bitmap nightly >/dev/null
}
teardown() { "$FLEECEFS" teardown "$T/mnt" --target nightly "--${1:-success}" >/dev/null; }
point_is() { # point_is IMAGE REF
    qemu-img convert -O raw "$1" "$T/point.raw" || fail "qemu-img convert of $1 failed"
    cmp "$T/point.raw" "$2" || fail "$1 does not read as $(basename "$2")"
}

head -c $((8 * M)) /dev/urandom >"$T/vm100.img"
fmount "$T/mnt" --state-dir "$T/state" --device vm100="$T/vm100.img" >/dev/null
M=$T/mnt

# strategy 1: one raw image
s1=$(block "vm100.raw --incremental")
first=$(printf '%s\n' "$s1" | grep -v -- "--incremental")
next=$(printf '%s\n' "$s1" | grep -- "--incremental")
night 1
run "$first"
teardown
cmp "$T/backup/vm100.raw" "$T/ref1" || fail "strategy 1: the full raw image differs"
night 2
# an incremental snapshot is readable only where dirty: whole-file readers fail
cat "$M/snapshot/vm100" >/dev/null 2>"$T/cat.err" && fail "an incremental snapshot read whole"
grep -q "Permission denied" "$T/cat.err" || fail "reading an incremental snapshot whole: $(cat "$T/cat.err")"
run "$next" 2>/dev/null
teardown
cmp "$T/backup/vm100.raw" "$T/ref2" || fail "strategy 1: the incremental raw image differs"

# strategy 2: a qcow2 chain, one file per night, starting with a full access
"$FLEECEFS" bitmap remove "$M" --target nightly >/dev/null
s2=$(block 'backing "$prev"')
full=$(printf '%s\n' "$s2" | sed '/every next night/,$d')
inc=$(printf '%s\n' "$s2" | sed -n '/every next night/,$p')
D=$T/backup/vm100
printf '%s\n' "$s2" | grep -qxF "D=$D" || fail "strategy 2 does not set D=/backup/vm100"
NOW=20261101T0100 night 1
NOW=20261101T0100 run "$full" 2>/dev/null
teardown
for n in 2 3 4; do
    night $n
    NOW=2026110${n}T0100 run "$inc" 2>/dev/null
    teardown
done
for n in 1 2 3 4; do
    point_is "$D/vm100.2026110${n}T0100.qcow2" "$T/ref$n"
done
# restore a point
run "$(block "qemu-img convert -O raw \$D")" 2>/dev/null
cmp "$T/restore/vm100.raw" "$T/ref3" || fail "the restored raw file is not the 1103 point"
cmp "$M/live/vm100" "$T/ref3" || fail "live/vm100 is not the 1103 point after fleecefs restore"
# retention, in the order of the doc
run "$(block "qemu-img commit")" >/dev/null
[ ! -e "$D/vm100.20261102T0100.qcow2" ] || fail "the committed overlay is still there"
point_is "$D/vm100.20261101T0100.qcow2" "$T/ref2"
point_is "$D/vm100.20261103T0100.qcow2" "$T/ref3"
point_is "$D/vm100.20261104T0100.qcow2" "$T/ref4"
run "$(block "qemu-img rebase -b")" >/dev/null
[ ! -e "$D/vm100.20261103T0100.qcow2" ] || fail "the dropped overlay is still there"
point_is "$D/vm100.20261101T0100.qcow2" "$T/ref2"
point_is "$D/vm100.20261104T0100.qcow2" "$T/ref4"
# a second backup on the same day (the first one's teardown failed): its own file
night 5
NOW=20261105T0100 run "$inc" 2>/dev/null
teardown failure
night 6
NOW=20261105T0130 run "$inc" 2>/dev/null
teardown
point_is "$D/vm100.20261105T0100.qcow2" "$T/ref5"
point_is "$D/vm100.20261105T0130.qcow2" "$T/ref6"

# strategy 3: the freeze hooks, each example on its own (ext4 filesystems at /srv/data,
# /srv/a, /srv/b through loop devices; no virsh here: the optional freeze goes on unfrozen)
for fs in data a b; do
    truncate -s 16M "$T/$fs.ext4"
    mkfs.ext4 -F -q "$T/$fs.ext4"
    loop_attach "$T/$fs.ext4"
    mkdir -p "$T/srv/$fs"
    LOOPS+=("$T/srv/$fs")
    mount "$LOOPDEV" "$T/srv/$fs"
done
s3=$(block "fsfreeze -f")
n=0
while IFS= read -r -d $'\x1e' cmd; do
    printf '%s\n' "$cmd" | grep -q "fleecefs setup" || continue
    n=$((n + 1))
    case "$cmd" in
    *virsh*) want=False ;;
    *) want=True ;;
    esac
    run "$cmd --json >$T/s3.json 2>/dev/null"
    [ "$(js "$T/s3.json" 'd["frozen"]')" = $want ] || fail "strategy 3 example $n: frozen is not $want: $(cat "$T/s3.json")"
    for fs in data a b; do
        timeout 10 touch "$T/srv/$fs/after" || fail "strategy 3 example $n left $fs frozen"
    done
    teardown
done < <(printf '%s\n' "$s3" | awk 'BEGIN { RS = ""; ORS = "\x1e" } { print }')
[ "$n" = 3 ] || fail "strategy 3 has $n setup examples, not 3"
"$FLEECEFS" unmount "$M" >/dev/null

# strategy 4: the mount as written
mkdir -p "$T/mnt4"
MOUNTS+=("$T/mnt4")
run "$(block "--backup-read direct")" >/dev/null 2>&1
[ "$(status_json "$T/mnt4" '(lambda o: (o["backup_priority"], o["backup_share"], o["backup_read"]))(d["options"])')" = \
    "('low', 'auto', 'direct')" ] || fail "strategy 4's mount does not have its options"
"$FLEECEFS" unmount "$T/mnt4" >/dev/null
echo "ok: backup-strategies.md: raw image, qcow2 chain of 4 nights, restore, both retention steps in order, same-day retry, 3 freeze examples, strategy 4's mount"

#!/usr/bin/env bash
# statfs of the mount reports the fleecing dir's filesystem (df
# is not 100% full), and st_blocks of live/NAME is the source's allocation (du is right),
# for a sparse regular file; a block device counts as fully allocated.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
truncate -s $((64 * M)) "$T/a.img"

# A fresh mount, before any setup has created the default fleecing dir: statfs reports
# the filesystem that dir will be created on (its nearest existing parent's), on the
# mount and on an open live file (what `fstatfs` callers such as io_uring drivers see).
fmount "$T/fresh" --state-dir "$T/st0" --device d="$T/a.img"
[ ! -e "$T/st0/fleecing" ] || fail "the fleecing dir exists before any setup"
df "$T/fresh" >/dev/null || fail "df of a fresh mount failed"
stat -f "$T/fresh" >/dev/null || fail "stat -f of a fresh mount failed"
stat -f "$T/fresh/live/d" >/dev/null || fail "stat -f of live/d on a fresh mount failed"
python3 -c 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fstatvfs(fd)' "$T/fresh/live/d" \
    || fail "fstatvfs of an open live/d on a fresh mount failed"
got=$(stat -f -c '%S %b' "$T/fresh")
want=$(stat -f -c '%S %b' "$T/st0")
[ "$got" = "$want" ] || fail "statfs of a fresh mount is '$got', the state dir's filesystem is '$want'"
"$FLEECEFS" unmount "$T/fresh"
dd if=/dev/urandom of="$T/a.img" bs=1M count=3 seek=10 conv=notrunc status=none
mkdir -p "$T/fl"
fmount "$T/mp" --state-dir "$T/st" --fleecing-dir "$T/fl" --device d="$T/a.img"

# statfs: the fleecing dir's filesystem (sizes in bytes, within 5%: other processes
# share that filesystem)
read -r bs blocks bfree bavail files ffree < <(stat -f -c '%S %b %f %a %c %d' "$T/mp")
read -r fbs fblocks fbfree fbavail ffiles fffree < <(stat -f -c '%S %b %f %a %c %d' "$T/fl")
echo "mount: bs $bs blocks $blocks free $bfree avail $bavail files $files ffree $ffree"
echo "fleecing dir: bs $fbs blocks $fblocks free $fbfree avail $fbavail files $ffiles ffree $fffree"
near() { python3 -c "import sys; a,b=int(sys.argv[1]),int(sys.argv[2]); sys.exit(0 if abs(a-b) <= max(a,b)//20 + 1 else 1)" "$1" "$2"; }
near $((bs * blocks)) $((fbs * fblocks)) || fail "statfs total $((bs * blocks)) is not the fleecing dir's $((fbs * fblocks))"
near $((bs * bavail)) $((fbs * fbavail)) || fail "statfs available $((bs * bavail)) is not the fleecing dir's $((fbs * fbavail))"
near $((bs * bfree)) $((fbs * fbfree)) || fail "statfs free $((bs * bfree)) is not the fleecing dir's $((fbs * fbavail))"
[ "$bavail" -gt 0 ] || fail "statfs reports no available blocks"
near "$ffree" "$fffree" || fail "statfs free inodes $ffree are not the fleecing dir's $fffree"
use=$(df --output=pcent "$T/mp" | tail -1 | tr -d ' %')
[ "$use" -lt 100 ] || fail "df shows the mount ${use}% full"

# st_blocks of live/NAME = the source's
want=$(stat -c %b "$T/a.img")
got=$(stat -c %b "$T/mp/live/d")
[ "$got" = "$want" ] || fail "st_blocks of live/d is $got, the source has $want"
dd if=/dev/urandom of="$T/mp/live/d" bs=1M count=2 seek=40 conv=notrunc status=none
want=$(stat -c %b "$T/a.img")
sleep 1.1 # attributes of live files may be cached for 1 s
got=$(stat -c %b "$T/mp/live/d")
[ "$got" = "$want" ] || fail "after a write st_blocks of live/d is $got, the source has $want"
[ "$(du -k "$T/mp/live/d" | cut -f1)" = "$(du -k "$T/a.img" | cut -f1)" ] || fail "du of live/d differs from the source's"
"$FLEECEFS" unmount "$T/mp"

# a block device: fully allocated
truncate -s $((8 * M)) "$T/b.img"
loop_attach "$T/b.img"
fmount "$T/mp2" --state-dir "$T/st2" --device b="$LOOPDEV"
got=$(stat -c %b "$T/mp2/live/b")
[ "$got" = $((8 * M / 512)) ] || fail "st_blocks of a block device's live file is $got"
"$FLEECEFS" unmount "$T/mp2"
echo "fidelity_stat: ok"

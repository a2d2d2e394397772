#!/usr/bin/env bash
# lseek SEEK_DATA/SEEK_HOLE:
#  - live/NAME: the source's own map.
#  - snapshot/NAME: holes where clusters are inaccessible (discarded, outside the dirty
#    map of an incremental) and where the image had holes at setup; data where it had
#    data, also after live writes and punches since setup.
#  - An 8 GiB image that is 90% holes: `cp --sparse=always` and `qemu-img convert` of its
#    snapshot make the daemon read at most 15% of its size (counted by the daemon's own
#    read bytes, rchar in /proc/PID/io), and produce the image.
source "$(dirname "$0")/lib.sh"

K=$((1 << 10))
M=$((1 << 20))
G=$((1 << 30))

# maps FILE : the data extents of FILE as "start-end" words, walked with SEEK_DATA/HOLE
maps() {
    python3 - "$1" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
out, pos = [], 0
while pos < size:
    try:
        d = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        if e.errno == 6:  # ENXIO: no more data
            break
        raise
    h = os.lseek(fd, d, os.SEEK_HOLE)
    out.append(f"{d}-{h}")
    pos = h
print(" ".join(out))
PY
}

# same_sparse A B : A and B (regular files on a filesystem with SEEK_DATA) have the same
# content; only the data extents of either are read (cmp would read 8 GiB of zeros)
same_sparse() {
    python3 - "$1" "$2" <<'PY'
import os, sys
def extents(fd, size):
    pos = 0
    while pos < size:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return
        h = os.lseek(fd, d, os.SEEK_HOLE)
        yield d, h
        pos = h
a, b = (os.open(p, os.O_RDONLY) for p in sys.argv[1:3])
size = os.fstat(a).st_size
if os.fstat(b).st_size != size:
    sys.exit("sizes differ")
for fd in (a, b):
    for d, h in extents(fd, size):
        for off in range(d, h, 1 << 20):
            n = min(1 << 20, h - off)
            if os.pread(a, n, off) != os.pread(b, n, off):
                sys.exit(f"{sys.argv[1]} and {sys.argv[2]} differ in {off}+{n}")
PY
}

# --- small image: 4 MiB, 64K clusters --------------------------------------------
truncate -s $((4 * M)) "$T/a.img"
dd if=/dev/urandom of="$T/a.img" bs=64K seek=2 count=4 conv=notrunc status=none   # 128K-384K
dd if=/dev/urandom of="$T/a.img" bs=64K seek=20 count=8 conv=notrunc status=none  # 1280K-1792K
dd if=/dev/urandom of="$T/a.img" bs=64K seek=63 count=1 conv=notrunc status=none  # last cluster
fmount "$T/mp" --state-dir "$T/st" --device d="$T/a.img" --cluster-size 64K
L="$T/mp/live/d"
S="$T/mp/snapshot/d"

[ "$(maps "$L")" = "$(maps "$T/a.img")" ] || fail "live map $(maps "$L") is not the source's $(maps "$T/a.img")"

"$FLEECEFS" setup "$T/mp" --target t >/dev/null
want="$((128 * K))-$((384 * K)) $((1280 * K))-$((1792 * K)) $((4032 * K))-$((4096 * K))"
got=$(maps "$S")
[ "$got" = "$want" ] || fail "snapshot map at setup: $got, want $want"
# live changes since setup do not change the snapshot's map: a write into a hole copies
# its (zero) cluster, which counts as data; a punch of data keeps the data
dd if=/dev/urandom of="$L" bs=64K seek=40 count=1 conv=notrunc status=none        # hole -> data
fallocate -p -o $((1280 * K)) -l $((128 * K)) "$L"                               # data -> hole
dd if=/dev/urandom of="$L" bs=64K seek=50 count=1 conv=notrunc status=none
[ "$(maps "$L")" = "$(maps "$T/a.img")" ] || fail "live map after writes $(maps "$L") is not the source's"
got=$(maps "$S")
want2="$((128 * K))-$((384 * K)) $((1280 * K))-$((1792 * K)) $((2560 * K))-$((2624 * K)) $((3200 * K))-$((3264 * K)) $((4032 * K))-$((4096 * K))"
[ "$got" = "$want2" ] || fail "snapshot map after live writes: $got, want $want2"
# discarded clusters are holes
fallocate -p -o $((1408 * K)) -l $((128 * K)) "$S"
got=$(maps "$S")
want3="$((128 * K))-$((384 * K)) $((1280 * K))-$((1408 * K)) $((1536 * K))-$((1792 * K)) $((2560 * K))-$((2624 * K)) $((3200 * K))-$((3264 * K)) $((4032 * K))-$((4096 * K))"
[ "$got" = "$want3" ] || fail "snapshot map after a discard: $got, want $want3"
# cp --sparse copies it: what it reads is the snapshot, holes are zeros
cp "$T/a.img" "$T/now.img"
cp --sparse=always "$S" "$T/cp.img"
python3 - "$T/cp.img" <<'PY' || fail "cp --sparse of the snapshot wrote data into a discarded range"
import sys
d = open(sys.argv[1], "rb").read()
sys.exit(0 if d[1408 * 1024:1536 * 1024] == bytes(128 * 1024) else 1)
PY
# tar --sparse skips the holes too (it would fail with EACCES on the discarded range)
tar --sparse -cf "$T/snap.tar" -C "$T/mp/snapshot" d || fail "tar --sparse of the snapshot failed"
mkdir -p "$T/untar" && tar -xf "$T/snap.tar" -C "$T/untar"
cmp "$T/untar/d" "$T/cp.img" || fail "tar --sparse and cp --sparse copies differ"
"$FLEECEFS" teardown "$T/mp" --target t --failure >/dev/null

# --- incremental: data only where dirty ---------------------------------------------
head -c $((4 * M)) /dev/urandom >"$T/b.img"
fmount "$T/mp2" --state-dir "$T/st2" --device b="$T/b.img" --cluster-size 64K
"$FLEECEFS" setup "$T/mp2" --target n --bitmap nightly >/dev/null
"$FLEECEFS" teardown "$T/mp2" --target n --success >/dev/null
dd if=/dev/urandom of="$T/mp2/live/b" bs=64K seek=5 count=2 conv=notrunc status=none
dd if=/dev/urandom of="$T/mp2/live/b" bs=64K seek=30 count=1 conv=notrunc status=none
"$FLEECEFS" setup "$T/mp2" --target n --bitmap nightly >/dev/null
got=$(maps "$T/mp2/snapshot/b")
want="$((320 * K))-$((448 * K)) $((1920 * K))-$((1984 * K))"
[ "$got" = "$want" ] || fail "incremental snapshot map: $got, want the dirty clusters $want"
"$FLEECEFS" teardown "$T/mp2" --target n --failure >/dev/null
"$FLEECEFS" unmount "$T/mp2"

# --- 8 GiB, 90% holes: cp and qemu-img convert read at most 15% ----------------------
SIZE=$((8 * G))
truncate -s $SIZE "$T/big.img"
# 64 extents of 12.8 MiB spread over the image: 10% data
python3 - "$T/big.img" $SIZE <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
size = int(sys.argv[2])
chunk = size // 10 // 64 // 65536 * 65536
blk = os.urandom(1 << 20)
for i in range(64):
    off = i * (size // 64) + 12345 * 4096 % (size // 64 - chunk)
    off -= off % 65536
    done = 0
    while done < chunk:
        n = min(len(blk), chunk - done)
        os.pwrite(fd, blk[:n], off + done)
        done += n
os.close(fd)
PY
fmount "$T/mp3" --state-dir "$T/st3" --device big="$T/big.img"
# the worker serves the reads (the keeper, the lock's pid, reads nothing)
PID=$(status_json "$T/mp3" 'd["worker_pid"]')
"$FLEECEFS" setup "$T/mp3" --target t >/dev/null
rchar() { awk '/^rchar/ {print $2}' /proc/"$PID"/io; }
limit=$((SIZE * 15 / 100))
floor=$((SIZE * 5 / 100)) # the data itself is 10%: less means the counter missed the reads
# copied_reading_little WHAT COPY CMD... : CMD copies snapshot/big to COPY while the
# daemon reads between 5% and 15% of it; COPY equals the image; COPY is removed after
copied_reading_little() {
    local what=$1 copy=$2 r0 r1
    shift 2
    r0=$(rchar)
    timeout 600 "$@" || fail "$what failed"
    r1=$(rchar)
    echo "$what: the daemon read $(((r1 - r0) / M)) MiB of $((SIZE / M)) MiB (limit $((limit / M)))"
    [ $((r1 - r0)) -le $limit ] || fail "$what read $((r1 - r0)) bytes of a 90%-holes 8 GiB snapshot"
    [ $((r1 - r0)) -ge $floor ] || fail "the daemon's read counter saw only $((r1 - r0)) bytes: not the process that serves reads?"
    same_sparse "$T/big.img" "$copy" || fail "$what: the copy differs from the image"
    rm -f "$copy"
}
copied_reading_little "cp --sparse=always" "$T/big.cp" cp --sparse=always "$T/mp3/snapshot/big" "$T/big.cp"
copied_reading_little "qemu-img convert" "$T/big.qemu" qemu-img convert -f raw -O raw "$T/mp3/snapshot/big" "$T/big.qemu"
"$FLEECEFS" teardown "$T/mp3" --target t --failure >/dev/null
echo "fidelity_seek: ok"

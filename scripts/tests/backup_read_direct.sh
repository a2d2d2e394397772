#!/usr/bin/env bash
# `mount --backup-read direct`: snapshot reads read the source with O_DIRECT.
#  - The snapshot copied with dd (1 MiB reads: direct), with an odd block size (unaligned
#    reads: through the page cache) and through a mapping is the point-in-time image,
#    while a writer changes live (copy-before-write) and on a source whose size is not a
#    multiple of the page size (its tail is read buffered).
#  - A direct backup leaves the source out of the page cache: after reading the whole
#    snapshot of an uncached source, almost none of it is cached; with the default
#    (cached) the same read caches all of it, so the check can fail.
#  - A bad value is refused with a one-line message.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
head -c $((64 * M)) /dev/urandom >"$T/a.img"
head -c $((16 * M + 1234)) /dev/urandom >"$T/b.img"
cp "$T/a.img" "$T/a.ref"
cp "$T/b.img" "$T/b.ref"

# uncache FILE... : writes back and drops the files' page cache
uncache() {
    sync
    python3 - "$@" <<'PY'
import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
PY
}
# cached FILE : bytes of FILE in the page cache
cached() { fincore -b -n -o RES "$1" | tr -d ' '; }
# backup_b MOUNTPOINT : drops b.img from the page cache, copies snapshot/b with 1 MiB reads
# and checks the copy; prints how much of b.img the copy left in the page cache
backup_b() {
    uncache "$T/b.img"
    dd if="$1/snapshot/b" of="$T/b.copy" bs=1M status=none
    cmp "$T/b.copy" "$T/b.ref" >&2 || fail "the snapshot of b differs from the image at setup"
    cached "$T/b.img"
}

expect_rc 2 "backup-read" "$FLEECEFS" mount "$T/bad" --state-dir "$T/sbad" \
    --device a="$T/a.img" --backup-read sometimes
mountpoint -q "$T/bad" 2>/dev/null && fail "a refused mount left a mount behind"

fmount "$T/m" --state-dir "$T/s" --device a="$T/a.img" --device b="$T/b.img" \
    --backup-read direct
"$FLEECEFS" setup "$T/m" --target t >/dev/null
uncache "$T/a.img" "$T/b.img"

# --- the point-in-time image, under a writer ----------------------------------------
start_writer "$T/m/live/a" $((64 * M / 4096))
while [ "$(writes_now)" -lt 20 ]; do sleep 0.05; done
dd if="$T/m/snapshot/a" of="$T/a.copy" bs=1M status=none
dd if="$T/m/snapshot/a" of="$T/a.odd" bs=12345 status=none
python3 - "$T/m/snapshot/a" "$T/a.map" <<'PY'
import mmap, sys
with open(sys.argv[1], "rb") as f, open(sys.argv[2], "wb") as out:
    with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        out.write(m[:])
PY
stop_writer
[ "$(writes)" -ge 20 ] || fail "the writer made only $(writes) writes"
cmp -s "$T/a.img" "$T/a.ref" && fail "the writer changed nothing in the source"
cmp "$T/a.copy" "$T/a.ref" || fail "1 MiB reads of the snapshot differ from the image at setup"
cmp "$T/a.odd" "$T/a.ref" || fail "unaligned reads of the snapshot differ from the image at setup"
cmp "$T/a.map" "$T/a.ref" || fail "the mapped snapshot differs from the image at setup"

# --- the page cache stays the guest's -----------------------------------------------
direct_cached=$(backup_b "$T/m")
[ "$direct_cached" -lt $((1 * M)) ] ||
    fail "--backup-read direct left $direct_cached bytes of the source in the page cache"
"$FLEECEFS" teardown "$T/m" --target t --success >/dev/null
"$FLEECEFS" unmount "$T/m"

# the same with the default: the read caches the source (so the check above can fail)
fmount "$T/m" --state-dir "$T/s" --device a="$T/a.img" --device b="$T/b.img"
"$FLEECEFS" setup "$T/m" --target t2 >/dev/null
default_cached=$(backup_b "$T/m")
[ "$default_cached" -gt $((8 * M)) ] ||
    fail "a cached backup read left only $default_cached bytes cached: the check proves nothing here"
"$FLEECEFS" teardown "$T/m" --target t2 --success >/dev/null
echo "backup_read_direct: ok (source bytes cached after a full snapshot read: direct $direct_cached, cached $default_cached)"

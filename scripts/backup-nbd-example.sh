#!/usr/bin/env bash
# A backup provider that reads one device of a backup access over NBD, in the shape of
# the external backup provider API fleecefs follows (the management layer sets the access
# up, starts the NBD server and tears the access down; the provider only reads):
#   backup-nbd-example.sh SOCKET DEVICE BITMAP_STATUS BITMAP_NAME BWLIMIT BACKUP_DIR
# SOCKET: the NBD Unix socket (mount --nbd unix:SOCKET). DEVICE: the export (device) name.
# BITMAP_STATUS: new or none (a full backup into a new BACKUP_DIR/DEVICE.img, renamed over
# the old one at the end) or reuse (only the dirty ranges of qemu:dirty-bitmap:BITMAP_NAME,
# written onto the existing BACKUP_DIR/DEVICE.img). BWLIMIT: bytes per second, 0 for none.
# Every range is written and fsynced, then trimmed on the export (a discard: the fleecing
# space it held is freed). Exits non-zero on any failure; the caller then tears the
# access down as a failure, and the bitmap keeps every change for the next run.
# Needs libnbd's Python bindings (Debian: python3-libnbd).
set -euo pipefail
[ $# -eq 6 ] || {
    echo "usage: $0 SOCKET DEVICE new|reuse|none BITMAP_NAME BWLIMIT BACKUP_DIR" >&2
    exit 2
}
case $3 in new | reuse | none) ;; *) echo "$0: bitmap status '$3' is not new, reuse or none" >&2; exit 2 ;; esac
case $5 in '' | *[!0-9]*) echo "$0: bandwidth limit '$5' is not a number of bytes per second" >&2; exit 2 ;; esac
exec /usr/bin/python3 - "$@" <<'PY'
import os
import sys
import time

import nbd

sock, dev, status, bitmap, bwlimit, backup_dir = sys.argv[1:7]
bwlimit = int(bwlimit)
image = os.path.join(backup_dir, dev + ".img")
CHUNK = 4 << 20
ctx = "qemu:dirty-bitmap:" + bitmap

h = nbd.NBD()
h.add_meta_context("base:allocation")
if status == "reuse":
    h.add_meta_context(ctx)
h.set_export_name(dev)
h.connect_unix(sock)
size = h.get_size()
if status == "reuse" and not h.can_meta_context(ctx):
    sys.exit("%s: export has no dirty bitmap %s" % (dev, bitmap))


def extents(context, want):
    """(offset, length) of the extents of `context` whose flags match `want`."""
    out, pos = [], 0
    while pos < size:
        seen = []

        def cb(meta, offset, entries, err):
            if meta == context:
                off = offset
                for i in range(0, len(entries), 2):
                    if want(entries[i + 1]):
                        out.append((off, entries[i]))
                    off += entries[i]
                seen.append(off - offset)
            return 0

        h.block_status(min(size - pos, 1 << 30), pos, cb)
        pos += seen[0]
    merged = []
    for o, n in out:
        if merged and merged[-1][0] + merged[-1][1] == o:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((o, n))
    return merged


if status == "reuse":
    if not os.path.exists(image):
        sys.exit("%s is missing: an incremental needs the previous backup" % image)
    if os.path.getsize(image) != size:
        sys.exit("%s is not the size of %s (%d bytes)" % (image, dev, size))
    out_path = image
    ranges = extents(ctx, lambda f: f & 1)
else:
    out_path = image + ".new"
    with open(out_path, "wb") as f:
        f.truncate(size)
    ranges = [(0, size)]

start, done_bytes = time.monotonic(), 0
fd = os.open(out_path, os.O_WRONLY)
try:
    for off, length in ranges:
        # Holes (zero) need no read: a new image is sparse, an old one gets zeros punched.
        pos, end = off, off + length
        while pos < end:
            n = min(CHUNK, end - pos)
            zero = []

            def cb(meta, offset, entries, err):
                if meta == "base:allocation":
                    zero.append((entries[0], entries[1] & 2 != 0))
                return 0

            h.block_status(n, pos, cb, nbd.CMD_FLAG_REQ_ONE)
            zlen, is_zero = zero[0]
            n = min(n, zlen)
            if is_zero:
                if out_path == image:
                    os.pwrite(fd, bytes(n), pos)
            else:
                os.pwrite(fd, h.pread(n, pos), pos)
                done_bytes += n
            pos += n
            if bwlimit > 0:
                ahead = done_bytes / bwlimit - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        # durable before the export forgets the range
        os.fsync(fd)
        h.trim(length, off)
finally:
    os.close(fd)
if out_path != image:
    os.rename(out_path, image)
dfd = os.open(backup_dir, os.O_RDONLY)
os.fsync(dfd)
os.close(dfd)
h.shutdown()
kind = "incremental" if status == "reuse" else "full"
print("%s: %s backup of %d range(s), %d bytes read, in %s" % (dev, kind, len(ranges), done_bytes, image))
PY

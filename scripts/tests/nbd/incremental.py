# Incremental backup over NBD the way QEMU-based tools do it (libnbd): the dirty ranges
# of qemu:dirty-bitmap:BITMAP are read onto the previous backup, each range trimmed after
# it is written; a read outside them must fail with EINVAL (QEMU's errno for the same
# read of its snapshot-access export).
# usage: incremental.py SOCKET EXPORT BITMAP PREVIOUS_IMAGE
import errno
import sys

import nbd

sock, export, bitmap, prev = sys.argv[1:5]
ctx = "qemu:dirty-bitmap:" + bitmap
h = nbd.NBD()
h.add_meta_context(ctx)
h.set_export_name(export)
h.connect_unix(sock)
assert h.can_meta_context(ctx), "no dirty bitmap context"
assert h.can_trim() and h.can_multi_conn() and not h.is_read_only()
size = h.get_size()
ranges = []


def extent(metacontext, offset, entries, err):
    if metacontext != ctx:
        return 0
    for i in range(0, len(entries), 2):
        if entries[i + 1] & 1:
            ranges.append((offset, entries[i]))
        offset += entries[i]
    return 0


pos = 0
while pos < size:
    before = sum(n for _, n in ranges)
    got = []

    def cb(metacontext, offset, entries, err, got=got):
        if metacontext == ctx:
            got.append(sum(entries[0::2]))
        return extent(metacontext, offset, entries, err)

    h.block_status(min(size - pos, 1 << 30), pos, cb)
    pos += got[0]
# merge adjacent ranges
merged = []
for o, n in ranges:
    if merged and merged[-1][0] + merged[-1][1] == o:
        merged[-1] = (merged[-1][0], merged[-1][1] + n)
    else:
        merged.append((o, n))
with open(prev, "r+b") as f:
    for o, n in merged:
        done = 0
        while done < n:
            k = min(n - done, 4 << 20)
            f.seek(o + done)
            f.write(h.pread(k, o + done))
            done += k
        h.trim(n, o)
# a clean range: the read fails
clean = 0 if not merged or merged[0][0] > 0 else merged[0][0] + merged[0][1]
if clean < size:
    try:
        h.pread(512, clean)
        sys.exit("a read outside the dirty bitmap returned data")
    except nbd.Error as e:
        assert e.errnum == errno.EINVAL, e
# a trimmed range: the read fails too
if merged:
    try:
        h.pread(512, merged[0][0])
        sys.exit("a read of a trimmed range returned data")
    except nbd.Error as e:
        assert e.errnum == errno.EINVAL, e
# writes are refused with EPERM
try:
    h.pwrite(b"x" * 512, 0)
    sys.exit("a write succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
h.shutdown()
print(" ".join("%d+%d" % r for r in merged))

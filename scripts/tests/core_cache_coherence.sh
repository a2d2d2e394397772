#!/usr/bin/env bash
# No open of a live file ever reads stale data, in both live I/O modes: direct I/O for
# every open (the default) and --live-cache (buffered opens keep the page cache across
# opens, O_DIRECT opens use parallel direct I/O). Buffered reads after O_DIRECT writes,
# O_DIRECT reads after buffered writes, a shared mmap written and read alongside both,
# reads after punch/zero fallocate, reads after close and reopen, and the snapshot of the
# same ranges, all against a model.
source "$(dirname "$0")/lib.sh"

for mode in "" --live-cache; do
head -c $((8 << 20)) /dev/urandom >"$T/src.img"
fmount "$T/mnt" --state-dir "$T/state" --device disk=$T/src.img $mode
"$FLEECEFS" setup "$T/mnt" --target coh >/dev/null
cp "$T/src.img" "$T/ref.img"

python3 - "$T/mnt/live/disk" "$T/mnt/snapshot/disk" "$T/ref.img" <<'PY' || fail "mode '$mode': stale or wrong data (see above)"
import mmap, os, random, sys
live, snap, ref = sys.argv[1:4]
model = bytearray(open(ref, "rb").read())
frozen = bytes(model)
size = len(model)
rng = random.Random(7)

def aligned(data):
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return buf

def check(fd, off, n, want, what):
    got = os.pread(fd, n, off)
    if got != bytes(want):
        print(f"FAIL: {what}: {n} bytes at {off} differ from the model")
        sys.exit(1)

cached = os.open(live, os.O_RDWR)
direct = os.open(live, os.O_RDWR | os.O_DIRECT)
mapped = mmap.mmap(cached, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

def check_direct(off, n, what):   # an O_DIRECT read (aligned buffer) must match the model
    buf = mmap.mmap(-1, n)
    os.preadv(direct, [buf], off)
    if bytes(buf) != bytes(model[off:off + n]):
        print(f"FAIL: {what} is stale"); sys.exit(1)
for step in range(400):
    off = rng.randrange(0, size // 4096) * 4096
    n = 4096 * rng.randint(1, 4)
    n = min(n, size - off)
    # populate the cache of the range first
    check(cached, off, n, model[off:off + n], f"step {step} cached read")
    if bytes(mapped[off:off + n]) != bytes(model[off:off + n]):
        print(f"FAIL: step {step}: the shared mmap is stale"); sys.exit(1)
    op = rng.randrange(6)
    data = os.urandom(n)
    if op == 0:      # O_DIRECT write, then cached reads must see it
        os.pwrite(direct, aligned(data), off)
        model[off:off + n] = data
    elif op == 1:    # cached write, then O_DIRECT read must see it
        os.pwrite(cached, data, off)
        model[off:off + n] = data
        check_direct(off, n, f"step {step}: O_DIRECT read after a cached write")
    elif op == 2:    # punch hole through the direct fd
        os.posix_fallocate  # (exists)
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        mode = 0x02 | 0x01 if rng.random() < 0.5 else 0x10 | 0x01   # PUNCH_HOLE|KEEP or ZERO_RANGE|KEEP
        if libc.fallocate(direct, mode, ctypes.c_long(off), ctypes.c_long(n)) != 0:
            print(f"FAIL: fallocate errno {ctypes.get_errno()}"); sys.exit(1)
        model[off:off + n] = bytes(n)
    elif op == 5:    # write through the shared mmap, msync, then reads must see it
        mapped[off:off + n] = data
        mapped.flush()
        model[off:off + n] = data
        check_direct(off, n, f"step {step}: O_DIRECT read after an mmap write")
    elif op == 3:    # a fresh cached open sees everything
        fd = os.open(live, os.O_RDONLY)
        check(fd, off, n, model[off:off + n], f"step {step} reopen")
        os.close(fd)
        continue
    else:            # the snapshot never changes
        fd = os.open(snap, os.O_RDONLY)
        check(fd, off, n, frozen[off:off + n], f"step {step} snapshot")
        os.close(fd)
        continue
    check(cached, off, n, model[off:off + n], f"step {step} op {op} cached read after")
mapped.close()
# the whole device, through a new open
fd = os.open(live, os.O_RDONLY)
check(fd, 0, size, model, "final full read")
os.close(fd)
open(ref + ".model", "wb").write(model)
PY
cmp "$T/src.img" "$T/ref.img.model" || fail "mode '$mode': the source differs from the model"
cmp "$T/mnt/snapshot/disk" "$T/ref.img" || fail "mode '$mode': the snapshot changed"
"$FLEECEFS" teardown "$T/mnt" --target coh --success >/dev/null
"$FLEECEFS" unmount "$T/mnt"
done
echo "ok: both live I/O modes, 400 mixed buffered/O_DIRECT/mmap/fallocate operations each, no stale read on live or snapshot"

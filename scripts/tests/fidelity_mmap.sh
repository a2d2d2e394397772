#!/usr/bin/env bash
# Mapped snapshots:
#  - Touching only readable pages of a mapped snapshot with inaccessible (discarded)
#     clusters never faults, reads the point-in-time data, and the size never shrinks;
#     an inaccessible page fails (SIGBUS) like any I/O error.
#  - A mapping (of NAME or NAME.dirty) made during access 1 never shows access 2's data
#     after teardown and a new setup, even when access 2's pages are in a page cache.
#  - A shared writable mapping of the snapshot (opened O_RDWR, as fallocate needs)
#     never changes what other mappings see.
#  - fstat on a handle of an ended access fails with ESTALE (also after a new setup).
source "$(dirname "$0")/lib.sh"

K=$((1 << 10))
M=$((1 << 20))
head -c $((4 * M)) /dev/urandom >"$T/a.img"
fmount "$T/mp" --state-dir "$T/st" --device d="$T/a.img" --cluster-size 64K
S="$T/mp/snapshot/d"
# SKIP="2 4" leaves those parts out (to see each part fail on its own on old code)
part() { [[ " ${SKIP:-} " != *" $1 "* ]]; }

# --- 2: readable pages never fault --------------------------------------------------
"$FLEECEFS" setup "$T/mp" --target t1 --bitmap b >/dev/null
cp "$T/a.img" "$T/ref1.img"
if part 2; then
# discard clusters 8-11 (512K-768K) and the last one; change the live image there too
fallocate -p -o $((512 * K)) -l $((256 * K)) "$S"
fallocate -p -o $((4 * M - 64 * K)) -l $((64 * K)) "$S"
dd if=/dev/urandom of="$T/mp/live/d" bs=64K count=2 seek=3 conv=notrunc status=none
python3 - "$S" "$T/ref1.img" $((4 * M)) <<'PY' || fail "readable pages of a mapped snapshot faulted or read wrong data (rc $?)"
import mmap, os, sys
path, ref, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
K = 1024
bad = [(512 * K, 768 * K), (size - 64 * K, size)]
f = open(path, "rb")
m = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
r = open(ref, "rb").read()
# the pages next to the gaps first (the kernel reads around a fault, across the gap),
# then pages in random order, then all
import random
order = [508 * K, 768 * K, size - 68 * K, 4096 * 100] + random.sample(range(0, size, 4096), 64) + list(range(0, size, 4096))
for off in order:
    if any(a <= off < b for a, b in bad):
        continue
    if m[off:off + 4096] != r[off:off + 4096]:
        print(f"wrong data at {off}")
        sys.exit(3)
st = os.fstat(f.fileno()).st_size
if st != size:
    print(f"size shrank to {st}")
    sys.exit(4)
# an inaccessible page fails (SIGBUS) in a child
pid = os.fork()
if pid == 0:
    m[600 * K]
    os._exit(0)
_, status = os.waitpid(pid, 0)
if not os.WIFSIGNALED(status) or os.WTERMSIG(status) != 7:
    print(f"touching a discarded page did not raise SIGBUS: {status}")
    sys.exit(5)
if os.stat(path).st_size != size:
    sys.exit(6)
PY
[ "$(stat -c %s "$S")" = $((4 * M)) ] || fail "the snapshot's size changed"
fi

# --- 4: a shared writable mapping changes nothing others see ------------------------
if part 4; then
python3 - "$S" "$T/ref1.img" <<'PY' || fail "a shared writable mapping of the snapshot changed what others see (rc $?)"
import mmap, os, sys
path, ref = sys.argv[1], sys.argv[2]
r = open(ref, "rb").read(65536)
ro = open(path, "rb")
mr = mmap.mmap(ro.fileno(), 65536, mmap.MAP_SHARED, mmap.PROT_READ)
assert mr[:4096] == r[:4096]
rw = os.open(path, os.O_RDWR)
try:
    mw = mmap.mmap(rw, 65536, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
except OSError as e:
    print(f"shared writable mapping refused: {e}")
    sys.exit(0)
def child(f):
    # runs f in a child; returns its exit code, or -SIG when a signal (SIGBUS) ended it
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(f())
        except BaseException:
            os._exit(9)
    _, st = os.waitpid(pid, 0)
    return os.WEXITSTATUS(st) if os.WIFEXITED(st) else -os.WTERMSIG(st)
def scribble():
    mw[0:4096] = b"\xee" * 4096   # may fault (SIGBUS): the mapping gets no pages
    try:
        mw.flush()
    except OSError:
        pass
    return 0
print("writer:", child(scribble))
# other mappings: the snapshot's bytes, or a fault while the writer is open; never its bytes
rc = child(lambda: 0 if mr[:4096] == r[:4096] else 2)
print("old mapping while the writer is open:", rc)
if rc not in (0, -7):
    sys.exit(2)
if os.pread(ro.fileno(), 4096, 0) != r[:4096]:
    print("a read of the snapshot sees the writable mapping's bytes")
    sys.exit(2)
mw.close()
os.close(rw)
import time
time.sleep(0.2)  # the kernel sends the release after close returns
for m in (mr, mmap.mmap(ro.fileno(), 65536, mmap.MAP_SHARED, mmap.PROT_READ)):
    for _ in range(50):
        rc = child(lambda: 0 if m[:4096] == r[:4096] else 3)
        if rc != -7:
            break
        time.sleep(0.1)
    if rc != 0:
        print(f"after the writer closed, a mapping does not read the snapshot ({rc})")
        sys.exit(3)
PY
fi

# --- 3 and 10: an access-1 mapping and handle after teardown and a new setup --------
rm -f "$T/go" "$T/ready"
python3 - "$S" "$T/ref1.img" "$T" $((4 * M)) <<'PY' &
import mmap, os, sys, time
path, ref, t, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
r = open(ref, "rb").read()
f = open(path, "rb")
fd = open(path + ".dirty", "rb")
m = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
dlen = os.fstat(fd.fileno()).st_size
md = mmap.mmap(fd.fileno(), dlen, mmap.MAP_SHARED, mmap.PROT_READ)
old_dirty = md[:dlen]
assert m[:4096] == r[:4096]
open(t + "/ready", "w").close()
while not os.path.exists(t + "/go"):
    time.sleep(0.05)
rc = 0
# 10: fstat of the old handles
for h in (f, fd):
    try:
        os.fstat(h.fileno())
        print("fstat of an ended access's handle succeeded")
        rc = 10
    except OSError as e:
        if e.errno != 116:
            print(f"fstat of an ended access's handle: {e} (want ESTALE)")
            rc = 10
# 3: pages never seen before must not show access 2's data (SIGBUS or access 1's data)
pid = os.fork()
if pid == 0:
    for off in range(1 << 20, 2 << 20, 4096):
        if m[off:off + 4096] != r[off:off + 4096]:
            os._exit(3)
    os._exit(0)
_, st = os.waitpid(pid, 0)
if os.WIFEXITED(st) and os.WEXITSTATUS(st) == 3:
    print("a mapping of access 1 shows other data after a new setup")
    rc = 3
if md:
    pid = os.fork()
    if pid == 0:
        os._exit(4 if md[:len(old_dirty)] != old_dirty else 0)
    _, st = os.waitpid(pid, 0)
    if os.WIFEXITED(st) and os.WEXITSTATUS(st) == 4:
        print("a mapping of access 1's dirty map shows access 2's")
        rc = 3
sys.exit(rc)
PY
HOLDER=$!
while [ ! -e "$T/ready" ]; do kill -0 $HOLDER 2>/dev/null || fail "holder died"; sleep 0.05; done
"$FLEECEFS" teardown "$T/mp" --target t1 --success >/dev/null
dd if=/dev/urandom of="$T/mp/live/d" bs=1M count=2 seek=1 conv=notrunc status=none
"$FLEECEFS" setup "$T/mp" --target t1 --bitmap b >/dev/null
[ "$(head -c 10 "$S.dirty")" != "0 $((4 * M))" ] || fail "access 2 is not incremental"
# access 2's data (its dirty range 1M-3M) and dirty map in the page cache
python3 - "$S" <<'PY'
import mmap, os, sys
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), os.fstat(f.fileno()).st_size, mmap.MAP_SHARED, mmap.PROT_READ)
m.madvise(mmap.MADV_RANDOM)  # one page per fault: no read-around into inaccessible data
s = sum(m[off] for off in range(1 << 20, 3 << 20, 4096))
d = open(sys.argv[1] + ".dirty", "rb")
md = mmap.mmap(d.fileno(), os.fstat(d.fileno()).st_size, mmap.MAP_SHARED, mmap.PROT_READ)
md[:]
PY
touch "$T/go"
wait $HOLDER || fail "access 1's mapping or handle misbehaved after a new setup (rc $?)"
"$FLEECEFS" teardown "$T/mp" --target t1 --failure >/dev/null
echo "fidelity_mmap: ok"

#!/usr/bin/env bash
# One rule for writes that cross the end of the device, in every mode
# (direct I/O, --live-cache buffered, O_DIRECT) and for every size: what fits is written
# and the write returns that short count (as on a block device); a write that starts at
# or past the end fails with ENOSPC. The device never grows.
source "$(dirname "$0")/lib.sh"

M=$((1 << 20))
SIZE=$((16 * M))
run_mode() {
    local mode=$1
    shift
    head -c $SIZE /dev/zero >"$T/$mode.img"
    fmount "$T/mp.$mode" --state-dir "$T/st.$mode" --device d="$T/$mode.img" "$@"
    python3 - "$T/mp.$mode/live/d" "$T/$mode.img" $SIZE "$mode" <<'PY' || fail "mode $mode: a write crossing the end broke the rule"
import errno, mmap, os, sys
live, src, size, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
M = 1 << 20
bad = 0
def check(flags, off, n, want):
    global bad
    fd = os.open(live, os.O_WRONLY | flags)
    buf = mmap.mmap(-1, max(n, 4096))   # page-aligned for O_DIRECT
    buf.write(os.urandom(n))
    try:
        got = os.pwritev(fd, [memoryview(buf)[:n]], off)
    except OSError as e:
        got = "ENOSPC" if e.errno == errno.ENOSPC else f"errno {e.errno}"
    os.close(fd)
    ok = got == want
    if ok and isinstance(want, int) and want > 0:
        with open(src, "rb") as f:
            f.seek(off)
            ok = f.read(want) == bytes(buf[:want])
    print(f"{mode}: write of {n} at SIZE-{size - off} ({'O_DIRECT' if flags else 'buffered'}): {got} (want {want})")
    if not ok:
        bad += 1
    if os.stat(src).st_size != size:
        print("the source grew")
        bad += 1
for flags in (0, os.O_DIRECT):
    check(flags, size - 3 * M, 4 * M, 3 * M)
    check(flags, size - 4096, 8192, 4096)
    check(flags, size, 4096, "ENOSPC")
    check(flags, size + 8192, 4096, "ENOSPC")
    if not flags:
        check(0, size - 10, 20, 10)
        check(0, size - 8202, 12288, 8202)
        check(0, size - 5000, 1 << 20, 5000)
        check(0, size - 1, 2, 1)
sys.exit(1 if bad else 0)
PY
    "$FLEECEFS" unmount "$T/mp.$mode"
}
run_mode direct
run_mode cache --live-cache
echo "fidelity_end: ok"

# Crash recovery without luck:
#   - a mount waits for a holder of its source that is dying, and names a live one. The
#     dying holder is made deterministic: a process takes the source's lock (a regular
#     file's OFD lock, a block device's O_EXCL), and is killed while one of its reads hangs
#     in another FUSE server (a second fleecefs whose fleecing reads take 3 s), so it stays
#     dying, with its files open, for those seconds;
#   - an interrupted request (a signal, or a client killed mid-request) is not an error
#     in the daemon's log (fuser logged "Failed to send FUSE reply: No such file or
#     directory" at error level).
source "$(dirname "$0")/lib.sh"
M=$((1 << 20))
STALL_MS=3000

# The stalling server: its snapshot reads from the fleecing file sleep STALL_MS first.
head -c $((4 * M)) /dev/urandom >"$T/stall.img"
FLEECEFS_FAULT_FLEECE_READ=delay=$STALL_MS fmount "$T/st" --state-dir "$T/sst" \
    --device s=$T/stall.img --cbw-buffer 0 --threads 1
"$FLEECEFS" setup "$T/st" --target t >/dev/null
dd if=/dev/zero of="$T/st/live/s" bs=64K count=16 conv=notrunc status=none   # fleeced

# holder.py SOURCE lock|excl STALLFILE OFFSET : opens SOURCE and takes what fleecefs takes
# (an OFD write lock over the file, or O_EXCL), prints "ready", then reads STALLFILE.
cat >"$T/holder.py" <<'EOF'
import fcntl, os, struct, sys
src, how, stall, off = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if how == "excl":
    fd = os.open(src, os.O_RDWR | os.O_EXCL)
else:
    fd = os.open(src, os.O_RDWR)
    F_OFD_SETLK = 37
    fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hhqqixxxx", fcntl.F_WRLCK, 0, 0, 0, 0))
print("ready", flush=True)
s = os.open(stall, os.O_RDONLY | os.O_DIRECT)
buf = bytearray(65536)
os.preadv(s, [memoryview(buf)], off)
EOF
off=0
# kill_holder_slowly SOURCE lock|excl : starts a holder of SOURCE, checks that a mount
# names it while it lives, then kills it during its stalled read; sets HOLDER to its pid
kill_holder_slowly() {
    local src=$1 how=$2
    python3 "$T/holder.py" "$src" "$how" "$T/st/snapshot/s" $off >"$T/ready" &
    HOLDER=$!
    off=$((off + 65536))                       # a cluster not yet read (no cache)
    for _ in $(seq 100); do grep -q ready "$T/ready" && break; sleep 0.05; done
    grep -q ready "$T/ready" || fail "$how holder did not start"
    # a live holder is named, and nothing is mounted
    mkdir -p "$T/m"
    expect_fail_with "held by pid $HOLDER (" \
        "$FLEECEFS" mount "$T/m" --state-dir "$T/s" --device d="$src"
    sleep 0.5                                  # its read is in the stalling server now
    kill -9 $HOLDER
    for _ in $(seq 100); do
        grep -q "^State:.*D" "/proc/$HOLDER/status" 2>/dev/null && break
        sleep 0.01
    done
    grep -q "^State:.*D" "/proc/$HOLDER/status" 2>/dev/null || fail "$how holder is not dying"
}
# dying_holder_waited SOURCE lock|excl : a holder dies slowly; a mount waits for it
dying_holder_waited() {
    local src=$1 how=$2 start ms
    kill_holder_slowly "$src" "$how"
    start=$(date +%s%N)
    fmount "$T/m" --state-dir "$T/s" --device d="$src" 2>"$T/err" ||
        fail "$how: mount while the holder was dying: $(cat "$T/err")"
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    ! kill -0 $HOLDER 2>/dev/null || fail "$how holder still there after the mount"
    [ "$ms" -ge 1000 ] || fail "$how: the mount took $ms ms: the holder was not dying"
    echo "$how: the mount waited $ms ms for the dying holder"
    wait $HOLDER 2>/dev/null || true
    "$FLEECEFS" unmount "$T/m"
}

head -c $((8 * M)) /dev/urandom >"$T/src.img"
dying_holder_waited "$T/src.img" lock

loop_attach "$T/src.img"
dying_holder_waited "$LOOPDEV" excl
# the kernel's own claim (a mounted filesystem) is named as such, at once
mkfs.ext4 -q "$LOOPDEV"
mkdir -p "$T/ext4"
mount "$LOOPDEV" "$T/ext4"
LOOPS+=("$T/ext4")
start=$(date +%s%N)
expect_fail_with "no process has it open: a mounted filesystem" \
    "$FLEECEFS" mount "$T/m" --state-dir "$T/s" --device d="$LOOPDEV"
ms=$(( ($(date +%s%N) - start) / 1000000 ))
[ "$ms" -lt 2000 ] || fail "a mounted block device was refused only after $ms ms"
umount "$T/ext4"

# --- a holder still dying after the 5 s wait is named as such --------------------------
"$FLEECEFS" unmount "$T/st"
FLEECEFS_FAULT_FLEECE_READ=delay=9000 fmount "$T/st" --state-dir "$T/sst" \
    --device s=$T/stall.img --cbw-buffer 0 --threads 1
"$FLEECEFS" setup "$T/st" --target t >/dev/null
dd if=/dev/zero of="$T/st/live/s" bs=64K count=1 conv=notrunc status=none
off=0
kill_holder_slowly "$T/src.img" lock
expect_fail_with "held by pid $HOLDER (python3), still exiting after being killed" \
    "$FLEECEFS" mount "$T/m" --state-dir "$T/s" --device d="$T/src.img"
wait $HOLDER 2>/dev/null || true

# --- interrupted requests are not errors in the log -----------------------------------
# A signal to a process waiting for a request makes the kernel send FUSE_INTERRUPT; fuser
# answers it with ENOSYS. When the request itself was answered in between (by another
# worker thread), the kernel answers that ENOSYS with ENOENT, and fuser logged "Failed to
# send FUSE reply: No such file or directory" at error level; a client killed mid-request
# does the same. An accepted ENOSYS turns interrupts off for the connection, so every
# round is a fresh mount: a client reading 4K blocks of live/s in a loop gets 200 signals
# while three more clients keep the worker threads and CPUs busy. It is a race (the ENOSYS
# must lose it), so the test fails only with some probability: with that case logged at
# error level again, 8 of 10 such mounts on this machine logged it (1 to 20 times each),
# and the first version of this test, without the busy clients, 3 of 8.
cat >"$T/sigclient.py" <<'EOF'
import os, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *a: None)
fd = os.open(sys.argv[1], os.O_RDONLY)
print("ready", flush=True)
end = time.time() + 0.3
n = 0
while time.time() < end:
    os.pread(fd, 4096, (n % 256) * 4096)
    n += 1
EOF
"$FLEECEFS" unmount "$T/st"
for round in $(seq 10); do
    rm -f "$T/sst/fleecefs.log"
    fmount "$T/st" --state-dir "$T/sst" --device s=$T/stall.img
    busy=()
    for _ in 1 2 3; do
        python3 "$T/sigclient.py" "$T/st/live/s" >/dev/null &
        busy+=($!)
    done
    python3 "$T/sigclient.py" "$T/st/live/s" >"$T/ready" &
    client=$!
    for _ in $(seq 200); do grep -q ready "$T/ready" && break; sleep 0.01; done
    for _ in $(seq 200); do kill -USR1 $client 2>/dev/null || true; done
    wait $client || fail "round $round: the signalled client failed"
    for b in "${busy[@]}"; do wait "$b" || fail "round $round: a busy client failed"; done
    "$FLEECEFS" unmount "$T/st"
    ! grep "Failed to send FUSE reply" "$T/sst/fleecefs.log" ||
        fail "round $round: an interrupted request was logged as an error"
done
echo "ok: dying holders of a locked file and of an O_EXCL block device waited for, live ones, one dying too long and a mounted filesystem named, interrupted requests not logged as errors"

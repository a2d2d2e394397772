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

# holder.py SOURCE lock|excl STALLFILE OFFSET GO : opens SOURCE and takes what fleecefs
# takes (an OFD write lock over the file, or O_EXCL), opens STALLFILE, prints "ready",
# waits for the file GO to exist, prints "reading" and reads STALLFILE (nothing else blocks
# after that line).
cat >"$T/holder.py" <<'EOF'
import fcntl, os, struct, sys
import time
src, how, stall, off, go = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
if how == "excl":
    fd = os.open(src, os.O_RDWR | os.O_EXCL)
else:
    fd = os.open(src, os.O_RDWR)
    F_OFD_SETLK = 37
    fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hhqqixxxx", fcntl.F_WRLCK, 0, 0, 0, 0))
s = os.open(stall, os.O_RDONLY | os.O_DIRECT)
buf = bytearray(65536)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
print("reading", flush=True)
os.preadv(s, [memoryview(buf)], off)
EOF
off=0
# wait_line FILE LINE PID WHAT : waits (30 s at most) until FILE holds LINE, failing
# at once if PID exits first
wait_line() {
    for _ in $(seq 3000); do
        grep -qx "$2" "$1" && return 0
        kill -0 "$3" 2>/dev/null || break
        sleep 0.01
    done
    grep -qx "$2" "$1" || fail "$4: $(cat "$T/holder.err" 2>/dev/null)"
}
# kill_holder_slowly SOURCE lock|excl : starts a holder of SOURCE, checks that a mount
# names it while it lives, then kills it during its stalled read; sets HOLDER to its pid
kill_holder_slowly() {
    local src=$1 how=$2
    rm -f "$T/go" "$T/ready"   # not truncated by the redirection below before it runs
    python3 "$T/holder.py" "$src" "$how" "$T/st/snapshot/s" $off "$T/go" >"$T/ready" 2>"$T/holder.err" &
    HOLDER=$!
    off=$((off + 65536))                       # a cluster not yet read (no cache)
    wait_line "$T/ready" ready $HOLDER "$how holder did not start"
    # a live holder is named, and nothing is mounted
    mkdir -p "$T/m"
    expect_fail_with "held by pid $HOLDER (" \
        "$FLEECEFS" mount "$T/m" --state-dir "$T/s" --device d="$src"
    # now its read: once it sleeps after "reading", it waits for the stalling server
    touch "$T/go"
    wait_line "$T/ready" reading $HOLDER "$how holder did not start its read"
    for _ in $(seq 3000); do
        grep -q "^State:.*[SD]" "/proc/$HOLDER/status" 2>/dev/null && break
        sleep 0.01
    done
    sleep 0.5                                  # and the server has taken the request
    kill -9 $HOLDER
    for _ in $(seq 3000); do                   # until it is dying (D) or dead (Z)
        grep -q "^State:.*[DZ]" "/proc/$HOLDER/status" 2>/dev/null && break
        sleep 0.01
    done
    grep -q "^State:.*D" "/proc/$HOLDER/status" 2>/dev/null || fail "$how holder is not dying"
}
# new_log LINES : what the last mount said: its stderr ($T/err) and what the log of
# $T/s got after its first LINES lines
new_log() { cat "$T/err"; tail -n +$(($1 + 1)) "$T/s/fleecefs.log" 2>/dev/null || true; }
# dying_holder_waited SOURCE lock|excl : a holder dies slowly; a mount waits for it
dying_holder_waited() {
    local src=$1 how=$2 start ms
    kill_holder_slowly "$src" "$how"
    logged=$({ wc -l <"$T/s/fleecefs.log"; } 2>/dev/null || echo 0)
    start=$(date +%s%N)
    fmount "$T/m" --state-dir "$T/s" --device d="$src" 2>"$T/err" ||
        fail "$how: mount while the holder was dying: $(cat "$T/err")"
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    ! kill -0 $HOLDER 2>/dev/null || fail "$how holder still there after the mount"
    [ "$ms" -ge 1000 ] || fail "$how: the mount took $ms ms: the holder was not dying"
    new_log "$logged" | grep -q "waiting (at most 5 s) for pid $HOLDER (python3), killed and still exiting" ||
        fail "$how: the mount does not say it waits for the dying holder: $(new_log "$logged")"
    echo "$how: the mount waited $ms ms for the dying holder"
    wait $HOLDER 2>/dev/null || true
    "$FLEECEFS" unmount "$T/m"
}

head -c $((8 * M)) /dev/urandom >"$T/src.img"
dying_holder_waited "$T/src.img" lock

loop_attach "$T/src.img"
dying_holder_waited "$LOOPDEV" excl
# the kernel's own claim (a mounted filesystem) is named as such, at once (not waited for)
mkfs.ext4 -q "$LOOPDEV"
mkdir -p "$T/ext4"
mount "$LOOPDEV" "$T/ext4"
LOOPS+=("$T/ext4")
logged=$({ wc -l <"$T/s/fleecefs.log"; } 2>/dev/null || echo 0)
"$FLEECEFS" mount "$T/m" --state-dir "$T/s" --device d="$LOOPDEV" 2>"$T/err" &&
    fail "a mounted block device was mounted"
grep -q "no process has it open: a mounted filesystem" "$T/err" || fail "mounted block device: $(cat "$T/err")"
! new_log "$logged" | grep -q "waiting (at most" ||
    fail "a mounted block device was waited for: $(new_log "$logged")"
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
# until the test has sent its signals (an exiting python resets the handler, and a
# signal then would kill it); at least 0.3 s, at most 60 s
start = time.time()
n = 0
while time.time() < start + 0.3 or (not os.path.exists(sys.argv[2]) and time.time() < start + 60):
    os.pread(fd, 4096, (n % 256) * 4096)
    n += 1
EOF
"$FLEECEFS" unmount "$T/st"
for round in $(seq 10); do
    rm -f "$T/sst/fleecefs.log" "$T/signalled"
    fmount "$T/st" --state-dir "$T/sst" --device s=$T/stall.img
    busy=()
    for _ in 1 2 3; do
        python3 "$T/sigclient.py" "$T/st/live/s" "$T/signalled" >/dev/null &
        busy+=($!)
    done
    rm -f "$T/ready"           # the last round's "ready" would be read too early otherwise
    python3 "$T/sigclient.py" "$T/st/live/s" "$T/signalled" >"$T/ready" &
    client=$!
    # its SIGUSR1 handler is set once it says ready; a signal before that would kill it
    for _ in $(seq 3000); do grep -q ready "$T/ready" && break; sleep 0.01; done
    grep -q ready "$T/ready" || fail "round $round: the signalled client did not start in 30 s"
    for _ in $(seq 200); do kill -USR1 $client 2>/dev/null || true; done
    touch "$T/signalled"
    wait $client || fail "round $round: the signalled client failed (exit $?)"
    for b in "${busy[@]}"; do wait "$b" || fail "round $round: a busy client failed"; done
    "$FLEECEFS" unmount "$T/st"
    ! grep "Failed to send FUSE reply" "$T/sst/fleecefs.log" ||
        fail "round $round: an interrupted request was logged as an error"
done
echo "ok: dying holders of a locked file and of an O_EXCL block device waited for, live ones, one dying too long and a mounted filesystem named, interrupted requests not logged as errors"

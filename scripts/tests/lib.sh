# Shared helpers for shell tests. Source it; it sets up a temp dir and a trap that
# unmounts and cleans up whatever the test mounted, whatever happens.
set -euo pipefail
FLEECEFS=${FLEECEFS:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/target/debug/fleecefs}
[ -x "$FLEECEFS" ] || { echo "build first: $FLEECEFS is missing" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "shell tests need root" >&2; exit 1; }
T=$(mktemp -d /tmp/fleecefs-test.XXXXXX)
MOUNTS=()
LOOPS=()
cleanup() {
    local rc=$?
    for l in "${LOOPS[@]}"; do
        umount "$l" 2>/dev/null || true
    done
    for m in "${MOUNTS[@]}"; do
        "$FLEECEFS" unmount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$T"
    exit $rc
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
# fmount MOUNTPOINT ARGS... : `fleecefs mount MOUNTPOINT ARGS...`, unmounted at exit
fmount() {
    local mp=$1
    shift
    # A mount point left by a killed daemon answers ENOTCONN to stat once the kernel's
    # cached attributes expire (1 s), which makes `mkdir -p` fail; `fleecefs mount`
    # cleans such a stale mount itself, so only a missing directory is created here.
    mkdir -p "$mp" 2>/dev/null || true
    MOUNTS+=("$mp")
    "$FLEECEFS" mount "$mp" "$@"
}
# random_mib FILE OFFSET_MIB COUNT_MIB : COUNT_MIB MiB of random data written into FILE at
# OFFSET_MIB MiB
random_mib() {
    head -c $(($3 << 20)) /dev/urandom | dd of="$1" bs=1M seek="$2" conv=notrunc iflag=fullblock status=none
}
# pattern BYTE COUNT : COUNT bytes of BYTE (hex, e.g. 0x5d) on stdout
pattern() { head -c "$2" /dev/zero | tr '\0' "\\$(printf '%03o' "$1")"; }
# start_writer FILE BLOCKS : background writer of random 4K blocks into FILE (any of the
# first BLOCKS blocks). `pause_writer` waits until it is idle between writes;
# `resume_writer` lets it go on; `stop_writer` ends it. Writes counted in $T/writes.
start_writer() {
    local file=$1 blocks=$2
    rm -f "$T/stop" "$T/pause" "$T/paused"
    (
        n=0
        while [ ! -e "$T/stop" ]; do
            if [ -e "$T/pause" ]; then
                touch "$T/paused"
                sleep 0.01
                continue
            fi
            rm -f "$T/paused"
            dd if=/dev/urandom of="$file" bs=4096 count=1 seek=$(( (RANDOM * 32768 + RANDOM) % blocks )) \
                conv=notrunc status=none
            n=$((n + 1))
            echo $n >"$T/writes.tmp" && mv "$T/writes.tmp" "$T/writes"   # atomic for readers
        done
    ) &
    WRITER=$!
}
pause_writer() {
    touch "$T/pause"
    while [ ! -e "$T/paused" ]; do sleep 0.01; done
}
resume_writer() { rm -f "$T/pause" "$T/paused"; }
stop_writer() { touch "$T/stop"; wait "$WRITER" 2>/dev/null || true; }
writes() { cat "$T/writes" 2>/dev/null || echo 0; }
# status_json MOUNTPOINT PYEXPR : evaluates PYEXPR (python, `d` is the parsed
# `fleecefs status MOUNTPOINT --json`) and prints the result, e.g.
# status_json "$T/mnt" 'd["access"]["copied_bytes"]'
status_json() {
    "$FLEECEFS" status "$1" --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print('"$2"')'
}
# wait_restarts MNT N : until the keeper of MNT has started a new worker N times in all
# (20 s at most)
wait_restarts() {
    local i
    for i in $(seq 400); do
        [ "$(status_json "$1" 'd["worker_restarts"]' 2>/dev/null || echo -1)" -ge "$2" ] 2>/dev/null &&
            return 0
        sleep 0.05
    done
    fail "no worker restart $2 of $1 within 20 s: $("$FLEECEFS" status "$1" --json 2>&1 | tail -3)"
}
# expect_fail_with TEXT CMD... : CMD must exit non-zero with TEXT in its stderr
expect_fail_with() {
    local text=$1 err rc=0
    shift
    err=$("$@" 2>&1 >/dev/null) || rc=$?
    [ "$rc" != 0 ] || fail "expected failure ($text) but succeeded: $*"
    case "$err" in
    *"$text"*) ;;
    *) fail "expected '$text' from: $* ; got: $err" ;;
    esac
}
# expect_rc RC TEXT CMD... : CMD must exit with status RC and TEXT in its stderr
expect_rc() {
    local want=$1 text=$2 err rc=0
    shift 2
    err=$("$@" 2>&1 >/dev/null) || rc=$?
    [ "$rc" = "$want" ] || fail "exit $rc (want $want) from: $* ; stderr: $err"
    case "$err" in
    *"$text"*) ;;
    *) fail "expected '$text' from: $* ; got: $err" ;;
    esac
}
# js FILE PYEXPR : evaluates PYEXPR on the JSON in FILE (`d`) and prints the result
js() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print('"$2"')' "$1"; }
# writes_now : like `writes`, but never reads the counter while the writer rewrites it
writes_now() {
    local n=
    while [ -z "$n" ]; do
        n=$(cat "$T/writes" 2>/dev/null || echo 0)
    done
    echo "$n"
}
# loop_attach FILE : attaches FILE to a free loop device and sets LOOPDEV to it. At exit
# (before the usual cleanup) the filesystems in LOOPS are unmounted and the devices still
# attached detached. `loop_detach DEV` detaches it earlier (and waits until it is gone).
LOOPDEVS=()
loop_attach() {
    LOOPDEV=$(losetup -f --show "$1")
    LOOPDEVS+=("$LOOPDEV")
    trap cleanup_loops EXIT
}
loop_detach() {
    local l keep=()
    losetup -d "$1"
    for l in "${LOOPDEVS[@]}"; do
        [ "$l" = "$1" ] || keep+=("$l")
    done
    LOOPDEVS=("${keep[@]}")
    for _ in $(seq 100); do
        [ -z "$(losetup -n -O BACK-FILE "$1" 2>/dev/null)" ] && return 0
        sleep 0.05
    done
    echo "loop device $1 is still attached" >&2
    return 1
}
cleanup_loops() {
    local rc=$? l
    # background jobs (writers, churn) would keep the filesystems on the loop devices busy
    for l in $(jobs -p); do
        kill "$l" 2>/dev/null || true
        wait "$l" 2>/dev/null || true
    done
    for l in "${LOOPS[@]}"; do
        for _ in $(seq 50); do # a killed job's last command may still hold it briefly
            umount "$l" 2>/dev/null && break
            mountpoint -q "$l" 2>/dev/null || break
            sleep 0.1
        done
    done
    for l in "${LOOPDEVS[@]}"; do
        losetup -d "$l" 2>/dev/null || true
    done
    for l in "${LOOPDEVS[@]}"; do
        for _ in $(seq 50); do
            [ -n "$(losetup -n -O BACK-FILE "$l" 2>/dev/null)" ] || break
            sleep 0.1
        done
    done
    # cleanup takes the exit status from $?; `if` keeps set -e from exiting here
    if (exit $rc); then cleanup; else cleanup; fi
}
# setup_during_writes MOUNTPOINT SOURCE TARGET [SETUP ARGS...] : with start_writer
# running, pause it, copy SOURCE to $T/ref.img (the point-in-time image), set up the
# access, resume the writer. $BEFORE is the number of writes made until setup.
setup_during_writes() {
    local mp=$1 src=$2 target=$3
    shift 3
    sleep 0.3
    pause_writer
    cp "$src" "$T/ref.img"
    "$FLEECEFS" setup "$mp" --target "$target" "$@" >/dev/null
    resume_writer
    BEFORE=$(writes_now)
}
# teardown_clean TARGET : tears down TARGET's access at $T/mnt (state $T/state) as a
# success, and checks that no fleecing file is left
teardown_clean() {
    "$FLEECEFS" teardown "$T/mnt" --target "$1" --success >/dev/null
    [ -z "$(ls "$T/state/fleecing")" ] || fail "fleecing files left after teardown"
}

# ext4_on_live [NAME [MIB]] : a MIB (default 128) MiB image $T/NAME.img (NAME default
# disk) served as live/NAME at $T/mnt (state $T/state), an ext4 made on it and mounted at
# $E through a loop device ($LOOPDEV); sets L=live/NAME, E
ext4_on_live() {
    local name=${1:-disk} mib=${2:-128}
    truncate -s $((mib * 1024 * 1024)) "$T/$name.img"
    fmount "$T/mnt" --state-dir "$T/state" --device "$name=$T/$name.img"
    L=$T/mnt/live/$name
    mkfs.ext4 -F -q "$L" || fail "mkfs.ext4 on live/$name failed"
    loop_attach "$L"
    E=$T/ext4
    mkdir -p "$E"
    LOOPS+=("$E")
mount -o noatime "$LOOPDEV" "$E" || fail "mounting the ext4 on $LOOPDEV failed"
}
# other_user : an unprivileged user for tests that act as one (fleecefs-test, created if
# missing; tests running at once may both try). Sets U and UID_U; `as_user CMD...` runs
# CMD as that user, without supplementary groups.
other_user() {
    U=fleecefs-test
    id -u "$U" >/dev/null 2>&1 ||
        useradd --system --no-create-home --shell /usr/sbin/nologin "$U" 2>/dev/null ||
        id -u "$U" >/dev/null || fail "cannot create the user $U"
    UID_U=$(id -u "$U")
}
as_user() { setpriv --reuid="$U" --regid="$U" --clear-groups "$@"; }

#!/usr/bin/env bash
# fleecefs demo, end to end on a fresh machine (root, Debian):
# builds fleecefs, creates a sample disk image, mounts it, starts a writer that keeps
# writing the live image, sets up a backup, copies the snapshot with cp while the writer
# runs, verifies the copy against the image as it was at setup, tears down, unmounts.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo: run as root (it mounts a FUSE filesystem)" >&2; exit 1; }
source scripts/check-toolchain.sh demo # cargo and rustc new enough, else one line, exit 1

SIZE_MB=${DEMO_SIZE_MB:-256}
echo "== building fleecefs (release)"
cargo build --release --quiet
BIN=$PWD/target/release/fleecefs
D=$(mktemp -d /tmp/fleecefs-demo.XXXXXX)
cleanup() {
    touch "$D/stop" 2>/dev/null || true
    wait 2>/dev/null || true
    "$BIN" unmount "$D/mnt" 2>/dev/null || umount -l "$D/mnt" 2>/dev/null || true
    rm -rf "$D"
}
trap cleanup EXIT

echo "== creating a ${SIZE_MB} MiB sample image in $D"
head -c $((SIZE_MB << 20)) /dev/urandom >"$D/vm.img"
mkdir "$D/mnt"
"$BIN" mount "$D/mnt" --state-dir "$D/state" --device vm=$D/vm.img
echo "== mounted $D/mnt: live/vm is the image, snapshot/ appears at setup"

# The 'guest': rewrites random 64 KiB blocks of the live image until told to stop.
# It can be paused between writes so the demo knows the exact image at setup.
(
    blocks=$((SIZE_MB * 16))
    while [ ! -e "$D/stop" ]; do
        if [ -e "$D/pause" ]; then touch "$D/paused"; sleep 0.01; continue; fi
        rm -f "$D/paused"
        dd if=/dev/urandom of="$D/mnt/live/vm" bs=64K count=1 seek=$(( (RANDOM * 32768 + RANDOM) % blocks )) \
            conv=notrunc status=none
        echo x >>"$D/writes"
    done
) &
sleep 0.5

touch "$D/pause"; while [ ! -e "$D/paused" ]; do sleep 0.01; done
cp "$D/vm.img" "$D/expected.img"          # what the backup must contain
"$BIN" setup "$D/mnt" --target demo
rm -f "$D/pause"
w0=$(wc -l <"$D/writes")
start=$(date +%s%N)
echo "== copying snapshot/vm with cp while the writer keeps writing"
cp "$D/mnt/snapshot/vm" "$D/backup.img"
ms=$(( ($(date +%s%N) - start) / 1000000 ))
w1=$(wc -l <"$D/writes")
"$BIN" status "$D/mnt"
touch "$D/stop"; wait
"$BIN" teardown "$D/mnt" --target demo --success

if cmp -s "$D/backup.img" "$D/expected.img"; then result="IDENTICAL to the image at setup"; else result="DIFFERENT (bug!)"; fi
changed=$( (cmp -l "$D/vm.img" "$D/expected.img" 2>/dev/null || true) | wc -l)
"$BIN" unmount "$D/mnt"
echo
echo "== summary"
echo "  image:            ${SIZE_MB} MiB"
echo "  writes during cp: $((w1 - w0)) (64 KiB each), $((w0)) before setup"
echo "  live image now:   $changed bytes differ from the image at setup"
echo "  backup copy:      $result"
echo "  copy time:        ${ms} ms"
[ "$result" = "IDENTICAL to the image at setup" ]

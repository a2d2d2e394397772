#!/usr/bin/env bash
# Measures `fleecefs copy` (raw and qcow2, --jobs 1/2/4) against `qemu-img convert`
# reading the same snapshot, for docs/performance.md. As root:
#   scripts/bench-copy.sh [SIZE_MIB] [REPS]      (default 1024 MiB, 3 repetitions)
# The image is 60% random data in 1 MiB extents, 40% zeros; the source stays in the page
# cache (it is read once before), so the runs measure the FUSE snapshot path and the
# writes to DEST. Each copy includes making DEST durable (fleecefs fsyncs DEST; qemu-img
# convert is followed by `sync -f`). Prints the median of REPS per case, in MiB/s of
# device size.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-1024}
REPS=${2:-3}
F=${FLEECEFS:-$PWD/target/release/fleecefs}
[ -x "$F" ] || { echo "build first: cargo build --release" >&2; exit 1; }
T=$(mktemp -d /var/tmp/fleecefs-bench-copy.XXXXXX)
cleanup() { "$F" unmount "$T/mnt" 2>/dev/null || true; rm -rf "$T"; }
trap cleanup EXIT
python3 - "$T/src.img" "$SIZE" <<'PY'
import os, random, sys
random.seed(1)
path, mib = sys.argv[1], int(sys.argv[2])
blk = os.urandom(1 << 20)
with open(path, "wb") as f:
    f.truncate(mib << 20)
    for i in range(mib):
        if random.random() < 0.6:
            f.seek(i << 20)
            f.write(blk[i % 13 * 4096:] + blk[:i % 13 * 4096])
PY
cat "$T/src.img" >/dev/null
mkdir -p "$T/mnt" "$T/out"
"$F" mount "$T/mnt" --state-dir "$T/state" --device disk="$T/src.img"
"$F" setup "$T/mnt" --target bench >/dev/null
S=$T/mnt/snapshot/disk
run() { # NAME COMMAND...: median MiB/s over REPS
    local name=$1 i t0 t1
    shift
    local rates=()
    for i in $(seq "$REPS"); do
        rm -f "$T/out/"*
        sync
        t0=$(date +%s.%N)
        "$@" >/dev/null 2>&1
        t1=$(date +%s.%N)
        rates+=("$(python3 -c "print($SIZE / ($t1 - $t0))")")
    done
    python3 -c "import statistics,sys; r=[float(x) for x in sys.argv[2:]]; print(f'{sys.argv[1]:<34} {statistics.median(r):7.0f} MiB/s  (runs: {\" \".join(f\"{x:.0f}\" for x in r)})')" "$name" "${rates[@]}"
}
for j in 1 2 4; do
    run "fleecefs copy raw --jobs $j" "$F" copy "$T/mnt" disk "$T/out/d.img" --jobs $j
done
run "qemu-img convert -O raw" sh -c "qemu-img convert -f raw -O raw '$S' '$T/out/d.img' && sync -f '$T/out'"
for j in 1 2 4; do
    run "fleecefs copy qcow2 --jobs $j" "$F" copy "$T/mnt" disk "$T/out/d.qcow2" --format qcow2 --jobs $j
done
run "qemu-img convert -O qcow2" sh -c "qemu-img convert -f raw -O qcow2 -o cluster_size=65536 '$S' '$T/out/d.qcow2' && sync -f '$T/out'"
run "qemu-img convert -O qcow2 -m 4" sh -c "qemu-img convert -m 4 -f raw -O qcow2 -o cluster_size=65536 '$S' '$T/out/d.qcow2' && sync -f '$T/out'"
"$F" teardown "$T/mnt" --target bench --success >/dev/null

#!/usr/bin/env bash
# Runs every fleecefs test on a fresh Debian machine, as root:
#   1. installs what the tests need (Debian packages; Rust crates through cargo),
#   2. formatting and lint gates (cargo fmt, clippy -D warnings, cargo doc),
#   3. cargo tests: unit tests, engine model tests, real-mount integration tests,
#   4. shell tests in scripts/tests/*.sh with the tools people use (cp, dd, rsync, ...).
# It prints 'N passed, N failed' for the shell tests and exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh: run as root (the tests mount FUSE filesystems and loop devices)" >&2
    exit 1
fi
[ -e /dev/fuse ] || { echo "scripts/test.sh: /dev/fuse is missing (modprobe fuse)" >&2; exit 1; }
source scripts/check-toolchain.sh scripts/test.sh # cargo and rustc new enough, else one line, exit 1

# Debian packages the tests use; installed only when a tool is missing.
need=()
command -v rsync >/dev/null || need+=(rsync)
command -v restic >/dev/null || need+=(restic)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v fallocate >/dev/null || need+=(util-linux)
command -v cmp >/dev/null || need+=(diffutils)
command -v losetup >/dev/null || need+=(mount)
command -v fio >/dev/null || need+=(fio)
command -v strace >/dev/null || need+=(strace)
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if cargo fmt --version >/dev/null 2>&1; then
    echo "== cargo fmt --check"
    cargo fmt --check
else
    echo "== cargo fmt is not installed: formatting not checked"
fi
if cargo clippy --version >/dev/null 2>&1; then
    echo "== cargo clippy"
    cargo clippy --all-targets --features fault-injection --quiet -- -D warnings
fi
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet

echo "== cargo test"
cargo build --quiet --features fault-injection
cargo test --quiet --features fault-injection 2>&1 | tee /tmp/fleecefs-cargo-test.log
grep -q "test result: FAILED" /tmp/fleecefs-cargo-test.log && exit 1

echo "== shell tests"
export FLEECEFS="$PWD/target/debug/fleecefs"
passed=0
failed=0
failed_names=()
for t in scripts/tests/*.sh; do
    [ -e "$t" ] || continue
    [ "$(basename "$t")" = lib.sh ] && continue     # helpers, not a test
    name=$(basename "$t" .sh)
    start=$(date +%s)
    if bash "$t" >"/tmp/fleecefs-$name.log" 2>&1; then
        passed=$((passed + 1))
        echo "ok   $name ($(( $(date +%s) - start ))s)"
    else
        failed=$((failed + 1))
        failed_names+=("$name")
        echo "FAIL $name ($(( $(date +%s) - start ))s); its output:"
        sed 's/^/    /' "/tmp/fleecefs-$name.log" | tail -40
    fi
done
echo "shell: $passed passed, $failed failed"
[ "$failed" = 0 ] || { echo "failed: ${failed_names[*]}" >&2; exit 1; }

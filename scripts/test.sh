#!/usr/bin/env bash
# Runs every fleecefs test on a fresh Debian machine, as root:
#   1. installs what the tests need (Debian packages; Rust crates through cargo),
#   2. formatting and lint gates (cargo fmt, clippy -D warnings, cargo doc),
#   3. cargo tests: unit tests, engine model tests, and (feature root-tests) the
#      real-mount integration tests,
#   4. shell tests in scripts/tests/*.sh with the tools people use (cp, dd, rsync, ...).
# Every group runs even when an earlier one failed; at the end it prints one line per
# group and exits non-zero if any failed.
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
command -v setpriv >/dev/null || need+=(util-linux)
command -v useradd >/dev/null || need+=(passwd)
[ -x /usr/bin/python3 ] || need+=(python3)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v nbdcopy >/dev/null || need+=(libnbd-bin)
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need+=(python3-libnbd)
command -v openssl >/dev/null || need+=(openssl)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
# the VM test's initramfs needs a static busybox
{ command -v busybox >/dev/null && ! ldd "$(command -v busybox)" >/dev/null 2>&1; } || need+=(busybox-static)
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
# QEMU 8.2 or newer: its NBD client speaks extended headers (nbd_extended.sh). Debian
# bookworm's own QEMU is 7.2, so there QEMU comes from bookworm-backports, qemu-utils and
# qemu-system-x86 together.
qemu_recent() {
    local v
    v=$(qemu-img --version 2>/dev/null | sed -n '1s/^qemu-img version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    [ -n "$v" ] || return 1
    set -- $v
    [ "$1" -gt 8 ] || { [ "$1" -eq 8 ] && [ "$2" -ge 2 ]; }
}
qemu_backports=false
if grep -qs '^VERSION_CODENAME=bookworm' /etc/os-release && ! qemu_recent; then
    qemu_backports=true
    for p in qemu-utils qemu-system-x86; do
        [[ " ${need[*]} " == *" $p "* ]] || need+=("$p")
    done
fi
# The machine's qemu-utils may be a Debian backport (QEMU 10 on bookworm): take
# qemu-system-x86 from the same suite, so that apt keeps one QEMU version (installing
# bookworm's own 7.2 would remove the backported qemu-utils) and the tests run one QEMU.
qemu_suite=()
if [[ " ${need[*]} " == *" qemu-system-x86 "* ]] && { $qemu_backports ||
    [[ "$(dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null)" == *bpo12* ]]; }; then
    if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "== adding Debian's bookworm-backports suite (for qemu-system-x86 of the installed QEMU)"
        printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
            'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
            >/etc/apt/sources.list.d/fleecefs-tests-backports.sources
    fi
    qemu_suite=(-t bookworm-backports)
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    qemu=() rest=()
    for p in "${need[@]}"; do
        case "$p" in qemu-system-x86 | qemu-utils) qemu+=("$p") ;; *) rest+=("$p") ;; esac
    done
    [ ${#rest[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${rest[@]}" >/dev/null
    [ ${#qemu[@]} -eq 0 ] ||
        apt-get install -y -qq --no-install-recommends "${qemu_suite[@]}" "${qemu[@]}" >/dev/null
    # Installing qemu-system-x86 of another QEMU version than qemu-utils' removes
    # qemu-utils (qemu-storage-daemon moves between packages): put it back.
    if ! command -v qemu-img >/dev/null || ! command -v qemu-nbd >/dev/null; then
        echo "== installing qemu-utils (removed by the qemu-system-x86 install)"
        apt-get install -y -qq --no-install-recommends "${qemu_suite[@]}" qemu-utils >/dev/null
    fi
fi
echo "== QEMU: $(qemu-img --version | head -1)"

# Each group's outcome, in order: "ok NAME", "FAIL NAME" or "skipped NAME (why)".
summary=()
failures=0
record() { # record STATUS NAME
    summary+=("$1 $2")
    [ "$1" = FAIL ] && failures=$((failures + 1))
    return 0
}
run_group() { # run_group NAME COMMAND...: runs it, records the outcome
    local name=$1
    shift
    echo "== $name"
    if "$@"; then record ok "$name"; else record FAIL "$name"; fi
}

if cargo fmt --version >/dev/null 2>&1; then
    run_group fmt cargo fmt --check
else
    record skipped "fmt (cargo fmt is not installed)"
fi
if cargo clippy --version >/dev/null 2>&1; then
    run_group clippy cargo clippy --all-targets --features fault-injection,root-tests --quiet -- -D warnings
else
    record skipped "clippy (cargo clippy is not installed)"
fi
run_group doc env RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet

cargo_tests() {
    local log=/tmp/fleecefs-cargo-test.log
    cargo build --quiet --features fault-injection || return 1
    # pipefail: the status is cargo's (tee only shows the output).
    cargo test --quiet --features fault-injection,root-tests 2>&1 | tee "$log"
}
run_group "cargo tests" cargo_tests

shell_tests() {
    if [ ! -x "$PWD/target/debug/fleecefs" ]; then
        echo "no target/debug/fleecefs (the build failed): shell tests not run" >&2
        return 1
    fi
    export FLEECEFS="$PWD/target/debug/fleecefs"
    local passed=0 failed=0 failed_names=() t name start
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
    [ "$failed" = 0 ] || { echo "failed: ${failed_names[*]}" >&2; return 1; }
}
run_group "shell tests" shell_tests

echo "== summary"
for line in "${summary[@]}"; do
    echo "  $line"
done
if [ "$failures" -gt 0 ]; then
    echo "scripts/test.sh: $failures of ${#summary[@]} groups failed" >&2
    exit 1
fi
echo "scripts/test.sh: all groups passed"

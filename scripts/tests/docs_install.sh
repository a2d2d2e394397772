#!/usr/bin/env bash
# The install path of the README, as a new user on Debian meets it. scripts/demo.sh and
# scripts/test.sh stop at once, with one line on stderr naming rustup and exit 1, when
# cargo or rustc is older than Cargo.toml's rust-version (Debian's packaged 1.63 here,
# faked on PATH) or missing, before they build or install anything. The README's
# install commands put the binary where docs/fleecefs@.service runs it, and the README
# names the rust-version of Cargo.toml. (The install itself, a release build, is not run:
# it takes minutes.)
source "$(dirname "$0")/lib.sh"

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
need=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$ROOT/Cargo.toml")
[ -n "$need" ] || fail "no rust-version in Cargo.toml"

# Debian's toolchain, faked: both tools answer --version with 1.63.0 and record any other use
mkdir -p "$T/old" "$T/none"
for tool in cargo rustc; do
    cat >"$T/old/$tool" <<EOS
#!/bin/sh
[ "\$1" = --version ] && { echo "$tool 1.63.0 (Debian)"; exit 0; }
echo "\$*" >>"$T/used"
exit 0
EOS
    chmod +x "$T/old/$tool"
done
# a PATH with the usual system tools but no cargo or rustc
for tool in bash sh sed awk sort head id printf cat dirname env; do
    p=$(command -v "$tool") && ln -sf "$p" "$T/none/$tool"
done

check() { # check NAME SCRIPT PATH WANT
    local name=$1 script=$2 path=$3 want=$4 rc=0
    PATH=$path bash "$ROOT/$script" >"$T/out" 2>"$T/err" || rc=$?
    [ "$rc" = 1 ] || fail "$name: $script exits $rc, not 1; stderr: $(cat "$T/err")"
    [ ! -s "$T/out" ] || fail "$name: $script printed on stdout: $(cat "$T/out")"
    [ "$(wc -l <"$T/err")" = 1 ] || fail "$name: $script printed not one line on stderr: $(cat "$T/err")"
    grep -q "$want" "$T/err" || fail "$name: $script says: $(cat "$T/err")"
    grep -q "rustup" "$T/err" || fail "$name: $script does not name rustup: $(cat "$T/err")"
    [ ! -e "$T/used" ] || fail "$name: $script ran cargo/rustc for more than --version: $(cat "$T/used")"
}
for script in scripts/demo.sh scripts/test.sh; do
    check "old toolchain" "$script" "$T/old:$PATH" "cargo 1.63.0 is older than $need (rust-version in Cargo.toml)"
    check "no toolchain" "$script" "$T/none" "cargo is not installed"
done
# an old rustc with a new cargo is refused too
mkdir -p "$T/mixed"
ln -sf "$(command -v cargo)" "$T/mixed/cargo"
cp "$T/old/rustc" "$T/mixed/rustc"
check "old rustc" scripts/demo.sh "$T/mixed:$PATH" "rustc 1.63.0 is older than $need"

# the README: rustup, the rust-version, and an install where the unit looks
readme=$ROOT/README.md
grep -q "rustup" "$readme" || fail "the README does not say how to get a current toolchain (rustup)"
grep -q "Rust $need or newer" "$readme" || fail "the README does not name Rust $need (Cargo.toml's rust-version)"
install=$(grep -o '^cargo install --path \. --root [^ ]*' "$readme" | head -1)
[ -n "$install" ] || fail "the README has no 'cargo install --path . --root DIR' line"
bin="${install##* }/bin/fleecefs"
exec_start=$(sed -n 's/^ExecStart=\([^ ]*\) .*/\1/p' "$ROOT/docs/fleecefs@.service")
[ "$bin" = "$exec_start" ] || fail "the README installs $bin, the unit runs $exec_start"
echo "ok: demo.sh and test.sh refuse an old or missing toolchain in one line; README installs $bin as the unit expects"

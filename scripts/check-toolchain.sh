# Sourced by scripts/demo.sh and scripts/test.sh (from the repository root): stops with
# one line and exit 1 when cargo or rustc is missing or older than Cargo.toml's
# rust-version (Debian's packaged Rust is), naming rustup as the way to a current one.
# $1: the calling script's name, for the message.
check_toolchain() {
    local who=$1 need have tool
    need=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' Cargo.toml)
    for tool in cargo rustc; do
        if ! command -v "$tool" >/dev/null; then
            echo "$who: $tool is not installed: install a current Rust toolchain with rustup (https://rustup.rs), see README.md" >&2
            exit 1
        fi
        have=$("$tool" --version 2>/dev/null | awk '{print $2}')
        if [ -z "$have" ] || [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" != "$need" ]; then
            echo "$who: $tool ${have:-(unknown version)} is older than $need (rust-version in Cargo.toml): install a current toolchain with rustup (https://rustup.rs), see README.md" >&2
            exit 1
        fi
    done
}
check_toolchain "$1"

#!/usr/bin/env bash
# Builds the tiny test guest kernels (marker, memory, disk) from guest-images/tiny with the host
# Rust toolchain and installs them as ${ARKVM_CACHE:-$HOME/.cache/arkvm}/guests/<name>.elf.
#
# Usage: guest-images/build-tiny.sh [--test]
#   --test   also run the crate's host unit tests (cmdline/e820/region/pattern logic)
#
# Idempotent: cargo rebuilds only what changed, and an .elf is replaced only when its bytes
# change. Prints one output path per line on stdout; everything else goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
crate="$here/tiny"
cache="${ARKVM_CACHE:-$HOME/.cache/arkvm}"
out="$cache/guests"
target_dir="$out/target"
guests=(marker memory disk net)
run_tests=0

for arg in "$@"; do
    case "$arg" in
        --test) run_tests=1 ;;
        -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-tiny.sh: unknown argument '$arg'" >&2; exit 2 ;;
    esac
done

command -v cargo >/dev/null || { echo "build-tiny.sh: cargo not found (install Rust)" >&2; exit 1; }
mkdir -p "$out"

# The crate's .cargo/config.toml (target, relocation model) is found from the working
# directory; flags from the caller's environment would override it, so drop them.
cd "$crate"
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET CARGO_BUILD_RUSTFLAGS
export CARGO_TARGET_DIR="$target_dir"

if ! cargo build --release --locked --quiet --bins >&2; then
    echo "build-tiny.sh: FAILED to build the tiny guests in $crate" >&2
    exit 1
fi
if [ "$run_tests" = 1 ]; then
    cargo test --locked --quiet --lib >&2 || { echo "build-tiny.sh: unit tests FAILED" >&2; exit 1; }
fi

# Fails unless the ELF enters at 0x200000 and every PT_LOAD has p_vaddr == p_paddr and lies
# in [0x200000, 0x400000).
check_elf() {
    local f="$1" bad=0 type off vaddr paddr filesz memsz rest
    readelf -hW "$f" | grep -q 'Entry point address: *0x200000$' || bad=1
    while read -r type off vaddr paddr filesz memsz rest; do
        [ "$type" = LOAD ] || continue
        if [ "$vaddr" != "$paddr" ] || (( vaddr < 0x200000 || vaddr + memsz > 0x400000 )); then
            bad=1
        fi
    done < <(readelf -lW "$f")
    if [ "$bad" = 1 ]; then
        echo "build-tiny.sh: FAILED: $f breaks the boot contract (entry or segments):" >&2
        readelf -hlW "$f" >&2
        exit 1
    fi
}

built="$target_dir/x86_64-unknown-linux-gnu/release"
for g in "${guests[@]}"; do
    src="$built/$g"
    dst="$out/$g.elf"
    if [ ! -f "$src" ] || [ "$(head -c 4 "$src" | od -An -c | tr -d ' ')" != '177ELF' ]; then
        echo "build-tiny.sh: FAILED: $src is missing or not an ELF file" >&2
        exit 1
    fi
    # The boot contract: entry at 2 MiB, identity-placed PT_LOADs inside [2 MiB, 4 MiB).
    if command -v readelf >/dev/null; then
        check_elf "$src"
    fi
    if ! cmp -s "$src" "$dst"; then
        cp "$src" "$dst.tmp"
        mv -f "$dst.tmp" "$dst"
    fi
    echo "$dst"
done

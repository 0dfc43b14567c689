# Shared helpers for arkvm's scripts. Source it; do not run it.
# Everything installed or built here is cached outside the repository, under $ARKVM_CACHE.

export ARKVM_CACHE="${ARKVM_CACHE:-$HOME/.cache/arkvm}"
ARKVM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ARKVM_ROOT

# Bold only on a terminal: no colour escapes in logs and pipes.
if [ -t 2 ]; then
    say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
else
    say() { printf '==> %s\n' "$*" >&2; }
fi
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

require_kvm() {
    [ -e /dev/kvm ] || die "/dev/kvm is missing: arkvm and its tests need KVM (load kvm_intel/kvm_amd, or run on a host with virtualization)"
    [ -r /dev/kvm ] && [ -w /dev/kvm ] || die "/dev/kvm is not readable and writable by $(id -un)"
}

# Host packages the build needs: a C toolchain and libclang (userfaultfd's bindings are
# generated with bindgen), iproute2 for the DR tests' network namespaces, curl for the demo.
HOST_PACKAGES="build-essential libclang-dev pkg-config iproute2 curl strace"

ensure_packages() {
    local missing=()
    for p in $HOST_PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing host packages: ${missing[*]}"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        # apt's own output goes to a log, shown only if it fails.
        local log
        log="$(mktemp "${TMPDIR:-/tmp}/arkvm-apt.XXXXXX")"
        if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                $sudo apt-get install -y -qq "${missing[@]}"; } >"$log" 2>&1; then
            cat "$log" >&2
            rm -f "$log"
            die "installing ${missing[*]} failed"
        fi
        rm -f "$log"
    fi
    command -v cargo >/dev/null || die "cargo is missing: install a Rust toolchain (rustup)"
}

build_tiny_guests() {
    say "building the tiny guest kernels"
    bash "$ARKVM_ROOT/guest-images/build-tiny.sh" "$@"
}

build_linux_guest() {
    say "building the Linux guest (cached after the first run)"
    bash "$ARKVM_ROOT/guest-images/linux/build.sh"
}

build_guests() {
    build_tiny_guests "$@"
    build_linux_guest
}

build_arkvm() {
    say "building arkvm (release)"
    (cd "$ARKVM_ROOT" && cargo build --release --workspace --bins --locked)
}

# --- Object store (issue 12): the Ceph RGW that tests/s3.rs runs against ---------------------
# start_object_store starts scripts/ceph-rgw (installing Ceph's packages when missing) and puts
# its AWS_* settings into the environment; stop_object_store ends exactly what it started. The
# test command stops it on every exit, so no Ceph process outlives a run.
start_object_store() {
    say "starting Ceph RGW for the object-store tests"
    local env
    env="$(bash "$ARKVM_ROOT/scripts/ceph-rgw" start)"
    eval "$env"
    trap stop_object_store EXIT
}

stop_object_store() {
    bash "$ARKVM_ROOT/scripts/ceph-rgw" stop || true
}
# --- end object store ------------------------------------------------------------------------

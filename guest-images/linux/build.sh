#!/usr/bin/env bash
# Builds the arkvm Linux guest: a 6.1 vmlinux, two initramfs images and an ext4 disk image.
#
# Usage: guest-images/linux/build.sh [--force]
#
# The result is cached outside the repository, keyed by a hash of the inputs:
#   ${ARKVM_CACHE:-$HOME/.cache/arkvm}/linux/<hash>/
#       {vmlinux,initramfs.cpio.gz,initramfs-mini.cpio,disk-ext4.img}
#   ${ARKVM_CACHE:-$HOME/.cache/arkvm}/linux/current -> <hash>
# A run whose inputs are already built only prints the paths. Progress goes to stderr; stdout
# gets only shell assignments (ARKVM_LINUX_VMLINUX=... etc.), so `eval "$(build.sh)"` works.
#
# Environment: ARKVM_CACHE (cache root), ARKVM_JOBS (make -j, default 2),
# ARKVM_KEEP_BUILD=1 (keep the kernel build tree after a successful build).
# See README.md beside this file for what is built and why.

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${ARKVM_CACHE:-$HOME/.cache/arkvm}/linux
int3_patch=$here/0001-skip-int3-selftest.patch
fwait_patch=$here/0002-skip-fwait-in-fpu-drop.patch
fragment=$here/arkvm.config
init_script=$here/init.sh
mini_init_source=$here/mini-init.S
jobs=${ARKVM_JOBS:-2}

# The kernel command line every arkvm Linux boot on the test machine needs (README.md).
cmdline='console=ttyS0 noxsave clearcpuid=308,151'

# Packages the build needs. Those whose versions change the output are hashed (hashed_packages).
packages=(linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev busybox-static
    e2fsprogs fdisk xz-utils)
hashed_packages=(linux-source-6.1 busybox-static gcc binutils e2fsprogs)

# Options the boot path cannot do without. build.sh fails when one of them is missing from the
# final .config, whatever the fragment says.
required_options=(64BIT PRINTK TTY SERIAL_8250 SERIAL_8250_CONSOLE BLK_DEV_INITRD RD_GZIP
    DEVTMPFS DEVTMPFS_MOUNT PROC_FS SYSFS BINFMT_ELF BINFMT_SCRIPT VIRTIO VIRTIO_MMIO
    VIRTIO_MMIO_CMDLINE_DEVICES VIRTIO_BLK BLOCK MSDOS_PARTITION EXT4_FS SMP X86_MPPARSE
    HYPERVISOR_GUEST PARAVIRT KVM_GUEST PARAVIRT_CLOCK X86_LOCAL_APIC X86_IO_APIC)
min_nr_cpus=8

# Fixed identities and timestamps, so that two builds of the same inputs look alike.
build_epoch=1700000000
disk_uuid=61726b76-6d00-4c69-6e75-782d726f6f74
disk_label_id=0x61726b76

force=0
for arg in "$@"; do
    case $arg in
    --force) force=1 ;;
    -h | --help)
        awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
        exit 0
        ;;
    *)
        echo "build.sh: unknown argument '$arg' (try --help)" >&2
        exit 2
        ;;
    esac
done

start_time=$(date +%s)
log() { printf '[linux-guest %4ss] %s\n' "$(($(date +%s) - start_time))" "$*" >&2; }
die() {
    printf 'linux guest build failed: %s\n' "$*" >&2
    exit 1
}

# Prints "name=version" for each installed package given, nothing for missing ones.
installed_versions() {
    dpkg-query -W -f='${Package}=${Version} ${db:Status-Abbrev}\n' "$@" 2>/dev/null |
        awk '$2 == "ii" { print $1 }' || true
}

ensure_packages() {
    local have missing=() p
    have=$(installed_versions "${packages[@]}" | cut -d= -f1)
    for p in "${packages[@]}"; do
        grep -qx -- "$p" <<<"$have" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "stage: packages (installing ${missing[*]})"
    [ "$(id -u)" -eq 0 ] || die "missing packages ${missing[*]}; install them as root"
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        log "no apt package lists yet: apt-get update"
        apt-get update -q >&2 || die "apt-get update failed"
    fi
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >&2; then
        log "install failed; refreshing package lists and retrying once"
        apt-get update -q >&2 || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
    fi
}

# The cache key: this script, the patch, the config fragment, the guests' /init and the versions
# of the packages whose contents end up in the outputs.
input_hash() {
    {
        echo "arkvm linux guest inputs v1"
        for f in "$0" "$int3_patch" "$fwait_patch" "$fragment" "$init_script" "$mini_init_source"; do
            echo "== $(basename "$f")"
            cat "$f"
        done
        echo "== packages"
        installed_versions "${hashed_packages[@]}"
    } | sha256sum | cut -c1-16
}

print_paths() {
    local dir=$cache/$1
    printf 'ARKVM_LINUX_DIR=%s\n' "$dir"
    printf 'ARKVM_LINUX_VMLINUX=%s\n' "$dir/vmlinux"
    printf 'ARKVM_LINUX_INITRAMFS=%s\n' "$dir/initramfs.cpio.gz"
    printf 'ARKVM_LINUX_INITRAMFS_MINI=%s\n' "$dir/initramfs-mini.cpio"
    printf 'ARKVM_LINUX_DISK=%s\n' "$dir/disk-ext4.img"
    printf "ARKVM_LINUX_CMDLINE='%s'\n" "$cmdline"
}

# Points $cache/current at the given hash, atomically.
point_current_at() {
    [ "$(readlink "$cache/current" 2>/dev/null || true)" = "$1" ] && return 0
    ln -sfn "$1" "$cache/current.new.$$"
    mv -Tf "$cache/current.new.$$" "$cache/current"
}

# ---------------------------------------------------------------------------------------------
# Stages of a real build. Each runs in the work tree; $src is the kernel tree, $out the output.

unpack_source() {
    log "stage: unpack /usr/src/linux-source-6.1.tar.xz"
    [ -f /usr/src/linux-source-6.1.tar.xz ] || die "/usr/src/linux-source-6.1.tar.xz is missing"
    tar -xJf /usr/src/linux-source-6.1.tar.xz -C "$work"
    [ -f "$src/Makefile" ] || die "the tarball did not unpack to $src"
}

apply_patch() {
    log "stage: patch (skip int3_selftest; no fwait in fpu__drop)"
    local file=$src/arch/x86/kernel/alternative.c
    if (cd "$src" && patch -p1 --dry-run --forward --silent <"$int3_patch" >/dev/null); then
        (cd "$src" && patch -p1 --forward --silent --no-backup-if-mismatch <"$int3_patch")
    else
        # The packaged source moved under the patch: comment the call out by hand instead.
        log "warning: $(basename "$int3_patch") does not apply here; commenting the call out with sed"
        sed -i -E 's|^([[:space:]]*)int3_selftest\(\);|\1/* int3_selftest(); arkvm: skipped */|' "$file"
    fi
    grep -qE '^[[:space:]]*int3_selftest\(\);' "$file" && die "int3_selftest() is still called in $file"
    grep -qE '^[[:space:]]*/\* int3_selftest\(\);' "$file" || die "the int3_selftest() call was not found in $file"

    file=$src/arch/x86/kernel/fpu/core.c
    (cd "$src" && patch -p1 --forward --silent --no-backup-if-mismatch <"$fwait_patch") ||
        die "$(basename "$fwait_patch") does not apply to $file"
    grep -q '1: fwait' "$file" && die "fpu__drop() in $file still executes fwait"
    return 0
}

configure_kernel() {
    log "stage: configure (tinyconfig + $(basename "$fragment"))"
    (
        cd "$src"
        make -s ARCH=x86_64 tinyconfig >"$work/config.log" 2>&1
        scripts/kconfig/merge_config.sh -m .config "$fragment" >>"$work/config.log" 2>&1
        make -s ARCH=x86_64 olddefconfig >>"$work/config.log" 2>&1
    ) || die "configuration failed; see $work/config.log"
    verify_config "$src/.config"
}

# Fails unless every line of the fragment and every required option made it into the .config.
verify_config() {
    local config=$1 line name nr_cpus bad=()
    while IFS= read -r line; do
        case $line in
        CONFIG_*=* | "# CONFIG_"*" is not set") grep -qxF -- "$line" "$config" || bad+=("$line") ;;
        esac
    done <"$fragment"
    for name in "${required_options[@]}"; do
        grep -qx "CONFIG_$name=y" "$config" || bad+=("CONFIG_$name=y (required)")
    done
    nr_cpus=$(sed -n 's/^CONFIG_NR_CPUS=//p' "$config")
    [ "${nr_cpus:-0}" -ge "$min_nr_cpus" ] || bad+=("CONFIG_NR_CPUS=${nr_cpus:-unset} (need >= $min_nr_cpus)")
    if [ ${#bad[@]} -gt 0 ]; then
        printf '  not in the final .config: %s\n' "${bad[@]}" >&2
        die "the kernel configuration lacks ${#bad[@]} option(s) (unmet dependencies?); see $config"
    fi
    log "config verified: ${#required_options[@]} required options present, NR_CPUS=$nr_cpus"
}

compile_kernel() {
    log "stage: compile vmlinux (make -j$jobs under nice; a few minutes; log: $work/make.log)"
    # Prints a progress line every 30 seconds: how many files make has compiled so far.
    if ! (
        cd "$src"
        nice -n 10 make ARCH=x86_64 -j"$jobs" \
            KBUILD_BUILD_USER=arkvm KBUILD_BUILD_HOST=arkvm \
            KBUILD_BUILD_TIMESTAMP="@$build_epoch" vmlinux 2>&1
    ) | tee "$work/make.log" | awk -v start="$start_time" '
        / CC / { n++ }
        { now = systime(); if (now - last >= 30) { last = now
            printf("[linux-guest %4ss]   compile: %d files so far\n", now - start, n) > "/dev/stderr"
            fflush("/dev/stderr") } }'; then
        tail -n 30 "$work/make.log" >&2
        die "the kernel build failed; see $work/make.log"
    fi
    [ -f "$src/vmlinux" ] || die "make succeeded but $src/vmlinux is missing"
}

verify_vmlinux() {
    local vmlinux=$1 header entry
    header=$(readelf -h "$vmlinux") || die "readelf cannot read $vmlinux"
    grep -q 'Class:[[:space:]]*ELF64' <<<"$header" || die "$vmlinux is not ELF64"
    grep -q 'Type:[[:space:]]*EXEC' <<<"$header" || die "$vmlinux is not an executable ELF"
    grep -q 'Machine:[[:space:]]*Advanced Micro Devices X86-64' <<<"$header" ||
        die "$vmlinux is not an x86-64 ELF"
    entry=$(awk '/Entry point address/ { print $4 }' <<<"$header")
    # arkvm enters at e_entry as a physical address: it must fall inside a segment's p_paddr range.
    local type paddr filesz inside=0
    while read -r type _ _ paddr filesz _; do
        [ "$type" = LOAD ] || continue
        if ((entry >= paddr && entry < paddr + filesz)); then inside=1; fi
    done < <(readelf -lW "$vmlinux")
    [ "$inside" = 1 ] || die "the entry point $entry lies in no LOAD segment (by p_paddr)"
    LC_ALL=C grep -qa 'Run %s as init process' "$vmlinux" ||
        die "$vmlinux lacks the 'Run %s as init process' message"
    log "vmlinux verified: ELF64 x86-64 EXEC, entry $entry inside a LOAD segment"
}

build_initramfs() {
    log "stage: initramfs (busybox-static + /init)"
    local list=$work/initramfs.list gen=$work/gen_init_cpio applet dir
    cc -O2 -o "$gen" "$src/usr/gen_init_cpio.c"
    {
        for dir in /bin /sbin /usr /usr/bin /usr/sbin /dev /proc /sys /mnt /tmp /root; do
            echo "dir $dir 0755 0 0"
        done
        echo "nod /dev/console 0600 0 0 c 5 1"
        echo "file /bin/busybox $(readlink -f /bin/busybox) 0755 0 0"
        echo "file /init $init_script 0755 0 0"
        echo "file /hello $work/hello 0644 0 0"
        busybox --list-full | while read -r applet; do
            case $applet in bin/busybox | linuxrc | "") continue ;; esac
            echo "slink /$applet /bin/busybox 0777 0 0"
        done
    } >"$list"
    "$gen" -t "$build_epoch" "$list" | gzip -n -9 >"$out/initramfs.cpio.gz"
    gzip -t "$out/initramfs.cpio.gz" || die "the initramfs is not valid gzip"

    log "stage: mini initramfs (uncompressed, /init from mini-init.S)"
    as --64 -o "$work/mini-init.o" "$mini_init_source"
    ld -static -s -z noseparate-code -e _start -o "$work/mini-init" "$work/mini-init.o"
    readelf -h "$work/mini-init" | grep -q 'Type:[[:space:]]*EXEC' || die "mini-init is not an ELF executable"
    printf '%s\n' "dir /dev 0755 0 0" "nod /dev/console 0600 0 0 c 5 1" \
        "file /init $work/mini-init 0755 0 0" >"$work/initramfs-mini.list"
    "$gen" -t "$build_epoch" "$work/initramfs-mini.list" >"$out/initramfs-mini.cpio"
}

build_disk() {
    log "stage: disk image (64 MiB, MBR, one ext4 partition)"
    local root=$work/diskroot part=$work/part.img disk=$out/disk-ext4.img applet
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,mnt,tmp,root}
    install -m 0755 "$(readlink -f /bin/busybox)" "$root/bin/busybox"
    install -m 0755 "$init_script" "$root/init"
    install -m 0644 "$work/hello" "$root/hello"
    busybox --list-full | while read -r applet; do
        case $applet in bin/busybox | linuxrc | "") continue ;; esac
        ln -s /bin/busybox "$root/$applet"
    done
    find "$root" -exec touch -h -d "@$build_epoch" {} +

    # The partition: sectors 2048 .. end of the 64 MiB disk (63 MiB), made as a separate file
    # and copied in, so that no loop device (root) is needed.
    rm -f "$part" "$disk"
    truncate -s 63M "$part"
    E2FSPROGS_FAKE_TIME=$build_epoch mkfs.ext4 -q -F -b 4096 -L arkvm-root -U "$disk_uuid" \
        -E "hash_seed=$disk_uuid,root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0" \
        -d "$root" "$part" ||
        die "mkfs.ext4 failed"
    e2fsck -fn "$part" >/dev/null 2>&1 || die "the new ext4 file system does not check clean"
    [ "$(debugfs -R 'cat /hello' "$part" 2>/dev/null)" = "$(cat "$work/hello")" ] ||
        die "/hello did not make it into the ext4 file system"

    truncate -s 64M "$disk"
    printf 'label: dos\nlabel-id: %s\nunit: sectors\nstart=2048, size=129024, type=83\n' \
        "$disk_label_id" | sfdisk --quiet "$disk" >/dev/null || die "sfdisk failed"
    dd if="$part" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
    sfdisk -d "$disk" | grep -q 'start= *2048, size= *129024, type=83' ||
        die "the partition table of $disk is not what was written"
}

# The key of the kernel alone: the stages that make vmlinux (their code, as bash prints it), their
# settings, the patch, the fragment and the toolchain. A build whose other inputs changed (the
# initramfs or disk stages, init.sh) reuses a cached vmlinux with the same key instead of
# compiling again.
kernel_hash() {
    {
        echo "arkvm linux kernel inputs v1"
        declare -f unpack_source apply_patch configure_kernel verify_config compile_kernel
        declare -p required_options min_nr_cpus build_epoch
        cat "$int3_patch" "$fwait_patch" "$fragment"
        installed_versions linux-source-6.1 gcc binutils
    } | sha256sum | cut -c1-16
}

# Prints the directory of a complete cached build whose kernel has the given key, if any.
find_cached_kernel() {
    local dir
    for dir in "$cache"/*/; do
        dir=${dir%/}
        [ -L "$dir" ] && continue # current
        if [ ! -f "$dir/.complete" ] || [ ! -f "$dir/vmlinux" ]; then continue; fi
        [ "$(cat "$dir/kernel.hash" 2>/dev/null)" = "$1" ] && { echo "$dir"; return 0; }
    done
    return 0
}

# ---------------------------------------------------------------------------------------------

ensure_packages
hash=$(input_hash)
mkdir -p "$cache"

if [ "$force" = 0 ] && [ -f "$cache/$hash/.complete" ]; then
    point_current_at "$hash"
    print_paths "$hash"
    exit 0
fi

# One build at a time per cache; a second caller waits and then finds the result.
exec 9>"$cache/.lock"
if ! flock -n 9; then
    log "another build holds $cache/.lock; waiting"
    flock 9
fi
if [ "$force" = 0 ] && [ -f "$cache/$hash/.complete" ]; then
    point_current_at "$hash"
    print_paths "$hash"
    exit 0
fi

log "building the Linux guest $hash into $cache"
work=$cache/build-$hash
src=$work/linux-source-6.1
out=$cache/$hash.partial
# Leftovers of earlier failed or interrupted builds (any hash): nobody else holds the lock.
rm -rf "$cache"/build-* "$cache"/*.partial
mkdir -p "$work" "$out"
echo "hello from the arkvm disk" >"$work/hello"

khash=$(kernel_hash)
reuse=$(find_cached_kernel "$khash")
if [ "$force" = 0 ] && [ -n "$reuse" ]; then
    log "stage: kernel $khash is cached in $reuse; reusing its vmlinux"
    cp "$reuse/vmlinux" "$out/vmlinux"
    cp "$reuse/config" "$out/config"
    cp "$reuse/System.map" "$out/System.map"
    verify_vmlinux "$out/vmlinux"
    log "stage: unpack usr/gen_init_cpio.c (for the initramfs)"
    tar -xJf /usr/src/linux-source-6.1.tar.xz -C "$work" linux-source-6.1/usr/gen_init_cpio.c
else
    unpack_source
    apply_patch
    configure_kernel
    compile_kernel
    verify_vmlinux "$src/vmlinux"
    cp "$src/vmlinux" "$out/vmlinux"
    cp "$src/.config" "$out/config"
    cp "$src/System.map" "$out/System.map"
fi
echo "$khash" >"$out/kernel.hash"
build_initramfs
build_disk

log "stage: publish"
{
    echo "hash: $hash"
    echo "kernel hash: $khash"
    echo "built: $(date -u +%FT%TZ) on $(uname -n)"
    echo "command line: $cmdline"
    echo "packages:"
    installed_versions "${hashed_packages[@]}" | sed 's/^/  /'
    echo "inputs:"
    (cd "$here" && sha256sum "$(basename "$0")" "$(basename "$int3_patch")" "$(basename "$fwait_patch")" \
        "$(basename "$fragment")" "$(basename "$init_script")" \
        "$(basename "$mini_init_source")") | sed 's/^/  /'
} >"$out/inputs.txt"
chmod 0444 "$out"/*
touch "$out/.complete"
rm -rf "${cache:?}/$hash"
mv -T "$out" "$cache/$hash"
point_current_at "$hash"
if [ "${ARKVM_KEEP_BUILD:-0}" = 1 ]; then
    log "kept the build tree in $work"
else
    rm -rf "$work"
fi
log "done"
print_paths "$hash"

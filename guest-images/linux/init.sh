#!/bin/sh
# /init of the arkvm Linux guest (initramfs and disk image alike).
#
# Prints fixed marker lines the tests can wait for, looks at the first disk,
# then either starts a shell (kernel command line has `arkvm.shell`) or asks
# for a reset, which on x86 without ACPI goes out through the i8042 port 0x64
# and ends arkvm with status 0.
#
# On the software-nested KVM of the test machine the first syscall of this
# script already faults; on real hardware it runs to the end.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin

[ -e /proc/self ] || mount -t proc proc /proc
[ -e /sys/kernel ] || mount -t sysfs sysfs /sys
[ -e /dev/null ] || mount -t devtmpfs devtmpfs /dev

echo "arkvm-linux: init started ($(uname -r), $(nproc) cpu(s))"
echo "arkvm-linux: cmdline: $(cat /proc/cmdline)"

root_dev=$(awk '$2 == "/" { print $1 }' /proc/mounts)
if [ -e /hello ] && [ "$root_dev" != "rootfs" ]; then
    # Booted with the disk image as root (root=/dev/vda1).
    echo "arkvm-linux: root is $root_dev: $(cat /hello)"
elif [ -b /dev/vda1 ]; then
    mkdir -p /mnt
    if mount -t ext4 /dev/vda1 /mnt; then
        echo "arkvm-linux: /dev/vda1: $(cat /mnt/hello)"
        umount /mnt
    else
        echo "arkvm-linux: /dev/vda1 did not mount"
    fi
else
    echo "arkvm-linux: no disk"
fi

if grep -qw arkvm.shell /proc/cmdline; then
    echo "arkvm-linux: starting a shell (exit it to reset)"
    setsid cttyhack sh
fi

echo "arkvm-linux: init done, resetting"
sync
reboot -f
# reboot -f returns only on failure; never let /init exit (kernel panic).
while :; do sleep 3600; done

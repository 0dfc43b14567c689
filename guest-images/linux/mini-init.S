/*
 * /init of initramfs-mini.cpio: the smallest userspace that proves the kernel started it.
 *
 * It writes one marker line to the console (fd 1, opened by the kernel) and asks for a
 * restart, which the kernel carries out through the i8042 (out 0x64, 0xFE): arkvm then exits
 * with status 0. Raw syscalls, no libc, a few hundred bytes, so the kernel unpacks it at once
 * even where ring 0 is emulated. On the software-nested KVM of the test machine the first
 * syscall faults (the kernel then panics; add panic=1 to reset); on real hardware it runs.
 */
	.globl	_start
	.text
_start:
	mov	$1, %eax		/* write(1, marker, marker_len) */
	mov	$1, %edi
	lea	marker(%rip), %rsi
	mov	$marker_len, %edx
	syscall

	mov	$169, %eax		/* reboot(MAGIC1, MAGIC2, LINUX_REBOOT_CMD_RESTART, 0) */
	mov	$0xfee1dead, %edi
	mov	$672274793, %esi
	mov	$0x01234567, %edx
	xor	%r10d, %r10d
	syscall

hang:					/* reboot failed: init must never exit */
	pause
	jmp	hang

	.section .rodata
marker:
	.ascii	"arkvm-linux: mini init started, resetting\n"
	.set	marker_len, . - marker

	.section .note.GNU-stack, "", @progbits

//! The CPL0 prologue: own GDT/TSS/IDT and identity page tables (user-accessible, 2 MiB pages),
//! SSE enabled, then `iretq` to `guest_main` in CPL3 with IOPL=3 and interrupts off.
//!
//! CPL0 code is emulated instruction by instruction on the CI machine (~1000x slower than
//! native), so this stays a few hundred dynamic instructions: the only loop is over the 32 IDT
//! gates. It maps just 0-4 MiB; `paging::map_memory` maps the rest from CPL3.
//!
//! Exceptions go to `guest_fault` (CPL0, on the TSS RSP0 stack when raised in CPL3), which
//! prints `GUEST FAULT vec=<n> rip=<hex> err=<hex>` and forces a triple fault.

use core::arch::global_asm;

/// Gigabytes of guest-physical space the page tables can map (one page directory per GiB);
/// `region::REGION_CEILING` must agree.
pub const MAX_MAPPED_GIB: usize = 64;

macro_rules! isr_noerr {
    ($v:literal) => {
        concat!(".balign 16\n push 0\n push ", $v, "\n jmp 10f\n")
    };
}
macro_rules! isr_err {
    ($v:literal) => {
        concat!(".balign 16\n push ", $v, "\n jmp 10f\n")
    };
}

global_asm!(
    ".section .text.boot, \"ax\"",
    ".global _start",
    "_start:",
    "    cli",
    "    cld",
    "    mov r15, rsi",
    "    lea rsp, [rip + arkvm_kstack_top]",
    // TSS: RSP0 and an all-zero I/O permission bitmap (every port allowed) plus its 0xFF
    // terminator. IOPL=3 alone would do on hardware, but the software-nested KVM of the CI
    // machine drops IOPL on iretq/popf and only honours the bitmap.
    "    lea rax, [rip + arkvm_kstack_top]",
    "    mov [rip + arkvm_tss + 4], rax",
    "    mov word ptr [rip + arkvm_tss + 0x66], 104",
    "    mov byte ptr [rip + arkvm_tss + 104 + 8192], 0xFF",
    // TSS descriptor (available 64-bit TSS, limit 104 + 8192: header, bitmap, terminator).
    "    lea rax, [rip + arkvm_tss]",
    "    mov rdx, rax",
    "    shl rdx, 16",
    "    mov rcx, 0xFFFFFF0000",
    "    and rdx, rcx",
    "    mov rcx, rax",
    "    shr rcx, 24",
    "    and ecx, 0xFF",
    "    shl rcx, 56",
    "    or rdx, rcx",
    "    mov rcx, 0x0000890000002068",
    "    or rdx, rcx",
    "    mov [rip + arkvm_gdt_tss], rdx",
    "    shr rax, 32",
    "    mov [rip + arkvm_gdt_tss + 8], rax",
    "    lgdt [rip + arkvm_gdt_ptr]",
    "    lea rax, [rip + 2f]",
    "    push 0x08",
    "    push rax",
    "    retfq",
    "2:",
    "    mov eax, 0x10",
    "    mov ds, eax",
    "    mov es, eax",
    "    mov ss, eax",
    "    xor eax, eax",
    "    mov fs, eax",
    "    mov gs, eax",
    "    mov eax, 0x28",
    "    ltr ax",
    // IDT: 32 interrupt gates, stubs are 16 bytes apart.
    "    lea rdi, [rip + arkvm_idt]",
    "    lea rsi, [rip + arkvm_isr_stubs]",
    "    mov ecx, 32",
    "    mov r8, 0x00008E0000080000",
    "3:",
    "    mov rax, rsi",
    "    and eax, 0xFFFF",
    "    or rax, r8",
    "    mov rdx, rsi",
    "    shr rdx, 16",
    "    shl rdx, 48",
    "    or rax, rdx",
    "    mov [rdi], rax",
    "    mov rax, rsi",
    "    shr rax, 32",
    "    mov [rdi + 8], rax",
    "    add rdi, 16",
    "    add rsi, 16",
    "    dec ecx",
    "    jnz 3b",
    "    lidt [rip + arkvm_idt_ptr]",
    // Page tables: only 0-4 MiB here (image, stacks, zero page, command line), as two
    // 2 MiB pages. CPL3 maps the rest (`paging::map_memory`) before `guest_main`, because
    // CPL0 is emulated and a per-GiB loop here cost ~4 ms per GiB on the CI machine.
    // Clear PML4, PDPT and PD 0 (adjacent pages).
    "    lea rdi, [rip + arkvm_pml4]",
    "    xor eax, eax",
    "    mov ecx, 1536",
    "    rep stosq",
    "    lea rax, [rip + arkvm_pdpt]",
    "    or rax, 7",
    "    mov [rip + arkvm_pml4], rax",
    "    lea rax, [rip + arkvm_pds]",
    "    or rax, 7",
    "    mov [rip + arkvm_pdpt], rax",
    "    mov qword ptr [rip + arkvm_pds], 0x87",
    "    mov qword ptr [rip + arkvm_pds + 8], 0x200087",
    "    lea rax, [rip + arkvm_pml4]",
    "    mov cr3, rax",
    // CR0: MP set, EM and TS clear. CR4: OSFXSR | OSXMMEXCPT.
    "    mov rax, cr0",
    "    and rax, -13",
    "    or rax, 2",
    "    mov cr0, rax",
    "    mov rax, cr4",
    "    or rax, 0x600",
    "    mov cr4, rax",
    // To CPL3: SS=0x1b, CS=0x23, RFLAGS = IOPL 3, IF clear.
    "    mov rdi, r15",
    "    push 0x1b",
    "    lea rax, [rip + arkvm_ustack_top]",
    "    push rax",
    "    push 0x3002",
    "    push 0x23",
    "    lea rax, [rip + 30f]",
    "    push rax",
    "    iretq",
    // CPL3 entry.
    "30:",
    "    fninit",
    "    ldmxcsr [rip + arkvm_mxcsr]",
    "    xor ebp, ebp",
    "    call {main}",
    "    ud2",
    // Exception stubs and the common path to the Rust handler.
    ".balign 16",
    "arkvm_isr_stubs:",
    isr_noerr!("0"),
    isr_noerr!("1"),
    isr_noerr!("2"),
    isr_noerr!("3"),
    isr_noerr!("4"),
    isr_noerr!("5"),
    isr_noerr!("6"),
    isr_noerr!("7"),
    isr_err!("8"),
    isr_noerr!("9"),
    isr_err!("10"),
    isr_err!("11"),
    isr_err!("12"),
    isr_err!("13"),
    isr_err!("14"),
    isr_noerr!("15"),
    isr_noerr!("16"),
    isr_err!("17"),
    isr_noerr!("18"),
    isr_noerr!("19"),
    isr_noerr!("20"),
    isr_err!("21"),
    isr_noerr!("22"),
    isr_noerr!("23"),
    isr_noerr!("24"),
    isr_noerr!("25"),
    isr_noerr!("26"),
    isr_noerr!("27"),
    isr_noerr!("28"),
    isr_err!("29"),
    isr_err!("30"),
    isr_noerr!("31"),
    "10:",
    "    mov rdi, [rsp]",
    "    mov rsi, [rsp + 8]",
    "    mov rdx, [rsp + 16]",
    "    mov rcx, [rsp + 24]",
    "    mov r8, [rsp + 32]",
    "    and rsp, -16",
    "    call {fault}",
    "    ud2",
    // Data.
    ".section .data.arkvm_boot, \"aw\"",
    ".balign 16",
    "arkvm_gdt:",
    "    .quad 0",
    "    .quad 0x00AF9B000000FFFF",
    "    .quad 0x00CF93000000FFFF",
    "    .quad 0x00CFF3000000FFFF",
    "    .quad 0x00AFFB000000FFFF",
    "arkvm_gdt_tss:",
    "    .quad 0",
    "    .quad 0",
    "arkvm_gdt_end:",
    ".balign 8",
    "    .word 0",
    "arkvm_gdt_ptr:",
    "    .word arkvm_gdt_end - arkvm_gdt - 1",
    "    .quad arkvm_gdt",
    ".balign 8",
    "    .word 0",
    "arkvm_idt_ptr:",
    "    .word 32 * 16 - 1",
    "    .quad arkvm_idt",
    ".balign 8",
    "    .word 0",
    ".global arkvm_null_idt_ptr",
    "arkvm_null_idt_ptr:",
    "    .word 0",
    "    .quad 0",
    "arkvm_mxcsr:",
    "    .long 0x1F80",
    ".section .bss.arkvm_boot, \"aw\", @nobits",
    ".balign 4096",
    "arkvm_pml4:",
    "    .space 4096",
    ".global arkvm_pdpt",
    "arkvm_pdpt:",
    "    .space 4096",
    ".global arkvm_pds",
    "arkvm_pds:",
    "    .space 4096 * {max_gib}",
    "arkvm_kstack:",
    "    .space 16384",
    "arkvm_kstack_top:",
    "arkvm_ustack:",
    "    .space 65536",
    "arkvm_ustack_top:",
    ".balign 16",
    "arkvm_tss:",
    "    .space 104 + 8192 + 1",
    ".balign 16",
    "arkvm_idt:",
    "    .space 32 * 16",
    ".text",
    max_gib = const MAX_MAPPED_GIB,
    main = sym guest_main_trampoline,
    fault = sym guest_fault,
);

extern "C" {
    fn guest_main(boot_params: u64) -> !;
}

const _: () = assert!(crate::region::REGION_CEILING == (MAX_MAPPED_GIB as u64) << 30);

/// Maps the rest of guest memory, then calls the binary's `guest_main` (resolved at link time).
extern "C" fn guest_main_trampoline(boot_params: u64) -> ! {
    crate::paging::map_memory(boot_params);
    // SAFETY: every guest binary defines `guest_main` with exactly this signature; we are in
    // CPL3 on the user stack with paging and SSE set up, which is all it may assume.
    unsafe { guest_main(boot_params) }
}

/// Prints `v` in hex (`0x...`) without `core::fmt`: this runs in CPL0, where every
/// instruction is emulated and SSE moves that the formatting code uses may not be.
fn put_hex(v: u64) {
    crate::serial::put_str("0x");
    let mut started = false;
    for shift in (0..16).rev() {
        let d = ((v >> (shift * 4)) & 0xf) as u8;
        if d != 0 || started || shift == 0 {
            started = true;
            crate::serial::put_byte(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
    }
}

/// CPL0 exception handler: report, then triple-fault.
extern "C" fn guest_fault(vec: u64, err: u64, rip: u64, cs: u64, rflags: u64) -> ! {
    crate::serial::put_str("GUEST FAULT vec=");
    if vec >= 10 {
        crate::serial::put_byte(b'0' + (vec / 10) as u8);
    }
    crate::serial::put_byte(b'0' + (vec % 10) as u8);
    crate::serial::put_str(" rip=");
    put_hex(rip);
    crate::serial::put_str(" err=");
    put_hex(err);
    crate::serial::put_str(" cs=");
    put_hex(cs);
    crate::serial::put_str(" rflags=");
    put_hex(rflags);
    if vec == 14 {
        let cr2: u64;
        // SAFETY: reading CR2 at CPL0 has no side effects.
        unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
        crate::serial::put_str(" cr2=");
        put_hex(cr2);
    }
    crate::serial::put_byte(b'\n');
    // SAFETY: loading an empty IDT and raising #UD escalates to #DF and then a triple fault,
    // which is the intended way out (arkvm reports it and exits non-zero).
    unsafe {
        core::arch::asm!(
            "lidt [rip + arkvm_null_idt_ptr]",
            "ud2",
            options(noreturn, nostack)
        )
    }
}

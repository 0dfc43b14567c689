//! x86_64 platform setup: memory layout, boot GDT and page tables, registers, CPUID, MP table and
//! the Linux zero page.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;

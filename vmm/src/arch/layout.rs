//! The guest-physical memory map arkvm gives every x86_64 guest.

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty; the kernel installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table (PML4).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories identity-mapping the first 4 GiB with 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// Number of page directories (one per GiB mapped at boot).
pub const PDE_COUNT: u64 = 4;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted (Linux's COMMAND_LINE_SIZE on x86_64).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The MP floating pointer and configuration table, in the BIOS area Linux scans (0xF0000-0xFFFFF),
/// which leaves room for 254 processor entries.
pub const MPTABLE_START: u64 = 0xf_0000;
/// End of conventional ("low") memory.
pub const EBDA_START: u64 = 0x9fc00;
/// Where high memory (and a bzImage's protected-mode kernel) starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The IOAPIC's MMIO address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APIC's MMIO address.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// Where virtio-mmio devices are placed, one page each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The first IRQ line given to virtio-mmio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// The largest number of virtio-mmio devices.
pub const VIRTIO_MAX_DEVICES: u32 = 8;
/// KVM's TSS (three pages just below the IOAPIC/BIOS area).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// KVM's identity-map page for real mode under EPT.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// The guest-physical RAM ranges for `mem_size` bytes of memory: below the MMIO hole, and the rest
/// above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_at_mmio_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }
}

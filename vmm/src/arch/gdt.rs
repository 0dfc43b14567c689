//! The boot GDT and the identity page tables the boot vCPU starts with.

use vm_memory::{Bytes, GuestAddress};

use super::layout;
use devices::GuestMemoryMmap;

/// Why the boot tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum GdtError {
    /// Guest memory is too small for the boot tables.
    #[error("guest memory is too small for the boot tables")]
    WriteTables(#[source] vm_memory::GuestMemoryError),
}

/// Builds a GDT entry from flags, base and limit (the layout of the x86 segment descriptor).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code (0x08 unused), 64-bit code at 0x10, data at 0x18, TSS at 0x20.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
];

/// The segment selector of the boot code segment.
pub const BOOT_CODE_SELECTOR: u16 = 0x10;
/// The segment selector of the boot data segment.
pub const BOOT_DATA_SELECTOR: u16 = 0x18;

/// A `kvm_segment` for GDT entry `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_bindings::kvm_segment {
    let flag = |shift: u32, mask: u64| ((entry >> shift) & mask) as u8;
    let limit = ((((entry >> 32) & 0x000f_0000) | (entry & 0x0000_ffff)) as u32) as u64;
    let g = flag(55, 1);
    kvm_bindings::kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            ((limit << 12) | 0xfff) as u32
        } else {
            limit as u32
        },
        selector: u16::from(index) * 8,
        type_: flag(40, 0xf),
        present: flag(47, 1),
        dpl: flag(45, 0x3),
        db: flag(54, 1),
        s: flag(44, 1),
        l: flag(53, 1),
        g,
        avl: flag(52, 1),
        padding: 0,
        unusable: u8::from(flag(47, 1) == 0),
    }
}

/// Writes the boot GDT, an empty IDT and identity page tables for the first 4 GiB.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), GdtError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::BOOT_GDT_START + i as u64 * 8))
            .map_err(GdtError::WriteTables)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(GdtError::WriteTables)?;
    // PML4[0] -> PDPT; PDPT[0..4] -> four page directories of 2 MiB pages.
    mem.write_obj(layout::PDPTE_START | 0x03, GuestAddress(layout::PML4_START))
        .map_err(GdtError::WriteTables)?;
    for pd in 0..layout::PDE_COUNT {
        let pd_addr = layout::PDE_START + pd * 0x1000;
        mem.write_obj(pd_addr | 0x03, GuestAddress(layout::PDPTE_START + pd * 8))
            .map_err(GdtError::WriteTables)?;
        let mut table = [0u64; 512];
        for (i, e) in table.iter_mut().enumerate() {
            // Present, writable, 2 MiB page.
            *e = ((pd << 30) + ((i as u64) << 21)) | 0x83;
        }
        for (i, e) in table.iter().enumerate() {
            mem.write_obj(*e, GuestAddress(pd_addr + i as u64 * 8))
                .map_err(GdtError::WriteTables)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_long_mode() {
        let seg = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!(seg.selector, 0x10);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.limit, 0xffff_ffff);
        let data = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!(data.db, 1);
        assert_eq!(data.type_, 3);
    }
}

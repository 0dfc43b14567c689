//! The status page at the fixed guest-physical address 0x3FF000 (symbol `ARKVM_STATUS`).
//!
//! Tests and the host read it from a memory snapshot to learn how far the guest got:
//!
//! | offset | field |
//! |---|---|
//! | 0x00 | magic `ARKVMST1` (LE u64 [`STATUS_MAGIC`]), written when a guest starts |
//! | 0x08 | memory guest: generation being written (symbol `ARKVM_MEM_GEN`) |
//! | 0x10 | memory guest: passes completed |
//! | 0x18 | disk guest (numbered): last completed write number `g*B+i` (symbol `ARKVM_DISK_LAST`) |
//! | 0x20 | disk guest (numbered): generation being written |
//! | 0x28 | disk guest (numbered): ring size B in blocks |

use core::ptr::{addr_of_mut, write_volatile};

/// `b"ARKVMST1"` as a little-endian u64.
pub const STATUS_MAGIC: u64 = u64::from_le_bytes(*b"ARKVMST1");
/// Guest-physical address of the status page.
pub const STATUS_ADDR: u64 = 0x3FF000;

/// The status block layout.
#[repr(C)]
pub struct Status {
    /// [`STATUS_MAGIC`].
    pub magic: u64,
    /// Memory guest generation.
    pub mem_gen: u64,
    /// Memory guest passes completed.
    pub mem_passes: u64,
    /// Last completed disk write number.
    pub disk_last: u64,
    /// Disk generation.
    pub disk_gen: u64,
    /// Disk ring size in blocks.
    pub disk_blocks: u64,
}

/// The status block; the linker script places it at `STATUS_ADDR`.
#[no_mangle]
#[link_section = ".arkvm_status"]
pub static mut ARKVM_STATUS: Status = Status {
    magic: 0,
    mem_gen: 0,
    mem_passes: 0,
    disk_last: 0,
    disk_gen: 0,
    disk_blocks: 0,
};

/// Which field to update.
#[derive(Clone, Copy)]
pub enum Field {
    /// `magic`.
    Magic,
    /// `mem_gen`.
    MemGen,
    /// `mem_passes`.
    MemPasses,
    /// `disk_last`.
    DiskLast,
    /// `disk_gen`.
    DiskGen,
    /// `disk_blocks`.
    DiskBlocks,
}

/// Stores a field with a volatile write (so it lands in memory, visible to a snapshot).
pub fn set(field: Field, value: u64) {
    // SAFETY: the guest is single-threaded and takes no interrupts, so nothing else accesses
    // the status block concurrently; the pointer comes from `addr_of_mut!` on the static.
    unsafe {
        let s = addr_of_mut!(ARKVM_STATUS);
        let p = match field {
            Field::Magic => addr_of_mut!((*s).magic),
            Field::MemGen => addr_of_mut!((*s).mem_gen),
            Field::MemPasses => addr_of_mut!((*s).mem_passes),
            Field::DiskLast => addr_of_mut!((*s).disk_last),
            Field::DiskGen => addr_of_mut!((*s).disk_gen),
            Field::DiskBlocks => addr_of_mut!((*s).disk_blocks),
        };
        write_volatile(p, value);
    }
}

/// Reads a field back (volatile).
pub fn get(field: Field) -> u64 {
    // SAFETY: as in `set`.
    unsafe {
        let s = addr_of_mut!(ARKVM_STATUS);
        let p = match field {
            Field::Magic => addr_of_mut!((*s).magic),
            Field::MemGen => addr_of_mut!((*s).mem_gen),
            Field::MemPasses => addr_of_mut!((*s).mem_passes),
            Field::DiskLast => addr_of_mut!((*s).disk_last),
            Field::DiskGen => addr_of_mut!((*s).disk_gen),
            Field::DiskBlocks => addr_of_mut!((*s).disk_blocks),
        };
        core::ptr::read_volatile(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_spells_arkvmst1() {
        assert_eq!(&STATUS_MAGIC.to_le_bytes(), b"ARKVMST1");
    }

    #[test]
    fn set_then_get_roundtrips() {
        set(Field::DiskLast, 77);
        set(Field::MemGen, 5);
        assert_eq!(get(Field::DiskLast), 77);
        assert_eq!(get(Field::MemGen), 5);
    }
}

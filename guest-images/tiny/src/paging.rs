//! Mapping guest memory from CPL3: the prologue maps only 0-4 MiB; this adds 2 MiB identity
//! pages (user-accessible) for all e820 RAM and the 0xC000_0000-4 GiB MMIO hole (uncached).
//!
//! Running this in CPL3 keeps boot time flat in memory size on the CI machine, where CPL0 is
//! emulated. It only ever turns non-present entries present, and fills each new page directory
//! before linking it, which needs no TLB invalidation on x86.

use crate::bootparams::{BootParams, E820_RAM};
use crate::region::REGION_CEILING;
#[cfg(not(test))]
use core::ptr::{addr_of, addr_of_mut, write_volatile};

const GIB: u64 = 1 << 30;
const MAX_GIB: usize = (REGION_CEILING / GIB) as usize;
/// Present | writable | user.
#[cfg(not(test))]
const TABLE: u64 = 0x7;
/// Present | writable | user | 2 MiB page.
#[cfg(not(test))]
const RAM_PAGE: u64 = 0x87;
/// `RAM_PAGE` | PWT | PCD (the MMIO hole).
#[cfg(not(test))]
const MMIO_PAGE: u64 = 0x9F;
/// Page-directory entries of GiB 0 that the prologue already set (0-4 MiB).
#[cfg(not(test))]
const PROLOGUE_ENTRIES: usize = 2;

#[cfg(not(test))]
extern "C" {
    static mut arkvm_pdpt: [u64; 512];
    static mut arkvm_pds: [[u64; 512]; MAX_GIB];
}

/// Which GiBs to map and with which leaf flags: `(low RAM GiBs, high RAM end GiB)`.
pub fn gib_plan(bp: &BootParams<'_>) -> (u64, u64) {
    let mut low_end = 0u64;
    let mut end = 0u64;
    for e in bp.e820_entries().filter(|e| e.kind == E820_RAM) {
        let top = e.addr.saturating_add(e.size);
        end = end.max(top);
        if top <= 4 * GIB {
            low_end = low_end.max(top);
        }
    }
    let low = low_end.div_ceil(GIB).clamp(1, 3);
    let all = end.div_ceil(GIB).min(MAX_GIB as u64);
    (low, all)
}

#[cfg(not(test))]
fn map_gib(g: usize, flags: u64) {
    let first = if g == 0 { PROLOGUE_ENTRIES } else { 0 };
    // SAFETY: `g < MAX_GIB`; the page directory is either not yet linked (g > 0) or only
    // gains entries that were non-present; the guest is single-threaded.
    unsafe {
        let pd = addr_of_mut!(arkvm_pds[g]);
        for j in first..512 {
            let addr = (g as u64) * GIB + (j as u64) * (2 << 20);
            write_volatile(addr_of_mut!((*pd)[j]), addr | flags);
        }
        if g > 0 {
            core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
            write_volatile(
                addr_of_mut!(arkvm_pdpt[g]),
                addr_of!(arkvm_pds[g]) as u64 | TABLE,
            );
        }
    }
}

/// Maps low RAM, the MMIO hole and high RAM (up to 64 GiB) as described in the module docs.
#[cfg(not(test))]
pub fn map_memory(boot_params: u64) {
    let (bp, _) = crate::bootparams::from_guest(boot_params);
    let (low, all) = gib_plan(&bp);
    for g in 0..low {
        map_gib(g as usize, RAM_PAGE);
    }
    map_gib(3, MMIO_PAGE);
    for g in 4..all {
        map_gib(g as usize, RAM_PAGE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(entries: &[(u64, u64)]) -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        p[0x1e8] = entries.len() as u8;
        for (i, (a, s)) in entries.iter().enumerate() {
            let off = 0x2d0 + 20 * i;
            p[off..off + 8].copy_from_slice(&a.to_le_bytes());
            p[off + 8..off + 16].copy_from_slice(&s.to_le_bytes());
            p[off + 16..off + 20].copy_from_slice(&E820_RAM.to_le_bytes());
        }
        p
    }

    #[test]
    fn plans_low_and_high_gibs() {
        let small = page(&[(0, 0x9fc00), (0x100000, 255 << 20)]);
        assert_eq!(gib_plan(&BootParams::new(&small)), (1, 1));
        let big = page(&[(0x100000, (3 << 30) - 0x100000), (4 << 30, 5 << 30)]);
        assert_eq!(gib_plan(&BootParams::new(&big)), (3, 9));
        let huge = page(&[(0x100000, (3 << 30) - 0x100000), (4 << 30, 200 << 30)]);
        assert_eq!(gib_plan(&BootParams::new(&huge)), (3, 64));
    }
}

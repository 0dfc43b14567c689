//! Which chunks were written since the last look, from KVM's dirty log (vCPU writes) and
//! vm-memory's bitmap (device and VMM writes). Pre-copy re-copies them; a backup taken before
//! the first live snapshot uses them to find the unchanged chunks.

use std::collections::BTreeSet;

use snapshot::MemoryLayout;
use vm_memory::GuestMemoryBackend;
use vm_memory::GuestMemoryRegion;

use super::error::CaptureError;
use crate::vstate::vm::Vm;
use devices::GuestMemoryMmap;

const PAGE: u64 = 4096;

/// Reads and clears both dirty logs; returns the dirty chunk indices and the dirty page count.
pub fn take_dirty_chunks(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
) -> Result<(BTreeSet<u64>, u64), CaptureError> {
    let kvm_logs = vm.take_dirty_log()?;
    let mut chunks = BTreeSet::new();
    let mut pages = 0u64;
    for (region, kvm_log) in mem.iter().zip(kvm_logs.iter()) {
        let mmap: &vm_memory::MmapRegion<_> = region;
        let base = region.start_addr().0;
        let len = region.len();
        let vmm_log = mmap.bitmap().get_and_reset();
        tracing::debug!(
            "dirty pages: kvm {} vmm {}",
            kvm_log.iter().map(|w| w.count_ones()).sum::<u32>(),
            vmm_log.iter().map(|w| w.count_ones()).sum::<u32>()
        );
        let words = kvm_log.len().max(vmm_log.len());
        for w in 0..words {
            let bits = kvm_log.get(w).copied().unwrap_or(0) | vmm_log.get(w).copied().unwrap_or(0);
            if bits == 0 {
                continue;
            }
            pages += u64::from(bits.count_ones());
            let mut b = bits;
            while b != 0 {
                let bit = b.trailing_zeros() as u64;
                b &= b - 1;
                let off = (w as u64 * 64 + bit) * PAGE;
                if off < len {
                    if let Some(chunk) = layout.chunk_of_guest_addr(base + off) {
                        chunks.insert(chunk);
                    }
                }
            }
        }
    }
    Ok((chunks, pages))
}

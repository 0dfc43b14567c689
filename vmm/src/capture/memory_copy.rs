//! Copying guest memory into a snapshot's memory part, chunk by chunk.

use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::{Bytes, GuestAddress};

use super::progress::Progress;
use super::sink::MemoryOut;
use super::CaptureError;
use crate::saved_state::MemoryRegionState;
use devices::GuestMemoryMmap;

/// Chunk index of a guest address, given the layout; None outside guest memory.
pub fn chunk_of_guest_addr(
    layout: &[MemoryRegionState],
    chunk_size: u64,
    addr: u64,
) -> Option<u64> {
    layout
        .iter()
        .find(|r| addr >= r.guest_addr && addr < r.guest_addr + r.len)
        .map(|r| (r.part_offset + (addr - r.guest_addr)) / chunk_size)
}

/// Guest address and length of chunk `index`.
pub fn chunk_guest_range(
    layout: &[MemoryRegionState],
    chunk_size: u64,
    index: u64,
) -> Option<(u64, u64)> {
    let off = index * chunk_size;
    layout
        .iter()
        .find(|r| off >= r.part_offset && off < r.part_offset + r.len)
        .map(|r| {
            let within = off - r.part_offset;
            (r.guest_addr + within, chunk_size.min(r.len - within))
        })
}

/// Copies chunk `index` of guest memory into the part.
pub fn copy_chunk(
    mem: &GuestMemoryMmap,
    layout: &[MemoryRegionState],
    part: &MemoryOut,
    index: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, CaptureError> {
    let (addr, len) = chunk_guest_range(layout, part.chunk_size(), index)
        .expect("chunk index within the memory part");
    buf.resize(len as usize, 0);
    mem.read_slice(buf, GuestAddress(addr))
        .map_err(|source| CaptureError::ReadMemory { addr, source })?;
    part.put(index, buf)?;
    Ok(len)
}

/// Copies every chunk, reporting progress, stopping early when `cancel` is set. Chunks marked
/// in `clean` (unchanged since the parent backup point) are reused without being read.
pub fn copy_all(
    mem: &GuestMemoryMmap,
    layout: &[MemoryRegionState],
    part: &MemoryOut,
    progress: &Progress,
    cancel: &AtomicBool,
    clean: Option<&[bool]>,
) -> Result<(), CaptureError> {
    let mut buf = Vec::new();
    for index in 0..part.chunk_count() {
        if cancel.load(Ordering::Relaxed) {
            return Err(CaptureError::Cancelled);
        }
        if clean.is_some_and(|c| c[index as usize]) {
            part.reuse(index)?;
            continue;
        }
        let n = copy_chunk(mem, layout, part, index, &mut buf)?;
        progress.update(|r| r.bytes_written += n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saved_state::VmSnapshotState;

    #[test]
    fn chunk_mapping_across_the_hole() {
        let layout = VmSnapshotState::memory_layout(&[(0, 3 << 30), (4 << 30, 1 << 30)]);
        let cs = 1 << 20;
        assert_eq!(chunk_of_guest_addr(&layout, cs, 0x1000), Some(0));
        assert_eq!(chunk_of_guest_addr(&layout, cs, 4 << 30), Some(3072));
        assert_eq!(chunk_of_guest_addr(&layout, cs, 3 << 30), None);
        assert_eq!(chunk_guest_range(&layout, cs, 3072), Some((4 << 30, cs)));
        assert_eq!(chunk_guest_range(&layout, cs, 4096), None);
    }
}

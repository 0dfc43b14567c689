//! Copying guest memory into a snapshot's [`MemorySink`], chunk by chunk. Where a chunk lies in
//! guest memory is the [`MemoryLayout`]'s business.

use std::sync::atomic::{AtomicBool, Ordering};

use snapshot::{MemoryLayout, MemorySink};
use vm_memory::{Bytes, GuestAddress};

use super::error::CaptureError;
use super::progress::Progress;
use devices::GuestMemoryMmap;

/// Copies chunk `index` of guest memory into the sink; returns its length.
pub fn copy_chunk(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    sink: &dyn MemorySink,
    index: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, CaptureError> {
    let (addr, len) = layout
        .chunk_guest_range(index)
        .ok_or(CaptureError::ChunkOutside(index))?;
    buf.resize(len as usize, 0);
    mem.read_slice(buf, GuestAddress(addr))
        .map_err(|source| CaptureError::ReadMemory { addr, source })?;
    sink.write_chunk(index, buf)?;
    Ok(len)
}

/// Copies every chunk, reporting progress, stopping early when `cancel` is set. Chunks marked
/// in `clean` (unchanged since the parent backup point) are reused without being read when the
/// sink can reuse them, and copied otherwise.
pub fn copy_all(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    sink: &dyn MemorySink,
    progress: &Progress,
    cancel: &AtomicBool,
    clean: Option<&[bool]>,
) -> Result<(), CaptureError> {
    let mut buf = Vec::new();
    for index in 0..sink.chunk_count() {
        if cancel.load(Ordering::Relaxed) {
            return Err(CaptureError::Cancelled);
        }
        if clean.is_some_and(|c| c[index as usize]) && sink.reuse_unchanged(index)? {
            continue;
        }
        let n = copy_chunk(mem, layout, sink, index, &mut buf)?;
        progress.update(|r| r.bytes_written += n);
    }
    Ok(())
}

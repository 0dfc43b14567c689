//! Guest memory: anonymous private mappings (so that userfaultfd can write-protect them for live
//! snapshots and fill them lazily on restore), laid out around the MMIO hole.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout;
use devices::GuestMemoryMmap;

/// Why guest memory could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A zero memory size was asked for.
    #[error("guest memory size must be greater than zero")]
    Zero,
    /// The size is not a multiple of the page size.
    #[error("guest memory size {0} is not a multiple of 4 KiB")]
    Unaligned(u64),
    /// More than one KVM memory slot can hold.
    #[error("{0} bytes of guest memory is more than KVM can map (at most 8 TiB)")]
    TooLarge(u64),
    /// The host's address space cannot hold that much memory.
    #[error("the host cannot map {size} bytes of guest memory")]
    Reserve {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    /// The host refused to map that much memory.
    #[error("the host cannot map {size} bytes of guest memory")]
    Map {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The smallest guest memory arkvm boots with (low memory plus room for a kernel).
pub const MIN_MEMORY: u64 = 2 << 20;

/// The largest guest memory: a KVM memory slot holds at most 2^31 - 1 pages.
pub const MAX_MEMORY: u64 = ((1u64 << 31) - 1) * 4096;

/// Creates anonymous guest memory of `size` bytes.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if size == 0 {
        return Err(MemoryError::Zero);
    }
    if size % 4096 != 0 {
        return Err(MemoryError::Unaligned(size));
    }
    if size > MAX_MEMORY {
        return Err(MemoryError::TooLarge(size));
    }
    probe_address_space(size)?;
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|source| MemoryError::Map { size, source })?;
    advise_huge_pages(&mem);
    Ok(mem)
}

/// Asks for transparent huge pages: fewer page-table entries make KVM faster and make
/// write-protecting memory for a live snapshot (which walks them) much cheaper.
fn advise_huge_pages(mem: &GuestMemoryMmap) {
    for (host, _, len) in region_layout(mem) {
        // SAFETY: the range is exactly one guest memory mapping owned by `mem`; MADV_HUGEPAGE
        // only changes how the kernel backs it, not its contents or validity.
        let r =
            unsafe { libc::madvise(host as *mut libc::c_void, len as usize, libc::MADV_HUGEPAGE) };
        if r != 0 {
            tracing::debug!(
                "transparent huge pages not available: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Checks that the host can reserve `size` bytes of address space before anything (such as the
/// dirty bitmap, whose size follows the memory's) is allocated for it.
fn probe_address_space(size: u64) -> Result<(), MemoryError> {
    let len = usize::try_from(size).map_err(|_| MemoryError::Reserve {
        size,
        source: std::io::Error::from_raw_os_error(libc::ENOMEM),
    })?;
    // SAFETY: an anonymous PROT_NONE reservation with no address hint touches no existing
    // mapping; it is unmapped right below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(MemoryError::Reserve {
            size,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `addr`/`len` is exactly the reservation made above, used by nothing else.
    unsafe { libc::munmap(addr, len) };
    Ok(())
}

/// The total size of guest memory.
pub fn memory_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Host address, guest address and length of every region, in order.
pub fn region_layout(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u64)> {
    mem.iter()
        .map(|r| {
            let host = mem
                .get_host_address(r.start_addr())
                .expect("a region's start is inside guest memory") as u64;
            (host, r.start_addr().0, r.len())
        })
        .collect()
}

/// Guest memory as a snapshot lays it out: regions back to back in 1 MiB chunks, mapped at their
/// host addresses. Every chunk ↔ address question goes through this one type.
pub fn mapped_layout(mem: &GuestMemoryMmap) -> snapshot::MappedLayout {
    let regions = region_layout(mem);
    let guest: Vec<(u64, u64)> = regions.iter().map(|&(_, g, l)| (g, l)).collect();
    snapshot::MemoryLayout::back_to_back(&guest, snapshot::CHUNK_SIZE as u64)
        .expect("guest memory is a whole number of MiB (checked with the configuration)")
        .mapped_at(regions.iter().map(|&(h, _, _)| h).collect())
        .expect("one host address per region")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert!(matches!(create_guest_memory(0), Err(MemoryError::Zero)));
        assert!(matches!(
            create_guest_memory(4097),
            Err(MemoryError::Unaligned(4097))
        ));
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(memory_size(&mem), 64 << 20);
        assert_eq!(region_layout(&mem).len(), 1);
        assert!(matches!(
            create_guest_memory(1 << 60),
            Err(MemoryError::TooLarge(_))
        ));
    }
}

//! Where guest memory lies in a snapshot's memory part: the one owner of the mapping between
//! chunk indexes, offsets in the part and guest physical addresses.
//!
//! ```text
//!  guest physical     [ region 0: 0 .. 3 GiB )   hole   [ region 1: 4 GiB .. 5 GiB )
//!                            │                                   │
//!  memory part        [ part_offset 0 .. 3 GiB )[ part_offset 3 GiB .. 4 GiB )
//!  chunks             0, 1, 2, ...          3071 | 3072, ...                4095
//! ```
//!
//! Regions lie back to back in the part, in guest address order, and every region but the last
//! is a whole number of chunks (arkvm's memory sizes are whole MiB and its chunks 1 MiB;
//! [`MemoryLayout::new`] refuses anything else), so a chunk never spans two regions and chunk `i`
//! always starts at part offset `i * chunk_size`.

use serde::{Deserialize, Serialize};

/// One guest memory region and where it starts in the memory part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    pub guest_addr: u64,
    pub len: u64,
    pub part_offset: u64,
}

/// Why a memory layout is not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// A chunk size of zero.
    #[error("the chunk size must be greater than zero")]
    ZeroChunk,
    /// A region that does not start where the previous one ended in the part, or that is not a
    /// whole number of chunks (except the last).
    #[error("memory region {index} at guest address {guest_addr:#x} does not line up with {chunk_size}-byte chunks")]
    Unaligned {
        index: usize,
        guest_addr: u64,
        chunk_size: u64,
    },
}

/// Guest memory regions laid out in a memory part of fixed-size chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    regions: Vec<MemoryRegionState>,
    chunk_size: u64,
}

impl MemoryLayout {
    /// A layout from saved regions; every region but the last must be a whole number of chunks
    /// and each must start where the previous one ended.
    pub fn new(regions: Vec<MemoryRegionState>, chunk_size: u64) -> Result<Self, LayoutError> {
        if chunk_size == 0 {
            return Err(LayoutError::ZeroChunk);
        }
        let mut offset = 0;
        for (index, r) in regions.iter().enumerate() {
            let last = index + 1 == regions.len();
            if r.part_offset != offset || (!last && r.len % chunk_size != 0) {
                return Err(LayoutError::Unaligned {
                    index,
                    guest_addr: r.guest_addr,
                    chunk_size,
                });
            }
            offset += r.len;
        }
        Ok(Self {
            regions,
            chunk_size,
        })
    }

    /// Regions `(guest_addr, len)` laid out back to back in the part.
    pub fn back_to_back(regions: &[(u64, u64)], chunk_size: u64) -> Result<Self, LayoutError> {
        let mut offset = 0;
        let regions = regions
            .iter()
            .map(|&(guest_addr, len)| {
                let r = MemoryRegionState {
                    guest_addr,
                    len,
                    part_offset: offset,
                };
                offset += len;
                r
            })
            .collect();
        Self::new(regions, chunk_size)
    }

    /// The regions, in part order.
    pub fn regions(&self) -> &[MemoryRegionState] {
        &self.regions
    }

    /// Bytes per chunk; the last chunk may be shorter.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// The size of the memory part: all regions together.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Number of chunks in the part.
    pub fn chunk_count(&self) -> u64 {
        self.size().div_ceil(self.chunk_size)
    }

    /// The chunk holding guest address `addr`; None outside guest memory.
    pub fn chunk_of_guest_addr(&self, addr: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| addr >= r.guest_addr && addr < r.guest_addr + r.len)
            .map(|r| (r.part_offset + (addr - r.guest_addr)) / self.chunk_size)
    }

    /// The region index and the offset within that region of chunk `index`'s first byte.
    fn locate(&self, index: u64) -> Option<(usize, u64)> {
        let off = index.checked_mul(self.chunk_size)?;
        self.regions
            .iter()
            .position(|r| off >= r.part_offset && off < r.part_offset + r.len)
            .map(|i| (i, off - self.regions[i].part_offset))
    }

    /// Guest address and length of chunk `index`; None past the end.
    pub fn chunk_guest_range(&self, index: u64) -> Option<(u64, u64)> {
        let (i, within) = self.locate(index)?;
        let r = &self.regions[i];
        Some((r.guest_addr + within, self.chunk_size.min(r.len - within)))
    }

    /// Offset in the part and length of chunk `index`; None past the end.
    pub fn chunk_part_range(&self, index: u64) -> Option<(u64, u64)> {
        let (i, within) = self.locate(index)?;
        let r = &self.regions[i];
        Some((r.part_offset + within, self.chunk_size.min(r.len - within)))
    }

    /// Where the regions are mapped in this process: `host_addrs[i]` is region `i`'s first byte.
    pub fn mapped_at(&self, host_addrs: Vec<u64>) -> Option<MappedLayout> {
        (host_addrs.len() == self.regions.len()).then(|| MappedLayout {
            layout: self.clone(),
            host_addrs,
        })
    }
}

/// A [`MemoryLayout`] whose regions are mapped at known host addresses, for the userfaultfd
/// handlers, which see host addresses.
#[derive(Clone, Debug)]
pub struct MappedLayout {
    layout: MemoryLayout,
    host_addrs: Vec<u64>,
}

impl MappedLayout {
    /// The layout in the part.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Each region's host address and length.
    pub fn host_regions(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.host_addrs
            .iter()
            .zip(self.layout.regions.iter())
            .map(|(&h, r)| (h, r.len))
    }

    /// The chunk holding host address `addr`; None outside guest memory.
    pub fn chunk_of_host_addr(&self, addr: u64) -> Option<u64> {
        self.host_addrs
            .iter()
            .zip(self.layout.regions.iter())
            .find(|(&h, r)| addr >= h && addr < h + r.len)
            .map(|(&h, r)| (r.part_offset + (addr - h)) / self.layout.chunk_size)
    }

    /// Host address and length of chunk `index`; None past the end.
    pub fn chunk_host_range(&self, index: u64) -> Option<(u64, u64)> {
        let (i, within) = self.layout.locate(index)?;
        let r = &self.layout.regions[i];
        Some((
            self.host_addrs[i] + within,
            self.layout.chunk_size.min(r.len - within),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn around_the_hole() -> MemoryLayout {
        MemoryLayout::back_to_back(&[(0, 3 << 30), (4 << 30, 1 << 30)], MIB).unwrap()
    }

    #[test]
    fn chunks_map_across_the_hole() {
        let l = around_the_hole();
        assert_eq!(l.chunk_count(), 4096);
        assert_eq!(l.chunk_of_guest_addr(0x1000), Some(0));
        assert_eq!(l.chunk_of_guest_addr(4 << 30), Some(3072));
        assert_eq!(l.chunk_of_guest_addr(3 << 30), None);
        assert_eq!(l.chunk_guest_range(3072), Some((4 << 30, MIB)));
        assert_eq!(l.chunk_part_range(3072), Some((3 << 30, MIB)));
        assert_eq!(l.chunk_guest_range(4096), None);
        assert_eq!(l.chunk_guest_range(u64::MAX), None);
    }

    #[test]
    fn host_mapping_agrees_with_guest_mapping() {
        let l = around_the_hole();
        let m = l
            .mapped_at(vec![0x7f00_0000_0000, 0x7e00_0000_0000])
            .unwrap();
        assert_eq!(
            m.chunk_of_host_addr(0x7f00_0000_0000 + 5 * MIB + 7),
            Some(5)
        );
        assert_eq!(m.chunk_of_host_addr(0x7e00_0000_0000), Some(3072));
        assert_eq!(
            m.chunk_host_range(3073),
            Some((0x7e00_0000_0000 + MIB, MIB))
        );
        assert_eq!(m.chunk_of_host_addr(0x1000), None);
        for index in [0, 1, 3071, 3072, 4095] {
            let (host, _) = m.chunk_host_range(index).unwrap();
            let (guest, _) = l.chunk_guest_range(index).unwrap();
            assert_eq!(m.chunk_of_host_addr(host), l.chunk_of_guest_addr(guest));
        }
        assert!(l.mapped_at(vec![0]).is_none());
    }

    #[test]
    fn a_short_last_chunk_and_refused_layouts() {
        let l = MemoryLayout::back_to_back(&[(0, 2 * MIB + 4096)], MIB).unwrap();
        assert_eq!(l.chunk_count(), 3);
        assert_eq!(l.chunk_guest_range(2), Some((2 * MIB, 4096)));
        assert!(MemoryLayout::back_to_back(&[(0, MIB + 1), (4 << 30, MIB)], MIB).is_err());
        assert!(MemoryLayout::back_to_back(&[(0, MIB)], 0).is_err());
        let gap = vec![
            MemoryRegionState {
                guest_addr: 0,
                len: MIB,
                part_offset: 0,
            },
            MemoryRegionState {
                guest_addr: 4 << 30,
                len: MIB,
                part_offset: 2 * MIB,
            },
        ];
        assert!(MemoryLayout::new(gap, MIB).is_err());
    }
}

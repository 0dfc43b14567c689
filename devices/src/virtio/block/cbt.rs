//! Changed-block tracking: which 64 KiB blocks of a disk the guest wrote since the last mark.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Granularity of changed-block tracking (and of overlay clusters).
pub const CBT_BLOCK_SIZE: u64 = 64 * 1024;

/// The live bitmap a disk marks as writes complete.
///
/// Marking is lock-free; [`crate::virtio::block::Disk`] makes taking the bitmap atomic with
/// respect to in-flight writes by holding its layer lock exclusively while it swaps.
#[derive(Debug)]
pub struct ChangedBlockTracker {
    disk_size: u64,
    words: Vec<AtomicU64>,
}

impl ChangedBlockTracker {
    /// A clean tracker for a disk of `disk_size` bytes.
    pub fn new(disk_size: u64) -> Self {
        let blocks = disk_size.div_ceil(CBT_BLOCK_SIZE);
        let words = (0..blocks.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        Self { disk_size, words }
    }

    /// Marks every block touched by `[offset, offset + len)`.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.disk_size {
            return;
        }
        let end = offset.saturating_add(len).min(self.disk_size);
        for block in offset / CBT_BLOCK_SIZE..end.div_ceil(CBT_BLOCK_SIZE) {
            self.words[(block / 64) as usize].fetch_or(1 << (block % 64), Ordering::SeqCst);
        }
    }

    /// Returns the blocks marked so far and clears them.
    pub fn take(&self) -> ChangedBlocks {
        ChangedBlocks {
            disk_size: self.disk_size,
            block_size: CBT_BLOCK_SIZE,
            words: self
                .words
                .iter()
                .map(|w| w.swap(0, Ordering::SeqCst))
                .collect(),
        }
    }

    /// Marks every block, e.g. when there is no earlier backup to compare with.
    pub fn mark_all(&self) {
        self.mark(0, self.disk_size);
    }
}

/// A set of changed blocks taken from a disk at one instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedBlocks {
    /// Size of the disk in bytes.
    pub disk_size: u64,
    /// Bytes per block (64 KiB).
    pub block_size: u64,
    /// Bit `i % 64` of word `i / 64` is set when block `i` changed.
    pub words: Vec<u64>,
}

impl ChangedBlocks {
    /// Number of blocks of the disk (the last one may be short).
    pub fn block_count(&self) -> u64 {
        self.disk_size.div_ceil(self.block_size)
    }

    /// Whether block `index` changed.
    pub fn is_changed(&self, index: u64) -> bool {
        self.words
            .get((index / 64) as usize)
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    /// The indexes of the changed blocks, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            (0..64u64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| wi as u64 * 64 + b)
        })
    }

    /// How many blocks changed.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Changed byte ranges `(offset, len)`, adjacent blocks merged, clipped to the disk size.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for block in self.iter() {
            let start = block * self.block_size;
            let len = self.block_size.min(self.disk_size - start);
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => *l += len,
                _ => out.push((start, len)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_exactly_the_touched_blocks() {
        let size = 100 * CBT_BLOCK_SIZE + 512;
        let t = ChangedBlockTracker::new(size);
        t.mark(0, 1);
        t.mark(5 * CBT_BLOCK_SIZE - 512, 1024); // straddles blocks 4 and 5
        t.mark(100 * CBT_BLOCK_SIZE, 512); // the short last block
        t.mark(size, 512); // past the end: ignored
        let c = t.take();
        assert_eq!(c.iter().collect::<Vec<_>>(), vec![0, 4, 5, 100]);
        assert_eq!(c.count(), 4);
        assert_eq!(c.block_count(), 101);
        assert_eq!(
            c.ranges(),
            vec![
                (0, CBT_BLOCK_SIZE),
                (4 * CBT_BLOCK_SIZE, 2 * CBT_BLOCK_SIZE),
                (100 * CBT_BLOCK_SIZE, 512)
            ]
        );
        assert_eq!(t.take().count(), 0, "take resets the bitmap");
        t.mark_all();
        assert_eq!(t.take().count(), 101);
    }
}

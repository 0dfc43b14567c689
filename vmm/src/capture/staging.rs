//! The copy-on-write staging pool: a bounded set of buffers in memory where the fault thread
//! puts a protection unit the guest is about to write, so that the writer waits for a memory
//! copy instead of the target's I/O.
//!
//! ```text
//!   guest write ──fault──▶ cow-fault thread ──memcpy unit──▶ [ staging pool ] ──▶ snapshot copier
//!                              │  (lift protection at once)       (bounded)          (drains to the sink)
//!                              └─ pool full: copy the unit to the sink itself, the writer waits
//! ```
//!
//! Each snapshot's bound is set when its copier starts ([`StagingPool::plan`]): a given size,
//! or by default ([`StagingSize::Auto`]) the guest's memory, but at most half of the host's
//! available memory at that moment. A guest that rewrites all its memory during the copy
//! needs about that much, because the target drains the pool far slower than the guest fills
//! it. The first [`KEPT_STAGING_BYTES`] of buffers are allocated by the copier (off the fault
//! path) and kept between snapshots; the rest are allocated by the fault thread when needed
//! and freed when the snapshot ends, so a VM between snapshots holds at most that much.

use std::collections::VecDeque;
use std::sync::Mutex;

use snapshot::lock;

/// How large the staging pool may grow during one snapshot (`--cow-staging`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StagingSize {
    /// As large as guest memory, at most half of the host's available memory (the default).
    Auto,
    /// At most this many bytes; 0 turns staging off.
    Bytes(u64),
}

impl StagingSize {
    /// Parses `auto` or a size (`64M`, `0`).
    pub fn parse(text: &str) -> Result<Self, crate::config::ConfigError> {
        if text.trim().eq_ignore_ascii_case("auto") {
            Ok(Self::Auto)
        } else {
            crate::config::parse_size(text).map(Self::Bytes)
        }
    }
}

/// Buffers the copier allocates at the start of a snapshot and the pool keeps between
/// snapshots (at most the snapshot's bound).
pub const KEPT_STAGING_BYTES: u64 = 64 << 20;

/// One unit copied out by the fault thread, waiting for the copier.
pub struct StagedUnit {
    pub unit: u64,
    pub data: Vec<u8>,
}

struct PoolState {
    /// Buffers not in use.
    free: Vec<Vec<u8>>,
    /// Buffers that exist (free, queued, or being drained).
    allocated: usize,
    /// How many buffers may exist during this snapshot.
    limit: usize,
    /// Units waiting for the copier, oldest first.
    queue: VecDeque<StagedUnit>,
}

/// A bounded pool of unit-sized buffers.
pub struct StagingPool {
    unit_bytes: usize,
    size: StagingSize,
    /// The guest's memory: the bound of [`StagingSize::Auto`].
    guest_bytes: u64,
    state: Mutex<PoolState>,
}

impl StagingPool {
    /// A pool of buffers of `unit_bytes` for a guest of `guest_bytes`, bounded by `size`.
    pub fn new(size: StagingSize, unit_bytes: u64, guest_bytes: u64) -> Self {
        let pool = Self {
            unit_bytes: unit_bytes.max(1) as usize,
            size,
            guest_bytes,
            state: Mutex::new(PoolState {
                free: Vec::new(),
                allocated: 0,
                limit: 0,
                queue: VecDeque::new(),
            }),
        };
        // Until the first snapshot plans its bound, report the configured one.
        let first = match size {
            StagingSize::Auto => guest_bytes,
            StagingSize::Bytes(b) => b,
        };
        lock(&pool.state).limit = pool.buffers(first);
        pool
    }

    fn buffers(&self, bytes: u64) -> usize {
        (bytes / self.unit_bytes as u64) as usize
    }

    /// Whether staging is on.
    pub fn is_enabled(&self) -> bool {
        self.size != StagingSize::Bytes(0)
    }

    /// How many bytes the pool may hold in the current (or next) snapshot.
    pub fn capacity(&self) -> u64 {
        (lock(&self.state).limit * self.unit_bytes) as u64
    }

    /// Sets this snapshot's bound, with `available` the host's available memory (None if
    /// unknown: then an automatic pool keeps to [`KEPT_STAGING_BYTES`]), and allocates and
    /// touches the buffers kept between snapshots, so that the fault path finds them ready.
    /// Called by the copier when a snapshot starts, off the fault path.
    pub fn plan(&self, available: Option<u64>) {
        let bound = match self.size {
            StagingSize::Bytes(b) => b,
            StagingSize::Auto => match available {
                Some(a) => self.guest_bytes.min(a / 2),
                None => KEPT_STAGING_BYTES.min(self.guest_bytes),
            },
        };
        let limit = self.buffers(bound);
        let kept = limit.min(self.buffers(KEPT_STAGING_BYTES));
        lock(&self.state).limit = limit;
        loop {
            let mut s = lock(&self.state);
            if s.allocated >= kept {
                return;
            }
            s.allocated += 1;
            drop(s);
            let buf = vec![0u8; self.unit_bytes];
            lock(&self.state).free.push(buf);
        }
    }

    /// A free buffer (allocated if the pool has room for one more), or None when every buffer
    /// holds a unit the copier has not written yet.
    pub fn take_buffer(&self) -> Option<Vec<u8>> {
        let mut s = lock(&self.state);
        if let Some(b) = s.free.pop() {
            return Some(b);
        }
        if s.allocated < s.limit {
            s.allocated += 1;
            drop(s);
            return Some(Vec::with_capacity(self.unit_bytes));
        }
        None
    }

    /// Queues a filled buffer for the copier.
    pub fn push(&self, unit: StagedUnit) {
        lock(&self.state).queue.push_back(unit);
    }

    /// The oldest unit waiting for the copier.
    pub fn pop(&self) -> Option<StagedUnit> {
        lock(&self.state).queue.pop_front()
    }

    /// Returns a buffer the copier has written out.
    pub fn give_back(&self, buf: Vec<u8>) {
        lock(&self.state).free.push(buf);
    }

    /// Drops every queued unit (the snapshot ended or failed), and frees the buffers beyond
    /// those kept between snapshots.
    pub fn discard_queued(&self) {
        let kept = self.buffers(KEPT_STAGING_BYTES);
        let extra = {
            let mut s = lock(&self.state);
            while let Some(u) = s.queue.pop_front() {
                s.free.push(u.data);
            }
            let n = s.allocated.saturating_sub(kept).min(s.free.len());
            s.allocated -= n;
            let at = s.free.len() - n;
            s.free.split_off(at)
        };
        // Freed outside the lock.
        drop(extra);
    }

    /// Buffers that exist now (free, queued or being drained).
    pub fn allocated_bytes(&self) -> u64 {
        (lock(&self.state).allocated * self.unit_bytes) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_full_pool_refuses_until_a_buffer_comes_back() {
        let pool = StagingPool::new(StagingSize::Bytes(4 * MIB), 2 * MIB, 64 * MIB);
        assert!(pool.is_enabled());
        assert_eq!(pool.capacity(), 4 * MIB);
        let a = pool.take_buffer().expect("first");
        let b = pool.take_buffer().expect("second");
        assert!(pool.take_buffer().is_none(), "only two fit");
        pool.push(StagedUnit { unit: 7, data: a });
        pool.push(StagedUnit { unit: 3, data: b });
        let first = pool.pop().expect("queued");
        assert_eq!(first.unit, 7, "oldest first");
        pool.give_back(first.data);
        assert!(pool.take_buffer().is_some());
        assert!(pool.take_buffer().is_none());
        pool.discard_queued();
        assert!(pool.pop().is_none());
        assert!(
            pool.take_buffer().is_some(),
            "a discarded unit frees its buffer"
        );
    }

    #[test]
    fn size_zero_stages_nothing_and_plan_prefills() {
        let off = StagingPool::new(StagingSize::Bytes(0), 2 * MIB, 64 * MIB);
        assert!(!off.is_enabled());
        off.plan(Some(1 << 40));
        assert!(off.take_buffer().is_none());
        let small = StagingPool::new(StagingSize::Bytes(3 * MIB), MIB, 64 * MIB);
        small.plan(None);
        for _ in 0..3 {
            let b = small.take_buffer().expect("prefilled");
            assert_eq!(b.len(), MIB as usize);
        }
        assert!(small.take_buffer().is_none());
    }

    #[test]
    fn auto_is_guest_memory_bounded_by_half_the_available_memory() {
        let guest = 4096 * MIB;
        let pool = StagingPool::new(StagingSize::Auto, 2 * MIB, guest);
        assert_eq!(pool.capacity(), guest, "before the first snapshot");
        pool.plan(Some(100_000 * MIB));
        assert_eq!(pool.capacity(), guest, "plenty available: the guest's size");
        pool.plan(Some(1000 * MIB));
        assert_eq!(pool.capacity(), 500 * MIB, "half of what is available");
        pool.plan(None);
        assert_eq!(
            pool.capacity(),
            KEPT_STAGING_BYTES,
            "unknown: the kept buffers"
        );
        assert_eq!(StagingSize::parse("auto").unwrap(), StagingSize::Auto);
        assert_eq!(StagingSize::parse("0").unwrap(), StagingSize::Bytes(0));
        assert!(StagingSize::parse("lots").is_err());
    }

    #[test]
    fn buffers_beyond_the_kept_ones_are_freed_when_a_snapshot_ends() {
        let pool = StagingPool::new(StagingSize::Auto, 2 * MIB, 1024 * MIB);
        pool.plan(Some(1 << 40));
        assert_eq!(
            pool.allocated_bytes(),
            KEPT_STAGING_BYTES,
            "kept ones prefilled"
        );
        let mut taken = Vec::new();
        while let Some(b) = pool.take_buffer() {
            taken.push(b);
        }
        assert_eq!(taken.len(), 512, "the whole guest fits");
        for (unit, data) in taken.into_iter().enumerate() {
            pool.push(StagedUnit {
                unit: unit as u64,
                data,
            });
        }
        let drained = pool.pop().expect("queued");
        pool.give_back(drained.data);
        pool.discard_queued();
        assert_eq!(pool.allocated_bytes(), KEPT_STAGING_BYTES);
        assert!(pool.pop().is_none());
    }
}

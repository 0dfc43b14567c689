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
//! Buffers are allocated on first use and kept for later snapshots (so the pool's memory is
//! resident once a snapshot filled it); a pool of size 0 stages nothing and every fault copies
//! to the sink directly, as before the pool existed.

use std::collections::VecDeque;
use std::sync::Mutex;

use snapshot::lock;

/// The default pool size (`--cow-staging`): 64 MiB, 32 protection units.
pub const DEFAULT_STAGING_BYTES: u64 = 64 << 20;

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
    /// Units waiting for the copier, oldest first.
    queue: VecDeque<StagedUnit>,
}

/// A bounded pool of unit-sized buffers.
pub struct StagingPool {
    unit_bytes: usize,
    max_buffers: usize,
    state: Mutex<PoolState>,
}

impl StagingPool {
    /// A pool of at most `capacity` bytes in buffers of `unit_bytes` (0 turns staging off).
    pub fn new(capacity: u64, unit_bytes: u64) -> Self {
        let max_buffers = capacity.checked_div(unit_bytes).unwrap_or(0) as usize;
        Self {
            unit_bytes: unit_bytes as usize,
            max_buffers,
            state: Mutex::new(PoolState {
                free: Vec::with_capacity(max_buffers),
                allocated: 0,
                queue: VecDeque::with_capacity(max_buffers),
            }),
        }
    }

    /// Whether staging is on.
    pub fn is_enabled(&self) -> bool {
        self.max_buffers > 0
    }

    /// How many bytes the pool may hold.
    pub fn capacity(&self) -> u64 {
        (self.max_buffers * self.unit_bytes) as u64
    }

    /// A free buffer (allocated if the pool has room for one more), or None when every buffer
    /// holds a unit the copier has not written yet.
    pub fn take_buffer(&self) -> Option<Vec<u8>> {
        let mut s = lock(&self.state);
        if let Some(b) = s.free.pop() {
            return Some(b);
        }
        if s.allocated < self.max_buffers {
            s.allocated += 1;
            drop(s);
            return Some(Vec::with_capacity(self.unit_bytes));
        }
        None
    }

    /// Allocates and touches every buffer not allocated yet, so that the fault path finds them
    /// ready (called by the copier at the start of a snapshot, off the fault path).
    pub fn prefill(&self) {
        loop {
            let mut s = lock(&self.state);
            if s.allocated >= self.max_buffers {
                return;
            }
            s.allocated += 1;
            drop(s);
            let buf = vec![0u8; self.unit_bytes];
            lock(&self.state).free.push(buf);
        }
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

    /// Drops every queued unit (the snapshot ended or failed); their buffers become free.
    pub fn discard_queued(&self) {
        let mut s = lock(&self.state);
        while let Some(u) = s.queue.pop_front() {
            s.free.push(u.data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_pool_refuses_until_a_buffer_comes_back() {
        let pool = StagingPool::new(4 << 20, 2 << 20);
        assert!(pool.is_enabled());
        assert_eq!(pool.capacity(), 4 << 20);
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
    fn size_zero_stages_nothing_and_prefill_fills() {
        let off = StagingPool::new(0, 2 << 20);
        assert!(!off.is_enabled());
        assert!(off.take_buffer().is_none());
        let small = StagingPool::new(3 << 20, 1 << 20);
        small.prefill();
        for _ in 0..3 {
            let b = small.take_buffer().expect("prefilled");
            assert_eq!(b.len(), 1 << 20);
        }
        assert!(small.take_buffer().is_none());
    }
}

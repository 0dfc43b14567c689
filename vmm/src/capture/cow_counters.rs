//! What the write faults of the running cow snapshot cost: counts and waits, added to by the
//! fault thread and read into the snapshot's status.

use std::sync::atomic::{AtomicU64, Ordering};

use super::status::CowStats;

/// The fault costs of the running snapshot (reset at each snapshot instant).
#[derive(Default)]
pub struct FaultCounters {
    faults: AtomicU64,
    bytes_staged: AtomicU64,
    pool_full: AtomicU64,
    wait_us: AtomicU64,
    wait_max_us: AtomicU64,
}

impl FaultCounters {
    /// Starts counting for a new snapshot.
    pub fn reset(&self) {
        for c in [
            &self.faults,
            &self.bytes_staged,
            &self.pool_full,
            &self.wait_us,
            &self.wait_max_us,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// The counts so far, with the pool size `staging_bytes`.
    pub fn stats(&self, staging_bytes: u64) -> CowStats {
        CowStats {
            faults: self.faults.load(Ordering::Relaxed),
            bytes_staged: self.bytes_staged.load(Ordering::Relaxed),
            pool_full: self.pool_full.load(Ordering::Relaxed),
            writer_wait_us: self.wait_us.load(Ordering::Relaxed),
            writer_wait_max_us: self.wait_max_us.load(Ordering::Relaxed),
            staging_bytes,
        }
    }

    /// Counts one fault whose writer waited `waited_us`.
    pub fn record(&self, waited_us: u64) {
        self.faults.fetch_add(1, Ordering::Relaxed);
        self.wait_us.fetch_add(waited_us, Ordering::Relaxed);
        self.wait_max_us.fetch_max(waited_us, Ordering::Relaxed);
    }

    /// Counts `bytes` staged by a fault.
    pub fn add_staged(&self, bytes: u64) {
        self.bytes_staged.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts a fault that found the pool full.
    pub fn add_pool_full(&self) {
        self.pool_full.fetch_add(1, Ordering::Relaxed);
    }
}

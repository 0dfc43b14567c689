//! Per-chunk load state, without locks: a thread that wants a chunk claims it (missing →
//! loading) and only the claimer reads and fills it. No lock is held through a read, so one slow
//! or stuck chunk read blocks only the threads that need that chunk.
//!
//! ```text
//!   MISSING ──claim──► LOADING ──finish(ok)──► LOADED
//!                         └────finish(err)───► FAILED
//!   (+ WAITED: a fault arrived for the chunk before it was loaded)
//! ```

use std::sync::atomic::{AtomicU8, Ordering};

const MISSING: u8 = 0;
const LOADING: u8 = 1;
const LOADED: u8 = 2;
const FAILED: u8 = 3;
const STATE: u8 = 0x0f;
const WAITED: u8 = 0x10;

/// What a claim found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Claim {
    /// The caller owns the chunk now and must [`ChunkStates::finish`] it.
    Claimed,
    /// Another thread is loading it; its fill wakes the chunk's waiters.
    Busy,
    Loaded,
    Failed,
}

/// The state of every chunk.
pub(super) struct ChunkStates {
    states: Vec<AtomicU8>,
}

impl ChunkStates {
    pub(super) fn new(count: usize) -> Self {
        Self {
            states: (0..count).map(|_| AtomicU8::new(MISSING)).collect(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.states.len()
    }

    fn claim_of(state: u8) -> Claim {
        match state & STATE {
            LOADING => Claim::Busy,
            LOADED => Claim::Loaded,
            FAILED => Claim::Failed,
            _ => Claim::Claimed,
        }
    }

    /// Takes chunk `index` for loading if it is missing. `None` for an index past the end.
    pub(super) fn claim(&self, index: usize) -> Option<Claim> {
        let slot = self.states.get(index)?;
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            if cur & STATE != MISSING {
                return Some(Self::claim_of(cur));
            }
            match slot.compare_exchange_weak(
                cur,
                (cur & WAITED) | LOADING,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Claim::Claimed),
                Err(now) => cur = now,
            }
        }
    }

    /// Marks chunk `index` as waited for by a fault. Returns whether this is the first waiter
    /// of a chunk that is not loaded (so the count of waited-for chunks grows by one).
    pub(super) fn mark_waited(&self, index: usize) -> bool {
        let Some(slot) = self.states.get(index) else {
            return false;
        };
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            if cur & STATE == LOADED || cur & WAITED != 0 {
                return false;
            }
            match slot.compare_exchange_weak(cur, cur | WAITED, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Ends the claimer's load of chunk `index`. Returns whether a fault was waiting for it
    /// (only for a chunk now loaded: a failed chunk's waiters go on waiting).
    pub(super) fn finish(&self, index: usize, ok: bool) -> bool {
        let Some(slot) = self.states.get(index) else {
            return false;
        };
        let new = if ok { LOADED } else { FAILED };
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            let keep = if ok { 0 } else { cur & WAITED };
            match slot.compare_exchange_weak(cur, new | keep, Ordering::AcqRel, Ordering::Acquire) {
                Ok(old) => return ok && old & WAITED != 0,
                Err(now) => cur = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_claimer_per_chunk_and_waiters_are_counted_once() {
        let c = ChunkStates::new(2);
        assert!(c.mark_waited(0));
        assert!(!c.mark_waited(0));
        assert_eq!(c.claim(0), Some(Claim::Claimed));
        assert_eq!(c.claim(0), Some(Claim::Busy));
        assert!(c.finish(0, true));
        assert_eq!(c.claim(0), Some(Claim::Loaded));
        assert!(!c.mark_waited(0));
        assert_eq!(c.claim(1), Some(Claim::Claimed));
        assert!(c.mark_waited(1));
        assert!(!c.finish(1, false));
        assert_eq!(c.claim(1), Some(Claim::Failed));
        assert_eq!(c.claim(2), None);
    }
}

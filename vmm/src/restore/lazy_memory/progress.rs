//! The loader's progress, readable from any thread while it runs and after it has gone: what
//! `GET /vm` shows as `memory_loader`, and `arkvm status` prints.
//!
//! This file imports nothing from the crate, so the API types can name [`MemoryLoaderInfo`]
//! without an import circle.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// `loaded_ms` and `first_output_ms` before the event.
const NOT_YET: u64 = u64::MAX;

/// Where the huge-page collapse after loading is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollapseState {
    /// Memory is still loading.
    Pending,
    /// Memory is in; `MADV_COLLAPSE` is folding it back into huge pages.
    Running,
    /// Done (or refused by the kernel, which only costs speed).
    Done,
}

impl CollapseState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Pending,
            1 => Self::Running,
            _ => Self::Done,
        }
    }
}

/// A copy of the loader's progress (the `memory_loader` object of `GET /vm`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLoaderInfo {
    pub chunks_total: u64,
    /// Chunks in guest memory (read and checked, or mapped as zero).
    pub chunks_loaded: u64,
    pub bytes_total: u64,
    /// Bytes of guest memory filled so far (chunks read plus zero chunks mapped).
    pub bytes_loaded: u64,
    /// Bytes read from the source (zero chunks the source vouches for are not read).
    pub bytes_read: u64,
    /// Page faults served on demand (the rest came in by prefetch).
    pub faults_served: u64,
    /// Chunks that threads are waiting for right now.
    pub chunks_waited_for: u64,
    /// Milliseconds since the last chunk came in.
    pub ms_since_last_chunk: u64,
    /// Every chunk is in: the VM no longer depends on the source.
    pub fully_loaded: bool,
    /// Milliseconds from the loader's start until every chunk was in.
    pub loaded_after_ms: Option<u64>,
    pub collapse: CollapseState,
    /// `bytes_loaded` when the restored guest first wrote to its console.
    pub bytes_loaded_at_first_output: Option<u64>,
    /// Milliseconds from the loader's start to the guest's first console output.
    pub first_output_after_ms: Option<u64>,
    /// How many times no chunk came in for a few seconds while faults waited.
    pub stall_warnings: u64,
    /// Why loading stopped, if it failed.
    pub error: Option<String>,
}

/// The live counters.
#[derive(Debug)]
pub struct LoaderProgress {
    started: Instant,
    chunks_total: u64,
    bytes_total: u64,
    chunks_loaded: AtomicU64,
    bytes_loaded: AtomicU64,
    bytes_read: AtomicU64,
    faults_served: AtomicU64,
    chunks_waited_for: AtomicU64,
    last_chunk_ms: AtomicU64,
    loaded_ms: AtomicU64,
    collapse: AtomicU8,
    first_output_bytes: AtomicU64,
    first_output_ms: AtomicU64,
    stall_warnings: AtomicU64,
    error: Mutex<Option<String>>,
}

impl LoaderProgress {
    /// Counters for a load of `chunks_total` chunks, `bytes_total` bytes, starting now.
    pub fn new(chunks_total: u64, bytes_total: u64) -> Self {
        Self {
            started: Instant::now(),
            chunks_total,
            bytes_total,
            chunks_loaded: AtomicU64::new(0),
            bytes_loaded: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            faults_served: AtomicU64::new(0),
            chunks_waited_for: AtomicU64::new(0),
            last_chunk_ms: AtomicU64::new(0),
            loaded_ms: AtomicU64::new(NOT_YET),
            collapse: AtomicU8::new(0),
            first_output_bytes: AtomicU64::new(NOT_YET),
            first_output_ms: AtomicU64::new(NOT_YET),
            stall_warnings: AtomicU64::new(0),
            error: Mutex::new(None),
        }
    }

    /// Milliseconds since the loader started.
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A chunk of `len` bytes came in; `read` says whether it was read (not mapped as zero).
    /// Returns whether it was the last one.
    pub(super) fn chunk_loaded(&self, len: u64, read: bool) -> bool {
        self.last_chunk_ms
            .store(self.elapsed_ms(), Ordering::Relaxed);
        self.bytes_loaded.fetch_add(len, Ordering::Relaxed);
        if read {
            self.bytes_read.fetch_add(len, Ordering::Relaxed);
        }
        let last = self.chunks_loaded.fetch_add(1, Ordering::AcqRel) + 1 == self.chunks_total;
        if last {
            self.loaded_ms.store(self.elapsed_ms(), Ordering::Release);
        }
        last
    }

    pub(super) fn fault_served(&self) {
        self.faults_served.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn waited_for(&self, delta: i64) {
        if delta >= 0 {
            self.chunks_waited_for
                .fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.chunks_waited_for
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }

    pub(super) fn stall_warned(&self) {
        self.stall_warnings.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn set_collapse(&self, state: CollapseState) {
        self.collapse.store(state as u8, Ordering::Release);
    }

    pub(super) fn set_error(&self, detail: &str) {
        if let Ok(mut e) = self.error.lock() {
            e.get_or_insert_with(|| detail.to_string());
        }
    }

    /// Records the guest's first console output (only the first call counts); returns the
    /// bytes loaded at that moment if this was the first call.
    pub fn note_first_output(&self) -> Option<u64> {
        let loaded = self.bytes_loaded.load(Ordering::Acquire);
        self.first_output_bytes
            .compare_exchange(NOT_YET, loaded, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        self.first_output_ms
            .store(self.elapsed_ms(), Ordering::Release);
        Some(loaded)
    }

    /// Whether every chunk is in.
    pub fn fully_loaded(&self) -> bool {
        self.chunks_loaded.load(Ordering::Acquire) >= self.chunks_total
    }

    /// Chunks that threads wait for now.
    pub fn chunks_waited_for(&self) -> u64 {
        self.chunks_waited_for.load(Ordering::Relaxed)
    }

    /// Milliseconds since the last chunk came in (or since the start, before the first).
    pub fn ms_since_last_chunk(&self) -> u64 {
        self.elapsed_ms()
            .saturating_sub(self.last_chunk_ms.load(Ordering::Relaxed))
    }

    /// A copy of every counter.
    pub fn info(&self) -> MemoryLoaderInfo {
        let opt = |v: u64| (v != NOT_YET).then_some(v);
        MemoryLoaderInfo {
            chunks_total: self.chunks_total,
            chunks_loaded: self.chunks_loaded.load(Ordering::Acquire),
            bytes_total: self.bytes_total,
            bytes_loaded: self.bytes_loaded.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            faults_served: self.faults_served.load(Ordering::Relaxed),
            chunks_waited_for: self.chunks_waited_for(),
            ms_since_last_chunk: self.ms_since_last_chunk(),
            fully_loaded: self.fully_loaded(),
            loaded_after_ms: opt(self.loaded_ms.load(Ordering::Acquire)),
            collapse: CollapseState::from_u8(self.collapse.load(Ordering::Acquire)),
            bytes_loaded_at_first_output: opt(self.first_output_bytes.load(Ordering::Acquire)),
            first_output_after_ms: opt(self.first_output_ms.load(Ordering::Acquire)),
            stall_warnings: self.stall_warnings.load(Ordering::Relaxed),
            error: self.error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_and_only_the_first_output_counts() {
        let p = LoaderProgress::new(2, 2 << 20);
        assert!(!p.chunk_loaded(1 << 20, true));
        assert_eq!(p.note_first_output(), Some(1 << 20));
        assert_eq!(p.note_first_output(), None);
        assert!(p.chunk_loaded(1 << 20, false));
        let i = p.info();
        assert!(i.fully_loaded);
        assert_eq!((i.bytes_loaded, i.bytes_read), (2 << 20, 1 << 20));
        assert_eq!(i.bytes_loaded_at_first_output, Some(1 << 20));
        assert!(i.loaded_after_ms.is_some());
        assert_eq!(i.collapse, CollapseState::Pending);
    }
}

//! Copy-on-write memory capture with userfaultfd write-protection, and the write tracking that
//! makes the next backup incremental.
//!
//! The first live snapshot write-protects every guest page (unpopulated pages too, through
//! `UFFD_FEATURE_WP_UNPOPULATED`) and the protection then stays: every first write to a unit
//! (2 MiB: two snapshot chunks, one transparent huge page, so that lifting and restoring the
//! protection never splits a huge page) faults once to the fault thread, which
//! 1. marks the chunk as written since the last snapshot instant (the next backup reads only
//!    those chunks),
//! 2. if a snapshot is copying and has not copied this unit yet, copies it into the staging
//!    pool ([`super::staging`]: a memory copy, no I/O), or, when the pool is full or off, to the
//!    target itself (the writer then waits for that I/O, and the snapshot counts it),
//! 3. lifts the protection of the unit and wakes the writer.
//!
//! The copier writes the staged units out first, then walks the units and copies each one not
//! yet copied: it reads the unit under the unit's lock and writes it to the target after
//! letting go, so a writer that faults on it meanwhile waits for a memory copy only. It never
//! lifts protection, so a unit it copied still reports its next write. At the next snapshot
//! instant only the units written since are protected again. Each unit is captured exactly
//! once (the lock's flag says so), so the image is memory at the snapshot instant.
//!
//! Smaller units on the fault path were considered: a 4 KiB fault unit would make the copy a
//! writer waits for 512 times smaller, but a guest that rewrites its memory would take 512 times
//! more faults (each a round trip through the kernel and this thread), and lifting protection
//! page by page splits the transparent huge pages that back guest memory. The unit stays 2 MiB;
//! its memory copy is the whole of what a staged writer waits for.
//!
//! Neither thread waits on a guest write: reading protected memory does not fault, and no lock
//! the handlers take is held by a thread that writes guest memory. Device and VMM writes to
//! guest memory fault like the guest's own, so they are tracked too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use snapshot::{lock, MappedLayout, MemorySink};
use userfaultfd::{FeatureFlags, RegisterMode, UffdBuilder};

use super::cow_counters::FaultCounters;
use super::cow_fault::fault_loop;
use super::cow_shared::{ActiveCopy, Shared, CHUNKS_PER_UNIT};
use super::error::CaptureError;
pub use super::error::CowError;
use super::progress::Progress;
use super::staging::{StagingPool, StagingSize};
use devices::GuestMemoryMmap;

/// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4): write-protect page table entries that are not
/// populated yet, so that a first write to an untouched page faults too.
const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;

/// Write-protection over guest memory, with its fault thread.
pub struct CowTracker {
    shared: Arc<Shared>,
    fault_thread: Option<JoinHandle<()>>,
}

impl CowTracker {
    /// Write-protects all of guest memory and starts the fault thread, with a staging pool
    /// bounded by `staging`. Nothing is copied until [`CowTracker::begin`].
    pub fn arm(
        mem: &GuestMemoryMmap,
        layout: MappedLayout,
        staging: StagingSize,
    ) -> Result<Self, CowError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(
                FeatureFlags::PAGEFAULT_FLAG_WP
                    | FeatureFlags::from_bits_retain(FEATURE_WP_UNPOPULATED),
            )
            .create()
            .map_err(CowError::Create)?;
        for (host, len) in layout.host_regions() {
            uffd.register_with_mode(host as *mut _, len as usize, RegisterMode::WRITE_PROTECT)
                .map_err(CowError::Register)?;
        }
        for (host, len) in layout.host_regions() {
            if let Err(e) = uffd.write_protect(host as *mut _, len as usize) {
                for (host, len) in layout.host_regions() {
                    let _ = uffd.unregister(host as *mut _, len as usize);
                }
                return Err(CowError::Protect(e));
            }
        }
        let chunk_count = layout.layout().chunk_count();
        let layout_chunk_size = layout.layout().chunk_size();
        let guest_bytes: u64 = layout.host_regions().map(|(_, len)| len).sum();
        let units = chunk_count.div_ceil(CHUNKS_PER_UNIT) as usize;
        let shared = Arc::new(Shared {
            uffd,
            mem: mem.clone(),
            layout,
            chunk_count,
            copied: (0..units).map(|_| Mutex::new(true)).collect(),
            written: (0..units).map(|_| AtomicBool::new(false)).collect(),
            active: Mutex::new(None),
            stop: AtomicBool::new(false),
            pages_early: AtomicU64::new(0),
            error: Mutex::new(None),
            staging: StagingPool::new(staging, CHUNKS_PER_UNIT * layout_chunk_size, guest_bytes),
            counters: FaultCounters::default(),
        });
        let s = shared.clone();
        let fault_thread = std::thread::Builder::new()
            .name("cow-fault".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadKind::CowFault);
                fault_loop(s)
            })
            .map_err(CowError::Spawn)?;
        Ok(Self {
            shared,
            fault_thread: Some(fault_thread),
        })
    }

    /// The snapshot instant (vCPUs paused, after [`Self::take_written`]): starts copying into
    /// `part`. Chunks marked in `clean` are taken from the parent point instead of copied.
    pub fn begin(&self, sink: Arc<dyn MemorySink>, progress: Progress, clean: Option<&[bool]>) {
        let s = &self.shared;
        for (unit, c) in s.copied.iter().enumerate() {
            let unit_clean =
                clean.is_some_and(|cl| s.unit_chunks(unit as u64).all(|chunk| cl[chunk as usize]));
            *lock(c) = unit_clean;
        }
        *lock(&s.error) = None;
        s.counters.reset();
        progress.update(|st| st.cow = Some(s.counters.stats(s.staging.capacity())));
        *lock(&s.active) = Some(ActiveCopy { sink, progress });
    }

    /// At a snapshot instant (vCPUs paused): returns which chunks were written since the
    /// previous instant, and protects them again so their next write is seen.
    pub fn take_written(&self) -> Result<Vec<bool>, CowError> {
        let s = &self.shared;
        let mut written = vec![false; s.chunk_count as usize];
        for (unit, w) in s.written.iter().enumerate() {
            if w.swap(false, Ordering::AcqRel) {
                if let Some((host, len)) = s.host_range(unit as u64) {
                    s.uffd
                        .write_protect(host as *mut _, len as usize)
                        .map_err(CowError::Protect)?;
                }
                for chunk in s.unit_chunks(unit as u64) {
                    written[chunk as usize] = true;
                }
            }
        }
        Ok(written)
    }

    /// Copies every chunk not yet copied (the background copy), then detaches the snapshot.
    /// Chunks in `clean` are reused from the parent point.
    pub fn copy_remaining(
        &self,
        cancel: &AtomicBool,
        clean: Option<&[bool]>,
    ) -> Result<(), CaptureError> {
        let result = (|| {
            if let (Some(clean), Some((sink, _))) = (clean, self.shared.active()) {
                // Only chunks whose whole unit is clean are skipped; the others are copied.
                for unit in 0..self.shared.copied.len() as u64 {
                    let chunks = self.shared.unit_chunks(unit);
                    if chunks.clone().all(|c| clean[c as usize]) {
                        for c in chunks {
                            if !sink.reuse_unchanged(c)? {
                                return Err(CaptureError::ReuseRefused(c));
                            }
                        }
                    }
                }
            }
            // Off the fault path: this snapshot's bound, and the kept buffers ready before the
            // guest needs them.
            self.shared
                .staging
                .plan(crate::config::host_available_bytes());
            let mut buf = Vec::new();
            for index in 0..self.shared.copied.len() as u64 {
                if cancel.load(Ordering::Relaxed) {
                    return Err(CaptureError::Cancelled);
                }
                if let Some(e) = self.take_error() {
                    return Err(CaptureError::CowFault(e));
                }
                // Staged units first, so the pool has room for the next writer.
                self.shared.drain_staged()?;
                self.shared.capture_unit(index, &mut buf, false)?;
                if index % 64 == 0 {
                    self.publish_stats();
                }
            }
            // Every unit's lock was taken since its staging, so nothing more can be queued.
            self.shared.drain_staged()?;
            match self.take_error() {
                Some(e) => Err(CaptureError::CowFault(e)),
                None => Ok(()),
            }
        })();
        self.end();
        result
    }

    /// Puts the fault costs so far into the running snapshot's status.
    fn publish_stats(&self) {
        let s = &self.shared;
        if let Some((_, progress)) = s.active() {
            let stats = s.counters.stats(s.staging.capacity());
            progress.update(|st| st.cow = Some(stats));
        }
    }

    fn take_error(&self) -> Option<Arc<CaptureError>> {
        lock(&self.shared.error).clone()
    }

    /// Detaches the active snapshot: faults only track writes from now on. Publishes what the
    /// snapshot's faults cost into its status and the log.
    pub fn end(&self) {
        let s = &self.shared;
        // Hold every chunk lock while detaching, so no fault is mid-copy into the part.
        let guards: Vec<_> = s.copied.iter().map(|c| lock(c)).collect();
        let active = lock(&s.active).take();
        for mut g in guards {
            *g = true;
        }
        s.staging.discard_queued();
        if let Some(active) = active {
            let stats = s.counters.stats(s.staging.capacity());
            tracing::info!(
                "cow copy: {} write faults, {} bytes staged, {} found the pool full, writers waited {} us in all (longest {} us), pool {} bytes",
                stats.faults,
                stats.bytes_staged,
                stats.pool_full,
                stats.writer_wait_us,
                stats.writer_wait_max_us,
                stats.staging_bytes
            );
            active.progress.update(|st| st.cow = Some(stats));
        }
    }

    /// Pages copied ahead of the copier because something wrote to them, in all snapshots.
    pub fn pages_copied_early(&self) -> u64 {
        self.shared.pages_early.load(Ordering::Relaxed)
    }
}

impl Drop for CowTracker {
    fn drop(&mut self) {
        // Lift every protection first so no writer stays blocked, then stop the thread.
        self.shared.unprotect_all();
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.fault_thread.take() {
            let _ = t.join();
        }
    }
}

//! Lazy loading of guest memory on restore: the guest resumes at once over empty anonymous
//! memory registered with userfaultfd (missing-page mode), and the chunks come from a
//! [`ChunkSource`] (a snapshot directory's memory part or a backup point's memory object).
//!
//! ```text
//!  vCPU / event loop ── touches a missing page ──► kernel queues a fault on the uffd
//!                                                      │ (each event to one thread)
//!  uffd-fault-0..2 ◄──────────── read_event ───────────┘
//!     chunk_of_host_addr ─► ensure(chunk): claimed by another thread? leave it to that one
//!  uffd-prefetch: ensure(0), ensure(1), ... ─► unregister ─► drop source ─► MADV_COLLAPSE
//!  uffd-monitor:  stall warning; after a failure, the last resort that ends the process
//!
//!  ensure(chunk), no lock held:  claim (missing → loading), then
//!     source vouches "zero" ─► UFFDIO_ZEROPAGE        (nothing read)
//!     otherwise            ─► read_chunk (read + check, transient errors retried) ─► UFFDIO_COPY
//!     ─► loaded (wakes every waiter on the chunk) and counted in LoaderProgress
//! ```
//!
//! - [`chunks`]: the per-chunk claim states; [`loader`]: loading one chunk; [`fill`]: the
//!   userfaultfd fills; [`threads`]: the threads; [`progress`]: the counters `GET /vm` shows;
//!   [`first_output`]: notes how much was loaded when the guest first wrote to its console.
//!
//! Every chunk is checked against its hash before the guest can see it, so damaged memory is
//! never run. The one mapping between chunks and host addresses is [`MappedLayout`]'s. When
//! every chunk is in, "guest memory fully loaded" is logged, the range is unregistered (which
//! leaves it free for a live snapshot's write-protect tracking), the loader lets go of the
//! source (and a repository's shared lock with it), and only then are the pages folded into
//! huge pages.
//!
//! Failure: a chunk that cannot be loaded ends the VM through the [`ExitSignal`]
//! ([`GuestExit::RestoreFailed`](crate::vstate::vcpu::GuestExit::RestoreFailed)), with an error
//! naming the source and the chunk. The fault threads go on serving every other chunk. A thread
//! that needs the failed chunk cannot be given correct bytes and stays blocked; the VMM ends
//! the VM without it ([`LazyMemory::vm_ending`]), and if it does not begin to within a few
//! seconds (its event loop is the blocked thread), the monitor ends the process. Nothing in
//! these threads panics: locks follow [`snapshot::lock`]'s policy and every fallible step is an
//! error.

mod chunks;
mod error;
mod fill;
pub mod first_output;
mod loader;
pub mod progress;
#[cfg(test)]
mod tests;
mod threads;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snapshot::{ChunkSource, MappedLayout};
use userfaultfd::{RegisterMode, UffdBuilder};

use crate::vstate::vcpu::ExitSignal;
use chunks::ChunkStates;
pub use error::LazyMemoryError;
use loader::Shared;
use progress::{LoaderProgress, MemoryLoaderInfo};

/// `ARKVM_LOADER_PREFETCH_DELAY_MS`: how long prefetch waits before it starts (default 0).
fn prefetch_delay() -> Duration {
    std::env::var("ARKVM_LOADER_PREFETCH_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or_default()
}

/// What one loader thread runs.
type ThreadBody = fn(Arc<Shared>);

/// The running loader.
pub struct LazyMemory {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

impl LazyMemory {
    /// Registers guest memory (`layout`) with userfaultfd and starts the loader threads, which
    /// fill it from `source` (`label` names it in messages: a directory or `REPO#ID`). A chunk
    /// that cannot be loaded ends the VM through `exit`.
    pub fn start(
        source: Arc<dyn ChunkSource>,
        layout: MappedLayout,
        label: &str,
        exit: Arc<ExitSignal>,
    ) -> Result<Self, LazyMemoryError> {
        let mismatch = |what, source_value, layout_value| LazyMemoryError::Mismatch {
            what,
            source_value,
            layout_value,
        };
        let guest = layout.layout();
        if source.chunk_size() != guest.chunk_size() {
            return Err(mismatch(
                "a chunk size of",
                source.chunk_size(),
                guest.chunk_size(),
            ));
        }
        if source.size() != guest.size() || source.chunk_count() != guest.chunk_count() {
            return Err(mismatch("a size of", source.size(), guest.size()));
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(LazyMemoryError::Create)?;
        for (host, len) in layout.host_regions() {
            uffd.register_with_mode(host as *mut _, len as usize, RegisterMode::MISSING)
                .map_err(LazyMemoryError::Register)?;
        }
        let chunks = guest.chunk_count() as usize;
        let progress = Arc::new(LoaderProgress::new(chunks as u64, guest.size()));
        let shared = Arc::new(Shared {
            uffd,
            layout,
            label: label.to_string(),
            source: Mutex::new(Some(source)),
            chunks: ChunkStates::new(chunks),
            progress,
            exit,
            stop: AtomicBool::new(false),
            ending: AtomicBool::new(false),
            failed_at: Mutex::new(None),
            unregistered: AtomicBool::new(false),
            prefetch_delay: prefetch_delay(),
            error: Mutex::new(None),
        });
        let mut loader = Self {
            shared: shared.clone(),
            threads: Vec::new(),
            started: Instant::now(),
        };
        let mut jobs: Vec<(String, ThreadBody)> = (0..threads::FAULT_THREADS)
            .map(|i| (format!("uffd-fault-{i}"), threads::fault_loop as ThreadBody))
            .collect();
        jobs.push(("uffd-prefetch".into(), threads::prefetch_loop));
        jobs.push(("uffd-monitor".into(), threads::monitor_loop));
        for (name, f) in jobs {
            let s = shared.clone();
            // On a spawn failure, dropping `loader` stops the threads already started.
            loader.threads.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || {
                        crate::seccomp::enter(crate::seccomp::ThreadKind::LazyFault);
                        f(s)
                    })
                    .map_err(LazyMemoryError::Spawn)?,
            );
        }
        Ok(loader)
    }

    /// The live progress counters, which outlive the loader.
    pub fn progress(&self) -> Arc<LoaderProgress> {
        self.shared.progress.clone()
    }

    /// Progress so far.
    pub fn info(&self) -> MemoryLoaderInfo {
        self.shared.progress.info()
    }

    /// Whether every chunk is in.
    pub fn is_done(&self) -> bool {
        self.shared.progress.fully_loaded()
    }

    /// The VMM has seen the VM's exit and is ending it: after a failure, the monitor leaves
    /// ending the process to the VMM.
    pub fn vm_ending(&self) {
        self.shared.ending.store(true, Ordering::Release);
    }

    /// Waits until every chunk is in and guest memory is unregistered from userfaultfd, or
    /// `timeout` passes, or loading fails. Returns whether loading finished.
    pub fn wait_loaded(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.shared.unregistered.load(Ordering::Acquire) {
            if Instant::now() >= deadline || self.shared.has_failed() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        tracing::debug!("memory loaded {:?} after restore", self.started.elapsed());
        true
    }

    /// Waits until every chunk is in (unregistering and the huge-page collapse go on in the
    /// background), or returns the error that stopped loading.
    pub fn wait_all_loaded(&self) -> Result<(), LazyMemoryError> {
        loop {
            if self.shared.progress.fully_loaded() {
                return Ok(());
            }
            if self.shared.has_failed() {
                return Err(snapshot::lock(&self.shared.error)
                    .take()
                    .unwrap_or(LazyMemoryError::Stopped));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

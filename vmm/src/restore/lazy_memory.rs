//! Lazy loading of guest memory on restore: the guest resumes at once over empty anonymous
//! memory registered with userfaultfd (missing-page mode), and the chunks come from a
//! [`ChunkSource`] (a snapshot directory's memory part or a backup point's memory object).
//!
//! ```text
//!  vCPU / event loop ── touches a missing page ──► kernel queues a fault on the uffd
//!                                                      │
//!  uffd-fault thread ◄─────────── read_event ──────────┘
//!     chunk_of_host_addr ─► load(chunk) ─► wake
//!  uffd-prefetch thread: load(0), load(1), ... ─► unregister ─► MADV_COLLAPSE ─► drop source
//!
//!  load(chunk), under the chunk's lock:
//!     source vouches "zero" ─► UFFDIO_ZEROPAGE        (nothing read)
//!     otherwise            ─► read_chunk (read + check) ─► UFFDIO_COPY
//! ```
//!
//! Every chunk is checked against its hash before the guest can see it, so damaged memory is
//! never run. The one mapping between chunks and host addresses is [`MappedLayout`]'s. When
//! every chunk is in, the range is unregistered (which leaves it free for a live snapshot's
//! write-protect tracking) and the loader lets go of the source, which releases whatever the
//! source holds (a repository's shared lock).
//!
//! Failure: a chunk that cannot be loaded ends the VM through the [`ExitSignal`]
//! ([`GuestExit::RestoreFailed`]). The fault thread goes on serving every fault it can, so no
//! thread waits behind the failed chunk's neighbours; a thread that needs the failed chunk
//! itself cannot be given correct bytes, so if the process has not ended a few seconds after
//! such a fault, the fault thread ends it with the error rather than leave it hung. Nothing in
//! these threads panics: locks follow [`snapshot::lock`]'s policy and every fallible step is an
//! error.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snapshot::{ChunkSource, ChunkSourceError, MappedLayout};
use userfaultfd::{Event, RegisterMode, Uffd, UffdBuilder};

use crate::vstate::vcpu::{ExitSignal, GuestExit};

/// Why lazy loading could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum LazyMemoryError {
    /// userfaultfd is unavailable.
    #[error("cannot create a userfaultfd (needs root or vm.unprivileged_userfaultfd=1)")]
    Create(#[source] userfaultfd::Error),
    /// Registering guest memory failed.
    #[error("cannot register guest memory with userfaultfd")]
    Register(#[source] userfaultfd::Error),
    /// The source's memory does not have the shape of guest memory.
    #[error("the saved memory has {what} {source_value}, guest memory {layout_value}")]
    Mismatch {
        what: &'static str,
        source_value: u64,
        layout_value: u64,
    },
    /// A chunk could not be read from the source, or failed its check.
    #[error("cannot load guest memory chunk {index}")]
    Read {
        index: u64,
        #[source]
        source: ChunkSourceError,
    },
    /// Filling guest memory failed.
    #[error("cannot fill guest memory for chunk {index}")]
    Fill {
        index: u64,
        #[source]
        source: userfaultfd::Error,
    },
    /// The kernel reported a copy of more bytes than were asked for.
    #[error("filling guest memory for chunk {index}: the kernel reported {reported} bytes copied of {remaining}")]
    FillCount {
        index: u64,
        reported: usize,
        remaining: usize,
    },
    /// Filling kept being refused with EAGAIN.
    #[error("filling guest memory for chunk {index} made no progress after {attempts} attempts")]
    FillStalled { index: u64, attempts: u32 },
    /// A chunk index or address outside guest memory (a bug).
    #[error("chunk {index} is outside guest memory")]
    NoSuchChunk { index: u64 },
    /// The source was released before chunk `index` was loaded (a bug).
    #[error("chunk {index} was asked for after the memory source was released")]
    Released { index: u64 },
    /// A thread could not be spawned.
    #[error("cannot spawn the memory loader thread")]
    Spawn(#[source] std::io::Error),
    /// The loader stopped before every chunk was in (its error was already taken).
    #[error("the memory loader stopped before guest memory was loaded")]
    Stopped,
}

/// How many times in a row a fill may be refused with EAGAIN before it is an error.
const MAX_FILL_RETRIES: u32 = 1000;

/// How long after a fault that cannot be served (its chunk failed) the process may still be
/// running before the fault thread ends it.
const STUCK_FAULT_EXIT: Duration = Duration::from_secs(5);

/// The page size of guest memory as userfaultfd fills it.
const PAGE: usize = 4096;

struct Shared {
    uffd: Uffd,
    layout: MappedLayout,
    /// Where chunks come from; released (set to `None`) once every chunk is in.
    source: Mutex<Option<Arc<dyn ChunkSource>>>,
    /// Per chunk: loaded or not; the lock serializes the fault and prefetch threads.
    loaded: Vec<Mutex<bool>>,
    remaining: AtomicUsize,
    done: AtomicBool,
    stop: AtomicBool,
    /// A chunk failed: the VM is ending.
    failed: AtomicBool,
    unregistered: AtomicBool,
    faults: AtomicUsize,
    /// The first failure, for [`LazyMemory::wait_all_loaded`].
    error: Mutex<Option<LazyMemoryError>>,
}

/// Progress of a lazy load.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct LazyLoadStats {
    pub chunks_total: usize,
    pub chunks_remaining: usize,
    pub faults_served: usize,
}

/// The running loader.
pub struct LazyMemory {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

/// What one `UFFDIO_COPY` call did to a fill that still needs `remaining` bytes.
#[derive(Debug)]
enum CopyStep {
    /// `n` bytes (1..=remaining) were copied.
    Copied(usize),
    /// Nothing was copied and the call may be repeated (EAGAIN).
    Retry,
    /// The kernel reported more bytes than were asked for.
    BadCount(usize),
    /// The copy failed.
    Failed(userfaultfd::Error),
}

/// Reads a copy's result. The userfaultfd crate reports EAGAIN as `PartiallyCopied` with the
/// kernel's count, which is `-EAGAIN` (a huge `usize`) when nothing was copied: only a count in
/// `1..=remaining` is progress; anything else is a retry, never added to the bytes done.
fn copy_step(result: Result<usize, userfaultfd::Error>, remaining: usize) -> CopyStep {
    match result {
        Ok(n) | Err(userfaultfd::Error::PartiallyCopied(n)) if (1..=remaining).contains(&n) => {
            CopyStep::Copied(n)
        }
        Ok(0) | Err(userfaultfd::Error::PartiallyCopied(_)) => CopyStep::Retry,
        Ok(n) => CopyStep::BadCount(n),
        Err(e) => CopyStep::Failed(e),
    }
}

/// The errno of a failed zeropage: EAGAIN is transient, EEXIST means the page is already there.
fn zeropage_errno(e: &userfaultfd::Error) -> Option<i32> {
    match e {
        userfaultfd::Error::ZeropageFailed(errno) => Some(*errno as i32),
        _ => None,
    }
}

impl Shared {
    fn chunk_count(&self) -> usize {
        self.loaded.len()
    }

    /// The source, unless it was released.
    fn source(&self) -> Option<Arc<dyn ChunkSource>> {
        snapshot::lock(&self.source).clone()
    }

    fn load(&self, index: u64, buf: &mut Vec<u8>) -> Result<(), LazyMemoryError> {
        let slot = self
            .loaded
            .get(index as usize)
            .ok_or(LazyMemoryError::NoSuchChunk { index })?;
        let mut loaded = snapshot::lock(slot);
        if *loaded {
            return Ok(());
        }
        let (host, len) = self
            .layout
            .chunk_host_range(index)
            .ok_or(LazyMemoryError::NoSuchChunk { index })?;
        let source = self.source().ok_or(LazyMemoryError::Released { index })?;
        let len = len as usize;
        if source.is_zero_chunk(index) {
            self.zero_fill(index, host as usize, len)?;
        } else {
            buf.resize(len, 0);
            source
                .read_chunk(index, &mut buf[..len])
                .map_err(|source| LazyMemoryError::Read { index, source })?;
            self.copy_fill(index, &buf[..len], host as usize)?;
        }
        *loaded = true;
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Copies `data` to guest memory at `host`, waking the threads that wait on it.
    fn copy_fill(&self, index: u64, data: &[u8], host: usize) -> Result<(), LazyMemoryError> {
        let mut done = 0usize;
        let mut retries = 0u32;
        while done < data.len() {
            let remaining = data.len() - done;
            // SAFETY: the source is `remaining` bytes of our own buffer; the destination is the
            // same length inside one registered guest memory region (from the layout), which
            // stays mapped while the loader runs; nothing else fills it (the chunk lock is held).
            let r = unsafe {
                self.uffd.copy(
                    data[done..].as_ptr().cast(),
                    (host + done) as *mut libc::c_void,
                    remaining,
                    true,
                )
            };
            match copy_step(r, remaining) {
                CopyStep::Copied(n) => {
                    done += n;
                    retries = 0;
                }
                CopyStep::Retry if retries < MAX_FILL_RETRIES => {
                    retries += 1;
                    std::thread::yield_now();
                }
                CopyStep::Retry => {
                    return Err(LazyMemoryError::FillStalled {
                        index,
                        attempts: retries + 1,
                    })
                }
                CopyStep::BadCount(reported) => {
                    return Err(LazyMemoryError::FillCount {
                        index,
                        reported,
                        remaining,
                    })
                }
                CopyStep::Failed(source) => return Err(LazyMemoryError::Fill { index, source }),
            }
        }
        Ok(())
    }

    /// Maps zero pages over `[host, host + len)`, waking the threads that wait on it.
    fn zero_fill(&self, index: u64, host: usize, len: usize) -> Result<(), LazyMemoryError> {
        // SAFETY: as in `copy_fill`: one chunk inside registered guest memory, under its lock.
        match unsafe { self.uffd.zeropage(host as *mut libc::c_void, len, true) } {
            Ok(n) if n == len => return Ok(()),
            Ok(_) => {}
            Err(e) if zeropage_errno(&e) == Some(libc::EAGAIN) => {}
            Err(source) => return Err(LazyMemoryError::Fill { index, source }),
        }
        // Interrupted part of the way (the crate does not say how far): page by page, where a
        // page already there (EEXIST) is one this call filled.
        for page in (0..len).step_by(PAGE) {
            let mut retries = 0u32;
            loop {
                // SAFETY: one page of the chunk above.
                let r = unsafe {
                    self.uffd.zeropage(
                        (host + page) as *mut libc::c_void,
                        PAGE.min(len - page),
                        true,
                    )
                };
                match r {
                    Ok(_) => break,
                    Err(e) if zeropage_errno(&e) == Some(libc::EEXIST) => break,
                    Err(e)
                        if zeropage_errno(&e) == Some(libc::EAGAIN)
                            && retries < MAX_FILL_RETRIES =>
                    {
                        retries += 1;
                        std::thread::yield_now();
                    }
                    Err(source) => return Err(LazyMemoryError::Fill { index, source }),
                }
            }
        }
        Ok(())
    }

    /// Records a failure and ends the VM with it.
    fn fail(&self, exit: &ExitSignal, e: LazyMemoryError) {
        exit.report(GuestExit::RestoreFailed {
            detail: crate::error_chain(&e),
        });
        snapshot::lock(&self.error).get_or_insert(e);
        self.failed.store(true, Ordering::Release);
    }
}

/// `MADV_COLLAPSE` (Linux 6.1): back a range with transparent huge pages now.
const MADV_COLLAPSE: libc::c_int = 25;

fn fault_loop(shared: Arc<Shared>, exit: Arc<ExitSignal>) {
    let mut buf = Vec::new();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&shared.uffd);
    // A fault whose chunk failed: its thread cannot be given correct bytes.
    let mut stuck: Option<(Instant, String)> = None;
    while !shared.done.load(Ordering::Acquire) && !shared.stop.load(Ordering::Acquire) {
        if let Some((since, detail)) = &stuck {
            if since.elapsed() >= STUCK_FAULT_EXIT {
                // The VM was told to end and has not: a thread that must not run on unchecked
                // memory is blocked on it (the event loop itself, for a device's page). Ending
                // the process is the only way left that neither hangs nor shows wrong bytes.
                // Not eprintln!, which panics if stderr is gone.
                let _ = writeln!(std::io::stderr(), "arkvm: error: restore failed: {detail}");
                std::process::exit(2);
            }
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        if n <= 0 {
            continue;
        }
        match shared.uffd.read_event() {
            Ok(Some(Event::Pagefault { addr, .. })) => {
                shared.faults.fetch_add(1, Ordering::Relaxed);
                let Some(index) = shared.layout.chunk_of_host_addr(addr as u64) else {
                    tracing::error!("userfault outside guest memory at {addr:?}");
                    continue;
                };
                if let Err(e) = shared.load(index, &mut buf) {
                    if stuck.is_none() {
                        stuck = Some((Instant::now(), crate::error_chain(&e)));
                    }
                    shared.fail(&exit, e);
                    continue;
                }
                // The chunk may have been filled by the prefetcher without waking this fault.
                if let Some((host, len)) = shared.layout.chunk_host_range(index) {
                    let _ = shared.uffd.wake(host as *mut _, len as usize);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("userfaultfd read: {e}"),
        }
    }
}

fn prefetch_loop(shared: Arc<Shared>, exit: Arc<ExitSignal>) {
    let mut buf = Vec::new();
    for index in 0..shared.chunk_count() as u64 {
        if shared.stop.load(Ordering::Acquire) || shared.failed.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = shared.load(index, &mut buf) {
            shared.fail(&exit, e);
            return;
        }
    }
    // Every chunk is in: give the range back (this also wakes any fault still queued).
    for (host, len) in shared.layout.host_regions() {
        if let Err(e) = shared.uffd.unregister(host as *mut _, len as usize) {
            tracing::warn!("cannot unregister guest memory from userfaultfd: {e}");
        }
    }
    // Nothing more is read: let go of the source (and whatever it holds, such as a lock).
    drop(snapshot::lock(&shared.source).take());
    // UFFDIO_COPY fills 4 KiB pages; fold them back into transparent huge pages so that the
    // restored VM runs, and write-protects for its own live snapshots, like the original.
    for (host, len) in shared.layout.host_regions() {
        // SAFETY: the range is exactly one guest memory mapping, which outlives the loader;
        // MADV_COLLAPSE only changes how the kernel backs it, never its contents.
        let rc = unsafe { libc::madvise(host as *mut libc::c_void, len as usize, MADV_COLLAPSE) };
        if rc != 0 {
            tracing::debug!(
                "cannot collapse restored memory into huge pages: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    shared.unregistered.store(true, Ordering::Release);
    tracing::info!(
        "guest memory fully loaded ({} faults served on demand)",
        shared.faults.load(Ordering::Relaxed)
    );
}

impl LazyMemory {
    /// Registers guest memory (`layout`) with userfaultfd and starts the fault and prefetch
    /// threads, which fill it from `source`. A chunk that cannot be loaded ends the VM through
    /// `exit`.
    pub fn start(
        source: Arc<dyn ChunkSource>,
        layout: MappedLayout,
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
        let shared = Arc::new(Shared {
            uffd,
            layout,
            source: Mutex::new(Some(source)),
            loaded: (0..chunks).map(|_| Mutex::new(false)).collect(),
            remaining: AtomicUsize::new(chunks),
            done: AtomicBool::new(chunks == 0),
            stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            unregistered: AtomicBool::new(false),
            faults: AtomicUsize::new(0),
            error: Mutex::new(None),
        });
        let mut loader = Self {
            shared: shared.clone(),
            threads: Vec::new(),
            started: Instant::now(),
        };
        for (name, f) in [
            ("uffd-fault", fault_loop as fn(Arc<Shared>, Arc<ExitSignal>)),
            ("uffd-prefetch", prefetch_loop),
        ] {
            let s = shared.clone();
            let e = exit.clone();
            // On a spawn failure, dropping `loader` stops the thread already started.
            loader.threads.push(
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || {
                        crate::seccomp::enter(crate::seccomp::ThreadKind::LazyFault);
                        f(s, e)
                    })
                    .map_err(LazyMemoryError::Spawn)?,
            );
        }
        Ok(loader)
    }

    /// Progress so far.
    pub fn stats(&self) -> LazyLoadStats {
        LazyLoadStats {
            chunks_total: self.shared.chunk_count(),
            chunks_remaining: self.shared.remaining.load(Ordering::Acquire),
            faults_served: self.shared.faults.load(Ordering::Relaxed),
        }
    }

    /// Whether every chunk is in.
    pub fn is_done(&self) -> bool {
        self.shared.done.load(Ordering::Acquire)
    }

    /// Waits until every chunk is in and guest memory is unregistered from userfaultfd, or
    /// `timeout` passes, or loading fails. Returns whether loading finished.
    pub fn wait_loaded(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.shared.unregistered.load(Ordering::Acquire) {
            if Instant::now() >= deadline || self.shared.failed.load(Ordering::Acquire) {
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
            if self.shared.done.load(Ordering::Acquire) {
                tracing::debug!("memory loaded {:?} after restore", self.started.elapsed());
                return Ok(());
            }
            if self.shared.failed.load(Ordering::Acquire) {
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Four 1 MiB chunks: chunk i is filled with byte i+1, except chunk 1 which is zero, and
    /// `bad` which fails its check.
    struct FakeSource {
        bad: Option<u64>,
    }

    impl ChunkSource for FakeSource {
        fn size(&self) -> u64 {
            4 * MIB
        }
        fn chunk_size(&self) -> u64 {
            MIB
        }
        fn chunk_count(&self) -> u64 {
            4
        }
        fn is_zero_chunk(&self, index: u64) -> bool {
            index == 1
        }
        fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<(), ChunkSourceError> {
            if Some(index) == self.bad {
                return Err(snapshot::SnapshotError::ChunkCorrupt {
                    name: "memory".into(),
                    path: "memory".into(),
                    index,
                }
                .into());
            }
            buf.fill(index as u8 + 1);
            Ok(())
        }
    }

    /// Anonymous memory for the loader to fill, unmapped on drop.
    struct Mapping(*mut libc::c_void, usize);

    impl Mapping {
        fn new(len: usize) -> Self {
            // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Self(p, len)
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`, no longer used (the loader was dropped first).
            unsafe { libc::munmap(self.0, self.1) };
        }
    }

    fn start(mem: &Mapping, bad: Option<u64>) -> (LazyMemory, Arc<ExitSignal>) {
        let layout = snapshot::MemoryLayout::back_to_back(&[(0, 4 * MIB)], MIB)
            .unwrap()
            .mapped_at(vec![mem.0 as u64])
            .unwrap();
        let exit = Arc::new(ExitSignal::new().unwrap());
        let lazy = LazyMemory::start(Arc::new(FakeSource { bad }), layout, exit.clone()).unwrap();
        (lazy, exit)
    }

    #[test]
    fn every_chunk_comes_from_the_source_and_zero_chunks_are_zero() {
        let mem = Mapping::new(4 * MIB as usize);
        let (lazy, exit) = start(&mem, None);
        // SAFETY: the mapping is 4 MiB; the loader fills it (this read may fault into it).
        let bytes = unsafe { std::slice::from_raw_parts(mem.0 as *const u8, mem.1) };
        assert_eq!(bytes[3 * MIB as usize + 5], 4);
        lazy.wait_all_loaded().unwrap();
        for (i, chunk) in bytes.chunks(MIB as usize).enumerate() {
            let want = if i == 1 { 0 } else { i as u8 + 1 };
            assert!(chunk.iter().all(|&b| b == want), "chunk {i}");
        }
        assert!(lazy.wait_loaded(Duration::from_secs(10)));
        assert!(exit.reason().is_none());
        drop(lazy);
    }

    #[test]
    fn a_chunk_that_fails_its_check_ends_the_vm_with_the_typed_error() {
        let mem = Mapping::new(4 * MIB as usize);
        let (lazy, exit) = start(&mem, Some(2));
        let e = lazy.wait_all_loaded().unwrap_err();
        assert!(
            matches!(
                &e,
                LazyMemoryError::Read {
                    index: 2,
                    source: ChunkSourceError::Snapshot(_)
                }
            ),
            "{e:?}"
        );
        assert!(matches!(
            exit.reason(),
            Some(GuestExit::RestoreFailed { detail }) if detail.contains("chunk 2")
        ));
        assert!(!lazy.wait_loaded(Duration::from_millis(10)));
        drop(lazy);
    }

    #[test]
    fn only_a_count_within_the_request_is_progress() {
        // EAGAIN before anything was copied: the crate hands back the kernel's -EAGAIN.
        let eagain = (-(libc::EAGAIN as i64)) as usize;
        assert!(matches!(
            copy_step(Err(userfaultfd::Error::PartiallyCopied(eagain)), 4096),
            CopyStep::Retry
        ));
        assert!(matches!(
            copy_step(Err(userfaultfd::Error::PartiallyCopied(0)), 4096),
            CopyStep::Retry
        ));
        assert!(matches!(
            copy_step(Err(userfaultfd::Error::PartiallyCopied(8192)), 4096),
            CopyStep::Retry
        ));
        assert!(matches!(
            copy_step(Err(userfaultfd::Error::PartiallyCopied(1024)), 4096),
            CopyStep::Copied(1024)
        ));
        assert!(matches!(copy_step(Ok(4096), 4096), CopyStep::Copied(4096)));
        assert!(matches!(copy_step(Ok(0), 4096), CopyStep::Retry));
        assert!(matches!(
            copy_step(Ok(8192), 4096),
            CopyStep::BadCount(8192)
        ));
        assert!(matches!(
            copy_step(Err(userfaultfd::Error::ReadEof), 4096),
            CopyStep::Failed(_)
        ));
    }
}

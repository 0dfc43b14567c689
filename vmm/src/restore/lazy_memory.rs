//! Lazy loading of guest memory on restore: the guest resumes at once over empty anonymous
//! memory registered with userfaultfd (missing-page mode); a fault thread fills each page's
//! chunk from the snapshot when the guest (or the VMM) first touches it, and a prefetch thread
//! fills the rest in the background. Every chunk is checked against its hash before the guest
//! can see it, so damaged memory is never run. When every chunk is in, the range is unregistered,
//! which leaves it free for a live snapshot's write-protect tracking.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    /// A chunk could not be read from the snapshot.
    #[error("cannot read memory chunk {0} from the snapshot")]
    Read(usize, #[source] std::io::Error),
    /// A chunk's content does not match its hash.
    #[error("{1}")]
    Damaged(usize, String),
    /// Filling guest memory failed.
    #[error("cannot fill guest memory for chunk {0}")]
    Fill(usize, #[source] userfaultfd::Error),
    /// A thread could not be spawned.
    #[error("cannot spawn the memory loader thread")]
    Spawn(#[source] std::io::Error),
}

/// One guest memory region and where its bytes start in the memory file.
#[derive(Clone, Copy, Debug)]
pub struct RegionSource {
    pub host_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// Checks a chunk's bytes; returns a description of the damage.
pub type ChunkVerifier = dyn Fn(usize, &[u8]) -> Result<(), String> + Send + Sync;

/// Where memory comes from.
pub struct MemorySource {
    pub file: File,
    pub chunk_size: u64,
    pub regions: Vec<RegionSource>,
    /// Chunks known (from the verified manifest) to be all zeroes: mapped as zero pages.
    pub zero_chunks: Vec<bool>,
    pub verify: Box<ChunkVerifier>,
}

struct Shared {
    uffd: Uffd,
    source: MemorySource,
    /// Per chunk: loaded or not; the lock serializes the fault and prefetch threads.
    loaded: Vec<Mutex<bool>>,
    remaining: AtomicUsize,
    done: AtomicBool,
    stop: AtomicBool,
    unregistered: AtomicBool,
    faults: AtomicUsize,
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

impl Shared {
    fn chunk_count(&self) -> usize {
        self.loaded.len()
    }

    /// Maps a chunk index to (host address, length, file offset).
    fn chunk_location(&self, index: usize) -> Option<(u64, u64, u64)> {
        let cs = self.source.chunk_size;
        let mut first = 0usize;
        for r in &self.source.regions {
            let n = r.len.div_ceil(cs) as usize;
            if index < first + n {
                let off = (index - first) as u64 * cs;
                let len = cs.min(r.len - off);
                return Some((r.host_addr + off, len, r.file_offset + off));
            }
            first += n;
        }
        None
    }

    /// Maps a host address to its chunk index.
    fn chunk_of(&self, addr: u64) -> Option<usize> {
        let cs = self.source.chunk_size;
        let mut first = 0usize;
        for r in &self.source.regions {
            if addr >= r.host_addr && addr < r.host_addr + r.len {
                return Some(first + ((addr - r.host_addr) / cs) as usize);
            }
            first += r.len.div_ceil(cs) as usize;
        }
        None
    }

    fn load(&self, index: usize, buf: &mut Vec<u8>) -> Result<(), LazyMemoryError> {
        let mut loaded = self.loaded[index].lock().expect("chunk lock poisoned");
        if *loaded {
            return Ok(());
        }
        let (host, len, file_off) = self
            .chunk_location(index)
            .expect("chunk index comes from the region table");
        let len_us = len as usize;
        let zero = self.source.zero_chunks.get(index).copied().unwrap_or(false);
        // Every chunk is checked. A zero chunk is a hole in the file: if the file still has no
        // data there it is zero without reading; if a byte was written into it, it is read and
        // checked like any other chunk.
        if !(zero && is_hole(&self.source.file, file_off, len)) {
            buf.resize(len_us, 0);
            self.source
                .file
                .read_exact_at(&mut buf[..len_us], file_off)
                .map_err(|e| LazyMemoryError::Read(index, e))?;
            (self.source.verify)(index, &buf[..len_us])
                .map_err(|why| LazyMemoryError::Damaged(index, why))?;
        }
        if zero {
            // SAFETY: [host, host+len) is inside a registered guest memory region that stays
            // mapped while the loader runs; nothing else populates it (the chunk lock is held).
            unsafe { self.uffd.zeropage(host as *mut _, len_us, true) }
                .map_err(|e| LazyMemoryError::Fill(index, e))?;
        } else {
            let mut done = 0usize;
            while done < len_us {
                // SAFETY: the source is our own buffer of `len` bytes; the destination is inside
                // registered guest memory as above.
                let r = unsafe {
                    self.uffd.copy(
                        buf[done..].as_ptr() as *const _,
                        (host as usize + done) as *mut _,
                        len_us - done,
                        true,
                    )
                };
                match r {
                    Ok(n) => done += n,
                    Err(userfaultfd::Error::PartiallyCopied(n)) => done += n,
                    Err(e) => return Err(LazyMemoryError::Fill(index, e)),
                }
            }
        }
        *loaded = true;
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.store(true, Ordering::Release);
        }
        Ok(())
    }
}

/// `MADV_COLLAPSE` (Linux 6.1): back a range with transparent huge pages now.
const MADV_COLLAPSE: libc::c_int = 25;

/// Whether `[off, off + len)` of `file` holds no data at all (a hole, which reads as zeroes).
fn is_hole(file: &File, off: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a valid descriptor we own; SEEK_DATA only reports an offset.
    let next = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if next < 0 {
        // ENXIO: no data at or after `off`, the rest of the file is a hole.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    next as u64 >= off + len
}

fn fail(exit: &ExitSignal, e: &LazyMemoryError) {
    exit.report(GuestExit::RestoreFailed {
        detail: crate::error_chain(e),
    });
}

fn fault_loop(shared: Arc<Shared>, exit: Arc<ExitSignal>) {
    let mut buf = Vec::new();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&shared.uffd);
    while !shared.done.load(Ordering::Acquire) && !shared.stop.load(Ordering::Acquire) {
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
                let Some(index) = shared.chunk_of(addr as u64) else {
                    tracing::error!("userfault outside guest memory at {addr:?}");
                    continue;
                };
                if let Err(e) = shared.load(index, &mut buf) {
                    fail(&exit, &e);
                    return;
                }
                // The chunk may have been filled by the prefetcher without waking this fault.
                let (host, len, _) = shared.chunk_location(index).expect("valid chunk");
                let _ = shared.uffd.wake(host as *mut _, len as usize);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("userfaultfd read: {e}"),
        }
    }
}

fn prefetch_loop(shared: Arc<Shared>, exit: Arc<ExitSignal>) {
    let mut buf = Vec::new();
    for index in 0..shared.chunk_count() {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = shared.load(index, &mut buf) {
            fail(&exit, &e);
            return;
        }
    }
    // Every chunk is in: give the range back (this also wakes any fault still queued).
    for r in &shared.source.regions {
        if let Err(e) = shared
            .uffd
            .unregister(r.host_addr as *mut _, r.len as usize)
        {
            tracing::warn!("cannot unregister guest memory from userfaultfd: {e}");
        }
    }
    // UFFDIO_COPY fills 4 KiB pages; fold them back into transparent huge pages so that the
    // restored VM runs, and write-protects for its own live snapshots, like the original.
    for r in &shared.source.regions {
        // SAFETY: the range is exactly one guest memory mapping, which outlives the loader;
        // MADV_COLLAPSE only changes how the kernel backs it, never its contents.
        let rc = unsafe {
            libc::madvise(
                r.host_addr as *mut libc::c_void,
                r.len as usize,
                MADV_COLLAPSE,
            )
        };
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
    /// Registers the regions with userfaultfd and starts the fault and prefetch threads.
    pub fn start(source: MemorySource, exit: Arc<ExitSignal>) -> Result<Self, LazyMemoryError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(LazyMemoryError::Create)?;
        for r in &source.regions {
            uffd.register_with_mode(r.host_addr as *mut _, r.len as usize, RegisterMode::MISSING)
                .map_err(LazyMemoryError::Register)?;
        }
        let chunks: usize = source
            .regions
            .iter()
            .map(|r| r.len.div_ceil(source.chunk_size) as usize)
            .sum();
        let shared = Arc::new(Shared {
            uffd,
            source,
            loaded: (0..chunks).map(|_| Mutex::new(false)).collect(),
            remaining: AtomicUsize::new(chunks),
            done: AtomicBool::new(chunks == 0),
            stop: AtomicBool::new(false),
            unregistered: AtomicBool::new(false),
            faults: AtomicUsize::new(0),
        });
        let mut threads = Vec::new();
        for (name, f) in [
            ("uffd-fault", fault_loop as fn(Arc<Shared>, Arc<ExitSignal>)),
            ("uffd-prefetch", prefetch_loop),
        ] {
            let s = shared.clone();
            let e = exit.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || f(s, e))
                    .map_err(LazyMemoryError::Spawn)?,
            );
        }
        Ok(Self {
            shared,
            threads,
            started: Instant::now(),
        })
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
    /// `timeout` passes. Returns whether loading finished.
    pub fn wait_loaded(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.shared.unregistered.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        tracing::debug!("memory loaded {:?} after restore", self.started.elapsed());
        true
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

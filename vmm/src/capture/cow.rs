//! Copy-on-write memory capture with userfaultfd write-protection.
//!
//! At the snapshot instant every guest page is write-protected (unpopulated pages too, through
//! `UFFD_FEATURE_WP_UNPOPULATED`). A copier thread then walks memory chunk by chunk: it reads a
//! chunk, lifts the protection of that chunk, and hands the bytes to the snapshot. A guest (or
//! VMM) write to a chunk not yet copied faults to the fault thread, which copies that chunk
//! first, lifts its protection and wakes the writer. Each chunk is copied exactly once, under
//! its own lock, so the image is the memory of the snapshot instant.
//!
//! Neither thread ever waits on a guest write: reading write-protected memory does not fault,
//! and no lock is held by a thread that writes guest memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use snapshot::MemoryPartWriter;
use userfaultfd::{Event, FeatureFlags, RegisterMode, Uffd, UffdBuilder};
use vm_memory::{Bytes, GuestAddress};

use super::memory_copy::chunk_guest_range;
use super::progress::Progress;
use super::state::MemoryRegionState;
use super::CaptureError;
use devices::GuestMemoryMmap;

/// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4): write-protect page table entries that are not
/// populated yet, so that a first write to an untouched page faults too.
const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const PAGE_SIZE: u64 = 4096;

/// Why copy-on-write tracking could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    #[error("cannot create a write-protect userfaultfd (needs Linux 6.4+ and root)")]
    Create(#[source] userfaultfd::Error),
    #[error("cannot register guest memory for write-protection")]
    Register(#[source] userfaultfd::Error),
    #[error("cannot write-protect guest memory")]
    Protect(#[source] userfaultfd::Error),
    #[error("cannot start the copy-on-write fault thread")]
    Spawn(#[source] std::io::Error),
}

/// One guest region as the fault thread sees it.
#[derive(Clone, Copy)]
struct Region {
    host: u64,
    guest: u64,
    len: u64,
}

struct Shared {
    uffd: Uffd,
    mem: GuestMemoryMmap,
    layout: Vec<MemoryRegionState>,
    regions: Vec<Region>,
    part: Arc<MemoryPartWriter>,
    copied: Vec<Mutex<bool>>,
    stop: AtomicBool,
    pages_early: AtomicU64,
    progress: Progress,
    /// The first error of the fault thread; the copier reports it.
    error: Mutex<Option<String>>,
}

/// Write-protection armed over guest memory, with its fault thread.
pub struct CowTracker {
    shared: Arc<Shared>,
    fault_thread: Option<JoinHandle<()>>,
}

impl Shared {
    fn host_of_guest(&self, guest: u64) -> u64 {
        let r = self
            .regions
            .iter()
            .find(|r| guest >= r.guest && guest < r.guest + r.len)
            .expect("chunk lies in a region");
        r.host + (guest - r.guest)
    }

    fn chunk_of_host(&self, host: u64) -> Option<u64> {
        let r = self
            .regions
            .iter()
            .find(|r| host >= r.host && host < r.host + r.len)?;
        let guest = r.guest + (host - r.host);
        super::memory_copy::chunk_of_guest_addr(&self.layout, self.part.chunk_size(), guest)
    }

    /// Copies chunk `index` unless already done, then lifts its protection. Returns whether
    /// this call did the copy.
    fn copy_chunk(&self, index: u64, buf: &mut Vec<u8>) -> Result<bool, CaptureError> {
        let mut copied = self.copied[index as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *copied {
            return Ok(false);
        }
        let (guest, len) = chunk_guest_range(&self.layout, self.part.chunk_size(), index)
            .expect("chunk index within memory");
        buf.resize(len as usize, 0);
        self.mem
            .read_slice(buf, GuestAddress(guest))
            .map_err(|source| CaptureError::ReadMemory {
                addr: guest,
                source,
            })?;
        // The bytes are ours now: let writers on this chunk go on before hashing and writing.
        let host = self.host_of_guest(guest);
        if let Err(e) = self
            .uffd
            .remove_write_protection(host as *mut _, len as usize, true)
        {
            tracing::error!("cannot lift write-protection of chunk {index}: {e}");
        }
        *copied = true;
        drop(copied);
        self.part.write_chunk(index, buf)?;
        self.progress.update(|s| s.bytes_written += len);
        Ok(true)
    }

    fn unprotect_all(&self) {
        for r in &self.regions {
            let _ = self
                .uffd
                .remove_write_protection(r.host as *mut _, r.len as usize, true);
            let _ = self.uffd.unregister(r.host as *mut _, r.len as usize);
        }
    }
}

fn fault_loop(shared: Arc<Shared>) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&shared.uffd);
    let mut buf = Vec::new();
    while !shared.stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
            continue;
        }
        let addr = match shared.uffd.read_event() {
            Ok(Some(Event::Pagefault { addr, .. })) => addr as u64,
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!("userfaultfd read: {e}");
                continue;
            }
        };
        let page = addr & !(PAGE_SIZE - 1);
        match shared.chunk_of_host(page) {
            Some(index) => match shared.copy_chunk(index, &mut buf) {
                Ok(true) => {
                    let pages = shared.part.chunk_size() / PAGE_SIZE;
                    shared.pages_early.fetch_add(pages, Ordering::Relaxed);
                    shared.progress.update(|s| s.pages_copied_early += pages);
                }
                Ok(false) => {
                    // Copied meanwhile; make sure the writer is awake.
                    let _ = shared.uffd.wake(page as *mut _, PAGE_SIZE as usize);
                }
                Err(e) => {
                    // Never leave the guest blocked: unprotect everything and report.
                    let mut err = shared.error.lock().unwrap_or_else(|p| p.into_inner());
                    err.get_or_insert_with(|| crate::error_chain(&e));
                    drop(err);
                    shared.unprotect_all();
                }
            },
            None => {
                let _ =
                    shared
                        .uffd
                        .remove_write_protection(page as *mut _, PAGE_SIZE as usize, true);
            }
        }
    }
}

impl CowTracker {
    /// Write-protects all of guest memory and starts the fault thread. Call with the vCPUs
    /// paused: this is the snapshot instant.
    pub fn arm(
        mem: &GuestMemoryMmap,
        layout: &[MemoryRegionState],
        host_regions: &[(u64, u64, u64)],
        part: Arc<MemoryPartWriter>,
        progress: Progress,
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
        let regions: Vec<Region> = host_regions
            .iter()
            .map(|&(host, guest, len)| Region { host, guest, len })
            .collect();
        for r in &regions {
            uffd.register_with_mode(
                r.host as *mut _,
                r.len as usize,
                RegisterMode::WRITE_PROTECT,
            )
            .map_err(CowError::Register)?;
        }
        for r in &regions {
            if let Err(e) = uffd.write_protect(r.host as *mut _, r.len as usize) {
                for r in &regions {
                    let _ = uffd.unregister(r.host as *mut _, r.len as usize);
                }
                return Err(CowError::Protect(e));
            }
        }
        let chunks = part.chunk_count() as usize;
        let shared = Arc::new(Shared {
            uffd,
            mem: mem.clone(),
            layout: layout.to_vec(),
            regions,
            part,
            copied: (0..chunks).map(|_| Mutex::new(false)).collect(),
            stop: AtomicBool::new(false),
            pages_early: AtomicU64::new(0),
            progress,
            error: Mutex::new(None),
        });
        let s = shared.clone();
        let fault_thread = std::thread::Builder::new()
            .name("cow-fault".into())
            .spawn(move || fault_loop(s))
            .map_err(CowError::Spawn)?;
        Ok(Self {
            shared,
            fault_thread: Some(fault_thread),
        })
    }

    /// Copies every chunk not yet copied (the background copy). Stops early on cancel.
    pub fn copy_remaining(&self, cancel: &AtomicBool) -> Result<(), CaptureError> {
        let mut buf = Vec::new();
        for index in 0..self.shared.copied.len() as u64 {
            if cancel.load(Ordering::Relaxed) {
                return Err(CaptureError::Cancelled);
            }
            if let Some(e) = self
                .shared
                .error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                return Err(CaptureError::CowFault(e));
            }
            self.shared.copy_chunk(index, &mut buf)?;
        }
        if let Some(e) = self
            .shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(CaptureError::CowFault(e));
        }
        Ok(())
    }

    /// Pages copied ahead of the copier because something wrote to them.
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

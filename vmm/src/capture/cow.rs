//! Copy-on-write memory capture with userfaultfd write-protection, and the write tracking that
//! makes the next backup incremental.
//!
//! The first live snapshot write-protects every guest page (unpopulated pages too, through
//! `UFFD_FEATURE_WP_UNPOPULATED`) and the protection then stays: every first write to a unit
//! (2 MiB: two snapshot chunks, one transparent huge page, so that lifting and restoring the
//! protection never splits a huge page) faults once to the fault thread, which
//! 1. marks the chunk as written since the last snapshot instant (the next backup reads only
//!    those chunks),
//! 2. if a snapshot is copying and has not copied this chunk yet, copies it first,
//! 3. lifts the protection of the chunk and wakes the writer.
//!
//! The copier walks the chunks and copies each one not yet copied, under the chunk's lock; it
//! never lifts protection, so a chunk it copied still reports its next write. At the next
//! snapshot instant only the chunks written since are protected again. Each chunk is copied
//! exactly once, so the image is memory at the snapshot instant.
//!
//! Neither thread waits on a guest write: reading protected memory does not fault, and no lock
//! the handlers take is held by a thread that writes guest memory. Device and VMM writes to
//! guest memory fault like the guest's own, so they are tracked too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use snapshot::{lock, MappedLayout, MemorySink};
use userfaultfd::{Event, FeatureFlags, RegisterMode, Uffd, UffdBuilder};
use vm_memory::{Bytes, GuestAddress};

use super::error::CaptureError;
pub use super::error::CowError;
use super::progress::Progress;
use devices::GuestMemoryMmap;

/// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4): write-protect page table entries that are not
/// populated yet, so that a first write to an untouched page faults too.
const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const PAGE_SIZE: u64 = 4096;

/// The snapshot being copied, while there is one.
struct ActiveCopy {
    sink: Arc<dyn MemorySink>,
    progress: Progress,
}

struct Shared {
    uffd: Uffd,
    mem: GuestMemoryMmap,
    /// Chunk <-> guest and host addresses.
    layout: MappedLayout,
    chunk_count: u64,
    /// Per unit: copied into the active snapshot (or nothing to copy).
    copied: Vec<Mutex<bool>>,
    /// Per unit: written since the last snapshot instant (its protection is lifted).
    written: Vec<AtomicBool>,
    active: Mutex<Option<ActiveCopy>>,
    stop: AtomicBool,
    pages_early: AtomicU64,
    /// The first error of the fault thread; the copier reports it.
    error: Mutex<Option<Arc<CaptureError>>>,
}

/// Write-protection over guest memory, with its fault thread.
pub struct CowTracker {
    shared: Arc<Shared>,
    fault_thread: Option<JoinHandle<()>>,
}

/// Snapshot chunks per protection unit.
const CHUNKS_PER_UNIT: u64 = 2;

impl Shared {
    /// The snapshot chunks of unit `unit`.
    fn unit_chunks(&self, unit: u64) -> std::ops::Range<u64> {
        let first = unit * CHUNKS_PER_UNIT;
        first..(first + CHUNKS_PER_UNIT).min(self.chunk_count)
    }

    /// Guest address and length of unit `unit` (its chunks are contiguous in one region).
    fn unit_guest_range(&self, unit: u64) -> Option<(u64, u64)> {
        let layout = self.layout.layout();
        let chunks = self.unit_chunks(unit);
        let (guest, _) = layout.chunk_guest_range(chunks.start)?;
        let len = chunks
            .map(|c| layout.chunk_guest_range(c).map_or(0, |(_, l)| l))
            .sum();
        Some((guest, len))
    }

    /// Host address and length of unit `unit`.
    fn host_range(&self, unit: u64) -> Option<(u64, u64)> {
        let chunks = self.unit_chunks(unit);
        let (host, _) = self.layout.chunk_host_range(chunks.start)?;
        let len = chunks
            .map(|c| self.layout.chunk_host_range(c).map_or(0, |(_, l)| l))
            .sum();
        Some((host, len))
    }

    fn unit_of_host(&self, host: u64) -> Option<u64> {
        self.layout
            .chunk_of_host_addr(host)
            .map(|c| c / CHUNKS_PER_UNIT)
    }

    fn active(&self) -> Option<(Arc<dyn MemorySink>, Progress)> {
        lock(&self.active)
            .as_ref()
            .map(|a| (a.sink.clone(), a.progress.clone()))
    }

    /// Records the first error for the copier.
    fn record_error(&self, e: CaptureError) {
        lock(&self.error).get_or_insert_with(|| Arc::new(e));
    }

    /// Copies unit `unit` into the active snapshot unless done. Returns whether it copied.
    fn copy_unit(&self, unit: u64, buf: &mut Vec<u8>) -> Result<bool, CaptureError> {
        let Some(slot) = self.copied.get(unit as usize) else {
            return Err(CowError::UnitOutside(unit).into());
        };
        let mut copied = lock(slot);
        if *copied {
            return Ok(false);
        }
        let Some((sink, progress)) = self.active() else {
            *copied = true;
            return Ok(false);
        };
        let (guest, len) = self
            .unit_guest_range(unit)
            .ok_or(CowError::UnitOutside(unit))?;
        buf.resize(len as usize, 0);
        self.mem
            .read_slice(buf, GuestAddress(guest))
            .map_err(|source| CaptureError::ReadMemory {
                addr: guest,
                source,
            })?;
        // The lock stays held until the bytes are in the part, so that `end` can wait for
        // every copy in flight.
        for (i, chunk) in self.unit_chunks(unit).enumerate() {
            let chunk_size = self.layout.layout().chunk_size() as usize;
            let start = i * chunk_size;
            let end = (start + chunk_size).min(buf.len());
            let data = buf.get(start..end).ok_or(CowError::UnitOutside(unit))?;
            sink.write_chunk(chunk, data)?;
        }
        *copied = true;
        drop(copied);
        progress.update(|s| s.bytes_written += len);
        Ok(true)
    }

    /// Handles one write fault on `page`. Nothing here may panic: a writer to a protected page
    /// stays blocked until its protection is lifted, so every path lifts it.
    fn handle_fault(&self, page: u64, buf: &mut Vec<u8>) {
        let Some(index) = self.unit_of_host(page) else {
            self.lift_page(page);
            return;
        };
        let Some(written) = self.written.get(index as usize) else {
            self.record_error(CowError::UnitOutside(index).into());
            self.lift_page(page);
            return;
        };
        written.store(true, Ordering::Release);
        match self.copy_unit(index, buf) {
            Ok(true) => {
                let pages = self.unit_guest_range(index).map_or(0, |(_, l)| l) / PAGE_SIZE;
                self.pages_early.fetch_add(pages, Ordering::Relaxed);
                if let Some((_, progress)) = self.active() {
                    progress.update(|s| s.pages_copied_early += pages);
                }
            }
            Ok(false) => {}
            // Recorded for the copier; the writer must go on regardless.
            Err(e) => self.record_error(e),
        }
        let Some((host, len)) = self.host_range(index) else {
            self.record_error(CowError::UnitOutside(index).into());
            self.lift_page(page);
            return;
        };
        if let Err(e) = self
            .uffd
            .remove_write_protection(host as *mut _, len as usize, true)
        {
            tracing::error!("cannot lift write-protection of unit {index}: {e}");
        }
    }

    /// Lifts the protection of one page and wakes its writer.
    fn lift_page(&self, page: u64) {
        if let Err(e) = self
            .uffd
            .remove_write_protection(page as *mut _, PAGE_SIZE as usize, true)
        {
            tracing::error!("cannot lift write-protection of page {page:#x}: {e}");
        }
    }

    fn unprotect_all(&self) {
        for (host, len) in self.layout.host_regions() {
            let _ = self
                .uffd
                .remove_write_protection(host as *mut _, len as usize, true);
            let _ = self.uffd.unregister(host as *mut _, len as usize);
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
        match shared.uffd.read_event() {
            Ok(Some(Event::Pagefault { addr, .. })) => {
                shared.handle_fault(addr as u64 & !(PAGE_SIZE - 1), &mut buf)
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("userfaultfd read: {e}"),
        }
    }
}

impl CowTracker {
    /// Write-protects all of guest memory and starts the fault thread. Nothing is copied
    /// until [`CowTracker::begin`].
    pub fn arm(mem: &GuestMemoryMmap, layout: MappedLayout) -> Result<Self, CowError> {
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
            let mut buf = Vec::new();
            for index in 0..self.shared.copied.len() as u64 {
                if cancel.load(Ordering::Relaxed) {
                    return Err(CaptureError::Cancelled);
                }
                if let Some(e) = self.take_error() {
                    return Err(CaptureError::CowFault(e));
                }
                self.shared.copy_unit(index, &mut buf)?;
            }
            match self.take_error() {
                Some(e) => Err(CaptureError::CowFault(e)),
                None => Ok(()),
            }
        })();
        self.end();
        result
    }

    fn take_error(&self) -> Option<Arc<CaptureError>> {
        lock(&self.shared.error).clone()
    }

    /// Detaches the active snapshot: faults only track writes from now on.
    pub fn end(&self) {
        // Hold every chunk lock while detaching, so no fault is mid-copy into the part.
        let guards: Vec<_> = self.shared.copied.iter().map(|c| lock(c)).collect();
        *lock(&self.shared.active) = None;
        for mut g in guards {
            *g = true;
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

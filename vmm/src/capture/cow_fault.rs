//! The copy-on-write fault thread (`cow-fault`): reads write faults from the userfaultfd,
//! captures the faulting unit for the running snapshot (into the staging pool when it can),
//! lifts the unit's protection, and counts what each fault cost the writer.
//!
//! Syscalls of this thread: `poll`, `read` (userfaultfd events), `ioctl` (`UFFDIO_WRITEPROTECT`),
//! and, when the staging pool is full or off, the target's `pwrite`/`write` and whatever the
//! sink's hashing and compression use; `clock_gettime` through the vDSO.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use userfaultfd::Event;

use super::cow::{Captured, Shared, PAGE_SIZE};
use super::error::CowError;
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

    fn record(&self, waited_us: u64) {
        self.faults.fetch_add(1, Ordering::Relaxed);
        self.wait_us.fetch_add(waited_us, Ordering::Relaxed);
        self.wait_max_us.fetch_max(waited_us, Ordering::Relaxed);
    }
}

impl Shared {
    /// Handles one write fault on `page`. Nothing here may panic: a writer to a protected page
    /// stays blocked until its protection is lifted, so every path lifts it.
    fn handle_fault(&self, page: u64, buf: &mut Vec<u8>) {
        let started = Instant::now();
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
        let captured = self.capture_unit(index, buf, true);
        let early_bytes = match &captured {
            Ok(Captured::Staged(len)) => {
                self.counters
                    .bytes_staged
                    .fetch_add(*len, Ordering::Relaxed);
                *len
            }
            Ok(Captured::Written(len)) => {
                self.counters.pool_full.fetch_add(1, Ordering::Relaxed);
                *len
            }
            Ok(Captured::Nothing) => 0,
            Err(_) => 0,
        };
        if let Err(e) = captured {
            // Recorded for the copier; the writer must go on regardless.
            self.record_error(e);
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
        let Some((_, progress)) = self.active() else {
            return;
        };
        self.counters.record(started.elapsed().as_micros() as u64);
        if early_bytes > 0 {
            let pages = early_bytes / PAGE_SIZE;
            self.pages_early.fetch_add(pages, Ordering::Relaxed);
            progress.update(|s| s.pages_copied_early += pages);
        }
    }
}

/// The fault thread's loop, until the tracker stops.
pub(super) fn fault_loop(shared: Arc<Shared>) {
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

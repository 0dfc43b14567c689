//! The loader's threads: several fault threads, one prefetch thread and one monitor.
//!
//! - **Fault threads** (`uffd-fault-N`) read fault events from the one userfaultfd (each event
//!   goes to one of them) and load the faulting chunk. A chunk another thread is already loading
//!   is left to it: its fill wakes every waiter on the range. So a slow chunk read holds up only
//!   the threads that need that chunk, never the faults behind it.
//! - **Prefetch** (`uffd-prefetch`) loads every chunk in order, waits for the chunks other
//!   threads claimed, then unregisters guest memory, lets go of the source and folds memory
//!   back into huge pages.
//! - **Monitor** (`uffd-monitor`) warns when no chunk has come in for a few seconds while
//!   faults wait, and is the last resort after a failure: a thread that needs a chunk that
//!   failed can never be given correct bytes, so if the VMM has not begun ending the VM a few
//!   seconds after the failure (its event loop is itself stuck on that chunk), the monitor ends
//!   the process with the error instead of leaving it hung.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use userfaultfd::Event;

use super::loader::{Ensured, Shared};
use super::progress::CollapseState;

/// How many threads serve faults.
pub(super) const FAULT_THREADS: usize = 3;

/// No chunk for this long while faults wait: warn.
const STALL_WARN: Duration = Duration::from_secs(3);

/// How long after a failure the VMM may take to begin ending the VM before the monitor ends
/// the process.
const STUCK_EXIT: Duration = Duration::from_secs(3);

/// `MADV_COLLAPSE` (Linux 6.1): back a range with transparent huge pages now.
const MADV_COLLAPSE: libc::c_int = 25;

pub(super) fn fault_loop(shared: Arc<Shared>) {
    let mut buf = Vec::new();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&shared.uffd);
    while !shared.progress.fully_loaded() && !shared.stopping() {
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
        // Non-blocking: another fault thread may have taken the event (`Ok(None)`).
        match shared.uffd.read_event() {
            Ok(Some(Event::Pagefault { addr, .. })) => serve_fault(&shared, addr as u64, &mut buf),
            Ok(_) => {}
            Err(e) => tracing::debug!("userfaultfd read: {e}"),
        }
    }
}

fn serve_fault(shared: &Shared, addr: u64, buf: &mut Vec<u8>) {
    shared.progress.fault_served();
    let Some(index) = shared.layout.chunk_of_host_addr(addr) else {
        tracing::error!("userfault outside guest memory at {addr:#x}");
        return;
    };
    if shared.chunks.mark_waited(index as usize) {
        shared.progress.waited_for(1);
    }
    match shared.ensure(index, buf) {
        Ok(Ensured::Loaded | Ensured::Busy | Ensured::Failed) => {}
        Ok(Ensured::Already) => {
            // Filled by another thread, whose fill woke the range; waking again is harmless.
            if let Some((host, len)) = shared.layout.chunk_host_range(index) {
                let _ = shared.uffd.wake(host as *mut _, len as usize);
            }
        }
        Err(e) => shared.fail(e),
    }
}

/// The nice value of the prefetch thread: demand faults (a vCPU or a device waiting) come
/// first, and background prefetch takes what CPU is left, without starving on a busy host.
const PREFETCH_NICE: libc::c_int = 10;

pub(super) fn prefetch_loop(shared: Arc<Shared>) {
    // SAFETY: gettid has no preconditions; setpriority on this thread's id changes only its
    // own scheduling priority (Linux applies PRIO_PROCESS per thread).
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, PREFETCH_NICE)
    };
    if rc != 0 {
        tracing::debug!(
            "cannot lower the prefetch thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut buf = Vec::new();
    let start = std::time::Instant::now();
    while start.elapsed() < shared.prefetch_delay {
        if shared.stopping() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for index in 0..shared.chunks.len() as u64 {
        if shared.stopping() || shared.has_failed() {
            return;
        }
        match shared.ensure(index, &mut buf) {
            Ok(Ensured::Failed) => return,
            Ok(_) => {}
            Err(e) => {
                shared.fail(e);
                return;
            }
        }
    }
    // Chunks the fault threads claimed may still be on their way.
    while !shared.progress.fully_loaded() {
        if shared.stopping() || shared.has_failed() {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
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
    shared.progress.set_collapse(CollapseState::Running);
    let started = std::time::Instant::now();
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
    shared.progress.set_collapse(CollapseState::Done);
    shared.unregistered.store(true, Ordering::Release);
    tracing::info!(
        "restored memory folded into huge pages in {} ms",
        started.elapsed().as_millis()
    );
}

pub(super) fn monitor_loop(shared: Arc<Shared>) {
    let mut warned = false;
    while !shared.stopping() {
        std::thread::sleep(Duration::from_millis(100));
        let failed_at = *snapshot::lock(&shared.failed_at);
        if let Some(at) = failed_at {
            if at.elapsed() >= STUCK_EXIT && !shared.ending.load(Ordering::Acquire) {
                end_process(&shared);
            }
            continue;
        }
        let p = &shared.progress;
        if p.fully_loaded() {
            return;
        }
        let waiting = p.chunks_waited_for();
        let quiet = Duration::from_millis(p.ms_since_last_chunk());
        if waiting > 0 && quiet >= STALL_WARN {
            if !warned {
                let i = p.info();
                tracing::warn!(
                    "memory loader: no chunk of {} has come in for {:.1} s while {waiting} \
                     chunks are waited for ({} of {} chunks in, {} faults served)",
                    shared.label,
                    quiet.as_secs_f64(),
                    i.chunks_loaded,
                    i.chunks_total,
                    i.faults_served
                );
                p.stall_warned();
                warned = true;
            }
        } else if warned && quiet < STALL_WARN {
            tracing::warn!("memory loader: chunks of {} come in again", shared.label);
            warned = false;
        }
    }
}

/// The VM was told to end after a failure and has not begun to: a thread that must not run on
/// unchecked memory (the event loop itself, for a device's page) is blocked on it. Ending the
/// process is the only way left that neither hangs nor shows wrong bytes.
fn end_process(shared: &Shared) -> ! {
    let detail = shared
        .progress
        .info()
        .error
        .unwrap_or_else(|| "a memory chunk could not be loaded".into());
    // Not eprintln!, which panics if stderr is gone; the process ends either way.
    let _ = writeln!(std::io::stderr(), "arkvm: error: restore failed: {detail}");
    // Status 4: docs/exit-status.md, "a restored VM whose memory cannot be loaded".
    // SAFETY: _exit ends the process at once; no Rust state is used afterwards. It skips
    // destructors and atexit handlers on purpose: other threads are blocked in the kernel and
    // may hold locks those would take.
    unsafe { libc::_exit(4) }
}

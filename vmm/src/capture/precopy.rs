//! Pre-copy memory capture: copy all of memory while the guest runs, re-copy what it dirtied
//! (KVM's dirty log for vCPU writes, vm-memory's bitmap for device and VMM writes) in rounds
//! while that converges, then pause briefly to copy the last dirty chunks with the state. The
//! snapshot instant is that final pause.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use snapshot::CHUNK_SIZE;
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use super::disks::{copy_frozen_disks, freeze_disks, frozen_bytes, FrozenDisk};
use super::job::SnapshotJob;
use super::live::wait_for_lazy_memory;
use super::memory_copy::{copy_all, copy_chunk};
use super::paused::save_frozen_state;
use super::progress::Progress;
use super::sink::{MemoryOut, SnapshotOut};
use super::CaptureError;
use crate::runtime::{RunState, Vmm};
use crate::saved_state::{MemoryRegionState, VmSnapshotState};
use crate::vstate::memory::memory_size;
use crate::vstate::vm::Vm;
use devices::GuestMemoryMmap;

/// The most copy rounds after the first full copy.
pub const MAX_ROUNDS: u32 = 8;
/// Dirty chunks small enough to copy in the final pause.
pub const CONVERGED_CHUNKS: usize = 16;
const PAGE: u64 = 4096;

/// What the worker gets back from the final pause.
type FinalState = Result<(VmSnapshotState, Vec<FrozenDisk>), String>;

/// The link between the pre-copy worker and the event loop for the final pause.
pub struct FinalPauseLink {
    requests: Receiver<()>,
    replies: Sender<FinalState>,
    part: Arc<MemoryOut>,
    layout: Vec<MemoryRegionState>,
}

/// Reads and clears both dirty logs; returns the dirty chunk indices and the dirty page count.
pub(crate) fn take_dirty_chunks(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    layout: &[MemoryRegionState],
) -> Result<(BTreeSet<u64>, u64), CaptureError> {
    let kvm_logs = vm.take_dirty_log()?;
    let mut chunks = BTreeSet::new();
    let mut pages = 0u64;
    for ((region, kvm_log), lay) in mem.iter().zip(kvm_logs.iter()).zip(layout.iter()) {
        let mmap: &vm_memory::MmapRegion<_> = region;
        let vmm_log = mmap.bitmap().get_and_reset();
        tracing::debug!(
            "dirty pages: kvm {} vmm {}",
            kvm_log.iter().map(|w| w.count_ones()).sum::<u32>(),
            vmm_log.iter().map(|w| w.count_ones()).sum::<u32>()
        );
        let words = kvm_log.len().max(vmm_log.len());
        for w in 0..words {
            let bits = kvm_log.get(w).copied().unwrap_or(0) | vmm_log.get(w).copied().unwrap_or(0);
            if bits == 0 {
                continue;
            }
            pages += u64::from(bits.count_ones());
            let mut b = bits;
            while b != 0 {
                let bit = b.trailing_zeros() as u64;
                b &= b - 1;
                let page = w as u64 * 64 + bit;
                let off = page * PAGE;
                if off < lay.len {
                    chunks.insert((lay.part_offset + off) / CHUNK_SIZE as u64);
                }
            }
        }
    }
    Ok((chunks, pages))
}

/// Starts a pre-copy snapshot.
pub fn start_precopy(
    vmm: &mut Vmm,
    mut out: SnapshotOut,
    progress: Progress,
    done: Arc<EventFd>,
) -> Result<SnapshotJob, CaptureError> {
    wait_for_lazy_memory(vmm)?;
    // Pre-copy uses the dirty log itself: the next backup cannot be incremental.
    vmm.backup_parent = None;
    let mem_size = memory_size(&vmm.built.mem);
    let part = Arc::new(out.add_memory(mem_size)?);
    let regions: Vec<(u64, u64)> = crate::vstate::memory::region_layout(&vmm.built.mem)
        .into_iter()
        .map(|(_, g, l)| (g, l))
        .collect();
    let layout = VmSnapshotState::memory_layout(&regions);
    progress.update(|s| {
        s.bytes_total = mem_size;
        s.precopy_rounds = Some(0);
    });

    // Start tracking, then forget what was logged before.
    vmm.built.vm.set_dirty_logging(true)?;
    let _ = take_dirty_chunks(&vmm.built.vm, &vmm.built.mem, &layout)?;

    let (req_tx, req_rx) = channel();
    let (rep_tx, rep_rx) = channel::<FinalState>();
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    let p = progress.clone();
    let vm = vmm.built.vm.clone();
    let mem = vmm.built.mem.clone();
    let lay = layout.clone();
    let worker_part = part.clone();
    let wake = done.clone();
    let mut job = SnapshotJob::spawn(progress, cancel, done, false, None, move || {
        let part = worker_part;
        copy_all(&mem, &lay, &part, &p, &c, None)?;
        let mut buf = Vec::new();
        let mut converged = false;
        for round in 1..=MAX_ROUNDS {
            if c.load(Ordering::Relaxed) {
                return Err(CaptureError::Cancelled);
            }
            let (chunks, pages) = take_dirty_chunks(&vm, &mem, &lay)?;
            p.update(|s| {
                s.precopy_rounds = Some(round);
                s.pages_recopied += pages;
            });
            if chunks.len() <= CONVERGED_CHUNKS {
                // Few enough to copy in the final pause; copy them now anyway so the pause
                // only sees what changes from here on.
                for &index in &chunks {
                    copy_chunk(&mem, &lay, &part, index, &mut buf)?;
                }
                converged = true;
                break;
            }
            for &index in &chunks {
                if c.load(Ordering::Relaxed) {
                    return Err(CaptureError::Cancelled);
                }
                let n = copy_chunk(&mem, &lay, &part, index, &mut buf)?;
                p.update(|s| s.bytes_written += n);
            }
        }
        p.update(|s| s.precopy_converged = Some(converged));
        if !converged {
            tracing::warn!(
                "precopy did not converge in {MAX_ROUNDS} rounds; the final pause copies the rest"
            );
        }
        // The final pause happens on the event loop, which owns the vCPUs.
        req_tx.send(()).map_err(|_| CaptureError::Cancelled)?;
        let _ = wake.write(1);
        let (state, disks): (VmSnapshotState, Vec<FrozenDisk>) = rep_rx
            .recv()
            .map_err(|_| CaptureError::Cancelled)?
            .map_err(CaptureError::CowFault)?;
        p.update(|s| s.bytes_total += frozen_bytes(&disks));
        let part = Arc::try_unwrap(part).map_err(|_| CaptureError::PartInUse)?;
        out.finish_memory(part)?;
        copy_frozen_disks(&mut out, disks, false, &p, &c)?;
        out.write_state(&state)?;
        out.commit()
    })
    .map_err(CaptureError::Spawn)?;
    job.final_pause = Some(FinalPauseLink {
        requests: req_rx,
        replies: rep_tx,
        part,
        layout,
    });
    Ok(job)
}

impl Vmm {
    /// Runs the final pause of a pre-copy snapshot if its worker asked for it.
    pub(crate) fn poll_final_pause(&mut self) {
        let asked = self
            .snapshot
            .as_ref()
            .and_then(|j| j.final_pause.as_ref())
            .is_some_and(|l| l.requests.try_recv().is_ok());
        if !asked {
            return;
        }
        let link = self
            .snapshot
            .as_mut()
            .and_then(|j| j.final_pause.take())
            .expect("the link was just polled");
        let progress = self
            .snapshot
            .as_ref()
            .map(|j| j.progress.clone())
            .expect("a job is running");
        let was_running = self.state() == RunState::Running;
        let t = Instant::now();
        let result = (|| -> Result<(VmSnapshotState, Vec<FrozenDisk>), CaptureError> {
            self.pause()?;
            let state = save_frozen_state(self)?;
            let disks = freeze_disks(self)?;
            let (chunks, pages) = take_dirty_chunks(&self.built.vm, &self.built.mem, &link.layout)?;
            let mut buf = Vec::new();
            for &index in &chunks {
                copy_chunk(&self.built.mem, &link.layout, &link.part, index, &mut buf)?;
            }
            progress.update(|s| s.pages_recopied += pages);
            Ok((state, disks))
        })();
        if let Err(e) = self.built.vm.set_dirty_logging(false) {
            tracing::warn!("cannot turn dirty logging off: {e}");
        }
        if was_running {
            if let Err(e) = self.resume() {
                tracing::error!("cannot resume after the precopy final pause: {e}");
            }
        }
        let us = t.elapsed().as_micros() as u64;
        progress.update(|s| s.pause_us = Some(us));
        tracing::info!("precopy final pause: {us} us");
        drop(link.part);
        let _ = link
            .replies
            .send(result.map_err(|e| crate::error_chain(&e)));
    }
}

//! Pre-copy memory capture: copy all of memory while the guest runs, re-copy what it dirtied
//! (KVM's dirty log for vCPU writes, vm-memory's bitmap for device and VMM writes) in rounds
//! while that converges, then pause briefly to copy the last dirty chunks with the state. The
//! snapshot instant is that final pause, which the event loop runs through the VM's
//! [`CaptureVm`] handle when the worker asks for it ([`FinalPause`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use snapshot::{MemoryLayout, MemorySink};

use super::converge::{Converge, LiftOnDrop};
use super::dirty_log::take_dirty_chunks;
use super::disks::{copy_frozen_disks, frozen_bytes, FrozenDisk};
use super::error::CaptureError;
use super::job::{LoopWork, SnapshotJob};
use super::memory_copy::{copy_all, copy_chunk};
use super::progress::Progress;
use super::strategy::{wait_memory_loaded, CaptureContext, CaptureStrategy};
use super::vm::CaptureVm;
use crate::saved_state::VmSnapshotState;
use crate::vstate::memory::{mapped_layout, memory_size};
use crate::vstate::throttle;

/// What the worker gets back from the final pause.
type FinalState = Result<(VmSnapshotState, Vec<FrozenDisk>), CaptureError>;

/// Pre-copy capture with a short final pause.
pub struct PrecopyCapture;

/// The final pause, run by the event loop when the pre-copy worker asks for it.
struct FinalPause {
    requests: Receiver<()>,
    replies: Sender<FinalState>,
    sink: Option<Arc<dyn MemorySink>>,
    layout: MemoryLayout,
}

impl FinalPause {
    fn run(
        &self,
        vm: &mut dyn CaptureVm,
        progress: &Progress,
        sink: &dyn MemorySink,
    ) -> FinalState {
        vm.pause()?;
        let state = vm.save_state()?;
        let disks = vm.freeze_disks()?;
        let (chunks, pages) = take_dirty_chunks(vm.vm(), vm.memory(), &self.layout)?;
        let mut buf = Vec::new();
        for &index in &chunks {
            copy_chunk(vm.memory(), &self.layout, sink, index, &mut buf)?;
        }
        progress.update(|s| s.pages_recopied += pages);
        Ok((state, disks))
    }
}

impl LoopWork for FinalPause {
    fn poll(&mut self, vm: &mut dyn CaptureVm, progress: &Progress) -> bool {
        if self.requests.try_recv().is_err() {
            return false;
        }
        let Some(sink) = self.sink.take() else {
            return true;
        };
        let was_running = vm.is_running();
        let t = Instant::now();
        // The throttle ends with the rounds; the pause stops the vCPUs anyway.
        throttle::lift();
        let result = self.run(vm, progress, &*sink);
        if let Err(e) = vm.vm().set_dirty_logging(false) {
            tracing::warn!("cannot turn dirty logging off: {e}");
        }
        if was_running {
            if let Err(e) = vm.resume() {
                tracing::error!(
                    "cannot resume after the precopy final pause: {}",
                    snapshot::error_chain(&e)
                );
            }
        }
        let us = t.elapsed().as_micros() as u64;
        progress.update(|s| s.pause_us = Some(us));
        tracing::info!("precopy final pause: {us} us");
        drop(sink);
        let _ = self.replies.send(result);
        true
    }
}

impl CaptureStrategy for PrecopyCapture {
    fn start(&self, ctx: CaptureContext<'_>) -> Result<SnapshotJob, CaptureError> {
        let CaptureContext {
            vm,
            tracking,
            mut out,
            progress,
            done,
        } = ctx;
        wait_memory_loaded(vm)?;
        tracking.consume_dirty_log();
        let mem_size = memory_size(vm.memory());
        let sink = out.add_memory(mem_size)?;
        let layout = mapped_layout(vm.memory()).layout().clone();
        progress.update(|s| {
            s.bytes_total = mem_size;
            s.precopy_rounds = Some(0);
        });

        // Start tracking, then forget what was logged before.
        vm.vm().set_dirty_logging(true)?;
        let _ = take_dirty_chunks(vm.vm(), vm.memory(), &layout)?;

        let (req_tx, req_rx) = channel();
        let (rep_tx, rep_rx) = channel::<FinalState>();
        let cancel = Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        let p = progress.clone();
        let kvm_vm = vm.vm().clone();
        let mem = vm.memory().clone();
        let lay = layout.clone();
        let worker_sink = sink.clone();
        let wake = done.clone();
        let job = SnapshotJob::spawn(progress, cancel, done, move || {
            let sink = worker_sink;
            let mut conv = Converge::from_env();
            let _lift = LiftOnDrop;
            let chunk_size = lay.chunk_size();
            let t = Instant::now();
            copy_all(&mem, &lay, &*sink, &p, &c, None)?;
            conv.copied(mem_size, t.elapsed());
            let mut buf = Vec::new();
            let mut converged = false;
            for round in 1..=conv.max_rounds() {
                if c.load(Ordering::Relaxed) {
                    return Err(CaptureError::Cancelled);
                }
                let (chunks, pages) = take_dirty_chunks(&kvm_vm, &mem, &lay)?;
                let dirty = chunks.len() as u64 * chunk_size;
                converged = conv.converged(chunks.len(), dirty);
                if !converged {
                    if let Some(pct) = conv.next_throttle(dirty) {
                        tracing::info!("precopy round {round}: throttling the vCPUs to {pct}%");
                        throttle::set_percent(pct).map_err(CaptureError::Spawn)?;
                    }
                }
                let stats = conv.stats();
                p.update(|s| {
                    s.precopy_rounds = Some(round);
                    s.pages_recopied += pages;
                    s.precopy = Some(stats);
                });
                // Copy the set now even when it is small enough for the final pause, so the
                // pause only sees what changes from here on.
                let t = Instant::now();
                for &index in &chunks {
                    if c.load(Ordering::Relaxed) {
                        return Err(CaptureError::Cancelled);
                    }
                    let n = copy_chunk(&mem, &lay, &*sink, index, &mut buf)?;
                    p.update(|s| s.bytes_written += n);
                }
                conv.copied(dirty, t.elapsed());
                if converged {
                    break;
                }
            }
            p.update(|s| s.precopy_converged = Some(converged));
            if !converged {
                tracing::warn!(
                    "precopy did not converge in {} rounds; the final pause copies the rest",
                    conv.max_rounds()
                );
            }
            // The final pause happens on the event loop, which owns the vCPUs.
            req_tx.send(()).map_err(|_| CaptureError::Cancelled)?;
            let _ = wake.write(1);
            let (state, disks) = rep_rx
                .recv()
                .map_err(|_| CaptureError::Cancelled)?
                .map_err(|e| CaptureError::FinalPause(Box::new(e)))?;
            p.update(|s| s.bytes_total += frozen_bytes(&disks));
            drop(sink);
            out.finish_memory()?;
            copy_frozen_disks(&mut out, disks, false, &p, &c)?;
            out.write_state(&state)?;
            out.commit()
        })
        .map_err(CaptureError::Spawn)?;
        Ok(job.with_loop_work(Box::new(FinalPause {
            requests: req_rx,
            replies: rep_tx,
            sink: Some(sink),
            layout,
        })))
    }
}

//! The paused snapshot: pause the vCPUs, save every piece of state, write all of memory, commit,
//! resume. The guest is stopped for the whole copy.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use super::disks::{copy_frozen_disks, frozen_bytes};
use super::error::CaptureError;
use super::job::SnapshotJob;
use super::memory_copy::copy_all;
use super::strategy::{CaptureContext, CaptureStrategy};
use crate::vstate::memory::mapped_layout;

/// Pauses the vCPUs for the whole snapshot; the event loop resumes them when the worker ends.
pub struct PausedCapture;

impl CaptureStrategy for PausedCapture {
    fn start(&self, ctx: CaptureContext<'_>) -> Result<SnapshotJob, CaptureError> {
        let CaptureContext {
            vm,
            tracking,
            mut out,
            progress,
            done,
        } = ctx;
        let was_running = vm.is_running();
        let paused_at = Instant::now();
        vm.pause()?;
        let frozen = (|| {
            let state = vm.save_state()?;
            let clean = tracking.plan_incremental(&*vm, &out)?;
            let disks = vm.freeze_disks()?;
            Ok::<_, CaptureError>((state, clean, disks))
        })();
        let (state, clean, disks) = match frozen {
            Ok(s) => s,
            Err(e) => {
                if was_running {
                    vm.resume()?;
                }
                return Err(e);
            }
        };
        let mem = vm.memory().clone();
        let layout = mapped_layout(&mem).layout().clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        let p = progress.clone();
        let job = SnapshotJob::spawn(progress, cancel, done, move || {
            let mem_size = layout.size();
            p.update(|r| r.bytes_total = mem_size + frozen_bytes(&disks));
            let incremental = clean.is_some();
            let sink = out.add_memory(mem_size)?;
            copy_all(&mem, &layout, &*sink, &p, &c, clean.as_deref())?;
            drop(sink);
            out.finish_memory()?;
            copy_frozen_disks(&mut out, disks, incremental, &p, &c)?;
            out.write_state(&state)?;
            out.commit()
        });
        match job {
            Ok(j) => Ok(j.paused_since(paused_at, was_running)),
            Err(e) => {
                if was_running {
                    vm.resume()?;
                }
                Err(CaptureError::Spawn(e))
            }
        }
    }
}

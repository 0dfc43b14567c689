//! The live copy-on-write snapshot (the default): the snapshot instant is the request. The
//! vCPUs pause only to save state, take the written set, freeze the disks and start the
//! tracker's copy (see [`super::cow`]); the copy runs afterwards while the guest runs.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use super::disks::{copy_frozen_disks, frozen_bytes};
use super::error::CaptureError;
use super::job::SnapshotJob;
use super::pause_boost::PauseBoost;
use super::pause_phases::PausePhases;
use super::sink::BACKGROUND_NICE;
use super::strategy::{wait_memory_loaded, CaptureContext, CaptureStrategy};
use crate::vstate::memory::memory_size;

/// Copy-on-write capture through the userfaultfd write tracker.
pub struct CowCapture;

impl CaptureStrategy for CowCapture {
    fn start(&self, ctx: CaptureContext<'_>) -> Result<SnapshotJob, CaptureError> {
        let CaptureContext {
            vm,
            tracking,
            mut out,
            progress,
            done,
        } = ctx;
        wait_memory_loaded(vm)?;
        let mem_size = memory_size(vm.memory());
        let sink = out.add_memory(mem_size)?;
        progress.update(|s| s.bytes_total = mem_size);
        let was_running = vm.is_running();

        let mut boost = PauseBoost::prepare();
        // The snapshot instant: the vCPUs are stopped only for this block.
        let paused_at = Instant::now();
        let mut phases = PausePhases::new(paused_at);
        boost.raise();
        phases.mark("boost");
        vm.pause()?;
        phases.mark("stop_vcpus");
        let armed = (|| {
            let state = vm.save_state()?;
            phases.mark("save_state");
            let tracker = tracking.arm_cow(&*vm)?;
            let clean = tracking.plan_incremental(&*vm, &out)?;
            phases.mark("protect");
            let disks = vm.freeze_disks()?;
            phases.mark("freeze_disks");
            tracker.begin(sink, progress.clone(), clean.as_deref());
            phases.mark("start_copy");
            Ok::<_, CaptureError>((state, tracker, disks, clean))
        })();
        if was_running {
            vm.resume()?;
        }
        phases.mark("resume");
        let pause_us = paused_at.elapsed().as_micros() as u64;
        drop(boost);
        progress.update(|s| s.pause_us = Some(pause_us));
        let (state, tracker, disks, clean) = armed?;
        progress.update(|s| s.bytes_total += frozen_bytes(&disks));
        tracing::info!("cow snapshot armed; vCPUs paused {pause_us} us");
        tracing::info!("cow pause phases: {phases}");

        let cancel = Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        let p = progress.clone();
        SnapshotJob::spawn(progress, cancel, done, move || {
            // The guest runs meanwhile: its vCPUs (and the fault thread it waits on) go first.
            snapshot::sink_pipeline::lower_priority(BACKGROUND_NICE);
            let incremental = clean.is_some();
            let copied = tracker.copy_remaining(&c, clean.as_deref());
            drop(tracker);
            copied?;
            out.finish_memory()?;
            copy_frozen_disks(&mut out, disks, incremental, &p, &c)?;
            out.write_state(&state)?;
            out.commit()
        })
        .map_err(CaptureError::Spawn)
    }
}

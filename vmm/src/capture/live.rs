//! Live snapshots: the guest keeps running while its memory is copied.
//!
//! - cow (default): the snapshot instant is the request. The vCPUs pause only to save state and
//!   write-protect memory (see [`super::cow`]); the copy runs afterwards.
//! - precopy: memory is copied while the guest runs, dirtied pages are copied again in rounds,
//!   and a short final pause copies the last ones with the state (see [`super::precopy`]).

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapshot::{SnapshotWriter, CHUNK_SIZE};
use vmm_sys_util::eventfd::EventFd;

use super::cow::CowTracker;
use super::disks::{copy_frozen_disks, freeze_disks, frozen_bytes};
use super::job::SnapshotJob;
use super::paused::save_frozen_state;
use super::progress::Progress;
use super::state::{MEMORY_PART, STATE_PART};
use super::CaptureError;
use crate::api::SnapshotStrategy;
use crate::runtime::{RunState, Vmm};
use crate::vstate::memory::{memory_size, region_layout};

/// How long a live snapshot waits for a restored VM's memory to finish loading.
const LAZY_LOAD_WAIT: Duration = Duration::from_secs(120);

/// Starts a live snapshot into `out` with `strategy`.
pub fn start_live(
    vmm: &mut Vmm,
    out: &Path,
    strategy: SnapshotStrategy,
    progress: Progress,
    done: Arc<EventFd>,
) -> Result<SnapshotJob, CaptureError> {
    match strategy {
        SnapshotStrategy::Cow => start_cow(vmm, out, progress, done),
        SnapshotStrategy::Precopy => super::precopy::start_precopy(vmm, out, progress, done),
    }
}

/// Waits until a restored VM's memory is fully loaded (its userfaultfd registration must be
/// gone before write-protection can be armed).
pub(crate) fn wait_for_lazy_memory(vmm: &mut Vmm) -> Result<(), CaptureError> {
    if let Some(lazy) = &vmm.built.lazy_memory {
        if !lazy.wait_loaded(LAZY_LOAD_WAIT) {
            return Err(CaptureError::LazyLoadPending);
        }
        vmm.built.lazy_memory = None;
    }
    Ok(())
}

fn start_cow(
    vmm: &mut Vmm,
    out: &Path,
    progress: Progress,
    done: Arc<EventFd>,
) -> Result<SnapshotJob, CaptureError> {
    wait_for_lazy_memory(vmm)?;
    let mut writer = SnapshotWriter::create(out)?;
    let mem_size = memory_size(&vmm.built.mem);
    let part = Arc::new(writer.add_memory_part(MEMORY_PART, mem_size, CHUNK_SIZE as u64)?);
    progress.update(|s| s.bytes_total = mem_size);
    let was_running = vmm.state() == RunState::Running;

    // The snapshot instant: the vCPUs are stopped only for this block.
    let paused_at = Instant::now();
    vmm.pause()?;
    let armed = save_frozen_state(vmm).and_then(|state| {
        let disks = freeze_disks(vmm)?;
        let tracker = CowTracker::arm(
            &vmm.built.mem,
            &state.memory,
            &region_layout(&vmm.built.mem),
            part.clone(),
            progress.clone(),
        )
        .inspect_err(|_| vmm.merge_disk_overlays())?;
        Ok((state, tracker, disks))
    });
    if was_running {
        vmm.resume()?;
    }
    let pause_us = paused_at.elapsed().as_micros() as u64;
    progress.update(|s| s.pause_us = Some(pause_us));
    let (state, tracker, disks) = armed?;
    progress.update(|s| s.bytes_total += frozen_bytes(&disks));
    tracing::info!("cow snapshot armed; vCPUs paused {pause_us} us");

    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    let c_progress = progress.clone();
    SnapshotJob::spawn(progress, cancel, done, false, None, move || {
        tracker.copy_remaining(&c)?;
        drop(tracker);
        let part = Arc::try_unwrap(part).map_err(|_| CaptureError::PartInUse)?;
        writer.finish_memory_part(part)?;
        copy_frozen_disks(&mut writer, disks, &c_progress, &c)?;
        writer.write_state_part(STATE_PART, &state)?;
        writer.commit()?;
        Ok(())
    })
    .map_err(CaptureError::Spawn)
}

impl Vmm {
    /// Work left for the event loop when a live snapshot ends (disk overlays merge back here).
    pub(crate) fn finish_live(&mut self, _job: &mut SnapshotJob) {
        self.merge_disk_overlays();
    }
}

//! Live snapshots: the guest keeps running while its memory is copied.
//!
//! - cow (default): the snapshot instant is the request. The vCPUs pause only to save state and
//!   write-protect memory (see [`super::cow`]); the copy runs afterwards.
//! - precopy: memory is copied while the guest runs, dirtied pages are copied again in rounds,
//!   and a short final pause copies the last ones with the state (see [`super::precopy`]).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::cow::CowTracker;
use super::disks::{copy_frozen_disks, freeze_disks, frozen_bytes};
use super::job::SnapshotJob;
use super::paused::save_frozen_state;
use super::progress::Progress;
use super::sink::{MemoryOut, SnapshotOut};
use super::target::plan_incremental;
use super::CaptureError;
use crate::api::SnapshotStrategy;
use crate::runtime::{RunState, Vmm};
use crate::vstate::memory::{memory_size, region_layout};
use snapshot::CHUNK_SIZE;

/// How long a live snapshot waits for a restored VM's memory to finish loading.
const LAZY_LOAD_WAIT: Duration = Duration::from_secs(120);

/// Starts a live snapshot into `out` with `strategy`.
pub fn start_live(
    vmm: &mut Vmm,
    out: SnapshotOut,
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
    mut out: SnapshotOut,
    progress: Progress,
    done: Arc<EventFd>,
) -> Result<SnapshotJob, CaptureError> {
    wait_for_lazy_memory(vmm)?;
    let mem_size = memory_size(&vmm.built.mem);
    let part = Arc::new(out.add_memory(mem_size)?);
    progress.update(|s| s.bytes_total = mem_size);
    let was_running = vmm.state() == RunState::Running;

    // The snapshot instant: the vCPUs are stopped only for this block.
    let paused_at = Instant::now();
    vmm.pause()?;
    let armed = (|| {
        let state = save_frozen_state(vmm)?;
        if vmm.cow_tracker.is_none() {
            let tracker = CowTracker::arm(
                &vmm.built.mem,
                &state.memory,
                &region_layout(&vmm.built.mem),
                CHUNK_SIZE as u64,
            )?;
            vmm.cow_tracker = Some(Arc::new(tracker));
        }
        let clean = plan_incremental(vmm, &out, &state.memory)?;
        let disks = freeze_disks(vmm)?;
        let tracker = vmm.cow_tracker.clone().expect("armed above");
        tracker.begin(part.clone(), progress.clone(), clean.as_deref());
        Ok::<_, CaptureError>((state, tracker, disks, clean))
    })();
    if was_running {
        vmm.resume()?;
    }
    let pause_us = paused_at.elapsed().as_micros() as u64;
    progress.update(|s| s.pause_us = Some(pause_us));
    let (state, tracker, disks, clean) = armed?;
    progress.update(|s| s.bytes_total += frozen_bytes(&disks));
    tracing::info!("cow snapshot armed; vCPUs paused {pause_us} us");

    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    let p = progress.clone();
    SnapshotJob::spawn(progress, cancel, done, false, None, move || {
        let incremental = clean.is_some();
        let copied = tracker.copy_remaining(&c, clean.as_deref());
        drop(tracker);
        copied?;
        let part = unwrap_part(part)?;
        out.finish_memory(part)?;
        copy_frozen_disks(&mut out, disks, incremental, &p, &c)?;
        out.write_state(&state)?;
        out.commit()
    })
    .map_err(CaptureError::Spawn)
}

/// Takes the memory sink back once no fault handler holds it any more.
pub(crate) fn unwrap_part(mut part: Arc<MemoryOut>) -> Result<MemoryOut, CaptureError> {
    for _ in 0..1000 {
        match Arc::try_unwrap(part) {
            Ok(p) => return Ok(p),
            Err(p) => part = p,
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Err(CaptureError::PartInUse)
}

impl Vmm {
    /// Work left for the event loop when a live snapshot ends (disk overlays merge back here).
    pub(crate) fn finish_live(&mut self, _job: &mut SnapshotJob) {
        self.merge_disk_overlays();
    }
}

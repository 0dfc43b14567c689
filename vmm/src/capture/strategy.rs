//! The one interface every capture strategy implements. A strategy pauses the VM through its
//! [`CaptureVm`] handle, saves what the snapshot instant needs, and hands the copy to a
//! [`SnapshotJob`]; the engine picks the strategy and owns the job. Adding a
//! strategy is one new file implementing [`CaptureStrategy`] plus one line in the engine.

use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::error::CaptureError;
use super::job::SnapshotJob;
use super::progress::Progress;
use super::sink::SnapshotOut;
use super::tracking::ChangeTracking;
use super::vm::CaptureVm;

/// How long a live snapshot waits for a restored VM's memory to finish loading.
const LAZY_LOAD_WAIT: Duration = Duration::from_secs(120);

/// What a strategy gets to start one snapshot.
pub struct CaptureContext<'a> {
    pub vm: &'a mut dyn CaptureVm,
    /// The tracking shared with earlier and later snapshots.
    pub tracking: &'a mut ChangeTracking,
    pub out: SnapshotOut,
    pub progress: Progress,
    /// Written when the job's worker ends, to wake the event loop.
    pub done: Arc<EventFd>,
}

/// A way of capturing a VM.
pub trait CaptureStrategy {
    /// Starts a snapshot: on success the job runs; on failure the VM runs as it did before.
    fn start(&self, ctx: CaptureContext<'_>) -> Result<SnapshotJob, CaptureError>;
}

/// Waits until a restored VM's memory is fully loaded, as live strategies must.
pub fn wait_memory_loaded(vm: &mut dyn CaptureVm) -> Result<(), CaptureError> {
    if vm.wait_memory_loaded(LAZY_LOAD_WAIT) {
        Ok(())
    } else {
        Err(CaptureError::LazyLoadPending)
    }
}

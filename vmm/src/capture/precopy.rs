//! Pre-copy memory capture: copy all of memory while the guest runs, re-copy what it dirtied
//! (KVM's dirty log for vCPU writes, vm-memory's bitmap for device and VMM writes) in rounds
//! while that converges, then pause briefly to copy the last dirty pages with the state. The
//! snapshot instant is that final pause.

use std::path::Path;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::job::SnapshotJob;
use super::progress::Progress;
use super::CaptureError;
use crate::runtime::Vmm;

/// Starts a pre-copy snapshot.
pub fn start_precopy(
    _vmm: &mut Vmm,
    _out: &Path,
    _progress: Progress,
    _done: Arc<EventFd>,
) -> Result<SnapshotJob, CaptureError> {
    Err(CaptureError::Unsupported("the precopy strategy"))
}

//! The narrow handle capture has on a VM. The object that owns the built VM implements
//! [`CaptureVm`] (the machine); capture never sees the event loop or the rest of the VMM.
//!
//! Save-order rules the implementation must keep: [`CaptureVm::save_state`] saves the devices
//! before the KVM state (an interrupt a device raises while it is being saved is then already in
//! the irqchip state saved after it), and [`CaptureVm::freeze_disks`] is called after the
//! device state was saved.

use std::sync::Arc;
use std::time::Duration;

use devices::GuestMemoryMmap;

use super::disks::FrozenDisk;
use super::error::CaptureError;
use crate::saved_state::VmSnapshotState;
use crate::vstate::vm::Vm;

/// What capture may do to a VM.
pub trait CaptureVm {
    /// The VM's name (backup points are kept per VM name).
    fn name(&self) -> &str;
    /// Whether the vCPUs are running.
    fn is_running(&self) -> bool;
    /// Pauses every vCPU.
    fn pause(&mut self) -> Result<(), CaptureError>;
    /// Resumes every vCPU.
    fn resume(&mut self) -> Result<(), CaptureError>;
    /// Saves the state of the paused VM: devices first, then vCPUs, then the VM-wide KVM state.
    fn save_state(&self) -> Result<VmSnapshotState, CaptureError>;
    /// Switches every disk to a fresh overlay, freezing the image below it. Call with the vCPUs
    /// paused, after [`Self::save_state`]. On failure nothing stays frozen.
    fn freeze_disks(&self) -> Result<Vec<FrozenDisk>, CaptureError>;
    /// Merges every disk's snapshot overlay back into its base, in the background.
    fn merge_disk_overlays(&self);
    /// Guest memory.
    fn memory(&self) -> &GuestMemoryMmap;
    /// The KVM VM, for its dirty log.
    fn vm(&self) -> &Arc<Vm>;
    /// Waits up to `timeout` until a restored VM's memory is fully loaded (its userfaultfd
    /// registration must be gone before write-protection can be armed); returns whether it is.
    fn wait_memory_loaded(&mut self, timeout: Duration) -> bool;
}

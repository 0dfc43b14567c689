//! The state part of a snapshot: everything but memory and disk contents, nested
//! device -> devices -> VM, and keyed by stable device ids. Capture writes it, restore and the
//! builder read it; it depends on neither.

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmState;

/// The name of the state part in a snapshot directory.
pub const STATE_PART: &str = "state";
/// The name of the guest memory part.
pub const MEMORY_PART: &str = "memory";
/// The name of a disk's part.
pub fn disk_part_name(id: &str) -> String {
    format!("disk-{id}")
}

/// The largest state part accepted (the state of 254 vCPUs fits well below this).
pub const MAX_STATE_LEN: u64 = 64 << 20;

pub use snapshot::MemoryRegionState;

/// One device's saved state, keyed by its kind and stable id. `state` is whatever the device's
/// `Persist` impl saves (for a virtio device, `{"device": .., "transport": ..}`), so a new kind
/// of device needs no change here; the device manager (`device_manager/`) writes and reads it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedDevice {
    pub id: String,
    pub kind: String,
    pub state: serde_json::Value,
}

/// The state of every device, in the device manager's registration order (a JSON array).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DevicesState {
    pub devices: Vec<SavedDevice>,
}

/// A whole VM's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshotState {
    pub config: VmConfig,
    pub memory: Vec<MemoryRegionState>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

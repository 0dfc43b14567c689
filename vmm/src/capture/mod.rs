//! Capturing a VM: the state saved while the vCPUs are paused, and the copy of guest memory
//! into a snapshot's memory part.
//!
//! Save order, for every mode: devices are saved before KVM state, so that an interrupt a device
//! raises while it is being saved is already in the irqchip state saved after it; and guest
//! memory written by devices (through vm-memory, which records it in the dirty bitmap) counts as
//! dirty exactly like memory written by vCPUs.

pub mod cow;
pub mod disks;
pub mod job;
pub mod live;
pub mod memory_copy;
pub mod paused;
pub mod precopy;
pub mod progress;
pub mod sink;
pub mod target;

/// Why a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("cannot pause or resume the vCPUs")]
    Runtime(#[source] Box<crate::runtime::RuntimeError>),
    #[error("cannot save vCPU state")]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error("cannot save VM state")]
    Vm(#[from] crate::vstate::vm::VmError),
    #[error("cannot save device state")]
    Devices(#[from] crate::device_manager::DeviceManagerError),
    #[error("cannot read guest memory at {addr:#x}")]
    ReadMemory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("the snapshot was cancelled")]
    Cancelled,
    #[error("a snapshot is already running")]
    Busy,
    #[error(transparent)]
    Cow(#[from] cow::CowError),
    #[error("copy-on-write tracking failed: {0}")]
    CowFault(String),
    #[error("the restored VM's memory is still loading; try again shortly")]
    LazyLoadPending,
    #[error("the memory part is still in use")]
    PartInUse,
    #[error(transparent)]
    Repo(#[from] snapshot::repo::RepoError),
    #[error(transparent)]
    Key(#[from] snapshot::repo::KeyError),
    #[error("cannot freeze disk {0}")]
    Disk(String, #[source] devices::virtio::block::DiskError),
    #[error("cannot read frozen disk {0}")]
    ReadDisk(String, #[source] std::io::Error),
    #[error("cannot write disk {0} into the snapshot")]
    WriteDisk(String, #[source] std::io::Error),
    #[error("{0} is not available yet")]
    Unsupported(&'static str),
    #[error("the snapshot thread panicked")]
    WorkerPanicked,
    #[error("cannot start the snapshot thread")]
    Spawn(#[source] std::io::Error),
}

impl From<crate::runtime::RuntimeError> for CaptureError {
    fn from(e: crate::runtime::RuntimeError) -> Self {
        Self::Runtime(Box::new(e))
    }
}

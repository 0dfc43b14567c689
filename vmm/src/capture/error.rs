//! Why a snapshot failed: [`CaptureError`] for the whole of capture, and [`CowError`] for
//! setting up copy-on-write write tracking. Both live here, below every other capture file, so
//! that each of them can name these types without a circle of imports.

use std::sync::Arc;

use crate::vstate::vcpu::VcpuError;

/// Why write tracking could not be set up or kept.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    #[error("cannot create a write-protect userfaultfd (needs Linux 6.4+ and root)")]
    Create(#[source] userfaultfd::Error),
    #[error("cannot register guest memory for write-protection")]
    Register(#[source] userfaultfd::Error),
    #[error("cannot write-protect guest memory")]
    Protect(#[source] userfaultfd::Error),
    #[error("cannot start the copy-on-write fault thread")]
    Spawn(#[source] std::io::Error),
    #[error("protection unit {0} lies outside guest memory")]
    UnitOutside(u64),
}

/// Why a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error(transparent)]
    Sink(#[from] snapshot::MemorySinkError),
    #[error("cannot pause or resume the vCPUs")]
    PauseResume(#[source] VcpuError),
    #[error("cannot save vCPU state")]
    Vcpu(#[from] VcpuError),
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
    #[error("chunk {0} lies outside guest memory")]
    ChunkOutside(u64),
    #[error("the destination cannot take chunk {0} from the parent point")]
    ReuseRefused(u64),
    #[error("the snapshot was cancelled")]
    Cancelled,
    #[error("a snapshot is already running")]
    Busy,
    #[error(transparent)]
    Cow(#[from] CowError),
    /// The first error of the copy-on-write fault thread, reported by the copier.
    #[error("copy-on-write tracking failed")]
    CowFault(#[source] Arc<CaptureError>),
    #[error("the final pause of the pre-copy snapshot failed")]
    FinalPause(#[source] Box<CaptureError>),
    #[error("the snapshot ended but the VM did not resume")]
    NotResumed(#[source] Box<CaptureError>),
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
    #[error("the snapshot thread panicked")]
    WorkerPanicked,
    #[error("cannot start the snapshot thread")]
    Spawn(#[source] std::io::Error),
}

impl CaptureError {
    /// Whether the error says the destination already exists (the API answers 409 for it).
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            Self::Busy | Self::Snapshot(snapshot::SnapshotError::Exists { .. })
        )
    }
}

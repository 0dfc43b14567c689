//! Capturing a VM into a snapshot directory or a backup point, through a narrow handle on the
//! VM ([`CaptureVm`]) and nothing else of the VMM.
//!
//! Files, lowest first (each imports only files above it):
//! - `error`: [`CaptureError`], [`CowError`].
//! - `request`, `status`: what a snapshot is asked to be, and its progress (the API serves
//!   these as they are).
//! - `progress`: the shared, updatable status of one snapshot.
//! - `sink`: the destination ([`SnapshotOut`]), which hands out memory as a
//!   [`snapshot::MemorySink`].
//! - `memory_copy`, `dirty_log`, `disks`: copying memory chunks, reading the dirty logs, copying
//!   frozen disks.
//! - `vm`: the [`CaptureVm`] seam, implemented by the owner of the VM (the machine).
//! - `staging`: the bounded pool where write faults stage units for the copier.
//! - `pause_boost`: raises the pausing and vCPU threads' priority for the pause.
//! - `pause_phases`: times the pause's phases for the log.
//! - `cow_counters`, `cow_shared`, `cow_fault`, `cow`: the fault costs, the state the write
//!   tracker shares with its fault thread, the fault thread, and the userfaultfd write tracker.
//! - `tracking`: [`ChangeTracking`], the one owner of the state shared between snapshots (the
//!   write tracker and the incremental-backup parent).
//! - `job`: a running snapshot's worker.
//! - `strategy`: the [`CaptureStrategy`] interface; `paused`, `live_cow` and `precopy`
//!   implement it.
//! - `engine`: [`CaptureEngine`], the job's life cycle and the one place strategies are chosen.
//!
//! Save order, for every mode: devices are saved before KVM state, so that an interrupt a device
//! raises while it is being saved is already in the irqchip state saved after it; and guest
//! memory written by devices (through vm-memory, which records it in the dirty bitmap) counts as
//! dirty exactly like memory written by vCPUs.

pub mod converge;
pub mod cow;
pub mod cow_counters;
pub mod cow_fault;
pub mod cow_shared;
pub mod dirty_log;
pub mod disks;
pub mod engine;
pub mod error;
pub mod job;
pub mod live_cow;
pub mod memory_copy;
pub mod metrics;
pub mod pause_boost;
pub mod pause_phases;
pub mod paused;
pub mod precopy;
pub mod progress;
pub mod request;
pub mod sink;
pub mod staging;
pub mod status;
pub mod strategy;
pub mod tracking;
pub mod vm;

pub use disks::FrozenDisk;
pub use engine::{CaptureEngine, SnapshotEnded};
pub use error::{CaptureError, CowError};
pub use request::{SnapshotMode, SnapshotRequest, SnapshotStrategy, SnapshotTarget};
pub use sink::SnapshotOut;
pub use status::{CowStats, PrecopyStats, SnapshotState, SnapshotStatus};
pub use strategy::CaptureStrategy;
pub use tracking::ChangeTracking;
pub use vm::CaptureVm;

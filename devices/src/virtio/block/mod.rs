//! virtio-blk over raw image files, with changed-block tracking and overlay layers.
//!
//! - [`config`]: the `--disk` option and its start-time validation.
//! - [`disk`]: the layer stack (base image + overlays), freeze and merge.
//! - [`hydrate`]: a base image filled from a backup point while the guest runs.
//! - [`overlay`]: the crash-safe overlay file format (`docs/disk-overlay.md`).
//! - [`cbt`]: the changed-block bitmap.
//! - [`request`]: checking and serving one descriptor chain.
//! - [`device`]: the virtio device, its event-loop subscriber and its saved state.

pub mod cbt;
pub mod config;
pub mod device;
pub mod disk;
pub mod hydrate;
pub mod image_format;
pub mod overlay;
pub mod request;
mod reserve;

pub use cbt::{ChangedBlockTracker, ChangedBlocks, CBT_BLOCK_SIZE};
pub use config::{validate_disks, DiskConfig, DiskConfigError, SECTOR_SIZE};
pub use device::{Block, BlockArgs, BlockError, BlockState, QUEUE_SIZE};
pub use disk::{Disk, DiskError, FrozenImage, Layer, MergeStats, SNAPSHOT_OVERLAY_SUFFIX};
pub use hydrate::{Hydration, HydrationProgress};
pub use overlay::{OverlayError, OverlayFile, CLUSTER_SIZE, OVERLAY_MAGIC, OVERLAY_VERSION};
pub use request::{RequestCounters, RequestError};

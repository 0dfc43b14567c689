//! The virtio-blk disks: one virtio device per `--disk`, in order (disk `i` in virtio-mmio slot
//! `i`), and what capture does to them at a snapshot instant (freeze every disk into a fresh
//! overlay, merge the overlays back afterwards).

use std::sync::{Arc, Mutex};

use devices::virtio::block::{
    Block, BlockArgs, BlockError, BlockState, DiskConfig, DiskConfigError, DiskError, FrozenImage,
};
use snapshot::{lock, Persist};

use super::{DeviceManager, DeviceManagerError};
use crate::arch::layout;

/// How long a snapshot waits for the previous snapshot's overlay merge before freezing a disk.
const MERGE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The kind of a virtio-blk disk.
pub const DISK_KIND: &str = "disk";

/// Why a disk could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum DiskSetupError {
    #[error(transparent)]
    Config(#[from] DiskConfigError),
    #[error("cannot open disk {0}")]
    Block(String, #[source] BlockError),
    #[error("at most {0} disks are supported")]
    TooMany(u32),
}

/// A disk could not be frozen at a snapshot instant.
#[derive(Debug, thiserror::Error)]
#[error("cannot freeze disk {id}")]
pub struct FreezeError {
    pub id: String,
    #[source]
    pub source: DiskError,
}

/// An attached disk.
pub struct AttachedDisk {
    pub id: String,
    pub config: DiskConfig,
    pub block: Arc<Mutex<Block>>,
}

/// A disk frozen at the snapshot instant.
pub struct FrozenDisk {
    pub id: String,
    pub image: FrozenImage,
}

impl DeviceManager {
    /// Opens and registers every configured disk, in order; on restore each takes its saved
    /// device and transport state by id.
    pub fn add_disks(&mut self, disks: &[DiskConfig]) -> Result<(), DeviceManagerError> {
        if disks.len() as u32 > layout::VIRTIO_MAX_DEVICES {
            return Err(DiskSetupError::TooMany(layout::VIRTIO_MAX_DEVICES).into());
        }
        devices::virtio::block::validate_disks(disks).map_err(DiskSetupError::from)?;
        for (i, cfg) in disks.iter().enumerate() {
            let id = cfg.device_id(i);
            let block = self.add_virtio_device(&id, DISK_KIND, |saved: Option<&BlockState>| {
                let open = |e| DiskSetupError::Block(id.clone(), e);
                let block = Block::from_config(cfg, i).map_err(open)?;
                match saved {
                    None => Ok(block),
                    Some(state) => Block::restore(
                        BlockArgs {
                            disk: block.disk().clone(),
                        },
                        state,
                    )
                    .map_err(open),
                }
            })?;
            self.disks.push(AttachedDisk {
                id,
                config: cfg.clone(),
                block,
            });
        }
        Ok(())
    }

    /// The attached disks, in `--disk` order.
    pub fn disks(&self) -> &[AttachedDisk] {
        &self.disks
    }

    /// Switches every disk to a fresh snapshot overlay, which freezes the image below it, and
    /// returns the frozen images by id. Call with the vCPUs paused, after the device state was
    /// saved. On failure the disks frozen so far are merged back before the error returns.
    pub fn freeze_disks(&self) -> Result<Vec<FrozenDisk>, FreezeError> {
        let mut frozen = Vec::with_capacity(self.disks.len());
        for d in &self.disks {
            let disk = lock(&d.block).disk().clone();
            // The previous snapshot's overlay may still be merging back (in the background,
            // after that snapshot ended): let it finish rather than refuse this snapshot.
            if !disk.wait_merge_done(MERGE_WAIT) {
                tracing::warn!(
                    "disk {}: the previous snapshot's overlay is still merging after {:?}",
                    d.id,
                    MERGE_WAIT
                );
            }
            match disk.start_snapshot_overlay() {
                Ok(image) => frozen.push(FrozenDisk {
                    id: d.id.clone(),
                    image,
                }),
                Err(source) => {
                    // Give back what was frozen so far before failing.
                    drop(frozen);
                    self.merge_disk_overlays();
                    return Err(FreezeError {
                        id: d.id.clone(),
                        source,
                    });
                }
            }
        }
        Ok(frozen)
    }

    /// Merges every disk's snapshot overlay back into its base, in the background.
    pub fn merge_disk_overlays(&self) {
        for d in &self.disks {
            let disk = lock(&d.block).disk().clone();
            if disk.snapshot_overlay_path().exists() {
                match disk.merge_overlay_in_background() {
                    Ok(_) => tracing::debug!("merging disk {} back in the background", d.id),
                    Err(e) => tracing::error!("cannot start merging disk {}: {e}", d.id),
                }
            }
        }
    }
}

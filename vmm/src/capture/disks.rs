//! Disks in a snapshot: at the snapshot instant every disk switches to a fresh overlay file
//! (the patent's "new log of uncommitted updates"), which freezes the image below it; the frozen
//! image is copied into the snapshot while the guest keeps writing to the overlay, and the
//! overlay is merged back once the snapshot has ended, whether it succeeded or not.

use std::sync::atomic::AtomicBool;

use devices::virtio::block::FrozenImage;

use super::progress::Progress;
use super::sink::SnapshotOut;
use super::CaptureError;
use crate::runtime::Vmm;
use crate::saved_state::disk_part_name;

/// A disk frozen at the snapshot instant.
pub struct FrozenDisk {
    pub id: String,
    pub image: FrozenImage,
}

/// Freezes every disk. Call with the vCPUs paused, after the device state was saved.
pub fn freeze_disks(vmm: &Vmm) -> Result<Vec<FrozenDisk>, CaptureError> {
    let mut frozen = Vec::with_capacity(vmm.built.disks.len());
    for d in &vmm.built.disks {
        let disk = d.block.lock().expect("block lock poisoned").disk().clone();
        match disk.start_snapshot_overlay() {
            Ok(image) => frozen.push(FrozenDisk {
                id: d.id.clone(),
                image,
            }),
            Err(e) => {
                // Give back what was frozen so far before failing.
                drop(frozen);
                vmm.merge_disk_overlays();
                return Err(CaptureError::Disk(d.id.clone(), e));
            }
        }
    }
    Ok(frozen)
}

/// Total bytes of the frozen disks.
pub fn frozen_bytes(frozen: &[FrozenDisk]) -> u64 {
    frozen.iter().map(|f| f.image.size()).sum()
}

/// Copies every frozen disk into `disk-<id>`; with `incremental`, only the chunks holding
/// blocks changed since the parent point are read.
pub fn copy_frozen_disks(
    out: &mut SnapshotOut,
    frozen: Vec<FrozenDisk>,
    incremental: bool,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<(), CaptureError> {
    for f in frozen {
        let changed = incremental.then(|| f.image.changed_blocks());
        out.write_disk(&disk_part_name(&f.id), &f.image, changed, progress, cancel)?;
    }
    Ok(())
}

impl Vmm {
    /// Merges every disk's snapshot overlay back into its base, in the background.
    pub(crate) fn merge_disk_overlays(&self) {
        for d in &self.built.disks {
            let disk = d.block.lock().expect("block lock poisoned").disk().clone();
            if disk.snapshot_overlay_path().exists() {
                match disk.merge_overlay_in_background() {
                    Ok(_) => tracing::debug!("merging disk {} back in the background", d.id),
                    Err(e) => tracing::error!("cannot start merging disk {}: {e}", d.id),
                }
            }
        }
    }
}

//! Disks in a snapshot: at the snapshot instant every disk switches to a fresh overlay file
//! (the patent's "new log of uncommitted updates"), which freezes the image below it; the frozen
//! image is copied into the snapshot while the guest keeps writing to the overlay, and the
//! overlay is merged back once the snapshot has ended, whether it succeeded or not. Freezing and
//! merging belong to the VM (through the capture seam); copying belongs here.

use std::sync::atomic::AtomicBool;

use super::error::CaptureError;
use super::progress::Progress;
use super::sink::SnapshotOut;
use crate::saved_state::disk_part_name;

pub use crate::device_manager::FrozenDisk;

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

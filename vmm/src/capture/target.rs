//! Opening a snapshot's destination, and deciding at the snapshot instant which memory chunks
//! an incremental backup may take from its parent point unread.
//!
//! Incremental backups rest on continuous tracking: after a backup into a repository, KVM's
//! dirty log stays on (vm-memory's bitmap always is) and each disk keeps its changed-block
//! bitmap. The next backup of the same VM into the same repository reads only what changed.
//! Anything that consumes the tracking (a snapshot into a directory, a pre-copy snapshot, a
//! failed backup, a new process) makes the next backup read everything, and it says so.

use std::path::Path;

use snapshot::repo::{RepoKey, Repository};
use snapshot::{SnapshotWriter, CHUNK_SIZE};

use super::precopy::take_dirty_chunks;
use super::sink::SnapshotOut;
use super::CaptureError;
use crate::api::SnapshotTarget;
use crate::runtime::Vmm;
use crate::saved_state::MemoryRegionState;

/// Opens the destination of a snapshot.
pub fn open_target(
    vmm: &Vmm,
    target: &SnapshotTarget,
    key: Option<&Path>,
) -> Result<SnapshotOut, CaptureError> {
    match target {
        SnapshotTarget::Dir(dir) => Ok(SnapshotOut::Dir(SnapshotWriter::create(dir)?)),
        SnapshotTarget::Repo(path) => {
            let key = key.map(RepoKey::load).transpose()?;
            let repo = Repository::open(path, key)?;
            let parent = repo.latest_point(&vmm.config.name)?.map(|p| p.id);
            let writer = repo.start_backup(&vmm.config.name, parent.as_deref())?;
            Ok(SnapshotOut::Repo {
                writer: Box::new(writer),
                repo: path.clone(),
            })
        }
    }
}

/// Decides, with the vCPUs paused, which memory chunks are unchanged since the parent point.
/// Returns None when everything must be read. Also restarts the change tracking at this
/// instant, for the next backup.
///
/// With copy-on-write tracking armed (after the first live snapshot) the written chunks come
/// from its write faults; otherwise from KVM's dirty log plus vm-memory's bitmap.
pub fn plan_incremental(
    vmm: &mut Vmm,
    out: &SnapshotOut,
    layout: &[MemoryRegionState],
) -> Result<Option<Vec<bool>>, CaptureError> {
    let written: Vec<bool> = match &vmm.cow_tracker {
        Some(t) => t.take_written()?,
        None => {
            vmm.built.vm.set_dirty_logging(true)?;
            let (dirty, _) = take_dirty_chunks(&vmm.built.vm, &vmm.built.mem, layout)?;
            let total: u64 = layout
                .iter()
                .map(|r| r.len)
                .sum::<u64>()
                .div_ceil(CHUNK_SIZE as u64);
            (0..total).map(|i| dirty.contains(&i)).collect()
        }
    };
    let SnapshotOut::Repo { writer, .. } = out else {
        // A directory snapshot freezes the disks, which consumes their change tracking.
        vmm.backup_parent = None;
        return Ok(None);
    };
    let parent = writer.parent().map(|p| p.id.clone());
    let tracked = parent.is_some() && vmm.backup_parent == parent;
    if !tracked {
        if parent.is_some() {
            tracing::warn!(
                "no change tracking since the parent backup point (new process or an intervening snapshot): reading all memory and disks"
            );
        }
        return Ok(None);
    }
    let changed = written.iter().filter(|w| **w).count();
    tracing::info!(
        "incremental backup: {changed} of {} memory chunks changed since the parent point",
        written.len()
    );
    Ok(Some(written.iter().map(|w| !w).collect()))
}

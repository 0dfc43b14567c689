//! The change tracking shared by successive snapshots, in one object: the copy-on-write write
//! tracker (armed by the first live snapshot and kept from then on), and the backup point whose
//! instant the tracking started at, which decides whether the next backup can be incremental.
//!
//! Incremental backups rest on continuous tracking: after a backup into a repository, KVM's
//! dirty log stays on (vm-memory's bitmap always is) or the write tracker keeps recording, and
//! each disk keeps its changed-block bitmap. The next backup of the same VM into the same
//! repository reads only what changed. Anything that consumes the tracking (a snapshot into a
//! directory, a pre-copy snapshot, a failed backup, a new process) makes the next backup read
//! everything, and it says so. Nothing outside this file changes that state.

use std::sync::Arc;

use super::cow::CowTracker;
use super::dirty_log::take_dirty_chunks;
use super::error::CaptureError;
use super::sink::{Committed, SnapshotOut};
use super::staging::StagingSize;
use super::vm::CaptureVm;
use crate::vstate::memory::mapped_layout;

/// The tracking that outlives one snapshot.
#[derive(Default)]
pub struct ChangeTracking {
    /// Write-protection tracking, armed by the first live snapshot and kept from then on.
    cow: Option<Arc<CowTracker>>,
    /// The backup point whose instant the tracking started at, while it is intact.
    parent: Option<String>,
    /// Whether the running snapshot is a backup into a repository (its point becomes the
    /// parent when it commits).
    pending_backup: bool,
    /// The bound of the write tracker's staging pool (None: the default, automatic).
    cow_staging: Option<StagingSize>,
}

impl ChangeTracking {
    /// Bounds the write tracker's staging pool; takes effect when the tracker is armed by the
    /// first live snapshot.
    pub fn set_cow_staging(&mut self, size: StagingSize) {
        self.cow_staging = Some(size);
    }

    /// The write tracker, armed on first use (vCPUs paused).
    pub fn arm_cow(&mut self, vm: &dyn CaptureVm) -> Result<Arc<CowTracker>, CaptureError> {
        if let Some(t) = &self.cow {
            return Ok(t.clone());
        }
        let staging = self.cow_staging.unwrap_or(StagingSize::Auto);
        let tracker = Arc::new(CowTracker::arm(
            vm.memory(),
            mapped_layout(vm.memory()),
            staging,
        )?);
        self.cow = Some(tracker.clone());
        // The tracker knows only the writes from now on: the dirty-log tracking since the parent
        // point ends here, so the next backup must read everything.
        self.parent = None;
        Ok(tracker)
    }

    /// Decides, with the vCPUs paused, which memory chunks are unchanged since the parent point.
    /// Returns None when everything must be read. Also restarts the change tracking at this
    /// instant, for the next backup.
    ///
    /// With copy-on-write tracking armed (after the first live snapshot) the written chunks come
    /// from its write faults; otherwise from KVM's dirty log plus vm-memory's bitmap.
    pub fn plan_incremental(
        &mut self,
        vm: &dyn CaptureVm,
        out: &SnapshotOut,
    ) -> Result<Option<Vec<bool>>, CaptureError> {
        let written: Vec<bool> = match &self.cow {
            Some(t) => t.take_written()?,
            None => {
                vm.vm().set_dirty_logging(true)?;
                let layout = mapped_layout(vm.memory());
                let layout = layout.layout();
                let (dirty, _) = take_dirty_chunks(vm.vm(), vm.memory(), layout)?;
                (0..layout.chunk_count())
                    .map(|i| dirty.contains(&i))
                    .collect()
            }
        };
        if !out.is_backup() {
            // A directory snapshot freezes the disks, which consumes their change tracking.
            self.parent = None;
            return Ok(None);
        }
        let parent = out.parent_point();
        let tracked = parent.is_some() && self.parent == parent;
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

    /// A pre-copy snapshot uses the dirty log itself and turns it off at its final pause: the
    /// tracking since the parent is gone, and its own point cannot be a parent either.
    pub fn consume_dirty_log(&mut self) {
        self.parent = None;
        self.pending_backup = false;
    }

    /// A snapshot into `out` is starting (call before the strategy starts it).
    pub fn starting(&mut self, out_is_backup: bool) {
        self.pending_backup = out_is_backup;
    }

    /// The snapshot that was starting did not start.
    pub fn not_started(&mut self) {
        self.pending_backup = false;
    }

    /// The running snapshot ended: a committed backup point becomes the parent of the next
    /// backup; a failed backup breaks the tracking.
    pub fn ended(&mut self, result: Result<&Committed, &CaptureError>) {
        let was_backup = std::mem::take(&mut self.pending_backup);
        if !was_backup {
            return;
        }
        self.parent = match result {
            // The tracking armed at this point's instant now belongs to it.
            Ok(committed) => committed.point_id.clone(),
            Err(_) => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(point: Option<&str>) -> Committed {
        Committed {
            name: "x".into(),
            point_id: point.map(str::to_string),
        }
    }

    #[test]
    fn a_committed_backup_becomes_the_parent_and_a_failure_breaks_it() {
        let mut t = ChangeTracking::default();
        t.starting(true);
        t.ended(Ok(&committed(Some("p1"))));
        assert_eq!(t.parent.as_deref(), Some("p1"));
        // A directory snapshot's end leaves the parent to plan_incremental.
        t.starting(false);
        t.ended(Ok(&committed(None)));
        assert_eq!(t.parent.as_deref(), Some("p1"));
        t.starting(true);
        t.ended(Err(&CaptureError::Cancelled));
        assert_eq!(t.parent, None);
        t.starting(true);
        t.ended(Ok(&committed(Some("p2"))));
        // A pre-copy backup breaks the chain and does not become a parent itself.
        t.starting(true);
        t.consume_dirty_log();
        assert_eq!(t.parent, None);
        t.ended(Ok(&committed(Some("p3"))));
        assert_eq!(t.parent, None);
    }
}

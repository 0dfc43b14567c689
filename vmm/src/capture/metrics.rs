//! The snapshot metrics of `GET /metrics`: counts, durations, pauses, bytes and write-tracking
//! counts, recorded when a snapshot starts and ends.

use super::{SnapshotState, SnapshotStatus};
use crate::metrics::{counter, gauge, register, MetricKind};

/// Records a snapshot that has ended (from the capture engine).
pub fn snapshot_ended(s: &SnapshotStatus) {
    let result = match s.state {
        SnapshotState::Done => "done",
        SnapshotState::Failed => "failed",
        SnapshotState::Cancelled => "cancelled",
        SnapshotState::Running => return,
    };
    register(
        "arkvm_snapshots_total",
        "Snapshots ended, by result.",
        MetricKind::Counter,
        &[("result", result)],
    )
    .inc();
    counter(
        "arkvm_snapshot_duration_ms_total",
        "Milliseconds spent taking snapshots, summed.",
    )
    .add(s.total_ms);
    gauge(
        "arkvm_snapshot_last_duration_ms",
        "Milliseconds the last snapshot took.",
    )
    .set(s.total_ms);
    let pause = s.pause_us.unwrap_or(0);
    counter(
        "arkvm_snapshot_pause_us_total",
        "Microseconds the vCPUs were paused for snapshots, summed.",
    )
    .add(pause);
    gauge(
        "arkvm_snapshot_last_pause_us",
        "Microseconds the vCPUs were paused for the last snapshot.",
    )
    .set(pause);
    counter(
        "arkvm_snapshot_bytes_written_total",
        "Bytes written by snapshots.",
    )
    .add(s.bytes_written);
    counter(
        "arkvm_snapshot_pages_copied_early_total",
        "Pages write tracking copied before the guest overwrote them (copy-on-write faults).",
    )
    .add(s.pages_copied_early);
    counter(
        "arkvm_snapshot_pages_recopied_total",
        "Pages write tracking found dirtied and copied again (precopy rounds).",
    )
    .add(s.pages_recopied);
}

/// Records that a snapshot started.
pub fn snapshot_started() {
    counter("arkvm_snapshots_started_total", "Snapshots started.").inc();
}

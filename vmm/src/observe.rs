//! What `GET /` and `GET /metrics` answer: arkvm's version and the VM's state, and the
//! metrics of every module, refreshed from the ones read at request time (disk request
//! counters, continuous-protection status).

use crate::api::{RootInfo, VmState};
use crate::capture::{SnapshotState, SnapshotStatus};
use crate::dr_checkpoints::DrStatus;
use crate::machine::{Machine, RunState};
use crate::metrics::{counter, gauge, register, MetricKind};

/// The body of `GET /`.
pub fn root_info(machine: &Machine) -> RootInfo {
    RootInfo {
        name: "arkvm".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        state: match machine.state() {
            RunState::Running => VmState::Running,
            RunState::Paused => VmState::Paused,
        },
    }
}

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

/// The metrics text, after refreshing what is read at request time.
pub fn metrics_text(machine: &Machine, dr: &DrStatus, now_ms: u64) -> String {
    for attached in machine.built.devices.disks() {
        let c = attached
            .block
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counters();
        let disk = &attached.id;
        for (status, n) in [
            ("ok", c.ok),
            ("ioerr", c.ioerr),
            ("unsupported", c.unsupported),
        ] {
            register(
                "arkvm_disk_requests_total",
                "virtio-blk requests completed, by disk and status.",
                MetricKind::Counter,
                &[("disk", disk), ("status", status)],
            )
            .set(n);
        }
    }
    gauge(
        "arkvm_vm_paused",
        "1 while the VM's vCPUs are paused, else 0.",
    )
    .set(u64::from(machine.state() == RunState::Paused));
    counter(
        "arkvm_dr_checkpoints_committed_total",
        "DR checkpoints the receiver committed.",
    )
    .set(dr.checkpoints_committed);
    counter(
        "arkvm_dr_checkpoints_failed_total",
        "DR checkpoints that failed.",
    )
    .set(dr.checkpoints_failed);
    counter(
        "arkvm_dr_intervals_skipped_total",
        "DR intervals skipped because a checkpoint was still running.",
    )
    .set(dr.intervals_skipped);
    let lag = dr
        .last_checkpoint
        .as_ref()
        .map(|c| now_ms.saturating_sub(c.taken_at_unix_ms));
    gauge(
        "arkvm_dr_lag_ms",
        "Age of the newest committed DR checkpoint in milliseconds (0 when none).",
    )
    .set(lag.unwrap_or(0));
    crate::metrics::render()
}

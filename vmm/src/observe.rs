//! What `GET /` and `GET /metrics` answer: arkvm's version and the VM's state, and the
//! metrics of every module, refreshed from the ones read at request time (disk request
//! and byte counters, continuous-protection status).

use crate::api::{RootInfo, VmState};
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
        for (direction, n) in [("read", c.read_bytes), ("write", c.written_bytes)] {
            register(
                "arkvm_disk_bytes_total",
                "Data bytes moved by completed virtio-blk requests, by disk and direction.",
                MetricKind::Counter,
                &[("disk", disk), ("direction", direction)],
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

//! Counting vCPU exits by kind for `GET /metrics` (`arkvm_vcpu_exits_total{kind=...}`).

use std::sync::OnceLock;

use kvm_ioctls::VcpuExit;

use crate::metrics::{register, Metric, MetricKind};

/// The exit kinds counted, in the order of [`kind_index`].
const KINDS: [&str; 9] = [
    "io_in",
    "io_out",
    "mmio_read",
    "mmio_write",
    "hlt",
    "shutdown",
    "system_event",
    "internal_error",
    "other",
];

fn kind_index(exit: &VcpuExit<'_>) -> usize {
    match exit {
        VcpuExit::IoIn(..) => 0,
        VcpuExit::IoOut(..) => 1,
        VcpuExit::MmioRead(..) => 2,
        VcpuExit::MmioWrite(..) => 3,
        VcpuExit::Hlt => 4,
        VcpuExit::Shutdown => 5,
        VcpuExit::SystemEvent(..) => 6,
        VcpuExit::InternalError => 7,
        _ => 8,
    }
}

/// Counts one exit.
pub fn count(exit: &VcpuExit<'_>) {
    static COUNTERS: OnceLock<[&'static Metric; KINDS.len()]> = OnceLock::new();
    let counters = COUNTERS.get_or_init(|| {
        KINDS.map(|kind| {
            register(
                "arkvm_vcpu_exits_total",
                "vCPU exits from KVM_RUN, by kind.",
                MetricKind::Counter,
                &[("kind", kind)],
            )
        })
    });
    counters[kind_index(exit)].inc();
}

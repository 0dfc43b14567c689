//! KVM state: guest memory, the VM and its vCPUs.

pub mod exit_metrics;
pub mod memory;
pub mod throttle;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;

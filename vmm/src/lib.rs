//! arkvm's virtual machine monitor: KVM VM and vCPU state, boot, the builder shared by cold boot and
//! restore, the event loop, and the command line.

pub mod api;
pub mod api_handler;
pub mod arch;
pub mod boot;
pub mod builder;
pub mod capture;
pub mod cli;
pub mod config;
pub mod device_manager;
pub mod dr_checkpoints;
pub mod machine;
pub mod metrics;
pub mod observe;
pub mod restore;
pub mod runtime;
pub mod saved_state;
pub mod seccomp;
pub mod signals;
pub mod vstate;

pub use snapshot::error_chain;

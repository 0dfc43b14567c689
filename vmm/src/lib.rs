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
pub mod devices_setup;
pub mod dr_checkpoints;
pub mod restore;
pub mod runtime;
pub mod vstate;

/// Formats an error and its chain of sources as one line: "what failed: why: why".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let msg = src.to_string();
        if !s.ends_with(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = src.source();
    }
    s
}

//! `arkvm run` and `arkvm restore`: build a VM (cold or from a snapshot), serve its control
//! socket, and run it until it stops.

use std::process::ExitCode;

use super::common::fail;
use super::{RestoreArgs, RunArgs};
use crate::api::ApiServer;
use crate::builder::{build, BuiltVm};
use crate::config::{check_memory, check_vcpus, VmConfig};
use crate::dr_checkpoints::DrConfig;
use crate::restore::from_dir::restore_from_dir;
use crate::runtime::Vmm;
use devices::virtio::block::DiskConfig;

fn bind_api(path: &Option<std::path::PathBuf>) -> Result<Option<ApiServer>, ExitCode> {
    match path {
        None => Ok(None),
        Some(p) => ApiServer::bind(p).map(Some).map_err(|e| fail(&e)),
    }
}

/// Runs a built VM to its end and turns the outcome into the process exit status.
fn run_vm(
    config: VmConfig,
    built: BuiltVm,
    api: Option<ApiServer>,
    restored_from: Option<String>,
    dr: Option<(DrConfig, Option<std::path::PathBuf>)>,
) -> ExitCode {
    let t = built.timings;
    tracing::info!(
        "boot timings: create_vm_us={} memory_us={} load_us={} vcpus_us={}",
        t.create_vm_us,
        t.memory_us,
        t.load_us,
        t.vcpus_us
    );
    let mut vmm = match Vmm::new(config, built, restored_from) {
        Ok(v) => v,
        Err(e) => return fail(&e),
    };
    crate::signals::set_wake_fd(std::os::fd::AsRawFd::as_raw_fd(
        vmm.machine().built.exit.eventfd(),
    ));
    if let Some(api) = api {
        vmm.attach_api(api);
    }
    if let Some((config, staging)) = dr {
        if let Err(e) = vmm.start_dr(&config, staging.as_deref()) {
            eprintln!(
                "arkvm: error: cannot start continuous protection: {}",
                crate::error_chain(&e)
            );
            return ExitCode::from(1);
        }
    }
    match vmm.run() {
        Ok(exit) if exit.is_clean() => ExitCode::SUCCESS,
        Ok(exit) => {
            eprintln!("arkvm: guest stopped: {exit}");
            ExitCode::from(2)
        }
        Err(e) => fail(&e),
    }
}

/// `arkvm run`.
pub fn run(args: RunArgs) -> ExitCode {
    crate::signals::install();
    let memory_bytes = match check_memory(&args.memory) {
        Ok(m) => m,
        Err(e) => return fail(&e),
    };
    let vcpus = match check_vcpus(args.vcpus) {
        Ok(v) => v,
        Err(e) => return fail(&e),
    };
    let mut disks = Vec::with_capacity(args.disks.len());
    for spec in &args.disks {
        match spec.parse::<DiskConfig>() {
            Ok(d) => disks.push(d),
            Err(e) => return fail(&e),
        }
    }
    let config = VmConfig {
        name: args.name,
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        memory_bytes,
        vcpus,
        disks,
    };
    let dr = match &args.dr.dr_target {
        None => None,
        Some(target) => {
            let interval = match crate::dr_checkpoints::parse_interval(&args.dr.dr_interval) {
                Ok(i) => i,
                Err(e) => {
                    eprintln!("arkvm: error: {e}");
                    return ExitCode::from(1);
                }
            };
            let key = match args.dr.key.as_deref().map(std::path::absolute).transpose() {
                Ok(Some(k)) => k,
                Ok(None) => {
                    eprintln!("arkvm: error: --dr-target needs --key FILE");
                    return ExitCode::from(1);
                }
                Err(e) => return fail(&e),
            };
            Some((
                DrConfig {
                    target: target.clone(),
                    interval_ms: interval.as_millis() as u64,
                    key,
                },
                args.dr.dr_staging.clone(),
            ))
        }
    };
    let api = match bind_api(&args.api_socket) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let built = match build(&config, None, Box::new(std::io::stdout())) {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    run_vm(config, built, api, None, dr)
}

/// `arkvm restore`.
pub fn restore(args: RestoreArgs) -> ExitCode {
    crate::signals::install();
    let expect_memory = match args.memory.as_deref().map(check_memory).transpose() {
        Ok(m) => m,
        Err(e) => return fail(&e),
    };
    let api = match bind_api(&args.api_socket) {
        Ok(a) => a,
        Err(code) => return code,
    };
    // A backup point is exported to a snapshot directory first (every chunk checked), which
    // the restored VM's memory then loads from; it is removed when the VM stops.
    let mut exported = None;
    let (dir, label) = match (&args.from, &args.repo, &args.id) {
        (Some(dir), _, _) => (dir.clone(), dir.display().to_string()),
        (None, Some(repo), Some(id)) => {
            let r = match super::common::open_repo(repo, args.key.as_deref()) {
                Ok(r) => r,
                Err(c) => return c,
            };
            let tmp =
                std::env::temp_dir().join(format!("arkvm-restore-{}-{}", std::process::id(), id));
            if let Err(e) = r.export_point(id, &tmp) {
                return fail(&e);
            }
            exported = Some(tmp.clone());
            (tmp, format!("{}#{id}", repo.display()))
        }
        _ => {
            eprintln!("arkvm: error: restore needs --from DIR, or --repo DIR with --id ID");
            return ExitCode::from(1);
        }
    };
    let disk_dir = args.disk_dir.clone().or_else(|| {
        exported.as_ref().map(|_| {
            std::env::temp_dir().join(format!("arkvm-restore-{}-disks", std::process::id()))
        })
    });
    let restored = restore_from_dir(
        &dir,
        expect_memory,
        disk_dir.as_deref(),
        Box::new(std::io::stdout()),
    );
    let (built, state) = match restored {
        Ok(b) => b,
        Err(e) => {
            if let Some(t) = &exported {
                let _ = std::fs::remove_dir_all(t);
            }
            return fail(&e);
        }
    };
    // Everything needed from an exported point is open or copied by now (the memory file stays
    // readable through its open descriptor), so the copy goes at once: even a SIGKILL leaves
    // nothing behind.
    if let Some(t) = &exported {
        if let Err(e) = std::fs::remove_dir_all(t) {
            tracing::warn!("cannot remove the exported point {}: {e}", t.display());
        }
    }
    run_vm(state.config.clone(), built, api, Some(label), None)
}

//! `arkvm run` and `arkvm restore`: build a VM (cold or from a snapshot), serve its control
//! socket, and run it until it stops.

use std::process::ExitCode;

use super::common::fail;
use super::{RestoreArgs, RunArgs};
use crate::api::ApiServer;
use crate::builder::{build, BuiltVm};
use crate::config::{check_memory, check_vcpus, VmConfig};
use crate::dr_checkpoints::DrConfig;
use crate::restore::source::RestoreSource;
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
    if let Err(e) = crate::seccomp::prepare(crate::seccomp::mode_from_env(args.seccomp)) {
        return fail(&e);
    }
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

/// `arkvm restore`: from a snapshot directory (`--from`), or straight from a backup point
/// (`--repo` with `--id`), which is read in place under the repository's shared lock.
pub fn restore(args: RestoreArgs) -> ExitCode {
    crate::signals::install();
    if let Err(e) = crate::seccomp::prepare(crate::seccomp::mode_from_env(args.seccomp)) {
        return fail(&e);
    }
    let expect_memory = match args.memory.as_deref().map(check_memory).transpose() {
        Ok(m) => m,
        Err(e) => return fail(&e),
    };
    let api = match bind_api(&args.api_socket) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let source = match (&args.from, &args.repo, &args.id) {
        (Some(dir), _, _) => RestoreSource::Dir(dir.clone()),
        (None, Some(repo), Some(id)) => match super::common::open_repo(repo, args.key.as_deref()) {
            Ok(r) => RestoreSource::Point {
                repo: r,
                repo_path: repo.clone(),
                id: id.clone(),
            },
            Err(c) => return c,
        },
        _ => {
            eprintln!("arkvm: error: restore needs --from DIR, or --repo DIR with --id ID");
            return ExitCode::from(1);
        }
    };
    let restored = match crate::restore::from_dir::restore(
        source,
        expect_memory,
        args.disk_dir.as_deref(),
        Box::new(std::io::stdout()),
    ) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    run_vm(
        restored.state.config.clone(),
        restored.built,
        api,
        Some(restored.label),
        None,
    )
}

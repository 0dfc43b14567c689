//! `arkvm run` and `arkvm restore`: build a VM (cold or from a snapshot), serve its control
//! socket, and run it until it stops.

use std::process::ExitCode;

use super::common::fail;
use super::{RestoreArgs, RunArgs};
use crate::api::ApiServer;
use crate::builder::{build, BuiltVm};
use crate::capture::staging::StagingSize;
use crate::config::{check_memory, check_vcpus, VmConfig};
use crate::dr_checkpoints::DrConfig;
use crate::restore::source::RestoreSource;
use crate::runtime::Vmm;
use crate::vstate::vcpu::GuestExit;
use devices::virtio::block::DiskConfig;
use devices::virtio::net::NetConfig;

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
    cow_staging: Option<StagingSize>,
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
    if let Some(size) = cow_staging {
        vmm.set_cow_staging(size);
    }
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
        Ok(exit @ GuestExit::RestoreFailed { .. }) => {
            eprintln!("arkvm: error: {exit}");
            super::exit::code(super::exit::GUEST_CRASH)
        }
        Ok(exit) => {
            eprintln!("arkvm: guest stopped: {exit}");
            super::exit::code(super::exit::GUEST_CRASH)
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
    let cow_staging = match args.capture.cow_staging() {
        Ok(c) => c,
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
    let mut nets = Vec::with_capacity(args.nets.len());
    for spec in &args.nets {
        match spec.parse::<NetConfig>() {
            Ok(n) => nets.push(n),
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
        nets,
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
                    output_commit: args.dr.dr_output_commit,
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
    run_vm(config, built, api, None, dr, cow_staging)
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
    let fetch_retry = match crate::dr_checkpoints::parse_interval(&args.fetch_timeout) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("arkvm: error: --fetch-timeout: {e}");
            return ExitCode::from(1);
        }
    };
    let rate = match args.hydrate_rate.as_deref().map(parse_rate).transpose() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("arkvm: error: --hydrate-rate: {e}");
            return ExitCode::from(1);
        }
    };
    // What killed restores left behind (their process is gone).
    crate::restore::disk_hydration::cleanup_stale();
    let cow_staging = match args.capture.cow_staging() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let api = match bind_api(&args.api_socket) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let source = match (&args.from, &args.repo, &args.id) {
        (Some(dir), _, _) => RestoreSource::Dir(dir.clone()),
        (None, Some(repo), Some(id)) => match super::common::open_repo(repo, args.key.as_deref()) {
            Ok(r) => match r.resolve_point(id, None) {
                Ok(id) => RestoreSource::Point {
                    repo: r,
                    repo_path: repo.clone(),
                    id,
                },
                Err(e) => return fail(&e),
            },
            Err(c) => return c,
        },
        _ => {
            eprintln!("arkvm: error: restore needs --from DIR, or --repo DIR with --id ID");
            return ExitCode::from(1);
        }
    };
    let mut net_overrides = Vec::with_capacity(args.nets.len());
    for spec in &args.nets {
        match devices::virtio::net::parse_options(spec) {
            Ok(n) if n.id.is_some() && !n.tap.is_empty() && n.mac.is_none() => {
                net_overrides.push(n)
            }
            Ok(_) => {
                eprintln!("arkvm: error: restore --net takes id=NAME,tap=IFNAME, got '{spec}'");
                return ExitCode::from(1);
            }
            Err(e) => return fail(&e),
        }
    }
    let restored = match crate::restore::from_dir::restore(
        source,
        expect_memory,
        &net_overrides,
        args.disk_dir.as_deref(),
        crate::restore::from_dir::DiskOptions { fetch_retry, rate },
        Box::new(std::io::stdout()),
    ) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let hydration = restored.built.disk_hydration.clone();
    let bar = hydration.clone().and_then(super::hydrate_bar::start);
    let code = run_vm(
        restored.state.config.clone(),
        restored.built,
        api,
        Some(restored.label),
        None,
        cow_staging,
    );
    drop(bar);
    if let Some(h) = hydration {
        h.finish();
    }
    code
}

/// Parses a rate in bytes per second: a number with an optional K, M or G suffix (powers of
/// 1024).
fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid rate '{text}': use e.g. 512K, 50M or 1G"))?;
    let shift = match unit {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        _ => return Err(format!("invalid rate '{text}': use e.g. 512K, 50M or 1G")),
    };
    n.checked_shl(shift)
        .filter(|v| *v > 0 && v >> shift == n)
        .ok_or_else(|| format!("invalid rate '{text}'"))
}

//! The VMM side of the control API: what each request does to the running VM. This is the one
//! place where the typed results of the machine, the snapshot engine and continuous protection
//! become HTTP statuses and bodies.

use crate::api::{
    ApiRequest, ApiResponse, DiskHydrationInfo, DiskInfo, SnapshotStarted, VmConfigInfo, VmInfo,
    VmState,
};
use crate::capture::CaptureEngine;
use crate::dr_checkpoints::{DrControl, DrControlError};
use crate::machine::{Machine, RunState};
use crate::vstate::vcpu::GuestExit;

/// The parts of the VMM a request may act on.
pub struct ApiContext<'a> {
    pub machine: &'a mut Machine,
    pub engine: &'a mut CaptureEngine,
    pub dr: &'a mut DrControl,
}

fn vm_info(machine: &Machine) -> VmInfo {
    VmInfo {
        state: match machine.state() {
            RunState::Running => VmState::Running,
            RunState::Paused => VmState::Paused,
        },
        config: VmConfigInfo {
            vcpus: machine.config.vcpus,
            memory_bytes: machine.config.memory_bytes,
            kernel: machine
                .restored_from
                .is_none()
                .then(|| machine.config.kernel.clone()),
            initrd: machine.config.initrd.clone(),
            cmdline: Some(machine.config.cmdline.clone()),
            disks: machine
                .built
                .devices
                .info()
                .into_iter()
                .filter_map(|d| d.disk)
                .map(|d| DiskInfo {
                    path: d.path,
                    read_only: d.read_only,
                })
                .collect(),
            restored_from: machine.restored_from.clone(),
        },
        disk_hydration: machine.built.disk_hydration.as_ref().map(|h| {
            let t = h.totals();
            DiskHydrationInfo {
                bytes_done: t.bytes_done,
                bytes_total: t.bytes_total,
                done: t.done,
                error: t.error,
                dir: t.dir,
                temporary: h.is_temporary(),
                elapsed_ms: t.elapsed_ms,
            }
        }),
        memory_loader: machine.memory_loader.as_ref().map(|p| p.info()),
        net: machine.built.devices.net_info(),
    }
}

/// The HTTP answer to a refused DR start or stop.
fn dr_error(e: &DrControlError) -> ApiResponse {
    match e {
        DrControlError::AlreadyRunning | DrControlError::NotRunning => ApiResponse::conflict(e),
        DrControlError::Setup(_) => ApiResponse::bad_request(snapshot::error_chain(e)),
    }
}

/// Does what `request` asks and says how it went.
pub fn handle_request(ctx: ApiContext<'_>, request: ApiRequest) -> ApiResponse {
    let ApiContext {
        machine,
        engine,
        dr,
    } = ctx;
    let busy = engine.is_busy();
    match request {
        ApiRequest::GetRoot => ApiResponse::root(&crate::observe::root_info(machine)),
        ApiRequest::GetMetrics => {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            ApiResponse::metrics(crate::observe::metrics_text(machine, &dr.status(), now_ms))
        }
        ApiRequest::GetVm => ApiResponse::vm(&vm_info(machine)),
        ApiRequest::PauseVm => {
            if busy {
                return ApiResponse::conflict("a snapshot is running; pause after it ends");
            }
            if machine.state() == RunState::Paused {
                return ApiResponse::conflict("the VM is already paused");
            }
            match machine.pause() {
                Ok(_) => ApiResponse::no_content(),
                Err(e) => ApiResponse::internal(snapshot::error_chain(&e)),
            }
        }
        ApiRequest::ResumeVm => {
            if engine.holds_vcpus_paused() {
                return ApiResponse::conflict(
                    "a paused snapshot is running; the VM resumes when it ends",
                );
            }
            if machine.state() == RunState::Running {
                return ApiResponse::conflict("the VM is already running");
            }
            match machine.resume() {
                Ok(()) => ApiResponse::no_content(),
                Err(e) => ApiResponse::internal(snapshot::error_chain(&e)),
            }
        }
        ApiRequest::ShutdownVm => {
            machine.built.exit.report(GuestExit::Requested);
            ApiResponse::no_content()
        }
        ApiRequest::CreateSnapshot(params) => match engine.start(machine, &params.into()) {
            Ok(id) => {
                crate::capture::metrics::snapshot_started();
                ApiResponse::snapshot_started(&SnapshotStarted { id })
            }
            Err(e) if e.is_conflict() => ApiResponse::conflict(snapshot::error_chain(&e)),
            Err(e) => ApiResponse::bad_request(snapshot::error_chain(&e)),
        },
        ApiRequest::GetSnapshot => match engine.status() {
            Some(s) => ApiResponse::snapshot(&s),
            None => ApiResponse::not_found("no snapshot has been taken yet"),
        },
        ApiRequest::CancelSnapshot => {
            if engine.cancel() {
                ApiResponse::no_content()
            } else {
                ApiResponse::conflict("no snapshot is running")
            }
        }
        ApiRequest::StartDr(params) => match dr.start(&params.into(), None, &machine.config.name) {
            Ok(status) => ApiResponse::dr_started(&status),
            Err(e) => dr_error(&e),
        },
        ApiRequest::StopDr => match dr.stop() {
            Ok(_) => ApiResponse::no_content(),
            Err(e) => dr_error(&e),
        },
        ApiRequest::GetDr => ApiResponse::dr(&dr.status()),
    }
}

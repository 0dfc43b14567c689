//! The VMM side of the control API: what each request does to the running VM, and the
//! snapshot job's life cycle as the event loop sees it.

use std::time::Instant;

use crate::api::{
    ApiCall, ApiRequest, ApiResponse, SnapshotMode, SnapshotParams, SnapshotStarted,
    SnapshotTarget, VmConfigInfo, VmInfo, VmState,
};
use crate::capture::paused::start_paused;
use crate::capture::progress::Progress;
use crate::capture::target::open_target;
use crate::capture::CaptureError;
use crate::runtime::{RunState, Vmm};
use crate::vstate::vcpu::GuestExit;

impl Vmm {
    /// Answers every queued API call.
    pub(crate) fn serve_api(&mut self) {
        loop {
            let Some(call) = self.api.as_ref().and_then(|a| a.try_recv()) else {
                return;
            };
            let ApiCall { request, responder } = call;
            let response = self.handle_request(request);
            responder.respond(response);
        }
    }

    fn vm_info(&self) -> VmInfo {
        VmInfo {
            state: match self.state() {
                RunState::Running => VmState::Running,
                RunState::Paused => VmState::Paused,
            },
            config: VmConfigInfo {
                vcpus: self.config.vcpus,
                memory_bytes: self.config.memory_bytes,
                kernel: self
                    .restored_from
                    .is_none()
                    .then(|| self.config.kernel.clone()),
                initrd: self.config.initrd.clone(),
                cmdline: Some(self.config.cmdline.clone()),
                disks: Vec::new(),
                restored_from: self.restored_from.clone(),
            },
        }
    }

    fn handle_request(&mut self, request: ApiRequest) -> ApiResponse {
        let busy = self.snapshot.is_some();
        match request {
            ApiRequest::GetVm => ApiResponse::vm(&self.vm_info()),
            ApiRequest::PauseVm => {
                if busy {
                    return ApiResponse::conflict("a snapshot is running; pause after it ends");
                }
                if self.state() == RunState::Paused {
                    return ApiResponse::conflict("the VM is already paused");
                }
                match self.pause() {
                    Ok(_) => ApiResponse::no_content(),
                    Err(e) => ApiResponse::internal(crate::error_chain(&e)),
                }
            }
            ApiRequest::ResumeVm => {
                if self.snapshot.as_ref().is_some_and(|j| j.resume_on_finish) {
                    return ApiResponse::conflict(
                        "a paused snapshot is running; the VM resumes when it ends",
                    );
                }
                if self.state() == RunState::Running {
                    return ApiResponse::conflict("the VM is already running");
                }
                match self.resume() {
                    Ok(()) => ApiResponse::no_content(),
                    Err(e) => ApiResponse::internal(crate::error_chain(&e)),
                }
            }
            ApiRequest::ShutdownVm => {
                self.built.exit.report(GuestExit::Requested);
                ApiResponse::no_content()
            }
            ApiRequest::CreateSnapshot(params) => {
                if busy {
                    return ApiResponse::conflict("a snapshot is already running");
                }
                self.start_snapshot(params)
            }
            ApiRequest::GetSnapshot => match self.snapshot.as_ref().map(|j| &j.progress) {
                Some(p) => ApiResponse::snapshot(&p.status()),
                None => match &self.last_snapshot {
                    Some(p) => ApiResponse::snapshot(&p.status()),
                    None => ApiResponse::not_found("no snapshot has been taken yet"),
                },
            },
            ApiRequest::CancelSnapshot => match &self.snapshot {
                Some(job) => {
                    job.cancel();
                    ApiResponse::no_content()
                }
                None => ApiResponse::conflict("no snapshot is running"),
            },
            ApiRequest::StartDr(params) => self.start_dr(&params, None),
            ApiRequest::StopDr => self.stop_dr(),
            ApiRequest::GetDr => self.dr_status(),
        }
    }

    pub(crate) fn start_snapshot(&mut self, params: SnapshotParams) -> ApiResponse {
        let out = match open_target(self, &params.target, params.key.as_deref()) {
            Ok(o) => o,
            Err(e @ CaptureError::Snapshot(snapshot::SnapshotError::Exists { .. })) => {
                return ApiResponse::conflict(crate::error_chain(&e))
            }
            Err(e) => return ApiResponse::bad_request(crate::error_chain(&e)),
        };
        self.snapshot_count += 1;
        let id = format!("snap-{}", self.snapshot_count);
        let progress = Progress::new(&id, params.mode, params.strategy);
        let started = match params.mode {
            SnapshotMode::Paused => start_paused(self, out, progress, self.snapshot_done.clone()),
            SnapshotMode::Live => crate::capture::live::start_live(
                self,
                out,
                params.strategy,
                progress,
                self.snapshot_done.clone(),
            ),
        };
        match started {
            Ok(job) => {
                self.backup_parent_pending = matches!(params.target, SnapshotTarget::Repo(_));
                self.snapshot = Some(job);
                ApiResponse::snapshot_started(&SnapshotStarted { id })
            }
            Err(
                e @ crate::capture::CaptureError::Snapshot(snapshot::SnapshotError::Exists {
                    ..
                }),
            ) => ApiResponse::conflict(crate::error_chain(&e)),
            Err(e) => ApiResponse::bad_request(crate::error_chain(&e)),
        }
    }

    /// Finishes the snapshot job once its worker has ended: resume the vCPUs of a paused
    /// snapshot, then publish the outcome.
    pub(crate) fn poll_snapshot(&mut self) {
        self.poll_final_pause();
        let finished = self.snapshot.as_ref().is_some_and(|j| j.worker_done());
        if !finished {
            return;
        }
        let Some(mut job) = self.snapshot.take() else {
            return;
        };
        let result = job.join();
        let is_repo = self.backup_parent_pending;
        self.backup_parent_pending = false;
        let mut outcome = match result {
            Ok(committed) => {
                if is_repo {
                    // The tracking armed at this point's instant now belongs to it.
                    self.backup_parent = committed.point_id.clone();
                }
                if let Some(id) = &committed.point_id {
                    job.progress.update(|s| s.id = id.clone());
                }
                tracing::info!("snapshot stored as {}", committed.name);
                Ok(())
            }
            Err(e) => {
                if is_repo {
                    self.backup_parent = None;
                }
                Err(crate::error_chain(&e))
            }
        };
        if job.resume_on_finish {
            if let Err(e) = self.resume() {
                outcome = Err(format!(
                    "the snapshot ended but the VM did not resume: {}",
                    crate::error_chain(&e)
                ));
            }
        }
        if let Some(at) = job.paused_at {
            let us = at.elapsed().as_micros() as u64;
            job.progress.update(|s| {
                if s.pause_us.is_none() {
                    s.pause_us = Some(us);
                }
            });
        }
        self.finish_live(&mut job);
        if self.dr_checkpoint_running {
            let st = job.progress.status();
            let point = outcome.is_ok().then(|| st.id.clone());
            self.dr_checkpoint_done(point, st.pause_us.unwrap_or(0), outcome.clone().err());
        }
        let cancelled = job.is_cancelled();
        match &outcome {
            Ok(()) => tracing::info!("snapshot {} done", job.progress.status().id),
            Err(e) => tracing::warn!("snapshot {} ended: {e}", job.progress.status().id),
        }
        job.progress.finish(outcome, cancelled);
        self.last_snapshot = Some(job.progress.clone());
    }

    /// Cancels and waits for a running snapshot (the VM is stopping).
    pub(crate) fn stop_snapshot(&mut self) {
        if let Some(job) = &self.snapshot {
            job.cancel();
            let deadline = Instant::now() + std::time::Duration::from_secs(30);
            while !job.worker_done() && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            self.poll_snapshot();
        }
    }
}

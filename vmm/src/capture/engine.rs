//! The snapshot engine: the one owner of the snapshot job's life cycle (start, poll, cancel,
//! stop, last status) and of the change tracking shared between snapshots. The event loop owns
//! one [`CaptureEngine`] and polls it; callers get typed results and errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::error::CaptureError;
use super::job::SnapshotJob;
use super::live_cow::CowCapture;
use super::paused::PausedCapture;
use super::precopy::PrecopyCapture;
use super::progress::Progress;
use super::request::{SnapshotMode, SnapshotRequest, SnapshotStrategy};
use super::sink::SnapshotOut;
use super::staging::StagingSize;
use super::status::SnapshotStatus;
use super::strategy::{CaptureContext, CaptureStrategy};
use super::tracking::ChangeTracking;
use super::vm::CaptureVm;

/// How long [`CaptureEngine::stop`] waits for a cancelled worker.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// The strategy that takes a snapshot of `mode` with `strategy`: the one registration point.
fn strategy_for(mode: SnapshotMode, strategy: SnapshotStrategy) -> &'static dyn CaptureStrategy {
    match (mode, strategy) {
        (SnapshotMode::Paused, _) => &PausedCapture,
        (SnapshotMode::Live, SnapshotStrategy::Cow) => &CowCapture,
        (SnapshotMode::Live, SnapshotStrategy::Precopy) => &PrecopyCapture,
    }
}

/// How a snapshot ended, for whoever started it.
#[derive(Debug)]
pub struct SnapshotEnded {
    /// The snapshot's id: the backup point id for a committed backup, else `snap-N`.
    pub id: String,
    /// How long the vCPUs were paused for it, in microseconds (0 if unknown).
    pub pause_us: u64,
    /// Ok, or why it failed or was cancelled.
    pub result: Result<(), CaptureError>,
}

/// Snapshots of one VM, one at a time.
pub struct CaptureEngine {
    job: Option<SnapshotJob>,
    last: Option<Progress>,
    done: Arc<EventFd>,
    count: u64,
    tracking: ChangeTracking,
}

impl CaptureEngine {
    /// An engine with no snapshot running.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            job: None,
            last: None,
            done: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
            count: 0,
            tracking: ChangeTracking::default(),
        })
    }

    /// Bounds the copy-on-write staging pool before the first live snapshot.
    pub fn set_cow_staging(&mut self, size: StagingSize) {
        self.tracking.set_cow_staging(size);
    }

    /// The event fd written when a snapshot's worker ends or needs the event loop; the event
    /// loop watches it and then calls [`Self::poll`].
    pub fn wake_evt(&self) -> &Arc<EventFd> {
        &self.done
    }

    /// Whether a snapshot is running.
    pub fn is_busy(&self) -> bool {
        self.job.is_some()
    }

    /// Whether a running paused snapshot holds the vCPUs paused until it ends.
    pub fn holds_vcpus_paused(&self) -> bool {
        self.job.as_ref().is_some_and(|j| j.resume_on_finish)
    }

    /// Starts a snapshot; returns its id.
    pub fn start(
        &mut self,
        vm: &mut dyn CaptureVm,
        request: &SnapshotRequest,
    ) -> Result<String, CaptureError> {
        if self.job.is_some() {
            return Err(CaptureError::Busy);
        }
        let out = SnapshotOut::open(
            &request.target,
            request.key.as_deref(),
            request.compression,
            vm.name(),
        )?;
        self.count += 1;
        let id = format!("snap-{}", self.count);
        let progress = Progress::new(&id, request.mode, request.strategy);
        self.tracking.starting(out.is_backup());
        let started = strategy_for(request.mode, request.strategy).start(CaptureContext {
            vm,
            tracking: &mut self.tracking,
            out,
            progress,
            done: self.done.clone(),
        });
        let job = started.inspect_err(|_| self.tracking.not_started())?;
        self.job = Some(job);
        Ok(id)
    }

    /// The running snapshot's progress, else the last one's outcome; None if none was taken.
    pub fn status(&self) -> Option<SnapshotStatus> {
        self.job
            .as_ref()
            .map(|j| &j.progress)
            .or(self.last.as_ref())
            .map(Progress::status)
    }

    /// Asks the running snapshot to stop; returns false when none is running.
    pub fn cancel(&self) -> bool {
        match &self.job {
            Some(job) => {
                job.cancel();
                true
            }
            None => false,
        }
    }

    /// Does what the running snapshot needs from the event loop, and finishes it once its
    /// worker has ended: resumes the vCPUs of a paused snapshot, merges the disk overlays back,
    /// and publishes the outcome.
    pub fn poll(&mut self, vm: &mut dyn CaptureVm) -> Option<SnapshotEnded> {
        if let Some(job) = &mut self.job {
            job.poll_loop_work(vm);
        }
        if !self.job.as_ref().is_some_and(|j| j.worker_done()) {
            return None;
        }
        let mut job = self.job.take()?;
        let committed = job.join();
        self.tracking.ended(committed.as_ref());
        let mut result = match committed {
            Ok(committed) => {
                if let Some(id) = &committed.point_id {
                    job.progress.update(|s| s.id = id.clone());
                }
                tracing::info!("snapshot stored as {}", committed.name);
                Ok(())
            }
            Err(e) => Err(e),
        };
        if job.resume_on_finish {
            if let Err(e) = vm.resume() {
                result = Err(CaptureError::NotResumed(Box::new(e)));
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
        vm.merge_disk_overlays();
        let status = job.progress.status();
        let cancelled = job.is_cancelled();
        match &result {
            Ok(()) => tracing::info!("snapshot {} done", status.id),
            Err(e) => tracing::warn!("snapshot {} ended: {}", status.id, snapshot::error_chain(e)),
        }
        job.progress.finish(
            result
                .as_ref()
                .map(|_| ())
                .map_err(|e| snapshot::error_chain(e)),
            cancelled,
        );
        self.last = Some(job.progress.clone());
        super::metrics::snapshot_ended(&job.progress.status());
        Some(SnapshotEnded {
            id: status.id,
            pause_us: status.pause_us.unwrap_or(0),
            result,
        })
    }

    /// Cancels and waits for a running snapshot (the VM is stopping).
    pub fn stop(&mut self, vm: &mut dyn CaptureVm) -> Option<SnapshotEnded> {
        let job = self.job.as_ref()?;
        job.cancel();
        let deadline = Instant::now() + STOP_WAIT;
        while !job.worker_done() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.poll(vm)
    }
}

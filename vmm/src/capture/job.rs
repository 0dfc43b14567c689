//! A snapshot in progress: the worker thread that copies and commits, what the event loop must
//! do when it ends (resume the vCPUs of a paused snapshot), and any work the strategy needs done
//! on the event loop's thread while it runs (the final pause of a pre-copy snapshot).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::error::CaptureError;
use super::progress::Progress;
use super::sink::Committed;
use super::vm::CaptureVm;

/// Work a running snapshot needs from the thread that owns the vCPUs.
pub trait LoopWork {
    /// Called on every poll of the job; returns true once there is nothing left to do.
    fn poll(&mut self, vm: &mut dyn CaptureVm, progress: &Progress) -> bool;
}

/// A running snapshot.
pub struct SnapshotJob {
    pub progress: Progress,
    cancel: Arc<AtomicBool>,
    worker: Option<JoinHandle<Result<Committed, CaptureError>>>,
    /// Set for a paused snapshot: the vCPUs stay paused until the worker ends.
    pub resume_on_finish: bool,
    /// When the vCPUs were paused, while they still are.
    pub paused_at: Option<Instant>,
    /// What the event loop must do for the worker while it runs.
    loop_work: Option<Box<dyn LoopWork>>,
}

impl SnapshotJob {
    /// Starts `work` on a worker thread; `done` is written when it ends.
    pub fn spawn(
        progress: Progress,
        cancel: Arc<AtomicBool>,
        done: Arc<EventFd>,
        work: impl FnOnce() -> Result<Committed, CaptureError> + Send + 'static,
    ) -> std::io::Result<Self> {
        let worker = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadKind::Capture);
                let r = work();
                if let Err(e) = done.write(1) {
                    tracing::error!("cannot signal the end of a snapshot: {e}");
                }
                r
            })?;
        Ok(Self {
            progress,
            cancel,
            worker: Some(worker),
            resume_on_finish: false,
            paused_at: None,
            loop_work: None,
        })
    }

    /// Records that the vCPUs stay paused since `paused_at` until the worker ends; with
    /// `resume`, the event loop resumes them then.
    pub fn paused_since(mut self, paused_at: Instant, resume: bool) -> Self {
        self.resume_on_finish = resume;
        self.paused_at = Some(paused_at);
        self
    }

    /// Has the event loop run `work` while the worker runs.
    pub fn with_loop_work(mut self, work: Box<dyn LoopWork>) -> Self {
        self.loop_work = Some(work);
        self
    }

    /// Runs the loop work, if any is left.
    pub fn poll_loop_work(&mut self, vm: &mut dyn CaptureVm) {
        if let Some(w) = &mut self.loop_work {
            if w.poll(vm, &self.progress) {
                self.loop_work = None;
            }
        }
    }

    /// Asks the worker to stop; the snapshot then ends as cancelled and leaves nothing behind.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Whether cancel was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Whether the worker has ended.
    pub fn worker_done(&self) -> bool {
        self.worker.as_ref().is_none_or(|w| w.is_finished())
    }

    /// Joins the worker and returns its outcome.
    pub fn join(&mut self) -> Result<Committed, CaptureError> {
        match self.worker.take() {
            Some(w) => w.join().unwrap_or(Err(CaptureError::WorkerPanicked)),
            None => Err(CaptureError::WorkerPanicked),
        }
    }
}

//! A snapshot in progress: the worker thread that copies and commits, and what the event loop
//! must do when it ends (resume the vCPUs of a paused snapshot, merge disk overlays back).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::progress::Progress;
use super::sink::Committed;
use super::CaptureError;

/// A running snapshot.
pub struct SnapshotJob {
    pub progress: Progress,
    cancel: Arc<AtomicBool>,
    worker: Option<JoinHandle<Result<Committed, CaptureError>>>,
    done: Arc<EventFd>,
    /// Set for a paused snapshot: the vCPUs stay paused until the worker ends.
    pub resume_on_finish: bool,
    /// When the vCPUs were paused, while they still are.
    pub paused_at: Option<Instant>,
    /// For pre-copy: how the worker asks the event loop for the final pause.
    pub final_pause: Option<super::precopy::FinalPauseLink>,
}

impl SnapshotJob {
    /// Starts `work` on a worker thread; `done` is written when it ends.
    pub fn spawn(
        progress: Progress,
        cancel: Arc<AtomicBool>,
        done: Arc<EventFd>,
        resume_on_finish: bool,
        paused_at: Option<Instant>,
        work: impl FnOnce() -> Result<Committed, CaptureError> + Send + 'static,
    ) -> std::io::Result<Self> {
        let done_w = done.clone();
        let worker = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                let r = work();
                if let Err(e) = done_w.write(1) {
                    tracing::error!("cannot signal the end of a snapshot: {e}");
                }
                r
            })?;
        Ok(Self {
            progress,
            cancel,
            worker: Some(worker),
            done,
            resume_on_finish,
            paused_at,
            final_pause: None,
        })
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

    /// The event fd written when the worker ends.
    pub fn done_evt(&self) -> &Arc<EventFd> {
        &self.done
    }

    /// Joins the worker and returns its outcome.
    pub fn join(&mut self) -> Result<Committed, CaptureError> {
        match self.worker.take() {
            Some(w) => w.join().unwrap_or(Err(CaptureError::WorkerPanicked)),
            None => Err(CaptureError::WorkerPanicked),
        }
    }
}

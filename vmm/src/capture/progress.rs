//! Progress and outcome of a snapshot, shared between the threads doing it and the API.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use snapshot::lock;

use super::request::{SnapshotMode, SnapshotStrategy};
use super::status::{SnapshotState, SnapshotStatus};

/// A shared, updatable snapshot status.
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Mutex<SnapshotStatus>>,
    started: Instant,
}

impl Progress {
    /// Starts the status of snapshot `id`.
    pub fn new(id: &str, mode: SnapshotMode, strategy: SnapshotStrategy) -> Self {
        Self {
            inner: Arc::new(Mutex::new(SnapshotStatus {
                id: id.to_string(),
                state: SnapshotState::Running,
                mode,
                strategy,
                bytes_written: 0,
                bytes_total: 0,
                pause_us: None,
                total_ms: 0,
                pages_copied_early: 0,
                pages_recopied: 0,
                precopy_rounds: None,
                precopy_converged: None,
                cow: None,
                precopy: None,
                error: None,
            })),
            started: Instant::now(),
        }
    }

    /// Changes the status.
    pub fn update(&self, f: impl FnOnce(&mut SnapshotStatus)) {
        f(&mut lock(&self.inner));
    }

    /// A copy of the status, with the elapsed time filled in while it runs.
    pub fn status(&self) -> SnapshotStatus {
        let mut s = lock(&self.inner).clone();
        if s.state == SnapshotState::Running {
            s.total_ms = self.started.elapsed().as_millis() as u64;
        }
        s
    }

    /// Whether the snapshot is over.
    pub fn is_finished(&self) -> bool {
        lock(&self.inner).state != SnapshotState::Running
    }

    /// Ends the status with `outcome`.
    pub fn finish(&self, outcome: Result<(), String>, cancelled: bool) {
        let total = self.started.elapsed().as_millis() as u64;
        self.update(|s| {
            s.total_ms = total;
            match outcome {
                Ok(()) => s.state = SnapshotState::Done,
                Err(e) => {
                    s.state = if cancelled {
                        SnapshotState::Cancelled
                    } else {
                        SnapshotState::Failed
                    };
                    s.error = Some(e);
                }
            }
        });
    }
}

//! Progress and outcome of a snapshot, shared between the thread doing it and whoever asks.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

/// Where a snapshot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotPhase {
    Running,
    Done,
    Failed,
    Cancelled,
}

/// What a snapshot reports: while it runs, and when it is over.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotReport {
    pub id: u64,
    pub phase: SnapshotPhase,
    pub mode: String,
    pub target: String,
    /// How long the vCPUs were paused, in microseconds.
    pub pause_us: u64,
    /// Total time so far (or in all), in milliseconds.
    pub total_ms: u64,
    /// Bytes handed to the snapshot so far.
    pub bytes_written: u64,
    /// Bytes the snapshot will write in all (memory plus disks).
    pub bytes_total: u64,
    /// Pages copied ahead of the background copy because the guest wrote them (cow).
    pub pages_copied_early: u64,
    /// Pages copied again because the guest dirtied them (precopy).
    pub pages_recopied: u64,
    /// Precopy rounds run.
    pub rounds: u32,
    /// Whether precopy converged before its round limit.
    pub converged: bool,
    pub error: Option<String>,
}

/// A shared, updatable report.
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Mutex<SnapshotReport>>,
    started: Instant,
}

impl Progress {
    /// Starts the report of snapshot `id`.
    pub fn new(id: u64, mode: &str, target: &str) -> Self {
        Self {
            inner: Arc::new(Mutex::new(SnapshotReport {
                id,
                phase: SnapshotPhase::Running,
                mode: mode.to_string(),
                target: target.to_string(),
                pause_us: 0,
                total_ms: 0,
                bytes_written: 0,
                bytes_total: 0,
                pages_copied_early: 0,
                pages_recopied: 0,
                rounds: 0,
                converged: true,
                error: None,
            })),
            started: Instant::now(),
        }
    }

    /// Changes the report.
    pub fn update(&self, f: impl FnOnce(&mut SnapshotReport)) {
        let mut r = self.inner.lock().expect("progress lock poisoned");
        f(&mut r);
        if r.phase == SnapshotPhase::Running {
            r.total_ms = self.started.elapsed().as_millis() as u64;
        }
    }

    /// A copy of the report.
    pub fn report(&self) -> SnapshotReport {
        let mut r = self.inner.lock().expect("progress lock poisoned").clone();
        if r.phase == SnapshotPhase::Running {
            r.total_ms = self.started.elapsed().as_millis() as u64;
        }
        r
    }

    /// Ends the report with `outcome`.
    pub fn finish(&self, outcome: Result<(), String>, cancelled: bool) {
        let total = self.started.elapsed().as_millis() as u64;
        self.update(|r| {
            r.total_ms = total;
            match outcome {
                Ok(()) => r.phase = SnapshotPhase::Done,
                Err(e) => {
                    r.phase = if cancelled {
                        SnapshotPhase::Cancelled
                    } else {
                        SnapshotPhase::Failed
                    };
                    r.error = Some(e);
                }
            }
        });
    }
}

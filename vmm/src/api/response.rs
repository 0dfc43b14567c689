//! The answers of the control API: [`ApiResponse`] (an HTTP status and a JSON body) and the
//! typed bodies the VMM fills in.

use std::fmt::Display;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::capture::{SnapshotState, SnapshotStatus};
pub use crate::dr_checkpoints::{DrCheckpoint, DrState, DrStatus};

/// The VMM's answer to one `ApiRequest`: an HTTP status and a JSON body (none for 204).
/// Build it with the constructor that names the body; errors carry `{"error": "<sentence>"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    status: u16,
    body: Option<serde_json::Value>,
    /// A plain-text body instead of JSON (`GET /metrics`).
    text: Option<String>,
}

impl ApiResponse {
    fn with_body<T: Serialize>(status: u16, body: &T) -> Self {
        match serde_json::to_value(body) {
            Ok(value) => ApiResponse {
                status,
                body: Some(value),
                text: None,
            },
            // The bodies are plain structs with string keys, so this does not happen; if it
            // ever does, the client learns why instead of the server panicking.
            Err(e) => Self::internal(format!("the response could not be encoded: {e}")),
        }
    }

    /// 200 with the VM's state and configuration (`GET /vm`).
    pub fn vm(info: &VmInfo) -> Self {
        Self::with_body(200, info)
    }

    /// 202 with the id of the snapshot just started (`PUT /snapshot`).
    pub fn snapshot_started(started: &SnapshotStarted) -> Self {
        Self::with_body(202, started)
    }

    /// 200 with the progress or outcome of a snapshot (`GET /snapshot`).
    pub fn snapshot(status: &SnapshotStatus) -> Self {
        Self::with_body(200, status)
    }

    /// 202 with the DR status right after starting it (`PUT /dr`).
    pub fn dr_started(status: &DrStatus) -> Self {
        Self::with_body(202, status)
    }

    /// 200 with the DR status (`GET /dr`).
    pub fn dr(status: &DrStatus) -> Self {
        Self::with_body(200, status)
    }

    /// 204: done, nothing to say (pause, resume, shutdown, cancel, stop DR).
    pub fn no_content() -> Self {
        ApiResponse {
            status: 204,
            body: None,
            text: None,
        }
    }

    /// 200 with the metrics in the Prometheus text format (`GET /metrics`).
    pub fn metrics(text: String) -> Self {
        ApiResponse {
            status: 200,
            body: None,
            text: Some(text),
        }
    }

    /// 200 with the version and the VM's state (`GET /`).
    pub fn root(info: &RootInfo) -> Self {
        Self::with_body(200, info)
    }

    /// An error with `status` (4xx or 5xx; anything else becomes 500) and a one-sentence message.
    pub fn error(status: u16, message: impl Display) -> Self {
        let status = if (400..600).contains(&status) {
            status
        } else {
            500
        };
        Self::with_body(
            status,
            &ErrorBody {
                error: message.to_string(),
            },
        )
    }

    /// 400: the request is valid HTTP and JSON, but the VMM cannot accept it as given.
    pub fn bad_request(message: impl Display) -> Self {
        Self::error(400, message)
    }

    /// 404: the thing asked about does not exist (e.g. no snapshot was ever taken).
    pub fn not_found(message: impl Display) -> Self {
        Self::error(404, message)
    }

    /// 409: the request conflicts with the VM's state (resume while running, a second snapshot
    /// while one runs, ...).
    pub fn conflict(message: impl Display) -> Self {
        Self::error(409, message)
    }

    /// 500: the VMM failed to do what was asked.
    pub fn internal(message: impl Display) -> Self {
        Self::error(500, message)
    }

    /// 503: the VMM cannot take requests now (e.g. it is shutting down).
    pub fn unavailable(message: impl Display) -> Self {
        Self::error(503, message)
    }

    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The JSON body, if any.
    pub fn body(&self) -> Option<&serde_json::Value> {
        self.body.as_ref()
    }

    /// The plain-text body, if the answer is text.
    pub fn text(&self) -> Option<&str> {
        self.text.as_deref()
    }
}

/// The body of `GET /`: what answers on the socket, and the VM's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootInfo {
    /// Always `arkvm`.
    pub name: String,
    /// arkvm's version.
    pub version: String,
    /// The VM's run state.
    pub state: VmState,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One sentence saying what went wrong.
    pub error: String,
}

/// The run state of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The vCPUs are running the guest.
    Running,
    /// The vCPUs are stopped (by `PUT /vm/pause` or by a paused snapshot).
    Paused,
    /// The guest is being stopped; the process exits soon.
    ShuttingDown,
}

/// A disk attached to the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub path: PathBuf,
    pub read_only: bool,
}

/// The configuration the VM runs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfigInfo {
    pub vcpus: u8,
    pub memory_bytes: u64,
    /// The kernel booted; `null` for a VM restored from a snapshot.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    #[serde(default)]
    pub disks: Vec<DiskInfo>,
    /// The snapshot directory or `REPO#ID` this VM was restored from, if any.
    pub restored_from: Option<String>,
}

/// The body of `GET /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    pub config: VmConfigInfo,
    /// For a VM restored from a backup point: its disks' hydration from the point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_hydration: Option<DiskHydrationInfo>,
    /// A restored VM's memory loader progress; absent for a VM that was booted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_loader: Option<crate::restore::lazy_memory::progress::MemoryLoaderInfo>,
    /// The network devices with their counters.
    #[serde(default)]
    pub net: Vec<crate::device_manager::NetInfo>,
}

/// How far the disks of a VM restored from a backup point are hydrated into local files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskHydrationInfo {
    /// Bytes of all disks that are local.
    pub bytes_done: u64,
    /// Bytes of all disks.
    pub bytes_total: u64,
    /// Every disk is local: the VM no longer needs the repository.
    pub done: bool,
    /// Why hydration stopped (a chunk that could not be read), if it did.
    pub error: Option<String>,
    /// The directory holding the disk files.
    pub dir: PathBuf,
    /// Whether `dir` is removed when the VM exits.
    pub temporary: bool,
    /// Milliseconds from the start of the restore to done (or until now).
    pub elapsed_ms: u64,
}

/// The body of the 202 answer to `PUT /snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStarted {
    /// The snapshot's id (the backup point id in a repository).
    pub id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{SnapshotMode, SnapshotStrategy};
    use serde_json::json;

    #[test]
    fn constructors_set_status_and_body() {
        let r = ApiResponse::snapshot_started(&SnapshotStarted { id: "abc".into() });
        assert_eq!(r.status(), 202);
        assert_eq!(r.body(), Some(&json!({"id": "abc"})));
        assert_eq!(ApiResponse::no_content().status(), 204);
        assert_eq!(ApiResponse::no_content().body(), None);
        let r = ApiResponse::conflict("the VM is already running");
        assert_eq!(r.status(), 409);
        assert_eq!(
            r.body(),
            Some(&json!({"error": "the VM is already running"}))
        );
        assert_eq!(ApiResponse::error(200, "not an error code").status(), 500);
        assert_eq!(ApiResponse::error(418, "x").status(), 418);
    }

    #[test]
    fn status_bodies_use_snake_case_and_round_trip() {
        let s = SnapshotStatus {
            id: "1".into(),
            state: SnapshotState::Cancelled,
            mode: SnapshotMode::Live,
            strategy: SnapshotStrategy::Precopy,
            bytes_written: 10,
            bytes_total: 20,
            pause_us: Some(1500),
            total_ms: 7,
            pages_copied_early: 0,
            pages_recopied: 3,
            precopy_rounds: Some(2),
            precopy_converged: Some(true),
            cow: None,
            precopy: None,
            error: None,
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["state"], "cancelled");
        assert_eq!(v["strategy"], "precopy");
        assert_eq!(v["error"], serde_json::Value::Null);
        assert_eq!(serde_json::from_value::<SnapshotStatus>(v).unwrap(), s);
        let v = serde_json::to_value(VmState::ShuttingDown).unwrap();
        assert_eq!(v, "shutting_down");
    }
}

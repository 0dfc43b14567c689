//! The progress and outcome of a snapshot as the outside sees it. The API serves
//! [`SnapshotStatus`] as the body of `GET /snapshot`, so its serde form is the wire format.

use serde::{Deserialize, Serialize};

use super::request::{SnapshotMode, SnapshotStrategy};

/// Where a snapshot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    Running,
    Done,
    Failed,
    Cancelled,
}

/// The progress of the running snapshot, or the outcome of the last one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStatus {
    pub id: String,
    pub state: SnapshotState,
    pub mode: SnapshotMode,
    pub strategy: SnapshotStrategy,
    /// Bytes written to the target so far.
    pub bytes_written: u64,
    /// Bytes the snapshot will write in all (memory, state and disks), as far as known.
    pub bytes_total: u64,
    /// How long the vCPUs were paused, in microseconds; `null` until they have resumed.
    pub pause_us: Option<u64>,
    /// Milliseconds since the request: elapsed while running, total once finished.
    pub total_ms: u64,
    /// cow: pages copied ahead of the copier because the guest wrote to them.
    pub pages_copied_early: u64,
    /// precopy: pages copied again because they were dirtied after their first copy.
    pub pages_recopied: u64,
    /// precopy: copy rounds so far; `null` for cow and paused snapshots.
    pub precopy_rounds: Option<u32>,
    /// precopy: whether the dirty set shrank below the final-pause threshold within the round
    /// limit; `false` means the final pause copied a large remainder. `null` for other modes.
    #[serde(default)]
    pub precopy_converged: Option<bool>,
    /// cow: what the guest's writes cost during the copy; `null` for other modes.
    #[serde(default)]
    pub cow: Option<CowStats>,
    /// precopy: the rounds' outcome and the vCPU throttle applied; `null` for other modes.
    #[serde(default)]
    pub precopy: Option<PrecopyStats>,
    /// Why the snapshot failed; `null` unless `state` is `failed`.
    pub error: Option<String>,
}

/// What the guest's writes met during a cow snapshot's copy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CowStats {
    /// Write faults handled while the snapshot was copying.
    pub faults: u64,
    /// Bytes the fault thread copied into the staging pool (the writer waited for a memory
    /// copy only).
    pub bytes_staged: u64,
    /// Faults that found the staging pool full (or off): the unit went to the target while
    /// the writer waited.
    pub pool_full: u64,
    /// Microseconds writers waited in all: from reading each fault to lifting its protection.
    pub writer_wait_us: u64,
    /// The longest single wait, in microseconds.
    pub writer_wait_max_us: u64,
    /// The staging pool's size in bytes (0: staging off).
    pub staging_bytes: u64,
}

/// What a pre-copy snapshot's rounds did (see `docs/precopy.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrecopyStats {
    /// Whether the vCPU throttle (auto-converge) was allowed.
    pub throttle_enabled: bool,
    /// The highest throttle applied, in percent of each vCPU's time (0: never throttled).
    pub throttle_pct: u8,
    /// Bytes of dirty chunks found by the last round before the final pause.
    pub final_dirty_bytes: u64,
    /// The copy rate measured over the rounds, in bytes per second.
    pub copy_rate_bps: u64,
    /// The final-pause target, in milliseconds: rounds stop once the remaining dirty bytes
    /// would copy in this time at the measured rate.
    pub target_pause_ms: u64,
    /// The round limit.
    pub max_rounds: u32,
}

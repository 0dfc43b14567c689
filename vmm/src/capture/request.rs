//! What a snapshot is asked to be: where it goes, whether the guest keeps running, and how a
//! live snapshot keeps its image consistent. The API turns its request bodies into a
//! [`SnapshotRequest`]; the enums keep their serde form because the API's JSON uses them as is.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Whether the guest keeps running while its memory is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// The guest runs while memory is copied; the pause covers only the state.
    #[default]
    Live,
    /// The guest stays paused until everything is written.
    Paused,
}

/// How a live snapshot keeps its memory image consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotStrategy {
    /// Write-protect memory and copy a page before the guest's first write to it. The point in
    /// time is the request.
    #[default]
    Cow,
    /// Copy while tracking dirty pages, re-copy, then pause briefly for the rest. The point in
    /// time is the final pause.
    Precopy,
}

/// Where a snapshot is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotTarget {
    /// A new snapshot directory (`"out"`), which must not exist yet.
    Dir(PathBuf),
    /// A backup point in a repository (`"repo"`).
    Repo(PathBuf),
}

/// One snapshot to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    pub target: SnapshotTarget,
    pub mode: SnapshotMode,
    /// Meaningful for [`SnapshotMode::Live`] only.
    pub strategy: SnapshotStrategy,
    /// Key file for encryption at rest in the repository.
    pub key: Option<PathBuf>,
    /// How a backup compresses its chunks (a snapshot directory is not compressed).
    pub compression: snapshot::repo::Compression,
}

//! arkvm snapshot subsystem without KVM: the `Persist` trait, the snapshot format and the
//! backup repository.
//!
//! - [`persist`]: the one trait all VM state is saved and restored through.
//! - [`state_file`]: framed serde state files (magic, version, length, JSON, CRC32).
//! - [`manifest`]: `manifest.json`, the checksummed list of a snapshot's parts.
//! - [`dir`]: snapshot directories, written atomically and read with verification.
//! - [`sealed_json`]: checksummed JSON documents (snapshot and backup-point manifests).
//! - [`repo`]: the deduplicating backup repository (chunk store, points, verify, prune).
//! - [`sink`]: [`MemorySink`], one interface over snapshot memory parts and backup objects.
//! - [`source`]: [`ChunkSource`], one interface over snapshot memory parts and backup objects
//!   for lazy restore.
//! - [`chunk`]: blake3 content hashes and fixed-size chunking, shared with the repository.
//! - [`error`]: `error_chain` (an error and its causes on one line) and the lock-poisoning policy.
//! - [`layout`]: [`MemoryLayout`], the one mapping between memory chunks and guest addresses.
//! - [`dr`]: the disaster-recovery link and protocol (checkpoints to a second host).
//!
//! The on-disk layout is described in `docs/snapshot-format.md`.

pub mod chunk;
pub mod dir;
pub mod dr;
pub mod error;
pub mod fs_util;
pub mod layout;
pub mod manifest;
pub mod persist;
pub mod repo;
pub mod sealed_json;
pub mod sink;
pub mod sink_pipeline;
pub mod source;
pub mod state_file;

#[cfg(test)]
mod test_util;

pub use chunk::{chunk_hash, ContentHash, CHUNK_SIZE};
pub use dir::{
    cleanup_stale, MemoryPart, MemoryPartWriter, PartWriter, SnapshotError, SnapshotReader,
    SnapshotWriter, VerifyProgress,
};
pub use error::{error_chain, lock};
pub use error::{read as read_lock, write as write_lock};
pub use layout::{LayoutError, MappedLayout, MemoryLayout, MemoryRegionState};
pub use manifest::{Manifest, PartEntry, PartKind};
pub use persist::Persist;
pub use sink::{MemorySink, MemorySinkError};
pub use sink_pipeline::PipelineSink;
pub use source::{ChunkSource, ChunkSourceError};
pub use state_file::{read_state, write_state, StateFileError};

/// The format version of the whole snapshot: written in the manifest and in every state file.
/// A reader refuses any other version, naming both.
pub const FORMAT_VERSION: u32 = 1;

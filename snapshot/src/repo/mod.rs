//! The backup repository: content-addressed, zstd-compressed chunks plus one sealed manifest per
//! backup point listing the chunk ids of its memory, disks and states.
//!
//! ```text
//! REPO/
//!   config.json                      sealed: format version, chunk size, key fingerprint
//!   chunks/<4 hex>/<64 hex>          one chunk: tag byte + zstd (+ CRC32) or plain bytes; name = blake3
//!   points/<id>.json                 sealed point manifest; created last, with create-if-absent
//!   .lock                            flock: shared for backups and verify, exclusive for prune/gc
//!   .tmp/                            in-flight object writes (local backend only)
//! ```
//!
//! Every point is complete in itself: restoring one reads its manifest and its chunks, with no
//! chain of earlier points. A backup is incremental because unchanged chunks take their ids from
//! the parent point without being read, and chunks already stored are not stored again.
//!
//! Storage goes through [`ChunkStore`], which only creates, reads, lists and deletes whole
//! objects: a local directory ([`LocalDirStore`]) or an S3 bucket ([`s3::S3Store`], chosen by
//! giving an `s3://BUCKET/PREFIX` URL where a repository path is taken).

mod backup;
mod codec;
mod compression;
mod key;
mod location;
mod point;
mod reader;
mod repository;
mod resolve;
mod retention;
pub mod s3;
mod stage_times;
mod store;
mod transfer;

use std::path::PathBuf;

pub use backup::{BackupWriter, ObjectWriter};
pub use codec::{
    chunk_id, chunk_id_from_name, chunk_object_name, decode_chunk, encode_chunk, ChunkCodecError,
    CHUNK_PREFIX,
};
pub use compression::Compression;
pub use key::{KeyError, RepoKey};
pub use location::is_remote;
pub use point::{
    point_id_from_name, point_object_name, validate_vm_name, PointManifest, PointObject,
    PointStats, MAX_POINT_LEN, POINT_PREFIX,
};
pub use reader::ObjectReader;
pub use repository::{
    DamagedChunk, GcReport, PointEntry, PruneReport, RepoVerifyProgress, Repository, VerifyReport,
};
pub use resolve::LATEST;
pub use retention::{KeepPolicy, KeepReason};
pub use stage_times::{Stage, StageTimes};
pub use store::{ChunkStore, LocalDirStore, LockGuard, LockMode, StoreError, StoreLock};

use crate::sealed_json::SealError;
use crate::state_file::StateFileError;

/// Why a repository operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The storage backend failed.
    #[error("repository storage failed")]
    Store(#[from] StoreError),
    /// `init` found a repository already there.
    #[error("{} already holds a repository", path.display())]
    AlreadyInitialized {
        /// The repository.
        path: PathBuf,
    },
    /// `init` was pointed at a directory that already holds files of something else.
    #[error("{} already holds other files (such as '{entry}'): a repository is created in a new or empty directory", path.display())]
    ForeignDirectory {
        /// The directory.
        path: PathBuf,
        /// One entry that does not belong to a repository.
        entry: String,
    },
    /// The repository's config is missing.
    #[error("{} is not an arkvm repository (config.json is missing)", path.display())]
    NotARepository {
        /// The directory.
        path: PathBuf,
    },
    /// The repository's config is damaged or from another version.
    #[error("the repository config cannot be used")]
    Config(#[source] SealError),
    /// The repository's config fields are wrong.
    #[error("the repository config is invalid: {problem}")]
    ConfigInvalid {
        /// What is wrong.
        problem: String,
    },
    /// The repository is encrypted and no key was given.
    #[error("the repository is encrypted: a key is required")]
    KeyRequired,
    /// A key was given for a repository that is not encrypted.
    #[error("the repository is not encrypted, but a key was given")]
    KeyNotUsed,
    /// The key is not the repository's.
    #[error("the key (fingerprint {given}) is not this repository's key (fingerprint {expected})")]
    WrongKey {
        /// The given key's fingerprint.
        given: String,
        /// The repository's key fingerprint.
        expected: String,
    },
    /// An encrypted point manifest does not decrypt.
    #[error("backup point '{id}' cannot be decrypted")]
    PointUnauthentic {
        /// The point.
        id: String,
        /// Why.
        #[source]
        source: KeyError,
    },
    /// No point has this id.
    #[error("backup point '{id}' does not exist")]
    NoSuchPoint {
        /// The id.
        id: String,
    },
    /// A point id prefix names more than one point.
    #[error("'{prefix}' is the start of {count} backup point ids (give more of the id)")]
    AmbiguousPoint {
        /// The prefix given.
        prefix: String,
        /// How many ids start with it.
        count: usize,
    },
    /// `latest` was asked of a repository (or VM) with no readable point.
    #[error("the repository has no readable backup point{}", vm.as_ref().map(|v| format!(" of VM '{v}'")).unwrap_or_default())]
    NoLatestPoint {
        /// The VM asked for, if any.
        vm: Option<String>,
    },
    /// A point manifest is damaged, truncated, or of another version.
    #[error("backup point '{id}' cannot be used")]
    PointSeal {
        /// The point.
        id: String,
        /// Why.
        #[source]
        source: SealError,
    },
    /// A point manifest is intact but inconsistent.
    #[error("backup point '{id}' is invalid: {problem}")]
    PointInvalid {
        /// The point.
        id: String,
        /// What is wrong.
        problem: String,
    },
    /// A point with the same id already exists.
    #[error("backup point '{id}' already exists")]
    PointExists {
        /// The id.
        id: String,
    },
    /// The point has no object of this name.
    #[error("backup point '{id}' has no object '{name}'")]
    NoSuchObject {
        /// The point.
        id: String,
        /// The object.
        name: String,
    },
    /// A chunk is missing from the store.
    #[error("chunk {id} is missing from the repository")]
    ChunkMissing {
        /// The chunk.
        id: String,
    },
    /// A chunk is damaged.
    #[error("chunk {id} is damaged")]
    ChunkDamaged {
        /// The chunk.
        id: String,
        /// Why.
        #[source]
        source: ChunkCodecError,
    },
    /// A VM name or object name is not usable.
    #[error("'{name}' is not a valid name (1-64 characters of A-Z a-z 0-9 . _ -, not starting with '.')")]
    BadVmName {
        /// The refused name.
        name: String,
    },
    /// An object was given a name that is taken, or a writer of another backup.
    #[error("object '{name}' cannot be added to this backup: {problem}")]
    ObjectMisuse {
        /// The object.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// A chunk index, length, or reuse request does not fit the object.
    #[error("chunk {index} of object '{name}' does not fit: {problem}")]
    ChunkBounds {
        /// The object.
        name: String,
        /// The chunk.
        index: u64,
        /// What is wrong.
        problem: String,
    },
    /// An object was finished before all its chunks were given.
    #[error("chunk {index} of object '{name}' was never written")]
    ChunkNotWritten {
        /// The object.
        name: String,
        /// The first missing chunk.
        index: u64,
    },
    /// A state object could not be encoded or decoded.
    #[error("state object '{name}' cannot be used")]
    State {
        /// The object.
        name: String,
        /// Why.
        #[source]
        source: StateFileError,
    },
    /// Reading a snapshot directory or writing one failed.
    #[error("snapshot directory operation failed")]
    Snapshot(#[from] crate::dir::SnapshotError),
    /// Garbage collection found a point it cannot read, so it cannot know which chunks are used.
    #[error("cannot collect garbage while backup point '{id}' is unreadable (remove it first)")]
    GcBlocked {
        /// The unreadable point.
        id: String,
        /// Why it is unreadable.
        #[source]
        source: Box<RepoError>,
    },
}

#[cfg(test)]
mod tests;

//! Snapshot directories: parts written into a hidden temporary sibling, then made visible in one
//! rename once the manifest and every part are durable.
//!
//! ```text
//! parent/
//!   .vm1-snap.tmp-4242-5f3a9c0e12ab7d44/   while writing (or after a crash): never a snapshot
//!   vm1-snap/                              after commit
//!     manifest.json                        written last; lists every part below
//!     vm-state                             state part (framed, see state_file)
//!     memory                               memory part (raw, sparse, hashed per chunk)
//!     disk-0                               raw part
//! ```
//!
//! See `docs/snapshot-format.md` for the full layout and the commit rules.

mod reader;
mod writer;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub use reader::{MemoryPart, SnapshotReader, VerifyProgress};
pub use writer::{MemoryPartWriter, PartWriter, SnapshotWriter};

use crate::manifest::{ManifestError, PartKind};
use crate::state_file::StateFileError;

/// The marker between a snapshot's name and the writer's pid in a temporary directory name.
const TMP_MARKER: &str = ".tmp-";

/// Why a snapshot directory could not be written, read or verified.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The target directory already exists.
    #[error("snapshot directory {} already exists", path.display())]
    Exists {
        /// The target.
        path: PathBuf,
    },
    /// The target path has no parent or no final name.
    #[error("{} cannot be a snapshot directory (it has no parent directory or no name)", path.display())]
    BadTarget {
        /// The refused path.
        path: PathBuf,
    },
    /// A file system operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done, as a verb phrase ("write part 'memory' to").
        action: String,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The manifest is missing, damaged, from a future version, or inconsistent.
    #[error("cannot use snapshot manifest {}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: ManifestError,
    },
    /// A part name was refused or is already taken.
    #[error("cannot add part '{name}'")]
    PartName {
        /// The name.
        name: String,
        /// Why.
        #[source]
        source: ManifestError,
    },
    /// The manifest names a part that is not in the directory.
    #[error("part '{name}' is missing ({} does not exist)", path.display())]
    PartMissing {
        /// The part.
        name: String,
        /// Where it should be.
        path: PathBuf,
    },
    /// A part's file has a different size than the manifest says.
    #[error("part '{name}' ({}) is {found} bytes but the manifest says {expected} (truncated or damaged)", path.display())]
    PartSize {
        /// The part.
        name: String,
        /// Its file.
        path: PathBuf,
        /// The manifest's size.
        expected: u64,
        /// The file's size.
        found: u64,
    },
    /// A part's bytes do not hash to the manifest's value.
    #[error("part '{name}' ({}) is damaged: its blake3 hash does not match the manifest", path.display())]
    PartCorrupt {
        /// The part.
        name: String,
        /// Its file.
        path: PathBuf,
    },
    /// A memory chunk does not hash to its entry in the chunk table.
    #[error("chunk {index} of part '{name}' ({}) is damaged: its blake3 hash does not match the manifest", path.display())]
    ChunkCorrupt {
        /// The memory part.
        name: String,
        /// Its file.
        path: PathBuf,
        /// The chunk.
        index: u64,
    },
    /// The manifest has no part of this name.
    #[error("the snapshot has no part '{name}'")]
    NoSuchPart {
        /// The name asked for.
        name: String,
    },
    /// The part exists but is of another kind.
    #[error("part '{name}' is a {found:?} part, not a {expected:?} part")]
    WrongKind {
        /// The part.
        name: String,
        /// The kind the caller needs.
        expected: PartKind,
        /// The kind in the manifest.
        found: PartKind,
    },
    /// A state part could not be decoded.
    #[error("cannot read state part '{name}' ({})", path.display())]
    State {
        /// The part.
        name: String,
        /// Its file.
        path: PathBuf,
        /// Why.
        #[source]
        source: StateFileError,
    },
    /// A state could not be encoded into a part.
    #[error("cannot write state part '{name}'")]
    StateWrite {
        /// The part.
        name: String,
        /// Why.
        #[source]
        source: StateFileError,
    },
    /// A chunk index or length does not fit the memory part.
    #[error("chunk {index} of part '{name}' does not fit: {problem}")]
    ChunkBounds {
        /// The memory part.
        name: String,
        /// The chunk.
        index: u64,
        /// What does not fit, with the numbers.
        problem: String,
    },
    /// A memory part was finished before all its chunks were written.
    #[error("chunk {index} of part '{name}' was never written")]
    ChunkNotWritten {
        /// The memory part.
        name: String,
        /// The first missing chunk.
        index: u64,
    },
    /// A memory part was declared with an unusable geometry.
    #[error("part '{name}' cannot use chunks of {chunk_size} bytes (a power of two from 4 KiB to 64 MiB)")]
    BadChunkSize {
        /// The memory part.
        name: String,
        /// The refused chunk size.
        chunk_size: u64,
    },
    /// A part writer was handed to a snapshot writer it does not belong to.
    #[error("part '{name}' was not added to this snapshot")]
    ForeignPart {
        /// The part.
        name: String,
    },
    /// Commit was called while a part was added but never finished.
    #[error("part '{name}' was added but never finished")]
    UnfinishedPart {
        /// The part.
        name: String,
    },
    /// The manifest could not be encoded.
    #[error("cannot encode the snapshot manifest")]
    ManifestEncode(#[source] ManifestError),
}

/// Builds a [`SnapshotError::Io`].
fn io_error(action: impl Into<String>, path: &Path) -> impl FnOnce(io::Error) -> SnapshotError {
    let action = action.into();
    let path = path.to_path_buf();
    move |source| SnapshotError::Io {
        action,
        path,
        source,
    }
}

/// fsyncs a directory so that entries created or renamed in it are durable.
fn sync_dir(path: &Path) -> Result<(), SnapshotError> {
    crate::fs_util::sync_dir(path).map_err(io_error("fsync directory", path))
}

/// The pid encoded in a temporary snapshot directory name `.<name>.tmp-<pid>-<hex nonce>`.
fn tmp_dir_pid(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix('.')?;
    let (_, tail) = rest.rsplit_once(TMP_MARKER)?;
    let (pid, nonce) = tail.split_once('-')?;
    let hex_nonce = !nonce.is_empty() && nonce.bytes().all(|b| b.is_ascii_hexdigit());
    let numeric_pid = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    if hex_nonce && numeric_pid {
        pid.parse().ok()
    } else {
        None
    }
}

/// Removes the temporary directories that crashed snapshot writers left in `parent`, and returns
/// the removed paths.
///
/// A temporary directory whose writer's pid is still running (this process included) is kept, so
/// a writer in progress, here or in another process, is never disturbed. A reused pid can keep a
/// stale directory until that process exits; that errs on the safe side.
pub fn cleanup_stale(parent: &Path) -> Result<Vec<PathBuf>, SnapshotError> {
    let entries = fs::read_dir(parent).map_err(io_error("list directory", parent))?;
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error("list directory", parent))?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(tmp_dir_pid) else {
            continue;
        };
        let path = entry.path();
        let is_dir = entry
            .file_type()
            .map_err(io_error("inspect", &path))?
            .is_dir();
        if !is_dir || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        match fs::remove_dir_all(&path) {
            Ok(()) => removed.push(path),
            // Another cleaner got there first.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove stale temporary directory", &path)(e)),
        }
    }
    if !removed.is_empty() {
        sync_dir(parent)?;
        tracing::info!(count = removed.len(), parent = %parent.display(), "removed stale snapshot temporaries");
    }
    Ok(removed)
}

#[cfg(test)]
pub(crate) mod tests;

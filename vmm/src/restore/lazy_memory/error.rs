//! The loader's error type.

use snapshot::ChunkSourceError;

/// Why lazy loading could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum LazyMemoryError {
    /// userfaultfd is unavailable.
    #[error("cannot create a userfaultfd (needs root or vm.unprivileged_userfaultfd=1)")]
    Create(#[source] userfaultfd::Error),
    /// Registering guest memory failed.
    #[error("cannot register guest memory with userfaultfd")]
    Register(#[source] userfaultfd::Error),
    /// The source's memory does not have the shape of guest memory.
    #[error("the saved memory has {what} {source_value}, guest memory {layout_value}")]
    Mismatch {
        what: &'static str,
        source_value: u64,
        layout_value: u64,
    },
    /// A chunk could not be read from the source, or failed its check.
    #[error("cannot load guest memory chunk {index} of {label}")]
    Read {
        index: u64,
        /// The snapshot directory or `REPO#ID` the memory comes from.
        label: String,
        #[source]
        source: ChunkSourceError,
    },
    /// Filling guest memory failed.
    #[error("cannot fill guest memory for chunk {index}")]
    Fill {
        index: u64,
        #[source]
        source: userfaultfd::Error,
    },
    /// The kernel reported a copy of more bytes than were asked for.
    #[error("filling guest memory for chunk {index}: the kernel reported {reported} bytes copied of {remaining}")]
    FillCount {
        index: u64,
        reported: usize,
        remaining: usize,
    },
    /// Filling kept being refused with EAGAIN.
    #[error("filling guest memory for chunk {index} made no progress after {attempts} attempts")]
    FillStalled { index: u64, attempts: u32 },
    /// A chunk index or address outside guest memory (a bug).
    #[error("chunk {index} is outside guest memory")]
    NoSuchChunk { index: u64 },
    /// The source was released before chunk `index` was loaded (a bug).
    #[error("chunk {index} was asked for after the memory source was released")]
    Released { index: u64 },
    /// A thread could not be spawned.
    #[error("cannot spawn the memory loader thread")]
    Spawn(#[source] std::io::Error),
    /// The loader stopped before every chunk was in (its error was already taken).
    #[error("the memory loader stopped before guest memory was loaded")]
    Stopped,
}

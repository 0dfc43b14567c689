//! What the loader threads share, and loading one chunk: claim it, read and check it (retrying
//! transient read errors for a bounded time), fill guest memory, count it.
//!
//! The chunk is claimed, not locked: the read, the check and the fill run with no lock held, so
//! a slow read blocks only the threads that need that very chunk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snapshot::repo::{RepoError, StoreError};
use snapshot::{ChunkSource, ChunkSourceError, MappedLayout, SnapshotError};
use userfaultfd::Uffd;

use super::chunks::{ChunkStates, Claim};
use super::error::LazyMemoryError;
use super::fill::{copy_fill, zero_fill};
use super::progress::LoaderProgress;
use crate::vstate::vcpu::{ExitSignal, GuestExit};

/// How long a chunk read that fails with an I/O error (not a failed check) is retried.
const READ_RETRY_FOR: Duration = Duration::from_secs(10);

/// What [`Shared::ensure`] found or did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ensured {
    /// This call loaded the chunk (and woke its waiters).
    Loaded,
    /// It was already in.
    Already,
    /// Another thread is loading it; its fill wakes the waiters.
    Busy,
    /// It failed earlier: it will never be in.
    Failed,
}

pub(super) struct Shared {
    pub(super) uffd: Uffd,
    pub(super) layout: MappedLayout,
    /// The snapshot directory or `REPO#ID` the memory comes from, for messages.
    pub(super) label: String,
    /// Where chunks come from; released (set to `None`) once every chunk is in. The lock is
    /// held only to clone the `Arc`.
    pub(super) source: Mutex<Option<Arc<dyn ChunkSource>>>,
    pub(super) chunks: ChunkStates,
    pub(super) progress: Arc<LoaderProgress>,
    pub(super) exit: Arc<ExitSignal>,
    /// The loader is being dropped: every thread ends.
    pub(super) stop: AtomicBool,
    /// The VMM has seen the VM's exit and is ending it in order: the monitor stands down.
    pub(super) ending: AtomicBool,
    /// When a chunk failed: the VM is ending.
    pub(super) failed_at: Mutex<Option<Instant>>,
    pub(super) unregistered: AtomicBool,
    /// How long prefetch waits before its first chunk (`ARKVM_LOADER_PREFETCH_DELAY_MS`, for
    /// tests and diagnosis: it lets the guest's own threads touch memory first).
    pub(super) prefetch_delay: Duration,
    /// The first failure, for [`super::LazyMemory::wait_all_loaded`].
    pub(super) error: Mutex<Option<LazyMemoryError>>,
}

/// Whether a read error may go away by itself (an I/O error other than a missing file), as
/// opposed to a chunk that failed its check or is gone.
fn is_transient(e: &ChunkSourceError) -> bool {
    let io = match e {
        ChunkSourceError::Snapshot(SnapshotError::Io { source, .. }) => source,
        ChunkSourceError::Repo(RepoError::Store(StoreError::Io { source, .. })) => source,
        _ => return false,
    };
    io.kind() != std::io::ErrorKind::NotFound
}

impl Shared {
    pub(super) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub(super) fn has_failed(&self) -> bool {
        snapshot::lock(&self.failed_at).is_some()
    }

    /// The source, unless it was released.
    pub(super) fn source(&self) -> Option<Arc<dyn ChunkSource>> {
        snapshot::lock(&self.source).clone()
    }

    /// Makes sure chunk `index` is in or on its way: loads it if no thread has claimed it.
    pub(super) fn ensure(&self, index: u64, buf: &mut Vec<u8>) -> Result<Ensured, LazyMemoryError> {
        match self.chunks.claim(index as usize) {
            None => Err(LazyMemoryError::NoSuchChunk { index }),
            Some(Claim::Busy) => Ok(Ensured::Busy),
            Some(Claim::Loaded) => Ok(Ensured::Already),
            Some(Claim::Failed) => Ok(Ensured::Failed),
            Some(Claim::Claimed) => match self.load_claimed(index, buf) {
                Ok((len, read)) => {
                    if self.chunks.finish(index as usize, true) {
                        self.progress.waited_for(-1);
                    }
                    if self.progress.chunk_loaded(len, read) {
                        let i = self.progress.info();
                        tracing::info!(
                            "guest memory fully loaded in {} ms ({} MiB read, {} faults served \
                             on demand)",
                            i.loaded_after_ms.unwrap_or_default(),
                            i.bytes_read >> 20,
                            i.faults_served
                        );
                    }
                    Ok(Ensured::Loaded)
                }
                Err(e) => {
                    self.chunks.finish(index as usize, false);
                    Err(e)
                }
            },
        }
    }

    /// Loads a claimed chunk. Returns its length and whether it was read (not mapped as zero).
    fn load_claimed(&self, index: u64, buf: &mut Vec<u8>) -> Result<(u64, bool), LazyMemoryError> {
        let (host, len) = self
            .layout
            .chunk_host_range(index)
            .ok_or(LazyMemoryError::NoSuchChunk { index })?;
        let source = self.source().ok_or(LazyMemoryError::Released { index })?;
        if source.is_zero_chunk(index) {
            zero_fill(&self.uffd, index, host as usize, len as usize)?;
            return Ok((len, false));
        }
        buf.resize(len as usize, 0);
        self.read_with_retry(source.as_ref(), index, &mut buf[..len as usize])?;
        copy_fill(&self.uffd, index, &buf[..len as usize], host as usize)?;
        Ok((len, true))
    }

    /// Reads and checks chunk `index`, retrying transient I/O errors for [`READ_RETRY_FOR`].
    fn read_with_retry(
        &self,
        source: &dyn ChunkSource,
        index: u64,
        buf: &mut [u8],
    ) -> Result<(), LazyMemoryError> {
        let deadline = Instant::now() + READ_RETRY_FOR;
        let mut delay = Duration::from_millis(10);
        loop {
            match source.read_chunk(index, buf) {
                Ok(()) => return Ok(()),
                Err(e) if is_transient(&e) && Instant::now() < deadline && !self.stopping() => {
                    tracing::warn!(
                        "memory chunk {index} of {}: {}; retrying",
                        self.label,
                        snapshot::error_chain(&e)
                    );
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                Err(source) => {
                    return Err(LazyMemoryError::Read {
                        index,
                        label: self.label.clone(),
                        source,
                    })
                }
            }
        }
    }

    /// Records a failure and ends the VM with it (the first failure wins).
    pub(super) fn fail(&self, e: LazyMemoryError) {
        let detail = crate::error_chain(&e);
        self.progress.set_error(&detail);
        self.exit.report(GuestExit::RestoreFailed { detail });
        snapshot::lock(&self.error).get_or_insert(e);
        snapshot::lock(&self.failed_at).get_or_insert_with(Instant::now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_transient_but_checks_and_missing_files_are_not() {
        let io = |kind| {
            ChunkSourceError::Snapshot(SnapshotError::Io {
                action: "read".into(),
                path: "memory".into(),
                source: std::io::Error::from(kind),
            })
        };
        assert!(is_transient(&io(std::io::ErrorKind::TimedOut)));
        assert!(!is_transient(&io(std::io::ErrorKind::NotFound)));
        let corrupt = ChunkSourceError::Snapshot(SnapshotError::ChunkCorrupt {
            name: "memory".into(),
            path: "memory".into(),
            index: 3,
        });
        assert!(!is_transient(&corrupt));
    }
}

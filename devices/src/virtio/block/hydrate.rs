//! A base image that is filled ("hydrated") from a backup point while the guest runs.
//!
//! The local file starts sparse, the size of the point's disk. Each chunk of it is fetched from
//! the point (read, decrypt, decompress, verify: a [`ChunkSource`]) before anything reads it or
//! writes part of it: a guest request on a chunk not yet local waits for that chunk, and a
//! background thread ([`Hydration::hydrate_all`]) fetches the rest in order. Once every chunk is
//! in, the file is synced and the source dropped: the disk no longer needs the repository.
//!
//! The file is both the hydration target and the layer the guest writes to: a chunk is always
//! fetched whole before its first write, so the file always reads as "the point's disk plus the
//! guest's writes", and is exactly that once hydration is done.
//!
//! A chunk that cannot be read (missing, damaged, the repository unreachable) is retried for a
//! bounded time; then the failure is recorded, the owner is told once (it stops the VM) and
//! every access to that chunk fails. Wrong bytes are never written to the file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use snapshot::ChunkSource;

/// Locks that serialize fetches; chunk `i` uses stripe `i % STRIPES`.
const STRIPES: usize = 64;
/// The pause between two attempts at a chunk that could not be read.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Called once with the message when a chunk cannot be fetched in time.
pub type FatalHook = Box<dyn Fn(&str) + Send + Sync>;

/// Progress of one disk's hydration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HydrationProgress {
    /// Bytes of the disk that are local (fetched, or known zero).
    pub bytes_done: u64,
    /// The disk's size.
    pub bytes_total: u64,
    /// Every chunk is local and the file synced.
    pub done: bool,
    /// Why hydration stopped, if it failed.
    pub error: Option<String>,
}

/// One disk being filled from its point.
pub struct Hydration {
    /// Names the disk and the point in messages (`disk disk0 of point REPO#ID`).
    label: String,
    file: File,
    size: u64,
    chunk_size: u64,
    source: RwLock<Option<Arc<dyn ChunkSource>>>,
    present: Vec<AtomicBool>,
    stripes: Vec<Mutex<()>>,
    bytes_done: AtomicU64,
    chunks_left: AtomicU64,
    done: AtomicBool,
    cancelled: AtomicBool,
    failure: OnceLock<String>,
    retry_for: Duration,
    on_fatal: FatalHook,
}

impl std::fmt::Debug for Hydration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hydration")
            .field("label", &self.label)
            .field("size", &self.size)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// The error inside the `io::Error` of a chunk that cannot be had: [`super::Disk`] turns it into
/// [`super::DiskError::Unavailable`], whose request is held, never answered.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ChunkUnavailable(pub String);

fn fail(msg: &str) -> io::Error {
    io::Error::other(ChunkUnavailable(msg.to_string()))
}

/// The message, if `e` says a hydrating disk's chunk cannot be had.
pub fn unavailable(e: &io::Error) -> Option<String> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<ChunkUnavailable>())
        .map(|c| c.0.clone())
}

impl Hydration {
    /// Hydrates `file` (already the source's size, sparse) from `source`. A chunk that cannot
    /// be read is retried for `retry_for`, then `on_fatal` is called once.
    pub fn new(
        label: String,
        file: File,
        source: Arc<dyn ChunkSource>,
        retry_for: Duration,
        on_fatal: FatalHook,
    ) -> Self {
        let count = source.chunk_count();
        let present = (0..count).map(|_| AtomicBool::new(false)).collect();
        Self {
            label,
            file,
            size: source.size(),
            chunk_size: source.chunk_size().max(1),
            source: RwLock::new(Some(source)),
            present,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            bytes_done: AtomicU64::new(0),
            chunks_left: AtomicU64::new(count),
            done: AtomicBool::new(count == 0),
            cancelled: AtomicBool::new(false),
            failure: OnceLock::new(),
            retry_for,
            on_fatal,
        }
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The label used in messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// How far it got.
    pub fn progress(&self) -> HydrationProgress {
        HydrationProgress {
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: self.size,
            done: self.done.load(Ordering::Acquire),
            error: self.failure.get().cloned(),
        }
    }

    /// Whether every chunk is local.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Stops [`Hydration::hydrate_all`] at its next chunk (guest requests still fetch).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// Makes `[offset, offset + len)` local, fetching the chunks it touches that are not.
    pub fn ensure(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.is_done() || len == 0 {
            return Ok(());
        }
        let first = offset / self.chunk_size;
        let last = (offset.saturating_add(len) - 1) / self.chunk_size;
        for index in first..=last {
            self.ensure_chunk(index)?;
        }
        Ok(())
    }

    /// Makes chunk `index` local; returns the bytes this call read from the source.
    fn ensure_chunk(&self, index: u64) -> io::Result<u64> {
        let Some(flag) = self.present.get(index as usize) else {
            return Err(fail(&format!(
                "{}: chunk {index} is past the end of the disk",
                self.label
            )));
        };
        if flag.load(Ordering::Acquire) {
            return Ok(0);
        }
        let _stripe = snapshot::lock(&self.stripes[index as usize % STRIPES]);
        if flag.load(Ordering::Acquire) {
            return Ok(0);
        }
        if let Some(why) = self.failure.get() {
            return Err(fail(why));
        }
        let start = index * self.chunk_size;
        let len = self.chunk_size.min(self.size - start);
        let source = snapshot::read_lock(&self.source).clone();
        let Some(source) = source else {
            return Err(fail(&format!(
                "{}: the point is no longer open",
                self.label
            )));
        };
        let mut read = 0;
        if !source.is_zero_chunk(index) {
            let mut buf = vec![0u8; len as usize];
            self.fetch(source.as_ref(), index, start, &mut buf)?;
            // A local write failure is the disk directory's problem, not the point's.
            self.file.write_all_at(&buf, start).map_err(|e| {
                fail(&format!(
                    "{}: cannot write chunk {index} to the local file: {e}",
                    self.label
                ))
            })?;
            read = len;
        }
        // A zero chunk stays a hole of the sparse file, which reads as zeros.
        flag.store(true, Ordering::Release);
        self.bytes_done.fetch_add(len, Ordering::Relaxed);
        if self.chunks_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish()?;
        }
        Ok(read)
    }

    /// Reads chunk `index`, retrying for the bounded time; records the failure after that.
    fn fetch(
        &self,
        source: &dyn ChunkSource,
        index: u64,
        start: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let deadline = Instant::now() + self.retry_for;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match source.read_chunk(index, buf) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    if attempts == 1 {
                        tracing::warn!(
                            "{}: chunk {index} cannot be read ({}); retrying for up to {:?}",
                            self.label,
                            snapshot::error_chain(&e),
                            self.retry_for
                        );
                    }
                    std::thread::sleep(RETRY_PAUSE);
                }
                Err(e) => {
                    let why = format!(
                        "{}: chunk {index} (disk bytes {start:#x}..{:#x}) cannot be read after \
                         {attempts} attempts in {:?}: {}",
                        self.label,
                        start + buf.len() as u64,
                        self.retry_for,
                        snapshot::error_chain(&e)
                    );
                    if self.failure.set(why.clone()).is_ok() {
                        tracing::error!("{why}");
                        (self.on_fatal)(&why);
                    }
                    return Err(fail(&why));
                }
            }
        }
    }

    /// Every chunk is local: make the file durable and let go of the point.
    fn finish(&self) -> io::Result<()> {
        self.file.sync_all()?;
        *snapshot::write_lock(&self.source) = None;
        self.done.store(true, Ordering::Release);
        tracing::info!("{}: hydrated ({} bytes)", self.label, self.size);
        Ok(())
    }

    /// Fetches every chunk not yet local, in order, until done, cancelled or failed; `paced` is
    /// told the bytes read from the source after each chunk (to limit the rate). Returns
    /// whether the disk is whole.
    pub fn hydrate_all(&self, paced: &mut dyn FnMut(u64)) -> bool {
        for index in 0..self.present.len() as u64 {
            if self.cancelled.load(Ordering::SeqCst) {
                return false;
            }
            match self.ensure_chunk(index) {
                Ok(read) => paced(read),
                Err(_) => return false,
            }
        }
        self.is_done()
    }
}

/// Hydrations waiting for [`super::Disk::open`] to pick them up, by the path of their file.
static PENDING: Mutex<Vec<(PathBuf, Arc<Hydration>)>> = Mutex::new(Vec::new());

/// Makes the next [`super::Disk::open`] of `path` read its base through `hydration`.
pub fn register(path: &Path, hydration: Arc<Hydration>) {
    snapshot::lock(&PENDING).push((path.to_path_buf(), hydration));
}

/// Takes the hydration registered for `path`, if any.
pub(crate) fn take_registered(path: &Path) -> Option<Arc<Hydration>> {
    let mut pending = snapshot::lock(&PENDING);
    let at = pending.iter().position(|(p, _)| p == path)?;
    Some(pending.swap_remove(at).1)
}

#[cfg(test)]
#[path = "hydrate_tests.rs"]
mod tests;

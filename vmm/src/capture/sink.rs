//! Where a snapshot goes: a snapshot directory, or a backup point in a repository. Both take
//! memory in 1 MiB chunks through a [`MemorySink`] (a repository can also reuse a chunk of the
//! parent point without reading it), disks as raw images, and the state.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::block::{ChangedBlocks, FrozenImage, CBT_BLOCK_SIZE};
use snapshot::repo::{BackupWriter, ObjectWriter, RepoKey, Repository};
use snapshot::{MemoryPartWriter, MemorySink, PartKind, PipelineSink, SnapshotWriter, CHUNK_SIZE};

use super::error::CaptureError;
use super::progress::Progress;
use super::request::SnapshotTarget;
use crate::saved_state::{VmSnapshotState, MEMORY_PART, STATE_PART};

/// The memory part or object being written, kept here so that it can be finished once every
/// copier has dropped its [`MemorySink`] handle.
enum OpenMemory {
    Part(Arc<MemoryPartWriter>),
    /// A backup object, filled by the pipeline's workers.
    Object {
        object: Arc<ObjectWriter>,
        pipeline: Arc<PipelineSink>,
    },
}

/// Chunks a backup's pipeline may hold queued (1 MiB each), beyond those its workers hold.
const PIPELINE_DEPTH: usize = 8;
/// How much lower than the VM's threads a live snapshot's background threads (the copier and
/// the backup workers) run, so that the guest's vCPUs get the CPU first on a busy host.
pub const BACKGROUND_NICE: i32 = 10;
/// At most this many backup workers (hash, compress, seal, store).
const MAX_PIPELINE_WORKERS: usize = 4;

/// Where the snapshot goes.
enum Destination {
    Dir(SnapshotWriter),
    Repo {
        writer: Box<BackupWriter>,
        repo: PathBuf,
    },
}

/// The destination of one snapshot.
pub struct SnapshotOut {
    dest: Destination,
    memory: Option<OpenMemory>,
}

/// What a committed snapshot is called: its directory or `REPO#POINT`.
pub struct Committed {
    pub name: String,
    pub point_id: Option<String>,
}

/// How long [`SnapshotOut::finish_memory`] waits for the last copier to let go of the memory.
const RELEASE_WAIT: Duration = Duration::from_secs(1);

impl SnapshotOut {
    /// Opens the destination of a snapshot of the VM called `vm_name`: a new snapshot directory,
    /// or a new backup point whose parent is the VM's latest point in the repository.
    pub fn open(
        target: &SnapshotTarget,
        key: Option<&Path>,
        compression: snapshot::repo::Compression,
        vm_name: &str,
    ) -> Result<Self, CaptureError> {
        let dest = match target {
            SnapshotTarget::Dir(dir) => Destination::Dir(SnapshotWriter::create(dir)?),
            SnapshotTarget::Repo(path) => {
                let key = key.map(RepoKey::load).transpose()?;
                let repo = Repository::open(path, key)?;
                let parent = repo.latest_point(vm_name)?.map(|p| p.id);
                let mut writer = repo.start_backup(vm_name, parent.as_deref())?;
                writer.set_compression(compression);
                Destination::Repo {
                    writer: Box::new(writer),
                    repo: path.clone(),
                }
            }
        };
        Ok(Self { dest, memory: None })
    }

    /// The parent point an incremental backup may take unchanged chunks from: None for a
    /// snapshot directory or a first backup.
    pub fn parent_point(&self) -> Option<String> {
        match &self.dest {
            Destination::Dir(_) => None,
            Destination::Repo { writer, .. } => writer.parent().map(|p| p.id.clone()),
        }
    }

    /// Whether this is a backup point in a repository.
    pub fn is_backup(&self) -> bool {
        matches!(self.dest, Destination::Repo { .. })
    }

    /// Starts the memory part/object of `size` bytes; copiers write it through the sink.
    pub fn add_memory(&mut self, size: u64) -> Result<Arc<dyn MemorySink>, CaptureError> {
        if self.memory.is_some() {
            return Err(CaptureError::PartInUse);
        }
        let (open, sink): (OpenMemory, Arc<dyn MemorySink>) = match &mut self.dest {
            Destination::Dir(w) => {
                let p = Arc::new(w.add_memory_part(MEMORY_PART, size, CHUNK_SIZE as u64)?);
                (OpenMemory::Part(p.clone()), p)
            }
            Destination::Repo { writer, .. } => {
                let object = Arc::new(writer.add_object(MEMORY_PART, PartKind::Memory, size)?);
                // One worker per core for a local store; an object store's workers mostly
                // wait on round trips, so it asks for more of them.
                let workers = std::thread::available_parallelism()
                    .map_or(1, |n| n.get())
                    .min(MAX_PIPELINE_WORKERS)
                    .max(writer.writes_in_flight());
                let pipeline = Arc::new(PipelineSink::new(
                    object.clone(),
                    workers,
                    PIPELINE_DEPTH,
                    BACKGROUND_NICE,
                )?);
                (
                    OpenMemory::Object {
                        object,
                        pipeline: pipeline.clone(),
                    },
                    pipeline,
                )
            }
        };
        self.memory = Some(open);
        Ok(sink)
    }

    /// Finishes the memory part/object, once every sink handle is dropped (a fault handler may
    /// take a moment to let go of its own).
    pub fn finish_memory(&mut self) -> Result<(), CaptureError> {
        let deadline = Instant::now() + RELEASE_WAIT;
        let mut open = self.memory.take().ok_or(CaptureError::PartInUse)?;
        loop {
            open = match (open, &mut self.dest) {
                (OpenMemory::Part(p), Destination::Dir(w)) => match Arc::try_unwrap(p) {
                    Ok(p) => {
                        w.finish_memory_part(p)?;
                        return Ok(());
                    }
                    Err(p) => OpenMemory::Part(p),
                },
                (OpenMemory::Object { object, pipeline }, Destination::Repo { writer, .. }) => {
                    match Arc::try_unwrap(pipeline) {
                        Ok(p) => {
                            // Every chunk queued is stored (or the first failure comes back),
                            // and the workers let go of the object.
                            let stored = p.finish();
                            drop(p);
                            stored?;
                            let object =
                                Arc::try_unwrap(object).map_err(|_| CaptureError::PartInUse)?;
                            writer.finish_object(object)?;
                            return Ok(());
                        }
                        Err(pipeline) => OpenMemory::Object { object, pipeline },
                    }
                }
                _ => return Err(CaptureError::PartInUse),
            };
            if Instant::now() >= deadline {
                return Err(CaptureError::PartInUse);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Copies a frozen disk image. With `changed` (blocks written since the parent point),
    /// chunks without a changed block are reused from the parent without being read.
    pub fn write_disk(
        &mut self,
        name: &str,
        image: &FrozenImage,
        changed: Option<&ChangedBlocks>,
        progress: &Progress,
        cancel: &AtomicBool,
    ) -> Result<(), CaptureError> {
        let size = image.size();
        let mut buf = vec![0u8; CHUNK_SIZE];
        let read = |off: u64, buf: &mut [u8]| {
            image
                .read_at(off, buf)
                .map_err(|e| CaptureError::ReadDisk(name.to_string(), e))
        };
        match &mut self.dest {
            Destination::Dir(w) => {
                let mut part = w.add_part(name)?;
                let mut off = 0;
                while off < size {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(CaptureError::Cancelled);
                    }
                    let n = (size - off).min(CHUNK_SIZE as u64) as usize;
                    read(off, &mut buf[..n])?;
                    part.write_all(&buf[..n])
                        .map_err(|e| CaptureError::WriteDisk(name.to_string(), e))?;
                    off += n as u64;
                    progress.update(|s| s.bytes_written += n as u64);
                }
                w.finish_part(part)?;
            }
            Destination::Repo { writer, .. } => {
                let object = writer.add_object(name, PartKind::Raw, size)?;
                let reuse_ok = object.has_parent() && changed.is_some();
                let per_chunk = CHUNK_SIZE as u64 / CBT_BLOCK_SIZE;
                for index in 0..object.chunk_count() {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(CaptureError::Cancelled);
                    }
                    let off = index * CHUNK_SIZE as u64;
                    let n = (size - off).min(CHUNK_SIZE as u64) as usize;
                    let dirty = changed.is_none_or(|c| {
                        let first = off / CBT_BLOCK_SIZE;
                        (first..first + per_chunk).any(|b| c.is_changed(b))
                    });
                    if reuse_ok && !dirty {
                        object.reuse_parent_chunk(index)?;
                    } else {
                        read(off, &mut buf[..n])?;
                        object.put_chunk(index, &buf[..n])?;
                        progress.update(|s| s.bytes_written += n as u64);
                    }
                }
                writer.finish_object(object)?;
            }
        }
        Ok(())
    }

    /// Stores the state.
    pub fn write_state(&mut self, state: &VmSnapshotState) -> Result<(), CaptureError> {
        match &mut self.dest {
            Destination::Dir(w) => w.write_state_part(STATE_PART, state)?,
            Destination::Repo { writer, .. } => writer.put_state(STATE_PART, state)?,
        }
        Ok(())
    }

    /// Makes the snapshot visible.
    pub fn commit(self) -> Result<Committed, CaptureError> {
        match self.dest {
            Destination::Dir(w) => {
                let name = w.target().display().to_string();
                w.commit()?;
                Ok(Committed {
                    name,
                    point_id: None,
                })
            }
            Destination::Repo { writer, repo } => {
                let point = writer.commit()?;
                Ok(Committed {
                    name: format!("{}#{}", repo.display(), point.id),
                    point_id: Some(point.id),
                })
            }
        }
    }
}

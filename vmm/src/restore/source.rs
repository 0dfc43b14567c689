//! Where a restore reads from: a snapshot directory, or a backup point in a repository read in
//! place (no copy of the point is made first). Either one opens to the same three things:
//!
//! ```text
//!  RestoreSource::Dir(path) ──┐                     ┌─► state: VmSnapshotState  ─► builder
//!                             ├─ open() ─► Opened ──┼─► memory: Arc<dyn ChunkSource> ─► LazyMemory
//!  RestoreSource::Point{..} ──┘                     └─► materialize_disks(dir)  ─► disk files
//! ```
//!
//! A point is read under the repository's shared lock (the one backups hold; prune and garbage
//! collection take it exclusively), held by its memory source: from opening the point until the
//! loader has read the last memory chunk and lets go of the source.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use snapshot::repo::{LockMode, ObjectReader, PointManifest, RepoError, Repository, StoreLock};
use snapshot::{ChunkSource, ChunkSourceError, SnapshotReader};

use crate::saved_state::{disk_part_name, VmSnapshotState, MEMORY_PART, STATE_PART};

/// Why a restore source could not be opened or its disks copied out.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("the snapshot's memory part holds {part} bytes but its state describes {state} bytes")]
    MemorySize { part: u64, state: u64 },
    #[error("disk directory {0} already exists; choose another with --disk-dir")]
    DiskDirExists(PathBuf),
    #[error("cannot write restored disk {0}")]
    WriteDisk(PathBuf, #[source] std::io::Error),
}

/// What a VM is restored from.
pub enum RestoreSource {
    /// A snapshot directory.
    Dir(PathBuf),
    /// Backup point `id` of an open repository (`repo_path` names it in messages).
    Point {
        repo: Repository,
        repo_path: PathBuf,
        id: String,
    },
}

/// An opened source: the checked state, guest memory to load, and the disks to copy out.
pub struct OpenedSource {
    /// The saved VM state.
    pub state: VmSnapshotState,
    /// Guest memory, read and checked chunk by chunk.
    pub memory: Arc<dyn ChunkSource>,
    /// Where the VM came from, for `GET /vm` and messages.
    pub label: String,
    /// Whether every memory chunk must be in (and checked) before the guest runs. Neither a
    /// directory nor a backup point needs it: both are loaded while the guest runs, and a
    /// damaged chunk stops the VM before any thread sees it (see `lazy_memory`).
    pub load_before_resume: bool,
    disks: DiskParts,
}

/// Where the disk images are.
enum DiskParts {
    Dir(SnapshotReader),
    Point {
        repo: Repository,
        point: PointManifest,
    },
}

impl RestoreSource {
    /// Where restored disks go when no directory is given: beside a snapshot directory
    /// (`DIR.disks`), or a per-process directory in the temporary directory for a point.
    pub fn default_disk_dir(&self) -> PathBuf {
        match self {
            Self::Dir(dir) => {
                let mut name = dir.file_name().unwrap_or_default().to_os_string();
                name.push(".disks");
                dir.with_file_name(name)
            }
            Self::Point { .. } => {
                std::env::temp_dir().join(format!("arkvm-restore-{}-disks", std::process::id()))
            }
        }
    }

    /// Opens and checks the source: its state, and memory the size the state describes.
    pub fn open(self) -> Result<OpenedSource, SourceError> {
        match self {
            Self::Dir(dir) => open_dir(&dir),
            Self::Point {
                repo,
                repo_path,
                id,
            } => open_point(repo, &repo_path, &id),
        }
    }
}

fn check_memory_size(state: &VmSnapshotState, memory: &dyn ChunkSource) -> Result<(), SourceError> {
    let described: u64 = state.memory.iter().map(|r| r.len).sum();
    if memory.size() != described || described != state.config.memory_bytes {
        return Err(SourceError::MemorySize {
            part: memory.size(),
            state: described,
        });
    }
    Ok(())
}

fn open_dir(dir: &Path) -> Result<OpenedSource, SourceError> {
    let reader = SnapshotReader::open(dir)?;
    let state: VmSnapshotState = reader.read_state_part(STATE_PART)?;
    let memory = Arc::new(reader.memory_part(MEMORY_PART)?);
    check_memory_size(&state, memory.as_ref())?;
    Ok(OpenedSource {
        state,
        memory,
        label: dir.display().to_string(),
        load_before_resume: false,
        disks: DiskParts::Dir(reader),
    })
}

fn open_point(repo: Repository, repo_path: &Path, id: &str) -> Result<OpenedSource, SourceError> {
    // Taken before the point is read: a prune that starts now waits until memory is loaded.
    let lock = repo
        .store()
        .lock(LockMode::Shared, true)
        .map_err(RepoError::from)?;
    let point = repo.read_point(id)?;
    let state: VmSnapshotState = repo.read_state(&point, STATE_PART)?;
    let memory = Arc::new(LockedObject {
        reader: repo.object_reader(&point, MEMORY_PART)?,
        _lock: Arc::new(lock),
    });
    check_memory_size(&state, memory.as_ref())?;
    Ok(OpenedSource {
        state,
        memory,
        label: format!("{}#{id}", repo_path.display()),
        load_before_resume: false,
        disks: DiskParts::Point { repo, point },
    })
}

impl OpenedSource {
    /// The repository and point a point source reads its disks from (`None` for a directory).
    pub fn point_disks(&self) -> Option<(&Repository, &PointManifest)> {
        match &self.disks {
            DiskParts::Point { repo, point } => Some((repo, point)),
            DiskParts::Dir(_) => None,
        }
    }

    /// Copies every disk (each chunk checked while copying) into `target`, which must not
    /// exist, and points the configuration at the copies.
    pub fn materialize_disks(&mut self, target: &Path) -> Result<(), SourceError> {
        if self.state.config.disks.is_empty() {
            return Ok(());
        }
        if target.exists() {
            return Err(SourceError::DiskDirExists(target.to_path_buf()));
        }
        std::fs::create_dir_all(target)
            .map_err(|e| SourceError::WriteDisk(target.to_path_buf(), e))?;
        for (i, disk) in self.state.config.disks.iter_mut().enumerate() {
            let id = disk.device_id(i);
            let path = target.join(format!("{id}.img"));
            let write_err = |e| SourceError::WriteDisk(path.clone(), e);
            let mut file = std::fs::File::create(&path).map_err(write_err)?;
            let part = disk_part_name(&id);
            match &self.disks {
                DiskParts::Dir(reader) => {
                    reader.copy_part(&part, &mut file)?;
                }
                DiskParts::Point { repo, point } => {
                    repo.read_object(point, &part, &mut file)?;
                }
            }
            file.sync_all().map_err(write_err)?;
            if disk.readonly {
                let mut perm = file.metadata().map_err(write_err)?.permissions();
                std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o444);
                std::fs::set_permissions(&path, perm).map_err(write_err)?;
            }
            disk.path = path;
            disk.overlay = None;
            // Keep the id the snapshot used, so the saved device state finds its disk.
            disk.id = Some(id);
        }
        Ok(())
    }
}

/// An object of a backup point (its memory, or a disk being hydrated), read under the
/// repository's shared lock: the lock goes when the last user drops its source (after the last
/// chunk is in), so prune and gc wait until then.
pub(crate) struct LockedObject {
    pub(crate) reader: ObjectReader,
    pub(crate) _lock: Arc<StoreLock>,
}

impl ChunkSource for LockedObject {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn chunk_size(&self) -> u64 {
        self.reader.chunk_size()
    }

    fn chunk_count(&self) -> u64 {
        self.reader.chunk_count()
    }

    fn is_zero_chunk(&self, index: u64) -> bool {
        self.reader.is_zero_chunk(index)
    }

    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<(), ChunkSourceError> {
        ChunkSource::read_chunk(&self.reader, index, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::repo::StoreError;
    use snapshot::{SnapshotWriter, CHUNK_SIZE};

    #[test]
    fn a_point_memory_source_holds_the_shared_lock_until_dropped() {
        let tmp = std::env::temp_dir().join(format!("arkvm-test-locked-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let dir = tmp.join("snap");
        let mut snap = SnapshotWriter::create(&dir).unwrap();
        let mem = vec![3u8; 2 * CHUNK_SIZE];
        let part = snap
            .add_memory_part(MEMORY_PART, mem.len() as u64, CHUNK_SIZE as u64)
            .unwrap();
        for (i, chunk) in mem.chunks(CHUNK_SIZE).enumerate() {
            part.write_chunk(i as u64, chunk).unwrap();
        }
        snap.finish_memory_part(part).unwrap();
        snap.commit().unwrap();
        let reader = SnapshotReader::open(&dir).unwrap();
        let repo = Repository::init(&tmp.join("repo"), None).unwrap();
        let point = repo.store_snapshot(&reader, "vm1", None).unwrap();

        let memory: Arc<dyn ChunkSource> = Arc::new(LockedObject {
            reader: repo.object_reader(&point, MEMORY_PART).unwrap(),
            _lock: Arc::new(repo.store().lock(LockMode::Shared, false).unwrap()),
        });
        // Prune and gc take the lock exclusively: they cannot while the source is alive.
        assert!(matches!(
            repo.store().lock(LockMode::Exclusive, false),
            Err(StoreError::Locked { .. })
        ));
        let mut buf = vec![0u8; CHUNK_SIZE];
        memory.read_chunk(1, &mut buf).unwrap();
        assert_eq!(buf, mem[CHUNK_SIZE..]);
        assert!(!memory.is_zero_chunk(0));
        drop(memory);
        assert!(repo.store().lock(LockMode::Exclusive, false).is_ok());
        let _ = std::fs::remove_dir_all(&tmp);
    }
}

//! Where a snapshot goes: a snapshot directory, or a backup point in a repository. Both take
//! memory in 1 MiB chunks (a repository can also reuse a chunk of the parent point without
//! reading it), disks as raw images, and the state.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use devices::virtio::block::{ChangedBlocks, FrozenImage, CBT_BLOCK_SIZE};
use snapshot::repo::{BackupWriter, ObjectWriter};
use snapshot::{MemoryPartWriter, PartKind, SnapshotWriter, CHUNK_SIZE};

use super::progress::Progress;
use super::CaptureError;
use crate::saved_state::{VmSnapshotState, MEMORY_PART, STATE_PART};

/// Where guest memory chunks go.
pub enum MemoryOut {
    Part(MemoryPartWriter),
    Object(ObjectWriter),
}

impl MemoryOut {
    /// Bytes per chunk.
    pub fn chunk_size(&self) -> u64 {
        match self {
            Self::Part(p) => p.chunk_size(),
            Self::Object(o) => o.chunk_size(),
        }
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        match self {
            Self::Part(p) => p.chunk_count(),
            Self::Object(o) => o.chunk_count(),
        }
    }

    /// Stores chunk `index` (again, if it was stored before).
    pub fn put(&self, index: u64, data: &[u8]) -> Result<(), CaptureError> {
        match self {
            Self::Part(p) => p.write_chunk(index, data)?,
            Self::Object(o) => {
                o.put_chunk(index, data)?;
            }
        }
        Ok(())
    }

    /// Takes chunk `index` from the parent backup point without reading it.
    pub fn reuse(&self, index: u64) -> Result<(), CaptureError> {
        match self {
            Self::Part(_) => Err(CaptureError::Unsupported(
                "reusing chunks in a snapshot directory",
            )),
            Self::Object(o) => {
                o.reuse_parent_chunk(index)?;
                Ok(())
            }
        }
    }
}

/// The destination of one snapshot.
pub enum SnapshotOut {
    Dir(SnapshotWriter),
    Repo {
        writer: Box<BackupWriter>,
        repo: PathBuf,
    },
}

/// What a committed snapshot is called: its directory or `REPO#POINT`.
pub struct Committed {
    pub name: String,
    pub point_id: Option<String>,
}

impl SnapshotOut {
    /// Whether chunks of a parent point can be reused.
    pub fn has_parent(&self) -> bool {
        matches!(self, Self::Repo { writer, .. } if writer.parent().is_some())
    }

    /// Starts the memory part/object.
    pub fn add_memory(&mut self, size: u64) -> Result<MemoryOut, CaptureError> {
        Ok(match self {
            Self::Dir(w) => {
                MemoryOut::Part(w.add_memory_part(MEMORY_PART, size, CHUNK_SIZE as u64)?)
            }
            Self::Repo { writer, .. } => {
                MemoryOut::Object(writer.add_object(MEMORY_PART, PartKind::Memory, size)?)
            }
        })
    }

    /// Finishes the memory part/object.
    pub fn finish_memory(&mut self, m: MemoryOut) -> Result<(), CaptureError> {
        match (self, m) {
            (Self::Dir(w), MemoryOut::Part(p)) => {
                w.finish_memory_part(p)?;
            }
            (Self::Repo { writer, .. }, MemoryOut::Object(o)) => writer.finish_object(o)?,
            _ => return Err(CaptureError::PartInUse),
        }
        Ok(())
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
        match self {
            Self::Dir(w) => {
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
            Self::Repo { writer, .. } => {
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
        match self {
            Self::Dir(w) => w.write_state_part(STATE_PART, state)?,
            Self::Repo { writer, .. } => writer.put_state(STATE_PART, state)?,
        }
        Ok(())
    }

    /// Makes the snapshot visible.
    pub fn commit(self) -> Result<Committed, CaptureError> {
        match self {
            Self::Dir(w) => {
                let name = w.target().display().to_string();
                w.commit()?;
                Ok(Committed {
                    name,
                    point_id: None,
                })
            }
            Self::Repo { writer, repo } => {
                let point = writer.commit()?;
                Ok(Committed {
                    name: format!("{}#{}", repo.display(), point.id),
                    point_id: Some(point.id),
                })
            }
        }
    }
}

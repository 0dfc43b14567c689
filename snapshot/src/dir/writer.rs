//! Writing a snapshot directory: parts into a temporary sibling, then an atomic commit.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{cleanup_stale, io_error, sync_dir, SnapshotError, TMP_MARKER};
use crate::chunk::{
    chunk_count, chunk_hash, chunk_range, chunk_table_hash, is_valid_chunk_size, is_zero,
    ContentHash,
};
use crate::fs_util::{create_private_dir, create_private_file, rename_noreplace};
use crate::manifest::{
    validate_part_name, ChunkTable, Manifest, ManifestError, PartEntry, PartKind, MANIFEST_NAME,
};
use crate::state_file::write_state;
use crate::FORMAT_VERSION;

/// Buffer size of a [`PartWriter`].
const PART_BUFFER: usize = 1 << 20;

/// Builds a snapshot directory. Nothing is visible at the target until [`SnapshotWriter::commit`]
/// succeeds; dropping the writer before that removes everything it wrote.
///
/// ```no_run
/// # use snapshot::dir::SnapshotWriter;
/// # fn main() -> Result<(), snapshot::dir::SnapshotError> {
/// let mut snap = SnapshotWriter::create("/backups/vm1-snap".as_ref())?;
/// snap.write_state_part("vm-state", &vec![1u64, 2, 3])?;
/// let memory = snap.add_memory_part("memory", 2 << 20, snapshot::CHUNK_SIZE as u64)?;
/// memory.write_chunk(1, &vec![7u8; 1 << 20])?; // any order, from any thread
/// memory.write_chunk(0, &vec![0u8; 1 << 20])?;
/// snap.finish_memory_part(memory)?;
/// snap.commit()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SnapshotWriter {
    target: PathBuf,
    tmp: PathBuf,
    parts: Vec<PartEntry>,
    pending: BTreeSet<String>,
    committed: bool,
}

impl SnapshotWriter {
    /// Starts a snapshot that will appear at `target` on commit.
    ///
    /// Refuses a `target` that exists. Creates the temporary directory
    /// `.<name>.tmp-<pid>-<nonce>` beside it, mode 0700 (parts are 0600), after removing the
    /// temporaries that killed writers left in the same parent (see [`cleanup_stale`]; only
    /// those whose process is gone).
    pub fn create(target: &Path) -> Result<Self, SnapshotError> {
        let bad_target = || SnapshotError::BadTarget {
            path: target.to_path_buf(),
        };
        let name = target.file_name().ok_or_else(bad_target)?;
        let parent = match target.parent() {
            Some(p) if p.as_os_str().is_empty() => Path::new("."),
            Some(p) => p,
            None => return Err(bad_target()),
        };
        if fs::symlink_metadata(target).is_ok() {
            return Err(SnapshotError::Exists {
                path: target.to_path_buf(),
            });
        }
        // A leftover that cannot be removed now is not this snapshot's problem: it is logged
        // and left for the next writer.
        if let Err(e) = cleanup_stale(parent) {
            tracing::warn!(
                parent = %parent.display(),
                error = %crate::error::error_chain(&e),
                "cannot remove the temporaries of killed snapshots"
            );
        }
        let mut attempt = 0;
        let tmp = loop {
            let mut tmp_name = std::ffi::OsString::from(".");
            tmp_name.push(name);
            tmp_name.push(format!(
                "{TMP_MARKER}{}-{:016x}",
                std::process::id(),
                nonce()
            ));
            let tmp = parent.join(tmp_name);
            match create_private_dir(&tmp) {
                Ok(()) => break tmp,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
                Err(e) => return Err(io_error("create temporary snapshot directory", &tmp)(e)),
            }
        };
        tracing::debug!(tmp = %tmp.display(), "snapshot writer started");
        Ok(Self {
            target: target.to_path_buf(),
            tmp,
            parts: Vec::new(),
            pending: BTreeSet::new(),
            committed: false,
        })
    }

    /// The directory the snapshot will appear at.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The temporary directory parts are written into.
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// The parts finished so far.
    pub fn parts(&self) -> &[PartEntry] {
        &self.parts
    }

    /// Starts a raw part (a disk image, say): a [`Write`] that hashes and counts as it goes.
    /// Hand it back to [`SnapshotWriter::finish_part`].
    pub fn add_part(&mut self, name: &str) -> Result<PartWriter, SnapshotError> {
        self.start_part(name, PartKind::Raw)
    }

    /// Starts a state part whose framed bytes the caller already has (copying a state part
    /// from elsewhere, such as a backup point). Hand it back to [`SnapshotWriter::finish_part`].
    pub fn add_state_part_bytes(&mut self, name: &str) -> Result<PartWriter, SnapshotError> {
        self.start_part(name, PartKind::State)
    }

    /// Writes `state` as a framed state part (see [`crate::state_file`]) and finishes it.
    pub fn write_state_part<T: Serialize>(
        &mut self,
        name: &str,
        state: &T,
    ) -> Result<(), SnapshotError> {
        let mut part = self.start_part(name, PartKind::State)?;
        if let Err(source) = write_state(&mut part, state) {
            // Forget the part entirely so that the name can be used again.
            self.pending.remove(name);
            let _ = fs::remove_file(&part.path);
            return Err(match source {
                crate::state_file::StateFileError::Io(e) => {
                    io_error(format!("write part '{name}' to"), &part.path)(e)
                }
                source => SnapshotError::StateWrite {
                    name: name.to_string(),
                    source,
                },
            });
        }
        self.finish_part(part)?;
        Ok(())
    }

    /// Flushes and fsyncs a part started by [`SnapshotWriter::add_part`] and records its size
    /// and hash.
    pub fn finish_part(&mut self, part: PartWriter) -> Result<&PartEntry, SnapshotError> {
        if part.owner != self.tmp || !self.pending.contains(&part.name) {
            return Err(SnapshotError::ForeignPart { name: part.name });
        }
        let PartWriter {
            name,
            path,
            file,
            hasher,
            size,
            kind,
            ..
        } = part;
        let file = file
            .into_inner()
            .map_err(|e| io_error(format!("write part '{name}' to"), &path)(e.into_error()))?;
        file.sync_all()
            .map_err(io_error(format!("fsync part '{name}' at"), &path))?;
        self.pending.remove(&name);
        self.parts.push(PartEntry {
            name,
            kind,
            size,
            blake3: hasher.finalize().into(),
            chunks: None,
        });
        Ok(self.parts.last().expect("a part was just pushed"))
    }

    /// Starts a memory part of `size` bytes, written in chunks of `chunk_size` bytes (normally
    /// [`crate::CHUNK_SIZE`]) in any order. Hand it back to
    /// [`SnapshotWriter::finish_memory_part`].
    pub fn add_memory_part(
        &mut self,
        name: &str,
        size: u64,
        chunk_size: u64,
    ) -> Result<MemoryPartWriter, SnapshotError> {
        if !is_valid_chunk_size(chunk_size) {
            return Err(SnapshotError::BadChunkSize {
                name: name.to_string(),
                chunk_size,
            });
        }
        self.check_new_name(name)?;
        let path = self.tmp.join(name);
        let file = create_file(&path, name)?;
        // Pre-size the file: chunks land at their offsets, and zero chunks stay holes.
        file.set_len(size)
            .map_err(io_error(format!("size part '{name}' at"), &path))?;
        self.pending.insert(name.to_string());
        let count = chunk_count(size, chunk_size);
        Ok(MemoryPartWriter {
            owner: self.tmp.clone(),
            name: name.to_string(),
            path,
            file,
            size,
            chunk_size,
            hashes: Mutex::new(vec![None; count as usize]),
            bytes_written: AtomicU64::new(0),
        })
    }

    /// fsyncs a memory part and records its chunk table. Every chunk must have been written.
    pub fn finish_memory_part(
        &mut self,
        part: MemoryPartWriter,
    ) -> Result<&PartEntry, SnapshotError> {
        if part.owner != self.tmp || !self.pending.contains(&part.name) {
            return Err(SnapshotError::ForeignPart { name: part.name });
        }
        let hashes = part
            .hashes
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let hashes = hashes
            .into_iter()
            .enumerate()
            .map(|(index, hash)| {
                hash.ok_or_else(|| SnapshotError::ChunkNotWritten {
                    name: part.name.clone(),
                    index: index as u64,
                })
            })
            .collect::<Result<Vec<ContentHash>, _>>()?;
        part.file.sync_all().map_err(io_error(
            format!("fsync part '{}' at", part.name),
            &part.path,
        ))?;
        self.pending.remove(&part.name);
        self.parts.push(PartEntry {
            name: part.name,
            kind: PartKind::Memory,
            size: part.size,
            blake3: chunk_table_hash(&hashes),
            chunks: Some(ChunkTable {
                chunk_size: part.chunk_size,
                hashes,
            }),
        });
        Ok(self.parts.last().expect("a part was just pushed"))
    }

    /// Makes the snapshot visible at the target, and returns its manifest.
    ///
    /// Every part was fsynced when it was finished. This writes and fsyncs `manifest.json`,
    /// fsyncs the temporary directory, renames it to the target (refusing to replace anything
    /// that appeared there meanwhile), and fsyncs the parent. If the final parent fsync fails the
    /// snapshot is already visible and complete, but its durability is not confirmed.
    pub fn commit(mut self) -> Result<Manifest, SnapshotError> {
        if let Some(name) = self.pending.first() {
            return Err(SnapshotError::UnfinishedPart { name: name.clone() });
        }
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            parts: self.parts.clone(),
        };
        let bytes = manifest.encode().map_err(SnapshotError::ManifestEncode)?;
        let path = self.tmp.join(MANIFEST_NAME);
        let mut file = create_file(&path, MANIFEST_NAME)?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(io_error("write", &path))?;
        sync_dir(&self.tmp)?;
        rename_noreplace(&self.tmp, &self.target).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                SnapshotError::Exists {
                    path: self.target.clone(),
                }
            } else {
                io_error(format!("rename {} to", self.tmp.display()), &self.target)(e)
            }
        })?;
        self.committed = true;
        if let Some(parent) = self.target.parent() {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            sync_dir(parent)?;
        }
        tracing::info!(
            target = %self.target.display(),
            bytes = manifest.total_size(),
            parts = manifest.parts.len(),
            "snapshot committed"
        );
        Ok(manifest)
    }

    /// Checks that `name` is valid and not yet used.
    fn check_new_name(&self, name: &str) -> Result<(), SnapshotError> {
        validate_part_name(name).map_err(|source| SnapshotError::PartName {
            name: name.to_string(),
            source,
        })?;
        if self.pending.contains(name) || self.parts.iter().any(|p| p.name == name) {
            return Err(SnapshotError::PartName {
                name: name.to_string(),
                source: ManifestError::DuplicatePart {
                    name: name.to_string(),
                },
            });
        }
        Ok(())
    }

    /// Creates a streamed part's file and its writer.
    fn start_part(&mut self, name: &str, kind: PartKind) -> Result<PartWriter, SnapshotError> {
        self.check_new_name(name)?;
        let path = self.tmp.join(name);
        let file = create_file(&path, name)?;
        self.pending.insert(name.to_string());
        Ok(PartWriter {
            owner: self.tmp.clone(),
            name: name.to_string(),
            path,
            file: BufWriter::with_capacity(PART_BUFFER, file),
            hasher: blake3::Hasher::new(),
            size: 0,
            kind,
        })
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        match fs::remove_dir_all(&self.tmp) {
            Ok(()) => tracing::info!(tmp = %self.tmp.display(), "uncommitted snapshot removed"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                tmp = %self.tmp.display(),
                error = %e,
                "cannot remove uncommitted snapshot; cleanup_stale will remove it later"
            ),
        }
    }
}

/// A streamed part being written: every byte written is hashed (blake3) and counted.
#[derive(Debug)]
pub struct PartWriter {
    owner: PathBuf,
    name: String,
    path: PathBuf,
    file: BufWriter<File>,
    hasher: blake3::Hasher,
    size: u64,
    kind: PartKind,
}

impl PartWriter {
    /// The part's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.size
    }
}

impl Write for PartWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A memory part being written in fixed-size chunks, in any order and from any number of
/// threads (`write_chunk` takes `&self`).
///
/// Each chunk's blake3 hash is recorded for the manifest's chunk table. A chunk may be written
/// again (a pre-copy round re-copying dirty memory); the last write counts. Two threads must not
/// write the same chunk at the same time. All-zero chunks are not written: the file is pre-sized,
/// so they read back as zeros from a hole.
#[derive(Debug)]
pub struct MemoryPartWriter {
    owner: PathBuf,
    name: String,
    path: PathBuf,
    file: File,
    size: u64,
    chunk_size: u64,
    hashes: Mutex<Vec<Option<ContentHash>>>,
    bytes_written: AtomicU64,
}

impl MemoryPartWriter {
    /// The part's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The part's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.size, self.chunk_size)
    }

    /// Bytes handed to `write_chunk` so far, zero chunks and rewrites included (for progress).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }

    /// Writes chunk `index`, which must be exactly the chunk's length (`chunk_size`, or less for
    /// the last chunk), and records its hash.
    pub fn write_chunk(&self, index: u64, data: &[u8]) -> Result<(), SnapshotError> {
        let range = chunk_range(self.size, self.chunk_size, index).ok_or_else(|| {
            SnapshotError::ChunkBounds {
                name: self.name.clone(),
                index,
                problem: format!("the part has {} chunks", self.chunk_count()),
            }
        })?;
        if data.len() as u64 != range.end - range.start {
            return Err(SnapshotError::ChunkBounds {
                name: self.name.clone(),
                index,
                problem: format!(
                    "{} bytes given, the chunk is {} bytes",
                    data.len(),
                    range.end - range.start
                ),
            });
        }
        let hash = chunk_hash(data);
        let previous = self.lock_hashes()[index as usize];
        // A zero chunk over a hole (never written, or zero before) needs no write.
        let hole_suffices = is_zero(data) && previous.is_none_or(|p| p == hash);
        if !hole_suffices {
            self.file.write_all_at(data, range.start).map_err(io_error(
                format!("write part '{}' to", self.name),
                &self.path,
            ))?;
        }
        self.lock_hashes()[index as usize] = Some(hash);
        self.bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The chunk hashes, tolerating a panic in another writer thread.
    fn lock_hashes(&self) -> std::sync::MutexGuard<'_, Vec<Option<ContentHash>>> {
        self.hashes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Creates a new file (mode 0600) for a part, refusing to reuse one.
fn create_file(path: &Path, name: &str) -> Result<File, SnapshotError> {
    create_private_file(path).map_err(io_error(format!("create part '{name}' at"), path))
}

/// A value that differs between calls and processes, for temporary names.
fn nonce() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    hasher.write_u128(now);
    hasher.finish()
}

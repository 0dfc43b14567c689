//! Reading and verifying a committed snapshot directory.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::{io_error, SnapshotError};
use crate::chunk::{chunk_count, chunk_hash, chunk_range, ContentHash};
use crate::manifest::{ChunkTable, Manifest, PartEntry, PartKind, MANIFEST_NAME, MAX_MANIFEST_LEN};
use crate::state_file::{
    read_state, StateFileError, DEFAULT_STATE_LIMIT, STATE_HEADER_LEN, STATE_TRAILER_LEN,
};

/// Read size when hashing streamed parts.
const READ_BUFFER: usize = 1 << 20;

/// Progress of [`SnapshotReader::verify_all`], reported at least once per part and about once
/// per MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyProgress<'a> {
    /// The part being verified.
    pub part: &'a str,
    /// Bytes verified so far, over all parts.
    pub bytes_done: u64,
    /// Bytes to verify in all.
    pub bytes_total: u64,
}

/// A committed snapshot whose manifest has been checked: its checksum, its version, and that
/// every part it lists exists with the listed size. Contents are checked when read or verified.
#[derive(Debug)]
pub struct SnapshotReader {
    dir: PathBuf,
    manifest: Manifest,
}

impl SnapshotReader {
    /// Opens the snapshot at `dir` and checks its manifest and part sizes.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let path = dir.join(MANIFEST_NAME);
        let file = File::open(&path).map_err(io_error("open snapshot manifest", &path))?;
        let mut bytes = Vec::new();
        // Read one byte past the limit so that an oversized file is seen as such.
        file.take(MAX_MANIFEST_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(io_error("read", &path))?;
        let manifest =
            Manifest::decode(&bytes).map_err(|source| SnapshotError::Manifest { path, source })?;
        let reader = Self {
            dir: dir.to_path_buf(),
            manifest,
        };
        for part in &reader.manifest.parts {
            reader.check_size(part)?;
        }
        Ok(reader)
    }

    /// The snapshot directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The checked manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest entry of part `name`.
    pub fn part(&self, name: &str) -> Result<&PartEntry, SnapshotError> {
        self.manifest
            .part(name)
            .ok_or_else(|| SnapshotError::NoSuchPart {
                name: name.to_string(),
            })
    }

    /// Reads and decodes a state part, after checking its blake3 hash against the manifest.
    pub fn read_state_part<T: DeserializeOwned>(&self, name: &str) -> Result<T, SnapshotError> {
        let entry = self.part_of_kind(name, PartKind::State)?;
        let path = self.dir.join(name);
        let state_error = |source| SnapshotError::State {
            name: name.to_string(),
            path: path.clone(),
            source,
        };
        let frame = STATE_HEADER_LEN + STATE_TRAILER_LEN;
        if entry.size > DEFAULT_STATE_LIMIT + frame {
            return Err(state_error(StateFileError::TooLarge {
                len: entry.size.saturating_sub(frame),
                limit: DEFAULT_STATE_LIMIT,
            }));
        }
        let file = File::open(&path).map_err(io_error(format!("open part '{name}' at"), &path))?;
        let mut bytes = Vec::with_capacity(entry.size as usize);
        file.take(entry.size + 1)
            .read_to_end(&mut bytes)
            .map_err(io_error(format!("read part '{name}' from"), &path))?;
        self.check_len(entry, bytes.len() as u64)?;
        if ContentHash::of(&bytes) != entry.blake3 {
            return Err(SnapshotError::PartCorrupt {
                name: name.to_string(),
                path,
            });
        }
        read_state(&mut bytes.as_slice(), DEFAULT_STATE_LIMIT).map_err(state_error)
    }

    /// Opens a raw part for reading, without verifying it (see [`SnapshotReader::copy_part`]).
    pub fn open_part(&self, name: &str) -> Result<File, SnapshotError> {
        self.part(name)?;
        let path = self.dir.join(name);
        File::open(&path).map_err(io_error(format!("open part '{name}' at"), &path))
    }

    /// Copies a state or raw part into `out` and checks its hash at the end; returns the bytes
    /// copied. On an error `out` holds unverified bytes and must be discarded.
    pub fn copy_part(&self, name: &str, out: &mut impl Write) -> Result<u64, SnapshotError> {
        let entry = self.part(name)?;
        if entry.kind == PartKind::Memory {
            return Err(SnapshotError::WrongKind {
                name: name.to_string(),
                expected: PartKind::Raw,
                found: PartKind::Memory,
            });
        }
        let out_error = |source| SnapshotError::Io {
            action: format!("copy part '{name}' out of"),
            path: self.dir.join(name),
            source,
        };
        self.stream_part(entry, &mut |data| out.write_all(data).map_err(out_error))?;
        Ok(entry.size)
    }

    /// Re-reads part `name` and checks it against the manifest: the whole-file hash, or for a
    /// memory part every chunk hash.
    pub fn verify_part(&self, name: &str) -> Result<(), SnapshotError> {
        let entry = self.part(name)?;
        self.verify_entry(entry, &mut |_| ())
    }

    /// Verifies every part in manifest order, reporting progress; stops at the first damage.
    pub fn verify_all(
        &self,
        mut progress: impl FnMut(&VerifyProgress<'_>),
    ) -> Result<(), SnapshotError> {
        let bytes_total = self.manifest.total_size();
        let mut bytes_done = 0;
        for entry in &self.manifest.parts {
            let base = bytes_done;
            progress(&VerifyProgress {
                part: &entry.name,
                bytes_done,
                bytes_total,
            });
            self.verify_entry(entry, &mut |done| {
                progress(&VerifyProgress {
                    part: &entry.name,
                    bytes_done: base + done,
                    bytes_total,
                })
            })?;
            bytes_done = base + entry.size;
        }
        progress(&VerifyProgress {
            part: "",
            bytes_done,
            bytes_total,
        });
        Ok(())
    }

    /// Opens memory part `name` for chunk-wise, verified reading.
    pub fn memory_part(&self, name: &str) -> Result<MemoryPart, SnapshotError> {
        let entry = self.part_of_kind(name, PartKind::Memory)?;
        let table = entry
            .chunks
            .clone()
            .expect("validated manifests give every memory part a chunk table");
        let path = self.dir.join(name);
        let file = File::open(&path).map_err(io_error(format!("open part '{name}' at"), &path))?;
        Ok(MemoryPart {
            name: name.to_string(),
            path,
            file,
            size: entry.size,
            table,
        })
    }

    /// The entry of `name`, which must be of kind `expected`.
    fn part_of_kind(&self, name: &str, expected: PartKind) -> Result<&PartEntry, SnapshotError> {
        let entry = self.part(name)?;
        if entry.kind != expected {
            return Err(SnapshotError::WrongKind {
                name: name.to_string(),
                expected,
                found: entry.kind,
            });
        }
        Ok(entry)
    }

    /// Checks that a part's file exists and has the manifest's size.
    fn check_size(&self, entry: &PartEntry) -> Result<(), SnapshotError> {
        let path = self.dir.join(&entry.name);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => self.check_len(entry, meta.len()),
            Ok(_) => Err(SnapshotError::PartMissing {
                name: entry.name.clone(),
                path,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(SnapshotError::PartMissing {
                name: entry.name.clone(),
                path,
            }),
            Err(e) => Err(io_error(format!("inspect part '{}' at", entry.name), &path)(e)),
        }
    }

    /// Refuses a length that differs from the manifest's size.
    fn check_len(&self, entry: &PartEntry, found: u64) -> Result<(), SnapshotError> {
        if found == entry.size {
            Ok(())
        } else {
            Err(SnapshotError::PartSize {
                name: entry.name.clone(),
                path: self.dir.join(&entry.name),
                expected: entry.size,
                found,
            })
        }
    }

    /// Verifies one part, calling `done` with the bytes of this part verified so far.
    fn verify_entry(
        &self,
        entry: &PartEntry,
        done: &mut dyn FnMut(u64),
    ) -> Result<(), SnapshotError> {
        if entry.kind == PartKind::Memory {
            let memory = self.memory_part(&entry.name)?;
            let mut buf = vec![0u8; memory.chunk_size() as usize];
            let mut verified = 0;
            for index in 0..memory.chunk_count() {
                let range = memory
                    .chunk_range(index)
                    .expect("index below the chunk count");
                let len = (range.end - range.start) as usize;
                memory.read_chunk(index, &mut buf[..len])?;
                verified += len as u64;
                done(verified);
            }
            let len = memory
                .file
                .metadata()
                .map_err(io_error(
                    format!("inspect part '{}' at", entry.name),
                    &memory.path,
                ))?
                .len();
            return self.check_len(entry, len);
        }
        let mut verified = 0;
        self.stream_part(entry, &mut |data| {
            verified += data.len() as u64;
            done(verified);
            Ok(())
        })
    }

    /// Reads a streamed part once, handing each piece to `sink`, and checks length and hash.
    fn stream_part(
        &self,
        entry: &PartEntry,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), SnapshotError>,
    ) -> Result<(), SnapshotError> {
        let path = self.dir.join(&entry.name);
        let read_error = || io_error(format!("read part '{}' from", entry.name), &path);
        let mut file = File::open(&path).map_err(read_error())?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; READ_BUFFER.min(entry.size as usize + 1)];
        let mut total = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error()(e)),
            };
            total += n as u64;
            if total > entry.size {
                break;
            }
            hasher.update(&buf[..n]);
            sink(&buf[..n])?;
        }
        self.check_len(entry, total)?;
        if ContentHash::from(hasher.finalize()) != entry.blake3 {
            return Err(SnapshotError::PartCorrupt {
                name: entry.name.clone(),
                path,
            });
        }
        Ok(())
    }
}

/// A memory part opened for lazy restore: the file, the chunk table, and verified chunk reads.
///
/// All methods take `&self` and use positioned reads, so one `MemoryPart` can serve a fault
/// handler and a prefetch thread at once.
#[derive(Debug)]
pub struct MemoryPart {
    name: String,
    path: PathBuf,
    file: File,
    size: u64,
    table: ChunkTable,
}

impl MemoryPart {
    /// The part's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The part's size in bytes (the guest memory size).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per chunk; the last chunk may be shorter.
    pub fn chunk_size(&self) -> u64 {
        self.table.chunk_size
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.size, self.table.chunk_size)
    }

    /// The chunk table's hashes, in order.
    pub fn chunk_hashes(&self) -> &[ContentHash] {
        &self.table.hashes
    }

    /// The byte range of chunk `index` in the part, or `None` past the end.
    pub fn chunk_range(&self, index: u64) -> Option<Range<u64>> {
        chunk_range(self.size, self.table.chunk_size, index)
    }

    /// The part's file, for callers that read it their own way (then use
    /// [`MemoryPart::verify_chunk`]).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Checks that `data` is chunk `index` as recorded in the manifest.
    pub fn verify_chunk(&self, index: u64, data: &[u8]) -> Result<(), SnapshotError> {
        self.checked_range(index, data.len())?;
        if chunk_hash(data) != self.table.hashes[index as usize] {
            return Err(SnapshotError::ChunkCorrupt {
                name: self.name.clone(),
                path: self.path.clone(),
                index,
            });
        }
        Ok(())
    }

    /// Reads chunk `index` into `buf` (exactly the chunk's length) and verifies it.
    pub fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        let range = self.checked_range(index, buf.len())?;
        if let Err(e) = self.file.read_exact_at(buf, range.start) {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                let found = self.file.metadata().map(|m| m.len()).unwrap_or(0);
                return Err(SnapshotError::PartSize {
                    name: self.name.clone(),
                    path: self.path.clone(),
                    expected: self.size,
                    found,
                });
            }
            return Err(io_error(
                format!("read part '{}' from", self.name),
                &self.path,
            )(e));
        }
        self.verify_chunk(index, buf)
    }

    /// The range of chunk `index`, checking the index and the caller's buffer length.
    fn checked_range(&self, index: u64, len: usize) -> Result<Range<u64>, SnapshotError> {
        let range = self
            .chunk_range(index)
            .ok_or_else(|| SnapshotError::ChunkBounds {
                name: self.name.clone(),
                index,
                problem: format!("the part has {} chunks", self.chunk_count()),
            })?;
        if len as u64 != range.end - range.start {
            return Err(SnapshotError::ChunkBounds {
                name: self.name.clone(),
                index,
                problem: format!(
                    "{len} bytes given, the chunk is {} bytes",
                    range.end - range.start
                ),
            });
        }
        Ok(range)
    }
}

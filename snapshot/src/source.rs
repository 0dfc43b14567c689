//! One interface for where a lazy restore reads guest memory from: a snapshot directory's memory
//! part ([`MemoryPart`]) or an object of a backup point ([`ObjectReader`]). Every chunk is checked
//! against its hash before it is handed out.

use std::sync::OnceLock;

use crate::chunk::chunk_hash;
use crate::dir::{MemoryPart, SnapshotError};
use crate::repo::{ObjectReader, RepoError};

/// Why a chunk could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ChunkSourceError {
    /// The snapshot directory could not give the chunk.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The repository could not give the chunk.
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// Guest memory in fixed-size, verified chunks, readable from any thread.
pub trait ChunkSource: Send + Sync {
    /// The size in bytes.
    fn size(&self) -> u64;
    /// Bytes per chunk; the last chunk may be shorter.
    fn chunk_size(&self) -> u64;
    /// Number of chunks.
    fn chunk_count(&self) -> u64;
    /// Whether chunk `index` is all zeros and the source vouches for that without reading it, so
    /// that a restore can map zero pages instead of reading and copying. A source that cannot
    /// vouch (its record says zero but the stored bytes might say otherwise) answers `false`, and
    /// the caller reads and checks the chunk like any other.
    fn is_zero_chunk(&self, index: u64) -> bool;
    /// Reads chunk `index` into `buf` (exactly the chunk's length) and checks it.
    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<(), ChunkSourceError>;
}

impl ChunkSource for MemoryPart {
    fn size(&self) -> u64 {
        MemoryPart::size(self)
    }

    fn chunk_size(&self) -> u64 {
        MemoryPart::chunk_size(self)
    }

    fn chunk_count(&self) -> u64 {
        MemoryPart::chunk_count(self)
    }

    fn is_zero_chunk(&self, index: u64) -> bool {
        static FULL_ZERO: OnceLock<(u64, crate::ContentHash)> = OnceLock::new();
        let Some(range) = self.chunk_range(index) else {
            return false;
        };
        let len = range.end - range.start;
        let (full_len, full_hash) = *FULL_ZERO.get_or_init(|| {
            (
                self.chunk_size(),
                chunk_hash(&vec![0u8; self.chunk_size() as usize]),
            )
        });
        let zero = if len == full_len {
            full_hash
        } else {
            chunk_hash(&vec![0u8; len as usize])
        };
        // The hash says zero; the file vouches for it only if it holds no data there (a byte
        // written into the hole must be read, and is then refused by the hash check).
        self.chunk_hashes()[index as usize] == zero && is_hole(self.file(), range.start, len)
    }

    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<(), ChunkSourceError> {
        Ok(MemoryPart::read_chunk(self, index, buf)?)
    }
}

/// Whether `[off, off + len)` of `file` holds no data at all (a hole, which reads as zeros).
/// `false` when the file system cannot tell.
fn is_hole(file: &std::fs::File, off: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(start) = libc::off_t::try_from(off) else {
        return false;
    };
    // SAFETY: lseek on a descriptor `file` owns for the duration of the call; SEEK_DATA only
    // reports an offset and the shared file position is not used by positioned reads.
    let next = unsafe { libc::lseek(file.as_raw_fd(), start, libc::SEEK_DATA) };
    if next < 0 {
        // ENXIO: no data at or after `off`; the rest of the file is a hole.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    next as u64 >= off + len
}

impl ChunkSource for ObjectReader {
    fn size(&self) -> u64 {
        ObjectReader::size(self)
    }

    fn chunk_size(&self) -> u64 {
        ObjectReader::chunk_size(self)
    }

    fn chunk_count(&self) -> u64 {
        ObjectReader::chunk_count(self)
    }

    fn is_zero_chunk(&self, index: u64) -> bool {
        ObjectReader::is_zero_chunk(self, index)
    }

    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<(), ChunkSourceError> {
        Ok(ObjectReader::read_chunk(self, index, buf)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dir::{SnapshotReader, SnapshotWriter};
    use crate::repo::{RepoKey, Repository};
    use crate::test_util::TestDir;
    use crate::CHUNK_SIZE;

    /// Reads everything through the trait, as a lazy restore would.
    fn read_all(source: &dyn ChunkSource) -> (Vec<u8>, Vec<u64>) {
        let mut out = Vec::new();
        let mut zeros = Vec::new();
        for index in 0..source.chunk_count() {
            let len = (source.size() - index * source.chunk_size()).min(source.chunk_size());
            let mut buf = vec![0xaa; len as usize];
            source.read_chunk(index, &mut buf).unwrap();
            if source.is_zero_chunk(index) {
                assert!(buf.iter().all(|&b| b == 0));
                zeros.push(index);
            }
            out.extend_from_slice(&buf);
        }
        (out, zeros)
    }

    /// A snapshot directory at `dir` holding `mem` as its memory part, opened for reading.
    fn memory_snapshot(dir: &std::path::Path, mem: &[u8]) -> SnapshotReader {
        let mut snap = SnapshotWriter::create(dir).unwrap();
        let part = snap
            .add_memory_part("memory", mem.len() as u64, CHUNK_SIZE as u64)
            .unwrap();
        for (i, chunk) in mem.chunks(CHUNK_SIZE).enumerate() {
            part.write_chunk(i as u64, chunk).unwrap();
        }
        snap.finish_memory_part(part).unwrap();
        snap.commit().unwrap();
        SnapshotReader::open(dir).unwrap()
    }

    #[test]
    fn same_memory_from_a_directory_and_from_repositories() {
        let tmp = TestDir::new("source");
        let mut mem = vec![0u8; 3 * CHUNK_SIZE + 100];
        mem[..CHUNK_SIZE].fill(1);
        mem[2 * CHUNK_SIZE..].fill(9);
        let reader = memory_snapshot(&tmp.path().join("snap"), &mem);
        let part = reader.memory_part("memory").unwrap();
        assert_eq!(read_all(&part), (mem.clone(), vec![1]));

        for key in [None, Some(RepoKey::generate())] {
            let root = tmp.path().join(format!("repo-{}", key.is_some()));
            let repo = Repository::init(&root, key).unwrap();
            let point = repo.store_snapshot(&reader, "vm1", None).unwrap();
            let object = repo.object_reader(&point, "memory").unwrap();
            assert_eq!(read_all(&object), (mem.clone(), vec![1]));
            let mut short = vec![0u8; 10];
            assert!(object.read_chunk(0, &mut short).is_err());
            assert!(repo.object_reader(&point, "nope").is_err());
        }
    }

    #[test]
    fn a_zero_chunk_with_data_in_its_hole_is_not_vouched_for() {
        let tmp = TestDir::new("source-hole");
        let mem = vec![0u8; 2 * CHUNK_SIZE];
        let dir = tmp.path().join("snap");
        let reader = memory_snapshot(&dir, &mem);
        let part = reader.memory_part("memory").unwrap();
        if !is_hole(part.file(), 0, 2 * CHUNK_SIZE as u64) {
            eprintln!("this file system does not report holes; nothing to check");
            return;
        }
        assert!(part.is_zero_chunk(0) && part.is_zero_chunk(1));
        drop(part);
        // One byte written into chunk 1's hole: the hash still says zero, the file does not.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("memory"))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[7], CHUNK_SIZE as u64 + 4096).unwrap();
        let part = reader.memory_part("memory").unwrap();
        assert!(part.is_zero_chunk(0));
        assert!(!part.is_zero_chunk(1));
        let mut buf = vec![0u8; CHUNK_SIZE];
        assert!(ChunkSource::read_chunk(&part, 1, &mut buf).is_err());
    }
}

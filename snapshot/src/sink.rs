//! One interface for where a memory copier puts chunks: a snapshot directory's memory part
//! ([`MemoryPartWriter`]) or an object of a backup point ([`ObjectWriter`]), so that the same
//! copy-on-write or pre-copy engine can write either.

use crate::dir::{MemoryPartWriter, SnapshotError};
use crate::repo::{ObjectWriter, RepoError};

/// Why a chunk could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum MemorySinkError {
    /// The snapshot directory refused the chunk.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The repository refused the chunk.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// A worker of a [`crate::sink_pipeline::PipelineSink`] failed earlier (its error is
    /// returned by `finish`).
    #[error("an earlier chunk could not be stored: {earlier}")]
    PipelineFailed { earlier: String },
    /// A pipeline worker thread could not be started.
    #[error("cannot start a backup worker thread")]
    Spawn(#[source] std::io::Error),
}

/// A destination for guest memory in fixed-size chunks, written in any order from any thread.
pub trait MemorySink: Send + Sync {
    /// Bytes per chunk; the last chunk may be shorter.
    fn chunk_size(&self) -> u64;
    /// Number of chunks.
    fn chunk_count(&self) -> u64;
    /// Stores chunk `index`, which must be exactly the chunk's length.
    fn write_chunk(&self, index: u64, data: &[u8]) -> Result<(), MemorySinkError>;
    /// Records chunk `index` as unchanged since the previous backup without its data, if this
    /// sink can; returns whether it did. When it returns `false` the caller copies the chunk.
    /// A snapshot directory never can; a backup object can when its parent point has the object.
    fn reuse_unchanged(&self, index: u64) -> Result<bool, MemorySinkError>;
}

impl MemorySink for MemoryPartWriter {
    fn chunk_size(&self) -> u64 {
        MemoryPartWriter::chunk_size(self)
    }

    fn chunk_count(&self) -> u64 {
        MemoryPartWriter::chunk_count(self)
    }

    fn write_chunk(&self, index: u64, data: &[u8]) -> Result<(), MemorySinkError> {
        Ok(MemoryPartWriter::write_chunk(self, index, data)?)
    }

    fn reuse_unchanged(&self, _index: u64) -> Result<bool, MemorySinkError> {
        Ok(false)
    }
}

impl MemorySink for ObjectWriter {
    fn chunk_size(&self) -> u64 {
        ObjectWriter::chunk_size(self)
    }

    fn chunk_count(&self) -> u64 {
        ObjectWriter::chunk_count(self)
    }

    fn write_chunk(&self, index: u64, data: &[u8]) -> Result<(), MemorySinkError> {
        self.put_chunk(index, data)?;
        Ok(())
    }

    fn reuse_unchanged(&self, index: u64) -> Result<bool, MemorySinkError> {
        if !self.has_parent() {
            return Ok(false);
        }
        self.reuse_parent_chunk(index)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dir::{SnapshotReader, SnapshotWriter};
    use crate::manifest::PartKind;
    use crate::repo::Repository;
    use crate::test_util::TestDir;
    use crate::CHUNK_SIZE;

    /// A copier that knows nothing of where it writes: chunks in `dirty` are copied, the rest
    /// reused when the sink can.
    fn copy(sink: &dyn MemorySink, mem: &[u8], dirty: &[u64]) -> u64 {
        let mut copied = 0;
        for index in 0..sink.chunk_count() {
            if !dirty.contains(&index) && sink.reuse_unchanged(index).unwrap() {
                continue;
            }
            let start = (index * sink.chunk_size()) as usize;
            let end = (start + sink.chunk_size() as usize).min(mem.len());
            sink.write_chunk(index, &mem[start..end]).unwrap();
            copied += 1;
        }
        copied
    }

    #[test]
    fn one_copier_two_destinations() {
        let tmp = TestDir::new("sink");
        let mem: Vec<u8> = (0..3 * CHUNK_SIZE + 10).map(|i| (i / 4096) as u8).collect();

        let mut snap = SnapshotWriter::create(&tmp.path().join("snap")).unwrap();
        let part = snap
            .add_memory_part("memory", mem.len() as u64, CHUNK_SIZE as u64)
            .unwrap();
        assert_eq!(
            copy(&part, &mem, &[]),
            4,
            "a snapshot directory copies everything"
        );
        snap.finish_memory_part(part).unwrap();
        snap.commit().unwrap();
        let reader = SnapshotReader::open(&tmp.path().join("snap")).unwrap();
        reader.verify_all(|_| ()).unwrap();

        let repo = Repository::init(&tmp.path().join("repo"), None).unwrap();
        let mut first = repo.start_backup("vm1", None).unwrap();
        let object = first
            .add_object("memory", PartKind::Memory, mem.len() as u64)
            .unwrap();
        assert_eq!(
            copy(&object, &mem, &[]),
            4,
            "no parent: everything is copied"
        );
        first.finish_object(object).unwrap();
        let first = first.commit().unwrap();
        let mut second = repo.start_backup("vm1", Some(&first.id)).unwrap();
        let object = second
            .add_object("memory", PartKind::Memory, mem.len() as u64)
            .unwrap();
        assert_eq!(
            copy(&object, &mem, &[2]),
            1,
            "only the dirty chunk is copied"
        );
        second.finish_object(object).unwrap();
        let second = second.commit().unwrap();
        let mut restored = Vec::new();
        repo.read_object(&second, "memory", &mut restored).unwrap();
        assert_eq!(restored, mem);
    }
}

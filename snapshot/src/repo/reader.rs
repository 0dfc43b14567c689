//! Reading one object of a backup point chunk by chunk, each chunk checked, from any thread: what
//! a lazy restore needs to fill guest memory straight from the repository.

use std::sync::{Arc, OnceLock};

use super::codec::{chunk_id, chunk_object_name, decode_chunk};
use super::key::RepoKey;
use super::store::{ChunkStore, StoreError};
use super::{PointManifest, RepoError, Repository};
use crate::chunk::{chunk_count, chunk_range, ContentHash};

impl Repository {
    /// A reader of object `name` of `point`.
    pub fn object_reader(
        &self,
        point: &PointManifest,
        name: &str,
    ) -> Result<ObjectReader, RepoError> {
        let object = point.object(name).ok_or_else(|| RepoError::NoSuchObject {
            id: point.id.clone(),
            name: name.to_string(),
        })?;
        Ok(ObjectReader {
            store: self.store_arc(),
            key: self.key_arc(),
            name: name.to_string(),
            size: object.size,
            chunk_size: object.chunk_size,
            chunks: object.chunks.clone(),
            full_zero_id: OnceLock::new(),
        })
    }
}

/// One object of a backup point, read chunk by chunk with every chunk checked against its id.
/// All methods take `&self`; it can be shared between a fault handler and a prefetch thread.
pub struct ObjectReader {
    store: Arc<dyn ChunkStore>,
    key: Option<Arc<RepoKey>>,
    name: String,
    size: u64,
    chunk_size: u64,
    chunks: Vec<ContentHash>,
    /// The id of a full-length all-zero chunk, computed once (it is keyed in an encrypted
    /// repository, so it cannot be a constant).
    full_zero_id: OnceLock<ContentHash>,
}

impl ObjectReader {
    /// The object's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The object's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per chunk; the last chunk may be shorter.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.size, self.chunk_size)
    }

    /// The chunk ids, in order.
    pub fn chunk_ids(&self) -> &[ContentHash] {
        &self.chunks
    }

    /// Whether chunk `index` is all zeros (known from its id, without reading it).
    pub fn is_zero_chunk(&self, index: u64) -> bool {
        let Some(range) = chunk_range(self.size, self.chunk_size, index) else {
            return false;
        };
        let len = range.end - range.start;
        let zero_id = |len: u64| chunk_id(&vec![0u8; len as usize], self.key.as_deref());
        let zero = if len == self.chunk_size {
            *self.full_zero_id.get_or_init(|| zero_id(len))
        } else {
            zero_id(len)
        };
        self.chunks[index as usize] == zero
    }

    /// Reads chunk `index` into `buf`, which must be exactly the chunk's length.
    pub fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<(), RepoError> {
        let bounds = |problem: String| RepoError::ChunkBounds {
            name: self.name.clone(),
            index,
            problem,
        };
        let range = chunk_range(self.size, self.chunk_size, index)
            .ok_or_else(|| bounds(format!("the object has {} chunks", self.chunk_count())))?;
        if buf.len() as u64 != range.end - range.start {
            return Err(bounds(format!(
                "{} bytes asked for, the chunk is {} bytes",
                buf.len(),
                range.end - range.start
            )));
        }
        // An all-zero chunk is known from its id: no read, and a damaged copy does not matter.
        if self.is_zero_chunk(index) {
            buf.fill(0);
            return Ok(());
        }
        let id = &self.chunks[index as usize];
        let stored = self
            .store
            .get(&chunk_object_name(id))
            .map_err(|e| match e {
                StoreError::NotFound { .. } => RepoError::ChunkMissing { id: id.to_hex() },
                other => other.into(),
            })?;
        let data = decode_chunk(id, &stored, self.key.as_deref()).map_err(|source| {
            RepoError::ChunkDamaged {
                id: id.to_hex(),
                source,
            }
        })?;
        if data.len() != buf.len() {
            return Err(bounds(format!(
                "the stored chunk is {} bytes, the object needs {}",
                data.len(),
                buf.len()
            )));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }
}

//! Writing one backup point: objects filled chunk by chunk (new chunks hashed and stored once,
//! unchanged ones reused from the parent point), then the manifest created last.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::codec::{chunk_id, chunk_id_from_name, chunk_object_name, encode_chunk_timed};
use super::compression::Compression;
use super::key::RepoKey;
use super::point::{new_point_id, point_object_name, PointManifest, PointObject, PointStats};
use super::stage_times::{Stage, StageTimes};
use super::store::{ChunkStore, StoreLock};
use super::RepoError;
use crate::chunk::{chunk_count, chunk_range, chunk_table_hash, ContentHash, CHUNK_SIZE};
use crate::error::lock;
use crate::manifest::{validate_part_name, PartKind};
use crate::state_file::write_state;
use crate::FORMAT_VERSION;

/// A backup point being written. Holds the repository's shared lock, so garbage collection
/// cannot remove chunks this backup reuses. Nothing is visible until [`BackupWriter::commit`];
/// chunks stored by an abandoned backup are collected by the next garbage collection.
pub struct BackupWriter {
    store: Arc<dyn ChunkStore>,
    key: Option<Arc<RepoKey>>,
    compression: Compression,
    lock: StoreLock,
    token: u64,
    vm: String,
    parent: Option<PointManifest>,
    objects: Vec<PointObject>,
    pending: BTreeSet<String>,
    stats: PointStats,
    reused: HashSet<ContentHash>,
}

impl BackupWriter {
    /// Starts a backup of `vm`; `parent` is the point whose chunk ids may be reused.
    pub(super) fn new(
        store: Arc<dyn ChunkStore>,
        key: Option<Arc<RepoKey>>,
        lock: StoreLock,
        vm: &str,
        parent: Option<PointManifest>,
    ) -> Self {
        static TOKENS: AtomicU64 = AtomicU64::new(1);
        Self {
            store,
            key,
            compression: Compression::default(),
            lock,
            token: TOKENS.fetch_add(1, Ordering::Relaxed),
            vm: vm.to_string(),
            parent,
            objects: Vec::new(),
            pending: BTreeSet::new(),
            stats: PointStats::default(),
            reused: HashSet::new(),
        }
    }

    /// Sets how the objects added from now on compress their chunks.
    pub fn set_compression(&mut self, compression: Compression) {
        self.compression = compression;
    }

    /// How many chunk writes this backup should keep in flight (see
    /// [`ChunkStore::writes_in_flight`]).
    pub fn writes_in_flight(&self) -> usize {
        self.store.writes_in_flight()
    }

    /// The parent point, if this backup is incremental.
    pub fn parent(&self) -> Option<&PointManifest> {
        self.parent.as_ref()
    }

    /// Starts an object of `size` bytes in [`CHUNK_SIZE`] chunks. If the parent point has an
    /// object of the same name, kind and size, its chunk ids can be reused.
    pub fn add_object(
        &mut self,
        name: &str,
        kind: PartKind,
        size: u64,
    ) -> Result<ObjectWriter, RepoError> {
        let misuse = |problem: &str| RepoError::ObjectMisuse {
            name: name.to_string(),
            problem: problem.to_string(),
        };
        validate_part_name(name).map_err(|_| misuse("the name is not valid"))?;
        if self.pending.contains(name) || self.objects.iter().any(|o| o.name == name) {
            return Err(misuse("the name is already used"));
        }
        let chunk_size = CHUNK_SIZE as u64;
        let parent_chunks = self
            .parent
            .as_ref()
            .and_then(|p| p.object(name))
            .filter(|o| o.kind == kind && o.size == size && o.chunk_size == chunk_size)
            .map(|o| o.chunks.clone());
        self.pending.insert(name.to_string());
        Ok(ObjectWriter {
            store: self.store.clone(),
            key: self.key.clone(),
            compression: self.compression,
            token: self.token,
            name: name.to_string(),
            kind,
            size,
            chunk_size,
            parent_chunks,
            slots: Mutex::new(vec![None; chunk_count(size, chunk_size) as usize]),
            hashed: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            new: AtomicU64::new(0),
            bytes_hashed: AtomicU64::new(0),
            bytes_stored: AtomicU64::new(0),
            zero_id: OnceLock::new(),
            known: Mutex::new(HashSet::new()),
            times: StageTimes::default(),
        })
    }

    /// Stores `state` as a framed state object (see [`crate::state_file`]).
    pub fn put_state<T: Serialize>(&mut self, name: &str, state: &T) -> Result<(), RepoError> {
        let mut bytes = Vec::new();
        write_state(&mut bytes, state).map_err(|source| RepoError::State {
            name: name.to_string(),
            source,
        })?;
        let object = self.add_object(name, PartKind::State, bytes.len() as u64)?;
        for (index, chunk) in bytes.chunks(object.chunk_size as usize).enumerate() {
            object.put_chunk(index as u64, chunk)?;
        }
        self.finish_object(object)
    }

    /// Records a finished object. Every chunk must have been put or reused.
    pub fn finish_object(&mut self, object: ObjectWriter) -> Result<(), RepoError> {
        if object.token != self.token || !self.pending.contains(&object.name) {
            return Err(RepoError::ObjectMisuse {
                name: object.name,
                problem: "it was not added to this backup".into(),
            });
        }
        let slots = object
            .slots
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut chunks = Vec::with_capacity(slots.len());
        for (index, slot) in slots.into_iter().enumerate() {
            chunks.push(slot.ok_or_else(|| RepoError::ChunkNotWritten {
                name: object.name.clone(),
                index: index as u64,
            })?);
        }
        if let Some(parent_chunks) = &object.parent_chunks {
            // Remember reused ids so that commit can check they are still stored.
            for (mine, theirs) in chunks.iter().zip(parent_chunks) {
                if mine == theirs {
                    self.reused.insert(*mine);
                }
            }
        }
        tracing::info!(
            object = %object.name,
            "backup object stages: {}",
            object.times.summary()
        );
        let stats = &mut self.stats;
        stats.chunks_total += chunks.len() as u64;
        stats.chunks_hashed += object.hashed.into_inner();
        stats.chunks_reused += object.reused.into_inner();
        stats.chunks_new += object.new.into_inner();
        stats.bytes_hashed += object.bytes_hashed.into_inner();
        stats.bytes_stored += object.bytes_stored.into_inner();
        stats.bytes_total += object.size;
        self.pending.remove(&object.name);
        self.objects.push(PointObject {
            name: object.name,
            kind: object.kind,
            size: object.size,
            chunk_size: object.chunk_size,
            blake3: chunk_table_hash(&chunks),
            chunks,
        });
        Ok(())
    }

    /// Makes the point visible: checks that every reused chunk is still stored, then creates
    /// the point manifest (create-if-absent; every chunk was durable before this).
    ///
    /// The reused chunks are the parent point's, and the parent existed when the shared lock
    /// was taken ([`super::Repository::start_backup`]); garbage collection needs the exclusive
    /// lock, so while the shared one was held without a gap they are all still there and the
    /// check is skipped (on S3 it is one request per chunk). After a gap (a lease renewed too
    /// late) every one is checked.
    pub fn commit(self) -> Result<PointManifest, RepoError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.commit_at(now)
    }

    /// [`BackupWriter::commit`] with the point's creation time given as a duration since the
    /// Unix epoch: for importing points with their original times, and for retention tests.
    pub fn commit_at(self, now: Duration) -> Result<PointManifest, RepoError> {
        if let Some(name) = self.pending.first() {
            return Err(RepoError::ObjectMisuse {
                name: name.clone(),
                problem: "it was added but never finished".into(),
            });
        }
        let reused: Vec<String> = if self.lock.unbroken() {
            Vec::new()
        } else {
            tracing::warn!(
                "the repository lock was not held throughout the backup: checking that every reused chunk is still stored"
            );
            self.reused.iter().map(chunk_object_name).collect()
        };
        if let Some(name) = self.store.first_missing(&reused)? {
            let id = chunk_id_from_name(&name).map_or(name, |id| id.to_hex());
            return Err(RepoError::ChunkMissing { id });
        }
        let nonce = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            (now, self.token, std::process::id()),
        ) as u32;
        let point = PointManifest {
            format_version: FORMAT_VERSION,
            id: new_point_id(&self.vm, now.as_secs(), now.subsec_nanos(), nonce),
            vm: self.vm.clone(),
            created_unix_ms: now.as_millis() as u64,
            parent: self.parent.as_ref().map(|p| p.id.clone()),
            objects: self.objects,
            stats: self.stats,
        };
        let bytes = point.encode(self.key.as_deref())?;
        if !self
            .store
            .put_if_absent(&point_object_name(&point.id), &bytes)?
        {
            return Err(RepoError::PointExists { id: point.id });
        }
        tracing::info!(
            id = %point.id,
            new_chunks = point.stats.chunks_new,
            reused = point.stats.chunks_reused,
            stored = point.stats.bytes_stored,
            "backup point committed"
        );
        Ok(point)
    }
}

/// One object of a backup being filled, chunk by chunk, in any order and from any number of
/// threads (all methods take `&self`). Two threads must not fill the same chunk at once.
pub struct ObjectWriter {
    store: Arc<dyn ChunkStore>,
    key: Option<Arc<RepoKey>>,
    compression: Compression,
    token: u64,
    name: String,
    kind: PartKind,
    size: u64,
    chunk_size: u64,
    parent_chunks: Option<Vec<ContentHash>>,
    slots: Mutex<Vec<Option<ContentHash>>>,
    hashed: AtomicU64,
    reused: AtomicU64,
    new: AtomicU64,
    bytes_hashed: AtomicU64,
    bytes_stored: AtomicU64,
    /// The id of a whole chunk of zeros, once one was stored by this object: later zero chunks
    /// take it without being hashed, compressed or stored.
    zero_id: OnceLock<ContentHash>,
    /// Ids this object stored, or found stored: a later chunk with the same bytes costs its
    /// hash only (no compression, no request to the store).
    known: Mutex<HashSet<ContentHash>>,
    /// Where this object's time went.
    times: StageTimes,
}

impl ObjectWriter {
    /// The object's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.size, self.chunk_size)
    }

    /// Whether the parent point has this object with the same geometry, so that
    /// [`ObjectWriter::reuse_parent_chunk`] works.
    pub fn has_parent(&self) -> bool {
        self.parent_chunks.is_some()
    }

    /// Hashes chunk `index` and stores it unless the repository already has it; returns its id.
    pub fn put_chunk(&self, index: u64, data: &[u8]) -> Result<ContentHash, RepoError> {
        let range = chunk_range(self.size, self.chunk_size, index).ok_or_else(|| {
            self.bounds(
                index,
                format!("the object has {} chunks", self.chunk_count()),
            )
        })?;
        if data.len() as u64 != range.end - range.start {
            return Err(self.bounds(
                index,
                format!(
                    "{} bytes given, the chunk is {} bytes",
                    data.len(),
                    range.end - range.start
                ),
            ));
        }
        let t = &self.times;
        let zero = data.len() as u64 == self.chunk_size
            && t.time(Stage::ZeroCheck, data.len(), || is_zero(data));
        if let Some(id) = self.zero_id.get().filter(|_| zero) {
            // Stored by this object already: nothing to hash, compress or store.
            t.count_zero_chunk();
            self.hashed.fetch_add(1, Ordering::Relaxed);
            self.bytes_hashed
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            self.set_slot(index, *id);
            return Ok(*id);
        }
        let id = t.time(Stage::Hash, data.len(), || {
            chunk_id(data, self.key.as_deref())
        });
        let name = chunk_object_name(&id);
        let known = lock(&self.known).contains(&id);
        let probe = self.store.probe_before_put();
        if !known && (!probe || !t.time(Stage::Store, 0, || self.store.contains(&name))?) {
            let stored = encode_chunk_timed(&id, data, self.key.as_deref(), self.compression, t);
            if t.time(Stage::Store, stored.len(), || {
                self.store.put_if_absent(&name, &stored)
            })? {
                self.new.fetch_add(1, Ordering::Relaxed);
                self.bytes_stored
                    .fetch_add(stored.len() as u64, Ordering::Relaxed);
            }
        }
        if zero {
            let _ = self.zero_id.set(id);
        }
        if !known {
            lock(&self.known).insert(id);
        }
        self.hashed.fetch_add(1, Ordering::Relaxed);
        self.bytes_hashed
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.set_slot(index, id);
        Ok(id)
    }

    /// Uses `id` for chunk `index` without reading the chunk if the repository already stores
    /// it (the caller knows the chunk's id, from a snapshot's chunk table say); returns whether
    /// it did. If not, the caller must [`ObjectWriter::put_chunk`] the data.
    pub fn reuse_stored_chunk(&self, index: u64, id: ContentHash) -> Result<bool, RepoError> {
        if index >= self.chunk_count() {
            return Err(self.bounds(
                index,
                format!("the object has {} chunks", self.chunk_count()),
            ));
        }
        if !self.store.contains(&chunk_object_name(&id))? {
            return Ok(false);
        }
        self.reused.fetch_add(1, Ordering::Relaxed);
        self.set_slot(index, id);
        Ok(true)
    }

    /// Takes chunk `index`'s id from the parent point without reading it (the caller knows the
    /// chunk has not changed since the parent point); returns the id.
    pub fn reuse_parent_chunk(&self, index: u64) -> Result<ContentHash, RepoError> {
        let parent = self
            .parent_chunks
            .as_ref()
            .ok_or_else(|| self.bounds(index, "the parent point has no such object".into()))?;
        let id = *parent
            .get(index as usize)
            .ok_or_else(|| self.bounds(index, format!("the object has {} chunks", parent.len())))?;
        self.reused.fetch_add(1, Ordering::Relaxed);
        self.set_slot(index, id);
        Ok(id)
    }

    /// Where this object's time went so far, stage by stage.
    pub fn stage_times(&self) -> &StageTimes {
        &self.times
    }

    fn set_slot(&self, index: u64, id: ContentHash) {
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())[index as usize] = Some(id);
    }

    fn bounds(&self, index: u64, problem: String) -> RepoError {
        RepoError::ChunkBounds {
            name: self.name.clone(),
            index,
            problem,
        }
    }
}

/// Whether `data` is all zeros, a machine word at a time.
fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; `align_to` returns the aligned middle.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words
            .chunks(8)
            .all(|w| w.iter().fold(0, |a, &x| a | x) == 0)
}

#[cfg(test)]
mod zero_tests {
    use super::is_zero;

    #[test]
    fn zero_check_sees_every_byte() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v[1..]));
        for i in [0, 1, 7, 8, 2048, 4097, 4098] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            v[i] = 0;
        }
    }
}

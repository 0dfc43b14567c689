//! A repository over a [`ChunkStore`]: init and open, backups, reading points and chunks,
//! verification, and prune with garbage collection.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::backup::BackupWriter;
use super::codec::{chunk_id, chunk_id_from_name, chunk_object_name, decode_chunk, CHUNK_PREFIX};
use super::key::RepoKey;
use super::point::{
    point_id_from_name, point_object_name, validate_point_name, PointManifest, POINT_PREFIX,
};
use super::retention::{KeepPolicy, KeepReason};
use super::store::{ChunkStore, LocalDirStore, LockMode, StoreError, LOCK_FILE, TMP_DIR};
use super::RepoError;
use crate::chunk::{ContentHash, CHUNK_SIZE};
use crate::error::error_chain;
use crate::sealed_json::{seal, unseal};
use crate::state_file::{read_state, DEFAULT_STATE_LIMIT};
use crate::FORMAT_VERSION;

use super::location::{check_remote_init_target, open_remote, CONFIG_NAME};

/// The repository config, sealed JSON.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepoConfig {
    format_version: u32,
    chunk_size: u64,
    /// The fingerprint of the key chunks and points are sealed with; absent when not encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_fingerprint: Option<String>,
}

/// What prune did (or, in a dry run, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Ids of removed points, oldest first.
    pub removed: Vec<String>,
    /// Ids of kept points, oldest first.
    pub kept: Vec<String>,
    /// Why each kept point is kept.
    pub reasons: BTreeMap<String, Vec<KeepReason>>,
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// The garbage collection that followed (none in a dry run).
    pub gc: GcReport,
}

/// What garbage collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Chunks no point uses, now removed.
    pub chunks_removed: u64,
    /// Chunks still in use.
    pub chunks_kept: u64,
    /// Leftovers of interrupted writes, removed.
    pub incomplete_removed: u64,
}

/// A chunk that failed verification, and the points that use it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamagedChunk {
    /// The chunk.
    pub id: ContentHash,
    /// What is wrong ("missing", or the decode error).
    pub problem: String,
    /// Ids of the points that use it.
    pub points: Vec<String>,
}

/// What verification found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Point manifests read.
    pub points_checked: u64,
    /// Chunk objects re-hashed.
    pub chunks_checked: u64,
    /// Points whose manifest is damaged: (id, problem).
    pub damaged_points: Vec<(String, String)>,
    /// Chunks that are damaged or missing, with their users.
    pub damaged_chunks: Vec<DamagedChunk>,
}

impl VerifyReport {
    /// Whether nothing was found wrong.
    pub fn is_clean(&self) -> bool {
        self.damaged_points.is_empty() && self.damaged_chunks.is_empty()
    }

    /// Ids of every point that cannot be restored (damaged, or using a damaged chunk).
    pub fn unrestorable_points(&self) -> BTreeSet<String> {
        let mut ids: BTreeSet<String> = self
            .damaged_points
            .iter()
            .map(|(id, _)| id.clone())
            .collect();
        for chunk in &self.damaged_chunks {
            ids.extend(chunk.points.iter().cloned());
        }
        ids
    }
}

/// A point's id and its manifest, or why the manifest cannot be read.
pub type PointEntry = (String, Result<PointManifest, RepoError>);

/// Progress of [`Repository::verify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RepoVerifyProgress {
    /// Chunks verified so far.
    pub chunks_done: u64,
    /// Chunks to verify.
    pub chunks_total: u64,
}

/// A backup repository.
pub struct Repository {
    store: Arc<dyn ChunkStore>,
    key: Option<Arc<RepoKey>>,
}

impl Repository {
    /// Creates a repository in directory `path` (created if needed, mode 0700), or at the
    /// `s3://BUCKET/PREFIX` URL `path` holds, encrypted with
    /// `key` if one is given. A directory that holds anything but what a repository holds is
    /// refused (see [`Repository::check_init_target`]).
    pub fn init(path: &Path, key: Option<RepoKey>) -> Result<Self, RepoError> {
        if let Some(store) = open_remote(path)? {
            check_remote_init_target(store.as_ref())?;
            return Self::init_store(store, key);
        }
        Self::check_init_target(path)?;
        let store = LocalDirStore::open(path)?;
        Self::init_store(Box::new(store), key).map_err(|e| match e {
            RepoError::AlreadyInitialized { .. } => RepoError::AlreadyInitialized {
                path: path.to_path_buf(),
            },
            other => other,
        })
    }

    /// Checks that a repository may be created at `path`: it does not exist, or it is a
    /// directory holding nothing but a repository's own entries (an earlier `init` cut short,
    /// or a repository, which `init` then reports as already initialized). So `init` never
    /// mixes a repository into a directory of other files.
    pub fn check_init_target(path: &Path) -> Result<(), RepoError> {
        let own = [
            CONFIG_NAME,
            CHUNK_PREFIX.trim_end_matches('/'),
            POINT_PREFIX.trim_end_matches('/'),
            TMP_DIR,
            LOCK_FILE,
        ];
        let io = |action| {
            move |source| StoreError::Io {
                action,
                path: path.to_path_buf(),
                source,
            }
        };
        let entries = match std::fs::read_dir(path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("list")(e).into()),
        };
        for entry in entries {
            let name = entry.map_err(io("list"))?.file_name();
            let name = name.to_string_lossy();
            if !own.contains(&name.as_ref()) {
                return Err(RepoError::ForeignDirectory {
                    path: path.to_path_buf(),
                    entry: name.chars().take(80).collect(),
                });
            }
        }
        Ok(())
    }

    /// Opens the repository in directory `path` (or at the `s3://` URL it holds); `key` must be given exactly when it is
    /// encrypted.
    pub fn open(path: &Path, key: Option<RepoKey>) -> Result<Self, RepoError> {
        if let Some(store) = open_remote(path)? {
            return Self::open_store(store, key);
        }
        if !path.join(CONFIG_NAME).exists() {
            return Err(RepoError::NotARepository {
                path: path.to_path_buf(),
            });
        }
        Self::open_store(Box::new(LocalDirStore::open(path)?), key)
    }

    /// Creates a repository in an empty store, encrypted with `key` if one is given.
    pub fn init_store(store: Box<dyn ChunkStore>, key: Option<RepoKey>) -> Result<Self, RepoError> {
        let config = RepoConfig {
            format_version: FORMAT_VERSION,
            chunk_size: CHUNK_SIZE as u64,
            key_fingerprint: key.as_ref().map(|k| k.fingerprint().to_string()),
        };
        let bytes = seal(&config).map_err(RepoError::Config)?;
        if !store.put_if_absent(CONFIG_NAME, &bytes)? {
            return Err(RepoError::AlreadyInitialized {
                path: PathBuf::from(store.location()),
            });
        }
        store.sync()?;
        Ok(Self {
            store: Arc::from(store),
            key: key.map(Arc::new),
        })
    }

    /// Opens a repository in a store, checking its config and the key.
    pub fn open_store(store: Box<dyn ChunkStore>, key: Option<RepoKey>) -> Result<Self, RepoError> {
        let bytes = store.get(CONFIG_NAME).map_err(|e| match e {
            StoreError::NotFound { .. } => RepoError::NotARepository {
                path: PathBuf::from(store.location()),
            },
            other => other.into(),
        })?;
        let value = unseal(&bytes, 1 << 20).map_err(RepoError::Config)?;
        let config: RepoConfig =
            serde_json::from_value(value).map_err(|e| RepoError::ConfigInvalid {
                problem: e.to_string(),
            })?;
        if config.chunk_size != CHUNK_SIZE as u64 {
            return Err(RepoError::ConfigInvalid {
                problem: format!("chunk size {} is not {CHUNK_SIZE}", config.chunk_size),
            });
        }
        match (&config.key_fingerprint, &key) {
            (Some(_), None) => return Err(RepoError::KeyRequired),
            (None, Some(_)) => return Err(RepoError::KeyNotUsed),
            (Some(expected), Some(key)) if expected != key.fingerprint() => {
                return Err(RepoError::WrongKey {
                    given: key.fingerprint().to_string(),
                    expected: expected.clone(),
                })
            }
            _ => {}
        }
        Ok(Self {
            store: Arc::from(store),
            key: key.map(Arc::new),
        })
    }

    /// Whether chunks and points are encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.key.is_some()
    }

    /// The underlying store.
    pub fn store(&self) -> &dyn ChunkStore {
        self.store.as_ref()
    }

    /// A shared handle on the store, for readers and writers that outlive a borrow.
    pub(super) fn store_arc(&self) -> Arc<dyn ChunkStore> {
        self.store.clone()
    }

    /// A shared handle on the key, if the repository is encrypted.
    pub(super) fn key_arc(&self) -> Option<Arc<RepoKey>> {
        self.key.clone()
    }

    /// Starts a backup of `vm`, incremental against point `parent` if given. Waits while prune
    /// or garbage collection runs. Do not call prune or gc from a thread of the same process
    /// while a backup is open: they would wait for it forever.
    pub fn start_backup(&self, vm: &str, parent: Option<&str>) -> Result<BackupWriter, RepoError> {
        validate_point_name(vm)?;
        let lock = self.store.lock(LockMode::Shared, true)?;
        let parent = parent.map(|id| self.read_point(id)).transpose()?;
        // The manifest may have come from a cache: the point must still be there now that the
        // lock is held, so that its chunks stay until the backup commits (see
        // [`BackupWriter::commit`]).
        if let Some(p) = &parent {
            if !self.store.contains(&point_object_name(&p.id))? {
                return Err(RepoError::NoSuchPoint { id: p.id.clone() });
            }
        }
        Ok(BackupWriter::new(
            self.store.clone(),
            self.key.clone(),
            lock,
            vm,
            parent,
        ))
    }

    /// Ids of all points, oldest first.
    pub fn point_ids(&self) -> Result<Vec<String>, RepoError> {
        let mut ids: Vec<String> = self
            .store
            .list(POINT_PREFIX)?
            .iter()
            .filter_map(|name| point_id_from_name(name).map(str::to_string))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Every point, oldest first (ids sort by time to the nanosecond), each read and checked
    /// (a damaged one is an `Err` in the list).
    pub fn points(&self) -> Result<Vec<PointEntry>, RepoError> {
        Ok(self
            .point_ids()?
            .into_iter()
            .map(|id| {
                let point = self.read_point(&id);
                (id, point)
            })
            .collect())
    }

    /// The newest readable point of `vm`.
    pub fn latest_point(&self, vm: &str) -> Result<Option<PointManifest>, RepoError> {
        let points = self.points()?;
        Ok(points
            .into_iter()
            .filter_map(|(_, p)| p.ok())
            .filter(|p| p.vm == vm)
            .max_by(|a, b| a.id.cmp(&b.id)))
    }

    /// Reads and checks point `id`'s manifest.
    pub fn read_point(&self, id: &str) -> Result<PointManifest, RepoError> {
        let bytes = self
            .store
            .get(&point_object_name(id))
            .map_err(|e| match e {
                StoreError::NotFound { .. } | StoreError::BadName { .. } => {
                    RepoError::NoSuchPoint { id: id.to_string() }
                }
                other => other.into(),
            })?;
        PointManifest::decode(id, &bytes, self.key.as_deref())
    }

    /// Reads chunk `id`, decompressed and checked against its id. A full-size all-zero chunk is
    /// known from its id alone: a missing or damaged stored copy of it reads as zeros.
    pub fn read_chunk(&self, id: &ContentHash) -> Result<Vec<u8>, RepoError> {
        let read = || {
            let stored = self
                .store
                .get(&chunk_object_name(id))
                .map_err(|e| match e {
                    StoreError::NotFound { .. } => RepoError::ChunkMissing { id: id.to_hex() },
                    other => other.into(),
                })?;
            decode_chunk(id, &stored, self.key.as_deref()).map_err(|source| {
                RepoError::ChunkDamaged {
                    id: id.to_hex(),
                    source,
                }
            })
        };
        match read() {
            Err(e) if *id == chunk_id(&vec![0u8; CHUNK_SIZE], self.key.as_deref()) => {
                tracing::warn!("{e}: it is the all-zero chunk, read as zeros");
                Ok(vec![0u8; CHUNK_SIZE])
            }
            other => other,
        }
    }

    /// Writes object `name` of `point` to `out`, every chunk checked; returns the bytes written.
    pub fn read_object(
        &self,
        point: &PointManifest,
        name: &str,
        out: &mut impl Write,
    ) -> Result<u64, RepoError> {
        let object = point.object(name).ok_or_else(|| RepoError::NoSuchObject {
            id: point.id.clone(),
            name: name.to_string(),
        })?;
        for id in &object.chunks {
            let data = self.read_chunk(id)?;
            out.write_all(&data).map_err(|e| {
                RepoError::Store(StoreError::Io {
                    action: "write restored object",
                    path: PathBuf::from(name),
                    source: e,
                })
            })?;
        }
        Ok(object.size)
    }

    /// Reads and decodes state object `name` of `point`.
    pub fn read_state<T: DeserializeOwned>(
        &self,
        point: &PointManifest,
        name: &str,
    ) -> Result<T, RepoError> {
        let mut bytes = Vec::new();
        self.read_object(point, name, &mut bytes)?;
        read_state(&mut bytes.as_slice(), DEFAULT_STATE_LIMIT).map_err(|source| RepoError::State {
            name: name.to_string(),
            source,
        })
    }

    /// Re-reads every point manifest and re-hashes every chunk; names damaged and missing chunks
    /// and the points that use them. Runs beside backups, not beside prune.
    pub fn verify(
        &self,
        mut progress: impl FnMut(&RepoVerifyProgress),
    ) -> Result<VerifyReport, RepoError> {
        let _lock = self.store.lock(LockMode::Shared, true)?;
        let mut report = VerifyReport::default();
        let mut users: HashMap<ContentHash, BTreeSet<String>> = HashMap::new();
        for (id, point) in self.points()? {
            report.points_checked += 1;
            match point {
                Ok(point) => {
                    for chunk in point.chunk_ids() {
                        users.entry(*chunk).or_default().insert(id.clone());
                    }
                }
                Err(e) => report.damaged_points.push((id, error_chain(&e))),
            }
        }
        let names = self.store.list(CHUNK_PREFIX)?;
        let chunks_total = names.len() as u64;
        let mut present = BTreeSet::new();
        let mut damaged = BTreeMap::new();
        for (done, name) in names.iter().enumerate() {
            progress(&RepoVerifyProgress {
                chunks_done: done as u64,
                chunks_total,
            });
            let Some(id) = chunk_id_from_name(name) else {
                continue;
            };
            present.insert(id);
            report.chunks_checked += 1;
            if let Err(e) = self.read_chunk(&id) {
                damaged.insert(id, error_chain(&e));
            }
        }
        progress(&RepoVerifyProgress {
            chunks_done: chunks_total,
            chunks_total,
        });
        for id in users.keys() {
            if !present.contains(id) {
                damaged.insert(*id, "missing".to_string());
            }
        }
        report.damaged_chunks = damaged
            .into_iter()
            .map(|(id, problem)| DamagedChunk {
                id,
                problem,
                points: users
                    .get(&id)
                    .map(|p| p.iter().cloned().collect())
                    .unwrap_or_default(),
            })
            .collect();
        Ok(report)
    }

    /// Removes the points `policy` does not keep (per VM), then collects unused chunks. Waits
    /// for running backups to finish, and blocks new ones while it runs. Refuses to run while a
    /// point is unreadable.
    pub fn prune(&self, policy: &KeepPolicy) -> Result<PruneReport, RepoError> {
        let _lock = self.store.lock(LockMode::Exclusive, true)?;
        let mut report = self.plan_prune_locked(policy)?;
        for id in &report.removed {
            self.store.delete(&point_object_name(id))?;
        }
        report.dry_run = false;
        report.gc = self.collect_locked()?;
        tracing::info!(
            removed = report.removed.len(),
            kept = report.kept.len(),
            chunks_removed = report.gc.chunks_removed,
            "prune finished"
        );
        Ok(report)
    }

    /// What [`Repository::prune`] would remove and keep, and why, changing nothing.
    pub fn plan_prune(&self, policy: &KeepPolicy) -> Result<PruneReport, RepoError> {
        let _lock = self.store.lock(LockMode::Shared, true)?;
        self.plan_prune_locked(policy)
    }

    fn plan_prune_locked(&self, policy: &KeepPolicy) -> Result<PruneReport, RepoError> {
        let points = self.readable_points()?;
        let reasons = policy.select(&points);
        let mut report = PruneReport {
            dry_run: true,
            ..PruneReport::default()
        };
        for point in &points {
            if reasons.contains_key(&point.id) {
                report.kept.push(point.id.clone());
            } else {
                report.removed.push(point.id.clone());
            }
        }
        report.reasons = reasons;
        Ok(report)
    }

    /// Removes the points `ids` (each an exact id) under one lock; their chunks stay until the
    /// next collection. Checks that every point exists before removing any.
    pub fn forget(&self, ids: &[String]) -> Result<(), RepoError> {
        let _lock = self.store.lock(LockMode::Exclusive, true)?;
        for id in ids {
            if !self.store.contains(&point_object_name(id)).unwrap_or(false) {
                return Err(RepoError::NoSuchPoint { id: id.to_string() });
            }
        }
        for id in ids {
            self.store.delete(&point_object_name(id))?;
        }
        Ok(())
    }

    /// Removes chunks that no point uses. Takes the exclusive lock (waiting for backups).
    pub fn gc(&self) -> Result<GcReport, RepoError> {
        let _lock = self.store.lock(LockMode::Exclusive, true)?;
        self.collect_locked()
    }

    /// Removes point `id` (its chunks stay until the next collection).
    pub fn remove_point(&self, id: &str) -> Result<(), RepoError> {
        let _lock = self.store.lock(LockMode::Exclusive, true)?;
        let name = point_object_name(id);
        if !self.store.contains(&name).unwrap_or(false) {
            return Err(RepoError::NoSuchPoint { id: id.to_string() });
        }
        Ok(self.store.delete(&name)?)
    }

    /// Every point, refusing if one cannot be read.
    fn readable_points(&self) -> Result<Vec<PointManifest>, RepoError> {
        self.points()?
            .into_iter()
            .map(|(id, point)| {
                point.map_err(|source| RepoError::GcBlocked {
                    id,
                    source: Box::new(source),
                })
            })
            .collect()
    }

    /// Garbage collection proper; the caller holds the exclusive lock.
    fn collect_locked(&self) -> Result<GcReport, RepoError> {
        let used: BTreeSet<ContentHash> = self
            .readable_points()?
            .iter()
            .flat_map(|p| p.chunk_ids().copied().collect::<Vec<_>>())
            .collect();
        let mut report = GcReport {
            incomplete_removed: self.store.clean_incomplete()? as u64,
            ..GcReport::default()
        };
        for name in self.store.list(CHUNK_PREFIX)? {
            match chunk_id_from_name(&name) {
                Some(id) if used.contains(&id) => report.chunks_kept += 1,
                _ => {
                    self.store.delete(&name)?;
                    report.chunks_removed += 1;
                }
            }
        }
        Ok(report)
    }
}

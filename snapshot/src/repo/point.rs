//! Backup points: a sealed manifest naming the VM, the time, and for each object (memory, each
//! disk, each state) its size and the ordered chunk ids that make it up.

use serde::{Deserialize, Serialize};

use super::key::RepoKey;
use super::RepoError;
use crate::chunk::{chunk_count, chunk_table_hash, is_valid_chunk_size, ContentHash};
use crate::manifest::{validate_part_name, PartKind};
use crate::sealed_json::{seal, unseal};

/// The folder of point manifests in a repository.
pub const POINT_PREFIX: &str = "points/";

/// The first bytes of an encrypted point manifest; the sealed JSON follows, encrypted.
const SEALED_POINT_MAGIC: &[u8] = b"ARKVMENC";

/// The largest point manifest a reader accepts.
pub const MAX_POINT_LEN: u64 = 256 << 20;

/// One object of a backup point: its bytes are its chunks' bytes, concatenated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointObject {
    /// The object's name (the snapshot part name: `memory`, `disk-0`, `vm-state`, ...).
    pub name: String,
    /// What it holds.
    pub kind: PartKind,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes per chunk; the last chunk may be shorter.
    pub chunk_size: u64,
    /// The chunk ids, in order.
    pub chunks: Vec<ContentHash>,
    /// [`chunk_table_hash`] of `chunks`.
    pub blake3: ContentHash,
}

/// What a backup cost: how much was read, reused and newly stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointStats {
    /// Chunks in the point.
    pub chunks_total: u64,
    /// Chunks that were read and hashed in this backup.
    pub chunks_hashed: u64,
    /// Chunks whose id was taken from the parent point without reading them.
    pub chunks_reused: u64,
    /// Chunks that were not yet in the repository and were stored.
    pub chunks_new: u64,
    /// Plain bytes read and hashed.
    pub bytes_hashed: u64,
    /// Stored (compressed) bytes of the new chunks.
    pub bytes_stored: u64,
    /// The sum of object sizes.
    pub bytes_total: u64,
}

/// A backup point's manifest, stored as `points/<id>.json` (sealed JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointManifest {
    /// The format version.
    pub format_version: u32,
    /// The point's id: `<UTC yyyymmddThhmmss.nnnnnnnnnZ>-<vm>-<8 hex>`, sorting by time.
    pub id: String,
    /// The VM's name.
    pub vm: String,
    /// When the point was committed, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The point whose chunk ids unchanged chunks were taken from, if any.
    pub parent: Option<String>,
    /// Memory, disks and states.
    pub objects: Vec<PointObject>,
    /// Counters of this backup.
    pub stats: PointStats,
}

impl PointManifest {
    /// The object called `name`.
    pub fn object(&self, name: &str) -> Option<&PointObject> {
        self.objects.iter().find(|o| o.name == name)
    }

    /// The name of this point's manifest object.
    pub fn object_name(&self) -> String {
        point_object_name(&self.id)
    }

    /// Every chunk id the point uses (with repeats).
    pub fn chunk_ids(&self) -> impl Iterator<Item = &ContentHash> {
        self.objects.iter().flat_map(|o| o.chunks.iter())
    }

    /// Encodes the manifest as sealed JSON, encrypted if a key is given.
    pub fn encode(&self, key: Option<&RepoKey>) -> Result<Vec<u8>, RepoError> {
        let json = seal(self).map_err(|source| RepoError::PointSeal {
            id: self.id.clone(),
            source,
        })?;
        Ok(match key {
            None => json,
            Some(key) => {
                let mut out = SEALED_POINT_MAGIC.to_vec();
                out.extend_from_slice(&key.seal(self.id.as_bytes(), &json));
                out
            }
        })
    }

    /// Decodes and checks the manifest stored for point `id`; `key` must be given exactly when
    /// the repository is encrypted.
    pub fn decode(id: &str, bytes: &[u8], key: Option<&RepoKey>) -> Result<Self, RepoError> {
        let opened;
        let bytes = match (bytes.strip_prefix(SEALED_POINT_MAGIC), key) {
            (Some(sealed), Some(key)) => {
                opened = key.open(id.as_bytes(), sealed).map_err(|source| {
                    RepoError::PointUnauthentic {
                        id: id.to_string(),
                        source,
                    }
                })?;
                opened.as_slice()
            }
            (Some(_), None) => return Err(RepoError::KeyRequired),
            (None, Some(_)) => {
                return Err(RepoError::PointInvalid {
                    id: id.to_string(),
                    problem: "it is not encrypted, but the repository is".into(),
                })
            }
            (None, None) => bytes,
        };
        let damaged = |problem: String| RepoError::PointInvalid {
            id: id.to_string(),
            problem,
        };
        let value = unseal(bytes, MAX_POINT_LEN).map_err(|source| RepoError::PointSeal {
            id: id.to_string(),
            source,
        })?;
        let point: PointManifest =
            serde_json::from_value(value).map_err(|e| damaged(e.to_string()))?;
        if point.id != id {
            return Err(damaged(format!("it says it is point '{}'", point.id)));
        }
        validate_point_name(&point.vm).map_err(|_| damaged("bad VM name".into()))?;
        for object in &point.objects {
            validate_part_name(&object.name)
                .map_err(|_| damaged(format!("bad object name '{}'", object.name)))?;
            if !is_valid_chunk_size(object.chunk_size)
                || object.chunks.len() as u64 != chunk_count(object.size, object.chunk_size)
                || chunk_table_hash(&object.chunks) != object.blake3
            {
                return Err(damaged(format!(
                    "object '{}' has an inconsistent chunk list",
                    object.name
                )));
            }
        }
        Ok(point)
    }
}

/// The object name of point `id`'s manifest.
pub fn point_object_name(id: &str) -> String {
    format!("{POINT_PREFIX}{id}.json")
}

/// The point id in a point manifest's object name.
pub fn point_id_from_name(name: &str) -> Option<&str> {
    name.strip_prefix(POINT_PREFIX)?.strip_suffix(".json")
}

/// Refuses VM names that are not 1-64 characters of `[A-Za-z0-9._-]` not starting with `.`:
/// the rule the repository applies to the VM names of backup points, for a VMM to check a
/// name before it starts a VM under it.
pub fn validate_vm_name(name: &str) -> Result<(), RepoError> {
    validate_point_name(name)
}

/// Refuses VM names (and ids) that are not 1-64 characters of `[A-Za-z0-9._-]`.
pub(crate) fn validate_point_name(name: &str) -> Result<(), RepoError> {
    validate_part_name(name).map_err(|_| RepoError::BadVmName {
        name: name.chars().take(80).collect(),
    })
}

/// A new point id for `vm` at `secs.nanos` since the epoch:
/// `yyyymmddThhmmss.nnnnnnnnnZ-<vm>-<nonce as 8 hex>`, in UTC. Ids sort by time.
pub(crate) fn new_point_id(vm: &str, secs: u64, nanos: u32, nonce: u32) -> String {
    let time = i64::try_from(secs)
        .ok()
        .and_then(|s| jiff::Timestamp::new(s, 0).ok())
        .unwrap_or(jiff::Timestamp::MAX);
    format!(
        "{}.{nanos:09}Z-{vm}-{nonce:08x}",
        time.strftime("%Y%m%dT%H%M%S")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::chunk_hash;
    use crate::FORMAT_VERSION;

    #[test]
    fn ids_sort_by_time_and_read_as_dates() {
        assert!(new_point_id("v", 0, 0, 0).starts_with("19700101T000000.000000000Z"));
        assert!(new_point_id("v", 951_782_400, 5, 0).starts_with("20000229T000000.000000005Z"));
        let id = new_point_id("vm1", 1_795_625_865, 318_000_001, 0xab);
        assert_eq!(id, "20261125T165745.318000001Z-vm1-000000ab");
        assert!(new_point_id("vm1", 1_795_625_865, 318_000_000, 0xff) < id);
        assert!(new_point_id("vm1", 1_000_000_000, 999_999_999, 1) < id);
        assert_eq!(
            point_id_from_name(&point_object_name(&id)),
            Some(id.as_str())
        );
    }

    fn sample() -> PointManifest {
        let chunks = vec![chunk_hash(b"a"), chunk_hash(b"b")];
        PointManifest {
            format_version: FORMAT_VERSION,
            id: "20261125T165745.318000001Z-vm1-000000ab".into(),
            vm: "vm1".into(),
            created_unix_ms: 1_795_625_865_318,
            parent: None,
            objects: vec![PointObject {
                name: "memory".into(),
                kind: PartKind::Memory,
                size: 8192,
                chunk_size: 4096,
                blake3: chunk_table_hash(&chunks),
                chunks,
            }],
            stats: PointStats::default(),
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let point = sample();
        let bytes = point.encode(None).unwrap();
        assert_eq!(
            PointManifest::decode(&point.id, &bytes, None).unwrap(),
            point
        );
        assert!(PointManifest::decode("other", &bytes, None).is_err());
        for pos in (0..bytes.len()).step_by(7) {
            let mut damaged = bytes.clone();
            damaged[pos] ^= 1;
            let result = PointManifest::decode(&point.id, &damaged, None);
            assert!(result.is_err(), "flip at {pos}");
        }
        let mut bad = sample();
        bad.objects[0].size = 3 * 4096;
        assert!(PointManifest::decode(&bad.id, &bad.encode(None).unwrap(), None).is_err());
    }

    #[test]
    fn encrypted_manifests() {
        let key = RepoKey::generate();
        let point = sample();
        let bytes = point.encode(Some(&key)).unwrap();
        assert!(!bytes.windows(6).any(|w| w == b"memory"));
        assert_eq!(
            PointManifest::decode(&point.id, &bytes, Some(&key)).unwrap(),
            point
        );
        assert!(matches!(
            PointManifest::decode(&point.id, &bytes, None),
            Err(RepoError::KeyRequired)
        ));
        assert!(PointManifest::decode(&point.id, &bytes, Some(&RepoKey::generate())).is_err());
        assert!(PointManifest::decode("other", &bytes, Some(&key)).is_err());
        let plain = point.encode(None).unwrap();
        assert!(PointManifest::decode(&point.id, &plain, Some(&key)).is_err());
        for pos in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[pos] ^= 1;
            let result = PointManifest::decode(&point.id, &damaged, Some(&key));
            assert!(result.is_err(), "flip at {pos}");
        }
    }
}

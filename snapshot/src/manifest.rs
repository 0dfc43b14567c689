//! The snapshot manifest (`manifest.json`): format version, creation time, and every part with
//! its size and blake3 hash (and, for memory, its chunk table).
//!
//! The file is sealed JSON (see [`crate::sealed_json`]): its last field is `manifest_blake3`, the
//! blake3 hash of every byte of the file before that hash's first hex digit:
//!
//! ```text
//! {
//!   "format_version": 1,
//!   ...
//!   "parts": [ ... ],
//!   "manifest_blake3": "<64 hex digits>"
//! }
//! ```
//!
//! The checksum is checked on the raw bytes before parsing, and the version only after it holds.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::chunk::{chunk_count, chunk_table_hash, is_valid_chunk_size, ContentHash};
use crate::sealed_json::{seal, unseal, SealError};
use crate::FORMAT_VERSION;

/// The manifest's file name inside a snapshot directory.
pub const MANIFEST_NAME: &str = "manifest.json";

/// The largest manifest a reader accepts (128 MiB: about a million chunk hashes).
pub const MAX_MANIFEST_LEN: u64 = 128 << 20;

/// The longest part name.
pub const MAX_PART_NAME_LEN: usize = 64;

/// Why a manifest could not be encoded, read or trusted.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file is too large, damaged, truncated, or of another format version.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The JSON does not describe a manifest of this version.
    #[error("manifest fields do not match format version {version}")]
    Fields {
        /// The manifest's version.
        version: u32,
        /// What serde objected to.
        #[source]
        source: serde_json::Error,
    },
    /// A part name is empty, too long, hidden, reserved, or uses characters outside
    /// `[A-Za-z0-9._-]`.
    #[error("'{name}' is not a valid part name (1-64 characters of A-Z a-z 0-9 . _ -, not starting with '.', not manifest.json)")]
    BadPartName {
        /// The refused name.
        name: String,
    },
    /// Two parts share a name.
    #[error("part '{name}' appears twice")]
    DuplicatePart {
        /// The repeated name.
        name: String,
    },
    /// A part's chunk table is missing, unexpected, or inconsistent with its size or hash.
    #[error("part '{name}' has an inconsistent chunk table: {problem}")]
    BadChunkTable {
        /// The part.
        name: String,
        /// What is wrong.
        problem: &'static str,
    },
}

/// What a part holds, which decides how it is read and verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartKind {
    /// A framed state file (see [`crate::state_file`]).
    State,
    /// Opaque bytes, such as a disk image.
    Raw,
    /// Guest memory, hashed per chunk so that a lazy restore can verify each chunk it loads.
    Memory,
}

/// The chunk table of a memory part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkTable {
    /// Bytes per chunk; the last chunk may be shorter.
    pub chunk_size: u64,
    /// blake3 of each chunk, in order.
    pub hashes: Vec<ContentHash>,
}

/// One file of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartEntry {
    /// File name inside the snapshot directory.
    pub name: String,
    /// What the part holds.
    pub kind: PartKind,
    /// Exact file size in bytes.
    pub size: u64,
    /// blake3 of the file's bytes; for memory parts, [`chunk_table_hash`] of its chunk hashes.
    pub blake3: ContentHash,
    /// Present for memory parts only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<ChunkTable>,
}

/// The list of a snapshot's parts, written last and atomically.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The format version of the whole snapshot (state files carry the same number).
    pub format_version: u32,
    /// When the snapshot was committed, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Every part, in the order they were finished.
    pub parts: Vec<PartEntry>,
}

impl Manifest {
    /// The entry of part `name`.
    pub fn part(&self, name: &str) -> Option<&PartEntry> {
        self.parts.iter().find(|p| p.name == name)
    }

    /// The sum of all part sizes.
    pub fn total_size(&self) -> u64 {
        self.parts.iter().map(|p| p.size).sum()
    }

    /// Checks names, uniqueness and chunk tables.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let mut seen = HashSet::new();
        for part in &self.parts {
            validate_part_name(&part.name)?;
            if !seen.insert(part.name.as_str()) {
                return Err(ManifestError::DuplicatePart {
                    name: part.name.clone(),
                });
            }
            validate_chunks(part)?;
        }
        Ok(())
    }

    /// Encodes the manifest as the bytes of `manifest.json`, checksum included.
    pub fn encode(&self) -> Result<Vec<u8>, ManifestError> {
        Ok(seal(self)?)
    }

    /// Decodes and checks `manifest.json`: size, checksum, version, fields, then
    /// [`Manifest::validate`].
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let value = unseal(bytes, MAX_MANIFEST_LEN)?;
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|source| ManifestError::Fields {
                version: FORMAT_VERSION,
                source,
            })?;
        manifest.validate()?;
        Ok(manifest)
    }
}

/// Refuses part names that are empty, too long, hidden, reserved, or not `[A-Za-z0-9._-]`.
pub fn validate_part_name(name: &str) -> Result<(), ManifestError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_PART_NAME_LEN
        && !name.starts_with('.')
        && name != MANIFEST_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ManifestError::BadPartName {
            name: name.chars().take(80).collect(),
        })
    }
}

/// Checks that a memory part has a chunk table consistent with its size and hash, and that
/// other parts have none.
fn validate_chunks(part: &PartEntry) -> Result<(), ManifestError> {
    let bad = |problem| ManifestError::BadChunkTable {
        name: part.name.clone(),
        problem,
    };
    match (part.kind, &part.chunks) {
        (PartKind::Memory, Some(table)) => {
            if !is_valid_chunk_size(table.chunk_size) {
                return Err(bad(
                    "the chunk size is not a power of two from 4 KiB to 64 MiB",
                ));
            }
            if table.hashes.len() as u64 != chunk_count(part.size, table.chunk_size) {
                return Err(bad("the number of chunk hashes does not match the size"));
            }
            if chunk_table_hash(&table.hashes) != part.blake3 {
                return Err(bad("the part hash does not match the chunk hashes"));
            }
            Ok(())
        }
        (PartKind::Memory, None) => Err(bad("a memory part has no chunk table")),
        (_, Some(_)) => Err(bad("only memory parts have a chunk table")),
        (_, None) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::chunk_hash;

    fn sample() -> Manifest {
        let hashes = vec![chunk_hash(b"c0"), chunk_hash(b"c1"), chunk_hash(b"c2")];
        Manifest {
            format_version: FORMAT_VERSION,
            created_unix_ms: 1_764_000_000_000,
            parts: vec![
                PartEntry {
                    name: "vm-state".into(),
                    kind: PartKind::State,
                    size: 120,
                    blake3: chunk_hash(b"state"),
                    chunks: None,
                },
                PartEntry {
                    name: "memory".into(),
                    kind: PartKind::Memory,
                    size: 2 * 4096 + 5,
                    blake3: chunk_table_hash(&hashes),
                    chunks: Some(ChunkTable {
                        chunk_size: 4096,
                        hashes,
                    }),
                },
            ],
        }
    }

    /// Re-encodes a manifest after editing its JSON, with a valid checksum.
    fn reencode(value: serde_json::Value) -> Vec<u8> {
        seal(&value).unwrap()
    }

    #[test]
    fn round_trip_and_is_json() {
        let bytes = sample().encode().unwrap();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["format_version"], FORMAT_VERSION);
        assert_eq!(value["manifest_blake3"].as_str().unwrap().len(), 64);
        assert_eq!(Manifest::decode(&bytes).unwrap(), sample());
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let bytes = sample().encode().unwrap();
        for pos in 0..bytes.len() {
            for bit in [0x01u8, 0x20, 0x80] {
                let mut damaged = bytes.clone();
                damaged[pos] ^= bit;
                assert!(
                    Manifest::decode(&damaged).is_err(),
                    "flip {bit:#x} at {pos}"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample().encode().unwrap();
        for len in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..len]).is_err(), "length {len}");
        }
    }

    #[test]
    fn future_version_is_named() {
        let mut value = serde_json::to_value(sample()).unwrap();
        value["format_version"] = (FORMAT_VERSION + 1).into();
        // A future manifest may have fields this build does not know.
        value["new_field"] = "x".into();
        let err = Manifest::decode(&reencode(value)).unwrap_err();
        assert!(
            matches!(err, ManifestError::Seal(SealError::FutureVersion { found, supported })
                if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION),
            "{err:?}"
        );
        assert!(err.to_string().contains("newer"));
    }

    #[test]
    fn inconsistent_tables_are_refused() {
        let mut m = sample();
        m.parts[1].size = 4096;
        assert!(matches!(
            Manifest::decode(&m.encode().unwrap()),
            Err(ManifestError::BadChunkTable { .. })
        ));
        let mut m = sample();
        m.parts[1].blake3 = chunk_hash(b"other");
        assert!(matches!(
            m.validate(),
            Err(ManifestError::BadChunkTable { .. })
        ));
        let mut m = sample();
        m.parts[1].chunks.as_mut().unwrap().chunk_size = 1000;
        assert!(m.validate().is_err());
        let mut m = sample();
        m.parts[0].chunks = m.parts[1].chunks.clone();
        assert!(m.validate().is_err());
        let mut m = sample();
        m.parts[1].chunks = None;
        assert!(m.validate().is_err());
        let mut m = sample();
        m.parts[1].name = "vm-state".into();
        assert!(matches!(
            m.validate(),
            Err(ManifestError::DuplicatePart { .. })
        ));
    }

    #[test]
    fn part_names() {
        for good in ["memory", "disk-0", "vm.state", "A_b-9"] {
            assert!(validate_part_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(MAX_PART_NAME_LEN + 1);
        for bad in [
            "",
            ".hidden",
            "a/b",
            "..",
            "manifest.json",
            "a b",
            "é",
            long.as_str(),
        ] {
            assert!(validate_part_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn oversized_manifest_is_refused_before_parsing() {
        let huge = vec![b' '; MAX_MANIFEST_LEN as usize + 1];
        assert!(matches!(
            Manifest::decode(&huge),
            Err(ManifestError::Seal(SealError::TooLarge { .. }))
        ));
    }
}

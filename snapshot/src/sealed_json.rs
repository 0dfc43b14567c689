//! Sealed JSON documents: pretty-printed JSON whose last field, `manifest_blake3`, is the blake3
//! hash of every byte before its first hex digit. Snapshot manifests and backup-point manifests
//! are sealed.
//!
//! A sealed file always ends with `,\n  "manifest_blake3": "<64 lowercase hex>"\n}\n`. The seal is
//! checked on the raw bytes before parsing, so any changed byte (whitespace included) is refused;
//! only then is `format_version` read, so a damaged version digit reads as damage and a genuine
//! newer document as a newer version. This rule is the same in every format version.

use serde::Serialize;

use crate::chunk::ContentHash;
use crate::FORMAT_VERSION;

/// The name of the checksum field.
pub const SEAL_FIELD: &str = "manifest_blake3";

/// The text that precedes the checksum's hex digits.
const SEAL_KEY: &[u8] = b",\n  \"manifest_blake3\": \"";
/// The text that follows them.
const SEAL_END: &[u8] = b"\"\n}\n";
/// Hex digits of a blake3 hash.
const HEX_LEN: usize = 64;

/// Why a sealed document could not be written or trusted.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The document is larger than the reader's limit.
    #[error("manifest is {len} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The document's length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The document does not end with a well-formed checksum field.
    #[error("manifest is truncated or damaged (its checksum field is missing)")]
    MissingChecksum,
    /// The checksum does not match the bytes.
    #[error("manifest is damaged (its blake3 checksum does not match)")]
    ChecksumMismatch,
    /// The checksum holds but the text is not JSON.
    #[error("manifest is not valid JSON")]
    NotJson(#[source] serde_json::Error),
    /// The checksum holds but the JSON is not an object with a numeric `format_version`.
    #[error("manifest has no format_version")]
    NoVersion,
    /// The document was written by a newer arkvm.
    #[error("format version {found} is newer than the supported version {supported}")]
    FutureVersion {
        /// The version in the document.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The document has a version this build no longer reads.
    #[error("format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// The version in the document.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The document could not be serialized.
    #[error("cannot serialize the manifest")]
    Serialize(#[source] serde_json::Error),
}

/// Serializes `doc` (a struct with at least one field) as a sealed document.
pub fn seal<T: Serialize>(doc: &T) -> Result<Vec<u8>, SealError> {
    let mut bytes = serde_json::to_vec_pretty(doc).map_err(SealError::Serialize)?;
    if !bytes.ends_with(b"\n}") {
        // Not a struct with fields: there is no object to append the seal to.
        return Err(SealError::NoVersion);
    }
    bytes.truncate(bytes.len() - 2);
    bytes.extend_from_slice(SEAL_KEY);
    let hash = ContentHash::of(&bytes);
    bytes.extend_from_slice(hash.to_hex().as_bytes());
    bytes.extend_from_slice(SEAL_END);
    Ok(bytes)
}

/// Checks size, seal and version (which must be [`FORMAT_VERSION`]) and returns the JSON object
/// without its seal field, ready for `serde_json::from_value`.
pub fn unseal(bytes: &[u8], limit: u64) -> Result<serde_json::Value, SealError> {
    if bytes.len() as u64 > limit {
        return Err(SealError::TooLarge {
            len: bytes.len() as u64,
            limit,
        });
    }
    check_seal(bytes)?;
    let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(SealError::NotJson)?;
    let object = value.as_object_mut().ok_or(SealError::NoVersion)?;
    object.remove(SEAL_FIELD);
    let found = object
        .get("format_version")
        .and_then(serde_json::Value::as_u64)
        .ok_or(SealError::NoVersion)?;
    let found = u32::try_from(found).unwrap_or(u32::MAX);
    if found > FORMAT_VERSION {
        return Err(SealError::FutureVersion {
            found,
            supported: FORMAT_VERSION,
        });
    }
    if found != FORMAT_VERSION {
        return Err(SealError::UnsupportedVersion {
            found,
            supported: FORMAT_VERSION,
        });
    }
    Ok(value)
}

/// Checks the trailing checksum of a sealed document.
fn check_seal(bytes: &[u8]) -> Result<(), SealError> {
    let tail = HEX_LEN + SEAL_END.len();
    if bytes.len() < tail + SEAL_KEY.len() || !bytes.ends_with(SEAL_END) {
        return Err(SealError::MissingChecksum);
    }
    let (body, rest) = bytes.split_at(bytes.len() - tail);
    if !body.ends_with(SEAL_KEY) {
        return Err(SealError::MissingChecksum);
    }
    let hex = std::str::from_utf8(&rest[..HEX_LEN]).map_err(|_| SealError::ChecksumMismatch)?;
    // Only lowercase digits are ever written; refusing uppercase keeps every flip visible.
    if hex.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(SealError::ChecksumMismatch);
    }
    let stored = ContentHash::from_hex(hex).map_err(|_| SealError::ChecksumMismatch)?;
    if stored != ContentHash::of(body) {
        return Err(SealError::ChecksumMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Doc {
        format_version: u32,
        name: &'static str,
        list: Vec<u32>,
    }

    fn doc(version: u32) -> Doc {
        Doc {
            format_version: version,
            name: "point",
            list: vec![1, 2, 3],
        }
    }

    #[test]
    fn round_trip_drops_the_seal_field() {
        let bytes = seal(&doc(FORMAT_VERSION)).unwrap();
        assert!(bytes.ends_with(b"\"\n}\n"));
        let value = unseal(&bytes, 1 << 20).unwrap();
        assert_eq!(value["name"], "point");
        assert!(value.get(SEAL_FIELD).is_none());
    }

    #[test]
    fn every_flip_and_truncation_is_refused() {
        let bytes = seal(&doc(FORMAT_VERSION)).unwrap();
        for pos in 0..bytes.len() {
            for bit in [0x01u8, 0x20, 0x80] {
                let mut damaged = bytes.clone();
                damaged[pos] ^= bit;
                assert!(unseal(&damaged, 1 << 20).is_err(), "flip {bit:#x} at {pos}");
            }
        }
        for len in 0..bytes.len() {
            assert!(unseal(&bytes[..len], 1 << 20).is_err(), "length {len}");
        }
    }

    #[test]
    fn versions_and_limits() {
        let newer = seal(&doc(FORMAT_VERSION + 1)).unwrap();
        assert!(matches!(
            unseal(&newer, 1 << 20),
            Err(SealError::FutureVersion { found, supported })
                if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION
        ));
        let older = seal(&doc(0)).unwrap();
        assert!(matches!(
            unseal(&older, 1 << 20),
            Err(SealError::UnsupportedVersion { found: 0, .. })
        ));
        let bytes = seal(&doc(FORMAT_VERSION)).unwrap();
        assert!(matches!(
            unseal(&bytes, bytes.len() as u64 - 1),
            Err(SealError::TooLarge { .. })
        ));
        assert!(seal(&42u32).is_err());
    }
}

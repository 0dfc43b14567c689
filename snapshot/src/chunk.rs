//! Content hashes (blake3) and fixed-size chunking, shared by snapshot directories and the
//! backup repository.

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The standard chunk size: guest memory and disks are hashed, verified and stored in pieces of
/// this many bytes (the last piece of an object may be shorter).
pub const CHUNK_SIZE: usize = 1 << 20;

/// The smallest chunk size a snapshot may declare (one x86 page).
pub const MIN_CHUNK_SIZE: u64 = 4096;

/// The largest chunk size a snapshot may declare; it bounds the buffers readers allocate.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;

/// Why a content hash could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContentHashError {
    /// The text is not 64 hexadecimal digits.
    #[error("'{text}' is not a blake3 hash (64 hexadecimal digits)")]
    NotHex {
        /// The text that was refused, cut to 80 characters.
        text: String,
    },
}

/// A blake3 digest of some bytes: a chunk, a whole part, or a table of chunk hashes.
///
/// Serialized as 64 lowercase hexadecimal digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash([u8; 32]);

impl ContentHash {
    /// Hashes `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// Wraps a raw 32-byte digest.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32-byte digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest as 64 lowercase hexadecimal digits.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses 64 hexadecimal digits (either case).
    pub fn from_hex(text: &str) -> Result<Self, ContentHashError> {
        blake3::Hash::from_hex(text)
            .map(|h| Self(*h.as_bytes()))
            .map_err(|_| ContentHashError::NotHex {
                text: text.chars().take(80).collect(),
            })
    }
}

impl From<blake3::Hash> for ContentHash {
    fn from(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({})", self.to_hex())
    }
}

impl Serialize for ContentHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ContentHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::from_hex(&text).map_err(serde::de::Error::custom)
    }
}

/// The hash of one chunk: the blake3 digest of its bytes.
pub fn chunk_hash(data: &[u8]) -> ContentHash {
    ContentHash::of(data)
}

/// The hash that stands for a whole chunked object: blake3 over the concatenated 32-byte
/// digests of its chunks, in order.
pub fn chunk_table_hash(hashes: &[ContentHash]) -> ContentHash {
    let mut hasher = blake3::Hasher::new();
    for hash in hashes {
        hasher.update(hash.as_bytes());
    }
    hasher.finalize().into()
}

/// How many chunks of `chunk_size` bytes cover `size` bytes (the last may be partial).
///
/// `chunk_size` must not be zero.
pub fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size)
}

/// The byte range of chunk `index` in an object of `size` bytes, or `None` past the end.
///
/// `chunk_size` must not be zero.
pub fn chunk_range(size: u64, chunk_size: u64, index: u64) -> Option<Range<u64>> {
    let start = index.checked_mul(chunk_size)?;
    if start >= size {
        return None;
    }
    Some(start..size.min(start.saturating_add(chunk_size)))
}

/// Whether a chunk size is one a snapshot may declare: a power of two between
/// [`MIN_CHUNK_SIZE`] and [`MAX_CHUNK_SIZE`].
pub fn is_valid_chunk_size(chunk_size: u64) -> bool {
    chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
}

/// Whether every byte of `data` is zero (zero chunks are left as holes in memory parts).
pub fn is_zero(data: &[u8]) -> bool {
    // OR-folding a block vectorizes well; checking per block still stops early on data.
    data.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_serde() {
        let hash = chunk_hash(b"arkvm");
        assert_eq!(hash, ContentHash::from_hex(&hash.to_hex()).unwrap());
        assert_eq!(hash.to_hex(), blake3::hash(b"arkvm").to_hex().as_str());
        let json = serde_json::to_string(&hash).unwrap();
        assert_eq!(json, format!("\"{}\"", hash.to_hex()));
        let back: ContentHash = serde_json::from_str(&json).unwrap();
        assert_eq!(back, hash);
    }

    #[test]
    fn bad_hex_is_refused() {
        assert!(ContentHash::from_hex("abc").is_err());
        let not_hex = "g".repeat(64);
        assert!(ContentHash::from_hex(&not_hex).is_err());
        assert!(serde_json::from_str::<ContentHash>("\"00\"").is_err());
    }

    #[test]
    fn chunk_geometry() {
        assert_eq!(chunk_count(0, 4096), 0);
        assert_eq!(chunk_count(1, 4096), 1);
        assert_eq!(chunk_count(8192, 4096), 2);
        assert_eq!(chunk_count(8193, 4096), 3);
        assert_eq!(chunk_range(8193, 4096, 2), Some(8192..8193));
        assert_eq!(chunk_range(8193, 4096, 1), Some(4096..8192));
        assert_eq!(chunk_range(8193, 4096, 3), None);
        assert_eq!(chunk_range(u64::MAX, 4096, u64::MAX), None);
    }

    #[test]
    fn chunk_sizes() {
        assert!(is_valid_chunk_size(CHUNK_SIZE as u64));
        assert!(is_valid_chunk_size(4096));
        assert!(!is_valid_chunk_size(0));
        assert!(!is_valid_chunk_size(2048));
        assert!(!is_valid_chunk_size(3 * 4096));
        assert!(!is_valid_chunk_size(MAX_CHUNK_SIZE * 2));
    }

    #[test]
    fn zero_detection() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf));
        assert!(is_zero(&buf[1..]));
        for pos in [0, 1, 7, 8, 2048, 4098] {
            buf[pos] = 1;
            assert!(!is_zero(&buf), "byte {pos}");
            assert!(!is_zero(&buf[..=pos]), "prefix to {pos}");
            buf[pos] = 0;
        }
    }

    #[test]
    fn table_hash_depends_on_order() {
        let a = chunk_hash(b"a");
        let b = chunk_hash(b"b");
        assert_ne!(chunk_table_hash(&[a, b]), chunk_table_hash(&[b, a]));
        assert_eq!(chunk_table_hash(&[a, b]), chunk_table_hash(&[a, b]));
    }
}

//! Stored chunk objects: named by the blake3 of their plain bytes, stored as one tag byte
//! followed by zstd-compressed (or, when that does not help, plain) bytes.

use std::io::Read;

use crate::chunk::{ContentHash, MAX_CHUNK_SIZE};

/// The folder of chunk objects in a repository.
pub const CHUNK_PREFIX: &str = "chunks/";

/// The zstd level chunks are compressed with: fast, since backups are throughput-bound.
pub const ZSTD_LEVEL: i32 = 1;

/// Tag of a zstd-compressed chunk object.
const TAG_ZSTD: u8 = b'Z';
/// Tag of a chunk stored as plain bytes.
const TAG_PLAIN: u8 = b'P';

/// Why a stored chunk could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ChunkCodecError {
    /// The object is empty or has an unknown tag byte.
    #[error("chunk object has an unknown encoding")]
    UnknownEncoding,
    /// The zstd data is damaged.
    #[error("chunk object does not decompress")]
    Decompress(#[source] std::io::Error),
    /// The data decompresses to more than any chunk may hold.
    #[error("chunk object decompresses to more than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The plain bytes do not hash to the chunk's name.
    #[error("chunk content does not match its blake3 id")]
    HashMismatch,
}

/// The object name of chunk `id`: `chunks/<first 4 hex digits>/<64 hex digits>`.
pub fn chunk_object_name(id: &ContentHash) -> String {
    let hex = id.to_hex();
    format!("{CHUNK_PREFIX}{}/{hex}", &hex[..4])
}

/// The chunk id named by a chunk object name, if it is one.
pub fn chunk_id_from_name(name: &str) -> Option<ContentHash> {
    let rest = name.strip_prefix(CHUNK_PREFIX)?;
    let (folder, hex) = rest.split_once('/')?;
    let id = ContentHash::from_hex(hex).ok()?;
    (hex.len() == 64 && hex == id.to_hex() && folder == &hex[..4]).then_some(id)
}

/// Encodes a chunk for storage.
pub fn encode_chunk(data: &[u8]) -> Vec<u8> {
    match zstd::bulk::compress(data, ZSTD_LEVEL) {
        Ok(compressed) if compressed.len() < data.len() => {
            let mut out = Vec::with_capacity(compressed.len() + 1);
            out.push(TAG_ZSTD);
            out.extend_from_slice(&compressed);
            out
        }
        // Incompressible (or, improbably, a compressor error): store plain.
        _ => {
            let mut out = Vec::with_capacity(data.len() + 1);
            out.push(TAG_PLAIN);
            out.extend_from_slice(data);
            out
        }
    }
}

/// Decodes a stored chunk and checks it against its id.
pub fn decode_chunk(id: &ContentHash, stored: &[u8]) -> Result<Vec<u8>, ChunkCodecError> {
    let (&tag, body) = stored
        .split_first()
        .ok_or(ChunkCodecError::UnknownEncoding)?;
    let data = match tag {
        TAG_PLAIN => body.to_vec(),
        TAG_ZSTD => {
            let decoder =
                zstd::stream::read::Decoder::new(body).map_err(ChunkCodecError::Decompress)?;
            let mut out = Vec::with_capacity(crate::CHUNK_SIZE);
            decoder
                .take(MAX_CHUNK_SIZE + 1)
                .read_to_end(&mut out)
                .map_err(ChunkCodecError::Decompress)?;
            out
        }
        _ => return Err(ChunkCodecError::UnknownEncoding),
    };
    if data.len() as u64 > MAX_CHUNK_SIZE {
        return Err(ChunkCodecError::TooLarge {
            limit: MAX_CHUNK_SIZE,
        });
    }
    if ContentHash::of(&data) != *id {
        return Err(ChunkCodecError::HashMismatch);
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::chunk_hash;

    #[test]
    fn round_trip_compressible_and_not() {
        let zeros = vec![0u8; 1 << 20];
        let noise: Vec<u8> = (0..1u32 << 16)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for data in [zeros.as_slice(), noise.as_slice(), b"".as_slice()] {
            let id = chunk_hash(data);
            let stored = encode_chunk(data);
            assert_eq!(decode_chunk(&id, &stored).unwrap(), data);
        }
        assert!(encode_chunk(&zeros).len() < 1000);
        assert_eq!(encode_chunk(&zeros)[0], TAG_ZSTD);
    }

    #[test]
    fn every_flip_is_refused() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let id = chunk_hash(&data);
        let stored = encode_chunk(&data);
        for pos in 0..stored.len() {
            let mut damaged = stored.clone();
            damaged[pos] ^= 0x01;
            assert!(decode_chunk(&id, &damaged).is_err(), "flip at {pos}");
        }
        assert!(decode_chunk(&id, &[]).is_err());
        assert!(decode_chunk(&chunk_hash(b"other"), &stored).is_err());
    }

    #[test]
    fn object_names() {
        let id = chunk_hash(b"x");
        let name = chunk_object_name(&id);
        assert!(name.starts_with("chunks/") && name.len() == 7 + 5 + 64);
        assert_eq!(chunk_id_from_name(&name), Some(id));
        assert_eq!(chunk_id_from_name("chunks/0000/abc"), None);
        let wrong_folder = format!("chunks/ffff/{}", id.to_hex());
        assert!(id.to_hex().starts_with("ffff") || chunk_id_from_name(&wrong_folder).is_none());
    }
}

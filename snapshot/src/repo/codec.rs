//! Stored chunk objects: named by the blake3 of their plain bytes (keyed blake3 in an encrypted
//! repository), stored as one tag byte followed by zstd-compressed (or, when that does not help,
//! plain) bytes; in an encrypted repository that encoding is sealed behind the tag `E`.

use std::io::Read;

use super::compression::{zstd_compress, Compression};
use super::key::{KeyError, RepoKey};
use super::stage_times::{Stage, StageTimes};
use crate::chunk::{chunk_hash, ContentHash, MAX_CHUNK_SIZE};

/// The folder of chunk objects in a repository.
pub const CHUNK_PREFIX: &str = "chunks/";

/// The zstd level of the probe that decides whether a chunk is worth compressing.
const PROBE_LEVEL: i32 = 1;

/// Tag of a zstd-compressed chunk object.
const TAG_ZSTD: u8 = b'Z';
/// Tag of a chunk stored as plain bytes.
const TAG_PLAIN: u8 = b'P';
/// Tag of an encrypted chunk: nonce and sealed (`Z` or `P`) encoding follow.
const TAG_SEALED: u8 = b'E';

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
    #[error("chunk object's stored bytes do not match their checksum")]
    StoredChecksum,
    /// The chunk is encrypted and no key was given.
    #[error("chunk is encrypted and no key was given")]
    NeedsKey,
    /// The repository is encrypted but this chunk is not.
    #[error("chunk is not encrypted, but the repository is")]
    NotSealed,
    /// Decryption failed.
    #[error("chunk cannot be decrypted")]
    Unauthentic(#[source] KeyError),
}

/// The id of a chunk: blake3 of its bytes, keyed in an encrypted repository.
pub fn chunk_id(data: &[u8], key: Option<&RepoKey>) -> ContentHash {
    match key {
        Some(key) => key.chunk_id(data),
        None => chunk_hash(data),
    }
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

/// Encodes chunk `id` (whose bytes are `data`) for storage with the default compression,
/// sealed if a key is given.
pub fn encode_chunk(id: &ContentHash, data: &[u8], key: Option<&RepoKey>) -> Vec<u8> {
    encode_chunk_timed(id, data, key, Compression::Default, &StageTimes::default())
}

/// [`encode_chunk`] with `compression`, adding the compression and sealing times to `times`.
pub fn encode_chunk_timed(
    id: &ContentHash,
    data: &[u8],
    key: Option<&RepoKey>,
    compression: Compression,
    times: &StageTimes,
) -> Vec<u8> {
    let compressed = match compression.zstd_level() {
        None => Err(std::io::Error::other("compression off")),
        Some(level) => times.time(Stage::Compress, data.len(), || {
            if looks_incompressible(data) {
                return Err(std::io::Error::other("incompressible sample"));
            }
            zstd_compress(data, level)
        }),
    };
    let encoded = match compressed {
        Ok(compressed) if compressed.len() + 4 < data.len() => {
            // A CRC of the compressed bytes follows them: zstd can decode a damaged frame to the
            // same content (a flipped byte in an unused table entry), and verify must still
            // notice that the stored object changed.
            let mut out = Vec::with_capacity(compressed.len() + 5);
            out.push(TAG_ZSTD);
            out.extend_from_slice(&compressed);
            out.extend_from_slice(&crc32fast::hash(&compressed).to_le_bytes());
            out
        }
        // Incompressible (or, improbably, a compressor error): store plain.
        _ => {
            let mut out = Vec::with_capacity(data.len() + 1);
            out.push(TAG_PLAIN);
            out.extend_from_slice(data);
            out
        }
    };
    match key {
        None => encoded,
        Some(key) => {
            let sealed = times.time(Stage::Seal, encoded.len(), || {
                key.seal(id.as_bytes(), &encoded)
            });
            let mut out = Vec::with_capacity(sealed.len() + 1);
            out.push(TAG_SEALED);
            out.extend_from_slice(&sealed);
            out
        }
    }
}

/// Bytes of each of the three samples [`looks_incompressible`] compresses.
const PROBE_SAMPLE: usize = 8 << 10;

/// Whether a large chunk is not worth compressing: three samples (start, middle, end)
/// compressed together save less than 3%. Random and encrypted data then costs a compression of
/// 24 KiB instead of the whole chunk; a chunk that compresses anywhere near a sample is kept.
fn looks_incompressible(data: &[u8]) -> bool {
    if data.len() < 16 * PROBE_SAMPLE {
        return false;
    }
    let mid = data.len() / 2;
    let mut sample = Vec::with_capacity(3 * PROBE_SAMPLE);
    sample.extend_from_slice(&data[..PROBE_SAMPLE]);
    sample.extend_from_slice(&data[mid..mid + PROBE_SAMPLE]);
    sample.extend_from_slice(&data[data.len() - PROBE_SAMPLE..]);
    match zstd_compress(&sample, PROBE_LEVEL) {
        Ok(c) => c.len() * 100 > sample.len() * 97,
        Err(_) => false,
    }
}

/// Decodes a stored chunk and checks it against its id; `key` must be given exactly when the
/// repository is encrypted.
pub fn decode_chunk(
    id: &ContentHash,
    stored: &[u8],
    key: Option<&RepoKey>,
) -> Result<Vec<u8>, ChunkCodecError> {
    let (&tag, body) = stored
        .split_first()
        .ok_or(ChunkCodecError::UnknownEncoding)?;
    let data = match (tag, key) {
        (TAG_SEALED, Some(key)) => {
            let inner = key
                .open(id.as_bytes(), body)
                .map_err(ChunkCodecError::Unauthentic)?;
            decode_plain(&inner)?
        }
        (TAG_SEALED, None) => return Err(ChunkCodecError::NeedsKey),
        (_, Some(_)) => return Err(ChunkCodecError::NotSealed),
        (_, None) => decode_plain(stored)?,
    };
    if chunk_id(&data, key) != *id {
        return Err(ChunkCodecError::HashMismatch);
    }
    Ok(data)
}

/// Decodes a `Z` or `P` encoding.
fn decode_plain(stored: &[u8]) -> Result<Vec<u8>, ChunkCodecError> {
    let (&tag, body) = stored
        .split_first()
        .ok_or(ChunkCodecError::UnknownEncoding)?;
    let data = match tag {
        TAG_PLAIN => body.to_vec(),
        TAG_ZSTD => {
            let split = body
                .len()
                .checked_sub(4)
                .ok_or(ChunkCodecError::StoredChecksum)?;
            let (body, crc) = body.split_at(split);
            let crc = u32::from_le_bytes(crc.try_into().expect("four bytes"));
            if crc32fast::hash(body) != crc {
                return Err(ChunkCodecError::StoredChecksum);
            }
            let mut decoder =
                zstd::stream::read::Decoder::new(body).map_err(ChunkCodecError::Decompress)?;
            // No chunk needs a window larger than itself: a frame header asking for more is
            // refused before the decoder allocates it.
            decoder
                .window_log_max(MAX_CHUNK_SIZE.ilog2())
                .map_err(ChunkCodecError::Decompress)?;
            read_capped(&mut decoder)?
        }
        _ => return Err(ChunkCodecError::UnknownEncoding),
    };
    if data.len() as u64 > MAX_CHUNK_SIZE {
        return Err(ChunkCodecError::TooLarge {
            limit: MAX_CHUNK_SIZE,
        });
    }
    Ok(data)
}

/// Reads `reader` to its end into a buffer that never grows past [`MAX_CHUNK_SIZE`]:
/// `read_to_end` alone doubles a full buffer before it finds the end, so reading the limit
/// plus one byte would reserve twice the limit (fuzz_parsers found a 2 KiB object that made
/// this decoder allocate 128 MiB).
fn read_capped(reader: &mut impl Read) -> Result<Vec<u8>, ChunkCodecError> {
    let limit = MAX_CHUNK_SIZE as usize;
    let mut out = Vec::with_capacity(crate::CHUNK_SIZE.min(limit));
    loop {
        // Fill the room there is; a Take of exactly that room never makes the vector grow.
        let room = out.capacity() - out.len();
        reader
            .by_ref()
            .take(room as u64)
            .read_to_end(&mut out)
            .map_err(ChunkCodecError::Decompress)?;
        if out.len() < out.capacity() {
            return Ok(out);
        }
        if out.len() >= limit {
            return if read_one_more(reader)? {
                Err(ChunkCodecError::TooLarge {
                    limit: MAX_CHUNK_SIZE,
                })
            } else {
                Ok(out)
            };
        }
        let grown = (2 * out.capacity()).min(limit);
        out.reserve_exact(grown - out.len());
    }
}

/// Whether `reader` has another byte.
fn read_one_more(reader: &mut impl Read) -> Result<bool, ChunkCodecError> {
    let mut one = [0u8; 1];
    loop {
        match reader.read(&mut one) {
            Ok(n) => return Ok(n == 1),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ChunkCodecError::Decompress(e)),
        }
    }
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
            let stored = encode_chunk(&id, data, None);
            assert_eq!(decode_chunk(&id, &stored, None).unwrap(), data);
        }
        let zero_id = chunk_hash(&zeros);
        assert!(encode_chunk(&zero_id, &zeros, None).len() < 1000);
        assert_eq!(encode_chunk(&zero_id, &zeros, None)[0], TAG_ZSTD);
    }

    #[test]
    fn every_flip_is_refused() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let id = chunk_hash(&data);
        let stored = encode_chunk(&id, &data, None);
        for pos in 0..stored.len() {
            let mut damaged = stored.clone();
            damaged[pos] ^= 0x01;
            assert!(decode_chunk(&id, &damaged, None).is_err(), "flip at {pos}");
        }
        assert!(decode_chunk(&id, &[], None).is_err());
        assert!(decode_chunk(&chunk_hash(b"other"), &stored, None).is_err());
    }

    #[test]
    fn sealed_chunks() {
        let key = RepoKey::generate();
        let data = vec![5u8; 10_000];
        let id = chunk_id(&data, Some(&key));
        let stored = encode_chunk(&id, &data, Some(&key));
        assert_eq!(stored[0], TAG_SEALED);
        assert_eq!(decode_chunk(&id, &stored, Some(&key)).unwrap(), data);
        assert!(matches!(
            decode_chunk(&id, &stored, None),
            Err(ChunkCodecError::NeedsKey)
        ));
        assert!(matches!(
            decode_chunk(&id, &stored, Some(&RepoKey::generate())),
            Err(ChunkCodecError::Unauthentic(_))
        ));
        for pos in 0..stored.len() {
            let mut damaged = stored.clone();
            damaged[pos] ^= 0x01;
            assert!(
                decode_chunk(&id, &damaged, Some(&key)).is_err(),
                "flip at {pos}"
            );
        }
        // A plain chunk slipped into an encrypted repository is refused.
        let plain = encode_chunk(&id, &data, None);
        assert!(matches!(
            decode_chunk(&id, &plain, Some(&key)),
            Err(ChunkCodecError::NotSealed)
        ));
        // A sealed chunk moved under another id does not open.
        let other = chunk_id(b"other", Some(&key));
        assert!(decode_chunk(&other, &stored, Some(&key)).is_err());
    }

    #[test]
    fn a_frame_asking_for_a_window_larger_than_any_chunk_is_refused() {
        use std::io::Write;
        // A streamed frame without a content size keeps the 128 MiB window it was made with.
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        encoder.window_log(27).unwrap();
        encoder.include_contentsize(false).unwrap();
        encoder.write_all(&data[..100_000]).unwrap();
        encoder.flush().unwrap();
        encoder.write_all(&data[100_000..]).unwrap();
        let compressed = encoder.finish().unwrap();
        // zstd's own default limit would decode it.
        assert_eq!(zstd::stream::decode_all(&compressed[..]).unwrap(), data);
        let mut stored = vec![TAG_ZSTD];
        stored.extend_from_slice(&compressed);
        stored.extend_from_slice(&crc32fast::hash(&compressed).to_le_bytes());
        let result = decode_chunk(&chunk_hash(&data), &stored, None);
        assert!(
            matches!(result, Err(ChunkCodecError::Decompress(_))),
            "{result:?}"
        );
        // The chunk as arkvm stores it decodes.
        let stored = encode_chunk(&chunk_hash(&data), &data, None);
        assert_eq!(
            decode_chunk(&chunk_hash(&data), &stored, None).unwrap(),
            data
        );
    }

    #[test]
    fn a_chunk_of_the_largest_size_decodes() {
        let data = vec![1u8; MAX_CHUNK_SIZE as usize];
        let id = chunk_hash(&data);
        let stored = encode_chunk(&id, &data, None);
        assert_eq!(stored[0], TAG_ZSTD);
        assert!(decode_chunk(&id, &stored, None).unwrap() == data);
    }

    #[test]
    fn random_chunks_skip_compression_and_compressible_ones_do_not() {
        let mut x = 0x1234_5678_9abc_def1u64;
        let random: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(looks_incompressible(&random));
        let mut half = random.clone();
        half[..1 << 19].fill(0);
        half[(1 << 20) - PROBE_SAMPLE..].fill(0);
        assert!(!looks_incompressible(&half));
        assert!(!looks_incompressible(&vec![7u8; 1 << 20]));
        let id = chunk_id(&random, None);
        let stored = encode_chunk(&id, &random, None);
        assert_eq!(stored[0], TAG_PLAIN);
        assert_eq!(decode_chunk(&id, &stored, None).unwrap(), random);
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

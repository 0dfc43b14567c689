//! Framed serde state files: magic, format version, payload length, JSON payload, CRC32.
//!
//! ```text
//! offset        size  field
//! 0             8     magic  b"ARKVMST\0"
//! 8             4     format version, u32 little-endian (FORMAT_VERSION)
//! 12            8     payload length N, u64 little-endian
//! 20            N     payload: the state serialized as compact JSON
//! 20 + N        4     CRC32 (IEEE, as crc32fast computes it) of bytes 0 .. 20 + N, little-endian
//! ```
//!
//! The frame itself (magic, version field, length field, trailing CRC) is the same in every
//! format version; only the meaning of the payload changes. A reader therefore checks, in this
//! order: the magic, the length against its limit (before allocating anything), the CRC, then
//! the version, so a damaged version field reads as damage and a genuine future file reads as a
//! future version. Nothing may follow the CRC.
//!
//! To look at a state file by hand: `tail -c +21 FILE | head -c -4 | jq .`

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::FORMAT_VERSION;

/// The first eight bytes of every state file.
pub const STATE_MAGIC: [u8; 8] = *b"ARKVMST\0";

/// Bytes before the payload: magic, version, length.
pub const STATE_HEADER_LEN: u64 = 20;

/// Bytes after the payload: the CRC32.
pub const STATE_TRAILER_LEN: u64 = 4;

/// The payload limit readers use unless they have a better bound (64 MiB).
pub const DEFAULT_STATE_LIMIT: u64 = 64 << 20;

/// Why a state file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The underlying reader or writer failed.
    #[error("state file I/O failed")]
    Io(#[source] io::Error),
    /// The file ended before the frame said it would.
    #[error("state file is truncated")]
    Truncated,
    /// The first eight bytes are not the state-file magic.
    #[error("not an arkvm state file (bad magic)")]
    BadMagic,
    /// The payload length is over the reader's limit; nothing was allocated for it.
    #[error("state payload of {len} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// The length the header claims.
        len: u64,
        /// The reader's limit.
        limit: u64,
    },
    /// The CRC32 does not match the bytes before it.
    #[error("state file is damaged (CRC32 {stored:#010x} stored, {computed:#010x} computed)")]
    ChecksumMismatch {
        /// The CRC32 found in the file.
        stored: u32,
        /// The CRC32 of the bytes read.
        computed: u32,
    },
    /// The file was written by a newer arkvm.
    #[error("state file format version {found} is newer than the supported version {supported}")]
    FutureVersion {
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The file has a version this build no longer reads.
    #[error(
        "state file format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// Bytes follow the CRC.
    #[error("state file has data after its checksum")]
    TrailingData,
    /// The state could not be serialized.
    #[error("cannot serialize the state")]
    Serialize(#[source] serde_json::Error),
    /// The payload is intact but does not describe the expected state.
    #[error("state payload does not match the expected state")]
    Deserialize(#[source] serde_json::Error),
}

/// Writes `state` as one framed state file of the current [`FORMAT_VERSION`].
pub fn write_state<T: Serialize>(w: &mut impl Write, state: &T) -> Result<(), StateFileError> {
    let payload = serde_json::to_vec(state).map_err(StateFileError::Serialize)?;
    let mut header = [0u8; STATE_HEADER_LEN as usize];
    header[..8].copy_from_slice(&STATE_MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..20].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    crc.update(&payload);
    w.write_all(&header).map_err(StateFileError::Io)?;
    w.write_all(&payload).map_err(StateFileError::Io)?;
    w.write_all(&crc.finalize().to_le_bytes())
        .map_err(StateFileError::Io)?;
    Ok(())
}

/// Reads one framed state file, refusing payloads longer than `limit` bytes.
///
/// The length is checked against `limit` before any buffer is allocated, and the buffer grows
/// only as bytes actually arrive, so a lying header costs nothing. The reader must end right
/// after the CRC.
pub fn read_state<T: DeserializeOwned>(r: &mut impl Read, limit: u64) -> Result<T, StateFileError> {
    let mut header = [0u8; STATE_HEADER_LEN as usize];
    read_exact(r, &mut header)?;
    if header[..8] != STATE_MAGIC {
        return Err(StateFileError::BadMagic);
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4-byte slice"));
    let len = u64::from_le_bytes(header[12..20].try_into().expect("8-byte slice"));
    if len > limit {
        return Err(StateFileError::TooLarge { len, limit });
    }

    // Grow with the data rather than trusting `len` for the allocation.
    let mut payload = Vec::with_capacity(len.min(1 << 20) as usize);
    r.by_ref()
        .take(len)
        .read_to_end(&mut payload)
        .map_err(StateFileError::Io)?;
    if (payload.len() as u64) < len {
        return Err(StateFileError::Truncated);
    }
    let mut trailer = [0u8; STATE_TRAILER_LEN as usize];
    read_exact(r, &mut trailer)?;

    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    crc.update(&payload);
    let computed = crc.finalize();
    let stored = u32::from_le_bytes(trailer);
    if stored != computed {
        return Err(StateFileError::ChecksumMismatch { stored, computed });
    }
    check_version(version)?;

    let mut extra = [0u8; 1];
    loop {
        match r.read(&mut extra) {
            Ok(0) => break,
            Ok(_) => return Err(StateFileError::TrailingData),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StateFileError::Io(e)),
        }
    }
    serde_json::from_slice(&payload).map_err(StateFileError::Deserialize)
}

/// Refuses any version but the current one, telling a newer file from an older one.
fn check_version(found: u32) -> Result<(), StateFileError> {
    if found > FORMAT_VERSION {
        Err(StateFileError::FutureVersion {
            found,
            supported: FORMAT_VERSION,
        })
    } else if found != FORMAT_VERSION {
        Err(StateFileError::UnsupportedVersion {
            found,
            supported: FORMAT_VERSION,
        })
    } else {
        Ok(())
    }
}

/// `read_exact` that reports a short read as [`StateFileError::Truncated`].
fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), StateFileError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => StateFileError::Truncated,
        _ => StateFileError::Io(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        regs: Vec<u64>,
        name: String,
        flag: bool,
    }

    fn sample() -> Sample {
        Sample {
            regs: vec![0, 1, u64::MAX, 0x1234_5678_9abc_def0],
            name: "vcpu0".into(),
            flag: true,
        }
    }

    fn encoded() -> Vec<u8> {
        let mut buf = Vec::new();
        write_state(&mut buf, &sample()).unwrap();
        buf
    }

    /// Rewrites the version field and fixes the CRC, as a newer writer would.
    fn with_version(mut bytes: Vec<u8>, version: u32) -> Vec<u8> {
        bytes[8..12].copy_from_slice(&version.to_le_bytes());
        let body = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn round_trip() {
        let bytes = encoded();
        assert_eq!(&bytes[..8], b"ARKVMST\0");
        assert_eq!(
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
            FORMAT_VERSION
        );
        let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap());
        assert_eq!(
            bytes.len() as u64,
            STATE_HEADER_LEN + len + STATE_TRAILER_LEN
        );
        let back: Sample = read_state(&mut bytes.as_slice(), DEFAULT_STATE_LIMIT).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let bytes = encoded();
        for pos in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut damaged = bytes.clone();
                damaged[pos] ^= bit;
                let res = read_state::<Sample>(&mut damaged.as_slice(), DEFAULT_STATE_LIMIT);
                assert!(res.is_err(), "flip {bit:#x} at byte {pos} was accepted");
            }
        }
    }

    #[test]
    fn flipped_version_reads_as_damage_not_future() {
        let mut bytes = encoded();
        bytes[9] ^= 0x01;
        let err = read_state::<Sample>(&mut bytes.as_slice(), DEFAULT_STATE_LIMIT).unwrap_err();
        assert!(
            matches!(err, StateFileError::ChecksumMismatch { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = encoded();
        for len in 0..bytes.len() {
            let err = read_state::<Sample>(&mut &bytes[..len], DEFAULT_STATE_LIMIT).unwrap_err();
            assert!(
                matches!(err, StateFileError::Truncated),
                "len {len}: {err:?}"
            );
        }
    }

    #[test]
    fn trailing_data_is_refused() {
        let mut bytes = encoded();
        bytes.push(0);
        let err = read_state::<Sample>(&mut bytes.as_slice(), DEFAULT_STATE_LIMIT).unwrap_err();
        assert!(matches!(err, StateFileError::TrailingData), "{err:?}");
    }

    #[test]
    fn future_version_names_both_versions() {
        let bytes = with_version(encoded(), FORMAT_VERSION + 1);
        let err = read_state::<Sample>(&mut bytes.as_slice(), DEFAULT_STATE_LIMIT).unwrap_err();
        match &err {
            StateFileError::FutureVersion { found, supported } => {
                assert_eq!((*found, *supported), (FORMAT_VERSION + 1, FORMAT_VERSION));
            }
            other => panic!("expected FutureVersion, got {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains(&(FORMAT_VERSION + 1).to_string()) && text.contains("newer"));
        let old = with_version(encoded(), 0);
        let err = read_state::<Sample>(&mut old.as_slice(), DEFAULT_STATE_LIMIT).unwrap_err();
        assert!(matches!(
            err,
            StateFileError::UnsupportedVersion { found: 0, .. }
        ));
    }

    #[test]
    fn size_limit_is_checked_before_reading_payload() {
        // A header claiming an absurd payload, followed by nothing: refused by the limit.
        let mut header = Vec::new();
        header.extend_from_slice(&STATE_MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&u64::MAX.to_le_bytes());
        let err = read_state::<Sample>(&mut header.as_slice(), 1 << 20).unwrap_err();
        assert!(matches!(
            err,
            StateFileError::TooLarge {
                len: u64::MAX,
                limit: 1048576
            }
        ));

        // A length under a huge limit but with no data: truncated, without allocating 1 TiB.
        let mut lying = header.clone();
        lying[12..20].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let err = read_state::<Sample>(&mut lying.as_slice(), u64::MAX).unwrap_err();
        assert!(matches!(err, StateFileError::Truncated), "{err:?}");

        // The real file is refused by a limit one byte under its payload.
        let bytes = encoded();
        let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap());
        assert!(read_state::<Sample>(&mut bytes.as_slice(), len).is_ok());
        let err = read_state::<Sample>(&mut bytes.as_slice(), len - 1).unwrap_err();
        assert!(matches!(err, StateFileError::TooLarge { .. }));
    }

    #[test]
    fn wrong_type_is_a_deserialize_error() {
        let bytes = encoded();
        let err =
            read_state::<Vec<String>>(&mut bytes.as_slice(), DEFAULT_STATE_LIMIT).unwrap_err();
        assert!(matches!(err, StateFileError::Deserialize(_)), "{err:?}");
    }
}

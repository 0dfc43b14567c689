//! Encryption at rest: a repository key seals chunks and point manifests with
//! XChaCha20-Poly1305 and names chunks by a keyed blake3 hash, so that without the key a point
//! can be neither read nor altered, nor its content guessed from chunk names.
//!
//! The 32-byte secret is kept in a key file as 64 hex digits. Three keys are derived from it
//! with `blake3::derive_key`: one for chunk ids, one for sealing, one for the fingerprint that
//! the repository config records to tell a wrong key from damage.
//!
//! A key file must be private: one that group or others may read (or write) is refused, as ssh
//! refuses such private keys, with the `chmod` that fixes it.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::chunk::ContentHash;

/// Bytes of an XChaCha20 nonce, stored in front of every sealed object.
const NONCE_LEN: usize = 24;

/// Why a key could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("cannot {action} key file {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The key file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The key file grants group or others some access.
    #[error(
        "key file {} is accessible by group or others (mode {mode:04o}); run `chmod 600 {}` (a key must be private)",
        path.display(),
        path.display()
    )]
    TooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold 64 hex digits.
    #[error("key file {} does not hold a key (64 hexadecimal digits)", path.display())]
    Malformed {
        /// The key file.
        path: PathBuf,
    },
    /// Decryption failed: the data was altered, or sealed with another key.
    #[error("authentication failed (the data was altered, or sealed with another key)")]
    Unauthentic,
}

/// A repository key.
#[derive(Clone)]
pub struct RepoKey {
    id_key: [u8; 32],
    cipher: XChaCha20Poly1305,
    fingerprint: String,
}

impl std::fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepoKey({})", self.fingerprint)
    }
}

impl RepoKey {
    /// A new random key.
    pub fn generate() -> Self {
        let secret = XChaCha20Poly1305::generate_key(&mut OsRng);
        Self::from_secret(secret.into())
    }

    /// Builds the key from its 32-byte secret.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let seal_key = blake3::derive_key("arkvm repository seal v1", &secret);
        let fingerprint = blake3::derive_key("arkvm repository key fingerprint v1", &secret);
        Self {
            id_key: blake3::derive_key("arkvm repository chunk id v1", &secret),
            cipher: XChaCha20Poly1305::new(&seal_key.into()),
            fingerprint: ContentHash::from_bytes(fingerprint).to_hex()[..16].to_string(),
        }
    }

    /// Writes a new random key to `path` (created with mode 0600; an existing file is refused)
    /// and returns it.
    pub fn create_file(path: &Path) -> Result<Self, KeyError> {
        let secret: [u8; 32] = XChaCha20Poly1305::generate_key(&mut OsRng).into();
        let mut file =
            crate::fs_util::create_private_file(path).map_err(|source| KeyError::Io {
                action: "create",
                path: path.to_path_buf(),
                source,
            })?;
        let hex = ContentHash::from_bytes(secret).to_hex();
        writeln!(file, "{hex}")
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyError::Io {
                action: "write",
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self::from_secret(secret))
    }

    /// Reads a key file, refusing one that group or others may access (its mode must be 0600
    /// or stricter).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io_error = |action| {
            move |source| KeyError::Io {
                action,
                path: path.to_path_buf(),
                source,
            }
        };
        let mut file = std::fs::File::open(path).map_err(io_error("open"))?;
        // The mode of what was opened, so a swap after the check cannot slip a file past it.
        let mode = file
            .metadata()
            .map_err(io_error("inspect"))?
            .permissions()
            .mode()
            & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io_error("read"))?;
        let secret = ContentHash::from_hex(text.trim()).map_err(|_| KeyError::Malformed {
            path: path.to_path_buf(),
        })?;
        Ok(Self::from_secret(*secret.as_bytes()))
    }

    /// A short public name of the key (16 hex digits), recorded in the repository config.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The id of a chunk under this key: blake3 keyed with a derived key.
    pub fn chunk_id(&self, data: &[u8]) -> ContentHash {
        blake3::keyed_hash(&self.id_key, data).into()
    }

    /// Encrypts `plain`, bound to `context` (which must be given again to open it): a random
    /// nonce followed by the ciphertext and tag.
    pub fn seal(&self, context: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: context,
                },
            )
            .expect("XChaCha20-Poly1305 encryption only fails for inputs over 256 GiB");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts what [`RepoKey::seal`] produced for the same `context`.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
        if sealed.len() < NONCE_LEN {
            return Err(KeyError::Unauthentic);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: context,
                },
            )
            .map_err(|_| KeyError::Unauthentic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TestDir;

    #[test]
    fn seal_open_and_tamper() {
        let key = RepoKey::generate();
        let sealed = key.seal(b"ctx", b"secret data");
        assert_eq!(key.open(b"ctx", &sealed).unwrap(), b"secret data");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert!(key.open(b"other", &sealed).is_err());
        for pos in 0..sealed.len() {
            let mut damaged = sealed.clone();
            damaged[pos] ^= 1;
            assert!(key.open(b"ctx", &damaged).is_err(), "flip at {pos}");
        }
        assert!(RepoKey::generate().open(b"ctx", &sealed).is_err());
        assert!(key.open(b"ctx", &sealed[..10]).is_err());
    }

    #[test]
    fn key_files() {
        let tmp = TestDir::new("key");
        let path = tmp.path().join("repo.key");
        let key = RepoKey::create_file(&path).unwrap();
        assert!(RepoKey::create_file(&path).is_err());
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let loaded = RepoKey::load(&path).unwrap();
        assert_eq!(loaded.fingerprint(), key.fingerprint());
        assert_eq!(loaded.chunk_id(b"x"), key.chunk_id(b"x"));
        assert_ne!(key.chunk_id(b"x"), crate::chunk::chunk_hash(b"x"));
        assert_ne!(RepoKey::generate().fingerprint(), key.fingerprint());
        std::fs::write(&path, "not a key").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            RepoKey::load(&path),
            Err(KeyError::Malformed { .. })
        ));
    }

    #[test]
    fn keys_others_can_access_are_refused_with_the_fix() {
        let tmp = TestDir::new("key-mode");
        let path = tmp.path().join("dr.key");
        RepoKey::create_file(&path).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = RepoKey::load(&path).unwrap_err();
            assert!(
                matches!(err, KeyError::TooOpen { mode: m, .. } if m == mode),
                "{mode:o}: {err:?}"
            );
            let text = err.to_string();
            assert!(
                text.contains(&format!("{mode:04o}"))
                    && text.contains(&format!("chmod 600 {}", path.display())),
                "{text}"
            );
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            RepoKey::load(&path).unwrap();
        }
    }
}

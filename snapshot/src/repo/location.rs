//! Where a repository is: a local directory, or an `s3://BUCKET/PREFIX` URL (given where a path
//! is taken, so every command that takes a repository takes either).

use std::path::{Path, PathBuf};

use super::codec::CHUNK_PREFIX;
use super::point::POINT_PREFIX;
use super::s3::{S3Store, LOCK_PREFIX};
use super::store::ChunkStore;
use super::RepoError;

/// The repository's config object.
pub(super) const CONFIG_NAME: &str = "config.json";

/// Whether `path` names a remote repository (an `s3://` URL) rather than a directory: such a
/// path is passed on as it is, never made absolute.
pub fn is_remote(path: &Path) -> bool {
    path.to_str().is_some_and(|p| p.starts_with("s3://"))
}

/// The store of a remote repository if `path` is a URL (`s3://...`), else `None`.
pub(super) fn open_remote(path: &Path) -> Result<Option<Box<dyn ChunkStore>>, RepoError> {
    let Some(text) = path.to_str() else {
        return Ok(None);
    };
    match S3Store::parse_url(text) {
        None => Ok(None),
        Some(url) => Ok(Some(Box::new(S3Store::open(&url?)?))),
    }
}

/// Checks that a repository may be created in a remote store: it holds nothing but a
/// repository's own objects (so `init` never mixes a repository into other data).
pub(super) fn check_remote_init_target(store: &dyn ChunkStore) -> Result<(), RepoError> {
    let own = [CHUNK_PREFIX, POINT_PREFIX, LOCK_PREFIX];
    for name in store.list("")? {
        if name != CONFIG_NAME && !own.iter().any(|p| name.starts_with(p)) {
            return Err(RepoError::ForeignDirectory {
                path: PathBuf::from(store.location()),
                entry: name.chars().take(80).collect(),
            });
        }
    }
    Ok(())
}

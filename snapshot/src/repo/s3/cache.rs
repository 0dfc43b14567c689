//! A local cache of an S3 repository's point manifests, so that `list`, `verify` and backup
//! planning do not download every manifest each time.
//!
//! Manifests never change once created, but a name can be deleted (prune) and, in principle,
//! created again with other bytes. So a cached copy is used only when the latest listing of the
//! bucket showed that name with the same entity tag the copy was stored under: the listing,
//! which every reader does first anyway, says the copy is current. Only `points/` objects are
//! cached. The cache lives under `$ARKVM_CACHE/s3`, else `$XDG_CACHE_HOME/arkvm/s3`, else
//! `~/.cache/arkvm/s3`, one folder per repository URL; files are 0600 in 0700 folders. A cache
//! that cannot be written is skipped silently: it only saves downloads.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use super::client::{Listed, S3Url};
use crate::fs_util::{create_private_dir_all, private_open_options};
use crate::repo::point::POINT_PREFIX;

/// The cache of one repository.
pub struct ManifestCache {
    dir: PathBuf,
    /// Entity tags of the objects in the latest listing, by name.
    etags: Mutex<HashMap<String, String>>,
}

fn cache_root() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("ARKVM_CACHE") {
        return Some(PathBuf::from(dir).join("s3"));
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("arkvm/s3"));
    }
    var("HOME").map(|home| PathBuf::from(home).join(".cache/arkvm/s3"))
}

impl ManifestCache {
    /// The cache of the repository at `url`, if a cache folder can be had.
    pub fn open(url: &S3Url) -> Option<Self> {
        let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
        let key = blake3::hash(format!("{endpoint}\n{url}").as_bytes());
        let dir = cache_root()?.join(&key.to_hex()[..32]);
        create_private_dir_all(&dir).ok()?;
        Some(Self {
            dir,
            etags: Mutex::new(HashMap::new()),
        })
    }

    fn file(&self, name: &str, etag: &str) -> PathBuf {
        // Servers quote entity tags in GET headers but not always in listings.
        let etag = etag.trim_matches('"');
        let key = blake3::hash(format!("{name}\n{etag}").as_bytes());
        self.dir.join(&key.to_hex()[..40])
    }

    /// Records the entity tags of a listing.
    pub fn note_listing(&self, listed: &[Listed]) {
        let mut etags = self.etags.lock().unwrap_or_else(|e| e.into_inner());
        for l in listed {
            if let (true, Some(etag)) = (l.name.starts_with(POINT_PREFIX), &l.etag) {
                etags.insert(l.name.clone(), etag.clone());
            }
        }
    }

    /// The cached bytes of `name`, if the latest listing vouches for them.
    pub fn get(&self, name: &str) -> Option<Vec<u8>> {
        let etag = self
            .etags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()?;
        std::fs::read(self.file(name, &etag)).ok()
    }

    /// Stores the bytes of `name` as downloaded with entity tag `etag`.
    pub fn put(&self, name: &str, etag: Option<&str>, bytes: &[u8]) {
        let Some(etag) = etag.filter(|_| name.starts_with(POINT_PREFIX)) else {
            return;
        };
        let path = self.file(name, etag);
        let tmp = path.with_extension(format!("tmp{}", super::lease::random_u64()));
        let written = private_open_options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| f.write_all(bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// Forgets `name` (it is being deleted).
    pub fn forget(&self, name: &str) {
        let etag = self
            .etags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(etag) = etag {
            let _ = std::fs::remove_file(self.file(name, &etag));
        }
    }
}

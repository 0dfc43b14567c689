//! The S3 backend of the repository: a [`ChunkStore`] on an S3 bucket below a key prefix,
//! reached through `object_store` (see [`client`]).
//!
//! ```text
//! s3://BUCKET/PREFIX/
//!   config.json, chunks/..., points/...   as in a local repository
//!   locks/<shared|exclusive>-<holder>-<seq>  leases instead of flock (see [`lease`])
//! ```
//!
//! Every object is created with `PutMode::Create` (`If-None-Match: *`) and never overwritten;
//! a PUT is atomic, so there are no temporaries to clean. Point manifests are cached locally
//! (see [`cache`]) by name and entity tag, so listing and planning do not download every
//! manifest each time. Layout and protocol: docs/object-store.md.

mod cache;
mod client;
mod error;
mod lease;
mod ops;

use std::sync::Arc;

pub use client::S3Url;
pub use error::S3Error;
pub use lease::{LEASE_TTL, LOCK_PREFIX};

use crate::repo::store::{ChunkStore, LockMode, StoreError, StoreLock};
use cache::ManifestCache;
use client::{Failure, S3Client};
use ops::{listed, remote, remove};

/// Chunk PUTs a backup keeps in flight to an S3 repository.
const WRITES_IN_FLIGHT: usize = 8;

/// A repository store in an S3 bucket.
pub struct S3Store {
    client: Arc<S3Client>,
    holder: String,
    cache: Option<ManifestCache>,
}

impl S3Store {
    /// Opens the store at `url` with the configuration in the environment (see
    /// [`S3Client::from_env`]). Sends no request.
    pub fn open(url: &S3Url) -> Result<Self, StoreError> {
        let client = S3Client::from_env(url)?;
        Ok(Self {
            client: Arc::new(client),
            holder: format!("{:016x}", ops::random_u64()),
            cache: ManifestCache::open(url),
        })
    }

    /// Parses `s3://BUCKET/PREFIX`: `None` if `text` is not an `s3://` URL.
    pub fn parse_url(text: &str) -> Option<Result<S3Url, StoreError>> {
        S3Url::parse(text).map(|r| r.map_err(StoreError::from))
    }
}

impl ChunkStore for S3Store {
    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> Result<bool, StoreError> {
        crate::repo::store::check_name(name)?;
        match self.client.put_create(name, bytes) {
            Ok(()) => Ok(true),
            Err(e) => match self.client.classify(&e) {
                Failure::Exists => Ok(false),
                _ => Err(remote(&self.client, "create", name, &e)),
            },
        }
    }

    fn sync(&self) -> Result<(), StoreError> {
        // A PUT is durable when it returns.
        Ok(())
    }

    fn get(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        crate::repo::store::check_name(name)?;
        if let Some(bytes) = self.cache.as_ref().and_then(|c| c.get(name)) {
            return Ok(bytes);
        }
        let (bytes, etag) = self
            .client
            .get(name)
            .map_err(|e| remote(&self.client, "read", name, &e))?;
        if let Some(cache) = &self.cache {
            cache.put(name, etag.as_deref(), &bytes);
        }
        Ok(bytes)
    }

    fn contains(&self, name: &str) -> Result<bool, StoreError> {
        crate::repo::store::check_name(name)?;
        self.client
            .head(name)
            .map_err(|e| remote(&self.client, "inspect", name, &e))
    }

    fn first_missing(&self, names: &[String]) -> Result<Option<String>, StoreError> {
        for name in names {
            crate::repo::store::check_name(name)?;
        }
        self.client
            .first_missing(names, WRITES_IN_FLIGHT)
            .map_err(|(name, e)| remote(&self.client, "inspect", &name, &e))
    }

    fn probe_before_put(&self) -> bool {
        // A HEAD is one round trip per chunk, one at a time per worker; the create-only PUT
        // (If-None-Match: *) answers 412 for an object that exists, so skip the HEAD.
        false
    }

    fn writes_in_flight(&self) -> usize {
        // A PUT of a 1 MiB chunk spends most of its time waiting on the server; RGW on
        // loopback took about twice a single stream's throughput with 4 in flight, and more
        // with 8 (docs/BENCHMARKS.md, "S3 repository").
        WRITES_IN_FLIGHT
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let folder = match prefix.rfind('/') {
            Some(i) => &prefix[..=i],
            None => "",
        };
        let listed = listed(&self.client, folder)?;
        if let Some(cache) = &self.cache {
            cache.note_listing(&listed);
        }
        let mut names: Vec<String> = listed
            .into_iter()
            .map(|l| l.name)
            .filter(|n| n.starts_with(prefix) && !n.starts_with(LOCK_PREFIX))
            .collect();
        names.sort();
        Ok(names)
    }

    fn delete(&self, name: &str) -> Result<(), StoreError> {
        crate::repo::store::check_name(name)?;
        if let Some(cache) = &self.cache {
            cache.forget(name);
        }
        remove(&self.client, name)
    }

    fn lock(&self, mode: LockMode, wait: bool) -> Result<StoreLock, StoreError> {
        // Each lock is its own holder, as each `flock` of a local store is its own open file:
        // two locks of one store (a restore's and its disk hydration's) must not share lease
        // names, or the second one's create finds the first one's lease and fails.
        let holder = format!("{}{:08x}", self.holder, ops::random_u64() as u32);
        let lease = lease::acquire(&self.client, &holder, mode, wait)?;
        Ok(StoreLock::new(Box::new(lease)))
    }

    fn clean_incomplete(&self) -> Result<usize, StoreError> {
        // PUTs are atomic, so nothing is ever half-written; leases of dead holders are removed.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut removed = 0;
        for lease in listed(&self.client, LOCK_PREFIX)? {
            if now - lease.modified_unix_ms > 2 * LEASE_TTL.as_millis() as i64 {
                remove(&self.client, &lease.name)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn location(&self) -> String {
        self.client.url().to_string()
    }
}

//! The store's requests with their errors turned into [`StoreError`]s, shared by the store, its
//! leases and its cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use super::client::{Failure, Listed, S3Client, S3Url};
use crate::repo::store::StoreError;

/// A random-enough 64-bit number for holder ids and jitter.
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = (
        std::process::id(),
        SystemTime::now(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        std::thread::current().id(),
    );
    std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), seed)
}

/// Builds the [`StoreError`] of a failed request on `name`.
pub fn remote(
    client: &S3Client,
    action: &'static str,
    name: &str,
    e: &object_store::Error,
) -> StoreError {
    match client.classify(e) {
        Failure::NotFound => StoreError::NotFound {
            name: name.to_string(),
        },
        Failure::Exists => StoreError::Remote {
            action,
            location: object_url(client.url(), name),
            problem: "it already exists".into(),
        },
        Failure::Other(problem) => StoreError::Remote {
            action,
            location: object_url(client.url(), name),
            problem,
        },
    }
}

/// Creates `name`, which must not exist.
pub fn put_new(client: &S3Client, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    client
        .put_create(name, bytes)
        .map_err(|e| remote(client, "create", name, &e))
}

/// Lists below `folder`.
pub fn listed(client: &S3Client, folder: &str) -> Result<Vec<Listed>, StoreError> {
    client
        .list(folder)
        .map_err(|e| remote(client, "list", folder, &e))
}

/// Deletes `name`.
pub fn remove(client: &S3Client, name: &str) -> Result<(), StoreError> {
    client
        .delete(name)
        .map_err(|e| remote(client, "delete", name, &e))
}

/// The URL of object `name` of the repository at `url`.
pub fn object_url(url: &S3Url, name: &str) -> String {
    format!("s3://{}/{}{name}", url.bucket, url.prefix)
}

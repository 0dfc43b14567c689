//! The repository lock of an S3 store, without `flock`: lease objects under `locks/`.
//!
//! A holder creates `locks/<shared|exclusive>-<holder>-<seq>` (create-only), then lists
//! `locks/`. Leases of other holders whose server time stamp is older than [`LEASE_TTL`] are
//! dead and ignored. A shared lease that sees a live exclusive one deletes itself and waits; an
//! exclusive lease that sees another exclusive one deletes itself and waits (both may back off;
//! the random jitter of the waits breaks the tie); an exclusive lease that sees only shared ones
//! stays (so new backups see it and wait) and waits for them to end. Because every holder
//! creates its lease before it lists, of two conflicting holders at least one sees the other.
//!
//! While held, a keeper thread renews the lease every [`RENEW_EVERY`] by creating a new lease
//! object and deleting the previous one (objects are never overwritten). Dropping the lock stops
//! the keeper and deletes the lease. A holder that dies leaves a lease that expires after
//! [`LEASE_TTL`]. See docs/object-store.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::client::S3Client;
use crate::repo::store::{LockMode, StoreError};

/// A lease not renewed for this long is dead.
pub const LEASE_TTL: Duration = Duration::from_secs(60);
/// How often a held lease is renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(15);
/// The folder of lease objects.
pub const LOCK_PREFIX: &str = "locks/";
/// The longest wait between two attempts to take a lock.
const MAX_WAIT: Duration = Duration::from_secs(2);

/// A held lease: renewed by a thread until dropped.
pub struct Lease {
    stop: Option<mpsc::Sender<()>>,
    keeper: Option<JoinHandle<()>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.join();
        }
    }
}

fn kind(mode: LockMode) -> &'static str {
    match mode {
        LockMode::Shared => "shared",
        LockMode::Exclusive => "exclusive",
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

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

/// Takes a lease of `mode` for `holder`, waiting for conflicting holders if `wait`.
pub fn acquire(
    client: &Arc<S3Client>,
    holder: &str,
    mode: LockMode,
    wait: bool,
) -> Result<Lease, StoreError> {
    let seq = Arc::new(AtomicU64::new(0));
    let name_of = |seq: u64| format!("{LOCK_PREFIX}{}-{holder}-{seq:08}", kind(mode));
    let mut backoff = Duration::from_millis(100);
    let mut own = name_of(seq.fetch_add(1, Ordering::Relaxed));
    let mut own_created = Instant::now();
    super::put_new(client, &own, b"arkvm repository lease")?;
    loop {
        let now = now_ms();
        let others: Vec<_> = super::listed(client, LOCK_PREFIX)?
            .into_iter()
            .filter(|l| !l.name.contains(&format!("-{holder}-")))
            .filter(|l| now - l.modified_unix_ms < LEASE_TTL.as_millis() as i64)
            .collect();
        let exclusive = |l: &&super::client::Listed| {
            l.name
                .strip_prefix(LOCK_PREFIX)
                .is_some_and(|n| n.starts_with("exclusive-"))
        };
        let blocked_by_exclusive = others.iter().any(|l| exclusive(&l));
        let blocked = match mode {
            LockMode::Shared => blocked_by_exclusive,
            LockMode::Exclusive => !others.is_empty(),
        };
        if !blocked {
            return Ok(start_keeper(client.clone(), own, seq, name_of_fn(holder, mode)));
        }
        // An exclusive lease waiting only for shared ones stays, so no new backup starts.
        let keep_intent = mode == LockMode::Exclusive && !blocked_by_exclusive && wait;
        if !keep_intent {
            super::remove(client, &own)?;
        }
        if !wait {
            return Err(StoreError::Locked {
                path: format!("{}{LOCK_PREFIX}", client.url()).into(),
            });
        }
        let jitter = Duration::from_millis(random_u64() % 100);
        std::thread::sleep(backoff + jitter);
        backoff = (backoff * 2).min(MAX_WAIT);
        if !keep_intent {
            own = name_of(seq.fetch_add(1, Ordering::Relaxed));
            own_created = Instant::now();
            super::put_new(client, &own, b"arkvm repository lease")?;
        } else if own_created.elapsed() >= RENEW_EVERY {
            let next = name_of(seq.fetch_add(1, Ordering::Relaxed));
            super::put_new(client, &next, b"arkvm repository lease")?;
            super::remove(client, &own)?;
            own = next;
            own_created = Instant::now();
        }
    }
}

type NameFn = Box<dyn Fn(u64) -> String + Send>;

fn name_of_fn(holder: &str, mode: LockMode) -> NameFn {
    let holder = holder.to_string();
    Box::new(move |seq| format!("{LOCK_PREFIX}{}-{holder}-{seq:08}", kind(mode)))
}

/// Starts the thread that renews `own` until the lease is dropped, then deletes it.
fn start_keeper(client: Arc<S3Client>, own: String, seq: Arc<AtomicU64>, name_of: NameFn) -> Lease {
    let (stop, stopped) = mpsc::channel::<()>();
    let keeper = std::thread::Builder::new()
        .name("arkvm-s3-lease".into())
        .spawn(move || {
            let mut current = own;
            loop {
                match stopped.recv_timeout(RENEW_EVERY) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => break,
                }
                let next = name_of(seq.fetch_add(1, Ordering::Relaxed));
                match super::put_new(&client, &next, b"arkvm repository lease") {
                    Ok(()) => {
                        let _ = super::remove(&client, &current);
                        current = next;
                    }
                    Err(e) => tracing::warn!(
                        error = %crate::error::error_chain(&e),
                        "cannot renew the repository lease"
                    ),
                }
            }
            if let Err(e) = super::remove(&client, &current) {
                tracing::warn!(
                    error = %crate::error::error_chain(&e),
                    "cannot remove the repository lease (it expires by itself)"
                );
            }
        });
    match keeper {
        Ok(keeper) => Lease {
            stop: Some(stop),
            keeper: Some(keeper),
        },
        // Without a keeper the lease is not renewed and expires after LEASE_TTL, which is
        // longer than any test but not than a large backup: say so.
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the lease keeper thread");
            Lease {
                stop: None,
                keeper: None,
            }
        }
    }
}

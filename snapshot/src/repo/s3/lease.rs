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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::client::{Listed, S3Client};
use super::ops::{self, random_u64};
use crate::error::lock;
use crate::repo::store::{LockGuard, LockMode, StoreError};

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
    renewals: Arc<Renewals>,
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
    // When the current lease's PUT was sent: its server time stamp is no earlier.
    let mut own_created = Instant::now();
    ops::put_new(client, &own, b"arkvm repository lease")?;
    loop {
        let now = now_ms();
        let others: Vec<_> = ops::listed(client, LOCK_PREFIX)?
            .into_iter()
            .filter(|l| !l.name.contains(&format!("-{holder}-")))
            .filter(|l| now - l.modified_unix_ms < LEASE_TTL.as_millis() as i64)
            .collect();
        let exclusive = |l: &&Listed| {
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
            return Ok(start_keeper(
                client.clone(),
                own,
                own_created,
                seq,
                name_of_fn(holder, mode),
            ));
        }
        // An exclusive lease waiting only for shared ones stays, so no new backup starts.
        let keep_intent = mode == LockMode::Exclusive && !blocked_by_exclusive && wait;
        if !keep_intent {
            ops::remove(client, &own)?;
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
            ops::put_new(client, &own, b"arkvm repository lease")?;
        } else if own_created.elapsed() >= RENEW_EVERY {
            let next = name_of(seq.fetch_add(1, Ordering::Relaxed));
            let sent = Instant::now();
            ops::put_new(client, &next, b"arkvm repository lease")?;
            ops::remove(client, &own)?;
            own = next;
            own_created = sent;
        }
    }
}

type NameFn = Box<dyn Fn(u64) -> String + Send>;

fn name_of_fn(holder: &str, mode: LockMode) -> NameFn {
    let holder = holder.to_string();
    Box::new(move |seq| format!("{LOCK_PREFIX}{}-{holder}-{seq:08}", kind(mode)))
}

/// How long after the PUT of a lease was sent it still counts as held for sure: its time to
/// live less a renewal period, which leaves that much for clocks that disagree and slow
/// requests.
const SURE_FOR: Duration = LEASE_TTL.saturating_sub(RENEW_EVERY);

/// When the lease held now was sent, and whether any renewal came later than [`SURE_FOR`]
/// after the one before it (then others may have seen the lease dead in between).
struct Renewals {
    last_sent: Mutex<Instant>,
    late: AtomicBool,
}

impl Renewals {
    fn renewed(&self, sent: Instant) {
        let mut last = lock(&self.last_sent);
        if last.elapsed() > SURE_FOR {
            self.late.store(true, Ordering::Release);
        }
        *last = sent;
    }

    fn unbroken(&self) -> bool {
        !self.late.load(Ordering::Acquire) && lock(&self.last_sent).elapsed() <= SURE_FOR
    }
}

impl LockGuard for Lease {
    fn unbroken(&self) -> bool {
        self.renewals.unbroken()
    }
}

/// Starts the thread that renews `own` (sent at `sent`) until the lease is dropped, then
/// deletes it.
fn start_keeper(
    client: Arc<S3Client>,
    own: String,
    sent: Instant,
    seq: Arc<AtomicU64>,
    name_of: NameFn,
) -> Lease {
    let (stop, stopped) = mpsc::channel::<()>();
    let renewals = Arc::new(Renewals {
        last_sent: Mutex::new(sent),
        late: AtomicBool::new(false),
    });
    let kept = renewals.clone();
    let keeper = std::thread::Builder::new()
        .name("arkvm-s3-lease".into())
        .spawn(move || {
            crate::thread_hook::on_thread_start();
            let mut current = own;
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(RENEW_EVERY) {
                let next = name_of(seq.fetch_add(1, Ordering::Relaxed));
                let sent = Instant::now();
                match ops::put_new(&client, &next, b"arkvm repository lease") {
                    Ok(()) => {
                        kept.renewed(sent);
                        let _ = ops::remove(&client, &current);
                        current = next;
                    }
                    Err(e) => tracing::warn!(
                        error = %crate::error::error_chain(&e),
                        "cannot renew the repository lease"
                    ),
                }
            }
            if let Err(e) = ops::remove(&client, &current) {
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
            renewals,
        },
        // Without a keeper the lease is not renewed and expires after LEASE_TTL, which is
        // longer than any test but not than a large backup: say so.
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the lease keeper thread");
            Lease {
                stop: None,
                keeper: None,
                renewals,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renewals(sent_ago: Duration) -> Renewals {
        Renewals {
            last_sent: Mutex::new(Instant::now() - sent_ago),
            late: AtomicBool::new(false),
        }
    }

    #[test]
    fn a_lease_renewed_in_time_is_unbroken() {
        let r = renewals(RENEW_EVERY);
        assert!(r.unbroken());
        r.renewed(Instant::now());
        assert!(r.unbroken());
    }

    #[test]
    fn a_renewal_that_came_late_breaks_the_lease_for_good() {
        let r = renewals(SURE_FOR + Duration::from_secs(1));
        assert!(!r.unbroken(), "not renewed for too long");
        r.renewed(Instant::now());
        assert!(
            !r.unbroken(),
            "renewed again, but others may have seen it dead"
        );
    }
}

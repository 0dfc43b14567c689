//! The DR receiver: accepts authenticated connections, stores the chunks a checkpoint lacks
//! (each decoded and re-hashed on arrival), and commits the point only when every chunk it
//! names is present; then keeps the last K points per VM. Also answers status requests.
//!
//! Strangers are bounded before they prove the key: a connection slot is held for at most the
//! handshake deadline (absolute, however the peer spaces its bytes), one peer address holds at
//! most [`ReceiverConfig::max_connections_per_peer`] of the slots, and refused or failed peers
//! are logged at most [`RejectLog::BURST`] times a minute, with a count of the rest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::link::{LinkKey, SecureLink};
use super::message::{CommitReport, Message, OfferHeader};
use super::{now_unix_ms, DrError};
use crate::chunk::ContentHash;
use crate::error::error_chain;
use crate::repo::{
    chunk_object_name, decode_chunk, point_object_name, KeepPolicy, LockMode, PointManifest,
    RepoError, RepoKey, Repository,
};

/// How many recent checkpoints the status keeps.
const RECENT: usize = 16;

/// How the receiver runs.
#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    /// Keep the newest N points of each VM after every commit (0 keeps all).
    pub keep_last: usize,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Connections one peer address may hold at once (0: half of `max_connections`, at least
    /// one), so that one address cannot take every slot.
    pub max_connections_per_peer: usize,
    /// Time a peer has to complete the whole handshake, from its accept: an absolute
    /// deadline, not a per-read timeout.
    pub handshake_timeout: Duration,
    /// Longest wait for a frame inside a checkpoint, and for a write.
    pub io_timeout: Duration,
    /// Longest wait for the next request on an idle connection.
    pub idle_timeout: Duration,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            keep_last: 0,
            max_connections: 8,
            max_connections_per_peer: 0,
            handshake_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(600),
        }
    }
}

impl ReceiverConfig {
    /// The connections one peer address may hold at once.
    pub fn per_peer_limit(&self) -> usize {
        let limit = match self.max_connections_per_peer {
            0 => self.max_connections / 2,
            n => n,
        };
        limit.clamp(1, self.max_connections.max(1))
    }
}

/// One committed checkpoint, as the receiver saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// The point.
    pub point_id: String,
    /// The VM.
    pub vm: String,
    /// When the primary created the point (its clock).
    pub created_unix_ms: u64,
    /// When the receiver committed it (its clock).
    pub committed_unix_ms: u64,
    /// Bytes received on the wire for this checkpoint.
    pub bytes_received: u64,
    /// Chunks the receiver lacked and received.
    pub chunks_received: u64,
    /// Distinct chunks the point uses.
    pub chunks_offered: u64,
    /// From the offer to the commit.
    pub transfer_ms: u64,
    /// The guest's pause for this checkpoint, as the primary reported it.
    pub pause_us: Option<u64>,
}

/// The newest point of one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// The VM.
    pub vm: String,
    /// Its points in the repository.
    pub points: u64,
    /// Its newest point.
    pub last_point_id: String,
    /// When the primary created that point.
    pub last_created_unix_ms: u64,
}

/// What `arkvm dr status` shows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiverStatus {
    /// The receiver's clock when it answered.
    pub receiver_unix_ms: u64,
    /// Readable points in the repository.
    pub points: u64,
    /// Per VM, its newest point.
    pub vms: Vec<VmStatus>,
    /// The retention (0 = all).
    pub keep_last: u64,
    /// Whether the repository is encrypted at rest.
    pub encrypted: bool,
    /// Checkpoints committed since the receiver started.
    pub checkpoints_committed: u64,
    /// Checkpoints discarded (cut off, refused, or failing verification) since it started.
    pub checkpoints_discarded: u64,
    /// Why the last one was discarded.
    pub last_discard: Option<String>,
    /// The last committed checkpoints since it started, oldest first.
    pub recent: Vec<CheckpointRecord>,
}

#[derive(Default)]
struct Counters {
    committed: u64,
    discarded: u64,
    last_discard: Option<String>,
    recent: Vec<CheckpointRecord>,
}

/// A committed checkpoint, before it is recorded.
struct Received {
    report: CommitReport,
    chunks: u64,
    created_unix_ms: u64,
    /// Whether to prune once the sender has its answer.
    prune: bool,
}

/// The receiving end of the DR link, over one repository.
pub struct Receiver {
    repo: Repository,
    /// The key chunks and manifests are sealed with, when the repository is encrypted.
    chunk_key: Option<RepoKey>,
    link: LinkKey,
    config: ReceiverConfig,
    counters: Mutex<Counters>,
    active: AtomicUsize,
    /// Open connections per peer address.
    per_peer: Mutex<HashMap<IpAddr, usize>>,
    /// Warnings about refused and failed strangers, rate-limited.
    rejects: RejectLog,
    /// Checkpoints being received right now.
    in_flight: AtomicUsize,
}

impl Receiver {
    /// Opens the repository in `dir`, or creates it (encrypted with `key` if `encrypt_new`).
    /// An existing repository is used as it is, encrypted with `key` or not encrypted.
    pub fn open_or_create(
        dir: &Path,
        key: &RepoKey,
        encrypt_new: bool,
        config: ReceiverConfig,
    ) -> Result<Self, DrError> {
        let repo = match Repository::open(dir, Some(key.clone())) {
            Ok(repo) => repo,
            Err(RepoError::NotARepository { .. }) => {
                Repository::init(dir, encrypt_new.then(|| key.clone()))?
            }
            Err(RepoError::KeyNotUsed) => Repository::open(dir, None)?,
            Err(e) => return Err(e.into()),
        };
        Ok(Self::new(repo, key, config))
    }

    /// A receiver over `repo`; `key` is the link key's source, and the repository's key when
    /// the repository is encrypted (it must then be the key it was opened with).
    pub fn new(repo: Repository, key: &RepoKey, config: ReceiverConfig) -> Self {
        Self::with_link_key(repo, key, LinkKey::from_repo_key(key), config)
    }

    /// As [`Receiver::new`], with the link key already derived.
    pub fn with_link_key(
        repo: Repository,
        key: &RepoKey,
        link: LinkKey,
        config: ReceiverConfig,
    ) -> Self {
        Self {
            chunk_key: repo.is_encrypted().then(|| key.clone()),
            repo,
            link,
            config,
            counters: Mutex::new(Counters::default()),
            active: AtomicUsize::new(0),
            per_peer: Mutex::new(HashMap::new()),
            rejects: RejectLog::new(),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Connections open right now (each holds a slot).
    pub fn connections(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Takes a slot for a connection from `peer`, or says why there is none.
    fn take_slot(&self, peer: IpAddr) -> Result<(), &'static str> {
        let mut per_peer = self.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        let held = per_peer.get(&peer).copied().unwrap_or(0);
        if held >= self.config.per_peer_limit() {
            return Err("too many connections from this address");
        }
        if self.active.fetch_add(1, Ordering::SeqCst) >= self.config.max_connections {
            self.active.fetch_sub(1, Ordering::SeqCst);
            return Err("too many connections");
        }
        per_peer.insert(peer, held + 1);
        Ok(())
    }

    /// Gives back a slot taken by [`Receiver::take_slot`].
    fn release_slot(&self, peer: IpAddr) {
        let mut per_peer = self.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = per_peer.get_mut(&peer) {
            *held -= 1;
            if *held == 0 {
                per_peer.remove(&peer);
            }
        }
        self.active.fetch_sub(1, Ordering::SeqCst);
    }

    /// The repository.
    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    /// Accepts connections forever, each on its own thread (at most `max_connections`, and at
    /// most [`ReceiverConfig::per_peer_limit`] per peer address). A failing peer is logged
    /// (strangers rate-limited) and dropped; the receiver goes on.
    pub fn serve(self: Arc<Self>, listener: TcpListener) -> Result<(), DrError> {
        loop {
            let (stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if let Err(why) = self.take_slot(peer.ip()) {
                self.rejects.note(peer, why);
                continue;
            }
            let this = Arc::clone(&self);
            let spawned = std::thread::Builder::new()
                .name("dr-conn".into())
                .spawn(move || {
                    this.serve_peer(stream, peer);
                    this.release_slot(peer.ip());
                });
            if let Err(e) = spawned {
                self.release_slot(peer.ip());
                tracing::warn!(error = %e, "cannot start a connection thread");
            }
        }
    }

    /// Serves one accepted connection and logs how it ended.
    fn serve_peer(&self, stream: TcpStream, peer: SocketAddr) {
        let link = match self.handshake(stream) {
            Ok(link) => link,
            Err(e) => {
                self.rejects.note(peer, &error_chain(&e));
                return;
            }
        };
        match self.serve_link(link) {
            Ok(()) => tracing::debug!(%peer, "connection closed"),
            Err(e) => tracing::warn!(%peer, error = %error_chain(&e), "connection dropped"),
        }
    }

    /// Serves one connection to its end: the handshake, then status requests and checkpoints.
    pub fn serve_connection(&self, stream: TcpStream) -> Result<(), DrError> {
        let link = self.handshake(stream)?;
        self.serve_link(link)
    }

    /// Runs the server side of the handshake, which must end within `handshake_timeout` of
    /// now whatever the peer does.
    fn handshake(&self, stream: TcpStream) -> Result<SecureLink, DrError> {
        let deadline = Instant::now() + self.config.handshake_timeout;
        let _ = stream.set_nodelay(true);
        let link = SecureLink::server_by(stream, &self.link, deadline)?;
        link.stream()
            .set_write_timeout(Some(self.config.io_timeout))
            .map_err(|e| DrError::Io {
                action: "set socket timeouts",
                source: e,
            })?;
        Ok(link)
    }

    /// Serves an authenticated connection: status requests and checkpoints, until the peer
    /// closes it.
    fn serve_link(&self, mut link: SecureLink) -> Result<(), DrError> {
        loop {
            set_read_timeout(&link, self.config.idle_timeout)?;
            let Some(frame) = link.recv_frame()? else {
                return Ok(());
            };
            set_read_timeout(&link, self.config.io_timeout)?;
            match Message::decode(&frame)? {
                Message::StatusRequest => {
                    let status = serde_json::to_value(self.status()?)
                        .expect("the receiver status serializes");
                    link.send_frame(&Message::Status(status).encode())?;
                }
                Message::Offer { header, ids } => {
                    let started = Instant::now();
                    let before = link.bytes_received();
                    match self.receive_checkpoint(&mut link, &header, &ids) {
                        Ok(Received {
                            report,
                            chunks,
                            created_unix_ms,
                            prune,
                        }) => {
                            self.record_commit(CheckpointRecord {
                                point_id: header.point_id.clone(),
                                vm: header.vm.clone(),
                                created_unix_ms,
                                committed_unix_ms: now_unix_ms(),
                                bytes_received: link.bytes_received() - before,
                                chunks_received: chunks,
                                chunks_offered: ids.len() as u64,
                                transfer_ms: started.elapsed().as_millis() as u64,
                                pause_us: header.pause_us,
                            });
                            link.send_frame(&Message::Committed(report).encode())?;
                            if prune {
                                self.prune();
                            }
                        }
                        Err(e) => {
                            let why = error_chain(&e);
                            tracing::warn!(point = %header.point_id, error = %why, "checkpoint discarded");
                            self.record_discard(&why);
                            let _ = link.send_frame(&Message::Refused(why).encode());
                            return Err(e);
                        }
                    }
                }
                other => {
                    return Err(DrError::Protocol(format!(
                        "a {} message outside a checkpoint",
                        other.name()
                    )))
                }
            }
        }
    }

    /// Receives one offered checkpoint.
    fn receive_checkpoint(
        &self,
        link: &mut SecureLink,
        header: &OfferHeader,
        ids: &[ContentHash],
    ) -> Result<Received, DrError> {
        if header.encrypted != self.repo.is_encrypted() {
            return Err(DrError::Refused(format!(
                "the sender's repository is {}encrypted at rest and the receiver's is {}; chunks \
                 travel as stored, so both must agree (a receiver creates its repository \
                 encrypted unless started with --no-encrypt-at-rest)",
                if header.encrypted { "" } else { "not " },
                if self.repo.is_encrypted() {
                    "encrypted"
                } else {
                    "not"
                }
            )));
        }
        if !valid_point_id(&header.point_id) {
            return Err(DrError::Protocol(
                "the offer has an invalid point id".into(),
            ));
        }
        let _in_flight = InFlight::enter(&self.in_flight);
        let store = self.repo.store();
        // Held until the point is created, so garbage collection keeps what this checkpoint
        // reuses and what it has received so far.
        let lock = store.lock(LockMode::Shared, true)?;
        let mut need = Vec::new();
        let mut wanted = HashSet::new();
        for (index, id) in ids.iter().enumerate() {
            if !store.contains(&chunk_object_name(id))? && wanted.insert(*id) {
                need.push(index as u32);
            }
        }
        link.send_frame(&Message::Need(need).encode())?;
        let (manifest, received) = self.receive_chunks(link, &mut wanted)?;
        if !wanted.is_empty() {
            return Err(DrError::Protocol(format!(
                "the manifest came before {} asked-for chunks",
                wanted.len()
            )));
        }
        let point = PointManifest::decode(&header.point_id, &manifest, self.chunk_key.as_ref())?;
        if point.vm != header.vm {
            return Err(DrError::Protocol(format!(
                "the manifest is of VM '{}', the offer of '{}'",
                point.vm, header.vm
            )));
        }
        // Every chunk the point names must be stored: the ones received were re-hashed above,
        // the others were verified when they arrived in an earlier checkpoint.
        let mut checked = HashSet::new();
        for id in point.chunk_ids() {
            if checked.insert(*id) && !store.contains(&chunk_object_name(id))? {
                return Err(RepoError::ChunkMissing { id: id.to_hex() }.into());
            }
        }
        store.sync()?;
        let created = store.put_if_absent(&point_object_name(&point.id), &manifest)?;
        drop(lock);
        tracing::info!(point = %point.id, received, created, "checkpoint committed");
        let mut report = CommitReport {
            point_id: point.id.clone(),
            already_present: !created,
            ..CommitReport::default()
        };
        // What keeping the last K will leave; the prune itself runs after the answer, so that
        // it does not delay the primary. It waits for every other checkpoint in flight (they
        // hold the shared lock), so while there is one, the next commit prunes instead.
        let count = self
            .repo
            .points()?
            .iter()
            .filter(|(_, p)| p.as_ref().is_ok_and(|p| p.vm == point.vm))
            .count() as u64;
        let keep = self.config.keep_last as u64;
        let prune = keep > 0 && self.in_flight.load(Ordering::SeqCst) == 1;
        report.points_kept = if prune { count.min(keep) } else { count };
        report.points_pruned = count - report.points_kept;
        if keep > 0 && !prune {
            tracing::debug!("another checkpoint is in flight; prune deferred");
        }
        Ok(Received {
            report,
            chunks: received,
            created_unix_ms: point.created_unix_ms,
            prune,
        })
    }

    /// Removes what the retention no longer keeps, and collects unused chunks.
    fn prune(&self) {
        let policy = KeepPolicy::last(self.config.keep_last);
        match self.repo.prune(&policy) {
            Ok(pruned) => tracing::debug!(removed = pruned.removed.len(), "pruned"),
            Err(e) => tracing::warn!(error = %error_chain(&e), "prune after commit failed"),
        }
    }

    /// Receives the asked-for chunks up to the manifest; returns the manifest and the number
    /// of chunks stored. A worker thread decodes, re-hashes and stores each chunk while the
    /// next frame is read and decrypted; the first damaged chunk ends the checkpoint.
    fn receive_chunks(
        &self,
        link: &mut SecureLink,
        wanted: &mut HashSet<ContentHash>,
    ) -> Result<(Vec<u8>, u64), DrError> {
        let store = self.repo.store();
        let key = self.chunk_key.as_ref();
        std::thread::scope(|scope| {
            let (chunks, queue) = std::sync::mpsc::sync_channel::<(ContentHash, Vec<u8>)>(4);
            let worker = scope.spawn(move || -> Result<u64, DrError> {
                let mut stored_count = 0;
                for (id, stored) in queue {
                    decode_chunk(&id, &stored, key).map_err(|source| RepoError::ChunkDamaged {
                        id: id.to_hex(),
                        source,
                    })?;
                    store.put_if_absent(&chunk_object_name(&id), &stored)?;
                    stored_count += 1;
                }
                Ok(stored_count)
            });
            let manifest = loop {
                match Message::decode(&link.recv_required("receive the checkpoint")?)? {
                    Message::Chunk { id, stored } => {
                        if !wanted.remove(&id) {
                            return Err(DrError::Protocol(format!("chunk {id} was not asked for")));
                        }
                        if chunks.send((id, stored)).is_err() {
                            // The worker stopped on an error; it is returned below.
                            break None;
                        }
                    }
                    Message::Manifest(bytes) => break Some(bytes),
                    other => {
                        return Err(DrError::Protocol(format!(
                            "a {} message inside a checkpoint",
                            other.name()
                        )))
                    }
                }
            };
            drop(chunks);
            let received = worker
                .join()
                .map_err(|_| DrError::Protocol("the chunk store worker panicked".into()))??;
            let manifest = manifest.ok_or_else(|| {
                DrError::Protocol("the chunk store worker stopped without an error".into())
            })?;
            Ok((manifest, received))
        })
    }

    /// The receiver's view: its points per VM and its recent checkpoints.
    pub fn status(&self) -> Result<ReceiverStatus, DrError> {
        let mut by_vm: BTreeMap<String, VmStatus> = BTreeMap::new();
        let mut points = 0;
        for (_, point) in self.repo.points()? {
            let Ok(point) = point else { continue };
            points += 1;
            let entry = by_vm.entry(point.vm.clone()).or_insert_with(|| VmStatus {
                vm: point.vm.clone(),
                points: 0,
                last_point_id: String::new(),
                last_created_unix_ms: 0,
            });
            entry.points += 1;
            if point.id > entry.last_point_id {
                entry.last_point_id = point.id.clone();
                entry.last_created_unix_ms = point.created_unix_ms;
            }
        }
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        Ok(ReceiverStatus {
            receiver_unix_ms: now_unix_ms(),
            points,
            vms: by_vm.into_values().collect(),
            keep_last: self.config.keep_last as u64,
            encrypted: self.repo.is_encrypted(),
            checkpoints_committed: counters.committed,
            checkpoints_discarded: counters.discarded,
            last_discard: counters.last_discard.clone(),
            recent: counters.recent.clone(),
        })
    }

    fn record_commit(&self, record: CheckpointRecord) {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        counters.committed += 1;
        counters.recent.push(record);
        let excess = counters.recent.len().saturating_sub(RECENT);
        counters.recent.drain(..excess);
    }

    fn record_discard(&self, why: &str) {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        counters.discarded += 1;
        counters.last_discard = Some(why.to_string());
    }
}

/// Counts a checkpoint in flight for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Rate-limited warnings about peers that were refused a slot or failed the handshake: at most
/// [`RejectLog::BURST`] a minute, then one line with the count of those not logged, so that a
/// stranger cannot flood the log.
struct RejectLog {
    window: Mutex<RejectWindow>,
}

struct RejectWindow {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

/// What to do with one rejection.
#[derive(Debug, PartialEq, Eq)]
enum RejectAction {
    /// Log it, and say how many were not logged before it.
    Log { suppressed_before: u64 },
    /// Count it only.
    Suppress,
}

impl RejectLog {
    /// Warnings logged per window.
    const BURST: u32 = 5;
    /// The window.
    const WINDOW: Duration = Duration::from_secs(60);

    fn new() -> Self {
        Self {
            window: Mutex::new(RejectWindow {
                started: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Decides about one rejection at `now`.
    fn decide(&self, now: Instant) -> RejectAction {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if now.saturating_duration_since(w.started) >= Self::WINDOW {
            w.started = now;
            w.logged = 0;
        }
        if w.logged < Self::BURST {
            w.logged += 1;
            RejectAction::Log {
                suppressed_before: std::mem::take(&mut w.suppressed),
            }
        } else {
            w.suppressed += 1;
            RejectAction::Suppress
        }
    }

    /// Logs (or counts) that `peer` was refused or dropped before proving the key.
    fn note(&self, peer: SocketAddr, why: &str) {
        match self.decide(Instant::now()) {
            RejectAction::Log {
                suppressed_before: 0,
            } => tracing::warn!(%peer, reason = %why, "peer refused"),
            RejectAction::Log { suppressed_before } => tracing::warn!(
                %peer,
                reason = %why,
                not_logged = suppressed_before,
                "peer refused ({suppressed_before} more refusals were not logged)"
            ),
            RejectAction::Suppress => {}
        }
    }
}

fn set_read_timeout(link: &SecureLink, timeout: Duration) -> Result<(), DrError> {
    link.stream()
        .set_read_timeout(Some(timeout))
        .map_err(|e| DrError::Io {
            action: "set the socket timeout",
            source: e,
        })
}

/// Whether `id` can name a point object (1-128 characters of `[A-Za-z0-9._-]`, no leading dot).
fn valid_point_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_peers_are_logged_a_few_times_a_minute() {
        let log = RejectLog::new();
        let t0 = Instant::now();
        let logged = (0..1000)
            .filter(|i| log.decide(t0 + Duration::from_millis(*i)) != RejectAction::Suppress)
            .count();
        assert_eq!(logged, RejectLog::BURST as usize);
        // The next window logs again, first with the count of what was not logged.
        let later = t0 + RejectLog::WINDOW + Duration::from_secs(1);
        assert_eq!(
            log.decide(later),
            RejectAction::Log {
                suppressed_before: 1000 - RejectLog::BURST as u64
            }
        );
        assert_eq!(
            log.decide(later),
            RejectAction::Log {
                suppressed_before: 0
            }
        );
    }

    #[test]
    fn per_peer_limit() {
        let config = |max, per| ReceiverConfig {
            max_connections: max,
            max_connections_per_peer: per,
            ..ReceiverConfig::default()
        };
        assert_eq!(config(8, 0).per_peer_limit(), 4);
        assert_eq!(config(1, 0).per_peer_limit(), 1);
        assert_eq!(config(8, 3).per_peer_limit(), 3);
        assert_eq!(config(8, 20).per_peer_limit(), 8);
    }
}

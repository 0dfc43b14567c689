//! The DR sender: offers a backup point of a local repository to a receiver, sends the chunks
//! it lacks and then the manifest; plus status queries and a retrying sender with backoff.

use std::collections::HashSet;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::link::{LinkKey, SecureLink, MAX_FRAME_LEN};
use super::message::{CommitReport, Message, OfferHeader};
use super::receiver::ReceiverStatus;
use super::{now_unix_ms, DrError};
use crate::chunk::ContentHash;
use crate::error::error_chain;
use crate::repo::{chunk_object_name, point_object_name, RepoKey, Repository};

/// What the primary knows about a checkpoint besides its point.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// How long the guest was paused to take it.
    pub pause_us: Option<u64>,
}

/// What sending one checkpoint cost.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReport {
    /// The point.
    pub point_id: String,
    /// Bytes written to the wire for this checkpoint (frames, including overhead).
    pub bytes_sent: u64,
    /// Stored (compressed) chunk bytes among them.
    pub chunk_bytes_sent: u64,
    /// Chunks the receiver lacked, sent.
    pub chunks_sent: u64,
    /// Chunks the receiver had, not sent.
    pub chunks_skipped: u64,
    /// Distinct chunks of the point.
    pub chunks_total: u64,
    /// From the offer to the receiver's commit.
    pub duration_ms: u64,
    /// What the receiver reported.
    pub commit: CommitReport,
}

/// An authenticated connection to a receiver; carries any number of checkpoints and status
/// requests, one after the other.
pub struct DrClient {
    link: SecureLink,
}

impl DrClient {
    /// Connects to `addr` (host:port) within `timeout` per address tried, and runs the
    /// handshake. Every later read and write also times out after `timeout`.
    pub fn connect(addr: &str, key: &LinkKey, timeout: Duration) -> Result<Self, DrError> {
        let connect_error = |source| DrError::Connect {
            addr: addr.to_string(),
            source,
        };
        let mut last = None;
        let mut stream = None;
        for candidate in addr.to_socket_addrs().map_err(connect_error)? {
            match TcpStream::connect_timeout(&candidate, timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream =
            stream.ok_or_else(|| {
                connect_error(last.unwrap_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                }))
            })?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| DrError::Io {
                action: "set socket timeouts",
                source: e,
            })?;
        let _ = stream.set_nodelay(true);
        Ok(Self {
            link: SecureLink::client(stream, key)?,
        })
    }

    /// Sends point `point_id` of `repo`: only the chunks the receiver lacks, then the
    /// manifest; returns once the receiver has committed it.
    pub fn send_point(
        &mut self,
        repo: &Repository,
        point_id: &str,
        info: &CheckpointInfo,
    ) -> Result<SendReport, DrError> {
        let offer = OutgoingPoint::read(repo, point_id, info)?;
        self.send_prepared(repo, &offer)
    }

    /// Sends a point already read from `repo`.
    fn send_prepared(
        &mut self,
        repo: &Repository,
        offer: &OutgoingPoint,
    ) -> Result<SendReport, DrError> {
        let started = Instant::now();
        let OutgoingPoint {
            header,
            ids,
            manifest,
            ..
        } = offer;
        let before = self.link.bytes_sent();
        self.link.send_frame(&Message::encode_offer(header, ids))?;
        let need = match self.recv("receive the receiver's answer")? {
            Message::Need(need) => need,
            other => return Err(unexpected(&other)),
        };
        let mut report = SendReport {
            point_id: header.point_id.clone(),
            chunks_total: ids.len() as u64,
            ..SendReport::default()
        };
        let mut previous = None;
        for index in need {
            if previous.is_some_and(|p| index <= p) || index as usize >= ids.len() {
                return Err(DrError::Protocol(
                    "the receiver asked for chunks out of order or out of range".into(),
                ));
            }
            previous = Some(index);
            let id = ids[index as usize];
            let stored = repo.store().get(&chunk_object_name(&id))?;
            report.chunk_bytes_sent += stored.len() as u64;
            self.link
                .send_frame(&Message::Chunk { id, stored }.encode())?;
            report.chunks_sent += 1;
        }
        report.chunks_skipped = report.chunks_total - report.chunks_sent;
        self.link
            .send_frame(&Message::Manifest(manifest.clone()).encode())?;
        report.commit = match self.recv("receive the receiver's commit")? {
            Message::Committed(commit) => commit,
            other => return Err(unexpected(&other)),
        };
        report.bytes_sent = self.link.bytes_sent() - before;
        report.duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            point = %report.point_id,
            sent = report.chunks_sent,
            skipped = report.chunks_skipped,
            bytes = report.bytes_sent,
            "checkpoint sent"
        );
        Ok(report)
    }

    /// Asks the receiver for its status.
    pub fn status(&mut self) -> Result<ReceiverStatus, DrError> {
        self.link.send_frame(&Message::StatusRequest.encode())?;
        match self.recv("receive the status")? {
            Message::Status(value) => serde_json::from_value(value)
                .map_err(|e| DrError::Protocol(format!("the status does not parse: {e}"))),
            other => Err(unexpected(&other)),
        }
    }

    fn recv(&mut self, waiting_for: &'static str) -> Result<Message, DrError> {
        match Message::decode(&self.link.recv_required(waiting_for)?)? {
            Message::Refused(why) => Err(DrError::Refused(why)),
            message => Ok(message),
        }
    }
}

/// A point read from the local repository, ready to offer.
struct OutgoingPoint {
    header: OfferHeader,
    /// When the point was created.
    created_unix_ms: u64,
    /// Its distinct chunk ids, in first-use order.
    ids: Vec<ContentHash>,
    /// Its manifest object as stored.
    manifest: Vec<u8>,
}

impl OutgoingPoint {
    fn read(repo: &Repository, point_id: &str, info: &CheckpointInfo) -> Result<Self, DrError> {
        let point = repo.read_point(point_id)?;
        let manifest = repo.store().get(&point_object_name(point_id))?;
        let mut seen = HashSet::new();
        let ids: Vec<ContentHash> = point
            .chunk_ids()
            .filter(|id| seen.insert(**id))
            .copied()
            .collect();
        if ids.len() > (MAX_FRAME_LEN - 4096) / 32 {
            return Err(DrError::Protocol(format!(
                "point '{point_id}' has {} chunks, more than one offer can carry",
                ids.len()
            )));
        }
        Ok(Self {
            created_unix_ms: point.created_unix_ms,
            header: OfferHeader {
                point_id: point.id,
                vm: point.vm,
                encrypted: repo.is_encrypted(),
                pause_us: info.pause_us,
            },
            ids,
            manifest,
        })
    }
}

fn unexpected(message: &Message) -> DrError {
    DrError::Protocol(format!("unexpected {} message", message.name()))
}

/// Sends point `point_id` of `repo` to the receiver at `addr` over a new connection;
/// `timeout` bounds the connect and every read and write. The link key is derived from
/// `key` (cached per process, see [`LinkKey::from_repo_key`]).
pub fn send_point(
    repo: &Repository,
    point_id: &str,
    addr: &str,
    key: &RepoKey,
    timeout: Duration,
) -> Result<SendReport, DrError> {
    send_checkpoint(
        repo,
        point_id,
        addr,
        &LinkKey::from_repo_key(key),
        timeout,
        &CheckpointInfo::default(),
    )
}

/// As [`send_point`], with a derived link key and the checkpoint's pause.
pub fn send_checkpoint(
    repo: &Repository,
    point_id: &str,
    addr: &str,
    key: &LinkKey,
    timeout: Duration,
    info: &CheckpointInfo,
) -> Result<SendReport, DrError> {
    DrClient::connect(addr, key, timeout)?.send_point(repo, point_id, info)
}

/// Asks the receiver at `addr` for its status.
pub fn query_status(
    addr: &str,
    key: &LinkKey,
    timeout: Duration,
) -> Result<ReceiverStatus, DrError> {
    DrClient::connect(addr, key, timeout)?.status()
}

/// How a [`DrSender`] connects and retries.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// Bounds the connect and every read and write.
    pub timeout: Duration,
    /// Tries per checkpoint (at least one).
    pub attempts: u32,
    /// The wait before the second try; it doubles with each failure.
    pub initial_backoff: Duration,
    /// The longest wait between tries.
    pub max_backoff: Duration,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            attempts: 3,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// What a [`DrSender`] has done.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderStats {
    /// Checkpoints the receiver committed.
    pub checkpoints_sent: u64,
    /// Checkpoints given up after every try.
    pub checkpoints_failed: u64,
    /// Failed tries (each followed by a reconnect).
    pub failed_attempts: u64,
    /// When the last checkpoint was committed (this host's clock).
    pub last_success_unix_ms: Option<u64>,
    /// The last checkpoint's report.
    pub last_report: Option<SendReport>,
    /// The last failure.
    pub last_error: Option<String>,
    /// When the newest point the receiver committed was created (this host's clock).
    pub last_point_created_unix_ms: Option<u64>,
    /// Intervals the caller skipped because a send was still running
    /// ([`DrSender::skip_interval`]).
    pub intervals_skipped: u64,
}

impl SenderStats {
    /// The recovery point lag at `now_unix_ms`: how old the newest committed point is.
    pub fn rpo_ms(&self, now_unix_ms: u64) -> Option<u64> {
        self.last_point_created_unix_ms
            .map(|created| now_unix_ms.saturating_sub(created))
    }
}

/// Sends checkpoints to one receiver over a kept-open connection, reconnecting with
/// exponential backoff when it fails. A retried checkpoint resumes: chunks that reached the
/// receiver before the failure are not sent again.
pub struct DrSender {
    addr: String,
    key: LinkKey,
    config: SenderConfig,
    client: Option<DrClient>,
    stats: SenderStats,
}

impl DrSender {
    /// A sender to `addr` with the link key derived from `key` (once).
    pub fn new(addr: &str, key: &RepoKey, config: SenderConfig) -> Self {
        Self::with_link_key(addr, LinkKey::from_repo_key(key), config)
    }

    /// A sender with an already derived link key.
    pub fn with_link_key(addr: &str, key: LinkKey, config: SenderConfig) -> Self {
        Self {
            addr: addr.to_string(),
            key,
            config,
            client: None,
            stats: SenderStats::default(),
        }
    }

    /// What it has done so far.
    pub fn stats(&self) -> &SenderStats {
        &self.stats
    }

    /// Counts an interval the caller skipped (the link was too slow to start another
    /// checkpoint); shows in [`SenderStats::intervals_skipped`].
    pub fn skip_interval(&mut self) {
        self.stats.intervals_skipped += 1;
    }

    /// Sends point `point_id` of `repo`, retrying up to the configured number of tries.
    /// A failure of the local repository is not retried.
    pub fn send(
        &mut self,
        repo: &Repository,
        point_id: &str,
        info: &CheckpointInfo,
    ) -> Result<SendReport, DrError> {
        let offer = match OutgoingPoint::read(repo, point_id, info) {
            Ok(offer) => offer,
            Err(e) => {
                self.stats.checkpoints_failed += 1;
                self.stats.last_error = Some(error_chain(&e));
                return Err(e);
            }
        };
        let mut backoff = self.config.initial_backoff;
        let attempts = self.config.attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            // A kept connection may have died while idle: its failure does not count as a try.
            let reused = self.client.is_some();
            match self.try_send(repo, &offer) {
                Ok(report) => {
                    self.stats.checkpoints_sent += 1;
                    self.stats.last_success_unix_ms = Some(now_unix_ms());
                    self.stats.last_report = Some(report.clone());
                    self.stats.last_point_created_unix_ms = Some(offer.created_unix_ms);
                    return Ok(report);
                }
                Err(e) => {
                    self.client = None;
                    self.stats.failed_attempts += 1;
                    self.stats.last_error = Some(error_chain(&e));
                    let local = matches!(e, DrError::Repo(_) | DrError::Store(_));
                    if reused && attempt == 1 && !local {
                        attempt = 0;
                        tracing::debug!(error = %error_chain(&e), "kept connection failed; reconnecting");
                        continue;
                    }
                    if local || attempt >= attempts {
                        self.stats.checkpoints_failed += 1;
                        return Err(e);
                    }
                    tracing::warn!(attempt, error = %error_chain(&e), "checkpoint send failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
    }

    /// Asks the receiver for its status (over the kept connection if there is one).
    pub fn receiver_status(&mut self) -> Result<ReceiverStatus, DrError> {
        let result = self.client()?.status();
        if result.is_err() {
            self.client = None;
        }
        result
    }

    fn try_send(
        &mut self,
        repo: &Repository,
        offer: &OutgoingPoint,
    ) -> Result<SendReport, DrError> {
        self.client()?.send_prepared(repo, offer)
    }

    fn client(&mut self) -> Result<&mut DrClient, DrError> {
        if self.client.is_none() {
            self.client = Some(DrClient::connect(
                &self.addr,
                &self.key,
                self.config.timeout,
            )?);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }
}

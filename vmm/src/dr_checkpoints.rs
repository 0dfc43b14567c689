//! Continuous protection: every interval the VMM takes a live (copy-on-write) checkpoint into a
//! local staging repository, incrementally, and a sender thread ships the point to the
//! disaster recovery receiver, where only the chunks it lacks travel. A checkpoint never waits
//! for the link: while the previous one is still being sent, intervals are skipped (and
//! counted), so the guest's pause per checkpoint stays the cow snapshot's whatever the link
//! does. A failed send is retried by the next checkpoint, which resumes from what the receiver
//! already has.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use snapshot::dr::{send_checkpoint, CheckpointInfo, LinkKey, SendReport};
use snapshot::repo::{KeepPolicy, RepoKey, Repository};

use crate::api::{
    ApiResponse, DrCheckpoint, DrParams, DrState, DrStatus, SnapshotMode, SnapshotParams,
    SnapshotStrategy, SnapshotTarget,
};
use crate::runtime::Vmm;

/// How long one send may block on the link before it counts as failed.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Points kept in the staging repository.
const STAGING_KEEP: usize = 2;

/// Why continuous protection could not start.
#[derive(Debug, thiserror::Error)]
pub enum DrSetupError {
    #[error("cannot load the DR key")]
    Key(#[from] snapshot::repo::KeyError),
    #[error("cannot prepare the staging repository {0}")]
    Staging(PathBuf, #[source] snapshot::repo::RepoError),
    #[error("cannot create the staging directory {0}")]
    StagingDir(PathBuf, #[source] std::io::Error),
}

/// A checkpoint waiting to be sent or being sent.
struct Outgoing {
    point_id: String,
    taken_at_ms: u64,
    pause_us: u64,
}

/// The state of continuous protection.
pub struct DrLoop {
    target: String,
    interval: Duration,
    key: RepoKey,
    key_path: PathBuf,
    staging: PathBuf,
    next_due: Instant,
    sending: Option<(Outgoing, JoinHandle<Result<SendReport, String>>)>,
    status: DrStatus,
    last_taken_ms: Option<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// The default staging repository of a VM.
pub fn default_staging(name: &str) -> PathBuf {
    let cache = std::env::var("ARKVM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/arkvm")
        });
    cache
        .join("dr-staging")
        .join(format!("{name}-{}", std::process::id()))
}

impl DrLoop {
    /// Prepares continuous protection (the staging repository uses the link's key, so chunk
    /// ids agree on both sides).
    pub fn new(params: &DrParams, staging: &Path) -> Result<Self, DrSetupError> {
        let key = RepoKey::load(&params.key)?;
        let open = Repository::open(staging, Some(key.clone()));
        if open.is_err() {
            std::fs::create_dir_all(staging)
                .map_err(|e| DrSetupError::StagingDir(staging.to_path_buf(), e))?;
            Repository::init(staging, Some(key.clone()))
                .map_err(|e| DrSetupError::Staging(staging.to_path_buf(), e))?;
        }
        Ok(Self {
            target: params.target.clone(),
            interval: Duration::from_millis(params.interval_ms),
            key,
            key_path: params.key.clone(),
            staging: staging.to_path_buf(),
            next_due: Instant::now(),
            sending: None,
            status: DrStatus {
                state: DrState::Running,
                target: Some(params.target.clone()),
                interval_ms: Some(params.interval_ms),
                last_checkpoint: None,
                rpo_ms: None,
                checkpoints_committed: 0,
                checkpoints_failed: 0,
                intervals_skipped: 0,
                last_error: None,
            },
            last_taken_ms: None,
        })
    }

    /// The status, with the recovery point lag as of now.
    pub fn status(&self) -> DrStatus {
        let mut s = self.status.clone();
        s.rpo_ms = self
            .status
            .last_checkpoint
            .as_ref()
            .map(|c| now_ms().saturating_sub(c.taken_at_unix_ms));
        s
    }

    fn start_send(&mut self, out: Outgoing) {
        let staging = self.staging.clone();
        let target = self.target.clone();
        let key_path = self.key_path.clone();
        let link = LinkKey::from_repo_key(&self.key);
        let point = out.point_id.clone();
        let pause = out.pause_us;
        let handle = std::thread::Builder::new()
            .name("dr-send".into())
            .spawn(move || {
                let key = RepoKey::load(&key_path).map_err(|e| crate::error_chain(&e))?;
                let repo =
                    Repository::open(&staging, Some(key)).map_err(|e| crate::error_chain(&e))?;
                send_checkpoint(
                    &repo,
                    &point,
                    &target,
                    &link,
                    SEND_TIMEOUT,
                    &CheckpointInfo {
                        pause_us: Some(pause),
                    },
                )
                .map_err(|e| crate::error_chain(&e))
            });
        match handle {
            Ok(h) => self.sending = Some((out, h)),
            Err(e) => {
                self.status.checkpoints_failed += 1;
                self.status.last_error = Some(format!("cannot start the sender thread: {e}"));
            }
        }
    }
}

impl Vmm {
    /// Starts continuous protection (API `PUT /dr` or `run --dr-target`).
    pub(crate) fn start_dr(&mut self, params: &DrParams, staging: Option<&Path>) -> ApiResponse {
        if self
            .dr
            .as_ref()
            .is_some_and(|d| d.status.state != DrState::Stopped)
        {
            return ApiResponse::conflict(
                "continuous protection is already running; stop it first",
            );
        }
        let staging = staging
            .map(Path::to_path_buf)
            .unwrap_or_else(|| default_staging(&self.config.name));
        match DrLoop::new(params, &staging) {
            Ok(d) => {
                tracing::info!(
                    "continuous protection to {} every {} ms (staging {})",
                    params.target,
                    params.interval_ms,
                    staging.display()
                );
                let status = d.status();
                self.dr = Some(d);
                ApiResponse::dr_started(&status)
            }
            Err(e) => ApiResponse::bad_request(crate::error_chain(&e)),
        }
    }

    /// Stops continuous protection; a send in progress finishes in the background.
    pub(crate) fn stop_dr(&mut self) -> ApiResponse {
        match &mut self.dr {
            Some(d) if d.status.state != DrState::Stopped => {
                d.status.state = DrState::Stopped;
                ApiResponse::dr(&d.status())
            }
            _ => ApiResponse::conflict("continuous protection is not running"),
        }
    }

    /// The DR status, or a stopped one.
    pub(crate) fn dr_status(&self) -> ApiResponse {
        match &self.dr {
            Some(d) => ApiResponse::dr(&d.status()),
            None => ApiResponse::dr(&DrStatus {
                state: DrState::Stopped,
                target: None,
                interval_ms: None,
                last_checkpoint: None,
                rpo_ms: None,
                checkpoints_committed: 0,
                checkpoints_failed: 0,
                intervals_skipped: 0,
                last_error: None,
            }),
        }
    }

    /// Called from the event loop: finishes sends, and starts a checkpoint when one is due.
    pub(crate) fn poll_dr(&mut self) {
        let Some(d) = self.dr.as_mut() else {
            return;
        };
        // A finished send.
        if d.sending.as_ref().is_some_and(|(_, h)| h.is_finished()) {
            let (out, h) = d.sending.take().expect("checked above");
            match h
                .join()
                .unwrap_or_else(|_| Err("the sender thread panicked".into()))
            {
                Ok(report) => {
                    d.status.checkpoints_committed += 1;
                    d.status.last_error = None;
                    if d.status.state == DrState::Retrying {
                        d.status.state = DrState::Running;
                    }
                    d.status.last_checkpoint = Some(DrCheckpoint {
                        id: out.point_id.clone(),
                        taken_at_unix_ms: out.taken_at_ms,
                        committed_at_unix_ms: now_ms(),
                        bytes_sent: report.bytes_sent,
                        pause_us: out.pause_us,
                    });
                    tracing::debug!(
                        "checkpoint {} sent: {} bytes",
                        out.point_id,
                        report.bytes_sent
                    );
                }
                Err(e) => {
                    d.status.checkpoints_failed += 1;
                    if d.status.state == DrState::Running {
                        d.status.state = DrState::Retrying;
                    }
                    tracing::warn!("checkpoint {} not delivered: {e}", out.point_id);
                    d.status.last_error = Some(e);
                }
            }
        }
        if d.status.state == DrState::Stopped {
            return;
        }
        let now = Instant::now();
        if now < d.next_due {
            return;
        }
        // Never queue: skip this interval while the previous checkpoint is still in flight.
        if d.sending.is_some() || self.snapshot.is_some() {
            d.status.intervals_skipped += 1;
            d.next_due = now + d.interval;
            return;
        }
        d.next_due = now + d.interval;
        // Keep the staging repository small (no backup is open in this process right now).
        if let Ok(repo) = Repository::open(&d.staging, Some(d.key.clone())) {
            if let Err(e) = repo.prune(&KeepPolicy {
                keep_last: STAGING_KEEP,
                keep_daily: 0,
            }) {
                tracing::debug!("cannot prune the DR staging repository: {e}");
            }
        }
        d.last_taken_ms = Some(now_ms());
        let params = SnapshotParams {
            target: SnapshotTarget::Repo(d.staging.clone()),
            mode: SnapshotMode::Live,
            strategy: SnapshotStrategy::Cow,
            key: Some(d.key_path.clone()),
        };
        let r = self.start_snapshot(params);
        if r.status() >= 300 {
            let msg = r
                .body()
                .and_then(|b| b.get("error"))
                .and_then(|e| e.as_str())
                .unwrap_or("unknown error")
                .to_string();
            if let Some(d) = self.dr.as_mut() {
                d.status.checkpoints_failed += 1;
                d.status.last_error = Some(format!("checkpoint not taken: {msg}"));
            }
            return;
        }
        self.dr_checkpoint_running = true;
    }

    /// Called when a DR checkpoint's snapshot ended.
    pub(crate) fn dr_checkpoint_done(
        &mut self,
        point_id: Option<String>,
        pause_us: u64,
        error: Option<String>,
    ) {
        self.dr_checkpoint_running = false;
        let Some(d) = self.dr.as_mut() else {
            return;
        };
        match (point_id, error) {
            (Some(point_id), None) => {
                let taken_at_ms = d.last_taken_ms.unwrap_or_else(now_ms);
                d.start_send(Outgoing {
                    point_id,
                    taken_at_ms,
                    pause_us,
                });
            }
            (_, e) => {
                d.status.checkpoints_failed += 1;
                d.status.last_error = Some(format!(
                    "checkpoint failed: {}",
                    e.unwrap_or_else(|| "no point was stored".into())
                ));
            }
        }
    }
}

/// Parses an interval such as `1s`, `500ms`, `2m`.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid interval '{text}': use e.g. 500ms, 1s or 2m"))?;
    let ms = match unit {
        "ms" => n,
        "" | "s" => n * 1000,
        "m" => n * 60_000,
        _ => {
            return Err(format!(
                "invalid interval '{text}': use e.g. 500ms, 1s or 2m"
            ))
        }
    };
    if ms < crate::api::MIN_DR_INTERVAL_MS {
        return Err(format!(
            "interval '{text}' is below the minimum of {} ms",
            crate::api::MIN_DR_INTERVAL_MS
        ));
    }
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_interval("1h").is_err());
        assert!(parse_interval("1ms").is_err());
        assert!(parse_interval("x").is_err());
    }
}

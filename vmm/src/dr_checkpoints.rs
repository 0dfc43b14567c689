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

use std::sync::Arc;

use devices::virtio::net::OutputCommit;
use serde::{Deserialize, Serialize};
use snapshot::dr::{send_checkpoint, CheckpointInfo, DrError, LinkKey, SendReport};
use snapshot::repo::{KeepPolicy, KeyError, RepoError, RepoKey, Repository};

use crate::capture::{
    CaptureEngine, CaptureVm, SnapshotEnded, SnapshotMode, SnapshotRequest, SnapshotStrategy,
    SnapshotTarget,
};

/// How long one send may block on the link before it counts as failed.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Points kept in the staging repository.
const STAGING_KEEP: usize = 2;
/// The shortest DR interval accepted.
pub const MIN_DR_INTERVAL_MS: u64 = 10;

/// Where to send checkpoints, how often, and the link key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrConfig {
    /// The receiver, as `HOST:PORT`.
    pub target: String,
    /// Milliseconds between checkpoints, at least [`MIN_DR_INTERVAL_MS`].
    pub interval_ms: u64,
    /// Pre-shared key file that authenticates and encrypts the link.
    pub key: PathBuf,
    /// Hold the guest's transmitted frames until a checkpoint after them is committed.
    pub output_commit: bool,
}

/// Whether DR checkpoints are being sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrState {
    Stopped,
    /// Checkpoints are being sent every interval.
    Running,
    /// The link to the receiver is down; it is retried with backoff.
    Retrying,
}

/// One checkpoint the receiver committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrCheckpoint {
    pub id: String,
    /// When the checkpoint's point in time was taken (Unix time, milliseconds).
    pub taken_at_unix_ms: u64,
    /// When the receiver confirmed the commit (Unix time, milliseconds).
    pub committed_at_unix_ms: u64,
    /// Bytes sent for this checkpoint (the chunks the receiver lacked and the manifest).
    pub bytes_sent: u64,
    /// How long the vCPUs were paused for it, in microseconds.
    pub pause_us: u64,
}

/// The status of continuous protection (the API serves it as the body of `GET /dr`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrStatus {
    pub state: DrState,
    /// The receiver, as `HOST:PORT`; `null` when stopped and never started.
    pub target: Option<String>,
    pub interval_ms: Option<u64>,
    /// The newest committed checkpoint.
    pub last_checkpoint: Option<DrCheckpoint>,
    /// Recovery point lag: now minus the newest committed checkpoint's point in time.
    pub rpo_ms: Option<u64>,
    pub checkpoints_committed: u64,
    pub checkpoints_failed: u64,
    /// Intervals skipped because the previous checkpoint was still being sent.
    pub intervals_skipped: u64,
    /// The most recent failure, if any.
    pub last_error: Option<String>,
    /// Whether transmitted frames are held until a checkpoint after them is committed.
    #[serde(default)]
    pub output_commit: bool,
}

impl DrStatus {
    /// The status of protection that is not running and never ran.
    fn stopped() -> Self {
        Self {
            state: DrState::Stopped,
            target: None,
            interval_ms: None,
            last_checkpoint: None,
            rpo_ms: None,
            checkpoints_committed: 0,
            checkpoints_failed: 0,
            intervals_skipped: 0,
            last_error: None,
            output_commit: false,
        }
    }
}

/// Why continuous protection could not start.
#[derive(Debug, thiserror::Error)]
pub enum DrSetupError {
    #[error("cannot load the DR key")]
    Key(#[from] KeyError),
    #[error("cannot prepare the staging repository {0}")]
    Staging(PathBuf, #[source] RepoError),
    #[error("cannot create the staging directory {0}")]
    StagingDir(PathBuf, #[source] std::io::Error),
}

/// Why a start or stop request was refused.
#[derive(Debug, thiserror::Error)]
pub enum DrControlError {
    #[error("continuous protection is already running; stop it first")]
    AlreadyRunning,
    #[error("continuous protection is not running")]
    NotRunning,
    #[error(transparent)]
    Setup(#[from] DrSetupError),
}

/// Why a checkpoint did not reach the receiver.
#[derive(Debug, thiserror::Error)]
pub enum DrSendError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Link(#[from] DrError),
    #[error("the sender thread panicked")]
    Panicked,
}

/// A checkpoint waiting to be sent or being sent.
struct Outgoing {
    point_id: String,
    taken_at_ms: u64,
    pause_us: u64,
    /// With output commit: the newest frame epoch this checkpoint covers.
    epoch: Option<u64>,
}

/// The state of continuous protection once started.
struct DrLoop {
    target: String,
    interval: Duration,
    key: RepoKey,
    key_path: PathBuf,
    staging: PathBuf,
    /// Whether the target is an `s3://` repository that checkpoints go straight into.
    direct: bool,
    next_due: Instant,
    sending: Option<(Outgoing, JoinHandle<Result<SendReport, DrSendError>>)>,
    status: DrStatus,
    last_taken_ms: Option<u64>,
    /// Whether the running snapshot is one of this loop's checkpoints.
    checkpoint_running: bool,
    /// The frame epoch the running checkpoint covers (output commit only).
    running_epoch: Option<u64>,
    /// The staging repository is this process's default one: removed when the loop ends.
    owns_staging: bool,
}

impl Drop for DrLoop {
    fn drop(&mut self) {
        if self.owns_staging {
            if let Err(e) = std::fs::remove_dir_all(&self.staging) {
                tracing::warn!(
                    "cannot remove the DR staging repository {}: {e}",
                    self.staging.display()
                );
            }
        }
    }
}

/// Removes the default staging repositories (`NAME-PID`) in `dir` whose process is gone.
fn remove_stale_staging(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(
                "removing the stale DR staging repository {}",
                entry.path().display()
            );
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
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
    fn new(config: &DrConfig, staging: &Path) -> Result<Self, DrSetupError> {
        let key = RepoKey::load(&config.key)?;
        // An s3:// target is itself the repository checkpoints go into: nothing is sent.
        let direct = snapshot::repo::is_remote(Path::new(&config.target));
        let staging = if direct {
            Path::new(&config.target)
        } else {
            staging
        };
        let open = Repository::open(staging, Some(key.clone()));
        if open.is_err() {
            if !snapshot::repo::is_remote(staging) {
                std::fs::create_dir_all(staging)
                    .map_err(|e| DrSetupError::StagingDir(staging.to_path_buf(), e))?;
            }
            Repository::init(staging, Some(key.clone()))
                .map_err(|e| DrSetupError::Staging(staging.to_path_buf(), e))?;
        }
        Ok(Self {
            target: config.target.clone(),
            interval: Duration::from_millis(config.interval_ms),
            key,
            key_path: config.key.clone(),
            staging: staging.to_path_buf(),
            direct,
            next_due: Instant::now(),
            sending: None,
            status: DrStatus {
                state: DrState::Running,
                target: Some(config.target.clone()),
                interval_ms: Some(config.interval_ms),
                output_commit: config.output_commit,
                ..DrStatus::stopped()
            },
            last_taken_ms: None,
            checkpoint_running: false,
            running_epoch: None,
            owns_staging: false,
        })
    }

    /// The status, with the recovery point lag as of now.
    fn status(&self) -> DrStatus {
        let mut s = self.status.clone();
        s.rpo_ms = self
            .status
            .last_checkpoint
            .as_ref()
            .map(|c| now_ms().saturating_sub(c.taken_at_unix_ms));
        s
    }

    fn start_send(&mut self, out: Outgoing, commit: &OutputCommit) {
        if self.direct {
            // The checkpoint's point manifest is in the bucket: it is committed.
            self.committed(out, 0, commit);
            return;
        }
        let staging = self.staging.clone();
        let target = self.target.clone();
        let key_path = self.key_path.clone();
        let link = LinkKey::from_repo_key(&self.key);
        let point = out.point_id.clone();
        let pause = out.pause_us;
        let handle = std::thread::Builder::new().name("dr-send".into()).spawn(
            move || -> Result<SendReport, DrSendError> {
                crate::seccomp::enter(crate::seccomp::ThreadKind::DrSend);
                let key = RepoKey::load(&key_path)?;
                let repo = Repository::open(&staging, Some(key))?;
                Ok(send_checkpoint(
                    &repo,
                    &point,
                    &target,
                    &link,
                    SEND_TIMEOUT,
                    &CheckpointInfo {
                        pause_us: Some(pause),
                    },
                )?)
            },
        );
        match handle {
            Ok(h) => self.sending = Some((out, h)),
            Err(e) => {
                self.status.checkpoints_failed += 1;
                self.status.last_error = Some(format!("cannot start the sender thread: {e}"));
            }
        }
    }

    /// Records checkpoint `out` as committed on the target after `bytes_sent` bytes; with
    /// output commit, that releases the frames it covers.
    fn committed(&mut self, out: Outgoing, bytes_sent: u64, commit: &OutputCommit) {
        if let Some(k) = out.epoch {
            commit.release_through(k);
        }
        self.status.checkpoints_committed += 1;
        self.status.last_error = None;
        if self.status.state == DrState::Retrying {
            self.status.state = DrState::Running;
        }
        self.status.last_checkpoint = Some(DrCheckpoint {
            id: out.point_id.clone(),
            taken_at_unix_ms: out.taken_at_ms,
            committed_at_unix_ms: now_ms(),
            bytes_sent,
            pause_us: out.pause_us,
        });
        tracing::debug!("checkpoint {} sent: {bytes_sent} bytes", out.point_id);
    }

    /// Finishes a send whose thread has ended.
    fn finish_send(&mut self, commit: &OutputCommit) {
        if !self.sending.as_ref().is_some_and(|(_, h)| h.is_finished()) {
            return;
        }
        let Some((out, h)) = self.sending.take() else {
            return;
        };
        match h.join().unwrap_or(Err(DrSendError::Panicked)) {
            Ok(report) => self.committed(out, report.bytes_sent, commit),
            Err(e) => {
                let e = snapshot::error_chain(&e);
                self.status.checkpoints_failed += 1;
                if self.status.state == DrState::Running {
                    self.status.state = DrState::Retrying;
                }
                tracing::warn!("checkpoint {} not delivered: {e}", out.point_id);
                self.status.last_error = Some(e);
            }
        }
    }
}

/// Continuous protection of one VM: off until started, then a checkpoint every interval.
#[derive(Default)]
pub struct DrControl {
    current: Option<DrLoop>,
    /// The network devices' output-commit switch and epoch counter.
    commit: Arc<OutputCommit>,
}

impl DrControl {
    /// Continuous protection that drives `commit` (the VM's network devices' gate).
    pub fn new(commit: Arc<OutputCommit>) -> Self {
        Self {
            current: None,
            commit,
        }
    }

    /// Whether protection was ever started (the event loop then wakes more often).
    pub fn is_started(&self) -> bool {
        self.current.is_some()
    }

    /// Starts continuous protection (API `PUT /dr` or `run --dr-target`) of the VM `vm_name`,
    /// staging checkpoints in `staging` (default: [`default_staging`]).
    pub fn start(
        &mut self,
        config: &DrConfig,
        staging: Option<&Path>,
        vm_name: &str,
    ) -> Result<DrStatus, DrControlError> {
        if self
            .current
            .as_ref()
            .is_some_and(|d| d.status.state != DrState::Stopped)
        {
            return Err(DrControlError::AlreadyRunning);
        }
        let owns_staging = staging.is_none();
        let staging = staging
            .map(Path::to_path_buf)
            .unwrap_or_else(|| default_staging(vm_name));
        if let (true, Some(dir)) = (owns_staging, staging.parent()) {
            remove_stale_staging(dir);
        }
        let mut d = DrLoop::new(config, &staging)?;
        d.owns_staging = owns_staging;
        tracing::info!(
            "continuous protection to {} every {} ms (staging {})",
            config.target,
            config.interval_ms,
            staging.display()
        );
        // A checkpoint of the stopped loop still running ends in this one.
        d.checkpoint_running = self.current.as_ref().is_some_and(|o| o.checkpoint_running);
        self.commit.set_enabled(config.output_commit);
        let status = d.status();
        if let Some(old) = self.current.as_mut().filter(|o| o.staging == d.staging) {
            // The new loop goes on with the same staging repository.
            old.owns_staging = false;
        }
        self.current = Some(d);
        Ok(status)
    }

    /// Stops continuous protection; a send in progress finishes in the background.
    pub fn stop(&mut self) -> Result<DrStatus, DrControlError> {
        match &mut self.current {
            Some(d) if d.status.state != DrState::Stopped => {
                d.status.state = DrState::Stopped;
                // Nothing will be committed any more: what was held goes out now.
                self.commit.set_enabled(false);
                Ok(d.status())
            }
            _ => Err(DrControlError::NotRunning),
        }
    }

    /// The status, or a stopped one.
    pub fn status(&self) -> DrStatus {
        match &self.current {
            Some(d) => d.status(),
            None => DrStatus::stopped(),
        }
    }

    /// Called from the event loop: finishes sends, and starts a checkpoint through `engine`
    /// when one is due.
    pub fn poll(&mut self, engine: &mut CaptureEngine, vm: &mut dyn CaptureVm) {
        let Some(d) = self.current.as_mut() else {
            return;
        };
        d.finish_send(&self.commit);
        if d.status.state == DrState::Stopped {
            return;
        }
        let now = Instant::now();
        if now < d.next_due {
            return;
        }
        // Never queue: skip this interval while the previous checkpoint is still in flight.
        if d.sending.is_some() || engine.is_busy() {
            d.status.intervals_skipped += 1;
            d.next_due = now + d.interval;
            return;
        }
        d.next_due = now + d.interval;
        // Keep the staging repository small (no backup is open in this process right now).
        if let Ok(repo) = Repository::open(&d.staging, Some(d.key.clone())) {
            if let Err(e) = repo.prune(&KeepPolicy::last(STAGING_KEEP)) {
                tracing::debug!("cannot prune the DR staging repository: {e}");
            }
        }
        d.last_taken_ms = Some(now_ms());
        // Frames sent so far were sent before this checkpoint's instant.
        d.running_epoch = d.status.output_commit.then(|| self.commit.advance());
        let request = SnapshotRequest {
            target: SnapshotTarget::Repo(d.staging.clone()),
            mode: SnapshotMode::Live,
            strategy: SnapshotStrategy::Cow,
            key: Some(d.key_path.clone()),
            compression: Default::default(),
        };
        match engine.start(vm, &request) {
            Ok(_) => d.checkpoint_running = true,
            Err(e) => {
                d.status.checkpoints_failed += 1;
                d.status.last_error = Some(format!(
                    "checkpoint not taken: {}",
                    snapshot::error_chain(&e)
                ));
            }
        }
    }

    /// Called with every snapshot that ended; acts on this loop's checkpoints only.
    pub fn snapshot_ended(&mut self, ended: &SnapshotEnded) {
        let Some(d) = self.current.as_mut() else {
            return;
        };
        if !std::mem::take(&mut d.checkpoint_running) {
            return;
        }
        match &ended.result {
            Ok(()) => {
                let taken_at_ms = d.last_taken_ms.unwrap_or_else(now_ms);
                let epoch = d.running_epoch.take();
                d.start_send(
                    Outgoing {
                        point_id: ended.id.clone(),
                        taken_at_ms,
                        pause_us: ended.pause_us,
                        epoch,
                    },
                    &self.commit,
                );
            }
            Err(e) => {
                d.status.checkpoints_failed += 1;
                d.status.last_error =
                    Some(format!("checkpoint failed: {}", snapshot::error_chain(e)));
            }
        }
    }
}

/// Parses an interval in humantime's syntax (`500ms`, `1s`, `2m`, `1h`, `1m 30s`); a bare
/// number is seconds.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let parsed = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<u64>().ok().map(Duration::from_secs)
    } else {
        humantime::parse_duration(t).ok()
    };
    let interval =
        parsed.ok_or_else(|| format!("invalid interval '{text}': use e.g. 500ms, 1s, 2m or 1h"))?;
    if interval < Duration::from_millis(MIN_DR_INTERVAL_MS) {
        return Err(format!(
            "interval '{text}' is below the minimum of {} ms",
            MIN_DR_INTERVAL_MS
        ));
    }
    Ok(interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_interval("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_interval("5"), Ok(Duration::from_secs(5)));
        assert!(parse_interval("1ms").is_err());
        assert!(parse_interval("x").is_err());
    }
}

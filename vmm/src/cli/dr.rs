//! `arkvm dr serve|status|recover`: the disaster recovery receiver, its status, and recovery of
//! the newest complete checkpoint into a new VM (through `arkvm restore`).

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Duration;

use snapshot::dr::{
    query_status, send_checkpoint, CheckpointInfo, DrError, LinkKey, Receiver, ReceiverConfig,
};
use snapshot::repo::{chunk_object_name, KeyError, PointManifest, RepoError, RepoKey, Repository};

use super::common::fail;
use super::dr_report::{rpo_ms, serve_json, status_text};

/// Why a `dr` command failed.
#[derive(Debug, thiserror::Error)]
pub enum DrCommandError {
    /// The key file could not be read.
    #[error("cannot use the key file")]
    Key(#[from] KeyError),
    /// The repository failed.
    #[error("repository operation failed")]
    Repo(#[from] RepoError),
    /// The DR link or protocol failed.
    #[error("DR operation failed")]
    Dr(#[from] DrError),
    /// A local file operation or the listening socket failed.
    #[error("cannot {action} {target}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file, directory or address.
        target: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No point can be recovered (or sent).
    #[error("no complete checkpoint in {repo}{}", vm.as_ref().map(|v| format!(" for VM '{v}'")).unwrap_or_default())]
    NothingToRecover {
        /// The repository.
        repo: String,
        /// The VM asked for.
        vm: Option<String>,
    },
}

/// The `arkvm dr` subcommands.
#[derive(clap::Subcommand)]
pub enum DrCommand {
    /// Receive checkpoints into a repository (on the disaster recovery host) and serve status.
    Serve(DrServeArgs),
    /// Show a receiver's status: its last checkpoint, the recovery point lag, bytes and pause
    /// per checkpoint.
    Status(DrStatusArgs),
    /// Resume the newest complete checkpoint (or --id) with its disks in a new VM.
    Recover(DrRecoverArgs),
    /// Send one backup point of a local repository to a receiver (what the checkpoint timer
    /// does after each checkpoint); only the chunks the receiver lacks travel.
    Send(DrSendArgs),
}

/// `arkvm dr serve`.
#[derive(clap::Args)]
pub struct DrServeArgs {
    /// The address to listen on (host:port, e.g. 0.0.0.0:7070).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// The repository checkpoints go into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    /// The pre-shared key file (64 hex digits; `arkvm backup` key files work). The sender
    /// must be given the same key.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Keep the newest N checkpoints of each VM (0 keeps all).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub keep: usize,
    /// Create the repository unencrypted. By default a new repository is encrypted at rest
    /// with the key, as the primary's checkpoint staging repository is; chunks travel as they
    /// are stored, so both repositories must agree. Use this to receive points of an
    /// unencrypted repository (`arkvm dr send --repo` of a plain backup repository).
    #[arg(long = "no-encrypt-at-rest", action = clap::ArgAction::SetFalse)]
    pub encrypt_at_rest: bool,
    /// Connections served at once.
    #[arg(long, default_value_t = 8)]
    pub max_connections: usize,
    /// Connections one peer address may hold at once (default: half of --max-connections), so
    /// that one address cannot take every slot.
    #[arg(long, value_name = "N")]
    pub max_connections_per_peer: Option<usize>,
    /// Print one JSON line once listening (`{"listening": ADDR, "repo": DIR, ...}`) instead
    /// of the text line, then keep serving.
    #[arg(long)]
    pub json: bool,
}

/// `arkvm dr status`.
#[derive(clap::Args)]
pub struct DrStatusArgs {
    /// The receiver (host:port).
    #[arg(long, value_name = "ADDR")]
    pub target: String,
    /// The pre-shared key file.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for the receiver.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub timeout: u64,
}

/// `arkvm dr recover`.
#[derive(clap::Args)]
pub struct DrRecoverArgs {
    /// The receiver's repository.
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    /// The key file, needed if the repository is encrypted at rest.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Recover this checkpoint instead of the newest complete one.
    #[arg(long)]
    pub id: Option<String>,
    /// Only consider checkpoints of this VM.
    #[arg(long)]
    pub vm: Option<String>,
    /// With --export-only: where the checkpoint is exported as a snapshot directory (default:
    /// DIR.recover beside the repository).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Where the restored disks go (passed to `arkvm restore`).
    #[arg(long, value_name = "DIR")]
    pub disk_dir: Option<PathBuf>,
    /// Serve the restored VM's control API on this Unix socket.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Export the checkpoint and print its directory, without starting the VM (without this,
    /// the VM starts at once from the checkpoint in the repository, its disks hydrated into
    /// --disk-dir in the background).
    #[arg(long)]
    pub export_only: bool,
    /// Attach the saved network device NAME to this host's tap: id=NAME,tap=IFNAME (passed to
    /// `arkvm restore`). Repeatable.
    #[arg(long = "net", value_name = "NET")]
    pub nets: Vec<String>,
    /// With --export-only: print the exported directory, the checkpoint's id, VM and time as
    /// JSON.
    #[arg(long, requires = "export_only")]
    pub json: bool,
}

/// `arkvm dr send`.
#[derive(clap::Args)]
pub struct DrSendArgs {
    /// The local repository holding the point.
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    /// The point to send (default: the newest).
    #[arg(long)]
    pub id: Option<String>,
    /// The receiver (host:port).
    #[arg(long, value_name = "ADDR")]
    pub target: String,
    /// The pre-shared key file (also the repository's key if it is encrypted).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Seconds to wait for the connection and for each read and write.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs an `arkvm dr` subcommand.
pub fn run(command: DrCommand) -> ExitCode {
    let result = match command {
        DrCommand::Serve(args) => serve(args),
        DrCommand::Status(args) => status(args),
        DrCommand::Recover(args) => recover(args),
        DrCommand::Send(args) => send(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// `arkvm dr serve`: runs until killed. The key and the listening address are checked before
/// the repository is opened or created, so a failed start leaves nothing behind.
pub fn serve(args: DrServeArgs) -> Result<(), DrCommandError> {
    // A SIGTERM from now on waits for `run_until_terminated` below, which ends cleanly.
    crate::signals::block_termination();
    let key = RepoKey::load(&args.key)?;
    let config = ReceiverConfig {
        keep_last: args.keep,
        max_connections: args.max_connections.max(1),
        max_connections_per_peer: args.max_connections_per_peer.unwrap_or(0),
        ..ReceiverConfig::default()
    };
    let listener = TcpListener::bind(&args.listen).map_err(|source| DrCommandError::Io {
        action: "listen on",
        target: args.listen.clone(),
        source,
    })?;
    let receiver = Receiver::open_or_create(&args.repo, &key, args.encrypt_at_rest, config)?;
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| args.listen.clone());
    let points = receiver.repository().point_ids()?.len();
    let encrypted = receiver.repository().is_encrypted();
    if args.json {
        crate::outln!(
            "{}",
            serve_json(&local, &args.repo, points, encrypted, args.keep)
        );
    } else {
        crate::outln!(
            "dr: listening on {local}, repository {} ({} checkpoints, {}, keeping {})",
            args.repo.display(),
            points,
            if encrypted {
                "encrypted at rest"
            } else {
                "not encrypted at rest"
            },
            if args.keep == 0 {
                "all".to_string()
            } else {
                format!("the last {} per VM", args.keep)
            }
        );
    }
    let _ = std::io::stdout().flush();
    let receiver = Arc::new(receiver);
    // SIGTERM and SIGINT stop the receiver cleanly (exit 0); a checkpoint being received is
    // not committed, which the sender sees as a failed send.
    let served = crate::signals::run_until_terminated(move || receiver.serve(listener)).map_err(
        |source| DrCommandError::Io {
            action: "start the receiver on",
            target: args.listen.clone(),
            source,
        },
    )?;
    match served {
        Some(result) => result?,
        None => tracing::info!("dr: stopping on a termination signal"),
    }
    Ok(())
}

/// `arkvm dr status`.
pub fn status(args: DrStatusArgs) -> Result<(), DrCommandError> {
    let key = LinkKey::from_repo_key(&RepoKey::load(&args.key)?);
    let status = query_status(&args.target, &key, Duration::from_secs(args.timeout.max(1)))?;
    if args.json {
        let mut value = serde_json::to_value(&status).expect("the status serializes");
        value["rpo_ms"] = serde_json::json!(rpo_ms(&status));
        crate::outln!("{value}");
    } else {
        print!("{}", status_text(&args.target, &status));
    }
    Ok(())
}

/// `arkvm dr send`.
pub fn send(args: DrSendArgs) -> Result<(), DrCommandError> {
    let key = RepoKey::load(&args.key)?;
    let repo = match Repository::open(&args.repo, Some(key.clone())) {
        Err(RepoError::KeyNotUsed) => Repository::open(&args.repo, None)?,
        other => other?,
    };
    let id = match &args.id {
        Some(id) => repo.resolve_point(id, None)?,
        None => repo
            .point_ids()?
            .pop()
            .ok_or_else(|| DrCommandError::NothingToRecover {
                repo: args.repo.display().to_string(),
                vm: None,
            })?,
    };
    let report = send_checkpoint(
        &repo,
        &id,
        &args.target,
        &LinkKey::from_repo_key(&key),
        Duration::from_secs(args.timeout.max(1)),
        &CheckpointInfo::default(),
    )?;
    if args.json {
        crate::outln!(
            "{}",
            serde_json::to_value(&report).expect("the report serializes")
        );
    } else {
        crate::outln!(
            "sent {}: {} of {} chunks ({} skipped), {} bytes in {} ms; the receiver keeps {}",
            report.point_id,
            report.chunks_sent,
            report.chunks_total,
            report.chunks_skipped,
            report.bytes_sent,
            report.duration_ms,
            report.commit.points_kept
        );
    }
    Ok(())
}

/// `arkvm dr recover`: becomes `arkvm restore --repo` of the chosen checkpoint, read in place
/// (memory and disks straight from the repository, the disks hydrated in the background); with
/// `--export-only`, exports it as a snapshot directory instead.
pub fn recover(args: DrRecoverArgs) -> Result<(), DrCommandError> {
    let key = args.key.as_deref().map(RepoKey::load).transpose()?;
    let (repo, keyed) = match Repository::open(&args.repo, key) {
        Err(RepoError::KeyNotUsed) => (Repository::open(&args.repo, None)?, false),
        other => (other?, args.key.is_some()),
    };
    if !args.export_only {
        let point = newest_complete(&repo, &args)?;
        crate::outln!(
            "dr: recovering checkpoint {} of VM '{}' (taken {} UTC), in place",
            point.id,
            point.vm,
            super::format::date_utc(point.created_unix_ms)
        );
        let _ = std::io::stdout().flush();
        drop(repo);
        return exec_restore(&args, &point.id, keyed);
    }
    let work_dir = args.work_dir.clone().unwrap_or_else(|| {
        if snapshot::repo::is_remote(&args.repo) {
            // A bucket has no sibling folder: export into the local temporary folder.
            std::env::temp_dir().join("arkvm-dr-recover")
        } else {
            sibling(&args.repo, "recover")
        }
    });
    // Private: the exported checkpoints hold guest memory and disks, decrypted.
    snapshot::fs_util::create_private_dir_all(&work_dir).map_err(|source| DrCommandError::Io {
        action: "create",
        target: work_dir.display().to_string(),
        source,
    })?;
    let (point, dir) = export_newest(&repo, &args, &work_dir)?;
    if args.json {
        crate::outln!(
            "{}",
            serde_json::json!({"dir": dir.display().to_string(), "id": point.id,
                "vm": point.vm, "created": super::format::date_rfc3339(point.created_unix_ms),
                "created_unix_ms": point.created_unix_ms})
        );
    } else {
        crate::outln!(
            "dr: recovering checkpoint {} of VM '{}' (created {} UTC), exported to {}",
            point.id,
            point.vm,
            super::format::date_utc(point.created_unix_ms),
            dir.display()
        );
    }
    let _ = std::io::stdout().flush();
    Ok(())
}

/// Becomes `arkvm restore --repo REPO --id ID` (only returns on failure).
fn exec_restore(args: &DrRecoverArgs, id: &str, keyed: bool) -> Result<(), DrCommandError> {
    let exe = std::env::current_exe().map_err(|source| DrCommandError::Io {
        action: "find",
        target: "the arkvm executable".into(),
        source,
    })?;
    let mut restore = Command::new(exe);
    restore
        .arg("restore")
        .arg("--repo")
        .arg(&args.repo)
        .arg("--id")
        .arg(id);
    if let (true, Some(key)) = (keyed, &args.key) {
        restore.arg("--key").arg(key);
    }
    if let Some(disk_dir) = &args.disk_dir {
        restore.arg("--disk-dir").arg(disk_dir);
    }
    if let Some(socket) = &args.api_socket {
        restore.arg("--api-socket").arg(socket);
    }
    for net in &args.nets {
        restore.arg("--net").arg(net);
    }
    // Only returns on failure.
    let source = restore.exec();
    Err(DrCommandError::Io {
        action: "start",
        target: "arkvm restore".into(),
        source,
    })
}

/// The point `--id`, or the newest point (of `--vm`) whose chunks are all present.
fn newest_complete(
    repo: &Repository,
    args: &DrRecoverArgs,
) -> Result<PointManifest, DrCommandError> {
    if let Some(id) = &args.id {
        return Ok(repo.read_point(id)?);
    }
    candidates(repo, args)?
        .into_iter()
        .find(|point| all_chunks_present(repo, point))
        .ok_or_else(|| DrCommandError::NothingToRecover {
            repo: args.repo.display().to_string(),
            vm: args.vm.clone(),
        })
}

/// The readable points (of `--vm`), newest first.
fn candidates(
    repo: &Repository,
    args: &DrRecoverArgs,
) -> Result<Vec<PointManifest>, DrCommandError> {
    let mut candidates: Vec<PointManifest> = repo
        .points()?
        .into_iter()
        .filter_map(|(id, point)| match point {
            Ok(point) => Some(point),
            Err(e) => {
                tracing::warn!(%id, error = %crate::error_chain(&e), "skipping unreadable checkpoint");
                None
            }
        })
        .filter(|p| args.vm.as_ref().is_none_or(|vm| &p.vm == vm))
        .collect();
    candidates.sort_by(|a, b| (b.created_unix_ms, &b.id).cmp(&(a.created_unix_ms, &a.id)));
    Ok(candidates)
}

/// Whether every chunk `point` names is in the store (a checkpoint cut off mid-transfer is not).
fn all_chunks_present(repo: &Repository, point: &PointManifest) -> bool {
    let missing = point.chunk_ids().find(|id| {
        !repo
            .store()
            .contains(&chunk_object_name(id))
            .unwrap_or(false)
    });
    if let Some(id) = &missing {
        tracing::warn!(point = %point.id, chunk = %id, "checkpoint incomplete; trying an older one");
    }
    missing.is_none()
}

/// Exports the point `--id`, or the newest point (of `--vm`) whose chunks are all present and
/// verify, falling back to older ones; returns it and its snapshot directory.
fn export_newest(
    repo: &Repository,
    args: &DrRecoverArgs,
    work_dir: &Path,
) -> Result<(PointManifest, PathBuf), DrCommandError> {
    if let Some(id) = &args.id {
        let id = &repo.resolve_point(id, args.vm.as_deref())?;
        let point = repo.read_point(id)?;
        let dir = fresh_dir(work_dir, id);
        repo.export_point(id, &dir)?;
        return Ok((point, dir));
    }
    for point in candidates(repo, args)? {
        if !all_chunks_present(repo, &point) {
            continue;
        }
        let dir = fresh_dir(work_dir, &point.id);
        match repo.export_point(&point.id, &dir) {
            Ok(_) => return Ok((point, dir)),
            Err(e) => {
                eprintln!(
                    "arkvm: warning: checkpoint {} cannot be exported ({}); trying an older one",
                    point.id,
                    crate::error_chain(&e)
                );
                let _ = snapshot::cleanup_stale(work_dir);
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    Err(DrCommandError::NothingToRecover {
        repo: args.repo.display().to_string(),
        vm: args.vm.clone(),
    })
}

/// `DIR.<suffix>` beside `dir`.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "repo".into());
    dir.with_file_name(format!("{name}.{suffix}"))
}

/// `work_dir/<id>`, or `work_dir/<id>-<n>` if that is taken.
fn fresh_dir(work_dir: &Path, id: &str) -> PathBuf {
    let mut dir = work_dir.join(id);
    let mut n = 1;
    while dir.exists() {
        dir = work_dir.join(format!("{id}-{n}"));
        n += 1;
    }
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_paths() {
        assert_eq!(
            sibling(Path::new("/srv/dr"), "recover"),
            PathBuf::from("/srv/dr.recover")
        );
        let tmp = std::env::temp_dir().join(format!("arkvm-dr-fresh-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("p1")).unwrap();
        assert_eq!(fresh_dir(&tmp, "p1"), tmp.join("p1-1"));
        assert_eq!(fresh_dir(&tmp, "p2"), tmp.join("p2"));
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}

//! `arkvm backup export`: a backup point out of its repository, without booting it: as a
//! snapshot directory that `arkvm restore --from` accepts, or one disk as a raw image.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use snapshot::fs_util::{create_private_file, rename_noreplace};
use snapshot::repo::{PointManifest, Repository};

use super::RepoArgs;
use crate::cli::common::{fail, open_repo};
use crate::cli::format::{bytes, date_rfc3339};
use crate::saved_state::disk_part_name;

#[derive(clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The point: its id, a unique prefix of it, or `latest`.
    #[arg(long, value_name = "ID")]
    pub id: String,
    /// With `--id latest`: the newest point of this VM.
    #[arg(long, value_name = "VM")]
    pub name: Option<String>,
    /// Write the point as a snapshot directory here (it must not exist).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "disk",
        conflicts_with = "disk"
    )]
    pub out: Option<PathBuf>,
    /// Write only this disk (its device id, e.g. `disk0`) as a raw image, to --to.
    #[arg(long, value_name = "NAME", requires = "to")]
    pub disk: Option<String>,
    /// The raw image file to write (it must not exist).
    #[arg(long, value_name = "FILE", requires = "disk")]
    pub to: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("backup point '{id}' has no disk '{name}' (it has: {have})")]
    NoDisk {
        id: String,
        name: String,
        have: String,
    },
    #[error(transparent)]
    Repo(#[from] snapshot::repo::RepoError),
}

/// `arkvm backup export`.
pub fn export(args: ExportArgs) -> ExitCode {
    let repo = match open_repo(&args.repo.repo, args.repo.key.as_deref()) {
        Ok(r) => r,
        Err(c) => return c,
    };
    let result = repo
        .resolve_point(&args.id, args.name.as_deref())
        .and_then(|id| repo.read_point(&id))
        .map_err(ExportError::from)
        .and_then(|point| match (&args.out, &args.disk, &args.to) {
            (Some(out), _, _) => repo
                .export_point(&point.id, out)
                .map(|m| (point, out.clone(), m.parts.iter().map(|p| p.size).sum()))
                .map_err(ExportError::from),
            (None, Some(disk), Some(to)) => {
                export_disk(&repo, &point, disk, to).map(|n| (point, to.clone(), n))
            }
            _ => unreachable!("clap requires --out or --disk with --to"),
        });
    let (point, path, size) = match result {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    if args.repo.json {
        crate::outln!(
            "{}",
            serde_json::json!({"id": point.id, "vm": point.vm,
                "created": date_rfc3339(point.created_unix_ms),
                "path": path.display().to_string(), "bytes": size,
                "disk": args.disk})
        );
    } else {
        crate::outln!(
            "exported point {} ({}) to {}",
            point.id,
            bytes(size),
            path.display()
        );
    }
    ExitCode::SUCCESS
}

/// Writes disk `name` of `point` to the new file `to`: whole or absent (a private temporary
/// file beside it, synced, then renamed without replacing anything).
fn export_disk(
    repo: &Repository,
    point: &PointManifest,
    name: &str,
    to: &Path,
) -> Result<u64, ExportError> {
    let part = if name.starts_with("disk-") {
        name.to_string()
    } else {
        disk_part_name(name)
    };
    if point.object(&part).is_none() {
        let have: Vec<&str> = point
            .objects
            .iter()
            .filter_map(|o| o.name.strip_prefix("disk-"))
            .collect();
        return Err(ExportError::NoDisk {
            id: point.id.clone(),
            name: name.to_string(),
            have: if have.is_empty() {
                "none".into()
            } else {
                have.join(", ")
            },
        });
    }
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Io {
            action,
            path,
            source,
        }
    };
    let mut tmp_name = to.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".arkvm-export-{}", std::process::id()));
    let tmp = to.with_file_name(tmp_name);
    let mut file = create_private_file(&tmp).map_err(io("create", &tmp))?;
    let written = repo
        .read_object(point, &part, &mut file)
        .map_err(ExportError::from)
        .and_then(|n| {
            file.flush().map_err(io("write", &tmp))?;
            file.sync_all().map_err(io("sync", &tmp))?;
            rename_noreplace(&tmp, to).map_err(io("create", to))?;
            Ok(n)
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

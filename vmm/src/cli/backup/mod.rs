//! `arkvm backup ...`: managing a backup repository. Listing and checking live here; retention
//! in [`prune`], getting a point out in [`export`].

pub mod export;
pub mod prune;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use snapshot::repo::{RepoKey, Repository};

use super::common::{fail, open_repo};
use super::exit;
use super::format::{bytes, date_rfc3339, date_utc};

#[derive(clap::Subcommand)]
pub enum BackupCommand {
    /// Create an empty repository (with --key, an encrypted one; the key file is created if
    /// missing).
    Init(RepoArgs),
    /// List backup points: id, time, VM, size and new bytes stored.
    List(RepoArgs),
    /// Re-hash every chunk; name damaged chunks and the points that use them.
    Verify(RepoArgs),
    /// Remove points by retention policy (restic's --keep-* rules), then collect unused chunks.
    Prune(prune::PruneArgs),
    /// Remove the named points (their chunks stay until `backup gc` or `backup prune`).
    Forget(prune::ForgetArgs),
    /// Remove chunks no point uses, and leftovers of interrupted writes.
    Gc(RepoArgs),
    /// Write a point out as a snapshot directory, or one of its disks as a raw image.
    Export(export::ExportArgs),
    /// Boot points in isolation and check that their guests run (docs/recovery.md).
    Drill(super::drill::DrillArgs),
}

#[derive(clap::Args)]
pub struct RepoArgs {
    /// The repository directory.
    #[arg(long, env = "ARKVM_REPO")]
    pub repo: PathBuf,
    /// The repository's key file (encrypted repositories).
    #[arg(long, env = "ARKVM_KEY_FILE")]
    pub key: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn init(args: RepoArgs) -> ExitCode {
    // Before a key file is created for it.
    if let Err(e) = Repository::check_init_target(&args.repo) {
        return fail(&e);
    }
    let mut key_created = false;
    let key = match &args.key {
        Some(path) if !path.exists() => match RepoKey::create_file(path) {
            Ok(k) => {
                key_created = true;
                if !args.json {
                    crate::outln!(
                        "created key file {} (keep it safe: without it the backups cannot be read)",
                        path.display()
                    );
                }
                Some(k)
            }
            Err(e) => return fail(&e),
        },
        Some(path) => match RepoKey::load(path) {
            Ok(k) => Some(k),
            Err(e) => return fail(&e),
        },
        None => None,
    };
    let encrypted = key.is_some();
    match Repository::init(&args.repo, key) {
        Ok(_) if args.json => {
            let key_file = args.key.as_ref().map(|k| k.display().to_string());
            crate::outln!(
                "{}",
                serde_json::json!({"repo": args.repo.display().to_string(),
                    "encrypted": encrypted, "key_file": key_file, "key_file_created": key_created})
            );
            ExitCode::SUCCESS
        }
        Ok(_) => {
            crate::outln!(
                "initialized {}repository {}",
                if encrypted { "encrypted " } else { "" },
                args.repo.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn list(args: RepoArgs) -> ExitCode {
    let repo = match open_repo(&args.repo, args.key.as_deref()) {
        Ok(r) => r,
        Err(c) => return c,
    };
    let points = match repo.points() {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    if args.json {
        let rows: Vec<serde_json::Value> = points
            .iter()
            .map(|(id, p)| match p {
                Ok(p) => serde_json::json!({
                    "id": id, "vm": p.vm, "created_unix_ms": p.created_unix_ms,
                    "created": date_rfc3339(p.created_unix_ms),
                    "parent": p.parent, "bytes_total": p.stats.bytes_total,
                    "bytes_stored": p.stats.bytes_stored, "bytes_hashed": p.stats.bytes_hashed,
                    "chunks_total": p.stats.chunks_total, "chunks_new": p.stats.chunks_new,
                    "chunks_reused": p.stats.chunks_reused, "chunks_hashed": p.stats.chunks_hashed,
                    "last_drill": super::drill::last_drill(&repo, id),
                }),
                Err(e) => serde_json::json!({ "id": id, "error": vmm_error(e) }),
            })
            .collect();
        crate::outln!("{}", serde_json::Value::Array(rows));
        return list_status(&points);
    }
    crate::outln!(
        "{:<44} {:<19} {:<10} {:>12} {:>12}  LAST DRILL",
        "ID",
        "TIME (UTC)",
        "VM",
        "SIZE",
        "NEW STORED"
    );
    for (id, p) in &points {
        let drill = super::drill::last_drill(&repo, id).map_or("-".to_string(), |d| {
            let verdict = if d.passed { "pass" } else { "FAIL" };
            format!("{verdict} {}", date_utc(d.started_unix_ms))
        });
        match p {
            Ok(p) => crate::outln!(
                "{:<44} {:<19} {:<10} {:>12} {:>12}  {}",
                id,
                date_utc(p.created_unix_ms),
                p.vm,
                bytes(p.stats.bytes_total),
                bytes(p.stats.bytes_stored),
                drill
            ),
            Err(e) => crate::outln!("{id:<44} unreadable: {}", vmm_error(e)),
        }
    }
    list_status(&points)
}

/// The exit status of `backup list`: 3 (as `verify` on damage) when a point was listed as
/// unreadable, so that scripts do not take a damaged repository for a healthy one.
fn list_status<P, E>(points: &[(String, Result<P, E>)]) -> ExitCode {
    let unreadable = points.iter().filter(|(_, p)| p.is_err()).count();
    if unreadable == 0 {
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "arkvm: error: {unreadable} of {} unreadable (run `arkvm backup verify`)",
        super::format::count(points.len(), "point")
    );
    exit::code(exit::DAMAGE)
}

fn vmm_error(e: &dyn std::error::Error) -> String {
    crate::error_chain(e)
}

fn verify(args: RepoArgs) -> ExitCode {
    let repo = match open_repo(&args.repo, args.key.as_deref()) {
        Ok(r) => r,
        Err(c) => return c,
    };
    let bar = (std::io::stderr().is_terminal() && !args.json).then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("verify [{bar:40}] {pos}/{len} chunks")
                .expect("valid progress template"),
        );
        b
    });
    let report = repo.verify(|p| {
        if let Some(b) = &bar {
            b.set_length(p.chunks_total);
            b.set_position(p.chunks_done);
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let report = match report {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    if args.json {
        let v = serde_json::json!({
            "clean": report.is_clean(),
            "points_checked": report.points_checked,
            "chunks_checked": report.chunks_checked,
            "damaged_points": report.damaged_points.iter().map(|(id, why)| serde_json::json!({"id": id, "problem": why})).collect::<Vec<_>>(),
            "damaged_chunks": report.damaged_chunks.iter().map(|c| serde_json::json!({"id": c.id.to_hex(), "problem": c.problem, "points": c.points})).collect::<Vec<_>>(),
        });
        crate::outln!("{v}");
    } else {
        crate::outln!(
            "checked {} points and {} chunks",
            report.points_checked,
            report.chunks_checked
        );
        for (id, why) in &report.damaged_points {
            crate::outln!("damaged point {id}: {why}");
        }
        for c in &report.damaged_chunks {
            let users = if c.points.is_empty() {
                "used by no point".to_string()
            } else {
                format!("used by {}", c.points.join(", "))
            };
            crate::outln!("damaged chunk {}: {} ({users})", c.id.to_hex(), c.problem);
        }
        if report.is_clean() {
            crate::outln!("repository is clean");
        }
    }
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        exit::code(exit::DAMAGE)
    }
}

/// Runs a `backup` subcommand.
pub fn run(cmd: BackupCommand) -> ExitCode {
    match cmd {
        BackupCommand::Init(a) => init(a),
        BackupCommand::List(a) => list(a),
        BackupCommand::Verify(a) => verify(a),
        BackupCommand::Prune(a) => prune::prune(a),
        BackupCommand::Forget(a) => prune::forget(a),
        BackupCommand::Gc(a) => prune::gc(a),
        BackupCommand::Export(a) => export::export(a),
        BackupCommand::Drill(a) => super::drill::drill(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_fails_when_a_point_is_unreadable() {
        let ok: Vec<(String, Result<(), String>)> = vec![("p1".into(), Ok(()))];
        assert_eq!(list_status(&ok), ExitCode::SUCCESS);
        let empty: Vec<(String, Result<(), String>)> = Vec::new();
        assert_eq!(list_status(&empty), ExitCode::SUCCESS);
        let damaged: Vec<(String, Result<(), String>)> =
            vec![("p1".into(), Ok(())), ("p2".into(), Err("damaged".into()))];
        assert_eq!(list_status(&damaged), ExitCode::from(3));
    }
}

//! `arkvm backup init|list|verify|prune`: managing a backup repository.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use snapshot::repo::{KeepPolicy, RepoKey, Repository};

use super::common::{fail, open_repo};

#[derive(clap::Subcommand)]
pub enum BackupCommand {
    /// Create an empty repository (with --key, an encrypted one; the key file is created if
    /// missing).
    Init(RepoArgs),
    /// List backup points: id, time, VM, size and new bytes stored.
    List(RepoArgs),
    /// Re-hash every chunk; name damaged chunks and the points that use them.
    Verify(RepoArgs),
    /// Remove points by policy, then collect chunks no point uses.
    Prune(PruneArgs),
}

#[derive(clap::Args)]
pub struct RepoArgs {
    /// The repository directory.
    #[arg(long)]
    pub repo: PathBuf,
    /// The repository's key file (encrypted repositories).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Keep the newest N points of each VM.
    #[arg(long, default_value_t = 0)]
    pub keep_last: usize,
    /// Keep the newest point of each of the last N days.
    #[arg(long, default_value_t = 0)]
    pub keep_daily: usize,
}

fn time_text(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn mib(n: u64) -> String {
    if n >= 1 << 30 {
        format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64)
    } else if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}

fn init(args: RepoArgs) -> ExitCode {
    // Before a key file is created for it.
    if let Err(e) = Repository::check_init_target(&args.repo) {
        return fail(&e);
    }
    let key = match &args.key {
        Some(path) if !path.exists() => match RepoKey::create_file(path) {
            Ok(k) => {
                crate::outln!(
                    "created key file {} (keep it safe: without it the backups cannot be read)",
                    path.display()
                );
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
                    "parent": p.parent, "bytes_total": p.stats.bytes_total,
                    "bytes_stored": p.stats.bytes_stored, "bytes_hashed": p.stats.bytes_hashed,
                    "chunks_total": p.stats.chunks_total, "chunks_new": p.stats.chunks_new,
                    "chunks_reused": p.stats.chunks_reused, "chunks_hashed": p.stats.chunks_hashed,
                }),
                Err(e) => serde_json::json!({ "id": id, "error": vmm_error(e) }),
            })
            .collect();
        crate::outln!("{}", serde_json::Value::Array(rows));
        return list_status(&points);
    }
    crate::outln!(
        "{:<44} {:<19} {:<10} {:>12} {:>12}",
        "ID",
        "TIME (UTC)",
        "VM",
        "SIZE",
        "NEW STORED"
    );
    for (id, p) in &points {
        match p {
            Ok(p) => crate::outln!(
                "{:<44} {:<19} {:<10} {:>12} {:>12}",
                id,
                time_text(p.created_unix_ms),
                p.vm,
                mib(p.stats.bytes_total),
                mib(p.stats.bytes_stored)
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
        "arkvm: error: {unreadable} of {} points are unreadable (run `arkvm backup verify`)",
        points.len()
    );
    ExitCode::from(3)
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
        ExitCode::from(3)
    }
}

fn prune(args: PruneArgs) -> ExitCode {
    if args.keep_last == 0 && args.keep_daily == 0 {
        eprintln!("arkvm: error: prune needs --keep-last N and/or --keep-daily N (it would remove every point)");
        return ExitCode::from(1);
    }
    let repo = match open_repo(&args.repo.repo, args.repo.key.as_deref()) {
        Ok(r) => r,
        Err(c) => return c,
    };
    let policy = KeepPolicy {
        keep_last: args.keep_last,
        keep_daily: args.keep_daily,
    };
    match repo.prune(&policy) {
        Ok(r) => {
            if args.repo.json {
                crate::outln!(
                    "{}",
                    serde_json::json!({"removed": r.removed, "kept": r.kept,
                        "chunks_removed": r.gc.chunks_removed, "chunks_kept": r.gc.chunks_kept})
                );
            } else {
                crate::outln!(
                    "removed {} points, kept {}; collected {} unused chunks, {} remain",
                    r.removed.len(),
                    r.kept.len(),
                    r.gc.chunks_removed,
                    r.gc.chunks_kept
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// Runs a `backup` subcommand.
pub fn run(cmd: BackupCommand) -> ExitCode {
    match cmd {
        BackupCommand::Init(a) => init(a),
        BackupCommand::List(a) => list(a),
        BackupCommand::Verify(a) => verify(a),
        BackupCommand::Prune(a) => prune(a),
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

    #[test]
    fn civil_time() {
        assert_eq!(time_text(0), "1970-01-01 00:00:00");
        assert_eq!(time_text(1_795_000_000_000), "2026-11-18 11:06:40");
        assert_eq!(time_text(951_782_400_000), "2000-02-29 00:00:00");
    }
}

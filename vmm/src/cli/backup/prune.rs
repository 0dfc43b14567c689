//! `arkvm backup prune|forget|gc`: retention by restic's policies, removing named points, and
//! garbage collection on its own.

use std::process::ExitCode;
use std::time::Duration;

use jiff::tz::TimeZone;
use snapshot::repo::{GcReport, KeepPolicy, PruneReport, Repository};

use super::RepoArgs;
use crate::cli::common::{fail, open_repo};
use crate::cli::exit;
use crate::cli::format::{count, parse_duration};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("policy").required(true).multiple(true)))]
pub struct PruneArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Keep the newest N points of each VM.
    #[arg(long, value_name = "N", group = "policy")]
    pub keep_last: Option<usize>,
    /// Keep the newest point of each of the last N hours that have points.
    #[arg(long, value_name = "N", group = "policy")]
    pub keep_hourly: Option<usize>,
    /// Keep the newest point of each of the last N days that have points.
    #[arg(long, value_name = "N", group = "policy")]
    pub keep_daily: Option<usize>,
    /// Keep the newest point of each of the last N ISO weeks that have points.
    #[arg(long, value_name = "N", group = "policy")]
    pub keep_weekly: Option<usize>,
    /// Keep the newest point of each of the last N months that have points.
    #[arg(long, value_name = "N", group = "policy")]
    pub keep_monthly: Option<usize>,
    /// Keep the newest point of each of the last N years that have points.
    #[arg(long, value_name = "N", group = "policy")]
    pub keep_yearly: Option<usize>,
    /// Keep every point made within DURATION before the VM's newest point (e.g. 36h, 2weeks,
    /// 1y 6months).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, group = "policy")]
    pub keep_within: Option<Duration>,
    /// Count hours, days, weeks, months and years in UTC instead of the local time zone.
    #[arg(long)]
    pub utc: bool,
    /// Print what would be removed, and why each kept point is kept; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl PruneArgs {
    fn policy(&self) -> KeepPolicy {
        KeepPolicy {
            keep_last: self.keep_last.unwrap_or(0),
            keep_hourly: self.keep_hourly.unwrap_or(0),
            keep_daily: self.keep_daily.unwrap_or(0),
            keep_weekly: self.keep_weekly.unwrap_or(0),
            keep_monthly: self.keep_monthly.unwrap_or(0),
            keep_yearly: self.keep_yearly.unwrap_or(0),
            keep_within: self.keep_within,
            time_zone: if self.utc {
                TimeZone::UTC
            } else {
                TimeZone::system()
            },
        }
    }
}

#[derive(clap::Args)]
pub struct ForgetArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The points to remove: ids, unique prefixes of ids, or `latest`.
    #[arg(required = true, value_name = "ID")]
    pub ids: Vec<String>,
}

/// `arkvm backup prune`.
pub fn prune(args: PruneArgs) -> ExitCode {
    let policy = args.policy();
    if policy.is_empty() {
        eprintln!("arkvm: error: every --keep-* is 0: prune would remove every point");
        return exit::code(exit::USAGE);
    }
    let repo = match open_repo(&args.repo.repo, args.repo.key.as_deref()) {
        Ok(r) => r,
        Err(c) => return c,
    };
    let report = if args.dry_run {
        repo.plan_prune(&policy)
    } else {
        repo.prune(&policy)
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    if args.repo.json {
        crate::outln!("{}", prune_json(&report));
    } else {
        print_prune(&report);
    }
    ExitCode::SUCCESS
}

fn prune_json(r: &PruneReport) -> serde_json::Value {
    let reasons: serde_json::Map<String, serde_json::Value> = r
        .reasons
        .iter()
        .map(|(id, why)| {
            let names: Vec<&str> = why.iter().map(|w| w.name()).collect();
            (id.clone(), serde_json::json!(names))
        })
        .collect();
    let mut v = serde_json::json!({
        "dry_run": r.dry_run, "removed": r.removed, "kept": r.kept, "reasons": reasons,
    });
    if !r.dry_run {
        v["chunks_removed"] = r.gc.chunks_removed.into();
        v["chunks_kept"] = r.gc.chunks_kept.into();
    }
    v
}

fn print_prune(r: &PruneReport) {
    for id in &r.kept {
        let why: Vec<&str> = r
            .reasons
            .get(id)
            .map(|w| w.iter().map(|w| w.name()).collect())
            .unwrap_or_default();
        crate::outln!("keep   {id}  ({})", why.join(", "));
    }
    let verb = if r.dry_run { "would remove" } else { "remove" };
    for id in &r.removed {
        crate::outln!("{verb} {id}");
    }
    if r.dry_run {
        crate::outln!(
            "would remove {}, keep {} (dry run: nothing changed)",
            count(r.removed.len(), "point"),
            r.kept.len()
        );
    } else {
        crate::outln!(
            "removed {}, kept {}; {}",
            count(r.removed.len(), "point"),
            r.kept.len(),
            gc_text(&r.gc)
        );
    }
}

fn gc_text(gc: &GcReport) -> String {
    format!(
        "collected {}, {} remain",
        count(gc.chunks_removed as usize, "unused chunk"),
        gc.chunks_kept
    )
}

/// Resolves each of `specs` (id, prefix or `latest`) to a full id.
pub fn resolve_all(repo: &Repository, specs: &[String]) -> Result<Vec<String>, ExitCode> {
    specs
        .iter()
        .map(|s| repo.resolve_point(s, None).map_err(|e| fail(&e)))
        .collect()
}

/// `arkvm backup forget`.
pub fn forget(args: ForgetArgs) -> ExitCode {
    let repo = match open_repo(&args.repo.repo, args.repo.key.as_deref()) {
        Ok(r) => r,
        Err(c) => return c,
    };
    let mut ids = match resolve_all(&repo, &args.ids) {
        Ok(ids) => ids,
        Err(c) => return c,
    };
    ids.sort();
    ids.dedup();
    if let Err(e) = repo.forget(&ids) {
        return fail(&e);
    }
    if args.repo.json {
        crate::outln!("{}", serde_json::json!({ "removed": ids }));
    } else {
        for id in &ids {
            crate::outln!("removed {id}");
        }
        crate::outln!(
            "removed {} (run `arkvm backup gc` to free their chunks)",
            count(ids.len(), "point")
        );
    }
    ExitCode::SUCCESS
}

/// `arkvm backup gc`.
pub fn gc(args: RepoArgs) -> ExitCode {
    let repo = match open_repo(&args.repo, args.key.as_deref()) {
        Ok(r) => r,
        Err(c) => return c,
    };
    match repo.gc() {
        Ok(gc) if args.json => {
            crate::outln!(
                "{}",
                serde_json::json!({"chunks_removed": gc.chunks_removed,
                    "chunks_kept": gc.chunks_kept, "incomplete_removed": gc.incomplete_removed})
            );
            ExitCode::SUCCESS
        }
        Ok(gc) => {
            crate::outln!("{}", gc_text(&gc));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

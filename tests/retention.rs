//! `arkvm backup prune|forget|gc` against repositories whose points were written through the
//! library with chosen times: restic's retention rules case by case, over a simulated year,
//! dry runs that change nothing, and ids given as `latest` or a unique prefix.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use arkvm_tests::{ark_cli as ark, parse_json as json, ScratchDir};
use snapshot::repo::Repository;

const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;

/// A repository holding one empty point of `vm` at each of `times` (ms since the epoch);
/// returns the ids in the order of `times`.
fn repo_with(dir: &Path, points: &[(&str, u64)]) -> Vec<String> {
    let repo = Repository::init(dir, None).expect("init");
    points
        .iter()
        .map(|(vm, ms)| {
            let backup = repo.start_backup(vm, None).expect("start");
            backup
                .commit_at(Duration::from_millis(*ms))
                .expect("commit")
                .id
        })
        .collect()
}

fn point_ids(dir: &Path) -> BTreeSet<String> {
    Repository::open(dir, None)
        .expect("open")
        .point_ids()
        .expect("ids")
        .into_iter()
        .collect()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the test's own calendar, to check
/// the one in arkvm).
fn days(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn at(y: i64, m: i64, d: i64, h: u64) -> u64 {
    days(y, m, d) as u64 * DAY + h * HOUR
}

/// Dry-runs then prunes with `flags`; checks that the dry run changed nothing, that it
/// predicted the prune, and returns the kept ids with their reasons.
fn prune(
    dir: &Path,
    env: &[(&str, &str)],
    flags: &[&str],
) -> (BTreeSet<String>, serde_json::Value) {
    let repo = dir.to_str().unwrap();
    let before = point_ids(dir);
    let mut args = vec!["backup", "prune", "--repo", repo, "--json", "--dry-run"];
    args.extend_from_slice(flags);
    let (code, out, err) = ark(env, &args);
    assert_eq!(code, 0, "{flags:?}: {err}");
    let plan = json(&out);
    assert_eq!(plan["dry_run"], true);
    assert_eq!(point_ids(dir), before, "--dry-run changed the repository");
    args.retain(|a| *a != "--dry-run");
    let (code, out, err) = ark(env, &args);
    assert_eq!(code, 0, "{flags:?}: {err}");
    let done = json(&out);
    assert_eq!(done["dry_run"], false);
    assert_eq!(done["kept"], plan["kept"], "{flags:?}");
    assert_eq!(done["removed"], plan["removed"], "{flags:?}");
    let kept = point_ids(dir);
    let listed: BTreeSet<String> = done["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(kept, listed);
    (kept, done["reasons"].clone())
}

/// Builds a fresh repository of `points`, prunes it with `flags`, and returns the indexes of
/// the kept points.
fn kept_indexes(env: &[(&str, &str)], points: &[(&str, u64)], flags: &[&str]) -> Vec<usize> {
    let dir = ScratchDir::new("retention");
    let repo = dir.path().join("repo");
    let ids = repo_with(&repo, points);
    let (kept, _) = prune(&repo, env, flags);
    (0..ids.len()).filter(|i| kept.contains(&ids[*i])).collect()
}

#[test]
fn each_policy_keeps_what_restic_keeps() {
    // 2025-12-31 is a Wednesday of ISO week 2026-W01, as is 2026-01-01.
    let points = [
        ("vm", at(2025, 1, 1, 10)),   // 0
        ("vm", at(2025, 1, 1, 12)),   // 1
        ("vm", at(2025, 1, 2, 9)),    // 2
        ("vm", at(2025, 1, 6, 9)),    // 3: a Monday, ISO week 2025-W02
        ("vm", at(2025, 2, 15, 0)),   // 4
        ("vm", at(2025, 12, 31, 23)), // 5
        ("vm", at(2026, 1, 1, 1)),    // 6
        ("other", at(2025, 1, 1, 0)), // 7: another VM's only point
    ];
    let utc = |flags: &[&str]| {
        let mut f = flags.to_vec();
        f.push("--utc");
        kept_indexes(&[], &points, &f)
    };
    assert_eq!(utc(&["--keep-last", "2"]), [5, 6, 7]);
    assert_eq!(utc(&["--keep-hourly", "2"]), [5, 6, 7]);
    assert_eq!(utc(&["--keep-daily", "3"]), [4, 5, 6, 7]);
    assert_eq!(utc(&["--keep-daily", "6"]), [1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(utc(&["--keep-weekly", "2"]), [4, 6, 7]);
    assert_eq!(utc(&["--keep-weekly", "4"]), [2, 3, 4, 6, 7]);
    assert_eq!(utc(&["--keep-monthly", "3"]), [4, 5, 6, 7]);
    assert_eq!(utc(&["--keep-yearly", "5"]), [5, 6, 7]);
    assert_eq!(utc(&["--keep-within", "1d"]), [5, 6, 7]);
    assert_eq!(utc(&["--keep-within", "330days"]), [4, 5, 6, 7]);
    // Policies add up.
    assert_eq!(
        utc(&[
            "--keep-last",
            "1",
            "--keep-monthly",
            "2",
            "--keep-yearly",
            "2"
        ]),
        [5, 6, 7]
    );
    assert_eq!(
        utc(&["--keep-weekly", "2", "--keep-within", "3h"]),
        [4, 5, 6, 7]
    );
    assert_eq!(utc(&["--keep-yearly", "2", "--keep-daily", "2"]), [5, 6, 7]);
    assert_eq!(
        utc(&[
            "--keep-daily",
            "1",
            "--keep-yearly",
            "2",
            "--keep-weekly",
            "3"
        ]),
        [3, 4, 5, 6, 7]
    );
    // Local time by default: in UTC+2, 2025-12-31 23:00 UTC is already 2026.
    let plus2 = [("TZ", "Etc/GMT-2")];
    assert_eq!(
        kept_indexes(&plus2, &points, &["--keep-yearly", "5"]),
        [4, 6, 7]
    );
    assert_eq!(
        kept_indexes(&plus2, &points, &["--keep-daily", "2"]),
        [4, 6, 7]
    );
    assert_eq!(
        kept_indexes(&plus2, &points, &["--keep-yearly", "5", "--utc"]),
        [5, 6, 7]
    );
}

#[test]
fn dry_run_explains_and_a_year_prunes_by_the_rules() {
    // A simulated year: a point every 7 hours from 2025-03-01 for 365 days.
    let start = at(2025, 3, 1, 0);
    let times: Vec<u64> = (0..)
        .map(|i| start + i * 7 * HOUR)
        .take_while(|t| *t < start + 365 * DAY)
        .collect();
    let points: Vec<(&str, u64)> = times.iter().map(|t| ("vm", *t)).collect();
    let newest = *times.last().unwrap();
    let dir = ScratchDir::new("year");
    let repo = dir.path().join("repo");
    let ids = repo_with(&repo, &points);
    let (kept, reasons) = prune(
        &repo,
        &[],
        &[
            "--utc",
            "--keep-last",
            "3",
            "--keep-daily",
            "10",
            "--keep-weekly",
            "6",
            "--keep-monthly",
            "12",
            "--keep-within",
            "2days",
        ],
    );
    // The newest point of each calendar unit, newest first, by the test's own calendar.
    let day = |t: u64| t / DAY;
    let month = |t: u64| {
        let d = day(t) as i64;
        (1970..2100)
            .flat_map(|y| (1..=12).map(move |m| (y, m)))
            .take_while(|(y, m)| days(*y, *m, 1) <= d)
            .last()
            .unwrap()
    };
    // ISO weeks start on Monday; 1970-01-01 was a Thursday.
    let week = |t: u64| (day(t) + 3) / 7;
    let newest_per = |bucket: &dyn Fn(u64) -> i64, n: usize| -> BTreeSet<u64> {
        let mut seen = Vec::new();
        let mut out = BTreeSet::new();
        for t in times.iter().rev() {
            let b = bucket(*t);
            if !seen.contains(&b) && seen.len() < n {
                seen.push(b);
                out.insert(*t);
            }
        }
        out
    };
    let mut expect: BTreeSet<u64> = times.iter().rev().take(3).copied().collect();
    expect.extend(newest_per(&|t| day(t) as i64, 10));
    expect.extend(newest_per(&|t| week(t) as i64, 6));
    expect.extend(newest_per(
        &|t| {
            let (y, m) = month(t);
            y * 12 + m
        },
        12,
    ));
    expect.extend(times.iter().filter(|t| newest - **t <= 2 * DAY));
    let expect_ids: BTreeSet<String> = times
        .iter()
        .zip(&ids)
        .filter(|(t, _)| expect.contains(t))
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(kept, expect_ids);
    assert!(kept.len() > 20 && kept.len() < 40, "{}", kept.len());
    // Every kept point says why; the newest has all five reasons.
    let newest_id = ids.last().unwrap();
    let why: Vec<&str> = reasons[newest_id]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(why, ["last", "daily", "weekly", "monthly", "within"]);
    assert_eq!(reasons.as_object().unwrap().len(), kept.len());

    // The text dry run names each kept point's reasons and changes nothing.
    let before = point_ids(&repo);
    let (code, out, err) = ark(
        &[],
        &[
            "backup",
            "prune",
            "--repo",
            repo.to_str().unwrap(),
            "--keep-last",
            "1",
            "--dry-run",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("keep   {newest_id}  (last)")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "would remove {} points, keep 1 (dry run",
            before.len() - 1
        )),
        "{out}"
    );
    assert_eq!(point_ids(&repo), before);
}

#[test]
fn forget_gc_latest_prefixes_and_usage() {
    let dir = ScratchDir::new("forget");
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    let ids = repo_with(
        &repo,
        &[
            ("a", at(2025, 5, 1, 0)),
            ("b", at(2025, 5, 2, 0)),
            ("a", at(2025, 6, 1, 0)),
        ],
    );
    // A prefix of two ids is refused; `latest` per VM and a unique prefix work.
    let (code, _, err) = ark(&[], &["backup", "forget", "--repo", r, "2025050"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is the start of 2 backup point ids"), "{err}");
    let (code, out, err) = ark(
        &[("ARKVM_REPO", r)],
        &["backup", "forget", "--json", &ids[1][..12]],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["removed"], serde_json::json!([ids[1]]));
    let (code, out, _) = ark(&[], &["backup", "forget", "--repo", r, "latest"]);
    assert_eq!(code, 0);
    assert!(
        out.ends_with("removed 1 point (run `arkvm backup gc` to free their chunks)\n"),
        "{out}"
    );
    assert_eq!(point_ids(&repo), BTreeSet::from([ids[0].clone()]));
    let (code, _, err) = ark(&[], &["backup", "forget", "--repo", r, "nosuch"]);
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");
    let (code, out, err) = ark(&[], &["backup", "gc", "--repo", r, "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["chunks_removed"], 0);
    // No policy is a usage error, and so is an all-zero one; nothing is removed.
    let (code, _, _) = ark(&[], &["backup", "prune", "--repo", r]);
    assert_eq!(code, 2);
    let (code, _, err) = ark(&[], &["backup", "prune", "--repo", r, "--keep-last", "0"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = ark(
        &[],
        &["backup", "prune", "--repo", r, "--keep-within", "soon"],
    );
    assert_eq!(code, 2, "{err}");
    assert_eq!(point_ids(&repo).len(), 1);
}

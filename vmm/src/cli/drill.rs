//! `arkvm backup drill`: proves that backup points boot. Each chosen point is restored in
//! isolation by a child `arkvm restore --repo R --id ID` (no control socket, no network device,
//! no DR target; its disks are served from the point into a throwaway temporary directory that
//! the child removes when it ends, so neither a disk nor the repository's chunks and manifests
//! change). The drill passes when the guest writes to its console (or prints a line matching
//! `--expect`) within the timeout. The result goes into the repository as a small create-only
//! object, `drills/<point>/<unix ms>-<pid>.json`, which `backup list` shows.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use snapshot::repo::{LockMode, PointManifest, Repository};

use super::common::{fail, open_repo};

/// `arkvm backup drill`.
#[derive(clap::Args)]
pub struct DrillArgs {
    /// The repository directory.
    #[arg(long, env = "ARKVM_REPO")]
    pub repo: std::path::PathBuf,
    /// The repository's key file (encrypted repositories).
    #[arg(long, env = "ARKVM_KEY_FILE")]
    pub key: Option<std::path::PathBuf>,
    /// Drill this point.
    #[arg(long, conflicts_with_all = ["latest", "all"])]
    pub id: Option<String>,
    /// Drill the newest point (the default).
    #[arg(long, conflicts_with = "all")]
    pub latest: bool,
    /// Drill every point, one after another.
    #[arg(long)]
    pub all: bool,
    /// Pass only when the guest prints a line matching this regular expression (default: any
    /// console output passes).
    #[arg(long, value_name = "REGEX")]
    pub expect: Option<String>,
    /// How long each point has to pass (e.g. 30s, 2m).
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub timeout: String,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The result of one drill, as stored in the repository.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DrillRecord {
    pub point: String,
    pub vm: String,
    pub started_unix_ms: u64,
    pub passed: bool,
    /// From starting the restore to the guest's first console output.
    pub first_output_ms: Option<u64>,
    /// From starting the restore to the line that matched `expect`.
    pub matched_ms: Option<u64>,
    pub expect: Option<String>,
    pub timeout_ms: u64,
    /// What happened, in one line.
    pub detail: String,
}

/// The folder of a point's drill records.
fn record_folder(point: &str) -> String {
    format!("drills/{point}/")
}

/// The newest drill record of `point`, if any (unreadable records are skipped).
pub fn last_drill(repo: &Repository, point: &str) -> Option<DrillRecord> {
    let names = repo.store().list(&record_folder(point)).ok()?;
    names.iter().rev().find_map(|name| {
        let bytes = repo.store().get(name).ok()?;
        serde_json::from_slice(&bytes).ok()
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Stores `record` as a new object (create-only; the name is unique per run).
fn store_record(repo: &Repository, record: &DrillRecord) -> Result<(), String> {
    let name = format!(
        "{}{:013}-{}.json",
        record_folder(&record.point),
        record.started_unix_ms,
        std::process::id()
    );
    let bytes = serde_json::to_vec(record).map_err(|e| e.to_string())?;
    let _lock = repo
        .store()
        .lock(LockMode::Shared, true)
        .map_err(|e| crate::error_chain(&e))?;
    match repo.store().put_if_absent(&name, &bytes) {
        Ok(true) => repo.store().sync().map_err(|e| crate::error_chain(&e)),
        Ok(false) => Err(format!("drill record {name} exists already")),
        Err(e) => Err(crate::error_chain(&e)),
    }
}

/// The points to drill, oldest first.
fn chosen(repo: &Repository, args: &DrillArgs) -> Result<Vec<PointManifest>, String> {
    if let Some(id) = &args.id {
        return repo
            .read_point(id)
            .map(|p| vec![p])
            .map_err(|e| crate::error_chain(&e));
    }
    let mut points: Vec<PointManifest> = repo
        .points()
        .map_err(|e| crate::error_chain(&e))?
        .into_iter()
        .filter_map(|(id, p)| match p {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!(
                    "arkvm: warning: skipping unreadable point {id}: {}",
                    crate::error_chain(&e)
                );
                None
            }
        })
        .collect();
    points.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
    if !args.all {
        points = points.pop().into_iter().collect();
    }
    if points.is_empty() {
        return Err("the repository holds no point to drill".into());
    }
    Ok(points)
}

/// What the child's output readers report.
enum Event {
    FirstOutput,
    Line(String),
    Closed,
}

/// Reads `r` to its end, reporting the first byte and every line.
fn watch(mut r: impl Read + Send + 'static, tx: mpsc::Sender<Event>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        let mut first = true;
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if first {
                first = false;
                let _ = tx.send(Event::FirstOutput);
            }
            for &b in &buf[..n] {
                if b == b'\n' {
                    let text = String::from_utf8_lossy(&line).trim_end().to_string();
                    let _ = tx.send(Event::Line(text));
                    line.clear();
                } else if line.len() < 64 * 1024 {
                    line.push(b);
                }
            }
        }
        if !line.is_empty() {
            let _ = tx.send(Event::Line(String::from_utf8_lossy(&line).to_string()));
        }
        let _ = tx.send(Event::Closed);
    });
}

/// Ends the child: SIGTERM (a clean exit removes its temporary disks), then SIGKILL.
fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on the pid of a child this process spawned and has not reaped; it
        // touches no memory.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Boots `point` in a child restore and watches its console.
fn drill_one(
    args: &DrillArgs,
    point: &PointManifest,
    expect: Option<&regex::Regex>,
    timeout: Duration,
) -> DrillRecord {
    let mut record = DrillRecord {
        point: point.id.clone(),
        vm: point.vm.clone(),
        started_unix_ms: now_ms(),
        passed: false,
        first_output_ms: None,
        matched_ms: None,
        expect: args.expect.clone(),
        timeout_ms: timeout.as_millis() as u64,
        detail: String::new(),
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            record.detail = format!("cannot find the arkvm executable: {e}");
            return record;
        }
    };
    let mut cmd = Command::new(exe);
    cmd.arg("restore")
        .arg("--repo")
        .arg(&args.repo)
        .arg("--id")
        .arg(&point.id)
        .arg("--log-level")
        .arg("error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(key) = &args.key {
        cmd.arg("--key").arg(key);
    }
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            record.detail = format!("cannot start arkvm restore: {e}");
            return record;
        }
    };
    let (tx, rx) = mpsc::channel();
    let (etx, erx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        watch(out, tx);
    }
    if let Some(err) = child.stderr.take() {
        watch(err, etx);
    }
    let deadline = started + timeout;
    let ms = |at: Instant| at.duration_since(started).as_millis() as u64;
    let mut closed = false;
    while !record.passed && !closed {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(Event::FirstOutput) => {
                record.first_output_ms = Some(ms(Instant::now()));
                record.passed = expect.is_none();
            }
            Ok(Event::Line(l)) => {
                if expect.is_some_and(|re| re.is_match(&l)) {
                    record.matched_ms = Some(ms(Instant::now()));
                    record.passed = true;
                }
            }
            Ok(Event::Closed) | Err(mpsc::RecvTimeoutError::Disconnected) => closed = true,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    stop(&mut child);
    let status = child.wait().ok();
    let stderr: Vec<String> = erx
        .try_iter()
        .filter_map(|e| match e {
            Event::Line(l) => Some(l),
            _ => None,
        })
        .collect();
    record.detail = if record.passed {
        match record.matched_ms {
            Some(t) => format!("matched the expected line after {t} ms"),
            None => format!(
                "console output after {} ms",
                record.first_output_ms.unwrap_or(0)
            ),
        }
    } else if closed {
        format!(
            "the restore ended ({}) before passing{}",
            status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "unknown status".into()),
            stderr.last().map(|l| format!(": {l}")).unwrap_or_default()
        )
    } else if let Some(re) = &args.expect {
        format!("no line matching '{re}' within {timeout:?}")
    } else {
        format!("no console output within {timeout:?}")
    };
    record
}

/// `arkvm backup drill`.
pub fn drill(args: DrillArgs) -> ExitCode {
    let timeout = match crate::dr_checkpoints::parse_interval(&args.timeout) {
        Ok(t) if !t.is_zero() => t,
        Ok(_) => {
            eprintln!("arkvm: error: --timeout must be more than 0");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("arkvm: error: --timeout: {e}");
            return ExitCode::from(1);
        }
    };
    let expect = match args.expect.as_deref().map(regex::Regex::new).transpose() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("arkvm: error: --expect: {e}");
            return ExitCode::from(1);
        }
    };
    let repo = match open_repo(&args.repo, args.key.as_deref()) {
        Ok(r) => r,
        Err(c) => return c,
    };
    let points = match chosen(&repo, &args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("arkvm: error: {e}");
            return ExitCode::from(1);
        }
    };
    let mut records = Vec::new();
    let mut failed = 0;
    for point in &points {
        let record = drill_one(&args, point, expect.as_ref(), timeout);
        if let Err(e) = store_record(&repo, &record) {
            eprintln!(
                "arkvm: warning: cannot record the drill of {} in {}: {e}",
                point.id,
                Path::new(&args.repo).display()
            );
        }
        failed += usize::from(!record.passed);
        if !args.json {
            crate::outln!(
                "{} {} ({}): {}",
                if record.passed { "PASS" } else { "FAIL" },
                record.point,
                record.vm,
                record.detail
            );
        }
        records.push(record);
    }
    if args.json {
        match serde_json::to_string(&records) {
            Ok(j) => crate::outln!("{j}"),
            Err(e) => return fail(&e),
        }
    }
    if failed > 0 {
        eprintln!("arkvm: error: {failed} of {} drills failed", records.len());
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

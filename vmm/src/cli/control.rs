//! The client commands: `pause`, `resume`, `status`, `shutdown` and `snapshot` talk to a running
//! arkvm over its control socket.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::common::fail;
use super::{SnapshotArgs, SocketArg, StatusArgs, StrategyArg};
use crate::api::{
    ApiClient, ApiClientError, SnapshotMode, SnapshotParams, SnapshotStarted, SnapshotState,
    SnapshotStatus, SnapshotStrategy, SnapshotTarget, VmInfo,
};
use crate::restore::lazy_memory::progress::MemoryLoaderInfo;

fn connect(path: &std::path::Path) -> Result<ApiClient, ExitCode> {
    ApiClient::connect(path).map_err(|e| fail(&e))
}

/// `arkvm pause|resume|shutdown`: one PUT.
pub fn simple_put(args: &SocketArg, path: &str, done: &str) -> ExitCode {
    let mut client = match connect(&args.api_socket) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.put(path, None).and_then(|r| r.into_result()) {
        Ok(_) if args.json => {
            crate::outln!("{}", serde_json::json!({ "result": done }));
            ExitCode::SUCCESS
        }
        Ok(_) => {
            crate::outln!("{done}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// The `memory:` progress line of `arkvm status` for a restored VM.
fn memory_loader_line(m: &MemoryLoaderInfo) -> String {
    let state = if let Some(e) = &m.error {
        format!("failed: {e}")
    } else if m.fully_loaded {
        format!(
            "fully loaded in {} ms, huge pages {:?}",
            m.loaded_after_ms.unwrap_or_default(),
            m.collapse
        )
        .to_lowercase()
    } else {
        format!(
            "loading, {} chunks waited for, last chunk {} ms ago",
            m.chunks_waited_for, m.ms_since_last_chunk
        )
    };
    format!(
        "loader:   {}/{} chunks, {}/{} MiB in ({} MiB read), {} faults served; {state}",
        m.chunks_loaded,
        m.chunks_total,
        m.bytes_loaded >> 20,
        m.bytes_total >> 20,
        m.bytes_read >> 20,
        m.faults_served
    )
}

/// `arkvm status`.
pub fn status(args: StatusArgs) -> ExitCode {
    let mut client = match connect(&args.api_socket) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let info = match client.get("/vm").and_then(|r| r.parse::<VmInfo>()) {
        Ok(i) => i,
        Err(e) => return fail(&e),
    };
    let snap = client
        .get("/snapshot")
        .ok()
        .filter(|r| r.is_success())
        .and_then(|r| r.parse::<SnapshotStatus>().ok());
    if args.json {
        let v = serde_json::json!({ "vm": info, "last_snapshot": snap });
        crate::outln!("{v}");
        return ExitCode::SUCCESS;
    }
    crate::outln!("state:    {:?}", info.state);
    crate::outln!("vcpus:    {}", info.config.vcpus);
    crate::outln!("memory:   {} MiB", info.config.memory_bytes >> 20);
    if let Some(k) = &info.config.kernel {
        crate::outln!("kernel:   {}", k.display());
    }
    if let Some(r) = &info.config.restored_from {
        crate::outln!("restored: {r}");
    }
    if let Some(m) = &info.memory_loader {
        crate::outln!("{}", memory_loader_line(m));
    }
    for d in &info.config.disks {
        crate::outln!(
            "disk:     {}{}",
            d.path.display(),
            if d.read_only { " (read-only)" } else { "" }
        );
    }
    if let Some(h) = &info.disk_hydration {
        crate::outln!(
            "hydrate:  {} of {} ({}){}",
            super::format::bytes(h.bytes_done),
            super::format::bytes(h.bytes_total),
            match (&h.error, h.done) {
                (Some(_), _) => "failed",
                (None, true) => "done, the repository is no longer needed",
                (None, false) => "in progress",
            },
            h.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    for n in &info.net {
        crate::outln!(
            "net:      {} tap={} mac={} rx={} frames/{} bytes (dropped {}) tx={} frames/{} bytes (tap errors {}) held={} frames/{} bytes release-lag last={}us max={}us{}",
            n.id, n.tap, n.mac, n.rx_frames, n.rx_bytes, n.rx_dropped, n.tx_frames, n.tx_bytes,
            n.tx_errors, n.held_frames, n.held_bytes, n.release_lag_last_us,
            n.release_lag_max_us,
            n.error.as_ref().map(|e| format!(" ERROR: {e}")).unwrap_or_default()
        );
    }
    if let Some(s) = snap {
        crate::outln!(
            "snapshot: {} {:?}{}",
            s.id,
            s.state,
            s.error.map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
    ExitCode::SUCCESS
}

/// `arkvm snapshot`: starts a snapshot and follows it to its end.
pub fn snapshot(args: SnapshotArgs) -> ExitCode {
    let abs = |p: &std::path::Path| std::path::absolute(p);
    let target = match (&args.out, &args.repo) {
        (Some(out), _) => abs(out).map(SnapshotTarget::Dir),
        (None, Some(repo)) if snapshot::repo::is_remote(repo) => {
            Ok(SnapshotTarget::Repo(repo.clone()))
        }
        (None, Some(repo)) => abs(repo).map(SnapshotTarget::Repo),
        (None, None) => {
            eprintln!("arkvm: error: snapshot needs --out DIR or --repo DIR");
            return super::exit::code(super::exit::USAGE);
        }
    };
    let target = match target {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let key = match args.key.as_deref().map(abs).transpose() {
        Ok(k) => k,
        Err(e) => return fail(&e),
    };
    let params = SnapshotParams {
        target,
        mode: if args.paused {
            SnapshotMode::Paused
        } else {
            SnapshotMode::Live
        },
        strategy: match args.strategy {
            StrategyArg::Cow => SnapshotStrategy::Cow,
            StrategyArg::Precopy => SnapshotStrategy::Precopy,
        },
        key,
        compression: args.compression.unwrap_or_default(),
    };
    let mut client = match connect(&args.api_socket) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let body = serde_json::to_value(&params).expect("snapshot parameters serialize");
    let started = match client
        .put("/snapshot", Some(&body))
        .and_then(|r| r.parse::<SnapshotStarted>())
    {
        Ok(started) => started,
        Err(e) => return fail(&e),
    };
    if args.no_wait {
        let id = started.id;
        if args.json {
            crate::outln!("{}", serde_json::json!({ "id": id, "state": "running" }));
        } else {
            crate::outln!("snapshot {id} started");
        }
        return ExitCode::SUCCESS;
    }
    let bar = std::io::stdout().is_terminal().then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} snapshot [{bar:40}] {bytes}/{total_bytes} {msg}",
            )
            .expect("valid progress template"),
        );
        b
    });
    let status = loop {
        let s = match client
            .get("/snapshot")
            .and_then(|r| r.parse::<SnapshotStatus>())
        {
            Ok(s) => s,
            Err(e) => return lost_vm(&params.target, &e),
        };
        if let Some(b) = &bar {
            b.set_length(s.bytes_total);
            b.set_position(s.bytes_written);
        }
        if s.state != SnapshotState::Running {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    report(&status, args.json, &params.target)
}

/// The VM stopped answering while a snapshot ran (it was killed, say). A snapshot directory
/// appears under its name only once complete, so one that exists now is done.
fn lost_vm(target: &SnapshotTarget, e: &ApiClientError) -> ExitCode {
    if let SnapshotTarget::Dir(dir) = target {
        if dir.join("manifest.json").is_file() {
            crate::outln!(
                "snapshot written to {} (the VM stopped answering after it completed: {})",
                dir.display(),
                crate::error_chain(e)
            );
            return ExitCode::SUCCESS;
        }
    }
    fail(e)
}

fn report(s: &SnapshotStatus, json: bool, target: &SnapshotTarget) -> ExitCode {
    if json {
        crate::outln!("{}", serde_json::to_string(s).expect("status serializes"));
    } else if s.state == SnapshotState::Done {
        crate::outln!(
            "snapshot {} done: {} in {} ms, vCPUs paused {} us, {} pages copied early, {} re-copied",
            s.id,
            super::format::bytes(s.bytes_written),
            s.total_ms,
            s.pause_us.unwrap_or(0),
            s.pages_copied_early,
            s.pages_recopied
        );
        if let Some(c) = &s.cow {
            crate::outln!(
                "cow: {} write faults, {} staged, {} found the staging pool full, writers waited {} us in all (longest {} us)",
                c.faults,
                super::format::bytes(c.bytes_staged),
                c.pool_full,
                c.writer_wait_us,
                c.writer_wait_max_us
            );
        }
        if let Some(pc) = &s.precopy {
            crate::outln!(
                "precopy: {} rounds, vCPU throttle {}%{}, final dirty set {}, copy rate {}/s",
                s.precopy_rounds.unwrap_or(0),
                pc.throttle_pct,
                if pc.throttle_enabled {
                    ""
                } else {
                    " (throttle off)"
                },
                super::format::bytes(pc.final_dirty_bytes),
                super::format::bytes(pc.copy_rate_bps)
            );
        }
        if s.precopy_converged == Some(false) {
            crate::outln!(
                "precopy did not converge in {} rounds: the guest dirtied memory faster than it was copied, so the final pause copied the rest",
                s.precopy_rounds.unwrap_or(0)
            );
        }
    }
    if s.state == SnapshotState::Done {
        ExitCode::SUCCESS
    } else {
        let why = s.error.clone().unwrap_or_default();
        let place = match target {
            SnapshotTarget::Dir(p) | SnapshotTarget::Repo(p) => p.display().to_string(),
        };
        if why.contains("No space left on device") || why.contains("os error 28") {
            eprintln!(
                "arkvm: error: snapshot {} failed: no space left on the filesystem of {place} ({why})",
                s.id
            );
        } else {
            let state = format!("{:?}", s.state).to_lowercase();
            eprintln!("arkvm: error: snapshot {} {state}: {why}", s.id);
        }
        ExitCode::from(1)
    }
}

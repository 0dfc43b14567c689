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
    for d in &info.config.disks {
        crate::outln!(
            "disk:     {}{}",
            d.path.display(),
            if d.read_only { " (read-only)" } else { "" }
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
            Err(e) => return fail(&e),
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
    report(&status, args.json)
}

fn report(s: &SnapshotStatus, json: bool) -> ExitCode {
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
        let e = ApiClientError::Protocol(format!(
            "snapshot {} {:?}: {}",
            s.id,
            s.state,
            s.error.clone().unwrap_or_default()
        ));
        fail(&e)
    }
}

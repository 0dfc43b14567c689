//! What the `dr` commands print: a receiver's status as text, the recovery point lag, and the
//! JSON line of `dr serve --json`.

use std::path::Path;

use snapshot::dr::ReceiverStatus;

/// The line `dr serve --json` prints once it listens.
pub fn serve_json(
    listening: &str,
    repo: &Path,
    points: usize,
    encrypted: bool,
    keep_last: usize,
) -> serde_json::Value {
    serde_json::json!({
        "listening": listening,
        "repo": repo.display().to_string(),
        "checkpoints": points,
        "encrypted": encrypted,
        "keep_last": keep_last,
    })
}

/// The recovery point lag: the receiver's clock minus the creation time of the newest point
/// (on the primary's clock).
pub fn rpo_ms(status: &ReceiverStatus) -> Option<u64> {
    status
        .vms
        .iter()
        .map(|v| v.last_created_unix_ms)
        .max()
        .map(|created| status.receiver_unix_ms.saturating_sub(created))
}

/// The human-readable status.
pub fn status_text(target: &str, status: &ReceiverStatus) -> String {
    let mut out = format!(
        "receiver:     {target} ({} checkpoints, {}, keeping {})\n",
        status.points,
        if status.encrypted {
            "encrypted at rest"
        } else {
            "not encrypted at rest"
        },
        if status.keep_last == 0 {
            "all".to_string()
        } else {
            format!("the last {} per VM", status.keep_last)
        }
    );
    for vm in &status.vms {
        let age = status
            .receiver_unix_ms
            .saturating_sub(vm.last_created_unix_ms);
        out.push_str(&format!(
            "vm {}:  {} checkpoints, last {} (RPO {:.1} s)\n",
            vm.vm,
            vm.points,
            vm.last_point_id,
            age as f64 / 1000.0
        ));
    }
    if status.vms.is_empty() {
        out.push_str("no checkpoints yet\n");
    }
    if let Some(last) = status.recent.last() {
        let pause = last
            .pause_us
            .map(|us| format!("{:.2} ms", us as f64 / 1000.0))
            .unwrap_or_else(|| "unknown".into());
        out.push_str(&format!(
            "last transfer: {} bytes, {} of {} chunks sent, {} ms, guest pause {pause}\n",
            last.bytes_received, last.chunks_received, last.chunks_offered, last.transfer_ms
        ));
        let n = status.recent.len() as u64;
        let bytes: u64 = status.recent.iter().map(|r| r.bytes_received).sum();
        out.push_str(&format!(
            "average:      {} bytes per checkpoint over the last {n}\n",
            bytes / n
        ));
    }
    out.push_str(&format!(
        "since start:  {} committed, {} discarded\n",
        status.checkpoints_committed, status.checkpoints_discarded
    ));
    if let Some(why) = &status.last_discard {
        out.push_str(&format!("last discard: {why}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::dr::{CheckpointRecord, VmStatus};

    #[test]
    fn status_text_shows_lag_bytes_and_pause() {
        let status = ReceiverStatus {
            receiver_unix_ms: 10_000,
            points: 2,
            vms: vec![VmStatus {
                vm: "vm1".into(),
                points: 2,
                last_point_id: "p2".into(),
                last_created_unix_ms: 8_500,
            }],
            keep_last: 3,
            recent: vec![CheckpointRecord {
                point_id: "p2".into(),
                bytes_received: 4096,
                chunks_received: 1,
                chunks_offered: 9,
                pause_us: Some(1500),
                ..CheckpointRecord::default()
            }],
            checkpoints_committed: 1,
            ..ReceiverStatus::default()
        };
        let text = status_text("host:1", &status);
        assert!(text.contains("RPO 1.5 s"), "{text}");
        assert!(text.contains("4096 bytes, 1 of 9 chunks"), "{text}");
        assert!(text.contains("guest pause 1.50 ms"), "{text}");
        assert_eq!(rpo_ms(&status), Some(1500));
        assert_eq!(rpo_ms(&ReceiverStatus::default()), None);
    }

    #[test]
    fn serve_json_names_the_address_and_repository() {
        let v = serve_json("127.0.0.1:7070", Path::new("/srv/dr"), 3, true, 10);
        assert_eq!(v["listening"], "127.0.0.1:7070");
        assert_eq!(v["repo"], "/srv/dr");
        assert_eq!(v["checkpoints"], 3);
        assert_eq!(v["encrypted"], true);
        assert!(!v.to_string().contains('\n'));
    }
}

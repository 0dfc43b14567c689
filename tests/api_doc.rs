//! The control API against its document: every path, method and status in docs/api.yaml is
//! caused on a running VM, and nothing else is answered; `GET /metrics` parses as the
//! Prometheus text format and its snapshot counters move when snapshots are taken; a disk
//! guest's request and byte counters move as it writes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use arkvm_tests::{
    api_json, api_request, one_at_a_time, require_kvm, start_memory_guest, tiny_guest,
    wait_for_path, ScratchDir, Vmm,
};

/// (path, method, status) of every documented answer (the `default` entries aside).
fn documented() -> BTreeSet<(String, String, u16)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.yaml"))
        .expect("read docs/api.yaml");
    let (mut path, mut method) = (String::new(), String::new());
    let mut out = BTreeSet::new();
    let mut in_paths = false;
    for line in doc.lines() {
        if line == "paths:" {
            in_paths = true;
            continue;
        }
        if in_paths && !line.starts_with(' ') && !line.is_empty() {
            break;
        }
        if let Some(p) = line.strip_prefix("  /").and_then(|p| p.strip_suffix(':')) {
            path = format!("/{p}");
        } else if let Some(m) = line
            .strip_prefix("    ")
            .and_then(|m| m.strip_suffix(':'))
            .filter(|m| ["get", "put", "delete", "post"].contains(m))
        {
            method = m.to_uppercase();
        } else if let Some(rest) = line.strip_prefix("        \"") {
            let code: u16 = rest[..3].parse().expect("status code");
            out.insert((path.clone(), method.clone(), code));
        }
    }
    out
}

/// Parses the Prometheus text format strictly enough to catch malformed output: returns
/// `name{labels}` → value.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut typed = BTreeSet::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let (kw, name, tail) = (words.next(), words.next(), words.next());
            assert!(
                matches!(kw, Some("HELP") | Some("TYPE")),
                "bad comment {line:?}"
            );
            let name = name.unwrap_or_else(|| panic!("no name in {line:?}"));
            assert!(valid_name(name), "bad metric name in {line:?}");
            if kw == Some("TYPE") {
                assert!(
                    matches!(tail, Some("counter") | Some("gauge")),
                    "bad type in {line:?}"
                );
                assert!(typed.insert(name.to_string()), "TYPE twice: {line:?}");
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(valid_name(name), "bad name in {line:?}");
        assert!(typed.contains(name), "sample before its TYPE: {line:?}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("bad labels in {line:?}"));
            for pair in inner.split(',') {
                let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line:?}"));
                assert!(valid_name(k), "bad label name in {line:?}");
                assert!(
                    v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                    "{line:?}"
                );
            }
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "twice: {line:?}"
        );
    }
    samples
}

fn metrics(sock: &Path) -> BTreeMap<String, f64> {
    let (code, text) = api_request(sock, "GET", "/metrics", None);
    assert_eq!(code, 200, "{text}");
    parse_prometheus(&text)
}

fn wait_not_running(sock: &Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, st) = api_json(sock, "GET", "/snapshot", None);
        if st["state"] != "running" {
            return st;
        }
        assert!(Instant::now() < deadline, "snapshot never ended: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_documented_status_is_answered_and_metrics_move() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("api-doc");
    let sock = dir.path().join("vm.sock");
    // 2 GiB of which the guest writes 64 MiB: a snapshot has 2 GiB to go through, long
    // enough to be asked for a second one and cancelled.
    let vm = start_memory_guest(&sock, "2G", 1, "arkvm.region_mb=64");
    vm.wait_pass(0, 2, Duration::from_secs(180))
        .unwrap_or_else(|| panic!("guest does not run\n{}", vm.dump()));
    let key = dir.path().join("dr.key");
    std::fs::write(&key, "ab".repeat(32)).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    let before = metrics(&sock);
    assert!(
        before
            .get("arkvm_vcpu_exits_total{kind=\"io_out\"}")
            .is_some_and(|n| *n > 0.0),
        "{before:?}"
    );
    let mut seen: BTreeSet<(String, String, u16)> = BTreeSet::new();
    let mut call = |method: &str, path: &str, body: Option<String>, want: u16| {
        let (code, text) = api_request(&sock, method, path, body.as_deref().map(str::as_bytes));
        assert_eq!(code, want, "{method} {path}: {text}");
        seen.insert((path.to_string(), method.to_string(), code));
        text
    };
    let root: serde_json::Value = serde_json::from_str(&call("GET", "/", None, 200)).unwrap();
    assert_eq!(root["name"], "arkvm");
    assert_eq!(root["state"], "running");
    assert!(!root["version"].as_str().unwrap().is_empty());
    call("GET", "/metrics", None, 200);
    call("GET", "/vm", None, 200);
    call("GET", "/snapshot", None, 404);
    call("DELETE", "/snapshot", None, 409);
    call("PUT", "/vm/resume", None, 409);
    call("PUT", "/vm/pause", None, 204);
    call("PUT", "/vm/pause", None, 409);
    call("PUT", "/vm/resume", None, 204);
    call("PUT", "/snapshot", Some("{}".into()), 400);
    call(
        "PUT",
        "/snapshot",
        Some(format!(
            "{{\"out\": \"/x\", \"pad\": \"{}\"}}",
            "a".repeat(70_000)
        )),
        413,
    );
    let first = dir.path().join("first");
    call(
        "PUT",
        "/snapshot",
        Some(format!("{{\"out\": \"{}\"}}", first.display())),
        202,
    );
    call(
        "PUT",
        "/snapshot",
        Some(format!("{{\"out\": \"{}/second\"}}", dir.path().display())),
        409,
    );
    call("GET", "/snapshot", None, 200);
    call("DELETE", "/snapshot", None, 204);
    assert_eq!(wait_not_running(&sock)["state"], "cancelled");
    let done = dir.path().join("done");
    call(
        "PUT",
        "/snapshot",
        Some(format!(
            "{{\"out\": \"{}\", \"mode\": \"paused\"}}",
            done.display()
        )),
        202,
    );
    let fin = wait_not_running(&sock);
    assert_eq!(fin["state"], "done", "{fin}");
    let dr = |target: &str| {
        format!(
            "{{\"target\": \"{target}\", \"interval_ms\": 60000, \"key\": \"{}\"}}",
            key.display()
        )
    };
    call("PUT", "/dr", Some(dr("nowhere")), 400);
    call("PUT", "/dr", Some(dr("127.0.0.1:9")), 202);
    call("PUT", "/dr", Some(dr("127.0.0.1:9")), 409);
    call("GET", "/dr", None, 200);
    let stop = call("DELETE", "/dr", None, 204);
    assert!(stop.is_empty(), "204 with a body: {stop}");
    call("DELETE", "/dr", None, 409);

    // The snapshot counters moved: two started, one cancelled, one done.
    let after = metrics(&sock);
    let delta =
        |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    assert_eq!(delta("arkvm_snapshots_started_total"), 2.0, "{after:?}");
    assert_eq!(
        delta("arkvm_snapshots_total{result=\"done\"}"),
        1.0,
        "{after:?}"
    );
    assert_eq!(
        delta("arkvm_snapshots_total{result=\"cancelled\"}"),
        1.0,
        "{after:?}"
    );
    assert!(
        delta("arkvm_snapshot_bytes_written_total") > 0.0,
        "{after:?}"
    );
    assert!(delta("arkvm_snapshot_pause_us_total") > 0.0, "{after:?}");
    assert!(
        delta("arkvm_vcpu_exits_total{kind=\"io_out\"}") > 0.0,
        "{after:?}"
    );
    assert!(after.contains_key("arkvm_dr_lag_ms"), "{after:?}");

    call("PUT", "/vm/shutdown", None, 204);
    let documented = documented();
    assert!(
        documented.len() > 20,
        "the parser found too little: {documented:?}"
    );
    let missing: Vec<_> = documented.difference(&seen).collect();
    let undocumented: Vec<_> = seen.difference(&documented).collect();
    assert!(missing.is_empty(), "documented but not caused: {missing:?}");
    assert!(
        undocumented.is_empty(),
        "answered but not documented: {undocumented:?}"
    );
}

#[test]
fn disk_byte_counters_move_as_the_guest_writes() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("api-doc-disk");
    let sock = dir.path().join("vm.sock");
    let img = dir.path().join("d.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(4 << 20))
        .expect("disk file");
    let kernel = tiny_guest("disk");
    // The numbered guest reads 512 bytes of each 4 KiB block, then writes the whole block, in
    // a ring over the disk, for ever.
    let mut vm = Vmm::spawn(&[
        "run",
        "--kernel",
        kernel.to_str().expect("utf-8"),
        "--memory",
        "64M",
        "--disk",
        &format!("{},id=data", img.display()),
        "--api-socket",
        sock.to_str().expect("utf-8"),
        "--cmdline",
        "arkvm.mode=numbered",
    ]);
    assert!(
        wait_for_path(&sock, Duration::from_secs(60)),
        "no socket\n{}",
        vm.dump()
    );
    let gen_line = |from: usize| {
        vm.wait_line_from(from, Duration::from_secs(120), |l| {
            l.starts_with("DISKGEN ")
        })
        .unwrap_or_else(|| panic!("no DISKGEN line\n{}", vm.dump()))
        .0
    };
    let first = gen_line(0);
    let before = metrics(&sock);
    gen_line(first + 1);
    let after = metrics(&sock);
    let get = |m: &BTreeMap<String, f64>, k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("no {k} in /metrics: {m:?}"))
    };
    let written = "arkvm_disk_bytes_total{disk=\"data\",direction=\"write\"}";
    let read = "arkvm_disk_bytes_total{disk=\"data\",direction=\"read\"}";
    let ok = "arkvm_disk_requests_total{disk=\"data\",status=\"ok\"}";
    // Writes are whole 4 KiB blocks; at least one block went by between the two lines.
    let wrote = get(&after, written) - get(&before, written);
    assert!(wrote >= 4096.0 && wrote % 4096.0 == 0.0, "wrote {wrote}");
    assert!(get(&after, read) - get(&before, read) >= 512.0, "{after:?}");
    assert!(get(&after, ok) > get(&before, ok), "{after:?}");
    // Every completed request moved 512 (a read) or 4096 (a write) bytes, or none (an id or
    // a flush): the bytes cannot outrun the requests.
    assert!(
        get(&after, written) + get(&after, read) <= 4096.0 * get(&after, ok),
        "{after:?}"
    );
    let (code, text) = api_request(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204, "{text}");
    assert!(
        vm.wait_exit(Duration::from_secs(60)).is_some(),
        "the VM did not stop\n{}",
        vm.dump()
    );
}

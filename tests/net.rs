//! virtio-net on a tap: the net guest echoes thousands of frames from a raw socket on its tap
//! (in a network namespace of the test's own), keeps its heartbeat counter across live
//! snapshots restored in a new process, survives hostile descriptor chains, and bad `--net`
//! taps are refused at start with one clear error.

#[path = "net_support.rs"]
mod net_support;

use std::time::Duration;

use arkvm_tests::{
    api_json, cli_snapshot, one_at_a_time, require_kvm, tiny_guest, wait_for_path, ScratchDir,
};
use net_support::{echo, next_heartbeat, wait_ready, NetNs};

fn s(p: &std::path::Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

#[test]
fn echoes_thousands_of_frames_intact() {
    require_kvm();
    let _one = one_at_a_time();
    let ns = NetNs::new(1);
    let dir = ScratchDir::new("net-echo");
    let sock = dir.path().join("api.sock");
    let (vmm, mac) = ns.start_guest(0, &sock, "arkvm.hb_ms=50", &[]);
    let raw = ns.socket(0);
    let h0 = next_heartbeat(&raw, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no heartbeat\n{}", vmm.dump()));
    let n = 5000;
    let run = echo(&raw, mac, 0, n, 32, Duration::from_secs(240));
    assert_eq!(
        run.replies,
        n,
        "not every request was answered: {run:?}\n{}",
        vmm.dump()
    );
    assert_eq!(run.broken, 0, "replies arrived damaged: {run:?}");
    assert_eq!(run.max_count, n, "the guest's answered count: {run:?}");
    let h1 = next_heartbeat(&raw, Duration::from_secs(30)).expect("heartbeat after the echo run");
    assert!(
        h1 > h0,
        "the heartbeat counter did not advance: {h0} then {h1}"
    );
    let (code, v) = api_json(&sock, "GET", "/vm", None);
    assert_eq!(code, 200);
    let net = &v["net"][0];
    assert_eq!(net["id"], "net0", "{v}");
    assert_eq!(net["tap"], ns.taps[0].as_str(), "{v}");
    assert!(net["rx_frames"].as_u64().unwrap_or(0) >= n, "{v}");
    assert!(net["tx_frames"].as_u64().unwrap_or(0) >= n, "{v}");
    assert!(net["rx_bytes"].as_u64().unwrap_or(0) > n * 60, "{v}");
    assert_eq!(net["device_errors"], 0, "{v}");
    // `arkvm status` shows the same counters.
    let (st, out, _) = arkvm_tests::run_to_end(
        &["status", "--api-socket", &s(&sock)],
        Duration::from_secs(30),
    );
    assert!(st.success());
    assert!(
        out.iter()
            .any(|l| l.starts_with("net:") && l.contains(&ns.taps[0])),
        "{out:?}"
    );
}

#[test]
fn bad_taps_are_refused_at_start() {
    require_kvm();
    let ns = NetNs::new(1);
    let dir = ScratchDir::new("net-bad");
    let kernel = s(&tiny_guest("net"));
    let run = |tap: &str| {
        let args: Vec<String> = [
            "run",
            "--kernel",
            &kernel,
            "--memory",
            "64M",
            "--net",
            &format!("tap={tap}"),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        let mut vmm = ns.spawn(&args);
        let st = vmm.wait_exit(Duration::from_secs(60)).expect("arkvm exits");
        (st, vmm.stderr())
    };
    for (tap, want) in [("nosuchtap0", "does not exist"), ("lo", "is not a tap")] {
        let (st, err) = run(tap);
        assert_eq!(st.code(), Some(1), "{tap}: {err:?}");
        let errors: Vec<_> = err.iter().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "one error line for {tap}: {err:?}");
        assert!(
            errors[0].contains(want) && errors[0].contains(tap),
            "{tap}: {err:?}"
        );
    }
    // Busy: a running VM holds the tap.
    let sock = dir.path().join("api.sock");
    let (_vmm, _) = ns.start_guest(0, &sock, "", &[]);
    let (st, err) = run(&ns.taps[0]);
    assert_eq!(st.code(), Some(1), "{err:?}");
    assert!(err.iter().any(|l| l.contains("is busy")), "{err:?}");
}

/// Live snapshot with `strategy`, restore in a new process (on the second tap when
/// `other_tap`): echo works again and the heartbeat counter continues.
fn snapshot_and_restore(strategy: &str, other_tap: bool) {
    require_kvm();
    let _one = one_at_a_time();
    let ns = NetNs::new(2);
    let dir = ScratchDir::new(&format!("net-snap-{strategy}"));
    let sock = dir.path().join("api.sock");
    let (mut vmm, mac) = ns.start_guest(0, &sock, "arkvm.hb_ms=50", &[]);
    let raw = ns.socket(0);
    let first = echo(&raw, mac, 0, 300, 16, Duration::from_secs(120));
    assert_eq!(first.replies, 300, "{first:?}\n{}", vmm.dump());
    let before = next_heartbeat(&raw, Duration::from_secs(30)).expect("heartbeat before");
    let snap = dir.path().join("snap");
    cli_snapshot(&sock, &snap, &["--strategy", strategy]);
    let after = next_heartbeat(&raw, Duration::from_secs(30)).expect("heartbeat after");
    vmm.kill();
    // The state carries the device.
    let state = arkvm_tests::read_snapshot_state(&snap);
    let text = state.to_string();
    assert!(
        text.contains("\"kind\":\"net\""),
        "no net device in the saved state"
    );
    let sock2 = dir.path().join("api2.sock");
    let tap = if other_tap { 1 } else { 0 };
    let mut args = vec![
        "restore".to_string(),
        "--from".into(),
        s(&snap),
        "--api-socket".into(),
        s(&sock2),
    ];
    if other_tap {
        args.push("--net".into());
        args.push(format!("id=net0,tap={}", ns.taps[1]));
    }
    let restored = ns.spawn(&args);
    assert!(
        wait_for_path(&sock2, Duration::from_secs(60)),
        "no socket\n{}",
        restored.dump()
    );
    let raw2 = ns.socket(tap);
    let h = next_heartbeat(&raw2, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no heartbeat after restore\n{}", restored.dump()));
    assert!(
        h > before && h <= after + 2,
        "heartbeat {h} after restore: the snapshot was taken between {before} and {after}"
    );
    let second = echo(&raw2, mac, 1000, 300, 16, Duration::from_secs(120));
    assert_eq!(second.replies, 300, "{second:?}\n{}", restored.dump());
    assert_eq!(second.broken, 0);
    assert!(
        second.min_count > 300,
        "the answered count restarted: {second:?}"
    );
    let (_, v) = api_json(&sock2, "GET", "/vm", None);
    assert_eq!(v["net"][0]["tap"], ns.taps[tap].as_str(), "{v}");
    assert_eq!(
        wait_ready_count(&restored),
        0,
        "the restored guest re-initialised its driver"
    );
}

fn wait_ready_count(vmm: &arkvm_tests::Vmm) -> usize {
    vmm.stdout()
        .iter()
        .filter(|l| l.contains("NETGUEST READY"))
        .count()
}

#[test]
fn cow_snapshot_restores_with_the_device() {
    snapshot_and_restore("cow", false);
}

#[test]
fn precopy_snapshot_restores_onto_another_tap() {
    snapshot_and_restore("precopy", true);
}

#[test]
fn hostile_descriptors_mark_the_device_for_reset() {
    require_kvm();
    let _one = one_at_a_time();
    let ns = NetNs::new(1);
    let dir = ScratchDir::new("net-hostile");
    let sock = dir.path().join("api.sock");
    let mut args: Vec<String> = [
        "run",
        "--kernel",
        &s(&tiny_guest("net")),
        "--memory",
        "64M",
        "--api-socket",
        &s(&sock),
        "--cmdline",
        "arkvm.mode=hostile",
        "--net",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    args.push(format!("tap={}", ns.taps[0]));
    let mut vmm = ns.spawn(&args);
    assert!(
        wait_for_path(&sock, Duration::from_secs(30)),
        "{}",
        vmm.dump()
    );
    let raw = ns.socket(0);
    // The RX cases need frames: send one every few milliseconds until the guest is done.
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let mut done = None;
    while std::time::Instant::now() < deadline {
        raw.send_request([0x52, 0x54, 0, 0, 0, 1], 1);
        if let Some((_, l)) =
            vmm.wait_line_from(0, Duration::from_millis(20), |l| l.contains("HOSTILE DONE"))
        {
            done = Some(l);
            break;
        }
        assert!(!vmm.has_exited(), "arkvm stopped\n{}", vmm.dump());
    }
    let done = done.unwrap_or_else(|| panic!("the hostile run did not finish\n{}", vmm.dump()));
    let out = vmm.stdout();
    for l in out
        .iter()
        .filter(|l| l.starts_with("HOSTILE ") && !l.contains("DONE"))
    {
        assert!(
            l.ends_with("needs_reset=1"),
            "a broken chain went unnoticed: {l}\n{}",
            vmm.dump()
        );
    }
    assert!(done.contains("detected=9/9"), "{done}");
    let (_, v) = api_json(&sock, "GET", "/vm", None);
    assert!(
        v["net"][0]["device_errors"].as_u64().unwrap_or(0) >= 9,
        "{v}"
    );
    // The guest then resets the device and echoes normally.
    let mac = wait_ready(&vmm, 0);
    let run = echo(&raw, mac, 0, 200, 16, Duration::from_secs(120));
    assert_eq!(run.replies, 200, "{run:?}\n{}", vmm.dump());
    let (_, v) = api_json(&sock, "GET", "/vm", None);
    assert!(v["net"][0]["error"].is_null(), "{v}");
}

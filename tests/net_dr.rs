//! DR output commit, shown both ways. The net guest counts the requests it answered and puts
//! the count in every reply. The primary runs with checkpoints every 100 ms to a receiver
//! (`arkvm dr serve`), while a client on the tap keeps sending requests; the primary is killed
//! at a random moment and `arkvm dr recover` resumes the newest committed checkpoint, whose
//! answered count the recovered guest reports in its heartbeat.
//!
//! With `--dr-output-commit` the recovered count is always at least the highest count any
//! client received (asserted). Without it, clients see counts the recovered guest does not
//! have (recorded, printed). Trials per mode: `ARKVM_NET_DR_TRIALS` (default 4; the long run
//! is `ARKVM_NET_DR_TRIALS=20`).

#[path = "net_support.rs"]
mod net_support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arkvm_tests::{api_json, one_at_a_time, require_kvm, tiny_guest, wait_for_path, ScratchDir};
use net_support::{Frame, NetNs, RawSock};

fn s(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

fn write_key(p: &Path) {
    std::fs::write(p, format!("{}\n", "5a".repeat(32))).expect("key file");
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("key mode");
}

fn trials() -> u64 {
    std::env::var("ARKVM_NET_DR_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

/// A small xorshift generator seeded from the clock (the seed is printed).
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        eprintln!("net_dr seed {seed}");
        Self(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One trial; returns (highest count a client received, count the recovered guest has).
fn trial(
    ns: &NetNs,
    dir: &Path,
    key: &Path,
    output_commit: bool,
    kill_after_ms: u64,
    n: u64,
) -> (u64, u64) {
    let repo = dir.join(format!("dr-{n}"));
    let recv = ns.spawn(&[
        "dr".into(),
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--repo".into(),
        s(&repo),
        "--key".into(),
        s(key),
    ]);
    let line = recv
        .wait_line("dr: listening on", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("receiver\n{}", recv.dump()));
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .expect("address")
        .to_string();
    let sock = dir.join(format!("p{n}.sock"));
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        s(&tiny_guest("net")),
        "--memory".into(),
        "64M".into(),
        "--cmdline".into(),
        "arkvm.hb_ms=20".into(),
        "--name".into(),
        "netvm".into(),
        "--api-socket".into(),
        s(&sock),
        "--net".into(),
        format!("tap={},id=net0", ns.taps[0]),
        "--dr-target".into(),
        addr,
        "--dr-interval".into(),
        "100ms".into(),
        "--key".into(),
        s(key),
        "--dr-staging".into(),
        s(&dir.join(format!("staging-{n}"))),
    ];
    if output_commit {
        args.push("--dr-output-commit".into());
    }
    let mut primary = ns.spawn(&args);
    assert!(
        wait_for_path(&sock, Duration::from_secs(30)),
        "{}",
        primary.dump()
    );
    let mac = net_support::wait_ready(&primary, 0);
    // A first checkpoint, so that there is something to recover.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = api_json(&sock, "GET", "/dr", None);
        if v["checkpoints_committed"].as_u64().unwrap_or(0) >= 1 {
            assert_eq!(v["output_commit"], output_commit, "{v}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint committed: {v}\n{}",
            primary.dump()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The client: requests in a window of 8, the highest count any reply carried.
    let raw = Arc::new(ns.socket(0));
    let stop = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicU64::new(0));
    let client = {
        let (raw, stop, max_seen) = (raw.clone(), stop.clone(), max_seen.clone());
        std::thread::spawn(move || client_loop(&raw, mac, &stop, &max_seen))
    };
    std::thread::sleep(Duration::from_millis(kill_after_ms));
    // The output-commit counters: frames went through the held queue only with it on.
    let (_, vm) = api_json(&sock, "GET", "/vm", None);
    primary.kill();
    let net = &vm["net"][0];
    let gated =
        net["held_frames"].as_u64().unwrap_or(0) + net["released_frames"].as_u64().unwrap_or(0);
    assert!(net["tx_frames"].as_u64().unwrap_or(0) > 0, "{vm}");
    if output_commit {
        assert!(gated > 0, "no frame was held: {vm}");
    } else {
        assert_eq!(gated, 0, "frames were held without output commit: {vm}");
    }
    // Let frames already on their way arrive, then stop the client.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    client.join().expect("client thread");
    let client_max = max_seen.load(Ordering::SeqCst);
    // Recover the newest committed checkpoint onto the same tap (the primary is gone).
    let rsock = dir.join(format!("r{n}.sock"));
    let recovered = ns.spawn(&[
        "dr".into(),
        "recover".into(),
        "--repo".into(),
        s(&repo),
        "--key".into(),
        s(key),
        "--api-socket".into(),
        s(&rsock),
        "--work-dir".into(),
        s(&dir.join(format!("work-{n}"))),
        "--net".into(),
        format!("id=net0,tap={}", ns.taps[0]),
    ]);
    assert!(
        wait_for_path(&rsock, Duration::from_secs(120)),
        "recovery did not start\n{}",
        recovered.dump()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let recovered_count = loop {
        if let Some(Frame::Heartbeat { answered, .. }) = raw.recv() {
            break answered;
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeat from the recovered guest\n{}",
            recovered.dump()
        );
    };
    drop(recovered);
    drop(recv);
    (client_max, recovered_count)
}

fn client_loop(raw: &RawSock, mac: [u8; 6], stop: &AtomicBool, max_seen: &AtomicU64) {
    let mut seq = 0u64;
    let mut outstanding = 0u64;
    let mut last_send = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if outstanding < 8 || last_send.elapsed() > Duration::from_millis(500) {
            raw.send_request(mac, seq);
            seq += 1;
            outstanding += 1;
            last_send = Instant::now();
        }
        if let Some(Frame::Reply { count, intact, .. }) = raw.recv() {
            assert!(intact, "a damaged reply");
            outstanding = outstanding.saturating_sub(1);
            max_seen.fetch_max(count, Ordering::SeqCst);
        }
    }
}

fn campaign(output_commit: bool) -> Vec<(u64, u64)> {
    require_kvm();
    let _one = one_at_a_time();
    let ns = NetNs::new(1);
    let dir = ScratchDir::new(if output_commit {
        "net-dr-commit"
    } else {
        "net-dr-plain"
    });
    let key = dir.path().join("key");
    write_key(&key);
    let mut rng = Rng::new();
    (0..trials())
        .map(|n| {
            let kill_after = 300 + rng.below(1200);
            let r = trial(&ns, dir.path(), &key, output_commit, kill_after, n);
            eprintln!("output_commit={output_commit} trial {n}: killed after {kill_after} ms, client saw {} , recovered guest has {}", r.0, r.1);
            r
        })
        .collect()
}

#[test]
fn output_commit_never_shows_clients_a_forgotten_state() {
    let results = campaign(true);
    assert!(
        results.iter().any(|r| r.0 > 0),
        "no client ever got a reply: {results:?}"
    );
    for (i, (client, recovered)) in results.iter().enumerate() {
        assert!(
            recovered >= client,
            "trial {i}: a client saw count {client}, the recovered guest has only {recovered}"
        );
    }
}

#[test]
fn without_output_commit_clients_see_counts_the_recovered_guest_lacks() {
    let results = campaign(false);
    assert!(
        results.iter().any(|r| r.0 > 0),
        "no client ever got a reply: {results:?}"
    );
    let ahead = results.iter().filter(|(c, r)| c > r).count();
    // Recorded, not asserted: this is the gap output commit closes.
    eprintln!(
        "without output commit: in {ahead} of {} trials clients saw counts the recovered guest lacks: {results:?}",
        results.len()
    );
}

//! Whole-VM DR acceptance tests: a protected guest (`arkvm run --dr-target`) and a receiver
//! (`arkvm dr serve`), on loopback or in two network namespaces joined by a veth pair; the
//! primary is killed, throttled, cut off or given the wrong key, and `arkvm dr recover`
//! resumes what the receiver committed.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use arkvm_tests::{
    api_json, arkvm_bin, broken_line, one_at_a_time, require_kvm, tiny_guest, wait_for_path,
    ScratchDir, Vmm,
};

const INTERVAL_MS: u64 = 1000;

fn path(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

fn write_key(p: &Path, byte: u8) {
    std::fs::write(p, format!("{}\n", format!("{byte:02x}").repeat(32))).expect("key file");
    // arkvm refuses key files that group or others can read.
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("key file mode");
}

/// Runs `ip ARGS`, panicking if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// Two network namespaces joined by a veth pair: the primary's side `a` (192.0.2.1) and the
/// receiver's side `b` (192.0.2.2), in TEST-NET-1. Both are deleted on drop.
struct NetPair {
    a: String,
    b: String,
    veth_a: String,
}

impl NetPair {
    const ADDR_A: &'static str = "192.0.2.1";
    const ADDR_B: &'static str = "192.0.2.2";

    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{n}", std::process::id());
        let pair = Self {
            a: format!("drvm-a-{id}"),
            b: format!("drvm-b-{id}"),
            veth_a: format!("drva{id}"),
        };
        let veth_b = format!("drvb{id}");
        // The guard exists before anything is created, so a failure below still cleans up.
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        ip(&[
            "link",
            "add",
            &pair.veth_a,
            "type",
            "veth",
            "peer",
            "name",
            &veth_b,
        ]);
        ip(&["link", "set", &pair.veth_a, "netns", &pair.a]);
        ip(&["link", "set", &veth_b, "netns", &pair.b]);
        for (ns, dev, addr) in [
            (&pair.a, &pair.veth_a, Self::ADDR_A),
            (&pair.b, &veth_b, Self::ADDR_B),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// Brings the primary's end of the link down or up.
    fn link(&self, up: bool) {
        ip(&[
            "-n",
            &self.a,
            "link",
            "set",
            &self.veth_a,
            if up { "up" } else { "down" },
        ]);
    }

    /// Shrinks the primary namespace's TCP send buffers to 4 KiB (for connections made later).
    fn small_send_buffers(&self) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.a, "sysctl", "-w"])
            .arg("net.ipv4.tcp_wmem=4096 4096 4096")
            .output()
            .expect("run sysctl");
        assert!(out.status.success(), "sysctl: {out:?}");
    }

    /// Limits what the primary sends to `rate` (tc syntax, e.g. `100kbit`), or lifts the limit.
    fn throttle(&self, rate: Option<&str>) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.a, "tc", "qdisc"]);
        match rate {
            Some(r) => cmd.args([
                "replace",
                "dev",
                &self.veth_a,
                "root",
                "tbf",
                "rate",
                r,
                "burst",
                "16kbit",
                "latency",
                "2s",
            ]),
            None => cmd.args(["del", "dev", &self.veth_a, "root"]),
        };
        let out = cmd.output().expect("run tc");
        assert!(out.status.success(), "tc {rate:?}: {out:?}");
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and with it the pair.
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `arkvm ARGS` to the end, in namespace `ns` if given.
fn arkvm_in(ns: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(arkvm_bin());
            c
        }
        None => Command::new(arkvm_bin()),
    };
    cmd.args(args).output().expect("run arkvm")
}

/// Spawns `arkvm ARGS`, in namespace `ns` if given.
fn spawn_in(ns: Option<&str>, args: &[String]) -> Vmm {
    match ns {
        Some(ns) => {
            let mut full = vec!["netns".to_string(), "exec".into(), ns.into()];
            full.push(path(&arkvm_bin()));
            full.extend(args.iter().cloned());
            Vmm::spawn_program(Path::new("ip"), &full)
        }
        None => Vmm::spawn(args),
    }
}

/// A running `arkvm dr serve`.
struct Receiver {
    vmm: Vmm,
    addr: String,
    ns: Option<String>,
    repo: PathBuf,
    key: PathBuf,
}

impl Receiver {
    fn start(repo: &Path, key: &Path, ns: Option<&str>, host: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "dr".to_string(),
            "serve".into(),
            "--listen".into(),
            format!("{host}:0"),
            "--repo".into(),
            path(repo),
            "--key".into(),
            path(key),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let vmm = spawn_in(ns, &args);
        let line = vmm
            .wait_line("dr: listening on", Duration::from_secs(60))
            .unwrap_or_else(|| panic!("the receiver did not start:\n{}", vmm.dump()));
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .expect("address in the listening line")
            .to_string();
        Self {
            vmm,
            addr,
            ns: ns.map(str::to_string),
            repo: repo.to_path_buf(),
            key: key.to_path_buf(),
        }
    }

    /// `arkvm dr status --json`, asked from the receiver's own namespace.
    fn status(&self) -> serde_json::Value {
        let out = arkvm_in(
            self.ns.as_deref(),
            &[
                "dr",
                "status",
                "--target",
                &self.addr,
                "--key",
                &path(&self.key),
                "--json",
            ],
        );
        assert!(
            out.status.success(),
            "dr status failed: {out:?}\n{}",
            self.vmm.dump()
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The point files committed in the repository.
    fn point_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.repo.join("points"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Starts `arkvm dr recover` of this repository's newest complete point.
    fn recover(&self, sock: &Path, extra: &[String]) -> Vmm {
        let mut args = vec![
            "dr".to_string(),
            "recover".into(),
            "--repo".into(),
            path(&self.repo),
            "--key".into(),
            path(&self.key),
            "--api-socket".into(),
            path(sock),
        ];
        args.extend(extra.iter().cloned());
        Vmm::spawn(&args)
    }
}

/// Starts `arkvm run` with continuous protection to `addr` every [`INTERVAL_MS`], its control
/// socket at `TMP/primary.sock`, in namespace `ns` if given. `guest` is the guest's name,
/// memory size and command line, then any further `run` options.
fn start_primary(tmp: &Path, ns: Option<&str>, addr: &str, key: &Path, guest: &[&str]) -> Vmm {
    let sock = tmp.join("primary.sock");
    let mut args = vec![
        "run".to_string(),
        "--kernel".into(),
        path(&tiny_guest(guest[0])),
        "--memory".into(),
        guest[1].into(),
        "--cmdline".into(),
        guest[2].into(),
        "--name".into(),
        "vm1".into(),
        "--api-socket".into(),
        path(&sock),
        "--dr-target".into(),
        addr.into(),
        "--dr-interval".into(),
        format!("{INTERVAL_MS}ms"),
        "--key".into(),
        path(key),
        "--dr-staging".into(),
        path(&tmp.join("staging")),
    ];
    args.extend(guest[3..].iter().map(|s| s.to_string()));
    let vmm = spawn_in(ns, &args);
    assert!(
        wait_for_path(&sock, Duration::from_secs(30)),
        "no control socket\n{}",
        vmm.dump()
    );
    vmm
}

/// Waits until the primary has committed `n` checkpoints; returns its status.
fn wait_committed(sock: &Path, n: u64, primary: &Vmm) -> serde_json::Value {
    let mut s = dr_status(sock);
    let ok = wait_until(Duration::from_secs(90), || {
        s = dr_status(sock);
        u(&s, "checkpoints_committed") >= n
    });
    assert!(
        ok,
        "{n} checkpoints did not arrive: {s}\n{}",
        primary.dump()
    );
    s
}

/// `GET /dr` on the primary's control socket.
fn dr_status(sock: &Path) -> serde_json::Value {
    let (code, v) = api_json(sock, "GET", "/dr", None);
    assert_eq!(code, 200, "GET /dr: {v}");
    v
}

fn u(v: &serde_json::Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or(0)
}

/// Polls `check` every 100 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Checks a recovered memory guest: its first GEN, then `more` increasing lines, never torn.
/// Returns the first GEN.
fn check_recovered(rec: &Vmm, more: usize) -> u64 {
    let (mut idx, first) = rec
        .wait_pass(0, 0, Duration::from_secs(120))
        .unwrap_or_else(|| panic!("the recovered guest prints nothing\n{}", rec.dump()));
    let mut last = first;
    for _ in 0..more {
        let (i, g) = rec
            .wait_pass(idx + 1, 0, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("the recovered guest stopped\n{}", rec.dump()));
        assert!(g > last, "GEN went back: {last} then {g}\n{}", rec.dump());
        (idx, last) = (i, g);
    }
    if let Some(l) = broken_line(&rec.stdout(), 0) {
        panic!("the recovered guest broke: {l}\n{}", rec.dump());
    }
    first
}

/// The id named by `dr: recovering checkpoint ID`.
fn recovered_id(rec: &Vmm) -> String {
    let line = rec
        .wait_line("dr: recovering checkpoint", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("recover did not start\n{}", rec.dump()));
    line.split("checkpoint ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("an id")
        .to_string()
}

/// Kills the primary with SIGKILL and returns its last printed GEN once its output drained.
fn kill_primary(primary: &mut Vmm) -> u64 {
    primary.kill();
    std::thread::sleep(Duration::from_millis(300));
    primary.last_gen()
}

#[test]
fn continuous_protection_survives_kill_9_within_two_intervals() {
    require_kvm();
    let _one = one_at_a_time();
    let tmp = ScratchDir::new("drvm-cont");
    let key = tmp.path().join("dr.key");
    write_key(&key, 0x31);
    let rx = Receiver::start(
        &tmp.path().join("dr"),
        &key,
        None,
        "127.0.0.1",
        &["--keep", "5"],
    );
    let sock = tmp.path().join("primary.sock");
    let mut primary = start_primary(
        tmp.path(),
        None,
        &rx.addr,
        &key,
        &["memory", "256M", "console=ttyS0"],
    );
    primary
        .wait_pass(0, 1, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the primary guest does not run\n{}", primary.dump()));
    let first = (Instant::now(), primary.last_gen());
    // 25 s of protection (the issue says 30; 25 keeps this file's run time in budget and
    // still spans 25 intervals).
    let run = Duration::from_secs(25);
    let mut max_rpo = 0;
    while first.0.elapsed() < run {
        std::thread::sleep(Duration::from_millis(250));
        let s = dr_status(&sock);
        if u(&s, "checkpoints_committed") >= 2 {
            max_rpo = max_rpo.max(u(&s, "rpo_ms"));
        }
    }
    let before_kill = dr_status(&sock);
    let last = (Instant::now(), primary.last_gen());
    let died_at = kill_primary(&mut primary);
    // The guest's GEN rate while protected.
    let rate = (last.1 - first.1) as f64 / last.0.duration_since(first.0).as_secs_f64();
    let committed = u(&before_kill, "checkpoints_committed");
    eprintln!(
        "continuous: {committed} checkpoints in {run:?}, max rpo {max_rpo} ms, GEN rate \
         {rate:.0}/s, died at GEN {died_at}, status {before_kill}"
    );
    assert!(
        committed >= 10,
        "only {committed} checkpoints committed in {run:?} at a 1 s interval: {before_kill}"
    );
    assert_eq!(u(&before_kill, "checkpoints_failed"), 0, "{before_kill}");

    let newest = rx.status()["vms"][0]["last_point_id"]
        .as_str()
        .expect("a committed checkpoint")
        .to_string();
    let rec = rx.recover(&tmp.path().join("rec.sock"), &[]);
    assert_eq!(recovered_id(&rec), newest);
    let resumed = check_recovered(&rec, 10);
    assert!(
        resumed <= died_at + 1,
        "recovered at GEN {resumed}, after the primary's last GEN {died_at}"
    );
    let lag = died_at.saturating_sub(resumed);
    let lag_ms = lag as f64 / rate * 1000.0;
    eprintln!("continuous: recovered at GEN {resumed}: {lag} GENs = {lag_ms:.0} ms behind");
    // Two intervals of progress, plus one print interval of the guest (16 GENs at 256 MiB).
    let allowed = (2.0 * rate * INTERVAL_MS as f64 / 1000.0) as u64 + 16;
    assert!(
        lag <= allowed,
        "recovered {lag} GENs ({lag_ms:.0} ms at {rate:.0} GEN/s) behind the primary's last \
         GEN {died_at}; two intervals allow {allowed}"
    );
}

#[test]
fn a_primary_killed_mid_transfer_is_recovered_from_the_previous_checkpoint() {
    require_kvm();
    let _one = one_at_a_time();
    let net = NetPair::new();
    let tmp = ScratchDir::new("drvm-mid");
    let key = tmp.path().join("dr.key");
    write_key(&key, 0x32);
    let rx = Receiver::start(
        &tmp.path().join("dr"),
        &key,
        Some(&net.b),
        NetPair::ADDR_B,
        &["--keep", "0"],
    );
    let sock = tmp.path().join("primary.sock");
    let mut primary = start_primary(
        tmp.path(),
        Some(&net.a),
        &rx.addr,
        &key,
        &["memory", "256M", "console=ttyS0"],
    );
    wait_committed(&sock, 2, &primary);
    // Every checkpoint of this guest changes all its memory (about 40 KB compressed and
    // deduplicated): at 16 kbit/s one takes about 20 s to send. With 4 KiB socket buffers on
    // the primary's side, most of it is still in the primary when it dies, not in the kernel
    // (which would deliver it all after the kill). Wait until one has been on the wire for
    // three intervals, then kill the primary.
    net.small_send_buffers();
    net.throttle(Some("16kbit"));
    let throttled = dr_status(&sock);
    assert!(
        wait_until(Duration::from_secs(30), || u(
            &dr_status(&sock),
            "intervals_skipped"
        ) >= u(
            &throttled,
            "intervals_skipped"
        ) + 3),
        "the throttled link skipped no intervals: {}",
        dr_status(&sock)
    );
    let at_kill = dr_status(&sock);
    let died_at = kill_primary(&mut primary);
    // Let what the dead primary left in its socket drain, so the receiver sees the cut.
    net.throttle(None);
    assert!(
        wait_until(Duration::from_secs(90), || u(
            &rx.status(),
            "checkpoints_discarded"
        ) >= 1),
        "the receiver never saw a checkpoint cut off: {}\n{}",
        rx.status(),
        rx.vmm.dump()
    );
    let status = rx.status();
    eprintln!("mid-transfer: primary {at_kill}\nreceiver {status}");
    let committed = u(&status, "checkpoints_committed");
    assert_eq!(
        status["points"].as_u64(),
        Some(committed),
        "every committed checkpoint is a point, and no other: {status}"
    );
    assert!(committed >= 2, "{status}");
    // Only whole points: the repository verifies, and lists as many points as were committed.
    assert_eq!(
        rx.point_files().len() as u64,
        committed,
        "{:?}",
        rx.point_files()
    );
    let out = arkvm_in(
        None,
        &[
            "backup",
            "verify",
            "--repo",
            &path(&rx.repo),
            "--key",
            &path(&key),
        ],
    );
    assert!(out.status.success(), "verify: {out:?}");
    let newest = status["vms"][0]["last_point_id"]
        .as_str()
        .expect("a point")
        .to_string();
    let rec = rx.recover(&tmp.path().join("rec.sock"), &[]);
    assert_eq!(recovered_id(&rec), newest);
    let resumed = check_recovered(&rec, 10);
    assert!(
        resumed <= died_at,
        "resumed at {resumed}, died at {died_at}"
    );
}

#[test]
fn a_link_cut_for_5s_grows_the_lag_and_checkpoints_resume() {
    require_kvm();
    let _one = one_at_a_time();
    let net = NetPair::new();
    let tmp = ScratchDir::new("drvm-cut");
    let key = tmp.path().join("dr.key");
    write_key(&key, 0x33);
    let rx = Receiver::start(
        &tmp.path().join("dr"),
        &key,
        Some(&net.b),
        NetPair::ADDR_B,
        &["--keep", "3"],
    );
    let sock = tmp.path().join("primary.sock");
    let primary = start_primary(
        tmp.path(),
        Some(&net.a),
        &rx.addr,
        &key,
        &["memory", "256M", "console=ttyS0"],
    );
    wait_committed(&sock, 3, &primary);
    // The lag in steady state.
    let mut steady = 0;
    for _ in 0..20 {
        steady = steady.max(u(&dr_status(&sock), "rpo_ms"));
        std::thread::sleep(Duration::from_millis(150));
    }
    let before = dr_status(&sock);
    net.link(false);
    let cut_at = Instant::now();
    let mut during = Vec::new();
    while cut_at.elapsed() < Duration::from_secs(5) {
        during.push(dr_status(&sock));
        std::thread::sleep(Duration::from_millis(250));
    }
    net.link(true);
    let up_at = Instant::now();
    let end = during.last().expect("samples").clone();
    let max_rpo = during.iter().map(|s| u(s, "rpo_ms")).max().unwrap_or(0);
    let showed_trouble = during
        .iter()
        .any(|s| s["state"] == "retrying" || !s["last_error"].is_null())
        || u(&end, "checkpoints_failed") > u(&before, "checkpoints_failed")
        || u(&end, "intervals_skipped") > u(&before, "intervals_skipped");
    // Recovery: a checkpoint taken after the link came back is committed, and the lag is back
    // near the interval.
    let mut after = dr_status(&sock);
    let recovered = wait_until(Duration::from_secs(40), || {
        after = dr_status(&sock);
        let taken = after["last_checkpoint"]["taken_at_unix_ms"]
            .as_u64()
            .unwrap_or(0);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64;
        let up_ms = now_ms - up_at.elapsed().as_millis() as u64;
        taken >= up_ms && u(&after, "rpo_ms") <= steady.max(INTERVAL_MS) + 1000
    });
    eprintln!(
        "link cut: steady rpo {steady} ms, max during the cut {max_rpo} ms, back to {} ms \
         {:.1} s after the link came up\nbefore {before}\nend of cut {end}\nafter {after}",
        u(&after, "rpo_ms"),
        up_at.elapsed().as_secs_f64()
    );
    // Nothing can commit while the link is down, so the lag reaches the cut's length (less
    // the last sample's slack) whatever it was when the cut began.
    assert!(
        max_rpo >= 4500 && max_rpo > steady,
        "the lag did not grow during the 5 s cut: steady {steady} ms, max {max_rpo} ms"
    );
    assert!(
        showed_trouble,
        "status showed nothing wrong during the cut: {end}"
    );
    assert!(
        recovered,
        "checkpoints did not resume with the lag near the interval: {after}\n{}",
        primary.dump()
    );
    assert_eq!(after["state"], "running", "{after}");
    assert!(rx.status()["points"].as_u64().unwrap_or(0) >= 3);
}

#[test]
fn a_receiver_with_another_key_rejects_the_sender() {
    require_kvm();
    let _one = one_at_a_time();
    let tmp = ScratchDir::new("drvm-key");
    let key = tmp.path().join("dr.key");
    let other = tmp.path().join("other.key");
    write_key(&key, 0x34);
    write_key(&other, 0x35);
    let rx = Receiver::start(&tmp.path().join("dr"), &other, None, "127.0.0.1", &[]);
    let sock = tmp.path().join("primary.sock");
    let primary = start_primary(
        tmp.path(),
        None,
        &rx.addr,
        &key,
        &["memory", "64M", "console=ttyS0"],
    );
    let mut s = dr_status(&sock);
    assert!(
        wait_until(Duration::from_secs(60), || {
            s = dr_status(&sock);
            u(&s, "checkpoints_failed") >= 3
        }),
        "the sender did not fail: {s}\n{}",
        primary.dump()
    );
    eprintln!("wrong key: {s}");
    assert_eq!(u(&s, "checkpoints_committed"), 0, "{s}");
    assert!(s["last_checkpoint"].is_null(), "{s}");
    assert_eq!(s["state"], "retrying", "{s}");
    let err = s["last_error"].as_str().unwrap_or("");
    assert!(err.contains("authentication"), "last_error: {err:?}");
    let status = rx.status();
    assert_eq!(status["points"], 0, "{status}");
    assert_eq!(status["checkpoints_committed"], 0, "{status}");
    assert!(rx.point_files().is_empty(), "{:?}", rx.point_files());
    let chunks = std::fs::read_dir(rx.repo.join("chunks"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(chunks, 0, "a sender without the key stored chunks");
}

/// A TCP relay from a local port to `to` that flips one byte of the primary's stream at
/// offset `flip_at` of the first connection only.
fn corrupting_relay(to: String, flip_at: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let addr = listener.local_addr().expect("relay address").to_string();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(client) = conn else { continue };
            let Ok(server) = TcpStream::connect(&to) else {
                continue;
            };
            let flip = (n == 0).then_some(flip_at);
            let (c2, s2) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            std::thread::spawn(move || pipe(c2, s2, flip));
            std::thread::spawn(move || pipe(server, client, None));
        }
    });
    addr
}

fn pipe(mut from: TcpStream, mut to: TcpStream, mut flip: Option<usize>) {
    let mut buf = [0u8; 16384];
    let mut offset = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(at) = flip {
            if at >= offset && at < offset + n {
                buf[at - offset] ^= 0x40;
                flip = None;
            }
        }
        offset += n;
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[test]
fn a_corrupted_frame_discards_the_checkpoint_and_the_next_one_commits() {
    require_kvm();
    let _one = one_at_a_time();
    let tmp = ScratchDir::new("drvm-flip");
    let key = tmp.path().join("dr.key");
    write_key(&key, 0x36);
    let rx = Receiver::start(&tmp.path().join("dr"), &key, None, "127.0.0.1", &[]);
    // Past the 104-byte handshake, inside the first checkpoint's frames.
    let relay = corrupting_relay(rx.addr.clone(), 3000);
    let sock = tmp.path().join("primary.sock");
    let primary = start_primary(
        tmp.path(),
        None,
        &relay,
        &key,
        &["memory", "64M", "console=ttyS0"],
    );
    // A checkpoint committed after the corrupted one.
    let s = wait_committed(&sock, 2, &primary);
    let status = rx.status();
    eprintln!("corrupted frame: primary {s}\nreceiver {status}");
    assert_eq!(status["checkpoints_discarded"], 1, "{status}");
    assert!(
        !status["last_discard"].is_null(),
        "the receiver says why it discarded: {status}"
    );
    assert!(u(&s, "checkpoints_failed") >= 1, "{s}");
    assert_eq!(
        rx.point_files().len() as u64,
        u(&status, "checkpoints_committed"),
        "{:?}",
        rx.point_files()
    );
}

#[test]
fn a_disk_guest_is_recovered_with_memory_and_disk_agreeing() {
    require_kvm();
    let _one = one_at_a_time();
    let tmp = ScratchDir::new("drvm-disk");
    let key = tmp.path().join("dr.key");
    write_key(&key, 0x37);
    let disk = tmp.path().join("disk0.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .expect("create the disk");
    let rx = Receiver::start(
        &tmp.path().join("dr"),
        &key,
        None,
        "127.0.0.1",
        &["--keep", "3"],
    );
    let sock = tmp.path().join("primary.sock");
    let mut primary = start_primary(
        tmp.path(),
        None,
        &rx.addr,
        &key,
        &[
            "disk",
            "128M",
            "console=ttyS0 arkvm.mode=numbered arkvm.blocks=1024",
            "--disk",
            &path(&disk),
        ],
    );
    let diskgen = |l: &str| -> Option<u64> {
        let mut w = l.split_whitespace();
        (w.next()? == "DISKGEN").then_some(())?;
        w.next()?.parse().ok()
    };
    let last_diskgen = |v: &Vmm| v.stdout().iter().rev().find_map(|l| diskgen(l));
    let mut s = dr_status(&sock);
    assert!(
        wait_until(Duration::from_secs(90), || {
            s = dr_status(&sock);
            u(&s, "checkpoints_committed") >= 5 && last_diskgen(&primary).is_some_and(|g| g >= 3)
        }),
        "no checkpoints or no disk progress: {s}\n{}",
        primary.dump()
    );
    primary.kill();
    std::thread::sleep(Duration::from_millis(300));
    let died_at = last_diskgen(&primary).expect("DISKGEN lines");
    if let Some(l) = broken_line(&primary.stdout(), 0) {
        panic!("the primary broke: {l}\n{}", primary.dump());
    }
    let disk_dir = tmp.path().join("recovered-disks");
    let rec = rx.recover(
        &tmp.path().join("rec.sock"),
        &["--disk-dir".to_string(), path(&disk_dir)],
    );
    recovered_id(&rec);
    let first = rec
        .wait_line_from(0, Duration::from_secs(120), |l| diskgen(l).is_some())
        .and_then(|(_, l)| diskgen(&l))
        .unwrap_or_else(|| panic!("the recovered disk guest prints nothing\n{}", rec.dump()));
    // Two more generations: a disk missing a write, or holding one the memory does not
    // know, is found within one.
    let more = rec.wait_line_from(0, Duration::from_secs(120), |l| {
        diskgen(l).is_some_and(|g| g >= first + 2)
    });
    eprintln!("disk: primary died at DISKGEN {died_at}, recovered from {first}; {s}");
    if let Some(l) = broken_line(&rec.stdout(), 0) {
        panic!("the recovered guest broke: {l}\n{}", rec.dump());
    }
    assert!(
        more.is_some(),
        "the recovered guest stopped\n{}",
        rec.dump()
    );
    assert!(
        first > 1 && first <= died_at + 1,
        "recovered at DISKGEN {first}, the primary died at {died_at}"
    );
    assert!(
        std::fs::read_dir(&disk_dir).expect("disk dir").count() >= 1,
        "no disk was restored into --disk-dir"
    );
}

/// The default staging repository (`$ARKVM_CACHE/dr-staging/NAME-PID`) is removed when the VM
/// exits, and one whose process is gone is removed when protection starts.
#[test]
fn default_staging_repositories_go_away_with_their_vm() {
    require_kvm();
    let _one = one_at_a_time();
    let tmp = ScratchDir::new("drvm-staging");
    let key = tmp.path().join("dr.key");
    write_key(&key, 0x35);
    let rx = Receiver::start(&tmp.path().join("dr"), &key, None, "127.0.0.1", &[]);
    let cache = tmp.path().join("cache");
    let staging_dir = cache.join("dr-staging");
    // A repository left by a process that is gone, and one of a live process (this one).
    let mut gone = Command::new("true").spawn().expect("spawn true");
    let gone_pid = gone.id();
    gone.wait().expect("wait true");
    let stale = staging_dir.join(format!("vm1-{gone_pid}"));
    let alive = staging_dir.join(format!("vm1-{}", std::process::id()));
    for d in [&stale, &alive] {
        std::fs::create_dir_all(d.join("points")).expect("stale staging");
    }
    let sock = tmp.path().join("primary.sock");
    let env_cache = format!("ARKVM_CACHE={}", path(&cache));
    let mut primary = Vmm::spawn_program(
        Path::new("env"),
        &[
            env_cache,
            path(&arkvm_bin()),
            "run".into(),
            "--kernel".into(),
            path(&tiny_guest("memory")),
            "--memory".into(),
            "64M".into(),
            "--name".into(),
            "vm1".into(),
            "--api-socket".into(),
            path(&sock),
            "--dr-target".into(),
            rx.addr.clone(),
            "--dr-interval".into(),
            format!("{INTERVAL_MS}ms"),
            "--key".into(),
            path(&key),
        ],
    );
    assert!(
        wait_for_path(&sock, Duration::from_secs(30)),
        "no control socket\n{}",
        primary.dump()
    );
    wait_committed(&sock, 1, &primary);
    // `env` executes arkvm in place: the staging repository carries this pid.
    let own = staging_dir.join(format!("vm1-{}", primary.pid()));
    assert!(own.is_dir(), "no staging repository {}", own.display());
    assert!(
        !stale.exists(),
        "the stale staging repository is still there"
    );
    assert!(
        alive.exists(),
        "a live process's staging repository was removed"
    );
    let (code, v) = api_json(&sock, "PUT", "/vm/shutdown", None);
    assert!(code < 300, "shutdown: {v}");
    let st = primary
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the primary did not exit\n{}", primary.dump()));
    assert!(st.success(), "{st:?}\n{}", primary.dump());
    assert!(
        !own.exists(),
        "the staging repository outlived its VM\n{}",
        primary.dump()
    );
}

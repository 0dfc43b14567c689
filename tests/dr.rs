//! Whole-command DR tests: `arkvm dr serve` as a child process on 127.0.0.1, points sent with
//! `arkvm dr send`, read back with `arkvm dr status` and exported with `arkvm dr recover`.
//! One whole-VM test kills a protected memory guest and recovers it on the receiver.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use arkvm_tests::{arkvm_bin, require_kvm, tiny_guest, ScratchDir, Vmm};
use snapshot::chunk::CHUNK_SIZE;
use snapshot::repo::{chunk_object_name, RepoKey, Repository};
use snapshot::PartKind;

fn arkvm(args: &[&str]) -> Output {
    Command::new(arkvm_bin())
        .args(args)
        .output()
        .expect("run arkvm")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write_key(path: &Path, byte: u8) {
    std::fs::write(path, format!("{}\n", format!("{byte:02x}").repeat(32))).expect("key file");
    // arkvm refuses key files that group or others can read.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("key file mode");
}

/// Memory of `seeds.len()` MiB, chunk `i` derived from `seeds[i]` (incompressible).
fn memory(seeds: &[u32]) -> Vec<u8> {
    let mut mem = vec![0u8; seeds.len() * CHUNK_SIZE];
    for (chunk, seed) in mem.chunks_mut(CHUNK_SIZE).zip(seeds) {
        let mut x = u64::from(*seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    mem
}

/// Stores a point of `vm` with `mem` as its memory; returns its id.
fn make_point(repo: &Repository, vm: &str, mem: &[u8]) -> String {
    let mut backup = repo.start_backup(vm, None).expect("start backup");
    let object = backup
        .add_object("memory", PartKind::Memory, mem.len() as u64)
        .expect("add memory");
    for (i, chunk) in mem.chunks(CHUNK_SIZE).enumerate() {
        object.put_chunk(i as u64, chunk).expect("put chunk");
    }
    backup.finish_object(object).expect("finish memory");
    backup.commit().expect("commit").id
}

/// Starts `arkvm dr serve` on an ephemeral port; returns the process and its address.
fn serve(repo: &Path, key: &Path, extra: &[&str]) -> (Vmm, String) {
    let mut args = vec![
        "dr",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--repo",
        repo.to_str().expect("utf-8 path"),
        "--key",
        key.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    let server = Vmm::spawn(&args);
    let line = server
        .wait_line("dr: listening on", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the receiver did not start:\n{}", server.dump()));
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .expect("address in the listening line")
        .to_string();
    (server, addr)
}

fn status_json(addr: &str, key: &Path) -> serde_json::Value {
    let out = arkvm(&[
        "dr",
        "status",
        "--target",
        addr,
        "--key",
        key.to_str().expect("utf-8 path"),
        "--json",
    ]);
    assert!(out.status.success(), "status failed: {out:?}");
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

fn send(repo: &Path, id: &str, addr: &str, key: &Path) -> Output {
    arkvm(&[
        "dr",
        "send",
        "--repo",
        repo.to_str().expect("utf-8 path"),
        "--id",
        id,
        "--target",
        addr,
        "--key",
        key.to_str().expect("utf-8 path"),
        "--json",
    ])
}

#[test]
fn serve_send_status_restart_and_recover() {
    let tmp = ScratchDir::new("dr-cli");
    let key = tmp.path().join("dr.key");
    write_key(&key, 0x5a);
    let src_path = tmp.path().join("primary");
    let dst_path = tmp.path().join("dr");
    // Encrypted with the link key, as the VMM's checkpoint staging repository is; the receiver
    // creates its repository encrypted too.
    let repo_key = RepoKey::load(&key).expect("load key");
    let src = Repository::init(&src_path, Some(repo_key.clone())).expect("init source");
    let mem1 = memory(&[1, 2, 3, 4]);
    let p1 = make_point(&src, "vm1", &mem1);
    let p2 = make_point(&src, "vm1", &memory(&[1, 2, 3, 40]));

    let (mut server, addr) = serve(&dst_path, &key, &["--keep", "5"]);
    let out = send(&src_path, &p1, &addr, &key);
    assert!(out.status.success(), "{out:?}\n{}", server.dump());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
    assert_eq!(report["chunks_sent"], 4);
    let out = send(&src_path, &p2, &addr, &key);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
    assert_eq!(report["chunks_sent"], 1, "only the changed chunk travels");
    assert_eq!(report["chunks_skipped"], 3);

    let status = status_json(&addr, &key);
    assert_eq!(status["points"], 2);
    assert_eq!(status["vms"][0]["last_point_id"], p2.as_str());
    assert_eq!(status["checkpoints_committed"], 2);
    assert_eq!(status["encrypted"], true);
    assert!(status["rpo_ms"].as_u64().is_some(), "{status}");

    // A point of an unencrypted repository cannot go into an encrypted one; the error says why.
    let plain_path = tmp.path().join("plain");
    let plain = Repository::init(&plain_path, None).expect("init plain source");
    let plain_point = make_point(&plain, "vm2", &memory(&[7]));
    let out = send(&plain_path, &plain_point, &addr, &key);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--no-encrypt-at-rest"), "{err}");
    assert_eq!(status_json(&addr, &key)["checkpoints_discarded"], 1);

    // A receiver that restarts (even killed) keeps its committed checkpoints.
    server.kill();
    let (_server, addr) = serve(&dst_path, &key, &["--keep", "5"]);
    let status = status_json(&addr, &key);
    assert_eq!(status["points"], 2);
    assert_eq!(status["checkpoints_committed"], 0);

    // Recovery picks the newest complete checkpoint; damage it and the older one is used.
    let work = tmp.path().join("work");
    let recover = || {
        arkvm(&[
            "dr",
            "recover",
            "--repo",
            dst_path.to_str().expect("utf-8 path"),
            "--key",
            key.to_str().expect("utf-8 path"),
            "--work-dir",
            work.to_str().expect("utf-8 path"),
            "--export-only",
        ])
    };
    let out = recover();
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains(&p2), "{}", stdout(&out));
    assert!(work.join(&p2).join("manifest.json").exists());
    let dst = Repository::open(&dst_path, Some(repo_key)).expect("open receiver repository");
    let newest_only = dst.read_point(&p2).expect("p2").objects[0].chunks[3];
    std::fs::write(dst_path.join(chunk_object_name(&newest_only)), b"Pdamaged")
        .expect("damage a chunk");
    let out = recover();
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains(&p1), "{}", stdout(&out));
    let exported = work.join(&p1);
    assert_eq!(
        std::fs::read(exported.join("memory")).expect("exported memory"),
        mem1
    );
}

#[test]
fn strangers_and_wrong_keys_get_nothing() {
    let tmp = ScratchDir::new("dr-cli-auth");
    let key = tmp.path().join("dr.key");
    let wrong = tmp.path().join("wrong.key");
    write_key(&key, 0x11);
    write_key(&wrong, 0x22);
    let src_path = tmp.path().join("primary");
    let dst_path = tmp.path().join("dr");
    let src = Repository::init(&src_path, None).expect("init source");
    let p1 = make_point(&src, "vm1", &memory(&[9]));
    let (server, addr) = serve(&dst_path, &key, &["--no-encrypt-at-rest"]);

    let out = arkvm(&[
        "dr",
        "status",
        "--target",
        &addr,
        "--key",
        wrong.to_str().expect("utf-8 path"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("authentication failed"), "{err}");
    let out = send(&src_path, &p1, &addr, &wrong);
    assert!(!out.status.success());

    // A stranger speaking something else gets not a byte back.
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(&[0u8; 200]).expect("write");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.is_empty(), "{got:?}");

    let status = status_json(&addr, &key);
    assert_eq!(status["points"], 0, "{status}\n{}", server.dump());
    let dst = Repository::open(&dst_path, None).expect("open receiver repository");
    assert!(dst.point_ids().expect("ids").is_empty());
    assert!(dst.store().list("chunks/").expect("list").is_empty());
}

/// The generation of the last `PASS <n> GEN <g>` line.
fn last_gen(lines: &[String]) -> Option<u64> {
    lines.iter().rev().find_map(|l| {
        let mut words = l.split_whitespace();
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("PASS"), Some(_), Some("GEN"), Some(g)) => g.parse().ok(),
            _ => None,
        }
    })
}

/// Polls `check` every 200 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn a_killed_primary_is_recovered_from_its_last_checkpoint() {
    require_kvm();
    let tmp = ScratchDir::new("dr-vm");
    let key = tmp.path().join("dr.key");
    write_key(&key, 0x77);
    let dst = tmp.path().join("dr");
    let (_server, addr) = serve(&dst, &key, &["--keep", "3"]);
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    let started = std::time::Instant::now();
    let mut primary = Vmm::spawn(&[
        "run".to_string(),
        "--kernel".into(),
        path(&tiny_guest("memory")),
        "--memory".into(),
        "64M".into(),
        "--name".into(),
        "vm1".into(),
        "--dr-target".into(),
        addr.clone(),
        "--dr-interval".into(),
        "1s".into(),
        "--key".into(),
        path(&key),
        "--dr-staging".into(),
        path(&tmp.path().join("staging")),
    ]);
    assert!(
        wait_until(Duration::from_secs(120), || {
            status_json(&addr, &key)["checkpoints_committed"]
                .as_u64()
                .is_some_and(|n| n >= 3)
        }),
        "no checkpoints arrived\n{}",
        primary.dump()
    );
    primary.kill();
    let ran_for = started.elapsed();
    let died_at = last_gen(&primary.stdout()).expect("the primary ran");
    // Pruning runs after each commit's answer: wait for it to settle.
    assert!(wait_until(Duration::from_secs(30), || status_json(
        &addr, &key
    )["vms"][0]["points"]
        == 3));
    let status = status_json(&addr, &key);
    let newest = status["vms"][0]["last_point_id"]
        .as_str()
        .expect("a committed checkpoint")
        .to_string();
    assert_eq!(status["vms"][0]["points"], 3, "{status}");

    let recovered = Vmm::spawn(&[
        "dr".to_string(),
        "recover".into(),
        "--repo".into(),
        path(&dst),
        "--key".into(),
        path(&key),
        "--api-socket".into(),
        path(&tmp.path().join("recovered.sock")),
    ]);
    let line = recovered
        .wait_line("dr: recovering checkpoint", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("recover did not start\n{}", recovered.dump()));
    assert!(line.contains(&newest), "{line}");
    let mut first = None;
    assert!(
        wait_until(Duration::from_secs(120), || {
            let gen = last_gen(&recovered.stdout());
            if first.is_none() {
                first = gen;
            }
            gen.zip(first).is_some_and(|(g, f)| g >= f + 20)
        }),
        "the recovered guest does not run\n{}",
        recovered.dump()
    );
    let first = first.expect("a first generation");
    // The recovered point lies at most two DR intervals (2 s) before the primary's death, so the
    // recovered guest may be behind the primary's last line by at most the generations two
    // seconds of running produce (the primary's average rate, from spawn to kill). It can also be
    // ahead of the last line the harness captured from the primary: that line is only what
    // reached the pipe before the kill, so no upper bound is asserted.
    let gens_per_sec = died_at as f64 / ran_for.as_secs_f64();
    let bound = (2.0 * gens_per_sec).ceil() as u64;
    assert!(
        first + bound >= died_at,
        "recovered at {first}, more than two intervals ({bound} generations) before the primary's last line at {died_at}"
    );
    let lines = recovered.stdout();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("TORN") || l.contains("GUEST FAULT") || l.contains("GUEST PANIC")),
        "{}",
        recovered.dump()
    );
}

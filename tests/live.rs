//! Live snapshots (issue 5): consistency over many snapshot/restore cycles for both strategies,
//! the guest's progress during a copy-on-write snapshot, cancel, `kill -9` mid-snapshot, and a
//! full backup target.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use arkvm_tests::{
    api_json, broken_line, check_restored_memory_guest, one_at_a_time, require_kvm,
    run_to_end_settled, snapshot_memory_guest, start_memory_guest, start_memory_guest_with,
    start_restore, ScratchDir, Vmm,
};

/// `256M` or `2G` in bytes.
fn memory_bytes(text: &str) -> u64 {
    let (number, unit) = text.split_at(text.len() - 1);
    let n: u64 = number.parse().expect("a memory size");
    match unit {
        "G" => n << 30,
        "M" => n << 20,
        _ => panic!("unknown unit in {text}"),
    }
}

/// Runs `cycles` snapshot/restore cycles of the memory guest with `--strategy strategy`: each
/// cycle snapshots the running VM live, kills it, restores the snapshot and checks that the
/// guest continues from inside the snapshot window without TORN; the restored VM is the next
/// cycle's subject. `staging` sizes the cow staging pool of every VM (`--cow-staging`; None:
/// the default).
fn consistency_cycles(strategy: &str, memory: &str, cycles: usize, staging: Option<&str>) {
    require_kvm();
    let _serial = one_at_a_time();
    let t0 = Instant::now();
    let dir = ScratchDir::new(&format!(
        "live-{strategy}-{memory}-{}",
        staging.unwrap_or("default")
    ));
    let run_extra: Vec<&str> = match staging {
        Some(s) => vec!["--cow-staging", s],
        None => vec![],
    };
    let mut sock = dir.path().join("vm0.sock");
    let mut vm = start_memory_guest_with(&sock, memory, 1, "", &run_extra);
    let mut staged_total = 0u64;
    let mut pool_full_total = 0u64;
    let mut prev_snap: Option<PathBuf> = None;
    for cycle in 1..=cycles {
        let snap = dir.path().join(format!("snap{cycle}"));
        let w = snapshot_memory_guest(&vm, &sock, &snap, &["--strategy", strategy]);
        assert_eq!(w.report["mode"], "live", "cycle {cycle}: {}", w.report);
        assert_eq!(
            w.report["strategy"], strategy,
            "cycle {cycle}: {}",
            w.report
        );
        vm.kill();
        // The VM restored from the previous snapshot is gone: its snapshot can go too.
        if let Some(p) = prev_snap.take() {
            let _ = std::fs::remove_dir_all(p);
        }
        sock = dir.path().join(format!("vm{cycle}.sock"));
        vm = start_restore(&snap, &sock, &run_extra);
        let cow = &w.report["cow"];
        if strategy == "cow" {
            let pool = cow["staging_bytes"].as_u64().unwrap_or(u64::MAX);
            match staging {
                Some("0") => assert_eq!(pool, 0, "cycle {cycle}: {}", w.report),
                Some(_) => assert_eq!(pool, 4 << 20, "cycle {cycle}: {}", w.report),
                // auto: the guest's size, unless half of the host's available memory is less
                // (never below the 64 MiB kept between snapshots).
                None => {
                    let guest = memory_bytes(memory);
                    assert!(
                        pool == guest || ((64 << 20)..guest).contains(&pool),
                        "cycle {cycle}: pool {pool} for a guest of {guest}: {}",
                        w.report
                    );
                }
            }
            if staging == Some("0") {
                assert_eq!(cow["bytes_staged"], 0, "staging is off: {}", w.report);
            }
            staged_total += cow["bytes_staged"].as_u64().unwrap_or(0);
            pool_full_total += cow["pool_full"].as_u64().unwrap_or(0);
        }
        let first = check_restored_memory_guest(&vm, &w, 2, Duration::from_secs(40));
        eprintln!(
            "{strategy} {memory} cycle {cycle}: GEN {} < restored {first} <= {}, pause {} us, {} ms, early {} recopied {}, cow {}",
            w.gen_before,
            w.gen_after,
            w.report["pause_us"],
            w.report["total_ms"],
            w.report["pages_copied_early"],
            w.report["pages_recopied"],
            cow
        );
        prev_snap = Some(snap);
    }
    if let Some(l) = broken_line(&vm.stdout(), 0) {
        panic!("last restored guest broke: {l}\n{}", vm.dump());
    }
    eprintln!(
        "{strategy} {memory} staging {staging:?}: {cycles} cycles in {:?}, {staged_total} bytes staged, pool full {pool_full_total} times",
        t0.elapsed()
    );
}

#[test]
fn cow_20_cycles_at_256m_never_torn() {
    consistency_cycles("cow", "256M", 20, None);
}

/// A staging pool of two units: most faults find it full and fall back to waiting, the rest
/// stage; the image is untorn either way.
#[test]
fn cow_20_cycles_at_256m_never_torn_with_a_small_staging_pool() {
    consistency_cycles("cow", "256M", 20, Some("4M"));
}

/// Staging off: every fault copies to the target while the writer waits.
#[test]
fn cow_20_cycles_at_256m_never_torn_without_staging() {
    consistency_cycles("cow", "256M", 20, Some("0"));
}

#[test]
fn cow_5_cycles_at_2g_never_torn() {
    consistency_cycles("cow", "2G", 5, None);
}

#[test]
fn precopy_20_cycles_at_256m_never_torn() {
    consistency_cycles("precopy", "256M", 20, None);
}

#[test]
fn precopy_5_cycles_at_2g_never_torn() {
    consistency_cycles("precopy", "2G", 5, None);
}

/// Polls `GET /snapshot` until its state is no longer `running`; returns the final status and
/// every status seen while it ran.
fn wait_snapshot(sock: &Path, timeout: Duration) -> (serde_json::Value, Vec<serde_json::Value>) {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let (code, st) = api_json(sock, "GET", "/snapshot", None);
        assert_eq!(code, 200, "GET /snapshot: {st}");
        if st["state"] != "running" {
            return (st, seen);
        }
        seen.push(st);
        assert!(
            Instant::now() < deadline,
            "snapshot still running after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_snapshot(sock: &Path, body: &str) -> serde_json::Value {
    let (code, v) = api_json(sock, "PUT", "/snapshot", Some(body));
    assert_eq!(code, 202, "PUT /snapshot {body}: {v}");
    v
}

/// Asserts that `target` does not exist and no temporary of it is left beside it.
fn assert_nothing_partial(target: &Path) {
    assert!(!target.exists(), "{} exists", target.display());
    let name = target
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let parent = target.parent().expect("parent");
    let leftovers: Vec<String> = std::fs::read_dir(parent)
        .expect("read parent")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.tmp-")))
        .collect();
    assert!(leftovers.is_empty(), "partial snapshot left: {leftovers:?}");
}

/// Waits for two fresh PASS lines with rising GEN and checks the VM still says running.
fn assert_guest_runs(vm: &Vmm, sock: &Path, what: &str) {
    let from = vm.line_count();
    let (i, g1) = vm
        .wait_pass(from, 0, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("{what}: guest makes no progress\n{}", vm.dump()));
    let (_, g2) = vm
        .wait_pass(i + 1, 0, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("{what}: guest makes no progress\n{}", vm.dump()));
    assert!(g2 > g1, "{what}: GEN {g1} then {g2}");
    let (code, info) = api_json(sock, "GET", "/vm", None);
    assert_eq!(
        (code, info["state"].as_str()),
        (200, Some("running")),
        "{what}: {info}"
    );
    if let Some(l) = broken_line(&vm.stdout(), 0) {
        panic!("{what}: guest broke: {l}\n{}", vm.dump());
    }
}

#[test]
fn guest_keeps_running_during_a_cow_snapshot() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("live-progress");
    let sock = dir.path().join("vm.sock");
    // 2 GiB, 512 MiB of it rewritten all the time (a smaller region boots faster here).
    let vm = start_memory_guest(&sock, "2G", 1, "arkvm.region_mb=512");
    vm.wait_pass(0, 2, Duration::from_secs(180))
        .unwrap_or_else(|| panic!("guest does not run\n{}", vm.dump()));
    let snap = dir.path().join("snap");
    let gen_at_request = vm.last_gen();
    let lines_at_request = vm.line_count();
    let t = Instant::now();
    start_snapshot(&sock, &format!("{{\"out\": \"{}\"}}", snap.display()));
    let (fin, seen) = wait_snapshot(&sock, Duration::from_secs(120));
    let elapsed = t.elapsed();
    let lines_at_done = vm.line_count();
    assert_eq!(fin["state"], "done", "{fin}");
    assert_eq!(fin["mode"], "live", "{fin}");
    assert_eq!(fin["strategy"], "cow", "{fin}");
    let during: Vec<u64> = vm.stdout()[lines_at_request..lines_at_done]
        .iter()
        .filter_map(|l| arkvm_tests::parse_pass(l).map(|(_, g)| g))
        .collect();
    eprintln!(
        "cow snapshot of 2 GiB: {elapsed:?}, pause {} us, {} pages copied early, {} progress polls; \
         GEN {gen_at_request} at the request, PASS lines during the copy: {during:?}",
        fin["pause_us"],
        fin["pages_copied_early"],
        seen.len()
    );
    assert!(
        during.len() >= 2 && during.iter().all(|&g| g > gen_at_request),
        "the guest made no progress during the copy ({elapsed:?}): {during:?}"
    );
    // Progress was reported while it ran.
    assert!(
        seen.iter().any(|s| {
            let w = s["bytes_written"].as_u64().unwrap_or(0);
            let t = s["bytes_total"].as_u64().unwrap_or(0);
            w < t
        }),
        "no partial progress seen: {seen:?}"
    );
    let pause = fin["pause_us"].as_u64().expect("pause_us");
    assert!(
        (pause as u128) < elapsed.as_micros() / 2,
        "the vCPUs were paused for {pause} us of {elapsed:?}"
    );
    assert_guest_runs(&vm, &sock, "after the snapshot");
}

/// Starts a live snapshot of a 2 GiB guest and waits until it is copying.
fn start_long_snapshot(sock: &Path, target: &Path, strategy: &str) {
    start_snapshot(
        sock,
        &format!(
            "{{\"out\": \"{}\", \"strategy\": \"{strategy}\"}}",
            target.display()
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, st) = api_json(sock, "GET", "/snapshot", None);
        assert_eq!(st["state"], "running", "the snapshot is not running: {st}");
        if st["bytes_written"].as_u64().unwrap_or(0) > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the snapshot writes nothing: {st}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn cancel_mid_snapshot(strategy: &str) {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new(&format!("live-cancel-{strategy}"));
    let sock = dir.path().join("vm.sock");
    let vm = start_memory_guest(&sock, "2G", 1, "arkvm.region_mb=64");
    vm.wait_pass(0, 2, Duration::from_secs(180))
        .unwrap_or_else(|| panic!("guest does not run\n{}", vm.dump()));
    let snap = dir.path().join("snap");
    start_long_snapshot(&sock, &snap, strategy);
    let (code, body) = api_json(&sock, "DELETE", "/snapshot", None);
    assert_eq!(code, 204, "DELETE /snapshot: {body}");
    let (fin, _) = wait_snapshot(&sock, Duration::from_secs(30));
    assert_eq!(fin["state"], "cancelled", "{fin}");
    assert_nothing_partial(&snap);
    assert_guest_runs(&vm, &sock, "after the cancel");
    // A second cancel has nothing to cancel.
    let (code, body) = api_json(&sock, "DELETE", "/snapshot", None);
    assert_eq!(code, 409, "{body}");
    // And a new snapshot to the same target works.
    start_snapshot(&sock, &format!("{{\"out\": \"{}\"}}", snap.display()));
    let (fin, _) = wait_snapshot(&sock, Duration::from_secs(120));
    assert_eq!(fin["state"], "done", "{fin}");
    assert!(snap.join("manifest.json").exists());
}

#[test]
fn cancel_mid_cow_snapshot_leaves_nothing_and_guest_runs() {
    cancel_mid_snapshot("cow");
}

#[test]
fn cancel_mid_precopy_snapshot_leaves_nothing_and_guest_runs() {
    cancel_mid_snapshot("precopy");
}

#[test]
fn kill_9_mid_snapshot_leaves_no_dir() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("live-kill");
    for strategy in ["cow", "precopy"] {
        let sock = dir.path().join(format!("vm-{strategy}.sock"));
        let mut vm = start_memory_guest(&sock, "2G", 1, "arkvm.region_mb=64");
        vm.wait_pass(0, 2, Duration::from_secs(180))
            .unwrap_or_else(|| panic!("guest does not run\n{}", vm.dump()));
        let snap = dir.path().join(format!("snap-{strategy}"));
        start_long_snapshot(&sock, &snap, strategy);
        vm.kill();
        assert!(
            !snap.exists(),
            "{strategy}: {} exists after kill -9",
            snap.display()
        );
        // Restoring from the target is refused: there is nothing there.
        let (status, _, err) = run_to_end_settled(
            &["restore", "--from", snap.to_str().expect("utf-8")],
            Duration::from_secs(20),
        );
        assert!(
            !status.success(),
            "{strategy}: restore from nothing succeeded"
        );
        assert_eq!(err.len(), 1, "{strategy}: {err:?}");
    }
}

/// A small tmpfs mounted for one test, unmounted on drop.
struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    fn mount(at: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&at).expect("mkdir mount point");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "mount tmpfs at {} failed (root is needed)",
            at.display()
        );
        Self(at)
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn full_target(extra: &[&str], what: &str) {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new(&format!("live-full-{what}"));
    let fs = SmallTmpfs::mount(dir.path().join("small"), "64m");
    let sock = dir.path().join("vm.sock");
    // 256 MiB, all written by the guest: it cannot fit into 64 MiB.
    let vm = start_memory_guest(&sock, "256M", 1, "");
    vm.wait_pass(0, 16, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("guest does not run\n{}", vm.dump()));
    let snap = fs.0.join("snap");
    let mut args = vec![
        "snapshot".to_string(),
        "--api-socket".into(),
        sock.display().to_string(),
        "--out".into(),
        snap.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let (status, out, err) = run_to_end_settled(&args, Duration::from_secs(120));
    assert!(
        !status.success(),
        "{what}: snapshot into a full tmpfs succeeded: {out:?}"
    );
    let text = err.join("\n");
    assert!(!text.contains("panicked"), "{what}: {text}");
    assert_eq!(err.len(), 1, "{what}: expected a one-line error: {err:?}");
    assert!(
        text.contains("space") || text.contains("ENOSPC") || text.contains("os error 28"),
        "{what}: the error does not say the target is full: {text}"
    );
    // Said as a failed snapshot on a full filesystem, not as a protocol error.
    assert!(
        text.contains("failed: no space left on the filesystem of") && !text.contains("malformed"),
        "{what}: {text}"
    );
    let (code, st) = api_json(&sock, "GET", "/snapshot", None);
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["state"], "failed", "{what}: {st}");
    assert!(st["error"].is_string(), "{what}: {st}");
    assert_nothing_partial(&snap);
    let used: Vec<_> = std::fs::read_dir(&fs.0)
        .expect("read tmpfs")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(used.is_empty(), "{what}: the tmpfs still holds {used:?}");
    assert_guest_runs(&vm, &sock, what);
}

#[test]
fn full_target_fails_cleanly_cow() {
    full_target(&["--strategy", "cow"], "cow");
}

#[test]
fn full_target_fails_cleanly_paused() {
    full_target(&["--paused"], "paused");
}

#[test]
fn full_target_fails_cleanly_precopy() {
    full_target(&["--strategy", "precopy"], "precopy");
}

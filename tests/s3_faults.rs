//! Faults and concurrency of S3 repositories (a module of tests/s3.rs): radosgw killed in the
//! middle of a backup, and two VMs backing up into one bucket while prune runs.

use std::time::{Duration, Instant};

use arkvm_tests::{require_kvm, ScratchDir, Vmm};

use super::s3::*;
use super::support::*;

#[test]
fn radosgw_killed_mid_backup_fails_cleanly_and_the_next_backup_succeeds() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("s3-kill");
    let repo = fresh_repo("kill");
    init_repo(&repo, None);
    let sock = dir.path().join("vm.sock");
    let mut vm = memory_vm("512M", "killed", &sock, 1);
    wait_parsed(&vm, 0, pass_gen);

    let mut snap = Vmm::spawn(&snapshot_args(&sock, &repo, None));
    let deadline = Instant::now() + Duration::from_secs(120);
    // radosgw dies once the first chunk objects are in (a 512 MiB backup uploads 512 chunks).
    while chunk_objects(&repo).is_empty() {
        assert!(
            Instant::now() < deadline && !snap.has_exited(),
            "the backup uploaded no chunks\n{}",
            snap.dump()
        );
    }
    let rgw = ceph_pid("rgw");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &rgw.to_string()])
        .status()
        .expect("kill radosgw");
    assert!(killed.success());
    let restarted = RestartRgw;

    let st = snap
        .wait_exit(CMD_TIMEOUT)
        .unwrap_or_else(|| panic!("the backup hung without radosgw\n{}", snap.dump()));
    assert!(
        !st.success(),
        "the backup succeeded without radosgw\n{}",
        snap.dump()
    );
    let err = snap.stderr();
    let last = err.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("arkvm: error:") && last.contains("cannot reach the object store"),
        "unclear error: {err:?}"
    );
    // The VM runs on.
    let from = vm.stdout().len();
    let (i, _) = wait_parsed(&vm, from, pass_gen);
    wait_parsed(&vm, i + 1, pass_gen);
    assert_not_broken(&vm);

    drop(restarted);
    let uploaded = chunk_objects(&repo).len();
    assert!(
        (1..512).contains(&uploaded),
        "radosgw was not killed mid-backup: {uploaded} chunk objects"
    );
    assert!(list(&repo, None).is_empty(), "a partial point is listed");
    let report = backup(&sock, &repo, None);
    let id = report["id"].as_str().unwrap().to_string();
    vm.kill();
    let rows = list(&repo, None);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["id"], id.as_str());
    assert_clean(&repo, None, 1);
}

/// Restarts radosgw when dropped, so a failing test leaves the cluster usable.
struct RestartRgw;

impl Drop for RestartRgw {
    fn drop(&mut self) {
        restart_rgw();
    }
}

#[test]
fn two_vms_back_up_into_one_bucket_while_prune_runs() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("s3-two");
    let repo = fresh_repo("two");
    init_repo(&repo, None);
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut va = memory_vm("64M", "vma", &sa, 1);
    let mut vb = memory_vm("64M", "vmb", &sb, 1);
    wait_parsed(&va, 0, pass_gen);
    wait_parsed(&vb, 0, pass_gen);
    let prune = args(&["backup", "prune", "--repo", &s(&repo), "--keep-last", "2"]);
    for round in 0..5 {
        let results = run_together(vec![
            snapshot_args(&sa, &repo, None),
            snapshot_args(&sb, &repo, None),
            prune.clone(),
        ]);
        for (k, (ok, _, dump)) in results.iter().enumerate() {
            assert!(ok, "round {round}, command {k} failed\n{dump}");
        }
    }
    va.kill();
    vb.kill();
    let rows = list(&repo, None);
    for vm in ["vma", "vmb"] {
        let n = rows.iter().filter(|r| r["vm"] == vm).count();
        assert!((2..=3).contains(&n), "{vm} has {n} points: {rows:?}");
    }
    assert_clean(&repo, None, rows.len());
    for r in &rows {
        assert_restores(&repo, r["id"].as_str().unwrap(), None);
    }
}

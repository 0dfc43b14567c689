//! Continuous checkpoints straight into a bucket (a module of tests/s3.rs): `run --dr-target
//! s3://...` commits each checkpoint as a point of the bucket's repository, and `dr recover
//! --repo s3://...` starts the newest one.

use std::time::{Duration, Instant};

use arkvm_tests::{require_kvm, ScratchDir, Vmm};

use super::s3::*;
use super::support::*;

#[test]
fn run_ships_checkpoints_to_s3_and_dr_recover_starts_the_newest() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("s3-dr");
    let key = dir.path().join("dr.key");
    // `backup init --key` creates the key file.
    init_repo(&dir.path().join("keymaker"), Some(&key));
    let target = fresh_repo("dr");
    let sock = dir.path().join("vm.sock");
    let mut vm = start_vm(
        "memory",
        "64M",
        "drvm",
        &sock,
        &[
            "--cmdline",
            "arkvm.hot_pct=1",
            "--dr-target",
            &s(&target),
            "--dr-interval",
            "1s",
            "--key",
            &s(&key),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let have = snapshot::repo::Repository::open(
            &target,
            Some(snapshot::repo::RepoKey::load(&key).unwrap()),
        )
        .and_then(|r| r.point_ids())
        .map(|ids| ids.len())
        .unwrap_or(0);
        if have >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no two checkpoints reached the bucket\n{}",
            vm.dump()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    vm.kill();
    let work = dir.path().join("recover");
    let mut rec = Vmm::spawn(&args(&[
        "dr",
        "recover",
        "--repo",
        &s(&target),
        "--key",
        &s(&key),
        "--work-dir",
        &s(&work),
    ]));
    let (i, g) = wait_parsed(&rec, 0, pass_gen);
    let (_, g2) = wait_parsed(&rec, i + 1, pass_gen);
    assert!(g2 > g, "{}", rec.dump());
    assert_not_broken(&rec);
    rec.kill();
}

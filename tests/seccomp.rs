//! seccomp (docs/seccomp.md): every thread of a running VM, cold-booted or restored, runs
//! under a filter (`Seccomp: 2` in /proc/PID/task/*/status), through live snapshots; and
//! `--seccomp off` leaves them unfiltered.

use std::time::Duration;

use arkvm_tests::{
    one_at_a_time, require_kvm, snapshot_memory_guest, start_memory_guest, start_restore,
    ScratchDir, Vmm,
};

/// (thread name, value of the `Seccomp:` line) of every thread of `pid`.
fn thread_modes(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("list tasks") {
        let dir = task.expect("task").path();
        // A thread that ended between the listing and the read is skipped.
        let (Ok(status), Ok(comm)) = (
            std::fs::read_to_string(dir.join("status")),
            std::fs::read_to_string(dir.join("comm")),
        ) else {
            continue;
        };
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        out.push((comm.trim().to_string(), mode));
    }
    out
}

fn assert_all_filtered(vm: &Vmm, when: &str) -> Vec<String> {
    let modes = thread_modes(vm.pid());
    assert!(modes.len() >= 3, "{when}: too few threads {modes:?}");
    for (name, mode) in &modes {
        assert_eq!(
            mode, "2",
            "{when}: thread {name} is not filtered: {modes:?}"
        );
    }
    modes.into_iter().map(|(n, _)| n).collect()
}

#[test]
fn every_thread_of_a_running_and_a_restored_vm_is_filtered() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("seccomp");
    let sock = dir.path().join("vm.sock");
    let mut vm = start_memory_guest(&sock, "64M", 2, "");
    vm.wait_pass(0, 0, Duration::from_secs(120))
        .unwrap_or_else(|| panic!("no PASS line\n{}", vm.dump()));
    let names = assert_all_filtered(&vm, "running");
    for expected in ["vcpu0", "vcpu1", "arkvm-api"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing: {names:?}"
        );
    }
    // A live copy-on-write snapshot and a paused one start the capture and fault threads.
    let snap = dir.path().join("snap-live");
    snapshot_memory_guest(&vm, &sock, &snap, &[]);
    snapshot_memory_guest(&vm, &sock, &dir.path().join("snap-paused"), &["--paused"]);
    assert_all_filtered(&vm, "after snapshots");
    vm.kill();

    // A restored VM (memory loaded lazily by userfaultfd threads) is filtered too.
    let rsock = dir.path().join("restored.sock");
    let mut restored = start_restore(&snap, &rsock, &[]);
    let from = restored.line_count();
    restored
        .wait_pass(from, 0, Duration::from_secs(120))
        .unwrap_or_else(|| panic!("restored guest does not run\n{}", restored.dump()));
    assert_all_filtered(&restored, "restored");
    snapshot_memory_guest(&restored, &rsock, &dir.path().join("snap-again"), &[]);
    assert_all_filtered(&restored, "restored, after a snapshot");
    let stderr = restored.stderr().join("\n");
    assert!(!stderr.contains("seccomp"), "{stderr}");
    restored.kill();
}

#[test]
fn seccomp_off_leaves_every_thread_unfiltered() {
    require_kvm();
    let _serial = one_at_a_time();
    let kernel = arkvm_tests::tiny_guest("memory");
    let mut vm = Vmm::spawn(&[
        "run",
        "--kernel",
        kernel.to_str().expect("utf-8 path"),
        "--memory",
        "64M",
        "--seccomp",
        "off",
    ]);
    vm.wait_pass(0, 0, Duration::from_secs(120))
        .unwrap_or_else(|| panic!("no PASS line\n{}", vm.dump()));
    let modes = thread_modes(vm.pid());
    assert!(modes.iter().all(|(_, m)| m == "0"), "{modes:?}");
    assert!(
        vm.stderr()
            .iter()
            .any(|l| l.contains("seccomp filters are off")),
        "{}",
        vm.dump()
    );
    vm.kill();
}

//! The hostile-guest campaign (docs/fuzzing.md): the disk guest drives virtio-blk's queue with
//! random and adversarial descriptor chains for a while, under seccomp. arkvm keeps serving the
//! API, the device answers with an error or asks for a reset, no canary memory of the guest
//! changes, a good request works at the end, and the guest cannot make arkvm log errors.
//!
//! `ARKVM_CAMPAIGN_SECONDS` (default 20) and `ARKVM_CAMPAIGN_SEED` (default 1) set the length
//! and the seed, for long runs.

use std::path::Path;
use std::time::Duration;

use arkvm_tests::{
    api_json, one_at_a_time, require_kvm, tiny_guest, wait_for_path, ScratchDir, Vmm,
};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The value of `key=` in a `CAMPAIGN DONE` line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn num(line: &str, key: &str) -> u64 {
    field(line, key)
        .parse()
        .unwrap_or_else(|e| panic!("{key}= in {line:?}: {e}"))
}

fn vm_is_running(sock: &Path, when: &str) {
    let (code, body) = api_json(sock, "GET", "/vm", None);
    assert_eq!(code, 200, "{when}: GET /vm answered {code}: {body}");
    assert_eq!(body["state"], "running", "{when}: {body}");
}

fn assert_all_threads_filtered(pid: u32) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list tasks");
    let mut n = 0;
    for task in tasks {
        let Ok(status) = std::fs::read_to_string(task.expect("task").path().join("status")) else {
            continue; // a thread that just ended
        };
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(str::trim);
        assert_eq!(mode, Some("2"), "a thread runs without seccomp: {status}");
        n += 1;
    }
    assert!(n >= 2, "too few threads: {n}");
}

#[test]
fn random_and_adversarial_chains_leave_the_vmm_serving_and_guest_memory_intact() {
    require_kvm();
    let _serial = one_at_a_time();
    let seconds = env_u64("ARKVM_CAMPAIGN_SECONDS", 20);
    let seed = env_u64("ARKVM_CAMPAIGN_SEED", 1);
    let dir = ScratchDir::new("hostile-campaign");
    let img = dir.path().join("d0.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create the disk");
    let sock = dir.path().join("api.sock");
    let kernel = tiny_guest("disk");
    let cmdline =
        format!("arkvm.mode=campaign arkvm.seed={seed} arkvm.seconds={seconds} arkvm.every=200");
    let vmm = Vmm::spawn(&[
        "run",
        "--kernel",
        kernel.to_str().expect("utf-8"),
        "--memory",
        "64M",
        "--disk",
        img.to_str().expect("utf-8"),
        "--api-socket",
        sock.to_str().expect("utf-8"),
        "--seccomp",
        "on",
        "--cmdline",
        &cmdline,
    ]);
    assert!(
        wait_for_path(&sock, Duration::from_secs(60)),
        "{}",
        vmm.dump()
    );
    let first = vmm
        .wait_line("CAMPAIGN round=", Duration::from_secs(120))
        .unwrap_or_else(|| panic!("no progress line\n{}", vmm.dump()));
    vm_is_running(&sock, &format!("during the campaign ({first})"));
    assert_all_threads_filtered(vmm.pid());
    let done = vmm
        .wait_line("CAMPAIGN DONE", Duration::from_secs(seconds + 180))
        .unwrap_or_else(|| panic!("the campaign did not finish\n{}", vmm.dump()));
    assert!(
        vmm.wait_line("CAMPAIGN IDLE", Duration::from_secs(30))
            .is_some(),
        "{}",
        vmm.dump()
    );
    vm_is_running(&sock, "after the campaign");
    assert_all_threads_filtered(vmm.pid());
    let out = vmm.stdout();
    assert!(
        out.iter().any(|l| l == "CAMPAIGN DISK ok"),
        "{}",
        vmm.dump()
    );
    assert_eq!(field(&done, "canary"), "ok", "{}", vmm.dump());
    assert!(num(&done, "rounds") >= 100, "too few rounds: {done}");
    assert!(num(&done, "resets") >= 20, "too few resets: {done}");
    assert!(
        num(&done, "answered") >= 20,
        "too few answered chains: {done}"
    );
    assert!(num(&done, "good") >= 5, "too few good requests: {done}");
    assert_eq!(num(&done, "good_failed"), 0, "{done}");
    assert_eq!(num(&done, "bad_used"), 0, "{done}");
    let err = vmm.stderr();
    assert!(
        !err.iter()
            .any(|l| l.contains("panicked") || l.contains("ERROR")),
        "a hostile guest made arkvm log errors (a guest must not be able to flood the log)\n{}",
        vmm.dump()
    );
    drop(vmm);
    // The last good request wrote 0x5A ^ i at sector 8.
    let disk = std::fs::read(&img).expect("read the disk");
    let page = &disk[8 * 512..8 * 512 + 4096];
    assert!(
        page.iter().enumerate().all(|(i, &b)| b == 0x5A ^ i as u8),
        "the final good write is not on the disk"
    );
}

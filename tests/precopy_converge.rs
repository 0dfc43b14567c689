//! Pre-copy that converges (issue 16): a precopy snapshot of the memory guest rewriting all of
//! its memory at full speed throttles the vCPUs until the dirty set fits the final-pause
//! target, reports the throttle, and restores untorn.

use std::time::Duration;

use arkvm_tests::{
    check_restored_memory_guest, one_at_a_time, require_kvm, snapshot_memory_guest,
    start_memory_guest_with, start_restore, ScratchDir,
};

#[test]
fn precopy_throttles_a_full_speed_writer_until_it_converges() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("precopy-converge");
    let sock = dir.path().join("vm0.sock");
    let mut vm = start_memory_guest_with(
        &sock,
        "256M",
        1,
        "arkvm.hot_pct=100 arkvm.rate_pages=0",
        &[],
    );
    let snap = dir.path().join("snap");
    let w = snapshot_memory_guest(&vm, &sock, &snap, &["--strategy", "precopy"]);
    vm.kill();
    let r = &w.report;
    eprintln!("precopy report: {r}");
    let pc = &r["precopy"];
    assert_eq!(pc["throttle_enabled"], true, "{r}");
    let throttle = pc["throttle_pct"].as_u64().expect("throttle_pct");
    assert!(throttle > 0, "a full-speed writer must be throttled: {r}");
    let rounds = r["precopy_rounds"].as_u64().expect("precopy_rounds");
    let max_rounds = pc["max_rounds"].as_u64().expect("max_rounds");
    assert_eq!(r["precopy_converged"], true, "{r}");
    assert!(rounds <= max_rounds, "{r}");
    // Converged: the last dirty set copies within the target at the measured rate.
    let dirty = pc["final_dirty_bytes"].as_u64().expect("final_dirty_bytes");
    let rate = pc["copy_rate_bps"].as_u64().expect("copy_rate_bps");
    let target_ms = pc["target_pause_ms"].as_u64().expect("target_pause_ms");
    assert!(rate > 0, "{r}");
    assert!(
        dirty <= 16 << 20 || dirty * 1000 / rate <= target_ms,
        "final dirty set {dirty} bytes does not copy within {target_ms} ms at {rate} B/s: {r}"
    );
    assert!(r["pause_us"].as_u64().is_some(), "{r}");

    let sock = dir.path().join("vm1.sock");
    let restored = start_restore(&snap, &sock, &[]);
    let first = check_restored_memory_guest(&restored, &w, 2, Duration::from_secs(60));
    eprintln!(
        "precopy full-speed writer: throttle {throttle}%, {rounds} rounds, final dirty {dirty} bytes, pause {} us, restored at GEN {first}",
        r["pause_us"]
    );
}

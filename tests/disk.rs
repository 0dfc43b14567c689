//! Disks with the disk guest: the round trip reaches the host file, read-only disks refuse
//! writes, hostile descriptor chains leave the VMM serving, and after a live snapshot and
//! restore the disk and the guest's memory agree; a `kill -9` mid-snapshot loses no
//! completed write.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arkvm_tests::{
    api_json, broken_line, one_at_a_time, require_kvm, run_to_end_settled, start_restore,
    tiny_guest, wait_for_path, ScratchDir, Vmm,
};

fn disk_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create disk file");
    f.set_len(size).expect("size disk file");
    p
}

fn pattern(offset: u64) -> u64 {
    offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xA5A5_5A5A_0F0F_F0F0
}

#[test]
fn roundtrip_writes_the_pattern_to_the_host_file() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("disk-roundtrip");
    let img = disk_file(dir.path(), "d.img", 64 << 20);
    let kernel = tiny_guest("disk");
    let (st, out, err) = run_to_end_settled(
        &[
            "run",
            "--kernel",
            kernel.to_str().expect("utf-8"),
            "--memory",
            "64M",
            "--disk",
            img.to_str().expect("utf-8"),
            "--cmdline",
            "arkvm.mode=roundtrip",
        ],
        Duration::from_secs(120),
    );
    assert!(st.success(), "{st:?} {out:?} {err:?}");
    assert!(
        out.iter().any(|l| l == "ROUNDTRIP OK bytes=67108864"),
        "no round trip: {out:?}"
    );
    let data = std::fs::read(&img).expect("read disk");
    assert_eq!(data.len(), 64 << 20);
    let bad = data
        .chunks_exact(8)
        .enumerate()
        .find(|(i, c)| {
            u64::from_le_bytes((*c).try_into().expect("8 bytes")) != pattern(*i as u64 * 8)
        })
        .map(|(i, _)| i * 8);
    assert_eq!(
        bad, None,
        "the host file differs from the pattern at this offset"
    );
}

#[test]
fn readonly_disk_refuses_writes_and_stays_unchanged() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("disk-ro");
    let img = dir.path().join("ro.img");
    let content: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&img, &content).expect("write disk");
    let kernel = tiny_guest("disk");
    let (st, out, err) = run_to_end_settled(
        &[
            "run",
            "--kernel",
            kernel.to_str().expect("utf-8"),
            "--memory",
            "64M",
            "--disk",
            &format!("{},readonly", img.display()),
            "--cmdline",
            "arkvm.mode=readonly",
        ],
        Duration::from_secs(60),
    );
    assert!(st.success(), "{st:?} {out:?} {err:?}");
    assert!(out.iter().any(|l| l == "READONLY-REJECTED"), "{out:?}");
    assert!(out.iter().any(|l| l == "READ-OK"), "{out:?}");
    assert!(
        std::fs::read(&img).expect("read disk") == content,
        "the read-only disk file changed"
    );
}

#[test]
fn hostile_chains_leave_the_vmm_serving_disk_1() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("disk-hostile");
    let d0 = disk_file(dir.path(), "d0.img", 16 << 20);
    let d1 = disk_file(dir.path(), "d1.img", 16 << 20);
    let kernel = tiny_guest("disk");
    let (st, out, err) = run_to_end_settled(
        &[
            "run",
            "--kernel",
            kernel.to_str().expect("utf-8"),
            "--memory",
            "64M",
            "--disk",
            d0.to_str().expect("utf-8"),
            "--disk",
            d1.to_str().expect("utf-8"),
            "--cmdline",
            "arkvm.mode=hostile",
        ],
        Duration::from_secs(120),
    );
    let text = err.join("\n");
    assert!(!text.contains("panicked"), "the VMM panicked: {text}");
    assert!(st.success(), "{st:?} {out:?} {err:?}");
    for case in [
        "outside-memory",
        "loop",
        "too-long",
        "wrong-direction",
        "header-only",
    ] {
        assert!(
            out.iter()
                .any(|l| l.starts_with(&format!("HOSTILE {case} "))),
            "case {case} did not run: {out:?}"
        );
    }
    assert!(
        out.iter().all(|l| !l.contains("reset-timeout")),
        "a device did not reset: {out:?}"
    );
    assert!(
        out.iter().any(|l| l == "HOSTILE disk0-after-reset ok"),
        "{out:?}"
    );
    assert!(out.iter().any(|l| l == "HOSTILE SURVIVED"), "{out:?}");
}

const BLOCK: usize = 4096;

/// Reads the numbered ring of a disk image: `(gen, index)` of every block.
fn ring(disk: &[u8]) -> Vec<(u64, u64)> {
    disk.chunks_exact(BLOCK)
        .map(|b| {
            (
                u64::from_le_bytes(b[0..8].try_into().expect("8")),
                u64::from_le_bytes(b[8..16].try_into().expect("8")),
            )
        })
        .collect()
}

/// The highest number `g*B+i` such that the ring is exactly "generation g up to block i,
/// generation g-1 after it", or an explanation of why the ring is not in that form.
fn ring_position(r: &[(u64, u64)]) -> Result<u64, String> {
    let b = r.len() as u64;
    let g = r[0].0;
    if g == 0 {
        return Err("block 0 was never written".into());
    }
    let mut i = 0;
    while i < r.len() && r[i].0 == g {
        i += 1;
    }
    for (j, &(gen, idx)) in r.iter().enumerate() {
        let want = if j < i { g } else { g - 1 };
        let want_idx = if want == 0 { 0 } else { j as u64 };
        if (gen, idx) != (want, want_idx) {
            return Err(format!(
                "block {j} holds ({gen},{idx}), expected ({want},{want_idx}); generation {g} reached block {}",
                i - 1
            ));
        }
    }
    Ok(g * b + i as u64 - 1)
}

/// The numbered guest's `ARKVM_DISK_LAST` (status page 0x3FF000 + 0x18) in a snapshot's
/// memory part.
fn disk_last_in_snapshot(snap: &Path) -> u64 {
    let state = arkvm_tests::read_snapshot_state(snap);
    let region = &state["memory"][0];
    assert_eq!(
        region["guest_addr"], 0,
        "first memory region starts at 0: {region}"
    );
    let off = region["part_offset"].as_u64().expect("part_offset") + 0x3FF000;
    let mem = std::fs::read(snap.join("memory")).expect("read memory part");
    assert_eq!(
        &mem[off as usize..off as usize + 8],
        b"ARKVMST1",
        "status page magic"
    );
    u64::from_le_bytes(
        mem[off as usize + 0x18..off as usize + 0x20]
            .try_into()
            .expect("8"),
    )
}

/// The disk part (the only `raw` part) of a snapshot.
fn disk_part(snap: &Path) -> PathBuf {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    let raw: Vec<&str> = m["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .filter(|p| p["kind"] == "raw")
        .map(|p| p["name"].as_str().expect("name"))
        .collect();
    assert_eq!(raw.len(), 1, "expected one disk part: {m}");
    snap.join(raw[0])
}

fn last_diskgen(vm: &Vmm, from: usize) -> Option<(usize, u64)> {
    vm.stdout()
        .iter()
        .enumerate()
        .skip(from)
        .rev()
        .find_map(|(i, l)| {
            let mut w = l.split_whitespace();
            (w.next() == Some("DISKGEN")).then_some(())?;
            w.next()?;
            (w.next() == Some("LAST")).then_some(())?;
            Some((i, w.next()?.parse().ok()?))
        })
}

fn wait_diskgen(vm: &Vmm, from: usize, timeout: Duration) -> (usize, u64) {
    let (i, l) = vm
        .wait_line_from(from, timeout, |l| l.starts_with("DISKGEN "))
        .unwrap_or_else(|| panic!("no DISKGEN line\n{}", vm.dump()));
    let n = l
        .split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad DISKGEN line {l:?}"));
    (i, n)
}

fn start_numbered(img: &Path, sock: &Path, memory: &str) -> Vmm {
    start_numbered_with(img, sock, memory, &[])
}

/// [`start_numbered`] with further `arkvm run` options.
fn start_numbered_with(img: &Path, sock: &Path, memory: &str, extra: &[&str]) -> Vmm {
    let kernel = tiny_guest("disk");
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().expect("utf-8"),
        "--memory",
        memory,
        "--disk",
        img.to_str().expect("utf-8"),
        "--api-socket",
        sock.to_str().expect("utf-8"),
        "--cmdline",
        "arkvm.mode=numbered",
    ];
    args.extend_from_slice(extra);
    let vm = Vmm::spawn(&args);
    assert!(
        wait_for_path(sock, Duration::from_secs(20)),
        "no socket\n{}",
        vm.dump()
    );
    vm
}

/// `run_extra` goes to `arkvm run` (the cow staging pool's size, say).
fn disk_and_memory_agree(strategy: &str, run_extra: &[&str]) {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new(&format!("disk-agree-{strategy}-{}", run_extra.join("")));
    let img = disk_file(dir.path(), "d.img", 4 << 20);
    let blocks = (4 << 20) / BLOCK as u64;
    let sock = dir.path().join("vm.sock");
    let mut vm = start_numbered_with(&img, &sock, "64M", run_extra);
    let (i, _) = wait_diskgen(&vm, 0, Duration::from_secs(30));
    wait_diskgen(&vm, i + 1, Duration::from_secs(30));
    let seen_before = last_diskgen(&vm, 0).map(|(_, n)| n).unwrap_or(0);
    let snap = dir.path().join("snap");
    let report = arkvm_tests::cli_snapshot(&sock, &snap, &["--strategy", strategy]);
    assert_eq!(report["mode"], "live", "{report}");
    // The original keeps going after the snapshot (its overlay is merged back).
    let n_done = vm.line_count();
    let (j, _) = wait_diskgen(&vm, n_done, Duration::from_secs(30));
    wait_diskgen(&vm, j + 1, Duration::from_secs(30));
    if let Some(l) = broken_line(&vm.stdout(), 0) {
        panic!("original broke: {l}\n{}", vm.dump());
    }
    vm.kill();

    // Memory and disk in the snapshot agree: the disk part is exactly the ring up to the
    // number in memory (the write after it may or may not have reached the disk yet only if
    // its completion was not seen).
    let last = disk_last_in_snapshot(&snap);
    assert!(
        last >= seen_before,
        "memory says {last}, but the guest printed LAST {seen_before} before the snapshot"
    );
    let disk = std::fs::read(disk_part(&snap)).expect("read disk part");
    assert_eq!(disk.len(), 4 << 20, "disk part size");
    let pos = ring_position(&ring(&disk)).unwrap_or_else(|e| panic!("disk part is torn: {e}"));
    assert!(
        pos == last || pos == last + 1,
        "memory says the last completed write is {last} (gen {}, block {}), the disk holds up to \
         {pos} (gen {}, block {})",
        last / blocks,
        last % blocks,
        pos / blocks,
        pos % blocks
    );
    eprintln!("{strategy}: memory LAST {last}, disk up to {pos}, report {report}");

    // Restored, the guest goes on and never finds a torn block.
    let rsock = dir.path().join("restored.sock");
    let disks = dir.path().join("restored-disks");
    let r = start_restore(
        &snap,
        &rsock,
        &["--disk-dir", disks.to_str().expect("utf-8")],
    );
    let (k, n1) = wait_diskgen(&r, 0, Duration::from_secs(30));
    let mut prev = n1;
    let mut idx = k;
    for _ in 0..3 {
        let (k, n) = wait_diskgen(&r, idx + 1, Duration::from_secs(30));
        assert!(n > prev, "DISKGEN went from {prev} to {n}\n{}", r.dump());
        prev = n;
        idx = k;
    }
    assert!(
        n1 > last,
        "restored guest starts at LAST {n1}, not after {last}"
    );
    if let Some(l) = broken_line(&r.stdout(), 0) {
        panic!("restored guest broke: {l}\n{}", r.dump());
    }
    let (code, info) = api_json(&rsock, "GET", "/vm", None);
    assert_eq!(code, 200, "{info}");
    assert_eq!(info["state"], "running", "{info}");
}

#[test]
fn disk_and_memory_agree_after_cow_snapshot_restore() {
    disk_and_memory_agree("cow", &[]);
}

#[test]
fn disk_and_memory_agree_after_cow_snapshot_restore_with_a_small_staging_pool() {
    disk_and_memory_agree("cow", &["--cow-staging", "2M"]);
}

#[test]
fn disk_and_memory_agree_after_cow_snapshot_restore_without_staging() {
    disk_and_memory_agree("cow", &["--cow-staging", "0"]);
}

#[test]
fn disk_and_memory_agree_after_precopy_snapshot_restore() {
    disk_and_memory_agree("precopy", &[]);
}

#[test]
fn kill_9_mid_snapshot_keeps_every_completed_disk_write() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("disk-kill");
    let img = disk_file(dir.path(), "d.img", 4 << 20);
    let sock = dir.path().join("vm.sock");
    // Lots of memory so that the snapshot is still copying when arkvm is killed.
    let mut vm = start_numbered(&img, &sock, "4G");
    let (i, _) = wait_diskgen(&vm, 0, Duration::from_secs(30));
    wait_diskgen(&vm, i + 1, Duration::from_secs(30));
    let snap = dir.path().join("snap");
    let (code, v) = api_json(
        &sock,
        "PUT",
        "/snapshot",
        Some(&format!("{{\"out\": \"{}\"}}", snap.display())),
    );
    assert_eq!(code, 202, "{v}");
    // Let the guest complete more writes (to the overlay) while the snapshot copies.
    let n0 = vm.line_count();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut still_running = false;
    while Instant::now() < deadline {
        let (_, st) = api_json(&sock, "GET", "/snapshot", None);
        still_running = st["state"] == "running";
        if !still_running || vm.line_count() > n0 + 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let seen = last_diskgen(&vm, 0).map(|(_, n)| n).unwrap_or(0);
    vm.kill();
    eprintln!("killed with the snapshot running={still_running}, last LAST seen {seen}");
    assert!(!snap.exists(), "a snapshot directory exists after kill -9");

    // Opening the disk again (any arkvm run) brings back every completed write.
    let marker = tiny_guest("marker");
    let (st, out, err) = run_to_end_settled(
        &[
            "run",
            "--kernel",
            marker.to_str().expect("utf-8"),
            "--memory",
            "64M",
            "--disk",
            img.to_str().expect("utf-8"),
        ],
        Duration::from_secs(60),
    );
    assert!(st.success(), "reopening the disk failed: {out:?} {err:?}");
    let disk = std::fs::read(&img).expect("read disk");
    let pos = ring_position(&ring(&disk))
        .unwrap_or_else(|e| panic!("the disk file is torn after kill -9: {e}"));
    assert!(
        pos >= seen,
        "the guest saw write {seen} complete, but the disk file holds only up to {pos}"
    );
    assert!(
        still_running,
        "the snapshot finished before the kill; the test did not test a kill mid-snapshot"
    );
}

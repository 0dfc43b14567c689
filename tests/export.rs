//! `arkvm backup export`: a point written out as a snapshot directory restores and runs
//! untorn; one disk written out as a raw image is byte for byte the disk at the point's
//! instant. The disk guest's numbered mode writes block after block of (generation, index).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use arkvm_tests::{
    api_json, arkvm_bin, broken_line, one_at_a_time, require_kvm, start_restore, tiny_guest,
    wait_for_path, ScratchDir, Vmm,
};

const BLOCK: usize = 4096;
const DISK: usize = 4 << 20;

fn ark(args: &[&str]) -> serde_json::Value {
    let out = Command::new(arkvm_bin())
        .env_remove("ARKVM_REPO")
        .env_remove("ARKVM_KEY_FILE")
        .env_remove("ARKVM_API_SOCKET")
        .args(args)
        .output()
        .expect("run arkvm");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{args:?}: {stdout} {stderr}");
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stdout}"))
}

/// The highest write number `g*B+i` such that the image is exactly "generation g up to
/// block i, generation g-1 after it" (the numbered guest's ring), or why it is not.
fn ring_position(disk: &[u8]) -> Result<u64, String> {
    let r: Vec<(u64, u64)> = disk
        .chunks_exact(BLOCK)
        .map(|b| {
            let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
            (word(0), word(8))
        })
        .collect();
    let g = r[0].0;
    if g == 0 {
        return Err("block 0 was never written".into());
    }
    let i = r.iter().take_while(|(gen, _)| *gen == g).count();
    for (j, &(gen, idx)) in r.iter().enumerate() {
        let want = if j < i { g } else { g - 1 };
        let want_idx = if want == 0 { 0 } else { j as u64 };
        if (gen, idx) != (want, want_idx) {
            return Err(format!(
                "block {j} holds ({gen},{idx}), expected ({want},{want_idx})"
            ));
        }
    }
    Ok(g * r.len() as u64 + i as u64 - 1)
}

/// The numbered guest's last completed write number in a snapshot directory's memory part.
fn disk_last_in_snapshot(snap: &Path) -> u64 {
    let state = arkvm_tests::read_snapshot_state(snap);
    let region = &state["memory"][0];
    assert_eq!(region["guest_addr"], 0, "{region}");
    let off = (region["part_offset"].as_u64().expect("offset") + 0x3FF000) as usize;
    let mem = std::fs::read(snap.join("memory")).expect("memory part");
    assert_eq!(&mem[off..off + 8], b"ARKVMST1", "status page magic");
    u64::from_le_bytes(mem[off + 0x18..off + 0x20].try_into().expect("8"))
}

fn wait_diskgen(vm: &Vmm, from: usize) -> (usize, u64) {
    let (i, l) = vm
        .wait_line_from(from, Duration::from_secs(60), |l| l.starts_with("DISKGEN "))
        .unwrap_or_else(|| panic!("no DISKGEN line\n{}", vm.dump()));
    let n = l.split_whitespace().nth(3).and_then(|n| n.parse().ok());
    (i, n.unwrap_or_else(|| panic!("bad DISKGEN line {l:?}")))
}

/// Files 0600 and directories 0700, all the way down.
fn check_private(path: &Path) {
    let meta = std::fs::symlink_metadata(path).expect("metadata");
    let mode = meta.permissions().mode() & 0o777;
    if meta.is_dir() {
        assert_eq!(mode, 0o700, "{}", path.display());
        for e in std::fs::read_dir(path).expect("read dir") {
            check_private(&e.expect("entry").path());
        }
    } else {
        assert_eq!(mode, 0o600, "{}", path.display());
    }
}

#[test]
fn exported_points_restore_and_disks_match_their_instant() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("export");
    let img = dir.path().join("d.img");
    std::fs::write(&img, vec![0u8; DISK]).expect("disk image");
    let sock = dir.path().join("vm.sock");
    let (s, repo) = (sock.to_str().unwrap(), dir.path().join("repo"));
    let r = repo.to_str().unwrap();
    let kernel = tiny_guest("disk");
    let mut vm = Vmm::spawn(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64M",
        "--disk",
        img.to_str().unwrap(),
        "--api-socket",
        s,
        "--name",
        "exp",
        "--cmdline",
        "arkvm.mode=numbered",
    ]);
    assert!(
        wait_for_path(&sock, Duration::from_secs(30)),
        "no socket\n{}",
        vm.dump()
    );
    let (i, _) = wait_diskgen(&vm, 0);
    wait_diskgen(&vm, i + 1);
    ark(&["backup", "init", "--repo", r, "--json"]);

    // A live point, started with --no-wait: the id comes back at once.
    let started = ark(&[
        "snapshot",
        "--api-socket",
        s,
        "--repo",
        r,
        "--no-wait",
        "--json",
    ]);
    let snap_id = started["id"].as_str().expect("snapshot id").to_string();
    assert!(!snap_id.is_empty(), "{started}");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (code, st) = api_json(&sock, "GET", "/snapshot", None);
        assert_eq!(code, 200, "{st}");
        // Running, the snapshot is known by the id --no-wait printed; once committed, by
        // its backup point's id.
        match st["state"].as_str() {
            Some("running") => assert_eq!(st["id"], snap_id.as_str(), "{st}"),
            Some("done") => {
                assert!(st["id"].as_str().unwrap().contains("-exp-"), "{st}");
                break;
            }
            other => panic!("snapshot ended {other:?}: {st}"),
        }
        assert!(Instant::now() < deadline, "snapshot did not finish: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A paused point: the host's disk file while the VM is paused is the disk at its instant.
    ark(&["status", "--api-socket", s, "--json"]);
    assert_eq!(
        ark(&["pause", "--api-socket", s, "--json"])["result"],
        "paused"
    );
    // The live point's overlay is merged back into the disk file in the background after
    // the point is done; only once it is gone is the file the disk at the pause.
    let overlay = img.with_file_name("d.img.arkvm-snap");
    let merged_by = Instant::now() + Duration::from_secs(120);
    while overlay.exists() {
        assert!(
            Instant::now() < merged_by,
            "the snapshot overlay {} was never merged back\n{}",
            overlay.display(),
            vm.dump()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let disk_at_pause = std::fs::read(&img).expect("read disk");
    let paused = ark(&[
        "snapshot",
        "--api-socket",
        s,
        "--repo",
        r,
        "--paused",
        "--json",
    ]);
    assert_eq!(paused["state"], "done", "{paused}");
    let (code, body) = api_json(&sock, "PUT", "/vm/resume", None);
    assert_eq!(code / 100, 2, "{body}");
    vm.wait_line_from(vm.line_count(), Duration::from_secs(60), |l| {
        l.starts_with("DISKGEN ")
    })
    .unwrap_or_else(|| panic!("guest did not go on after resume\n{}", vm.dump()));
    vm.kill();
    assert_ne!(
        std::fs::read(&img).expect("read disk"),
        disk_at_pause,
        "the guest kept writing"
    );

    let list = ark(&["backup", "list", "--repo", r, "--json"]);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{list}");

    // The paused point's disk, by `latest` of the VM: byte for byte the disk at the pause.
    let raw = dir.path().join("paused-disk0.raw");
    let out = ark(&[
        "backup",
        "export",
        "--repo",
        r,
        "--id",
        "latest",
        "--name",
        "exp",
        "--disk",
        "disk0",
        "--to",
        raw.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out["id"], ids[1], "{out}");
    let exported = std::fs::read(&raw).expect("read export");
    assert_eq!(exported.len(), DISK);
    assert!(
        exported == disk_at_pause,
        "the exported disk differs from the disk at the pause"
    );
    check_private(&raw);

    // The live point, by a unique prefix of its id, as a snapshot directory.
    let prefix = &ids[0][..ids[0].len() - 3];
    let out_dir = dir.path().join("live-snap");
    let out = ark(&[
        "backup",
        "export",
        "--repo",
        r,
        "--id",
        prefix,
        "--out",
        out_dir.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out["id"], ids[0], "{out}");
    check_private(&out_dir);
    // Its disk agrees with its memory: the ring up to the guest's last completed write.
    let last = disk_last_in_snapshot(&out_dir);
    let live_raw = dir.path().join("live-disk0.raw");
    ark(&[
        "backup",
        "export",
        "--repo",
        r,
        "--id",
        ids[0],
        "--disk",
        "disk0",
        "--to",
        live_raw.to_str().unwrap(),
        "--json",
    ]);
    let live_disk = std::fs::read(&live_raw).expect("read export");
    assert!(live_disk == std::fs::read(out_dir.join("disk-disk0")).expect("disk part"));
    let pos = ring_position(&live_disk).unwrap_or_else(|e| panic!("exported disk is torn: {e}"));
    assert!(
        pos == last || pos == last + 1,
        "memory says write {last}, the disk holds {pos}"
    );

    // The exported directory restores and runs on, untorn, after the point's instant.
    let rsock = dir.path().join("restored.sock");
    let disks = dir.path().join("restored-disks");
    let restored = start_restore(&out_dir, &rsock, &["--disk-dir", disks.to_str().unwrap()]);
    let (k, first) = wait_diskgen(&restored, 0);
    let (_, next) = wait_diskgen(&restored, k + 1);
    assert!(
        first > last && next > first,
        "restored at {first}, then {next}, point at {last}"
    );
    if let Some(l) = broken_line(&restored.stdout(), 0) {
        panic!("restored guest broke: {l}\n{}", restored.dump());
    }
}

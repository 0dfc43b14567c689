//! Instant disks (issue 11): `arkvm restore --repo --id` serves a point's disks from the
//! repository while it hydrates them into local files in the background. The disk guest's ring
//! (`arkvm.mode=numbered`) checks every block it rewrites and prints DISK-TORN on a mismatch.
//! Here: the disk keeps working during and after hydration and the hydrated file is the point
//! plus the guest's writes; a kill -9 during hydration leaves a directory the next restore
//! removes; a damaged disk chunk stops the VM with one error naming the point and the chunk;
//! `backup drill` passes a good point, fails an unmet `--expect`, records both for `backup
//! list`, and changes no repository file.

#[allow(dead_code)]
#[path = "backup_support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arkvm_tests::{api_json, require_kvm, wait_for_path, ScratchDir, Vmm};
use snapshot::repo::Repository;
use support::*;

/// A 16 MiB ring (4096 blocks of 4 KiB) followed by 4 MiB the guest never touches, filled with
/// a pattern that differs in every chunk (so a misplaced or skipped chunk shows).
const DISK_BYTES: u64 = 20 << 20;
const RING_BLOCKS: u64 = 4096;
const RING_BYTES: usize = (RING_BLOCKS * 4096) as usize;
const DISK_OBJECT: &str = "disk-disk0";

fn tail_word(offset: u64) -> u64 {
    offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x7E57_7A11
}

/// What the guest writes into ring block `i` in generation `g`.
fn ring_block(g: u64, i: u64) -> Vec<u8> {
    (0..512u64)
        .flat_map(|k| {
            let v = match k {
                0 => g,
                1 => i,
                _ => g ^ (i << 20) ^ k,
            };
            v.to_le_bytes()
        })
        .collect()
}

fn gen_of(disk: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(disk[i * 4096..i * 4096 + 8].try_into().expect("8 bytes"))
}

struct Point {
    repo: PathBuf,
    id: String,
    /// The point's disk, read from the repository through the library.
    image: Vec<u8>,
}

/// Runs the disk guest, backs it up once it has written its ring, and reads the point's disk.
fn disk_point(dir: &Path) -> Point {
    let repo = dir.join("repo");
    init_repo(&repo, None);
    let disk = dir.join("disk.img");
    let mut bytes = vec![0u8; DISK_BYTES as usize];
    for (w, chunk) in bytes[RING_BYTES..].chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&tail_word(RING_BYTES as u64 + 8 * w as u64).to_le_bytes());
    }
    std::fs::write(&disk, &bytes).expect("write disk");
    let sock = dir.join("vm.sock");
    let mut vm = start_vm(
        "disk",
        "64M",
        "hydr",
        &sock,
        &[
            "--disk",
            &s(&disk),
            "--cmdline",
            &format!("arkvm.mode=numbered arkvm.blocks={RING_BLOCKS}"),
        ],
    );
    wait_parsed(&vm, 0, diskgen);
    let id = backup(&sock, &repo, None)["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_not_broken(&vm);
    vm.kill();
    let lib = Repository::open(&repo, None).expect("open repository");
    let point = lib.read_point(&id).expect("read point");
    let mut image = Vec::new();
    lib.read_object(&point, DISK_OBJECT, &mut image)
        .expect("read the point's disk");
    assert_eq!(image.len() as u64, DISK_BYTES);
    assert_eq!(image[RING_BYTES..], bytes[RING_BYTES..], "the point's tail");
    Point { repo, id, image }
}

/// Checks that `hydrated` is the point's disk plus what the guest wrote after the restore:
/// the untouched tail is the point's, every ring block is either the point's block or one the
/// guest wrote in a later generation, and every block is at least at generation `done_gen`,
/// the last one the guest reported complete.
fn check_hydrated(point: &[u8], hydrated: &[u8], done_gen: u64) {
    assert_eq!(hydrated.len(), point.len(), "hydrated disk size");
    if let Some(off) = (RING_BYTES..point.len()).find(|o| hydrated[*o] != point[*o]) {
        panic!("hydrated disk differs from the point at {off:#x}, past the ring");
    }
    let mut rewritten = 0;
    for i in 0..RING_BLOCKS as usize {
        let (pg, hg) = (gen_of(point, i), gen_of(hydrated, i));
        let block = &hydrated[i * 4096..(i + 1) * 4096];
        assert_eq!(
            &point[i * 4096..(i + 1) * 4096],
            ring_block(pg, i as u64).as_slice(),
            "the point's block {i}"
        );
        assert_eq!(block, ring_block(hg, i as u64).as_slice(), "block {i} torn");
        assert!(hg >= pg, "block {i} went back from gen {pg} to {hg}");
        assert!(
            hg >= done_gen,
            "block {i} is at gen {hg}, the guest completed gen {done_gen}"
        );
        rewritten += usize::from(hg > pg);
    }
    assert!(rewritten > 0, "the restored guest wrote nothing");
}

fn hydration(sock: &Path) -> serde_json::Value {
    let (code, v) = api_json(sock, "GET", "/vm", None);
    assert_eq!(code, 200, "{v}");
    v["disk_hydration"].clone()
}

fn restore_args(p: &Point, extra: &[&str]) -> Vec<String> {
    let mut a = args(&["restore", "--repo", &s(&p.repo), "--id", &p.id]);
    a.extend(args(&["--log-level", "info"]));
    a.extend(args(extra));
    a
}

fn default_disk_dir(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("arkvm-restore-{pid}-disks"))
}

fn shutdown(vm: &mut Vmm, sock: &Path) {
    let (st, _, err) = ark(&args(&["shutdown", "--api-socket", &s(sock)]));
    assert!(st.success(), "shutdown: {err:?}");
    let st = vm
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no exit after shutdown\n{}", vm.dump()));
    assert!(st.success(), "exit status {st:?}\n{}", vm.dump());
}

#[test]
fn a_restored_disk_works_while_it_hydrates_and_ends_as_point_plus_writes() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("rec-disk");
    let p = disk_point(dir.path());
    let sock = dir.path().join("r.sock");
    let disk_dir = dir.path().join("disks");
    // The background pass is slowed so that the guest demonstrably runs before it ends.
    let mut vm = Vmm::spawn(&restore_args(
        &p,
        &[
            "--api-socket",
            &s(&sock),
            "--disk-dir",
            &s(&disk_dir),
            "--hydrate-rate",
            "256K",
        ],
    ));
    assert!(
        wait_for_path(&sock, Duration::from_secs(60)),
        "{}",
        vm.dump()
    );
    let first = hydration(&sock);
    assert_eq!(first["done"], false, "{first}");
    assert_eq!(first["bytes_total"], DISK_BYTES, "{first}");
    assert!(disk_dir.join("HYDRATING").exists(), "no incomplete marker");
    // The guest rewrites ring blocks (and re-checks each) while the disk hydrates.
    let (i, _) = wait_parsed(&vm, 0, diskgen);
    let during = hydration(&sock);
    assert_eq!(during["done"], false, "hydration ended too soon: {during}");
    // A backup of the recovering VM while its disk hydrates reads the disk through the point.
    let again = backup(&sock, &p.repo, None);
    assert_eq!(again["state"], "done", "{again}");
    let lib = Repository::open(&p.repo, None).expect("open repository");
    let second = lib
        .read_point(again["id"].as_str().expect("id"))
        .expect("read the new point");
    let mut image = Vec::new();
    lib.read_object(&second, DISK_OBJECT, &mut image)
        .expect("read the new point's disk");
    check_hydrated(&p.image, &image, 0);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let h = hydration(&sock);
        assert!(h["error"].is_null(), "{h}");
        if h["done"] == true {
            assert_eq!(h["bytes_done"], DISK_BYTES, "{h}");
            break;
        }
        assert!(Instant::now() < deadline, "hydration did not end: {h}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !disk_dir.join("HYDRATING").exists(),
        "marker left when done"
    );
    // ... and after: two more generations, then a clean stop.
    let (i, _) = wait_parsed(&vm, i + 1, diskgen);
    let (_, (done_gen, _)) = wait_parsed(&vm, i + 1, diskgen);
    assert_not_broken(&vm);
    shutdown(&mut vm, &sock);
    assert_not_broken(&vm);
    let hydrated = std::fs::read(disk_dir.join("disk0.img")).expect("read hydrated disk");
    check_hydrated(&p.image, &hydrated, done_gen);
    assert!(vm
        .stderr()
        .iter()
        .any(|l| l.contains("no longer needs the repository")));
}

#[test]
fn kill_during_hydration_leaves_a_dir_the_next_restore_removes() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("rec-kill");
    let p = disk_point(dir.path());
    let sock = dir.path().join("k.sock");
    let mut killed = Vmm::spawn(&restore_args(
        &p,
        &["--api-socket", &s(&sock), "--hydrate-rate", "64K"],
    ));
    assert!(
        wait_for_path(&sock, Duration::from_secs(60)),
        "{}",
        killed.dump()
    );
    assert_eq!(hydration(&sock)["done"], false);
    let left = default_disk_dir(killed.pid());
    assert!(
        left.join("disk0.img").exists(),
        "no disk in {}",
        left.display()
    );
    killed.kill();
    assert!(left.exists(), "kill -9 removed {}", left.display());
    let _ = std::fs::remove_file(&sock);

    let mut next = Vmm::spawn(&restore_args(&p, &["--api-socket", &s(&sock)]));
    assert!(
        wait_for_path(&sock, Duration::from_secs(60)),
        "{}",
        next.dump()
    );
    assert!(!left.exists(), "{} was not removed", left.display());
    let mine = default_disk_dir(next.pid());
    assert!(mine.exists(), "the new restore has no disk dir");
    let (i, _) = wait_parsed(&next, 0, diskgen);
    wait_parsed(&next, i + 1, diskgen);
    assert_not_broken(&next);
    shutdown(&mut next, &sock);
    assert!(
        !mine.exists(),
        "{} left after a normal exit",
        mine.display()
    );
}

/// Damages chunk `index` of the point's disk, restores, and expects one clear error.
fn damaged_chunk_stops_the_vm(tag: &str, index: usize) {
    let dir = ScratchDir::new(tag);
    let p = disk_point(dir.path());
    let lib = Repository::open(&p.repo, None).expect("open repository");
    let point = lib.read_point(&p.id).expect("read point");
    let chunk = point.object(DISK_OBJECT).expect("disk object").chunks[index].to_hex();
    let path = chunk_path(&p.repo, &chunk);
    let len = std::fs::metadata(&path).expect("chunk file").len() as usize;
    flip_byte(&path, len / 2);
    let mut vm = Vmm::spawn(&restore_args(&p, &["--fetch-timeout", "1s"]));
    let st = vm
        .wait_exit(Duration::from_secs(120))
        .unwrap_or_else(|| panic!("the restore hung on a damaged chunk\n{}", vm.dump()));
    assert_eq!(
        st.code(),
        Some(4),
        "exit status {st:?} (4: docs/exit-status.md)\n{}",
        vm.dump()
    );
    let err = vm.stderr();
    let line = err
        .iter()
        .find(|l| l.starts_with("arkvm: error: restore failed"))
        .unwrap_or_else(|| panic!("no restore error\n{}", vm.dump()));
    assert!(line.contains(&format!("chunk {index} ")), "{line}");
    assert!(line.contains(&p.id), "the point is not named: {line}");
    assert!(line.contains(&chunk), "the chunk id is not named: {line}");
    assert_not_broken(&vm);
    assert!(
        !default_disk_dir(vm.pid()).exists(),
        "disk dir left after a failed restore"
    );
}

#[test]
fn a_damaged_disk_chunk_the_guest_never_reads_stops_the_vm() {
    require_kvm();
    let _serial = serial();
    damaged_chunk_stops_the_vm("rec-bad-tail", 18);
}

#[test]
fn a_damaged_disk_chunk_the_guest_reads_stops_the_vm() {
    require_kvm();
    let _serial = serial();
    damaged_chunk_stops_the_vm("rec-bad-ring", 0);
}

/// Every chunk and manifest file of the repository: (relative path, contents).
fn repo_files(repo: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![repo.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("list repository").flatten() {
            let path = e.path();
            let rel = path.strip_prefix(repo).expect("under repo").to_path_buf();
            let top = rel.components().next().map(|c| c.as_os_str().to_owned());
            // Drill records are the drill's own output; the lock file is not data.
            if top.as_deref() == Some("drills".as_ref()) || rel == Path::new(".lock") {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((rel, std::fs::read(&path).expect("read repository file")));
            }
        }
    }
    out.sort();
    out
}

fn drill(p: &Point, extra: &[&str]) -> (bool, Vec<String>, Vec<String>) {
    let mut a = args(&["backup", "drill", "--repo", &s(&p.repo)]);
    a.extend(args(extra));
    let (st, out, err) = ark(&a);
    (st.success(), out, err)
}

#[test]
fn a_drill_passes_a_good_point_fails_an_unmet_expectation_and_changes_nothing() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("rec-drill");
    let p = disk_point(dir.path());
    let before = repo_files(&p.repo);
    assert!(before.len() > 2, "no repository files to compare");

    let (ok, out, err) = drill(&p, &["--latest", "--timeout", "60s"]);
    assert!(ok, "a good point failed its drill: {out:?} {err:?}");
    assert!(
        out.iter().any(|l| l.starts_with(&format!("PASS {}", p.id))),
        "{out:?}"
    );
    let rows = list(&p.repo, None);
    let last = &row(&rows, &p.id)["last_drill"];
    assert_eq!(last["passed"], true, "{last}");
    assert!(last["first_output_ms"].as_u64().is_some(), "{last}");

    let (ok, out, err) = drill(
        &p,
        &[
            "--id",
            &p.id,
            "--expect",
            "^NEVER-PRINTED$",
            "--timeout",
            "5s",
            "--json",
        ],
    );
    assert!(!ok, "an unmet --expect passed: {out:?}");
    assert!(
        err.iter().any(|l| l.contains("1 of 1 drills failed")),
        "{err:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&out.join("\n")).expect("drill JSON");
    assert_eq!(v[0]["passed"], false, "{v}");
    assert_eq!(v[0]["point"], p.id.as_str(), "{v}");
    // The guest did run; only the expected line was missing.
    assert!(v[0]["first_output_ms"].as_u64().is_some(), "{v}");

    let rows = list(&p.repo, None);
    assert_eq!(row(&rows, &p.id)["last_drill"]["passed"], false);
    let (st, text, _) = ark(&args(&["backup", "list", "--repo", &s(&p.repo)]));
    assert!(st.success());
    let line = text
        .iter()
        .find(|l| l.starts_with(&p.id))
        .expect("the point in backup list");
    assert!(line.contains("FAIL 20"), "no drill column: {line}");

    let after = repo_files(&p.repo);
    assert_eq!(
        before.len(),
        after.len(),
        "the drills added or removed files"
    );
    for ((pa, a), (pb, b)) in before.iter().zip(&after) {
        assert_eq!(pa, pb);
        assert!(a == b, "{} changed during the drills", pa.display());
    }
}

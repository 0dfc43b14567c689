//! Backups into a repository (issue 6), end to end through the `arkvm` CLI: five incremental
//! backups and five restores of the memory guest, disks, dedup, verify, prune with garbage
//! collection, kill -9 during a backup and a prune, two VMs at once, and encryption at rest.

#[path = "backup_support.rs"]
mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use arkvm_tests::{require_kvm, run_to_end, wait_for_path, ScratchDir, Vmm};
use snapshot::repo::Repository;
use support::*;

#[test]
fn five_backups_five_restores() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("bk-five");
    let repo = dir.path().join("repo");
    init_repo(&repo, None);
    let sock = dir.path().join("vm.sock");
    let mut vm = memory_vm("256M", "five", &sock, 1);

    let mut windows = Vec::new();
    for _ in 0..5 {
        windows.push(bracketed_backup(&vm, &sock, &repo, None, pass_gen));
        std::thread::sleep(Duration::from_millis(500));
    }
    let increments = vm
        .stderr()
        .iter()
        .filter(|l| l.contains("incremental backup:"))
        .count();
    assert_eq!(
        increments,
        4,
        "backups 2..5 must be incremental\n{}",
        vm.dump()
    );
    vm.kill();

    let rows = list(&repo, None);
    assert_eq!(rows.len(), 5, "{rows:?}");
    let first = row(&rows, &windows[0].id);
    assert!(first["parent"].is_null(), "{first}");
    let full_hashed = num(first, "bytes_hashed");
    assert!(
        full_hashed >= 256 << 20,
        "first backup read everything: {first}"
    );
    for k in 1..5 {
        let r = row(&rows, &windows[k].id);
        assert_eq!(r["vm"], "five", "{r}");
        assert_eq!(r["parent"], windows[k - 1].id.as_str(), "{r}");
        let (hashed, stored) = (num(r, "bytes_hashed"), num(r, "bytes_stored"));
        let (new, total) = (num(r, "chunks_new"), num(r, "chunks_total"));
        eprintln!(
            "backup {}: hashed {hashed} B = {:.2}% of the full's {full_hashed} B; stored {stored} \
             B = {:.4}% of it ({:.1}% of the full's {} stored B); {new} of {total} chunks new \
             ({:.2}%), {} reused",
            k + 1,
            pct(hashed, full_hashed),
            pct(stored, full_hashed),
            pct(stored, num(first, "bytes_stored")),
            num(first, "bytes_stored"),
            pct(new, total),
            num(r, "chunks_reused"),
        );
        assert!(
            pct(hashed, full_hashed) < 5.0,
            "incremental {} read {hashed} of {full_hashed} bytes: {r}",
            k + 1
        );
        assert!(
            pct(new, total) < 5.0 && pct(stored, full_hashed) < 5.0,
            "incremental {} stored too much: {r}",
            k + 1
        );
        assert!(num(r, "chunks_reused") >= total * 95 / 100, "{r}");
    }

    let mut prev_first: Option<u64> = None;
    for (k, w) in windows.iter().enumerate() {
        let mut r = restore(&repo, &w.id, None, &[]);
        let (i, g) = wait_parsed(&r, 0, pass_gen);
        assert!(
            g > w.before && g <= w.after,
            "point {} restored at GEN {g}, outside its window ({}, {}]\n{}",
            k + 1,
            w.before,
            w.after,
            r.dump()
        );
        if let Some(p) = prev_first {
            assert!(
                g > p,
                "point {} starts at GEN {g}, not after point {k}'s {p}",
                k + 1
            );
        }
        prev_first = Some(g);
        let (_, g2) = wait_parsed(&r, i + 1, pass_gen);
        let (_, g3) = wait_parsed(&r, i + 2, pass_gen);
        assert!(
            g < g2 && g2 < g3,
            "restored GEN not increasing\n{}",
            r.dump()
        );
        assert_not_broken(&r);
        eprintln!(
            "point {} restored: first GEN {g} in ({}, {}]",
            k + 1,
            w.before,
            w.after
        );
        r.kill();
    }
}

/// Where the memory guest of `point` stands, read from the point's memory in the repository:
/// every page of the region holds one generation in both of its qwords, pages `[0, p)` hold
/// `g` and the rest `g - 1`. Returns `(g, p)`; panics on any other picture (a torn image).
fn memory_picture(repo: &Repository, id: &str) -> (u64, usize) {
    let point = repo.read_point(id).expect("read point");
    let mut mem = Vec::new();
    repo.read_object(&point, "memory", &mut mem)
        .expect("read the memory object");
    let q = |o: usize| u64::from_le_bytes(mem[o..o + 8].try_into().expect("8 bytes"));
    let gens: Vec<u64> = (0x40_0000..mem.len())
        .step_by(4096)
        .map(|a| {
            let (lo, hi) = (q(a), q(a + 4088));
            assert_eq!(lo, hi, "point {id}: page {a:#x} is torn ({lo} and {hi})");
            lo
        })
        .collect();
    let g = gens[0];
    let p = gens.iter().take_while(|x| **x == g).count();
    if let Some(i) = gens[p..].iter().position(|x| *x + 1 != g) {
        panic!(
            "point {id}: page {:#x} holds gen {}, but the pages before it {g}/{}",
            0x40_0000 + (p + i) * 4096,
            gens[p + i],
            g - 1
        );
    }
    (g, p)
}

#[test]
fn rotating_writes_between_backups_are_captured_exactly() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("bk-rotate");
    let repo = dir.path().join("repo");
    init_repo(&repo, None);
    // Every page in turn, one page per millisecond: 0.5 s rewrites ~0.8% of 252 MiB, always
    // new pages, and some of them while the previous backup is still being copied.
    let sock = dir.path().join("vm.sock");
    let cmdline = "arkvm.hot_pct=100 arkvm.rate_pages=1";
    let mut vm = start_vm("memory", "256M", "rot", &sock, &["--cmdline", cmdline]);
    vm.wait_line("MEMGUEST hot_pages", LINE_TIMEOUT)
        .unwrap_or_else(|| panic!("memory guest did not start\n{}", vm.dump()));
    let mut ids = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(500));
        ids.push(
            backup(&sock, &repo, None)["id"]
                .as_str()
                .expect("id")
                .to_string(),
        );
    }
    assert_not_broken(&vm);
    vm.kill();

    let rows = list(&repo, None);
    let lib = Repository::open(&repo, None).expect("open repository");
    let mut prev = (0, 0);
    for (k, id) in ids.iter().enumerate() {
        let (g, p) = memory_picture(&lib, id);
        let r = row(&rows, id);
        eprintln!(
            "rotating point {}: gen {g} up to page {p}; hashed {:.2}% of {} B, {} chunks new",
            k + 1,
            pct(num(r, "bytes_hashed"), num(r, "bytes_total")),
            num(r, "bytes_total"),
            num(r, "chunks_new")
        );
        assert!(
            (g, p) > prev,
            "point {} is not after point {k}: {:?} {prev:?}",
            k + 1,
            (g, p)
        );
        if k > 0 {
            assert!(
                pct(num(r, "bytes_hashed"), num(r, "bytes_total")) < 5.0,
                "{r}"
            );
        }
        prev = (g, p);
    }

    // The last point restored (keeping its VM name) goes on being backed up: first in full,
    // since the new process has no tracking, then incrementally; each picture comes later.
    let sock = dir.path().join("restored.sock");
    let mut vm = restore(&repo, &ids[4], None, &["--api-socket".into(), s(&sock)]);
    assert!(
        wait_for_path(&sock, Duration::from_secs(20)),
        "{}",
        vm.dump()
    );
    let mut more = Vec::new();
    for _ in 0..2 {
        more.push(
            backup(&sock, &repo, None)["id"]
                .as_str()
                .expect("id")
                .to_string(),
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        vm.stderr().iter().any(|l| l.contains("no change tracking")),
        "the restored VM's first backup does not say it reads everything\n{}",
        vm.dump()
    );
    assert_not_broken(&vm);
    vm.kill();
    let rows = list(&repo, None);
    for (k, id) in more.iter().enumerate() {
        let r = row(&rows, id);
        assert_eq!(r["vm"], "rot", "{r}");
        let read = pct(num(r, "bytes_hashed"), num(r, "bytes_total"));
        assert!(if k == 0 { read >= 100.0 } else { read < 5.0 }, "{r}");
        let (g, p) = memory_picture(&lib, id);
        assert!(
            (g, p) > prev,
            "backup {} of the restored VM is not later",
            k + 1
        );
        prev = (g, p);
    }
}

/// The disk of the disk test: a ring of 16 MiB (16 repository chunks, of which the guest
/// rewrites a few between two backups) and 4 MiB that stay zero.
const DISK_BYTES: u64 = 20 << 20;
const RING_BLOCKS: u64 = 4096;

#[test]
fn disk_backups_restore_the_disk_at_each_point() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("bk-disk");
    let repo = dir.path().join("repo");
    init_repo(&repo, None);
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(DISK_BYTES))
        .expect("create disk");
    let sock = dir.path().join("vm.sock");
    let disk_arg = s(&disk);
    let mut vm = start_vm(
        "disk",
        "64M",
        "disky",
        &sock,
        &[
            "--disk",
            &disk_arg,
            "--cmdline",
            &format!("arkvm.mode=numbered arkvm.blocks={RING_BLOCKS}"),
        ],
    );
    // Backups 0.2 s apart: the guest rewrites a few of the ring's 16 chunks in between
    // (and during each backup, into the overlay: those writes belong to the next point).
    wait_parsed(&vm, 0, diskgen);
    let mut windows = Vec::new();
    for _ in 0..4 {
        let before = last_parsed(&vm, |l| diskgen(l).map(|(_, n)| n)).expect("a DISKGEN line");
        let id = backup(&sock, &repo, None)["id"]
            .as_str()
            .expect("id")
            .to_string();
        windows.push(Window {
            before,
            after: u64::MAX,
            id,
        });
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, (_, after)) = wait_parsed(&vm, vm.stdout().len(), diskgen);
    assert_not_broken(&vm);
    vm.kill();

    let rows = list(&repo, None);
    let lib = Repository::open(&repo, None).expect("open repository");
    let mut prev_n = 0;
    for (k, w) in windows.iter().enumerate() {
        let r = row(&rows, &w.id);
        if k > 0 {
            eprintln!(
                "disk backup {}: hashed {} of {} bytes, {} of {} chunks new",
                k + 1,
                num(r, "bytes_hashed"),
                num(r, "bytes_total"),
                num(r, "chunks_new"),
                num(r, "chunks_total")
            );
            // Memory (64 chunks, 2 of them written), disk (20 chunks: the ring's 16, of which
            // the guest rewrote a few, and 4 never written) and one state chunk.
            assert!(
                num(r, "chunks_hashed") <= 2 + 16 + 1,
                "not incremental: {r}"
            );
        }
        let (n, b) = point_disk_status(&lib, &w.id);
        assert_eq!(b, RING_BLOCKS, "ring size");
        assert!(
            n >= w.before && n <= after && n > prev_n,
            "point {}: DISK_LAST {n} not after {} and the previous point's {prev_n}, or not \
             before {after}",
            k + 1,
            w.before,
        );
        prev_n = n;
        let point = lib.read_point(&w.id).expect("read point");
        let mut image = Vec::new();
        lib.read_object(&point, "disk-disk0", &mut image)
            .expect("read the disk object");
        assert_eq!(image.len() as u64, DISK_BYTES);
        let on_disk = ring_last(&image, b, &format!("point {} disk", k + 1));
        // A write the guest has not yet seen complete may already be on the disk.
        assert!(
            on_disk == n || on_disk == n + 1,
            "point {}: the disk's newest write is {on_disk}, the guest saw {n} complete",
            k + 1
        );
        eprintln!("point {}: DISK_LAST {n}, disk newest {on_disk}", k + 1);

        // Restore it with its disk: the guest re-checks every block it rewrites.
        let disk_dir = dir.path().join(format!("disks{k}"));
        let mut vm = restore(&repo, &w.id, None, &["--disk-dir".into(), s(&disk_dir)]);
        let (i, (g, _)) = wait_parsed(&vm, 0, diskgen);
        assert!(
            g >= n / b,
            "restored disk guest is at gen {g}, the point at {}",
            n / b
        );
        let (i, _) = wait_parsed(&vm, i + 1, diskgen);
        wait_parsed(&vm, i + 1, diskgen);
        assert_not_broken(&vm);
        vm.kill();
        let files: Vec<_> = std::fs::read_dir(&disk_dir)
            .expect("restored disk dir")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let restored = std::fs::read(&files[0]).expect("read restored disk");
        let last = ring_last(&restored, b, &format!("point {} restored disk", k + 1));
        assert!(last > n, "the restored guest did not write its disk");
    }
}

#[test]
fn idle_guest_and_twin_vms_deduplicate() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("bk-dedup");
    let repo = dir.path().join("repo");
    init_repo(&repo, None);

    let sock_a = dir.path().join("a.sock");
    let mut a = memory_vm("256M", "idle-a", &sock_a, 0);
    wait_parsed(&a, 0, pass_gen);
    let a1 = backup(&sock_a, &repo, None);
    std::thread::sleep(Duration::from_millis(500));
    let a2 = backup(&sock_a, &repo, None);
    assert_not_broken(&a);
    a.kill();

    let sock_b = dir.path().join("b.sock");
    let mut b = memory_vm("256M", "idle-b", &sock_b, 0);
    wait_parsed(&b, 0, pass_gen);
    let b1 = backup(&sock_b, &repo, None);
    b.kill();

    let rows = list(&repo, None);
    assert_eq!(rows.len(), 3, "{rows:?}");
    let ra1 = row(&rows, a1["id"].as_str().expect("id"));
    let ra2 = row(&rows, a2["id"].as_str().expect("id"));
    let rb1 = row(&rows, b1["id"].as_str().expect("id"));
    let second = pct(num(ra2, "bytes_stored"), num(ra2, "bytes_total"));
    eprintln!(
        "idle: the second backup stored {} B = {second:.4}% of its {} B ({} of {} chunks new; \
         the first stored {} B)",
        num(ra2, "bytes_stored"),
        num(ra2, "bytes_total"),
        num(ra2, "chunks_new"),
        num(ra2, "chunks_total"),
        num(ra1, "bytes_stored"),
    );
    assert!(second < 1.0, "idle second backup stored too much: {ra2}");
    assert!(
        num(ra2, "chunks_new") * 100 < num(ra2, "chunks_total") * 2,
        "idle second backup has too many new chunks: {ra2}"
    );

    let refs_a = point_refs(&repo, ra1["id"].as_str().expect("id"));
    let list_b = point_ref_list(&repo, rb1["id"].as_str().expect("id"));
    let shared = list_b.iter().filter(|c| refs_a.contains(*c)).count();
    eprintln!(
        "twins: B's first backup stored {} B vs A's first {} B ({:.1}%); {} of {} chunks new; \
         {shared} of B's {} chunk references are A's chunks",
        num(rb1, "bytes_stored"),
        num(ra1, "bytes_stored"),
        pct(num(rb1, "bytes_stored"), num(ra1, "bytes_stored")),
        num(rb1, "chunks_new"),
        num(rb1, "chunks_total"),
        list_b.len()
    );
    assert!(
        rb1["parent"].is_null(),
        "B's first backup has no parent: {rb1}"
    );
    assert!(
        num(rb1, "bytes_hashed") >= num(rb1, "bytes_total"),
        "B's first backup must read everything: {rb1}"
    );
    assert!(
        num(rb1, "chunks_new") * 100 < num(rb1, "chunks_total") * 3,
        "B's first backup did not reuse A's chunks: {rb1}"
    );
    assert!(
        shared * 100 >= list_b.len() * 95,
        "only {shared} of B's {} chunk references are A's chunks",
        list_b.len()
    );
    assert_clean(&repo, None, 3);
}

#[test]
fn verify_finds_flipped_bytes_and_restore_refuses_them() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("bk-verify");
    let repo = dir.path().join("repo");
    init_repo(&repo, None);
    let ids = memory_points(dir.path(), &repo, None, "dmg", 2);
    assert_clean(&repo, None, 2);
    let (p1, p2) = (&ids[0], &ids[1]);

    // A chunk only the second point uses, damaged at its tag byte, in the middle, at the end.
    let only2: Vec<String> = point_refs(&repo, p2)
        .difference(&point_refs(&repo, p1))
        .cloned()
        .collect();
    assert!(
        !only2.is_empty(),
        "the second point has no chunk of its own"
    );
    let chunk = &only2[0];
    let path = chunk_path(&repo, chunk);
    let len = std::fs::metadata(&path).expect("chunk file").len() as usize;
    for at in [0, len / 2, len - 1] {
        flip_byte(&path, at);
        let (code, v) = verify(&repo, None);
        assert_eq!(
            code, 3,
            "verify missed a flipped byte at {at} of chunk {chunk}: {v}"
        );
        let damaged = v["damaged_chunks"].as_array().expect("damaged_chunks");
        assert_eq!(damaged.len(), 1, "{v}");
        assert_eq!(damaged[0]["id"], chunk.as_str(), "{v}");
        assert_eq!(damaged[0]["points"], serde_json::json!([p2]), "{v}");
        let text = run_to_end(
            &args(&["backup", "verify", "--repo", &s(&repo)]),
            CMD_TIMEOUT,
        );
        assert_eq!(text.0.code(), Some(3));
        assert!(
            text.1
                .iter()
                .any(|l| l.contains(chunk.as_str()) && l.contains(p2.as_str())),
            "verify's text does not name the chunk and its point: {:?}",
            text.1
        );
        assert_restore_refused(&repo, p2, None, chunk);
        flip_byte(&path, at);
    }
    // The same chunk missing.
    let saved = std::fs::read(&path).expect("read chunk");
    std::fs::remove_file(&path).expect("remove chunk");
    let (code, v) = verify(&repo, None);
    assert_eq!(code, 3, "verify missed a missing chunk: {v}");
    assert_eq!(v["damaged_chunks"][0]["id"], chunk.as_str(), "{v}");
    assert_eq!(
        v["damaged_chunks"][0]["points"],
        serde_json::json!([p2]),
        "{v}"
    );
    assert_restore_refused(&repo, p2, None, chunk);
    std::fs::write(&path, saved).expect("put the chunk back");
    assert_clean(&repo, None, 2);
    assert_restores(&repo, p1, None);

    // The first point's manifest, damaged at its first byte, in the middle and at the end.
    let path = point_path(&repo, p1);
    let len = std::fs::metadata(&path).expect("manifest").len() as usize;
    for at in [0, len / 2, len - 2] {
        flip_byte(&path, at);
        let (code, v) = verify(&repo, None);
        assert_eq!(
            code, 3,
            "verify missed a flipped byte at {at} of {p1}'s manifest: {v}"
        );
        let points = v["damaged_points"].as_array().expect("damaged_points");
        assert_eq!(points.len(), 1, "{v}");
        assert_eq!(points[0]["id"], p1.as_str(), "{v}");
        let rows = list(&repo, None);
        assert!(row(&rows, p1)["error"].is_string(), "{rows:?}");
        assert_restore_refused(&repo, p1, None, p1);
        flip_byte(&path, at);
    }
    assert_clean(&repo, None, 2);
    assert_restores(&repo, p2, None);
}

#[test]
fn prune_collects_exactly_the_unreferenced_chunks() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("bk-prune");
    let repo = dir.path().join("repo");
    init_repo(&repo, None);
    let ids = memory_points(dir.path(), &repo, None, "pr", 4);
    let other = memory_points(dir.path(), &repo, None, "other", 1);
    let before = chunk_files(&repo);
    let all_refs: BTreeSet<String> = ids
        .iter()
        .chain(&other)
        .flat_map(|id| point_refs(&repo, id))
        .collect();
    assert_eq!(before, all_refs, "chunk files before the prune");

    let (st, out, err) = ark(&args(&[
        "backup",
        "prune",
        "--repo",
        &s(&repo),
        "--keep-last",
        "2",
        "--json",
    ]));
    assert!(st.success(), "prune failed: {out:?} {err:?}");
    let report = json_line(&out);
    let removed: BTreeSet<&str> = report["removed"]
        .as_array()
        .expect("removed")
        .iter()
        .map(|v| v.as_str().expect("id"))
        .collect();
    assert_eq!(
        removed,
        [ids[0].as_str(), ids[1].as_str()].into_iter().collect(),
        "{report}"
    );

    let kept = [&ids[2], &ids[3], &other[0]];
    let rows = list(&repo, None);
    let listed: BTreeSet<&str> = rows.iter().map(|r| r["id"].as_str().expect("id")).collect();
    assert_eq!(
        listed,
        kept.iter().map(|s| s.as_str()).collect(),
        "{rows:?}"
    );
    let referenced: BTreeSet<String> = kept.iter().flat_map(|id| point_refs(&repo, id)).collect();
    let after = chunk_files(&repo);
    let gone: BTreeSet<String> = before.difference(&after).cloned().collect();
    let expected_gone: BTreeSet<String> = before.difference(&referenced).cloned().collect();
    eprintln!(
        "prune: {} chunks before, {} after, {} collected",
        before.len(),
        after.len(),
        gone.len()
    );
    assert!(
        !expected_gone.is_empty(),
        "the pruned points had no chunk of their own"
    );
    assert_eq!(gone, expected_gone, "prune collected the wrong chunks");
    assert_eq!(after, referenced, "chunk files after the prune");
    assert_eq!(report["chunks_removed"], gone.len() as u64, "{report}");

    assert_clean(&repo, None, 3);
    for id in kept {
        assert_restores(&repo, id, None);
    }
}

#[test]
fn kill_during_backup_or_prune_leaves_a_clean_repository() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("bk-crash");
    let repo = dir.path().join("repo");
    init_repo(&repo, None);

    // kill -9 of the VM process while its 2 GiB full backup is being written.
    let sock = dir.path().join("big.sock");
    let mut vm = memory_vm("2G", "crash", &sock, 1);
    wait_parsed(&vm, 0, pass_gen);
    let mut client = Vmm::spawn(&snapshot_args(&sock, &repo, None));
    let deadline = Instant::now() + Duration::from_secs(30);
    while chunk_files(&repo).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the backup wrote no chunk\n{}",
            client.dump()
        );
        assert!(
            !client.has_exited(),
            "the backup ended early\n{}",
            client.dump()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !client.has_exited() && point_files(&repo) == 0,
        "the 2 GiB backup finished before the kill\n{}",
        client.dump()
    );
    vm.kill();
    let status = client
        .wait_exit(Duration::from_secs(30))
        .expect("the snapshot client ends when its VM dies");
    assert!(
        !status.success(),
        "snapshot reported success\n{}",
        client.dump()
    );
    let orphans = chunk_files(&repo).len();
    eprintln!("killed a 2 GiB backup: {orphans} chunks were written, no point");
    assert_eq!(list(&repo, None), Vec::<serde_json::Value>::new());
    assert_eq!(point_files(&repo), 0, "a partial point manifest was left");
    assert_clean(&repo, None, 0);

    // A new process of the same VM: a full backup, an incremental one; after one more restart
    // the tracking is lost, so the next backup reads everything and says so.
    let sock = dir.path().join("a.sock");
    let mut vm = memory_vm("256M", "crash", &sock, 1);
    wait_parsed(&vm, 0, pass_gen);
    let p1 = backup(&sock, &repo, None);
    let p2 = backup(&sock, &repo, None);
    vm.kill();
    let sock = dir.path().join("b.sock");
    let mut vm = memory_vm("256M", "crash", &sock, 1);
    wait_parsed(&vm, 0, pass_gen);
    let p3 = backup(&sock, &repo, None);
    assert!(
        vm.stderr().iter().any(|l| l.contains("no change tracking")),
        "a backup after a restart does not say it reads everything\n{}",
        vm.dump()
    );
    vm.kill();
    let rows = list(&repo, None);
    let read = |p: &serde_json::Value| {
        let r = row(&rows, p["id"].as_str().expect("id"));
        pct(num(r, "bytes_hashed"), num(r, "bytes_total"))
    };
    assert!(read(&p1) >= 100.0 && read(&p3) >= 100.0, "{rows:?}");
    assert!(read(&p2) < 5.0, "{rows:?}");
    assert_clean(&repo, None, 3);

    // kill -9 of prune --keep-last 1: once it deleted a manifest, then once it deleted a chunk.
    let template = dir.path().join("template");
    std::fs::rename(&repo, &template).expect("keep the repository as a template");
    let copy = |to: &Path| {
        let st = std::process::Command::new("cp")
            .args(["-a", &s(&template), &s(to)])
            .status()
            .expect("cp");
        assert!(st.success());
    };
    let chunks0 = chunk_files(&template).len();
    let scenarios: [(&str, ReadyCheck); 2] = [
        ("after a manifest", Box::new(|r: &Path| point_files(r) < 3)),
        (
            "after a chunk",
            Box::new(move |r: &Path| chunk_files(r).len() < chunks0),
        ),
    ];
    for (n, (what, ready)) in scenarios.iter().enumerate() {
        let r = dir.path().join(format!("prune{n}"));
        copy(&r);
        let killed = kill_prune_midway(&r, || ready(&r), Duration::from_millis(2 + 3 * n as u64));
        let points = point_files(&r);
        let chunks = chunk_files(&r).len();
        eprintln!(
            "prune killed {what} (strace: {}): died of the kill: {killed}; {points} of 3 points \
             and {chunks} of {chunks0} chunks left",
            have_strace()
        );
        if have_strace() {
            assert!(killed, "prune finished before the kill");
        }
        let rows = list(&r, None);
        assert!(
            rows.iter().all(|row| row["error"].is_null()),
            "a damaged point is listed after the kill: {rows:?}"
        );
        assert_eq!(rows.len(), points, "{rows:?}");
        assert_clean(&r, None, points);
        let newest = rows
            .iter()
            .map(|row| row["id"].as_str().expect("id"))
            .max()
            .expect("a point is left");
        assert_restores(&r, newest, None);
        // Finishing the prune leaves exactly the newest point and its chunks.
        let (st, out, err) = ark(&args(&[
            "backup",
            "prune",
            "--repo",
            &s(&r),
            "--keep-last",
            "1",
        ]));
        assert!(st.success(), "prune after the kill failed: {out:?} {err:?}");
        assert_eq!(point_files(&r), 1);
        assert_eq!(chunk_files(&r), point_refs(&r, newest));
        assert_clean(&r, None, 1);
    }
}

#[test]
fn two_vms_back_up_at_once_beside_a_prune() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("bk-conc");
    let repo = dir.path().join("repo");
    init_repo(&repo, None);
    let (sock1, sock2) = (dir.path().join("c1.sock"), dir.path().join("c2.sock"));
    let mut vm1 = memory_vm("256M", "c1", &sock1, 1);
    let mut vm2 = memory_vm("256M", "c2", &sock2, 1);
    wait_parsed(&vm1, 0, pass_gen);
    wait_parsed(&vm2, 0, pass_gen);

    let mut last = Vec::new();
    for round in 0..3 {
        let mut cmds = vec![
            snapshot_args(&sock1, &repo, None),
            snapshot_args(&sock2, &repo, None),
        ];
        if round == 2 {
            cmds.push(args(&[
                "backup",
                "prune",
                "--repo",
                &s(&repo),
                "--keep-last",
                "1",
            ]));
        }
        let results = run_together(cmds);
        for (ok, _, dump) in &results {
            assert!(ok, "round {round}: a concurrent command failed\n{dump}");
        }
        last = results[..2]
            .iter()
            .map(|(_, out, _)| json_line(out)["id"].as_str().expect("id").to_string())
            .collect();
        if round == 0 {
            // The two full backups overlapped in time (log timestamps sort as text).
            let (a1, c1) = (
                log_time(&vm1, "cow snapshot armed"),
                log_time(&vm1, "committed"),
            );
            let (a2, c2) = (
                log_time(&vm2, "cow snapshot armed"),
                log_time(&vm2, "committed"),
            );
            eprintln!("c1 backup {a1}..{c1}, c2 backup {a2}..{c2}");
            assert!(a1 < c2 && a2 < c1, "the two backups did not overlap");
        }
        if round == 1 {
            let rows = list(&repo, None);
            assert_eq!(rows.len(), 4, "{rows:?}");
            for (vm, id) in ["c1", "c2"].iter().zip(&last) {
                let r = row(&rows, id);
                assert_eq!(r["vm"], *vm, "{r}");
                let parent = r["parent"].as_str().expect("incremental has a parent");
                assert_eq!(row(&rows, parent)["vm"], *vm, "parent of another VM: {r}");
                assert!(
                    pct(num(r, "bytes_hashed"), num(r, "bytes_total")) < 5.0,
                    "{r}"
                );
            }
            assert_clean(&repo, None, 4);
        }
    }
    assert_not_broken(&vm1);
    assert_not_broken(&vm2);
    vm1.kill();
    vm2.kill();

    let rows = list(&repo, None);
    for (vm, id) in ["c1", "c2"].iter().zip(&last) {
        row(&rows, id);
        let n = rows.iter().filter(|r| r["vm"] == *vm).count();
        assert!(
            (1..=2).contains(&n),
            "{vm} has {n} points after prune: {rows:?}"
        );
    }
    assert_clean(&repo, None, rows.len());
    let referenced: BTreeSet<String> = rows
        .iter()
        .flat_map(|r| point_refs(&repo, r["id"].as_str().expect("id")))
        .collect();
    assert_eq!(
        chunk_files(&repo),
        referenced,
        "chunks after prune beside backups"
    );
    for id in &last {
        assert_restores(&repo, id, None);
    }
}

#[test]
fn encrypted_repository_needs_its_key() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("bk-enc");
    let repo = dir.path().join("repo");
    let key = dir.path().join("repo.key");
    init_repo(&repo, Some(&key));
    assert!(
        key.exists(),
        "backup init --key did not create the key file"
    );
    let ids = memory_points(dir.path(), &repo, Some(&key), "enc", 2);
    assert_eq!(list(&repo, Some(&key)).len(), 2);
    assert_clean(&repo, Some(&key), 2);
    for c in chunk_files(&repo) {
        let b = std::fs::read(chunk_path(&repo, &c)).expect("read chunk");
        assert_eq!(b.first(), Some(&b'E'), "chunk {c} is not sealed");
    }

    let r = s(&repo);
    let wrong = dir.path().join("wrong.key");
    init_repo(&dir.path().join("other"), Some(&wrong));
    for (extra, needle) in [
        (vec![], "key is required"),
        (key_args(Some(&wrong)), "not this repository's key"),
    ] {
        let with = |mut a: Vec<String>| {
            a.extend(extra.iter().cloned());
            a
        };
        assert_refused(&with(args(&["backup", "list", "--repo", &r])), needle);
        assert_refused(&with(args(&["backup", "verify", "--repo", &r])), needle);
        assert_refused(
            &with(args(&["restore", "--repo", &r, "--id", &ids[1]])),
            needle,
        );
    }

    // Without the key nothing can be altered unnoticed: a flipped manifest byte, a flipped
    // chunk byte, and one chunk's sealed bytes moved under another chunk's name.
    let manifest = point_path(&repo, &ids[0]);
    let len = std::fs::metadata(&manifest).expect("manifest").len() as usize;
    flip_byte(&manifest, len / 2);
    let (code, v) = verify(&repo, Some(&key));
    assert_eq!(code, 3, "{v}");
    assert_eq!(v["damaged_points"][0]["id"], ids[0].as_str(), "{v}");
    assert_restore_refused(&repo, &ids[0], Some(&key), &ids[0]);
    flip_byte(&manifest, len / 2);

    let only2: Vec<String> = point_refs_with_key(&repo, &key, &ids[1])
        .difference(&point_refs_with_key(&repo, &key, &ids[0]))
        .cloned()
        .collect();
    let victim = chunk_path(&repo, &only2[0]);
    let original = std::fs::read(&victim).expect("read chunk");
    let len = original.len();
    flip_byte(&victim, len / 2);
    let (code, v) = verify(&repo, Some(&key));
    assert_eq!(code, 3, "{v}");
    assert_eq!(v["damaged_chunks"][0]["id"], only2[0].as_str(), "{v}");
    assert_restore_refused(&repo, &ids[1], Some(&key), &only2[0]);
    let other = chunk_files(&repo)
        .into_iter()
        .find(|c| *c != only2[0])
        .expect("another chunk");
    std::fs::copy(chunk_path(&repo, &other), &victim).expect("swap a chunk in");
    let (code, v) = verify(&repo, Some(&key));
    assert_eq!(
        code, 3,
        "a chunk moved under another name went unnoticed: {v}"
    );
    std::fs::write(&victim, original).expect("put the chunk back");
    assert_clean(&repo, Some(&key), 2);
    assert_restores(&repo, &ids[1], Some(&key));
}

#[test]
fn backup_commands_into_a_closed_pipe_do_not_panic() {
    // `arkvm backup list --repo R | head -1` and the like: the reader goes away early.
    let dir = ScratchDir::new("bk-pipe");
    let repo = dir.path().join("repo");
    init_repo(&repo, None);
    let r = s(&repo);
    for a in [
        args(&["backup", "list", "--repo", &r]),
        args(&["backup", "list", "--repo", &r, "--json"]),
        args(&["backup", "verify", "--repo", &r]),
    ] {
        let (st, err) = run_into_closed_pipe(&a);
        assert!(
            !err.contains("panicked") && st.code() != Some(101),
            "arkvm {} | true: exit {st:?}, stderr:\n{err}",
            a.join(" ")
        );
    }
}

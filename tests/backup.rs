//! Backups into a repository (issue 6), end to end through the `arkvm` CLI. This file: five
//! incremental backups and five restores of the memory guest, rotating writes read back from
//! the repository, disks, and dedup. `backup_safety.rs` (a module of this test binary): verify,
//! prune with garbage collection, kill -9 during a backup and a prune, two VMs at once,
//! encryption at rest.

#[path = "backup_support.rs"]
mod support;

#[path = "backup_safety.rs"]
mod safety;

#[path = "disk_points.rs"]
mod disk_points;

use std::time::Duration;

use arkvm_tests::{require_kvm, wait_for_path, ScratchDir};
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

/// Every mode of backup may follow every other: a paused or pre-copy backup followed by a live
/// one must not leave the live one taking memory from its parent unread (the first live snapshot
/// arms fresh write tracking, which knows nothing of what was written before it).
#[test]
fn backups_of_every_mode_in_a_row_each_hold_later_memory() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("bk-modes");
    let repo = dir.path().join("repo");
    init_repo(&repo, None);
    let sock = dir.path().join("vm.sock");
    let cmdline = "arkvm.hot_pct=100 arkvm.rate_pages=1";
    let mut vm = start_vm("memory", "256M", "modes", &sock, &["--cmdline", cmdline]);
    vm.wait_line("MEMGUEST hot_pages", LINE_TIMEOUT)
        .unwrap_or_else(|| panic!("memory guest did not start\n{}", vm.dump()));
    let take = |extra: &[&str]| {
        let mut a = snapshot_args(&sock, &repo, None);
        a.extend(extra.iter().map(|x| x.to_string()));
        let (st, out, err) = ark(&a);
        assert!(st.success(), "snapshot {extra:?} failed: {out:?} {err:?}");
        let v = json_line(&out);
        assert_eq!(v["state"], "done", "{v}");
        v["id"].as_str().expect("id").to_string()
    };
    let mut ids = Vec::new();
    for extra in [
        &["--paused"][..],
        &[],
        &["--strategy", "precopy"],
        &[],
        &["--paused"],
        &[],
    ] {
        std::thread::sleep(Duration::from_millis(500));
        ids.push((extra.join(" "), take(extra)));
    }
    assert_not_broken(&vm);
    vm.kill();
    let lib = Repository::open(&repo, None).expect("open repository");
    let mut prev = (0, 0);
    for (mode, id) in &ids {
        let picture = memory_picture(&lib, id);
        eprintln!(
            "backup [{mode}] {id}: gen {} up to page {}",
            picture.0, picture.1
        );
        assert!(
            picture > prev,
            "the backup [{mode}] holds memory no later than the one before it: {picture:?} {prev:?}"
        );
        prev = picture;
    }
}

#[test]
fn disk_backups_restore_the_disk_at_each_point() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("bk-disk");
    let repo = dir.path().join("repo");
    disk_points::backups_restore_the_disk_at_each_point(dir.path(), &repo, 4);
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

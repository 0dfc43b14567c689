//! Backups into a repository (issue 6), the repository's safety: verify finds flipped bytes
//! and restore refuses them, prune collects exactly the unreferenced chunks, kill -9 during a
//! backup or a prune, two VMs backing up at once beside a prune, encryption at rest, and
//! output into a closed pipe. A module of the `backup` test binary (tests/backup.rs).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use arkvm_tests::{require_kvm, ScratchDir, Vmm};

use super::support::*;

/// 24 byte positions over a file of `len` bytes: the first, the last, and 22 spread between
/// them by a fixed pseudo-random sequence.
fn spread_positions(len: usize) -> Vec<usize> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v = vec![0, len - 1];
    for _ in 0..22 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push((x % len as u64) as usize);
    }
    v
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

    // A chunk only the second point uses, damaged at 24 places in turn (tag byte, last byte).
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
    for at in spread_positions(len) {
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
        let text = ark(&args(&["backup", "verify", "--repo", &s(&repo)]));
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

    // The first point's manifest, damaged at 24 places in turn (first and last byte).
    let path = point_path(&repo, p1);
    let len = std::fs::metadata(&path).expect("manifest").len() as usize;
    for at in spread_positions(len) {
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

    // --keep-daily 1: every point is from today, so each VM keeps its newest.
    let (st, out, err) = ark(&args(&[
        "backup",
        "prune",
        "--repo",
        &s(&repo),
        "--keep-daily",
        "1",
    ]));
    assert!(st.success(), "prune --keep-daily failed: {out:?} {err:?}");
    let rows = list(&repo, None);
    let listed: BTreeSet<&str> = rows.iter().map(|r| r["id"].as_str().expect("id")).collect();
    assert_eq!(
        listed,
        [ids[3].as_str(), other[0].as_str()].into_iter().collect()
    );
    let referenced: BTreeSet<String> = listed.iter().flat_map(|id| point_refs(&repo, id)).collect();
    assert_eq!(
        chunk_files(&repo),
        referenced,
        "chunk files after --keep-daily 1"
    );
    assert_clean(&repo, None, 2);
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
        let leftovers: Vec<_> = std::fs::read_dir(r.join(".tmp"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            leftovers.is_empty(),
            "in-flight files left after gc: {leftovers:?}"
        );
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
        // In the first two rounds a garbage collection runs over and over beside the backups
        // (--keep-last 5 removes no point here): it must never take a chunk that an unfinished
        // backup has stored or found already stored.
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (results, collections) = std::thread::scope(|scope| {
            let gc = scope.spawn(|| {
                let mut n = 0;
                let a = args(&["backup", "prune", "--repo", &s(&repo), "--keep-last", "5"]);
                while round < 2 && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (st, out, err) = ark(&a);
                    assert!(st.success(), "gc beside backups failed: {out:?} {err:?}");
                    n += 1;
                }
                n
            });
            let results = run_together(cmds);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            (results, gc.join().expect("gc loop"))
        });
        for (ok, _, dump) in &results {
            assert!(ok, "round {round}: a concurrent command failed\n{dump}");
        }
        eprintln!("round {round}: {collections} garbage collections ran beside the backups");
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
    let rows = list(&repo, Some(&key));
    assert_eq!(rows.len(), 2);
    let second = row(&rows, &ids[1]);
    eprintln!(
        "encrypted incremental: hashed {:.2}%, {} of {} chunks new",
        pct(num(second, "bytes_hashed"), num(second, "bytes_total")),
        num(second, "chunks_new"),
        num(second, "chunks_total")
    );
    // 64 MiB: 65 chunks, of which the hot pages, the status page and the state change.
    assert!(
        num(second, "chunks_hashed") * 10 < num(second, "chunks_total"),
        "encrypted backups are not incremental: {second}"
    );
    assert!(
        num(second, "chunks_new") * 10 < num(second, "chunks_total"),
        "encrypted backups do not deduplicate: {second}"
    );
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

/// The entries of `dir` (names), empty if it does not exist.
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn restore_from_a_repository_leaves_no_copy_behind_when_killed() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("bk-leak");
    let repo = dir.path().join("repo");
    init_repo(&repo, None);
    let ids = memory_points(dir.path(), &repo, None, "leak", 1);
    // The restore runs with its own TMPDIR, so whatever it puts there can be seen.
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).expect("create tmp");
    let mut child = std::process::Command::new(arkvm_tests::arkvm_bin())
        .args(["restore", "--repo", &s(&repo), "--id", &ids[0]])
        .env("TMPDIR", &tmp)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn restore");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("PASS") {
                let _ = tx.send(());
            }
        }
    });
    let running = rx.recv_timeout(LINE_TIMEOUT).is_ok();
    let during = entries(&tmp);
    let _ = child.kill();
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(100));
    let after = entries(&tmp);
    eprintln!("restore's TMPDIR while running: {during:?}; after kill -9: {after:?}");
    assert!(running, "the restored guest did not run");
    assert!(
        after.is_empty(),
        "kill -9 of `arkvm restore --repo` left a full copy of the point behind: {after:?}"
    );
}

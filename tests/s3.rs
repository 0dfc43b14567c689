//! The backup repository in an S3 bucket (issue 12), against a real Ceph RGW started by
//! `scripts/ceph-rgw` (scripts/test starts it before and stops it after; run alone, the first
//! test starts it and leaves it running: `scripts/ceph-rgw stop` ends it). This file: backups of
//! a running guest into `s3://`, list, verify, restore, damage, misconfiguration, and the disk
//! guest's points (`disk_points.rs`, shared with tests/backup.rs) restored from the bucket.
//! `s3_faults.rs` (a module of this test binary): radosgw killed mid-backup, and two VMs backing
//! up while prune runs. `s3_dr.rs`: `run --dr-target s3://` and `dr recover --repo s3://`.

#[path = "backup_support.rs"]
#[allow(dead_code)]
mod support;

#[path = "s3_support.rs"]
mod s3;

#[path = "s3_faults.rs"]
mod faults;

#[path = "s3_dr.rs"]
mod dr;

#[path = "disk_points.rs"]
mod disk_points;

use arkvm_tests::{require_kvm, ScratchDir};
use s3::*;
use snapshot::repo::ChunkStore;
use support::*;

#[test]
fn backups_into_s3_list_verify_restore_and_refuse_damage() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("s3-main");
    let repo = fresh_repo("main");
    init_repo(&repo, None);
    assert!(store(&repo).contains("config.json").unwrap());
    let sock = dir.path().join("vm.sock");
    let mut vm = memory_vm("64M", "s3vm", &sock, 1);

    // A full backup, then two incrementals that upload only what changed.
    let mut windows = Vec::new();
    let mut objects = Vec::new();
    for _ in 0..3 {
        windows.push(bracketed_backup(&vm, &sock, &repo, None, pass_gen));
        objects.push(chunk_objects(&repo).len() as u64);
    }
    vm.kill();
    let rows = list(&repo, None);
    assert_eq!(rows.len(), 3, "{rows:?}");
    let first = row(&rows, &windows[0].id);
    assert!(first["parent"].is_null(), "{first}");
    assert_eq!(
        num(first, "chunks_new"),
        objects[0],
        "the full backup uploaded every chunk object the bucket holds: {first}"
    );
    for k in 1..3 {
        let r = row(&rows, &windows[k].id);
        assert_eq!(r["parent"], windows[k - 1].id.as_str(), "{r}");
        let (new, total) = (num(r, "chunks_new"), num(r, "chunks_total"));
        assert_eq!(
            objects[k] - objects[k - 1],
            new,
            "backup {} uploaded exactly its new chunks: {r}",
            k + 1
        );
        assert!(
            new * 10 < total && num(r, "chunks_reused") * 10 >= total * 9,
            "backup {} is not incremental: {r}",
            k + 1
        );
        eprintln!("s3 backup {}: {new} of {total} chunks uploaded", k + 1);
    }
    assert_clean(&repo, None, 3);

    // The first point restores from the bucket and runs untorn.
    let w = &windows[0];
    let mut r = restore(&repo, &w.id, None, &[]);
    let (i, g) = wait_parsed(&r, 0, pass_gen);
    assert!(
        g > w.before && g <= w.after,
        "point restored at GEN {g}, outside its window ({}, {}]\n{}",
        w.before,
        w.after,
        r.dump()
    );
    let (_, g2) = wait_parsed(&r, i + 1, pass_gen);
    assert!(g2 > g, "{}", r.dump());
    assert_not_broken(&r);
    r.kill();

    // A flipped byte in a chunk object of the third point only, then the object deleted.
    let (p2, p3) = (&windows[1].id, &windows[2].id);
    let repo_open = snapshot::repo::Repository::open(&repo, None).unwrap();
    let used = |id: &str| -> std::collections::BTreeSet<String> {
        let point = repo_open.read_point(id).unwrap();
        point.chunk_ids().map(|c| c.to_hex()).collect()
    };
    let only3: Vec<String> = used(p3).difference(&used(p2)).cloned().collect();
    assert!(!only3.is_empty(), "the third point has no chunk of its own");
    let chunk = &only3[0];
    let name = format!("chunks/{}/{chunk}", &chunk[..4]);
    let bucket = store(&repo);
    let saved = bucket.get(&name).expect("the chunk object");
    let mut damaged = saved.clone();
    let at = damaged.len() / 2;
    damaged[at] ^= 1;
    bucket.delete(&name).unwrap();
    assert!(bucket.put_if_absent(&name, &damaged).unwrap());
    let (code, v) = verify(&repo, None);
    assert_eq!(code, 3, "verify missed a flipped byte: {v}");
    assert_eq!(v["damaged_chunks"][0]["id"], chunk.as_str(), "{v}");
    assert_eq!(
        v["damaged_chunks"][0]["points"],
        serde_json::json!([p3]),
        "{v}"
    );
    assert_restore_refused(&repo, p3, None, chunk);

    bucket.delete(&name).unwrap();
    let (code, v) = verify(&repo, None);
    assert_eq!(code, 3, "verify missed a deleted chunk: {v}");
    assert_eq!(v["damaged_chunks"][0]["id"], chunk.as_str(), "{v}");
    assert_restore_refused(&repo, p3, None, chunk);

    assert!(bucket.put_if_absent(&name, &saved).unwrap());
    assert_clean(&repo, None, 3);
}

#[test]
fn disk_backups_in_s3_restore_a_disk_consistent_with_memory() {
    require_kvm();
    let _serial = serial();
    let dir = ScratchDir::new("s3-disk");
    let repo = fresh_repo("disk");
    // Three points: a full and two incrementals, each restored with its disk read through
    // from the bucket and hydrated.
    disk_points::backups_restore_the_disk_at_each_point(dir.path(), &repo, 3);
}

#[test]
fn a_replaced_manifest_is_not_served_from_the_cache() {
    // Every test of this binary is serial: the fault test stops radosgw for a while.
    let _serial = serial();
    let repo = fresh_repo("cache");
    init_repo(&repo, None);
    // A point with one small state object is enough: no guest needed.
    let api = snapshot::repo::Repository::open(&repo, None).unwrap();
    let mut writer = api.start_backup("cached", None).unwrap();
    writer
        .put_state("state", &serde_json::json!({"cached": true}))
        .unwrap();
    writer.commit().unwrap();
    drop(api);
    let cached_before = cached_files();
    let rows = list(&repo, None);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(cached_files() > cached_before, "listing cached no manifest");
    let id = rows[0]["id"].as_str().unwrap().to_string();
    // Listed twice: the second time from the cache; then the manifest is replaced in the
    // bucket with damaged bytes, and the cache must not hide that.
    assert_eq!(list(&repo, None).len(), 1);
    let name = format!("points/{id}.json");
    let bucket = store(&repo);
    let mut bytes = bucket.get(&name).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    bucket.delete(&name).unwrap();
    assert!(bucket.put_if_absent(&name, &bytes).unwrap());
    let rows = list(&repo, None);
    assert!(rows[0]["error"].is_string(), "{rows:?}");
}

/// Changed environment variables, the expected words, the repository URL.
type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, String);

#[test]
fn misconfiguration_gives_one_clear_line() {
    let _serial = serial();
    let repo = fresh_repo("conf");
    init_repo(&repo, None);
    let list_args = args(&["backup", "list", "--repo", &s(&repo)]);
    let secret = var("AWS_SECRET_ACCESS_KEY");
    let cases: [Case; 3] = [
        (
            &[("AWS_SECRET_ACCESS_KEY", "not-the-secret-at-all")],
            "access denied",
            s(&repo),
        ),
        (
            &[],
            "does not exist",
            format!("s3://no-such-bucket-{}", std::process::id()),
        ),
        (
            &[("AWS_ENDPOINT_URL", "http://127.0.0.1:9")],
            "cannot reach",
            s(&repo),
        ),
    ];
    for (env, needle, url) in cases {
        let mut a = list_args.clone();
        a[3] = url;
        let started = std::time::Instant::now();
        let (st, err) = ark_env(&a, env);
        assert!(!st.success(), "{env:?} succeeded");
        assert_eq!(err.len(), 1, "not one line: {err:?}");
        assert!(
            err[0].starts_with("arkvm: error:") && err[0].contains(needle),
            "unclear error for {env:?} (wanted {needle:?}): {err:?}"
        );
        assert!(
            !err[0].contains(&secret) && !err[0].contains("not-the-secret"),
            "{err:?}"
        );
        eprintln!("{needle}: {:?} in {:?}", err[0], started.elapsed());
    }
}

//! Helpers of tests/s3.rs: the Ceph RGW the tests run against (started by `scripts/ceph-rgw`
//! when not already running), a fresh repository URL per test, and direct access to the bucket
//! to count, damage and remove objects.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use snapshot::repo::s3::{S3Store, S3Url};
use snapshot::repo::ChunkStore;

/// The `AWS_*` settings of the running RGW, put into this process's environment (so every
/// `arkvm` the tests start inherits them).
pub fn rgw_env() -> &'static Vec<(String, String)> {
    static ENV: OnceLock<Vec<(String, String)>> = OnceLock::new();
    ENV.get_or_init(|| {
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .output()
            .expect("run scripts/ceph-rgw start");
        assert!(
            out.status.success(),
            "scripts/ceph-rgw start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let vars: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in &vars {
            // SAFETY-free in edition 2021; set once, before any arkvm child is spawned.
            std::env::set_var(k, v);
        }
        vars
    })
}

pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-rgw")
}

pub fn var(name: &str) -> String {
    rgw_env()
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("{name} missing from scripts/ceph-rgw env"))
}

/// A fresh `s3://BUCKET/PREFIX` for one test (as a path, as the CLI helpers take).
pub fn fresh_repo(tag: &str) -> PathBuf {
    rgw_env();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    PathBuf::from(format!(
        "s3://{}/{tag}-{}-{nanos}",
        var("ARKVM_TEST_BUCKET"),
        std::process::id()
    ))
}

/// The bucket below `repo`, opened directly.
pub fn store(repo: &std::path::Path) -> S3Store {
    let url = S3Url::parse(repo.to_str().expect("utf-8"))
        .expect("an s3:// URL")
        .expect("a valid URL");
    S3Store::open(&url).expect("open the bucket")
}

pub fn chunk_objects(repo: &std::path::Path) -> Vec<String> {
    store(repo).list("chunks/").expect("list chunks")
}

/// The PID `scripts/ceph-rgw` recorded for `name` (mon, osd, rgw).
pub fn ceph_pid(name: &str) -> i32 {
    let out = Command::new("bash")
        .arg(script())
        .args(["pid", name])
        .output()
        .expect("scripts/ceph-rgw pid");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no PID for {name}: {out:?}"))
}

pub fn restart_rgw() {
    let st = Command::new("bash")
        .arg(script())
        .arg("restart-rgw")
        .status()
        .expect("scripts/ceph-rgw restart-rgw");
    assert!(st.success(), "radosgw did not come back");
}

/// Runs `arkvm ARGS` with the `AWS_*` variables changed by `env`; returns status and stderr.
pub fn ark_env(args: &[String], env: &[(&str, &str)]) -> (std::process::ExitStatus, Vec<String>) {
    rgw_env();
    let mut cmd = Command::new(arkvm_tests::arkvm_bin());
    cmd.args(args).stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run arkvm");
    let err = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_string)
        .collect();
    (out.status, err)
}

/// How many files the manifest cache holds (`$ARKVM_CACHE/s3`, else `~/.cache/arkvm/s3`).
pub fn cached_files() -> usize {
    let root = std::env::var_os("ARKVM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/arkvm"))
        .join("s3");
    let Ok(dirs) = std::fs::read_dir(root) else {
        return 0;
    };
    dirs.filter_map(Result::ok)
        .filter_map(|d| std::fs::read_dir(d.path()).ok())
        .map(|files| files.count())
        .sum()
}

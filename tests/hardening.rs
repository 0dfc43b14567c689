//! Hardening checks that need the `arkvm` binary but no VM: values refused before anything
//! starts, key files others can read refused by every command that takes a key, files created
//! private whatever the umask, and failures that leave nothing behind.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use arkvm_tests::{arkvm_bin, ScratchDir, Vmm};
use snapshot::chunk::CHUNK_SIZE;
use snapshot::repo::{point_object_name, RepoKey, Repository};
use snapshot::PartKind;

/// Runs `arkvm` with a permissive umask (022), as a user's shell usually has it.
fn arkvm(args: &[&str]) -> Output {
    let mut command = Command::new(arkvm_bin());
    command.args(args);
    // SAFETY: umask in the child between fork and exec is async-signal-safe and touches no
    // memory of this process.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::umask(0o022);
            Ok(())
        });
    }
    command.output().expect("run arkvm")
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Asserts that `out` failed with status 1 and exactly one line on stderr that contains
/// every one of `needles`.
fn assert_refused(out: &Output, needles: &[&str]) {
    let lines = stderr_lines(out);
    assert_eq!(out.status.code(), Some(1), "stderr: {lines:?}");
    assert_eq!(lines.len(), 1, "expected one line, got {lines:?}");
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "{needle:?} missing from {lines:?}"
        );
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .expect("inspect")
        .permissions()
        .mode()
        & 0o7777
}

/// Every file under `dir` is 0600 and every directory 0700 (`dir` included); returns how many
/// files were checked.
fn assert_private_tree(dir: &Path) -> usize {
    assert_eq!(mode_of(dir), 0o700, "{}", dir.display());
    let mut files = 0;
    for entry in std::fs::read_dir(dir).expect("list") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files += assert_private_tree(&path);
        } else {
            assert_eq!(mode_of(&path), 0o600, "{}", path.display());
            files += 1;
        }
    }
    files
}

/// A repository at `dir` (encrypted with `key` if given) holding one point of `vm` with 2 MiB
/// of memory and a state; returns its id.
fn repo_with_point(dir: &Path, key: Option<&RepoKey>, vm: &str) -> String {
    let repo = Repository::init(dir, key.cloned()).expect("init");
    let mut backup = repo.start_backup(vm, None).expect("start backup");
    backup.put_state("vm-state", &7u32).expect("state");
    let object = backup
        .add_object("memory", PartKind::Memory, 2 * CHUNK_SIZE as u64)
        .expect("add memory");
    for i in 0..2u8 {
        object
            .put_chunk(u64::from(i), &vec![i + 1; CHUNK_SIZE])
            .expect("put chunk");
    }
    backup.finish_object(object).expect("finish");
    backup.commit().expect("commit").id
}

#[test]
fn a_name_that_could_escape_is_refused_at_start() {
    for name in ["../x", "../../../../tmp/x", "a/b", ".hidden", ""] {
        let out = arkvm(&["run", "--kernel", "/nonexistent/vmlinux", "--name", name]);
        assert_refused(&out, &["--name", "not a valid VM name"]);
    }
}

#[test]
fn memory_larger_than_the_host_is_refused_at_start() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("MemTotal");
    // Twice the host, in whole GiB: still far below KVM's limit.
    let asked = format!("{}G", (kib >> 20) * 2 + 2);
    let out = arkvm(&[
        "run",
        "--kernel",
        "/nonexistent/vmlinux",
        "--memory",
        &asked,
    ]);
    assert_refused(&out, &["--memory", &asked, "--memory-overcommit"]);
    // With --memory-overcommit it gets past the check, to the missing kernel (which is looked
    // at before any guest memory is mapped).
    let out = arkvm(&[
        "run",
        "--kernel",
        "/nonexistent/vmlinux",
        "--memory",
        "64M",
        "--memory-overcommit",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("--memory-overcommit"));
}

#[test]
fn key_files_others_can_read_are_refused_by_every_command() {
    let dir = ScratchDir::new("hardening-keys");
    let key_path = dir.path().join("dr.key");
    let key = RepoKey::create_file(&key_path).expect("key");
    let repo = dir.path().join("repo");
    let id = repo_with_point(&repo, Some(&key), "vm1");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let k = s(&key_path);
    let r = s(&repo);
    let new_repo = dir.path().join("new-repo");
    let commands: Vec<Vec<&str>> = vec![
        vec!["backup", "list", "--repo", r, "--key", k],
        vec!["backup", "verify", "--repo", r, "--key", k],
        vec!["backup", "init", "--repo", s(&new_repo), "--key", k],
        vec![
            "dr",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--repo",
            s(&new_repo),
            "--key",
            k,
        ],
        vec!["dr", "status", "--target", "127.0.0.1:9", "--key", k],
        vec![
            "dr",
            "send",
            "--repo",
            r,
            "--target",
            "127.0.0.1:9",
            "--key",
            k,
        ],
        vec!["dr", "recover", "--repo", r, "--key", k, "--export-only"],
        vec!["restore", "--repo", r, "--id", &id, "--key", k],
    ];
    for args in &commands {
        let out = arkvm(args);
        assert_refused(&out, &["0644", "chmod 600", k]);
        assert!(!new_repo.exists(), "{args:?} created a repository");
    }
    // The same key made private works.
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = arkvm(&["backup", "list", "--repo", r, "--key", k]);
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
}

#[test]
fn repositories_and_exported_checkpoints_are_private_under_umask_022() {
    let dir = ScratchDir::new("hardening-private");
    let repo = dir.path().join("repo");
    let key = dir.path().join("repo.key");
    let out = arkvm(&["backup", "init", "--repo", s(&repo), "--key", s(&key)]);
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert_eq!(mode_of(&key), 0o600);
    assert_private_tree(&repo);

    // A point written by the library (as a backup would), then exported as `dr recover
    // --export-only` does: the decrypted memory must not be readable by others.
    let src = dir.path().join("src");
    let repo_key = RepoKey::load(&key).expect("key");
    repo_with_point(&src, Some(&repo_key), "vm1");
    assert!(assert_private_tree(&src) >= 4);
    let work = dir.path().join("work");
    let out = arkvm(&[
        "dr",
        "recover",
        "--repo",
        s(&src),
        "--key",
        s(&key),
        "--export-only",
        "--work-dir",
        s(&work),
    ]);
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert!(assert_private_tree(&work) >= 3, "nothing was exported");
}

#[test]
fn backup_init_refuses_a_directory_of_other_files() {
    let dir = ScratchDir::new("hardening-init");
    let home = dir.path().join("home");
    std::fs::create_dir(&home).expect("mkdir");
    std::fs::write(home.join("notes.txt"), b"mine").expect("write");
    let key = dir.path().join("new.key");
    let out = arkvm(&["backup", "init", "--repo", s(&home), "--key", s(&key)]);
    assert_refused(&out, &["notes.txt", "already holds other files"]);
    assert!(
        !key.exists(),
        "a key file was created for a refused repository"
    );
    let entries: Vec<_> = std::fs::read_dir(&home)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(entries, ["notes.txt"]);
}

#[test]
fn dr_serve_that_cannot_listen_creates_no_repository() {
    let dir = ScratchDir::new("hardening-serve");
    let key = dir.path().join("dr.key");
    RepoKey::create_file(&key).expect("key");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let repo = dir.path().join("repo");
    let out = arkvm(&[
        "dr",
        "serve",
        "--listen",
        &addr,
        "--repo",
        s(&repo),
        "--key",
        s(&key),
    ]);
    assert_refused(&out, &["listen on", &addr]);
    assert!(
        !repo.exists(),
        "the repository was created although the bind failed"
    );
}

#[test]
fn backup_list_fails_when_it_lists_unreadable_points() {
    let dir = ScratchDir::new("hardening-list");
    let repo = dir.path().join("repo");
    let id = repo_with_point(&repo, None, "vm1");
    repo_with_point_again(&repo);
    let out = arkvm(&["backup", "list", "--repo", s(&repo)]);
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    // Damage one point's manifest.
    let manifest = repo.join(point_object_name(&id));
    let mut bytes = std::fs::read(&manifest).expect("read manifest");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&manifest, &bytes).expect("damage manifest");
    for json in [false, true] {
        let mut args = vec!["backup", "list", "--repo", s(&repo)];
        if json {
            args.push("--json");
        }
        let out = arkvm(&args);
        assert_eq!(out.status.code(), Some(3), "{:?}", stderr_lines(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&id),
            "the damaged point is not listed: {stdout}"
        );
        let lines = stderr_lines(&out);
        assert!(
            lines.len() == 1 && lines[0].contains("1 of 2 points are unreadable"),
            "{lines:?}"
        );
    }
}

/// Adds a second, intact point to the repository at `repo`.
fn repo_with_point_again(repo: &Path) {
    let repo = Repository::open(repo, None).expect("open");
    let mut backup = repo.start_backup("vm2", None).expect("start backup");
    backup.put_state("vm-state", &8u32).expect("state");
    backup.commit().expect("commit");
}

#[test]
fn dr_serve_stops_cleanly_on_sigterm() {
    let dir = ScratchDir::new("hardening-dr-sigterm");
    let key = dir.path().join("dr.key");
    std::fs::write(&key, format!("{}\n", "5a".repeat(32))).expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let repo = dir.path().join(format!("dr-{signal}"));
        let mut rx = Vmm::spawn(&[
            "dr",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--repo",
            s(&repo),
            "--key",
            s(&key),
        ]);
        rx.wait_line("dr: listening on", std::time::Duration::from_secs(60))
            .unwrap_or_else(|| panic!("the receiver did not start\n{}", rx.dump()));
        rx.signal(signal);
        let st = rx
            .wait_exit(std::time::Duration::from_secs(30))
            .unwrap_or_else(|| panic!("dr serve ignored signal {signal}\n{}", rx.dump()));
        assert_eq!(st.code(), Some(0), "signal {signal}\n{}", rx.dump());
        assert!(
            repo.join("points").is_dir() || repo.is_dir(),
            "repository gone"
        );
    }
}

#[test]
fn verify_names_no_point_for_a_damaged_stray_chunk() {
    let dir = ScratchDir::new("hardening-stray");
    let repo = dir.path().join("repo");
    repo_with_point(&repo, None, "vm1");
    let hex = "abcd".repeat(16);
    let stray = repo.join("chunks").join("abcd").join(&hex);
    std::fs::create_dir_all(stray.parent().expect("parent")).expect("chunk dir");
    std::fs::write(&stray, b"not a chunk").expect("stray chunk");
    let out = arkvm(&["backup", "verify", "--repo", s(&repo)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout} {:?}", stderr_lines(&out));
    assert!(stdout.contains(&format!("damaged chunk {hex}")), "{stdout}");
    assert!(stdout.contains("(used by no point)"), "{stdout}");
    assert!(!stdout.contains("(used by )"), "{stdout}");
}

//! The scripting contract: each exit status of docs/exit-status.md caused by a command that
//! must produce it, `--json` of the repository and `dr` commands, environment variables (flags
//! win), completions and man pages. Status 4 (guest crash) is caused in tests/boot.rs.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};

use arkvm_tests::{ark_cli as ark, arkvm_bin, parse_json as json, ScratchDir};
use snapshot::repo::Repository;
use snapshot::PartKind;

/// A repository with one point holding a 3-chunk memory object; returns the point's id.
fn repo_with_a_point(dir: &Path) -> String {
    let repo = Repository::init(dir, None).expect("init");
    let mut backup = repo.start_backup("vm1", None).expect("start");
    let chunk = snapshot::chunk::CHUNK_SIZE;
    let object = backup
        .add_object("memory", PartKind::Memory, 3 * chunk as u64)
        .expect("object");
    for i in 0..3u8 {
        object
            .put_chunk(u64::from(i), &vec![i + 1; chunk])
            .expect("chunk");
    }
    backup.finish_object(object).expect("finish");
    backup.commit().expect("commit").id
}

/// The chunk files of a repository.
fn chunk_files(repo: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(repo.join("chunks")).expect("chunks") {
        for f in std::fs::read_dir(dir.expect("entry").path()).expect("chunk dir") {
            out.push(f.expect("entry").path());
        }
    }
    out
}

#[test]
fn each_status_is_caused() {
    let dir = ScratchDir::new("exit");
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    let id = repo_with_a_point(&repo);

    // 0: done.
    let (code, out, err) = ark(&[], &["backup", "list", "--repo", r, "--json"]);
    assert_eq!(code, 0, "{err}");
    let list = json(&out);
    assert_eq!(list[0]["id"], id.as_str());
    assert!(
        list[0]["created"].as_str().unwrap().ends_with('Z'),
        "{list}"
    );
    assert_eq!(ark(&[], &["--version"]).0, 0);

    // 1: bad input or a failed operation.
    let missing = dir.path().join("missing");
    let (code, _, err) = ark(
        &[],
        &["backup", "list", "--repo", missing.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("arkvm: error: "), "{err}");
    let (code, _, err) = ark(&[], &["status", "--api-socket", missing.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = ark(&[], &["run", "--kernel", "/nonexistent", "--memory", "3X"]);
    assert_eq!(code, 1, "{err}");

    // 2: bad usage, before anything starts.
    for args in [
        &["backup", "list", "--repo", r, "--bogus"][..],
        &["frobnicate"],
        &["backup", "list"],
        &["--log-level", "bogus", "backup", "list", "--repo", r],
        &[
            "snapshot",
            "--api-socket",
            "/nonexistent",
            "--out",
            "x",
            "--paused",
            "--strategy",
            "precopy",
        ],
        &["backup", "export", "--repo", r, "--id", "latest"],
    ] {
        let (code, _, err) = ark(&[], args);
        assert_eq!(code, 2, "{args:?}: {err}");
    }
    assert!(!dir.path().join("x").exists());

    // 3: damage found.
    let (code, out, err) = ark(&[], &["backup", "verify", "--repo", r, "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["clean"], true);
    let victim = &chunk_files(&repo)[1];
    let mut bytes = std::fs::read(victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(victim, bytes).unwrap();
    let (code, out, err) = ark(&[], &["backup", "verify", "--repo", r, "--json"]);
    assert_eq!(code, 3, "{out} {err}");
    assert_eq!(json(&out)["clean"], false);
}

#[test]
fn json_environment_and_flags_win() {
    let dir = ScratchDir::new("env");
    let repo = dir.path().join("repo");
    let key = dir.path().join("k.key");
    let (r, k) = (repo.to_str().unwrap(), key.to_str().unwrap());
    let (code, out, err) = ark(&[], &["backup", "init", "--repo", r, "--key", k, "--json"]);
    assert_eq!(code, 0, "{err}");
    let init = json(&out);
    assert_eq!(init["encrypted"], true);
    assert_eq!(init["key_file_created"], true);
    // The repository and key from the environment.
    let env = [("ARKVM_REPO", r), ("ARKVM_KEY_FILE", k)];
    let (code, out, err) = ark(&env, &["backup", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out), serde_json::json!([]));
    // A flag wins over its variable.
    let other = dir.path().join("other");
    let (code, _, err) = ark(&env, &["backup", "list", "--repo", other.to_str().unwrap()]);
    assert_eq!(code, 1, "the flag's repository does not exist: {err}");
    assert!(err.contains("other"), "{err}");
    let (code, out, err) = ark(&env, &["backup", "gc", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["chunks_removed"], 0);
    let (code, _, err) = ark(
        &[("ARKVM_API_SOCKET", "/nonexistent/arkvm.sock")],
        &["status"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/arkvm.sock"), "{err}");
}

#[test]
fn completions_and_man_pages() {
    let (code, out, err) = ark(&[], &["completions", "bash"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("keep-within"),
        "bash completion lacks prune's flags"
    );
    let dir = ScratchDir::new("man");
    let (code, _, err) = ark(&[], &["man", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let page = std::fs::read_to_string(dir.path().join("arkvm-backup-prune.1")).expect("page");
    assert!(
        page.contains(".TH") && page.contains("keep\\-daily"),
        "{page}"
    );
    assert!(dir.path().join("arkvm.1").exists());
}

#[test]
fn a_qcow2_image_is_refused_with_the_conversion_command() {
    let dir = ScratchDir::new("qcow2");
    // A qcow2 header (version 3, 1 MiB virtual size), padded to a multiple of 512 bytes: it
    // would pass for a raw disk by its size.
    let mut image = vec![0u8; 64 * 1024];
    image[..8].copy_from_slice(b"QFI\xfb\x00\x00\x00\x03");
    image[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
    let path = dir.path().join("guest.qcow2");
    std::fs::write(&path, &image).unwrap();
    let kernel = arkvm_tests::tiny_guest("disk");
    let (code, out, err) = ark(
        &[],
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "16M",
            "--disk",
            path.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{out} {err}");
    assert!(err.contains("is a qcow2 image, not a raw one"), "{err}");
    assert!(err.contains("qemu-img convert -f qcow2 -O raw"), "{err}");
    assert!(out.is_empty(), "the guest must not start: {out}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        image,
        "the image was changed"
    );
}

#[test]
fn every_dr_command_prints_json() {
    let dir = ScratchDir::new("dr-json");
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    let id = repo_with_a_point(&repo);
    let key = dir.path().join("dr.key");
    std::fs::write(&key, "ab".repeat(32)).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let k = key.to_str().unwrap();

    // recover --export-only: the directory, the point, its VM and time.
    let work = dir.path().join("work");
    let (code, out, err) = ark(
        &[],
        &[
            "dr",
            "recover",
            "--repo",
            r,
            "--export-only",
            "--work-dir",
            work.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let rec = json(&out);
    assert_eq!(rec["id"], id.as_str(), "{rec}");
    assert_eq!(rec["vm"], "vm1", "{rec}");
    assert!(rec["created"].as_str().unwrap().ends_with('Z'), "{rec}");
    let exported = Path::new(rec["dir"].as_str().unwrap());
    assert!(exported.starts_with(&work), "{rec}");
    assert!(exported.join("manifest.json").exists(), "{rec}");
    // Without --export-only the VM's console is the output: --json is refused.
    assert_eq!(ark(&[], &["dr", "recover", "--repo", r, "--json"]).0, 2);

    // serve --json: one line once listening, then it keeps serving.
    let received = dir.path().join("received");
    let mut serve = Command::new(arkvm_bin())
        .args([
            "dr",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--repo",
            received.to_str().unwrap(),
            "--key",
            k,
            "--no-encrypt-at-rest",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dr serve");
    let mut line = String::new();
    std::io::BufReader::new(serve.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read dr serve");
    let listening = json(&line);
    let addr = listening["listening"].as_str().unwrap_or_else(|| {
        let _ = serve.kill();
        panic!("no address: {line}")
    });
    assert!(!addr.ends_with(":0"), "{listening}");
    assert_eq!(listening["repo"], received.to_str().unwrap());
    assert_eq!(listening["checkpoints"], 0);

    let (code, out, err) = ark(
        &[],
        &[
            "dr", "send", "--repo", r, "--target", addr, "--key", k, "--json",
        ],
    );
    let (scode, sout, serr) = ark(
        &[],
        &["dr", "status", "--target", addr, "--key", k, "--json"],
    );
    let _ = serve.kill();
    let _ = serve.wait();
    assert_eq!(code, 0, "{err}");
    let sent = json(&out);
    assert_eq!(sent["point_id"], id.as_str(), "{sent}");
    assert_eq!(sent["chunks_total"], 3, "{sent}");
    assert_eq!(scode, 0, "{serr}");
    let status = json(&sout);
    assert_eq!(status["points"], 1, "{status}");
    assert!(status["rpo_ms"].is_u64(), "{status}");
}

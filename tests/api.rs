//! The control socket: its mode, stale (replaced) and busy (refused) sockets, removal on exit,
//! and API misuse, which gets a 4xx JSON error and leaves the VM running.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use arkvm_tests::{
    api_json, api_request, broken_line, one_at_a_time, require_kvm, run_to_end_settled,
    start_memory_guest, tiny_guest, wait_for_path, ScratchDir, Vmm,
};

/// Waits until `path` is gone.
fn wait_gone(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while path.exists() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Checks that the VM still answers `GET /vm` as running and that the guest makes progress.
fn assert_alive(vm: &Vmm, sock: &Path, after: &str) {
    let (code, info) = api_json(sock, "GET", "/vm", None);
    assert_eq!(code, 200, "after {after}: GET /vm: {info}");
    assert_eq!(info["state"], "running", "after {after}: {info}");
    let from = vm.line_count();
    vm.wait_pass(from, 0, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("after {after}: no more PASS lines\n{}", vm.dump()));
    if let Some(l) = broken_line(&vm.stdout(), 0) {
        panic!("after {after}: guest broke: {l}\n{}", vm.dump());
    }
}

/// Asserts a 4xx answer whose body is `{"error": "<sentence>"}`.
fn assert_json_error(code: u16, body: &str, want: u16, what: &str) {
    assert_eq!(code, want, "{what}: answer {code} {body}");
    let v: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {body:?}"));
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error string in {body}"));
    assert!(!msg.is_empty() && !msg.contains('\n'), "{what}: {msg:?}");
    eprintln!("{what}: {code} {msg}");
}

#[test]
fn socket_is_private_and_removed_on_exit() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("api-socket");

    // Mode 0600, a socket; removed after PUT /vm/shutdown, which ends arkvm with status 0.
    let sock = dir.path().join("a.sock");
    let mut vm = start_memory_guest(&sock, "64M", 1, "");
    let meta = std::fs::metadata(&sock).expect("stat socket");
    assert!(meta.file_type().is_socket(), "not a socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    let (code, body) = api_request(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204, "{body}");
    let st = vm
        .wait_exit(Duration::from_secs(20))
        .expect("arkvm exits after shutdown");
    assert!(st.success(), "{st:?}\n{}", vm.dump());
    assert!(
        wait_gone(&sock, Duration::from_secs(2)),
        "socket left after shutdown"
    );

    // The CLI client does the same.
    let sock = dir.path().join("b.sock");
    let mut vm = start_memory_guest(&sock, "64M", 1, "");
    let (st, _, err) = run_to_end_settled(
        &["shutdown", "--api-socket", sock.to_str().expect("utf-8")],
        Duration::from_secs(20),
    );
    assert!(st.success(), "arkvm shutdown: {err:?}");
    let st = vm.wait_exit(Duration::from_secs(20)).expect("arkvm exits");
    assert!(st.success(), "{st:?}");
    assert!(
        wait_gone(&sock, Duration::from_secs(2)),
        "socket left after CLI shutdown"
    );

    // A guest that ends by itself (the marker resets at once) removes the socket too.
    let sock = dir.path().join("c.sock");
    let marker = tiny_guest("marker");
    let (st, out, err) = run_to_end_settled(
        &[
            "run",
            "--kernel",
            marker.to_str().expect("utf-8"),
            "--api-socket",
            sock.to_str().expect("utf-8"),
        ],
        Duration::from_secs(30),
    );
    assert!(st.success(), "{out:?} {err:?}");
    assert!(!sock.exists(), "socket left after the guest reset");
}

/// Sends SIGTERM to a memory guest (after its first PASS line if `wait_for_guest`); expects a
/// clean exit (status 0) that removes the socket.
fn sigterm_removes_socket(tag: &str, wait_for_guest: bool) {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new(tag);
    let sock = dir.path().join("d.sock");
    let mut vm = start_memory_guest(&sock, "64M", 1, "");
    if wait_for_guest {
        vm.wait_pass(0, 0, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("guest does not run\n{}", vm.dump()));
    }
    vm.signal(libc::SIGTERM);
    let st = vm
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("arkvm ignores SIGTERM\n{}", vm.dump()));
    assert!(
        wait_gone(&sock, Duration::from_secs(2)),
        "socket left after SIGTERM (exit {st:?})"
    );
    assert!(
        st.success(),
        "SIGTERM did not end arkvm cleanly: {st:?}\n{}",
        vm.dump()
    );
}

#[test]
fn sigterm_removes_the_socket() {
    // `kill PID` (systemctl stop, docker stop) is an exit too: the socket goes with it.
    sigterm_removes_socket("api-sigterm", true);
}

#[test]
fn sigterm_as_soon_as_the_socket_appears_removes_it() {
    // A supervisor may stop a VM as soon as its socket exists.
    sigterm_removes_socket("api-sigterm-early", false);
}

#[test]
fn stale_sockets_are_replaced_and_busy_ones_refused() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("api-stale");
    let memory = tiny_guest("memory");
    let memory = memory.to_str().expect("utf-8");

    // A stale socket (bound once, nothing listens any more, as after a kill -9): replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let stale_inode = std::fs::symlink_metadata(&stale)
        .expect("stale socket")
        .ino();
    {
        // The path exists from the start: wait until arkvm's own socket has replaced it.
        let vm = start_memory_guest(&stale, "64M", 1, "");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::symlink_metadata(&stale).map(|m| m.ino()).ok() == Some(stale_inode) {
            assert!(
                Instant::now() < deadline,
                "the stale socket was never replaced\n{}",
                vm.dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_alive(&vm, &stale, "starting over a stale socket");
        let mode = std::fs::metadata(&stale)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // A socket another arkvm serves: refused, and the first one keeps serving.
    let busy = dir.path().join("busy.sock");
    let vm = start_memory_guest(&busy, "64M", 1, "");
    let (st, _, err) = run_to_end_settled(
        &[
            "run",
            "--kernel",
            memory,
            "--api-socket",
            busy.to_str().expect("utf-8"),
        ],
        Duration::from_secs(30),
    );
    assert!(!st.success(), "a second arkvm took over the socket");
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].contains("another arkvm") || err[0].contains("in use"),
        "unclear message: {err:?}"
    );
    assert_alive(&vm, &busy, "a second arkvm on the same socket");

    // A regular file in the way is not a socket, and is left alone.
    let file = dir.path().join("file.sock");
    std::fs::write(&file, b"data").expect("write");
    let (st, _, err) = run_to_end_settled(
        &[
            "run",
            "--kernel",
            memory,
            "--api-socket",
            file.to_str().expect("utf-8"),
        ],
        Duration::from_secs(30),
    );
    assert!(!st.success(), "started over a regular file");
    assert_eq!(err.len(), 1, "{err:?}");
    assert_eq!(std::fs::read(&file).expect("read"), b"data");
}

#[test]
fn api_misuse_gets_4xx_json_and_the_vm_keeps_running() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("api-misuse");
    let sock = dir.path().join("vm.sock");
    let vm = start_memory_guest(&sock, "256M", 1, "");
    vm.wait_pass(0, 0, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("guest does not run\n{}", vm.dump()));
    let out = dir.path().join("never");
    let out_s = out.display().to_string();

    let cases: Vec<(&str, &str, &str, Vec<u8>, u16)> = vec![
        (
            "malformed JSON",
            "PUT",
            "/snapshot",
            b"{\"out\": ".to_vec(),
            400,
        ),
        (
            "not JSON at all",
            "PUT",
            "/snapshot",
            b"hello".to_vec(),
            400,
        ),
        (
            "unknown field",
            "PUT",
            "/snapshot",
            format!("{{\"out\": \"{out_s}\", \"colour\": \"red\"}}").into_bytes(),
            400,
        ),
        (
            "unknown mode",
            "PUT",
            "/snapshot",
            format!("{{\"out\": \"{out_s}\", \"mode\": \"sideways\"}}").into_bytes(),
            400,
        ),
        (
            "relative out",
            "PUT",
            "/snapshot",
            b"{\"out\": \"relative/dir\"}".to_vec(),
            400,
        ),
        ("no target", "PUT", "/snapshot", b"{}".to_vec(), 400),
        (
            "unknown field on pause",
            "PUT",
            "/vm/pause",
            b"{\"now\": true}".to_vec(),
            400,
        ),
        ("resume while running", "PUT", "/vm/resume", Vec::new(), 409),
        (
            "cancel with no snapshot",
            "DELETE",
            "/snapshot",
            Vec::new(),
            409,
        ),
        ("no snapshot yet", "GET", "/snapshot", Vec::new(), 404),
        ("unknown path", "GET", "/nothing-here", Vec::new(), 404),
        ("wrong method", "POST", "/vm", Vec::new(), 405),
        (
            "a body of 5 MB",
            "PUT",
            "/snapshot",
            {
                let mut b = format!("{{\"out\": \"{out_s}\", \"pad\": \"").into_bytes();
                b.resize(5 << 20, b'a');
                b.extend_from_slice(b"\"}");
                b
            },
            413,
        ),
    ];
    for (what, method, path, body, want) in cases {
        let (code, text) = api_request(&sock, method, path, Some(&body));
        assert_json_error(code, &text, want, what);
        assert_alive(&vm, &sock, what);
    }
    assert!(!out.exists(), "a refused request created {}", out.display());

    // Pause while paused is a conflict too; the VM resumes afterwards.
    let (code, body) = api_request(&sock, "PUT", "/vm/pause", None);
    assert_eq!(code, 204, "{body}");
    let (code, body) = api_request(&sock, "PUT", "/vm/pause", None);
    assert_json_error(code, &body, 409, "pause while paused");
    let (code, info) = api_json(&sock, "GET", "/vm", None);
    assert_eq!(
        (code, info["state"].as_str()),
        (200, Some("paused")),
        "{info}"
    );
    let (code, body) = api_request(&sock, "PUT", "/vm/resume", None);
    assert_eq!(code, 204, "{body}");
    assert_alive(&vm, &sock, "pause, pause, resume");

    // The CLI client reports a conflict as a one-line error and a failure status.
    let (st, _, err) = run_to_end_settled(
        &["resume", "--api-socket", sock.to_str().expect("utf-8")],
        Duration::from_secs(20),
    );
    assert!(!st.success(), "arkvm resume of a running VM succeeded");
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(!err[0].contains("panicked"), "{err:?}");
    let (st, out_lines, err) = run_to_end_settled(
        &["status", "--api-socket", sock.to_str().expect("utf-8")],
        Duration::from_secs(20),
    );
    assert!(st.success(), "arkvm status: {err:?}");
    assert!(
        out_lines.join("\n").to_lowercase().contains("running"),
        "arkvm status does not say running: {out_lines:?}"
    );
    assert_alive(&vm, &sock, "the CLI calls");
}

fn second_snapshot_while_one_runs(mode: &str) {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new(&format!("api-second-{mode}"));
    let sock = dir.path().join("vm.sock");
    // 2 GiB of which the guest writes 64 MiB: it boots fast, and a snapshot still has 2 GiB
    // to go through.
    let vm = start_memory_guest(&sock, "2G", 1, "arkvm.region_mb=64");
    vm.wait_pass(0, 2, Duration::from_secs(180))
        .unwrap_or_else(|| panic!("guest does not run\n{}", vm.dump()));
    let first = dir.path().join("first");
    let second = dir.path().join("second");
    let (code, v) = api_json(
        &sock,
        "PUT",
        "/snapshot",
        Some(&format!(
            "{{\"out\": \"{}\", \"mode\": \"{mode}\"}}",
            first.display()
        )),
    );
    assert_eq!(code, 202, "{v}");
    let (code, body) = api_request(
        &sock,
        "PUT",
        "/snapshot",
        Some(format!("{{\"out\": \"{}\"}}", second.display()).as_bytes()),
    );
    // Check that the first one was really still running when the second was asked for.
    let (_, st) = api_json(&sock, "GET", "/snapshot", None);
    assert_json_error(
        code,
        &body,
        409,
        &format!("second snapshot during a {mode} one"),
    );
    eprintln!("first snapshot after the second request: {st}");
    // GET /vm answers while a snapshot runs.
    let (code, info) = api_json(&sock, "GET", "/vm", None);
    assert_eq!(code, 200, "{info}");
    // Wait for the first one to finish.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, st) = api_json(&sock, "GET", "/snapshot", None);
        if st["state"] != "running" {
            assert_eq!(st["state"], "done", "{st}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "first snapshot never finished: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        first.join("manifest.json").exists(),
        "first snapshot missing"
    );
    assert!(!second.exists(), "the refused second snapshot exists");
    assert_alive(
        &vm,
        &sock,
        &format!("a second snapshot during a {mode} one"),
    );
}

#[test]
fn second_snapshot_while_a_paused_one_runs_is_409() {
    second_snapshot_while_one_runs("paused");
}

#[test]
fn second_snapshot_while_a_live_one_runs_is_409() {
    second_snapshot_while_one_runs("live");
}

#[test]
fn socket_path_reappears_for_a_restored_vm() {
    // A restored VM serves its own socket with the same rules.
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("api-restored");
    let sock = dir.path().join("vm.sock");
    let mut vm = start_memory_guest(&sock, "64M", 1, "");
    let snap = dir.path().join("snap");
    arkvm_tests::cli_snapshot(&sock, &snap, &["--paused"]);
    vm.kill();
    let rsock = dir.path().join("restored.sock");
    let mut r = arkvm_tests::start_restore(&snap, &rsock, &[]);
    assert!(wait_for_path(&rsock, Duration::from_secs(10)));
    let meta = std::fs::metadata(&rsock).expect("stat");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "restored socket mode"
    );
    let (code, body) = api_request(&rsock, "PUT", "/snapshot", Some(b"{bad"));
    assert_json_error(code, &body, 400, "malformed JSON to a restored VM");
    assert_alive(&r, &rsock, "malformed JSON to a restored VM");
    let (code, _) = api_request(&rsock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204);
    let st = r
        .wait_exit(Duration::from_secs(20))
        .expect("restored arkvm exits");
    assert!(st.success(), "{st:?}");
    assert!(
        wait_gone(&rsock, Duration::from_secs(2)),
        "restored socket left"
    );
}

#[test]
fn cli_status_into_a_closed_pipe_or_full_stdout_does_not_panic() {
    // `arkvm status ... | head -1` closes the pipe early; the CLI must not print a panic.
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("api-pipe");
    let sock = dir.path().join("vm.sock");
    let vm = start_memory_guest(&sock, "64M", 1, "");
    vm.wait_pass(0, 0, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("guest does not run\n{}", vm.dump()));
    for _ in 0..5 {
        let mut child = std::process::Command::new(arkvm_tests::arkvm_bin())
            .args(["status", "--api-socket", sock.to_str().expect("utf-8")])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn arkvm status");
        // Close the read end before arkvm writes anything.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait for arkvm status");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked"),
            "arkvm status panics on a closed stdout: {err}"
        );
    }
    // A full device: the write fails at once; the CLI says so in one line, without a panic.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let out = std::process::Command::new(arkvm_tests::arkvm_bin())
        .args(["status", "--api-socket", sock.to_str().expect("utf-8")])
        .stdin(std::process::Stdio::null())
        .stdout(full)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run arkvm status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked"),
        "arkvm status panics when stdout fails: {err}"
    );
    assert!(
        !out.status.success(),
        "a failed write to stdout went unnoticed"
    );
    assert_alive(&vm, &sock, "status into a closed pipe");
}

//! Test harness for whole-VM tests: finds the `arkvm` binary and the guest images, spawns
//! `arkvm` as a child process, collects its output line by line, always kills it, and prints
//! its output when a test fails.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The `arkvm` binary next to this test executable (target/<profile>/arkvm), or `$ARKVM_BIN`.
pub fn arkvm_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ARKVM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("arkvm");
    assert!(
        bin.exists(),
        "{} is missing: build it first (scripts/test does `cargo build --release --bins`)",
        bin.display()
    );
    bin
}

/// The cache directory the setup scripts fill: `$ARKVM_CACHE` or `~/.cache/arkvm`.
pub fn cache_dir() -> PathBuf {
    std::env::var("ARKVM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/arkvm")
        })
}

/// A tiny guest kernel built by `guest-images/build-tiny.sh`.
pub fn tiny_guest(name: &str) -> PathBuf {
    let p = cache_dir().join("guests").join(format!("{name}.elf"));
    assert!(
        p.exists(),
        "guest image {} is missing: run guest-images/build-tiny.sh (scripts/test does)",
        p.display()
    );
    p
}

/// A file of the Linux guest built by `guest-images/linux/build.sh`.
pub fn linux_file(name: &str) -> PathBuf {
    let p = cache_dir().join("linux/current").join(name);
    assert!(
        p.exists(),
        "{} is missing: run guest-images/linux/build.sh (scripts/test does)",
        p.display()
    );
    p
}

/// A fresh scratch directory under the system temp dir, removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("arkvm-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct Output {
    stdout: Vec<String>,
    stderr: Vec<String>,
    stdout_closed: bool,
    stderr_closed: bool,
}

/// A running `arkvm` process.
pub struct Vmm {
    child: Option<Child>,
    out: Arc<(Mutex<Output>, Condvar)>,
    status: Option<ExitStatus>,
    label: String,
}

fn pump<R: Read + Send + 'static>(r: R, out: Arc<(Mutex<Output>, Condvar)>, is_stdout: bool) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    let (lock, cv) = &*out;
                    let mut o = lock.lock().expect("output lock");
                    if is_stdout {
                        o.stdout.push(line);
                    } else {
                        o.stderr.push(line);
                    }
                    cv.notify_all();
                }
            }
        }
        let (lock, cv) = &*out;
        let mut o = lock.lock().expect("output lock");
        if is_stdout {
            o.stdout_closed = true;
        } else {
            o.stderr_closed = true;
        }
        cv.notify_all();
    });
}

impl Vmm {
    /// Starts `arkvm` with `args`.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Self {
        let mut cmd = Command::new(arkvm_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let label = format!(
            "arkvm {}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut child = cmd.spawn().expect("spawn arkvm");
        let out = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        pump(child.stdout.take().expect("stdout"), out.clone(), true);
        pump(child.stderr.take().expect("stderr"), out.clone(), false);
        Self {
            child: Some(child),
            out,
            status: None,
            label,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Waits until a stdout line satisfies `pred`, starting at line index `from`; returns the
    /// line's index and text, or None on timeout or end of output.
    pub fn wait_line_from(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<(usize, String)> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.out;
        let mut o = lock.lock().expect("output lock");
        let mut next = from;
        loop {
            while next < o.stdout.len() {
                if pred(&o.stdout[next]) {
                    return Some((next, o.stdout[next].clone()));
                }
                next += 1;
            }
            if o.stdout_closed {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            o = cv.wait_timeout(o, deadline - now).expect("output lock").0;
        }
    }

    /// Waits for a stdout line containing `needle`.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> Option<String> {
        self.wait_line_from(0, timeout, |l| l.contains(needle))
            .map(|(_, l)| l)
    }

    /// Every stdout line so far.
    pub fn stdout(&self) -> Vec<String> {
        self.out.0.lock().expect("output lock").stdout.clone()
    }

    /// Every stderr line so far.
    pub fn stderr(&self) -> Vec<String> {
        self.out.0.lock().expect("output lock").stderr.clone()
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.status {
            return Some(s);
        }
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                self.status = Some(s);
                self.wait_streams_closed(Duration::from_secs(5));
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until both output pumps have read everything the process wrote.
    fn wait_streams_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.out;
        let mut o = lock.lock().expect("output lock");
        while !(o.stdout_closed && o.stderr_closed) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            o = cv.wait_timeout(o, deadline - now).expect("output lock").0;
        }
    }

    /// Sends SIGKILL and reaps the process, then reads what it wrote last.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if self.status.is_none() {
                let _ = child.kill();
                self.status = child.wait().ok();
                self.wait_streams_closed(Duration::from_secs(5));
            }
        }
    }

    /// The output of the process, for failure messages.
    pub fn dump(&self) -> String {
        let o = self.out.0.lock().expect("output lock");
        let tail = |v: &Vec<String>| {
            let start = v.len().saturating_sub(60);
            v[start..].join("\n")
        };
        format!(
            "--- {} ---\n--- stdout (last 60 lines) ---\n{}\n--- stderr (last 60 lines) ---\n{}\n",
            self.label,
            tail(&o.stdout),
            tail(&o.stderr)
        )
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.dump());
        }
    }
}

/// Runs `arkvm` with `args` to completion (with a timeout) and returns status, stdout, stderr.
pub fn run_to_end<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    timeout: Duration,
) -> (ExitStatus, Vec<String>, Vec<String>) {
    let mut vmm = Vmm::spawn(args);
    let status = vmm
        .wait_exit(timeout)
        .unwrap_or_else(|| panic!("arkvm did not exit within {timeout:?}\n{}", vmm.dump()));
    (status, vmm.stdout(), vmm.stderr())
}

/// Fails the calling test with a clear message when `/dev/kvm` is missing.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests need KVM (they are never skipped)"
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers for the snapshot, API, live-snapshot and disk tests.
// ---------------------------------------------------------------------------------------------

/// One HTTP/1.1 request over the control socket at `sock` (`Connection: close`); returns the
/// status code and the body. Panics if the socket cannot be reached or the answer is not HTTP.
pub fn api_request(sock: &Path, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("set read timeout");
    let body = body.unwrap_or(b"");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write request head");
    // A server may refuse a large body before reading it and close the connection; the
    // answer is still there to read.
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {head:?}"));
    (code, body.to_string())
}

/// Like [`api_request`], parsing the body as JSON (`Null` for an empty body).
pub fn api_json(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let (code, text) = api_request(sock, method, path, body.map(str::as_bytes));
    if text.trim().is_empty() {
        return (code, serde_json::Value::Null);
    }
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {path}: answer {code} is not JSON ({e}): {text:?}"));
    (code, v)
}

/// Waits until `path` exists (a control socket being created).
pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    path.exists()
}

/// Parses a memory guest line `PASS <n> GEN <g>` into `(n, g)`.
pub fn parse_pass(line: &str) -> Option<(u64, u64)> {
    let mut w = line.split_whitespace();
    if w.next()? != "PASS" {
        return None;
    }
    let n = w.next()?.parse().ok()?;
    if w.next()? != "GEN" {
        return None;
    }
    let g = w.next()?.parse().ok()?;
    if w.next().is_some() {
        return None;
    }
    Some((n, g))
}

/// The first line (from index `from` on) that shows the guest broke: `TORN`, `DISK-TORN`, a
/// guest fault or panic.
pub fn broken_line(lines: &[String], from: usize) -> Option<String> {
    lines
        .iter()
        .skip(from)
        .find(|l| l.contains("TORN") || l.contains("GUEST FAULT") || l.contains("GUEST PANIC"))
        .cloned()
}

impl Vmm {
    /// How many stdout lines have arrived so far.
    pub fn line_count(&self) -> usize {
        self.out.0.lock().expect("output lock").stdout.len()
    }

    /// Waits for the first `PASS <n> GEN <g>` line at index `from` or later whose generation is
    /// at least `min_gen`; returns its index and generation.
    pub fn wait_pass(&self, from: usize, min_gen: u64, timeout: Duration) -> Option<(usize, u64)> {
        self.wait_line_from(from, timeout, |l| {
            parse_pass(l).is_some_and(|(_, g)| g >= min_gen)
        })
        .and_then(|(i, l)| parse_pass(&l).map(|(_, g)| (i, g)))
    }

    /// The generation of the last `PASS` line so far (0 if none).
    pub fn last_gen(&self) -> u64 {
        let o = self.out.0.lock().expect("output lock");
        o.stdout
            .iter()
            .rev()
            .find_map(|l| parse_pass(l))
            .map(|(_, g)| g)
            .unwrap_or(0)
    }

    /// Whether the process has exited (without waiting).
    pub fn has_exited(&mut self) -> bool {
        if self.status.is_some() {
            return true;
        }
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(s))) => {
                self.status = Some(s);
                true
            }
            _ => false,
        }
    }

    /// Sends `signal` to the process without reaping it.
    pub fn signal(&self, signal: i32) {
        if self.status.is_none() && self.pid() != 0 {
            // SAFETY: kill(2) on the pid of our own unreaped child has no memory effects.
            unsafe {
                libc::kill(self.pid() as i32, signal);
            }
        }
    }
}

/// Reads a snapshot's framed state part (`DIR/state`): checks the 20-byte header's magic and
/// returns the JSON payload.
pub fn read_snapshot_state(dir: &Path) -> serde_json::Value {
    let bytes = std::fs::read(dir.join("state")).expect("read state part");
    assert!(bytes.len() > 24, "state part is too short");
    assert_eq!(&bytes[..8], b"ARKVMST\0", "state magic");
    let n = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")) as usize;
    assert_eq!(bytes.len(), 20 + n + 4, "state length field");
    serde_json::from_slice(&bytes[20..20 + n]).expect("state payload is JSON")
}

/// Runs `arkvm snapshot --api-socket SOCK --out OUT --json EXTRA...` and returns the final
/// report, panicking (with the output) if it fails.
pub fn cli_snapshot(sock: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args: Vec<String> = vec![
        "snapshot".into(),
        "--api-socket".into(),
        sock.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let (status, stdout, stderr) = run_to_end(&args, Duration::from_secs(300));
    assert!(
        status.success(),
        "arkvm {args:?} failed: {status:?}\nstdout: {stdout:?}\nstderr: {stderr:?}"
    );
    let json = stdout
        .iter()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON report in {stdout:?}"));
    let v: serde_json::Value = serde_json::from_str(json).expect("snapshot report is JSON");
    assert_eq!(v["state"], "done", "snapshot report: {v}");
    v
}

/// Serializes the CPU-heavy VM tests of one test binary (the machine has 2 cores); hold the
/// guard for the whole test.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the memory guest with a control socket at `sock`.
pub fn start_memory_guest(sock: &Path, memory: &str, vcpus: u32, cmdline: &str) -> Vmm {
    start_memory_guest_with(sock, memory, vcpus, cmdline, &[])
}

/// Starts the memory guest with a control socket at `sock` and further `arkvm run` options.
pub fn start_memory_guest_with(
    sock: &Path,
    memory: &str,
    vcpus: u32,
    cmdline: &str,
    extra: &[&str],
) -> Vmm {
    let kernel = tiny_guest("memory");
    let vcpus = vcpus.to_string();
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().expect("utf-8 path"),
        "--memory",
        memory,
        "--vcpus",
        &vcpus,
        "--api-socket",
        sock.to_str().expect("utf-8 path"),
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    let vmm = Vmm::spawn(&args);
    assert!(
        wait_for_path(sock, Duration::from_secs(20)),
        "no control socket appeared\n{}",
        vmm.dump()
    );
    vmm
}

/// Starts `arkvm restore --from SNAP --api-socket SOCK [EXTRA...]`.
pub fn start_restore(snap: &Path, sock: &Path, extra: &[&str]) -> Vmm {
    let mut args = vec![
        "restore".to_string(),
        "--from".into(),
        snap.display().to_string(),
        "--api-socket".into(),
        sock.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let vmm = Vmm::spawn(&args);
    assert!(
        wait_for_path(sock, Duration::from_secs(20)),
        "restored VM has no control socket\n{}",
        vmm.dump()
    );
    vmm
}

/// What one snapshot of a running memory guest looked like from outside.
pub struct SnapshotWindow {
    /// The generation of the last `PASS` line seen before the request: the snapshot's
    /// point in time is later.
    pub gen_before: u64,
    /// A generation printed by the original after the snapshot completed (one line of
    /// slack): the snapshot's point in time is earlier.
    pub gen_after: u64,
    /// The snapshot's final report.
    pub report: serde_json::Value,
}

/// Snapshots the running memory guest `vmm` (socket `sock`) into `out` with the CLI (`extra`
/// options), bracketing the snapshot instant by the guest's `PASS` lines. Waits for fresh
/// progress first, and for two more lines after the snapshot.
pub fn snapshot_memory_guest(vmm: &Vmm, sock: &Path, out: &Path, extra: &[&str]) -> SnapshotWindow {
    let start = vmm.line_count();
    // The first pass of a large guest is slow here: every page is touched for the first time.
    vmm.wait_pass(start, 0, Duration::from_secs(180))
        .unwrap_or_else(|| {
            panic!(
                "guest makes no progress before the snapshot\n{}",
                vmm.dump()
            )
        });
    let gen_before = vmm.last_gen();
    let report = cli_snapshot(sock, out, extra);
    let done = vmm.line_count();
    let first = vmm
        .wait_pass(done, 0, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("guest stopped after the snapshot\n{}", vmm.dump()));
    let (_, gen_after) = vmm
        .wait_pass(first.0 + 1, 0, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("guest stopped after the snapshot\n{}", vmm.dump()));
    if let Some(l) = broken_line(&vmm.stdout(), 0) {
        panic!("original guest broke: {l}\n{}", vmm.dump());
    }
    SnapshotWindow {
        gen_before,
        gen_after,
        report,
    }
}

/// Checks a VM restored from a snapshot bracketed by `w`: its first `PASS` line comes within
/// `timeout` and lies inside the window, then `more` further lines come, and nothing is torn.
/// Returns the restored VM's first generation.
pub fn check_restored_memory_guest(
    restored: &Vmm,
    w: &SnapshotWindow,
    more: usize,
    timeout: Duration,
) -> u64 {
    let (mut idx, first) = restored.wait_pass(0, 0, timeout).unwrap_or_else(|| {
        panic!(
            "restored guest printed no PASS line within {timeout:?}\n{}",
            restored.dump()
        )
    });
    assert!(
        first > w.gen_before,
        "restored guest went back in time: first GEN {first} but GEN {} was printed before the \
         snapshot request\n{}",
        w.gen_before,
        restored.dump()
    );
    assert!(
        first <= w.gen_after,
        "restored guest starts at GEN {first}, later than the original's GEN {} printed after \
         the snapshot completed\n{}",
        w.gen_after,
        restored.dump()
    );
    let mut last = first;
    for _ in 0..more {
        let (i, g) = restored.wait_pass(idx + 1, 0, timeout).unwrap_or_else(|| {
            panic!(
                "restored guest stopped making progress\n{}",
                restored.dump()
            )
        });
        assert!(
            g > last,
            "GEN went backwards: {last} then {g}\n{}",
            restored.dump()
        );
        idx = i;
        last = g;
    }
    if let Some(l) = broken_line(&restored.stdout(), 0) {
        panic!("restored guest broke: {l}\n{}", restored.dump());
    }
    first
}

impl Vmm {
    /// The stderr lines of an exited process once they have arrived: [`Vmm::wait_exit`] waits
    /// only for stdout to close, so a last stderr line may still be on its way. Waits up to
    /// 2 s for a first line, then a little longer for any that follow.
    pub fn stderr_settled(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.stderr().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50));
        self.stderr()
    }
}

/// Like [`run_to_end`], but when the process fails, waits for its stderr to settle (see
/// [`Vmm::stderr_settled`]) so that a one-line error is not missed.
pub fn run_to_end_settled<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    timeout: Duration,
) -> (ExitStatus, Vec<String>, Vec<String>) {
    let mut vmm = Vmm::spawn(args);
    let status = vmm
        .wait_exit(timeout)
        .unwrap_or_else(|| panic!("arkvm did not exit within {timeout:?}\n{}", vmm.dump()));
    let err = if status.success() {
        vmm.stderr()
    } else {
        vmm.stderr_settled()
    };
    (status, vmm.stdout(), err)
}

impl Vmm {
    /// Starts `program` with `args` under the same supervision as [`Vmm::spawn`]: for wrappers
    /// that exec `arkvm` in the same process, such as `ip netns exec NS arkvm ...` (the pid is
    /// then arkvm's).
    pub fn spawn_program<S: AsRef<std::ffi::OsStr>>(program: &Path, args: &[S]) -> Self {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let label = format!(
            "{} {}",
            program.display(),
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let out = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        pump(child.stdout.take().expect("stdout"), out.clone(), true);
        pump(child.stderr.take().expect("stderr"), out.clone(), false);
        Self {
            child: Some(child),
            out,
            status: None,
            label,
        }
    }
}

/// Runs `arkvm ARGS` to its end with `env` set and the variables that would change what it
/// does (`ARKVM_REPO`, `ARKVM_KEY_FILE`, `ARKVM_API_SOCKET`, `ARKVM_LOG`, `TZ`) removed
/// unless `env` sets them: its exit code (-1 for a signal), stdout and stderr.
pub fn ark_cli(env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(arkvm_bin());
    for var in [
        "ARKVM_REPO",
        "ARKVM_KEY_FILE",
        "ARKVM_API_SOCKET",
        "ARKVM_LOG",
        "TZ",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied()).args(args);
    let out = cmd.output().expect("run arkvm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `out` parsed as one JSON value; panics with the text when it is not.
pub fn parse_json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

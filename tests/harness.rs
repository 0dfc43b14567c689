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
        if is_stdout {
            let (lock, cv) = &*out;
            lock.lock().expect("output lock").stdout_closed = true;
            cv.notify_all();
        }
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
                // Let the pumps drain what the process wrote last.
                let _ = self.wait_line_from(usize::MAX, Duration::from_secs(2), |_| false);
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if self.status.is_none() {
                let _ = child.kill();
                self.status = child.wait().ok();
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

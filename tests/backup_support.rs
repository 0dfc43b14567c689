//! Helpers of tests/backup.rs: running `arkvm` backup commands, reading a repository's files,
//! following the guests' progress lines, and killing a prune mid-way.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arkvm_tests::{tiny_guest, wait_for_path, Vmm};
use snapshot::repo::Repository;

pub const CMD_TIMEOUT: Duration = Duration::from_secs(120);
pub const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// The tests of this file boot guests; one at a time on this 2-core machine.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn s(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// Runs `arkvm ARGS` to completion.
///
/// Both output streams are read to their end before this returns (a client command's last
/// stderr line is often all it says).
pub fn ark(args: &[String]) -> (ExitStatus, Vec<String>, Vec<String>) {
    use std::io::Read;
    let mut child = std::process::Command::new(arkvm_tests::arkvm_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn arkvm");
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("stdout")));
    let err = reader(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + CMD_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for arkvm") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("arkvm {args:?} did not finish within {CMD_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = out.join().expect("stdout reader");
    let err = err.join().expect("stderr reader");
    (status, out, err)
}

pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|x| x.to_string()).collect()
}

/// `--key FILE` when `key` is given.
pub fn key_args(key: Option<&Path>) -> Vec<String> {
    key.map(|k| vec!["--key".to_string(), s(k)])
        .unwrap_or_default()
}

pub fn init_repo(repo: &Path, key: Option<&Path>) {
    let mut a = args(&["backup", "init", "--repo", &s(repo)]);
    a.extend(key_args(key));
    let (st, out, err) = ark(&a);
    assert!(st.success(), "backup init failed: {out:?} {err:?}");
}

pub fn json_line(out: &[String]) -> serde_json::Value {
    let line = out
        .iter()
        .rev()
        .find(|l| l.trim_start().starts_with(['{', '[']))
        .unwrap_or_else(|| panic!("no JSON in {out:?}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

pub fn snapshot_args(sock: &Path, repo: &Path, key: Option<&Path>) -> Vec<String> {
    let mut a = args(&[
        "snapshot",
        "--api-socket",
        &s(sock),
        "--repo",
        &s(repo),
        "--json",
    ]);
    a.extend(key_args(key));
    a
}

/// Takes a backup point of the VM at `sock`; returns the final report.
pub fn backup(sock: &Path, repo: &Path, key: Option<&Path>) -> serde_json::Value {
    let (st, out, err) = ark(&snapshot_args(sock, repo, key));
    assert!(st.success(), "snapshot --repo failed: {out:?} {err:?}");
    let v = json_line(&out);
    assert_eq!(v["state"], "done", "{v}");
    assert!(v["id"].as_str().is_some_and(|i| !i.is_empty()), "{v}");
    v
}

/// `backup list --json`, panicking if it fails.
pub fn list(repo: &Path, key: Option<&Path>) -> Vec<serde_json::Value> {
    let mut a = args(&["backup", "list", "--repo", &s(repo), "--json"]);
    a.extend(key_args(key));
    let (st, out, err) = ark(&a);
    let rows = json_line(&out)
        .as_array()
        .expect("list --json is an array")
        .clone();
    // `backup list` exits 3 exactly when it lists a point it cannot read.
    let unreadable = rows.iter().any(|r| r.get("error").is_some());
    let expected = if unreadable { 3 } else { 0 };
    assert_eq!(
        st.code(),
        Some(expected),
        "backup list exit status: {out:?} {err:?}"
    );
    rows
}

/// `backup verify --json`: exit code and report.
pub fn verify(repo: &Path, key: Option<&Path>) -> (i32, serde_json::Value) {
    let mut a = args(&["backup", "verify", "--repo", &s(repo), "--json"]);
    a.extend(key_args(key));
    let (st, out, err) = ark(&a);
    let code = st.code().unwrap_or(-1);
    assert!(
        out.iter().any(|l| l.starts_with('{')),
        "verify printed no JSON (exit {code}): {out:?} {err:?}"
    );
    (code, json_line(&out))
}

pub fn assert_clean(repo: &Path, key: Option<&Path>, points: usize) {
    let (code, v) = verify(repo, key);
    assert_eq!(code, 0, "verify is not clean: {v}");
    assert_eq!(v["clean"], true, "{v}");
    assert_eq!(v["points_checked"], points as u64, "{v}");
}

/// The names of every chunk file under REPO/chunks.
pub fn chunk_files(repo: &Path) -> BTreeSet<String> {
    // The directories appear with the first chunk, and a running prune may remove them.
    let mut set = BTreeSet::new();
    let Ok(dirs) = std::fs::read_dir(repo.join("chunks")) else {
        return set;
    };
    for d in dirs.flatten() {
        let Ok(files) = std::fs::read_dir(d.path()) else {
            continue;
        };
        for f in files.flatten() {
            set.insert(f.file_name().to_string_lossy().into_owned());
        }
    }
    set
}

pub fn chunk_path(repo: &Path, id: &str) -> PathBuf {
    repo.join("chunks").join(&id[..4]).join(id)
}

pub fn point_path(repo: &Path, id: &str) -> PathBuf {
    repo.join("points").join(format!("{id}.json"))
}

/// The chunk ids a plain point manifest lists, in order, with repeats (read as JSON, not
/// through the library).
pub fn point_ref_list(repo: &Path, id: &str) -> Vec<String> {
    let text = std::fs::read_to_string(point_path(repo, id)).expect("read point manifest");
    let v: serde_json::Value = serde_json::from_str(&text).expect("point manifest is JSON");
    let mut refs = Vec::new();
    for o in v["objects"].as_array().expect("objects") {
        for c in o["chunks"].as_array().expect("chunks") {
            refs.push(c.as_str().expect("chunk id").to_string());
        }
    }
    refs
}

/// The distinct chunk ids a plain point manifest lists.
pub fn point_refs(repo: &Path, id: &str) -> BTreeSet<String> {
    point_ref_list(repo, id).into_iter().collect()
}

pub fn flip_byte(path: &Path, at: usize) {
    let mut b = std::fs::read(path).expect("read file to damage");
    assert!(at < b.len(), "{} is too short", path.display());
    b[at] ^= 0x01;
    std::fs::write(path, b).expect("write damaged file");
}

/// Starts `arkvm run` with a control socket and a VM name.
pub fn start_vm(guest: &str, memory: &str, name: &str, sock: &Path, extra: &[&str]) -> Vmm {
    let kernel = tiny_guest(guest);
    let mut a = args(&[
        "run",
        "--kernel",
        &s(&kernel),
        "--memory",
        memory,
        "--name",
        name,
        "--api-socket",
        &s(sock),
        "--log-level",
        "info",
    ]);
    a.extend(extra.iter().map(|x| x.to_string()));
    let vm = Vmm::spawn(&a);
    assert!(
        wait_for_path(sock, Duration::from_secs(20)),
        "no control socket\n{}",
        vm.dump()
    );
    vm
}

pub fn memory_vm(memory: &str, name: &str, sock: &Path, hot_pct: u32) -> Vmm {
    let cmdline = format!("arkvm.hot_pct={hot_pct}");
    start_vm("memory", memory, name, sock, &["--cmdline", &cmdline])
}

/// Starts `arkvm restore --repo REPO --id ID [--key] EXTRA...`.
pub fn restore(repo: &Path, id: &str, key: Option<&Path>, extra: &[String]) -> Restored {
    let mut a = args(&["restore", "--repo", &s(repo), "--id", id]);
    a.extend(key_args(key));
    a.extend(extra.iter().cloned());
    Restored(Vmm::spawn(&a))
}

/// A VM restored from a repository. `arkvm restore --repo` hydrates the point's disks into
/// `$TMPDIR/arkvm-restore-<pid>-disks` and removes it when the VM ends (a kill leaves it for
/// the next restore to remove), so dropping this kills the VM and removes that directory.
pub struct Restored(pub Vmm);

impl std::ops::Deref for Restored {
    type Target = Vmm;
    fn deref(&self) -> &Vmm {
        &self.0
    }
}

impl std::ops::DerefMut for Restored {
    fn deref_mut(&mut self) -> &mut Vmm {
        &mut self.0
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        let pid = self.0.pid();
        self.0.kill();
        remove_restore_copies(pid);
    }
}

/// Removes what `arkvm restore --repo` process `pid` left in the temp directory.
pub fn remove_restore_copies(pid: u32) {
    let tmp = std::env::temp_dir();
    let prefixes = [
        format!("arkvm-restore-{pid}-"),
        format!(".arkvm-restore-{pid}-"),
    ];
    for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Parses `PASS <n> GEN <g>` into g.
pub fn pass_gen(line: &str) -> Option<u64> {
    let w: Vec<&str> = line.split_whitespace().collect();
    match w.as_slice() {
        ["PASS", _, "GEN", g] => g.parse().ok(),
        _ => None,
    }
}

/// Parses `DISKGEN <g> LAST <n>` into (g, n).
pub fn diskgen(line: &str) -> Option<(u64, u64)> {
    let w: Vec<&str> = line.split_whitespace().collect();
    match w.as_slice() {
        ["DISKGEN", g, "LAST", n] => Some((g.parse().ok()?, n.parse().ok()?)),
        _ => None,
    }
}

/// The first line from `from` on that `parse` accepts: (index, value).
pub fn wait_parsed<T>(vm: &Vmm, from: usize, parse: impl Fn(&str) -> Option<T>) -> (usize, T) {
    let (i, l) = vm
        .wait_line_from(from, LINE_TIMEOUT, |l| parse(l).is_some())
        .unwrap_or_else(|| panic!("no progress line from line {from} on\n{}", vm.dump()));
    (i, parse(&l).expect("accepted line parses"))
}

/// The last value `parse` accepts among the lines so far.
pub fn last_parsed<T>(vm: &Vmm, parse: impl Fn(&str) -> Option<T>) -> Option<T> {
    vm.stdout().iter().rev().find_map(|l| parse(l))
}

pub fn assert_not_broken(vm: &Vmm) {
    if let Some(l) = vm
        .stdout()
        .iter()
        .find(|l| l.contains("TORN") || l.contains("GUEST FAULT") || l.contains("GUEST PANIC"))
    {
        panic!("guest broke: {l}\n{}", vm.dump());
    }
}

/// A backup bracketed by the guest's progress lines: the point's instant lies after the last
/// line before the request and before the second line after the backup finished.
pub struct Window<T> {
    pub before: T,
    pub after: T,
    pub id: String,
}

pub fn bracketed_backup<T: Copy>(
    vm: &Vmm,
    sock: &Path,
    repo: &Path,
    key: Option<&Path>,
    parse: impl Fn(&str) -> Option<T> + Copy,
) -> Window<T> {
    wait_parsed(vm, vm.stdout().len(), parse);
    let before = last_parsed(vm, parse).expect("a progress line");
    let report = backup(sock, repo, key);
    let (i, _) = wait_parsed(vm, vm.stdout().len(), parse);
    let (_, after) = wait_parsed(vm, i + 1, parse);
    assert_not_broken(vm);
    Window {
        before,
        after,
        id: report["id"].as_str().expect("id").to_string(),
    }
}

pub fn row<'a>(rows: &'a [serde_json::Value], id: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("point {id} is not listed: {rows:?}"))
}

pub fn num(v: &serde_json::Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing in {v}"))
}

pub fn pct(a: u64, b: u64) -> f64 {
    100.0 * a as f64 / b.max(1) as f64
}

/// The status page of the memory image of point `id`: (magic ok, DISK_LAST, ring size B).
pub fn point_disk_status(repo: &Repository, id: &str) -> (u64, u64) {
    let point = repo.read_point(id).expect("read point");
    let memory = point.object("memory").expect("point has memory");
    // The status page is at guest-physical 0x3FF000: chunk 3 (1 MiB chunks), offset 0xFF000.
    assert_eq!(memory.chunk_size, 1 << 20);
    let chunk = repo.read_chunk(&memory.chunks[3]).expect("read chunk 3");
    let page = &chunk[0xFF000..0xFF000 + 0x30];
    let q = |o: usize| u64::from_le_bytes(page[o..o + 8].try_into().expect("8 bytes"));
    assert_eq!(&page[..8], b"ARKVMST1", "status page magic in point {id}");
    (q(0x18), q(0x28))
}

/// Checks a `numbered` ring disk image: blocks 0..B hold (g, i) with the newer generation in a
/// prefix, blocks past B are zero. Returns the number `g*B+i` of the newest write on it.
pub fn ring_last(disk: &[u8], b: u64, what: &str) -> u64 {
    let q = |o: usize| u64::from_le_bytes(disk[o..o + 8].try_into().expect("8 bytes"));
    let gens: Vec<u64> = (0..b as usize)
        .map(|i| {
            assert_eq!(
                q(i * 4096 + 8),
                i as u64,
                "{what}: block {i} holds another index"
            );
            q(i * 4096)
        })
        .collect();
    let top = gens[0];
    assert!(top >= 1, "{what}: the ring was never written");
    let j = gens.iter().take_while(|g| **g == top).count();
    for (i, g) in gens.iter().enumerate().skip(j) {
        assert_eq!(
            *g,
            top - 1,
            "{what}: block {i} is at gen {g}, the ring at {top}/{j}"
        );
    }
    let ring_end = b as usize * 4096;
    if let Some(off) = disk[ring_end..].iter().position(|x| *x != 0) {
        panic!(
            "{what}: non-zero byte past the ring at {:#x}",
            ring_end + off
        );
    }
    top * b + j as u64 - 1
}

/// Restoring `id` must fail at once with one `arkvm: error:` line that contains `needle`, and
/// the guest must not run.
pub fn assert_restore_refused(repo: &Path, id: &str, key: Option<&Path>, needle: &str) {
    let mut a = args(&["restore", "--repo", &s(repo), "--id", id]);
    a.extend(key_args(key));
    let (st, out, err) = ark(&a);
    assert!(!st.success(), "restore of {id} succeeded: {out:?} {err:?}");
    assert!(
        !out.iter().any(|l| l.starts_with("PASS")),
        "the guest of a refused point ran: {out:?}"
    );
    assert_eq!(err.len(), 1, "not a one-line error: {err:?}");
    assert!(
        err[0].starts_with("arkvm: error:") && err[0].contains(needle),
        "unclear error (wanted {needle:?}): {err:?}"
    );
}

/// A restored memory guest that prints three PASS lines and nothing torn.
pub fn assert_restores(repo: &Path, id: &str, key: Option<&Path>) {
    let mut r = restore(repo, id, key, &[]);
    let (i, _) = wait_parsed(&r, 0, pass_gen);
    let (i, _) = wait_parsed(&r, i + 1, pass_gen);
    wait_parsed(&r, i + 1, pass_gen);
    assert_not_broken(&r);
    r.kill();
}

/// Takes `n` backups of a fresh 64 MiB memory guest (hot_pct=1) named `name`; returns the ids.
pub fn memory_points(
    dir: &Path,
    repo: &Path,
    key: Option<&Path>,
    name: &str,
    n: usize,
) -> Vec<String> {
    let sock = dir.join(format!("{name}.sock"));
    let mut vm = memory_vm("64M", name, &sock, 1);
    wait_parsed(&vm, 0, pass_gen);
    let mut ids = Vec::new();
    for _ in 0..n {
        let r = backup(&sock, repo, key);
        ids.push(r["id"].as_str().expect("id").to_string());
        let from = vm.stdout().len();
        wait_parsed(&vm, from, pass_gen);
    }
    assert_not_broken(&vm);
    vm.kill();
    ids
}

/// The pid of the child of process `pid` that has exec'd `bin` (strace also forks
/// short-lived probes of its own).
pub fn exec_child(pid: u32, bin: &Path) -> Option<u32> {
    let bin = std::fs::canonicalize(bin).ok()?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    text.split_whitespace()
        .filter_map(|c| c.parse().ok())
        .find(|c: &u32| std::fs::read_link(format!("/proc/{c}/exe")).is_ok_and(|e| e == bin))
}

pub fn have_strace() -> bool {
    std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `arkvm backup prune --keep-last 1` on `repo` and kills it with SIGKILL once `ready`
/// says the prune is under way. With strace, every unlink is slowed by 200 ms so the kill
/// lands between two deletions; without it the kill comes after `fallback_delay`. Returns
/// whether the process died of the kill (rather than finishing first).
pub fn kill_prune_midway(repo: &Path, ready: impl Fn() -> bool, fallback_delay: Duration) -> bool {
    let prune = args(&["backup", "prune", "--repo", &s(repo), "--keep-last", "1"]);
    let bin = arkvm_tests::arkvm_bin();
    let mut cmd = if have_strace() {
        let mut c = std::process::Command::new("strace");
        c.args(["-f", "-o", "/dev/null", "-e", "trace=unlink,unlinkat"])
            .args(["-e", "inject=unlink,unlinkat:delay_enter=200000"])
            .arg(&bin);
        c
    } else {
        std::process::Command::new(&bin)
    };
    let mut child = cmd
        .args(&prune)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn prune");
    let target = if have_strace() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(p) = exec_child(child.id(), &bin) {
                break p;
            }
            assert!(Instant::now() < deadline, "strace started no arkvm");
            std::thread::sleep(Duration::from_millis(1));
        }
    } else {
        child.id()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    if have_strace() {
        while !ready() {
            assert!(Instant::now() < deadline, "the prune never got under way");
            std::thread::sleep(Duration::from_millis(2));
        }
    } else {
        std::thread::sleep(fallback_delay);
    }
    // SAFETY: kill(2) on a live child (or strace's tracee) has no memory effects.
    let rc = unsafe { libc::kill(target as i32, libc::SIGKILL) };
    assert!(
        rc == 0 || !have_strace(),
        "the traced prune is gone before the kill"
    );
    let st = child.wait().expect("wait for prune");
    // Under strace the tracee's death shows as strace's status 128+9 (or 137).
    let killed = {
        use std::os::unix::process::ExitStatusExt;
        st.signal() == Some(libc::SIGKILL) || st.code() == Some(137)
    };
    // Let strace's tracee disappear fully before the repository is read.
    std::thread::sleep(Duration::from_millis(50));
    killed
}

/// Tells from a repository's files that a prune is under way.
pub type ReadyCheck = Box<dyn Fn(&Path) -> bool>;

pub fn point_files(repo: &Path) -> usize {
    std::fs::read_dir(repo.join("points"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Runs the commands `cmds` at the same time; returns each one's status and output.
pub fn run_together(cmds: Vec<Vec<String>>) -> Vec<(bool, Vec<String>, String)> {
    let mut procs: Vec<Vmm> = cmds.iter().map(|a| Vmm::spawn(a)).collect();
    procs
        .iter_mut()
        .map(|p| {
            let st = p
                .wait_exit(CMD_TIMEOUT)
                .unwrap_or_else(|| panic!("did not finish\n{}", p.dump()));
            (st.success(), p.stdout(), p.dump())
        })
        .collect()
}

/// The timestamp of the first stderr line of `vm` that contains `needle`.
pub fn log_time(vm: &Vmm, needle: &str) -> String {
    let err = vm.stderr();
    let line = err
        .iter()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no log line with {needle:?}\n{}", vm.dump()));
    line.split_whitespace()
        .next()
        .expect("timestamp")
        .to_string()
}

/// `arkvm ARGS` must fail with one `arkvm: error:` line containing `needle`.
pub fn assert_refused(a: &[String], needle: &str) {
    let (st, out, err) = ark(a);
    assert!(!st.success(), "{a:?} succeeded: {out:?}");
    assert_eq!(err.len(), 1, "{a:?}: not a one-line error: {err:?}");
    assert!(
        err[0].starts_with("arkvm: error:") && err[0].contains(needle),
        "{a:?}: unclear error (wanted {needle:?}): {err:?}"
    );
}

/// The distinct chunk ids of a point of an encrypted repository (through the library).
pub fn point_refs_with_key(repo: &Path, key: &Path, id: &str) -> BTreeSet<String> {
    let k = snapshot::repo::RepoKey::load(key).expect("load key");
    let lib = Repository::open(repo, Some(k)).expect("open repository");
    let point = lib.read_point(id).expect("read point");
    point.chunk_ids().map(|c| c.to_hex()).collect()
}

/// Runs `arkvm ARGS` with its stdout a pipe whose reading end is already closed (as in
/// `arkvm ... | true`); returns the exit status and stderr.
pub fn run_into_closed_pipe(a: &[String]) -> (ExitStatus, String) {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) writes two new descriptors into the array it is given.
    let rc = unsafe { libc::pipe(fds.as_mut_ptr()) };
    assert_eq!(rc, 0, "pipe: {}", std::io::Error::last_os_error());
    // SAFETY: fds[0] and fds[1] are fresh descriptors that nothing else owns.
    let (read_end, write_end) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    drop(read_end);
    let out = std::process::Command::new(arkvm_tests::arkvm_bin())
        .args(a)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(write_end))
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run arkvm");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Where the memory guest of `point` stands, read from the point's memory in the repository:
/// every page of the region holds one generation in both of its qwords, pages `[0, p)` hold
/// `g` and the rest `g - 1`. Returns `(g, p)`; panics on any other picture (a torn image).
pub fn memory_picture(repo: &Repository, id: &str) -> (u64, usize) {
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

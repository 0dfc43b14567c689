//! Recovery, the memory side (issue 11): a restore from a backup point runs before its memory
//! is read; a damaged memory chunk, whichever thread touches it first (a vCPU, a device on the
//! event loop, the prefetch thread), ends the restore with one clear error within a deadline and
//! never hangs; restores under CPU pressure never stall.
//!
//! The stall hunt runs `ARKVM_STALL_RESTORES` restores (50 by default; the documented long run
//! is 500): `ARKVM_STALL_RESTORES=500 cargo test --release -p arkvm-tests --test recovery
//! restores_under_cpu_pressure_never_stall`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arkvm_tests::{
    api_json, arkvm_bin, cli_snapshot, one_at_a_time, parse_pass, require_kvm, run_to_end,
    start_memory_guest, start_restore, tiny_guest, wait_for_path, ScratchDir, Vmm,
};

/// How long a restore of a damaged point may take to end with its error.
const FAILURE_DEADLINE: Duration = Duration::from_secs(60);

/// The chunk size of guest memory in snapshots and repositories.
const CHUNK: u64 = 1 << 20;

fn s(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// Starts `arkvm ARGS` with the environment variables `env` set.
fn spawn_with_env(env: &[(&str, &str)], args: &[String]) -> Vmm {
    let mut a: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    a.push(s(&arkvm_bin()));
    a.extend(args.iter().cloned());
    Vmm::spawn_program(Path::new("/usr/bin/env"), &a)
}

/// Takes a backup point of the VM at `sock` into `repo`; returns its id.
fn backup_point(sock: &Path, repo: &Path) -> String {
    let args = [
        "snapshot",
        "--api-socket",
        &s(sock),
        "--repo",
        &s(repo),
        "--json",
    ];
    let (st, out, err) = run_to_end(&args, Duration::from_secs(600));
    assert!(st.success(), "snapshot --repo failed: {out:?} {err:?}");
    let line = out
        .iter()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON report in {out:?}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("report is JSON");
    assert_eq!(v["state"], "done", "{v}");
    v["id"].as_str().expect("id").to_string()
}

fn init_repo(repo: &Path) {
    let (st, out, err) = run_to_end(
        &["backup", "init", "--repo", &s(repo)],
        Duration::from_secs(60),
    );
    assert!(st.success(), "backup init failed: {out:?} {err:?}");
}

/// The chunk ids of the point's `memory` object, in order.
fn memory_chunk_ids(repo: &Path, id: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo.join("points").join(format!("{id}.json")))
        .expect("read point manifest");
    let v: serde_json::Value = serde_json::from_str(&text).expect("point manifest is JSON");
    let objects = v["objects"].as_array().expect("objects");
    let memory = objects
        .iter()
        .find(|o| o["name"] == "memory")
        .unwrap_or_else(|| panic!("no memory object in {v}"));
    memory["chunks"]
        .as_array()
        .expect("chunks")
        .iter()
        .map(|c| c.as_str().expect("chunk id").to_string())
        .collect()
}

fn flip_byte(path: &Path, at: u64) {
    let mut b = std::fs::read(path).expect("read file to damage");
    assert!((at as usize) < b.len(), "{} is too short", path.display());
    b[at as usize] ^= 0x5a;
    std::fs::write(path, b).expect("write damaged file");
}

/// Damages chunk `index` of a snapshot directory's memory file.
fn damage_dir_chunk(snap: &Path, index: u64) {
    flip_byte(&snap.join("memory"), index * CHUNK + 1234);
}

/// Waits for `vm` to end with one clear error naming every one of `needles`, within
/// [`FAILURE_DEADLINE`]; checks that the guest never reported bad memory.
fn assert_clear_failure(vm: &mut Vmm, needles: &[&str]) {
    let t = Instant::now();
    let status = vm.wait_exit(FAILURE_DEADLINE).unwrap_or_else(|| {
        panic!(
            "the restore of a damaged chunk did not end within {FAILURE_DEADLINE:?}\n{}",
            vm.dump()
        )
    });
    assert!(!status.success(), "exited 0\n{}", vm.dump());
    let err = vm.stderr_settled();
    let errors: Vec<&String> = err
        .iter()
        .filter(|l| l.starts_with("arkvm: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "not one error line\n{}", vm.dump());
    for n in needles {
        assert!(
            errors[0].contains(n),
            "the error does not name {n:?}\n{}",
            vm.dump()
        );
    }
    let out = vm.stdout();
    assert!(
        !out.iter()
            .any(|l| l.contains("TORN") || l.starts_with("GUEST FAULT")),
        "the guest ran on bad memory\n{}",
        vm.dump()
    );
    eprintln!("ended in {:?}: {}", t.elapsed(), errors[0]);
}

#[test]
fn a_damaged_chunk_touched_first_by_a_vcpu_stops_the_restore() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("rec-vcpu");
    let repo = dir.path().join("repo");
    init_repo(&repo);
    let sock = dir.path().join("vm.sock");
    let mut vm = start_memory_guest(&sock, "64M", 1, "arkvm.hot_pct=1");
    vm.wait_pass(0, 0, Duration::from_secs(120))
        .unwrap_or_else(|| panic!("no PASS\n{}", vm.dump()));
    let id = backup_point(&sock, &repo);
    vm.kill();
    // Chunk 4 (4-5 MiB) holds the hot pages the guest rewrites in every pass; the prefetch
    // waits 20 s, so the vCPU is the first to touch it.
    let ids = memory_chunk_ids(&repo, &id);
    let chunk = &ids[4];
    let path = repo.join("chunks").join(&chunk[..4]).join(chunk);
    let len = std::fs::metadata(&path).expect("chunk file").len();
    flip_byte(&path, len / 2);
    let rsock = dir.path().join("r.sock");
    let mut r = spawn_with_env(
        &[("ARKVM_LOADER_PREFETCH_DELAY_MS", "20000")],
        &[
            "restore".into(),
            "--repo".into(),
            s(&repo),
            "--id".into(),
            id.clone(),
            "--api-socket".into(),
            s(&rsock),
        ],
    );
    assert_clear_failure(&mut r, &[&id, chunk.as_str(), "chunk 4"]);
}

#[test]
fn a_damaged_ring_chunk_touched_by_the_disk_device_stops_the_restore() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("rec-ring");
    let img = dir.path().join("d.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).expect("disk image");
    let sock = dir.path().join("vm.sock");
    let kernel = tiny_guest("disk");
    let mut vm = Vmm::spawn(&[
        "run",
        "--kernel",
        &s(&kernel),
        "--memory",
        "64M",
        "--disk",
        &s(&img),
        "--api-socket",
        &s(&sock),
        "--cmdline",
        "arkvm.mode=numbered",
    ]);
    assert!(
        wait_for_path(&sock, Duration::from_secs(20)),
        "{}",
        vm.dump()
    );
    vm.wait_line_from(0, Duration::from_secs(60), |l| l.starts_with("DISKGEN "))
        .unwrap_or_else(|| panic!("no DISKGEN\n{}", vm.dump()));
    let snap = dir.path().join("snap");
    cli_snapshot(&sock, &snap, &[]);
    vm.kill();
    // The chunk of the guest's virtqueues (desc, avail and used rings): the device reads them
    // on every notification, and the guest polls the used ring.
    let chunk = ring_chunk();
    damage_dir_chunk(&snap, chunk);
    for attempt in 0..2 {
        let rsock = dir.path().join(format!("r{attempt}.sock"));
        let disks = dir.path().join(format!("disks{attempt}"));
        let mut r = spawn_with_env(
            &[("ARKVM_LOADER_PREFETCH_DELAY_MS", "20000")],
            &[
                "restore".into(),
                "--from".into(),
                s(&snap),
                "--disk-dir".into(),
                s(&disks),
                "--api-socket".into(),
                s(&rsock),
            ],
        );
        let needle = format!("chunk {chunk}");
        assert_clear_failure(&mut r, &[&needle, &s(&snap)]);
    }
}

/// The memory chunk that holds the disk guest's `QUEUES` (from its symbol table).
fn ring_chunk() -> u64 {
    let out = std::process::Command::new("nm")
        .arg(tiny_guest("disk"))
        .output()
        .expect("run nm on the disk guest");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("3blk6QUEUES"))
        .unwrap_or_else(|| panic!("no QUEUES symbol in the disk guest"));
    let addr = u64::from_str_radix(line.split_whitespace().next().expect("address"), 16)
        .expect("hex address");
    addr / CHUNK
}

#[test]
fn a_damaged_chunk_only_prefetch_touches_stops_the_restore() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("rec-prefetch");
    let sock = dir.path().join("vm.sock");
    // The guest uses 4-12 MiB only: chunk 40 is never touched by it.
    let mut vm = start_memory_guest(&sock, "64M", 1, "arkvm.hot_pct=1 arkvm.region_mb=8");
    vm.wait_pass(0, 0, Duration::from_secs(120))
        .unwrap_or_else(|| panic!("no PASS\n{}", vm.dump()));
    let snap = dir.path().join("snap");
    cli_snapshot(&sock, &snap, &[]);
    vm.kill();
    damage_dir_chunk(&snap, 40);
    let rsock = dir.path().join("r.sock");
    let mut r = start_restore(&snap, &rsock, &[]);
    assert_clear_failure(&mut r, &["chunk 40", &s(&snap)]);
}

/// The restored VM's `memory_loader` object from `GET /vm`.
fn loader_info(sock: &Path) -> serde_json::Value {
    let (status, v) = api_json(sock, "GET", "/vm", None);
    assert_eq!(status, 200, "{v}");
    v["memory_loader"].clone()
}

#[test]
fn a_4g_point_runs_before_its_memory_is_read() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("rec-4g");
    let repo = dir.path().join("repo");
    init_repo(&repo);
    let sock = dir.path().join("vm.sock");
    // Every page of 4 GiB written (pass 1), then a PASS line for every pass over 1% of it.
    let mut vm = start_memory_guest(&sock, "4G", 1, "arkvm.hot_pct=1 arkvm.interval=1");
    vm.wait_pass(0, 0, Duration::from_secs(300))
        .unwrap_or_else(|| panic!("no PASS\n{}", vm.dump()));
    let id = backup_point(&sock, &repo);
    vm.kill();
    let rsock = dir.path().join("r.sock");
    let mut r = Vmm::spawn(&[
        "restore",
        "--repo",
        &s(&repo),
        "--id",
        &id,
        "--api-socket",
        &s(&rsock),
    ]);
    assert!(
        wait_for_path(&rsock, Duration::from_secs(60)),
        "{}",
        r.dump()
    );
    r.wait_pass(0, 0, Duration::from_secs(300))
        .unwrap_or_else(|| panic!("the restored guest printed nothing\n{}", r.dump()));
    let info = loader_info(&rsock);
    let total = info["bytes_total"].as_u64().expect("bytes_total");
    let at_first = info["bytes_loaded_at_first_output"]
        .as_u64()
        .unwrap_or_else(|| panic!("no first-output mark: {info}"));
    eprintln!("4 GiB point: first output with {at_first} of {total} bytes loaded; {info}");
    assert_eq!(total, 4 << 30);
    // The counter can lag the fills by the chunks in flight (a few MiB): half is a wide margin.
    assert!(
        at_first < total / 2,
        "the guest first printed only once {at_first} of {total} bytes were in: {info}"
    );
    // `arkvm status` shows the loader's progress.
    let (st, out, err) = run_to_end(
        &["status", "--api-socket", &s(&rsock)],
        Duration::from_secs(60),
    );
    assert!(st.success(), "status failed: {out:?} {err:?}");
    assert!(
        out.iter()
            .any(|l| l.starts_with("loader:") && l.contains("/4096 chunks")),
        "no loader line in status: {out:?}"
    );
    // The loader finishes, and says so.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let info = loader_info(&rsock);
        if info["fully_loaded"] == true {
            assert_eq!(info["bytes_loaded"], total, "{info}");
            break;
        }
        assert!(Instant::now() < deadline, "never fully loaded: {info}");
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Some(l) = arkvm_tests::broken_line(&r.stdout(), 0) {
        panic!("restored guest broke: {l}\n{}", r.dump());
    }
    r.kill();
}

/// Threads that keep the host's CPUs busy until dropped.
struct CpuPressure {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuPressure {
    fn start(n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 1u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..100_000 {
                            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                        }
                        std::hint::black_box(x);
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for CpuPressure {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn restores_under_cpu_pressure_never_stall() {
    require_kvm();
    let _serial = one_at_a_time();
    let count: usize = std::env::var("ARKVM_STALL_RESTORES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    // A restore that prints nothing for this long is a stall (the lasted 30 s+).
    let stall = Duration::from_secs(60);
    let dir = ScratchDir::new("rec-stall");
    let sock = dir.path().join("vm.sock");
    let mut vm = start_memory_guest(&sock, "128M", 1, "arkvm.hot_pct=1");
    vm.wait_pass(0, 0, Duration::from_secs(120))
        .unwrap_or_else(|| panic!("no PASS\n{}", vm.dump()));
    let snap = dir.path().join("snap");
    cli_snapshot(&sock, &snap, &[]);
    vm.kill();

    let _pressure = CpuPressure::start(3);
    let mut times = Vec::with_capacity(count);
    let mut warnings = 0;
    for i in 0..count {
        let rsock: PathBuf = dir.path().join(format!("r{}.sock", i % 2));
        let t = Instant::now();
        let mut r = start_restore(&snap, &rsock, &[]);
        let Some((_, _)) = r.wait_pass(0, 0, stall) else {
            let (_, info) = api_json(&rsock, "GET", "/vm", None);
            panic!(
                "restore {i} of {count} stalled: no PASS within {stall:?}; GET /vm: {info}\n{}",
                r.dump()
            );
        };
        times.push(t.elapsed());
        // The other half of the stall: memory that is never fully loaded.
        loop {
            let info = loader_info(&rsock);
            assert!(info["chunks_total"].as_u64() == Some(128), "{info}");
            if info["fully_loaded"] == true {
                break;
            }
            assert!(
                t.elapsed() < stall,
                "restore {i} of {count}: memory not loaded within {stall:?}: {info}\n{}",
                r.dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        warnings += r
            .stderr()
            .iter()
            .filter(|l| l.contains("memory loader: no chunk"))
            .count();
        if let Some(l) = arkvm_tests::broken_line(&r.stdout(), 0) {
            panic!("restore {i} broke: {l}\n{}", r.dump());
        }
        r.kill();
        let first = r.stdout().iter().find_map(|l| parse_pass(l)).is_some();
        assert!(first, "restore {i}: no parsable PASS line\n{}", r.dump());
    }
    times.sort();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "{count} restores under CPU pressure: first output median {:?}, max {:?}; {warnings} \
         stall warnings; load {}",
        times[times.len() / 2],
        times[times.len() - 1],
        load.trim()
    );
}

//! A snapshot never costs the guest its disk (issue 13): the disk guest's 16 MiB disk lives on a
//! small tmpfs. With the filesystem nearly full, a live snapshot is refused before it starts
//! (one clear line) because the overlay's worst case cannot be reserved; with room, it
//! succeeds. The guest never sees a write fail and keeps writing throughout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use arkvm_tests::{
    broken_line, one_at_a_time, require_kvm, run_to_end, tiny_guest, wait_for_path, ScratchDir, Vmm,
};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).expect("mount point");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "mount tmpfs at {} failed: {st:?}",
            at.display()
        );
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Waits for `n` fresh `DISKGEN` lines after line `from`; returns the index of the last one.
fn wait_gens(vm: &Vmm, mut from: usize, n: usize) -> usize {
    for _ in 0..n {
        let (i, _) = vm
            .wait_line_from(from, Duration::from_secs(120), |l| {
                l.starts_with("DISKGEN ")
            })
            .unwrap_or_else(|| panic!("the disk guest stopped writing\n{}", vm.dump()));
        from = i + 1;
    }
    from
}

fn assert_guest_intact(vm: &Vmm) {
    let out = vm.stdout();
    let failed = out
        .iter()
        .find(|l| l.contains("DISK-WRITE-FAILED") || l.contains("IOERR"));
    assert!(
        failed.is_none(),
        "the guest saw a disk error\n{}",
        vm.dump()
    );
    if let Some(l) = broken_line(&out, 0) {
        panic!("guest broke: {l}\n{}", vm.dump());
    }
}

/// Fills the filesystem of `dir` with a file, then gives back `leave` bytes of it.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create filler");
    let block = vec![0x5au8; 64 << 10];
    let mut written = 0u64;
    while f.write_all(&block).is_ok() {
        written += block.len() as u64;
    }
    let _ = f.flush();
    f.set_len(written.saturating_sub(leave))
        .expect("give space back");
    path
}

fn leftover_overlays(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // devices::virtio::block::SNAPSHOT_OVERLAY_SUFFIX
        .filter(|n| n.contains(".arkvm-snap"))
        .collect()
}

#[test]
fn a_snapshot_on_a_nearly_full_filesystem_is_refused_or_keeps_the_guests_writes() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("overlay-space");
    let fs = Tmpfs::mount(&dir.path().join("fs"), "40m");
    let img = fs.0.join("d.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(16 << 20))
        .expect("disk file");
    let sock = dir.path().join("vm.sock");
    let kernel = tiny_guest("disk");
    let mut vm = Vmm::spawn(&[
        "run",
        "--kernel",
        s(&kernel),
        "--memory",
        "64M",
        "--disk",
        s(&img),
        "--api-socket",
        s(&sock),
        "--cmdline",
        "arkvm.mode=numbered",
    ]);
    assert!(
        wait_for_path(&sock, Duration::from_secs(20)),
        "no socket\n{}",
        vm.dump()
    );
    // Two whole generations: every block of the disk is allocated on the tmpfs.
    let mut at = wait_gens(&vm, 0, 2);
    let filler = fill(&fs.0, 200 << 10);

    let (st, out, err) = run_to_end(
        &[
            "snapshot",
            "--api-socket",
            s(&sock),
            "--out",
            s(&dir.path().join("snap1")),
        ],
        Duration::from_secs(120),
    );
    assert_eq!(st.code(), Some(1), "refused snapshot: {out:?} {err:?}");
    assert_eq!(err.len(), 1, "one line: {err:?}");
    assert!(
        err[0].contains("no room for the snapshot overlay") && err[0].contains("did not start"),
        "{err:?}"
    );
    assert!(
        leftover_overlays(&fs.0).is_empty(),
        "{:?}",
        leftover_overlays(&fs.0)
    );
    at = wait_gens(&vm, at, 2);
    assert_guest_intact(&vm);

    // With room for the worst case, the snapshot succeeds and the guest keeps writing.
    std::fs::remove_file(&filler).expect("remove filler");
    let report = arkvm_tests::cli_snapshot(&sock, &dir.path().join("snap2"), &[]);
    assert_eq!(report["mode"], "live", "{report}");
    wait_gens(&vm, at, 2);
    assert_guest_intact(&vm);
    vm.kill();
}

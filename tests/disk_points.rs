//! The disk test of backups, shared by tests/backup.rs (a local repository) and tests/s3.rs (a
//! bucket): backups of the tiny disk guest while it rewrites a ring of numbered blocks, each
//! point's disk checked against the guest's memory (the last write it saw complete), and each
//! point restored with its disk: the restored guest runs, re-checks every block it rewrites,
//! and writes its disk.

use std::path::Path;
use std::time::Duration;

use snapshot::repo::Repository;

use super::support::*;

/// The disk of the disk test: a ring of 16 MiB (16 repository chunks, of which the guest
/// rewrites a few between two backups) and 4 MiB that stay zero.
const DISK_BYTES: u64 = 20 << 20;
const RING_BLOCKS: u64 = 4096;

/// Initialises `repo` (a directory or an `s3://` URL), takes `points` backups of a disk guest
/// whose disk and socket live in `dir`, and checks and restores each point.
pub fn backups_restore_the_disk_at_each_point(dir: &Path, repo: &Path, points: usize) {
    let repo = repo.to_path_buf();
    init_repo(&repo, None);
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(DISK_BYTES))
        .expect("create disk");
    let sock = dir.join("vm.sock");
    let disk_arg = s(&disk);
    let mut vm = start_vm(
        "disk",
        "64M",
        "disky",
        &sock,
        &[
            "--disk",
            &disk_arg,
            "--cmdline",
            &format!("arkvm.mode=numbered arkvm.blocks={RING_BLOCKS}"),
        ],
    );
    // Backups 0.2 s apart: the guest rewrites a few of the ring's 16 chunks in between
    // (and during each backup, into the overlay: those writes belong to the next point).
    wait_parsed(&vm, 0, diskgen);
    let mut windows = Vec::new();
    for _ in 0..points {
        let before = last_parsed(&vm, |l| diskgen(l).map(|(_, n)| n)).expect("a DISKGEN line");
        let id = backup(&sock, &repo, None)["id"]
            .as_str()
            .expect("id")
            .to_string();
        windows.push(Window {
            before,
            after: u64::MAX,
            id,
        });
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, (_, after)) = wait_parsed(&vm, vm.stdout().len(), diskgen);
    assert_not_broken(&vm);
    vm.kill();

    let rows = list(&repo, None);
    let lib = Repository::open(&repo, None).expect("open repository");
    let mut prev_n = 0;
    for (k, w) in windows.iter().enumerate() {
        let r = row(&rows, &w.id);
        if k > 0 {
            eprintln!(
                "disk backup {}: hashed {} of {} bytes, {} of {} chunks new",
                k + 1,
                num(r, "bytes_hashed"),
                num(r, "bytes_total"),
                num(r, "chunks_new"),
                num(r, "chunks_total")
            );
            // Memory (64 chunks, 2 of them written), disk (20 chunks: the ring's 16, of which
            // the guest rewrote a few, and 4 never written) and one state chunk.
            assert!(
                num(r, "chunks_hashed") <= 2 + 16 + 1,
                "not incremental: {r}"
            );
        }
        let (n, b) = point_disk_status(&lib, &w.id);
        assert_eq!(b, RING_BLOCKS, "ring size");
        assert!(
            n >= w.before && n <= after && n > prev_n,
            "point {}: DISK_LAST {n} not after {} and the previous point's {prev_n}, or not \
             before {after}",
            k + 1,
            w.before,
        );
        prev_n = n;
        let point = lib.read_point(&w.id).expect("read point");
        let mut image = Vec::new();
        lib.read_object(&point, "disk-disk0", &mut image)
            .expect("read the disk object");
        assert_eq!(image.len() as u64, DISK_BYTES);
        let on_disk = ring_last(&image, b, &format!("point {} disk", k + 1));
        // A write the guest has not yet seen complete may already be on the disk.
        assert!(
            on_disk == n || on_disk == n + 1,
            "point {}: the disk's newest write is {on_disk}, the guest saw {n} complete",
            k + 1
        );
        eprintln!("point {}: DISK_LAST {n}, disk newest {on_disk}", k + 1);

        // Restore it with its disk: the guest re-checks every block it rewrites.
        let disk_dir = dir.join(format!("disks{k}"));
        let mut vm = restore(&repo, &w.id, None, &["--disk-dir".into(), s(&disk_dir)]);
        let (i, (g, _)) = wait_parsed(&vm, 0, diskgen);
        assert!(
            g >= n / b,
            "restored disk guest is at gen {g}, the point at {}",
            n / b
        );
        let (i, _) = wait_parsed(&vm, i + 1, diskgen);
        wait_parsed(&vm, i + 1, diskgen);
        assert_not_broken(&vm);
        vm.kill();
        let files: Vec<_> = std::fs::read_dir(&disk_dir)
            .expect("restored disk dir")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let restored = std::fs::read(&files[0]).expect("read restored disk");
        let last = ring_last(&restored, b, &format!("point {} restored disk", k + 1));
        assert!(last > n, "the restored guest did not write its disk");
    }
}

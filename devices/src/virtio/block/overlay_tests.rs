//! Tests of the overlay file format and its crash recovery.

use super::*;
use vmm_sys_util::tempdir::TempDir;

const DISK: u64 = 10 * CLUSTER_SIZE + 4096; // a short last cluster

fn no_lower(buf: &mut [u8]) -> io::Result<()> {
    buf.fill(0xee);
    Ok(())
}

fn read(o: &OverlayFile, cluster: u64, in_off: u64, len: usize) -> Vec<u8> {
    let off = o.lookup(cluster).expect("cluster is mapped");
    let mut b = vec![0u8; len];
    o.read_at(off + in_off, &mut b).unwrap();
    b
}

/// Leaves the overlay without its clean-shutdown flush, like `kill -9` would.
fn crash(o: OverlayFile) {
    std::mem::forget(o);
}

#[test]
fn writes_copy_up_and_read_back() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("a.ovl");
    let o = OverlayFile::create(&path, DISK).unwrap();
    assert!(o.lookup(0).is_none());
    o.write_in_cluster(2, 512, &[1u8; 512], no_lower).unwrap();
    assert_eq!(
        read(&o, 2, 0, 512),
        vec![0xee; 512],
        "copied up from the lower layer"
    );
    assert_eq!(read(&o, 2, 512, 512), vec![1; 512]);
    // A second write to the same cluster lands in place.
    let first = o.lookup(2);
    o.write_in_cluster(2, 0, &[2u8; 16], |_| {
        panic!("no copy-up for a held cluster")
    })
    .unwrap();
    assert_eq!(o.lookup(2), first);
    assert_eq!(read(&o, 2, 0, 16), vec![2; 16]);
    // A whole-cluster write needs no lower data; the short last cluster works.
    o.write_in_cluster(1, 0, &vec![3u8; CLUSTER_SIZE as usize], |_| {
        panic!("whole cluster")
    })
    .unwrap();
    o.write_in_cluster(10, 4095, &[4u8], no_lower).unwrap();
    assert_eq!(read(&o, 10, 4094, 2), vec![0xee, 4]);
    assert!(
        o.write_in_cluster(11, 0, &[0], no_lower).is_err(),
        "past the disk"
    );
    assert_eq!(o.mapped_clusters(), vec![1, 2, 10]);
    assert!(matches!(
        OverlayFile::create(&path, DISK),
        Err(OverlayError::Exists(_))
    ));
}

#[test]
fn completed_writes_survive_a_crash() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("a.ovl");
    let o = OverlayFile::create(&path, DISK).unwrap();
    o.write_in_cluster(0, 0, &[7u8; 4096], no_lower).unwrap();
    o.write_in_cluster(5, 100, &[8u8; 10], no_lower).unwrap();
    crash(o);
    let o = OverlayFile::open(&path, DISK).unwrap();
    assert_eq!(o.mapped_clusters(), vec![0, 5]);
    assert_eq!(read(&o, 0, 0, 4096), vec![7; 4096]);
    assert_eq!(read(&o, 5, 100, 10), vec![8; 10]);
    // New allocations go after the recovered data.
    o.write_in_cluster(6, 0, &[9u8; 8], no_lower).unwrap();
    assert_eq!(read(&o, 5, 100, 10), vec![8; 10]);
    assert_eq!(read(&o, 6, 0, 8), vec![9; 8]);
}

#[test]
fn after_a_reboot_only_flushed_clusters_count() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("a.ovl");
    let o = OverlayFile::create(&path, DISK).unwrap();
    o.write_in_cluster(0, 0, &[1u8; 512], no_lower).unwrap();
    o.flush().unwrap();
    o.write_in_cluster(3, 0, &[2u8; 512], no_lower).unwrap();
    crash(o);
    // Another boot id: the machine restarted, unflushed data may be gone.
    let o = OverlayFile::open_as_boot(&path, DISK, [0x5a; 16]).unwrap();
    assert_eq!(o.mapped_clusters(), vec![0]);
    assert_eq!(read(&o, 0, 0, 512), vec![1; 512]);
    drop(o);
    // The repair is durable: the same boot now sees the same thing.
    let o = OverlayFile::open(&path, DISK).unwrap();
    assert_eq!(o.mapped_clusters(), vec![0]);
}

#[test]
fn torn_header_and_bad_map_entries_are_survived() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("a.ovl");
    let o = OverlayFile::create(&path, DISK).unwrap();
    o.write_in_cluster(4, 0, &[6u8; 512], no_lower).unwrap();
    o.flush().unwrap(); // header seq 2 goes to slot A
    drop(o);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xff; 40], 20).unwrap(); // tear slot A
                                              // Map entries pointing past the file and off a cluster boundary.
    f.write_all_at(&(1u64 << 40).to_le_bytes(), MAP_OFFSET + 8)
        .unwrap();
    f.write_all_at(&(data_offset(DISK) + 7).to_le_bytes(), MAP_OFFSET + 16)
        .unwrap();
    drop(f);
    let o = OverlayFile::open(&path, DISK).unwrap();
    assert_eq!(o.mapped_clusters(), vec![4]);
    assert_eq!(read(&o, 4, 0, 512), vec![6; 512]);
}

#[test]
fn foreign_files_are_refused() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("a.ovl");
    drop(OverlayFile::create(&path, DISK).unwrap());
    assert!(matches!(
        OverlayFile::open(&path, DISK + 512),
        Err(OverlayError::SizeMismatch { overlay: DISK, .. })
    ));
    let junk = dir.as_path().join("junk");
    std::fs::write(&junk, vec![0u8; 8192]).unwrap();
    assert!(matches!(
        OverlayFile::open(&junk, DISK),
        Err(OverlayError::BadHeader { .. })
    ));
    let short = dir.as_path().join("short");
    std::fs::write(&short, b"ARKVMOVL").unwrap();
    assert!(matches!(
        OverlayFile::open(&short, DISK),
        Err(OverlayError::BadHeader { .. })
    ));
}

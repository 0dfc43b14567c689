//! Tests of snapshot directories: round trips, damage detection, atomic commit and cleanup.

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::*;
use crate::manifest::{Manifest, ManifestError, MANIFEST_NAME};
use crate::sealed_json::SealError;
use crate::test_util::{mode_of, permissive_umask, TestDir};
use crate::FORMAT_VERSION;

const CHUNK: u64 = 4096;
const MEM_SIZE: u64 = 3 * CHUNK + 100;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct VmState {
    vcpus: Vec<u64>,
    config: String,
}

fn vm_state() -> VmState {
    VmState {
        vcpus: vec![1, 2, 0xdead_beef],
        config: "memory=12388".into(),
    }
}

fn disk_bytes() -> Vec<u8> {
    (0..3000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn memory_chunk(index: u64) -> Vec<u8> {
    let len = (MEM_SIZE - index * CHUNK).min(CHUNK) as usize;
    if index == 1 {
        return vec![0; len]; // a hole
    }
    (0..len).map(|i| (i as u64 * 31 + index) as u8).collect()
}

/// Writes a small snapshot with a state, a raw and a memory part (chunks out of order, one
/// zero chunk, one chunk written twice).
fn write_small(target: &Path) -> Manifest {
    let mut snap = SnapshotWriter::create(target).unwrap();
    snap.write_state_part("vm-state", &vm_state()).unwrap();
    let mut disk = snap.add_part("disk-0").unwrap();
    for piece in disk_bytes().chunks(1000) {
        disk.write_all(piece).unwrap();
    }
    assert_eq!(disk.bytes_written(), 3000);
    snap.finish_part(disk).unwrap();
    let memory = snap.add_memory_part("memory", MEM_SIZE, CHUNK).unwrap();
    memory.write_chunk(3, &[9; 100]).unwrap();
    for index in [2, 0, 3, 1] {
        memory.write_chunk(index, &memory_chunk(index)).unwrap();
    }
    snap.finish_memory_part(memory).unwrap();
    snap.commit().unwrap()
}

/// Everything a restore would do: open, verify, and read every part.
fn read_everything(dir: &Path) -> Result<(), SnapshotError> {
    let reader = SnapshotReader::open(dir)?;
    reader.verify_all(|_| ())?;
    let state: VmState = reader.read_state_part("vm-state")?;
    assert_eq!(state, vm_state());
    let mut disk = Vec::new();
    reader.copy_part("disk-0", &mut disk)?;
    assert_eq!(disk, disk_bytes());
    let memory = reader.memory_part("memory")?;
    for index in 0..memory.chunk_count() {
        let mut buf = vec![0; memory.chunk_range(index).unwrap().count()];
        memory.read_chunk(index, &mut buf)?;
        assert_eq!(buf, memory_chunk(index));
    }
    Ok(())
}

/// Every file of a committed snapshot, with its bytes.
fn snapshot_files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let bytes = fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn round_trip() {
    let tmp = TestDir::new("round-trip");
    let target = tmp.path().join("snap");
    let manifest = write_small(&target);
    assert_eq!(tmp.entries(), vec!["snap"]);
    assert_eq!(manifest.format_version, FORMAT_VERSION);
    assert_eq!(manifest.parts.len(), 3);
    let memory = manifest.part("memory").unwrap();
    assert_eq!(memory.size, MEM_SIZE);
    assert_eq!(memory.chunks.as_ref().unwrap().hashes.len(), 4);
    assert_eq!(manifest.part("disk-0").unwrap().size, 3000);
    read_everything(&target).unwrap();

    let reader = SnapshotReader::open(&target).unwrap();
    assert_eq!(reader.manifest(), &manifest);
    let mut last = None;
    reader
        .verify_all(|p| last = Some((p.bytes_done, p.bytes_total)))
        .unwrap();
    assert_eq!(last, Some((manifest.total_size(), manifest.total_size())));
    for part in ["vm-state", "disk-0", "memory"] {
        reader.verify_part(part).unwrap();
    }
}

#[test]
fn every_flipped_byte_of_every_file_is_refused() {
    let tmp = TestDir::new("flip");
    let target = tmp.path().join("snap");
    write_small(&target);
    read_everything(&target).unwrap();
    let files = snapshot_files(&target);
    assert_eq!(files.len(), 4);
    let mut checked = 0;
    for (path, original) in &files {
        // Flip in place: rewriting whole files would trip ext4's flush-on-truncate heuristic.
        let file = fs::OpenOptions::new().write(true).open(path).unwrap();
        for (pos, &byte) in original.iter().enumerate() {
            file.write_all_at(&[byte ^ 0x01], pos as u64).unwrap();
            let result = read_everything(&target);
            let shown = path.display();
            assert!(result.is_err(), "flip at byte {pos} of {shown} accepted");
            file.write_all_at(&[byte], pos as u64).unwrap();
            checked += 1;
        }
    }
    assert!(checked > MEM_SIZE as usize);
    read_everything(&target).unwrap();
}

#[test]
fn damage_names_the_part() {
    let tmp = TestDir::new("names");
    let target = tmp.path().join("snap");
    write_small(&target);
    let memory_path = target.join("memory");
    let mut bytes = fs::read(&memory_path).unwrap();
    bytes[CHUNK as usize * 2 + 5] ^= 0x40;
    fs::write(&memory_path, &bytes).unwrap();
    let reader = SnapshotReader::open(&target).unwrap();
    let err = reader.verify_all(|_| ()).unwrap_err();
    assert!(
        matches!(err, SnapshotError::ChunkCorrupt { index: 2, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("chunk 2 of part 'memory'"),
        "{err}"
    );
    let memory = reader.memory_part("memory").unwrap();
    assert!(memory.verify_chunk(0, &memory_chunk(0)).is_ok());
    assert!(memory
        .verify_chunk(0, &memory_chunk(2)[..CHUNK as usize])
        .is_err());
    assert!(matches!(
        memory.verify_chunk(9, &[]),
        Err(SnapshotError::ChunkBounds { index: 9, .. })
    ));

    let state_path = target.join("vm-state");
    let mut bytes = fs::read(&state_path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&state_path, &bytes).unwrap();
    let err = reader.read_state_part::<VmState>("vm-state").unwrap_err();
    assert!(err.to_string().contains("part 'vm-state'"), "{err}");
}

#[test]
fn every_truncation_is_refused() {
    let tmp = TestDir::new("truncate");
    let target = tmp.path().join("snap");
    write_small(&target);
    for (path, original) in snapshot_files(&target) {
        let len = original.len();
        for cut in [0, 1, len / 2, len - 1] {
            fs::write(&path, &original[..cut]).unwrap();
            let err = read_everything(&target).unwrap_err();
            let is_manifest = path.ends_with(MANIFEST_NAME);
            assert!(
                is_manifest || matches!(err, SnapshotError::PartSize { .. }),
                "{} cut to {cut}: {err:?}",
                path.display()
            );
        }
        // One byte too many is refused as well.
        let mut longer = original.clone();
        longer.push(0);
        fs::write(&path, &longer).unwrap();
        assert!(
            read_everything(&target).is_err(),
            "{} grown",
            path.display()
        );
        fs::write(&path, &original).unwrap();
    }
    read_everything(&target).unwrap();
}

#[test]
fn missing_part_is_refused() {
    let tmp = TestDir::new("missing");
    let target = tmp.path().join("snap");
    write_small(&target);
    fs::remove_file(target.join("disk-0")).unwrap();
    let err = SnapshotReader::open(&target).unwrap_err();
    assert!(matches!(&err, SnapshotError::PartMissing { name, .. } if name == "disk-0"));
    assert!(
        err.to_string().contains("part 'disk-0' is missing"),
        "{err}"
    );

    fs::remove_file(target.join(MANIFEST_NAME)).unwrap();
    let err = SnapshotReader::open(&target).unwrap_err();
    assert!(err.to_string().contains(MANIFEST_NAME), "{err}");
}

#[test]
fn future_version_is_refused_naming_both() {
    let tmp = TestDir::new("future");
    let target = tmp.path().join("snap");
    let mut manifest = write_small(&target);
    manifest.format_version = FORMAT_VERSION + 1;
    fs::write(target.join(MANIFEST_NAME), manifest.encode().unwrap()).unwrap();
    let err = SnapshotReader::open(&target).unwrap_err();
    match &err {
        SnapshotError::Manifest {
            source: ManifestError::Seal(SealError::FutureVersion { found, supported }),
            ..
        } => assert_eq!((*found, *supported), (FORMAT_VERSION + 1, FORMAT_VERSION)),
        other => panic!("expected a future-version error, got {other:?}"),
    }
}

#[test]
fn existing_target_is_refused() {
    let tmp = TestDir::new("exists");
    let target = tmp.path().join("snap");
    fs::create_dir(&target).unwrap();
    let err = SnapshotWriter::create(&target).unwrap_err();
    assert!(matches!(err, SnapshotError::Exists { .. }), "{err:?}");
    fs::remove_dir(&target).unwrap();
    fs::write(&target, b"a file").unwrap();
    assert!(matches!(
        SnapshotWriter::create(&target),
        Err(SnapshotError::Exists { .. })
    ));
    assert_eq!(tmp.entries(), vec!["snap"]);
}

#[test]
fn target_appearing_during_the_write_is_not_replaced() {
    let tmp = TestDir::new("race");
    let target = tmp.path().join("snap");
    let mut snap = SnapshotWriter::create(&target).unwrap();
    snap.write_state_part("vm-state", &vm_state()).unwrap();
    // An empty directory would silently be replaced by a plain rename.
    fs::create_dir(&target).unwrap();
    let err = snap.commit().unwrap_err();
    assert!(matches!(err, SnapshotError::Exists { .. }), "{err:?}");
    assert_eq!(tmp.entries(), vec!["snap"]);
    assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
}

#[test]
fn dropped_or_failed_writer_leaves_nothing() {
    let tmp = TestDir::new("drop");
    let target = tmp.path().join("snap");
    {
        let mut snap = SnapshotWriter::create(&target).unwrap();
        snap.write_state_part("vm-state", &vm_state()).unwrap();
        let memory = snap.add_memory_part("memory", MEM_SIZE, CHUNK).unwrap();
        memory.write_chunk(0, &memory_chunk(0)).unwrap();
        assert!(snap.tmp_dir().exists());
        assert_eq!(tmp.entries().len(), 1);
    }
    assert!(tmp.entries().is_empty(), "{:?}", tmp.entries());

    // A part that was added and never finished makes commit fail, and cleans up.
    let mut snap = SnapshotWriter::create(&target).unwrap();
    let disk = snap.add_part("disk-0").unwrap();
    drop(disk);
    let err = snap.commit().unwrap_err();
    assert!(
        matches!(err, SnapshotError::UnfinishedPart { .. }),
        "{err:?}"
    );
    assert!(tmp.entries().is_empty(), "{:?}", tmp.entries());

    // A memory part with a chunk never written cannot be finished.
    let mut snap = SnapshotWriter::create(&target).unwrap();
    let memory = snap.add_memory_part("memory", MEM_SIZE, CHUNK).unwrap();
    memory.write_chunk(0, &memory_chunk(0)).unwrap();
    let err = snap.finish_memory_part(memory).unwrap_err();
    assert!(
        matches!(err, SnapshotError::ChunkNotWritten { index: 1, .. }),
        "{err:?}"
    );
    drop(snap);
    assert!(tmp.entries().is_empty(), "{:?}", tmp.entries());
}

#[test]
fn stale_temporaries_are_cleaned_up() {
    let tmp = TestDir::new("stale");
    // A crashed writer: its temporary stays behind and never reads as a snapshot.
    let target = tmp.path().join("snap");
    let mut snap = SnapshotWriter::create(&target).unwrap();
    snap.write_state_part("vm-state", &vm_state()).unwrap();
    let live_tmp = snap.tmp_dir().to_path_buf();
    std::mem::forget(snap);
    assert!(SnapshotReader::open(&target).is_err());
    // A committed snapshot and unrelated entries stay.
    write_small(&tmp.path().join("done"));
    // The same directory under a pid that cannot be running (above the kernel's pid limit).
    let dead_tmp = tmp.path().join(".snap.tmp-99999999-00ab12cd");
    fs::create_dir(&dead_tmp).unwrap();
    fs::write(dead_tmp.join("vm-state"), b"partial").unwrap();
    fs::create_dir(tmp.path().join(".other.tmp-1-xyz")).unwrap();
    fs::write(tmp.path().join(".file.tmp-99999999-ab"), b"").unwrap();

    let removed = cleanup_stale(tmp.path()).unwrap();
    assert_eq!(removed, vec![dead_tmp.clone()]);
    assert!(!dead_tmp.exists());
    assert!(
        live_tmp.exists(),
        "a running writer's temporary was removed"
    );
    read_everything(&tmp.path().join("done")).unwrap();
    assert!(tmp.path().join(".other.tmp-1-xyz").exists());
    assert!(cleanup_stale(tmp.path()).unwrap().is_empty());
}

#[test]
fn the_next_snapshot_removes_temporaries_of_killed_writers_only() {
    let tmp = TestDir::new("stale-next");
    // Killed writers: pids that cannot be running (above the kernel's pid limit).
    let dead = [
        tmp.path().join(".vm1-snap.tmp-99999999-00ab12cd"),
        tmp.path().join(".other.tmp-99999998-ff"),
    ];
    for dir in &dead {
        fs::create_dir(dir).unwrap();
        fs::write(dir.join("memory"), vec![1u8; 4096]).unwrap();
    }
    // A writer still running (this process) keeps its temporary.
    let running = SnapshotWriter::create(&tmp.path().join("busy")).unwrap();
    let running_tmp = running.tmp_dir().to_path_buf();
    // Look-alikes that are not temporaries of a snapshot writer stay.
    fs::write(tmp.path().join(".file.tmp-99999999-ab"), b"").unwrap();
    fs::create_dir(tmp.path().join("plain.tmp-99999999-ab")).unwrap();

    write_small(&tmp.path().join("next"));
    for dir in &dead {
        assert!(!dir.exists(), "{} was left behind", dir.display());
    }
    assert!(
        running_tmp.exists(),
        "a running writer's temporary was removed"
    );
    assert!(tmp.path().join(".file.tmp-99999999-ab").exists());
    assert!(tmp.path().join("plain.tmp-99999999-ab").exists());
    read_everything(&tmp.path().join("next")).unwrap();
    drop(running);
    assert!(!running_tmp.exists());
}

#[test]
fn snapshot_directories_are_private_whatever_the_umask() {
    permissive_umask();
    let tmp = TestDir::new("private");
    let target = tmp.path().join("snap");
    let mut snap = SnapshotWriter::create(&target).unwrap();
    assert_eq!(mode_of(snap.tmp_dir()), 0o700);
    snap.write_state_part("vm-state", &vm_state()).unwrap();
    assert_eq!(mode_of(&snap.tmp_dir().join("vm-state")), 0o600);
    drop(snap);
    write_small(&target);
    assert_eq!(mode_of(&target), 0o700);
    let mut files = 0;
    for entry in fs::read_dir(&target).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode_of(&path), 0o600, "{}", path.display());
        files += 1;
    }
    assert!(files >= 3, "only {files} files were checked");
}

#[test]
fn memory_chunks_from_many_threads() {
    let tmp = TestDir::new("threads");
    let target = tmp.path().join("snap");
    let mut snap = SnapshotWriter::create(&target).unwrap();
    let chunks = 64u64;
    let memory = snap
        .add_memory_part("memory", chunks * CHUNK, CHUNK)
        .unwrap();
    let data = |i: u64| vec![(i % 200 + 1) as u8; CHUNK as usize];
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let memory = &memory;
            s.spawn(move || {
                for i in (t..chunks).step_by(4).collect::<Vec<_>>().into_iter().rev() {
                    memory.write_chunk(i, &data(i)).unwrap();
                }
            });
        }
    });
    assert_eq!(memory.bytes_written(), chunks * CHUNK);
    snap.finish_memory_part(memory).unwrap();
    snap.commit().unwrap();
    let reader = SnapshotReader::open(&target).unwrap();
    reader.verify_all(|_| ()).unwrap();
    let part = reader.memory_part("memory").unwrap();
    let mut buf = vec![0; CHUNK as usize];
    for i in 0..chunks {
        part.read_chunk(i, &mut buf).unwrap();
        assert_eq!(buf, data(i));
    }
}

#[test]
fn rewriting_a_chunk_with_zeros_clears_it() {
    let tmp = TestDir::new("rezero");
    let target = tmp.path().join("snap");
    let mut snap = SnapshotWriter::create(&target).unwrap();
    let memory = snap.add_memory_part("memory", 2 * CHUNK, CHUNK).unwrap();
    memory.write_chunk(0, &vec![5; CHUNK as usize]).unwrap();
    memory.write_chunk(0, &vec![0; CHUNK as usize]).unwrap();
    memory.write_chunk(1, &vec![0; CHUNK as usize]).unwrap();
    snap.finish_memory_part(memory).unwrap();
    snap.commit().unwrap();
    let bytes = fs::read(target.join("memory")).unwrap();
    assert_eq!(bytes, vec![0; 2 * CHUNK as usize]);
    SnapshotReader::open(&target)
        .unwrap()
        .verify_all(|_| ())
        .unwrap();
}

#[test]
fn misuse_is_refused() {
    let tmp = TestDir::new("misuse");
    let mut snap = SnapshotWriter::create(&tmp.path().join("snap")).unwrap();
    for bad in ["", ".x", "a/b", MANIFEST_NAME] {
        assert!(snap.add_part(bad).is_err(), "{bad:?}");
    }
    snap.write_state_part("vm-state", &1u32).unwrap();
    assert!(matches!(
        snap.add_part("vm-state"),
        Err(SnapshotError::PartName { .. })
    ));
    assert!(matches!(
        snap.add_memory_part("memory", CHUNK, 1000),
        Err(SnapshotError::BadChunkSize { .. })
    ));
    let memory = snap.add_memory_part("memory", CHUNK + 1, CHUNK).unwrap();
    assert!(memory.write_chunk(1, &[0, 0]).is_err());
    assert!(memory.write_chunk(2, &[0]).is_err());
    assert!(memory.write_chunk(1, &[0]).is_ok());

    let mut other = SnapshotWriter::create(&tmp.path().join("other")).unwrap();
    let err = other.finish_memory_part(memory).unwrap_err();
    assert!(matches!(err, SnapshotError::ForeignPart { .. }), "{err:?}");

    let reader_target = tmp.path().join("done");
    write_small(&reader_target);
    let reader = SnapshotReader::open(&reader_target).unwrap();
    assert!(matches!(
        reader.read_state_part::<VmState>("memory"),
        Err(SnapshotError::WrongKind { .. })
    ));
    assert!(matches!(
        reader.memory_part("disk-0"),
        Err(SnapshotError::WrongKind { .. })
    ));
    assert!(matches!(
        reader.verify_part("nope"),
        Err(SnapshotError::NoSuchPart { .. })
    ));
    assert!(matches!(
        reader.read_state_part::<Vec<String>>("vm-state"),
        Err(SnapshotError::State { .. })
    ));
}

#[test]
fn tmp_names_parse() {
    assert_eq!(tmp_dir_pid(".snap.tmp-42-00ff"), Some(42));
    assert_eq!(tmp_dir_pid(".a.tmp-b.tmp-7-1"), Some(7));
    assert_eq!(tmp_dir_pid("snap.tmp-42-00ff"), None);
    assert_eq!(tmp_dir_pid(".snap.tmp--00ff"), None);
    assert_eq!(tmp_dir_pid(".snap.tmp-42-"), None);
    assert_eq!(tmp_dir_pid(".snap.tmp-42-xyz"), None);
    assert_eq!(tmp_dir_pid(".snap"), None);
}

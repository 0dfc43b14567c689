//! Tests of the repository: backups, incremental reuse, dedup, verify, prune and collection,
//! crash leftovers and concurrent writers.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::*;
use crate::chunk::CHUNK_SIZE;
use crate::manifest::PartKind;
use crate::test_util::TestDir;

const MIB: usize = CHUNK_SIZE;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct VmState {
    generation: u32,
}

/// Guest memory of `chunks` MiB where chunk `i` is filled from `seed + i`, and chunk 1 is zero.
fn memory(chunks: usize, seeds: &[u8]) -> Vec<u8> {
    let mut mem = vec![0u8; chunks * MIB];
    for (i, chunk) in mem.chunks_mut(MIB).enumerate() {
        if i == 1 {
            continue;
        }
        let seed = seeds[i];
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = (j as u8).wrapping_mul(31).wrapping_add(seed);
        }
    }
    mem
}

/// Backs up `mem` and a small disk; with a parent, reuses every chunk not in `changed`.
fn backup(
    repo: &Repository,
    vm: &str,
    parent: Option<&str>,
    mem: &[u8],
    changed: Option<&[usize]>,
    generation: u32,
) -> PointManifest {
    let mut writer = repo.start_backup(vm, parent).unwrap();
    writer
        .put_state("vm-state", &VmState { generation })
        .unwrap();
    let object = writer
        .add_object("memory", PartKind::Memory, mem.len() as u64)
        .unwrap();
    for (i, chunk) in mem.chunks(MIB).enumerate() {
        match changed {
            Some(changed) if object.has_parent() && !changed.contains(&i) => {
                object.reuse_parent_chunk(i as u64).unwrap();
            }
            _ => {
                object.put_chunk(i as u64, chunk).unwrap();
            }
        }
    }
    writer.finish_object(object).unwrap();
    let disk = vec![7u8; 5000];
    let object = writer
        .add_object("disk-0", PartKind::Raw, disk.len() as u64)
        .unwrap();
    object.put_chunk(0, &disk).unwrap();
    writer.finish_object(object).unwrap();
    writer.commit().unwrap()
}

fn restore_memory(repo: &Repository, id: &str) -> Vec<u8> {
    let point = repo.read_point(id).unwrap();
    let mut out = Vec::new();
    repo.read_object(&point, "memory", &mut out).unwrap();
    out
}

fn chunk_files(root: &Path) -> Vec<std::path::PathBuf> {
    let store = LocalDirStore::open(root).unwrap();
    store
        .list(CHUNK_PREFIX)
        .unwrap()
        .into_iter()
        .map(|name| root.join(name))
        .collect()
}

#[test]
fn init_refuses_a_directory_of_other_files() {
    crate::test_util::permissive_umask();
    let tmp = TestDir::new("repo-foreign");
    let root = tmp.path().join("home");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("notes.txt"), b"mine").unwrap();
    let err = Repository::init(&root, None)
        .err()
        .expect("a foreign directory was accepted");
    assert!(
        matches!(&err, RepoError::ForeignDirectory { entry, .. } if entry == "notes.txt"),
        "{err:?}"
    );
    assert!(err.to_string().contains("notes.txt"), "{err}");
    // Nothing of a repository was mixed in.
    let mut names: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["notes.txt"]);
    // An empty directory, a new one, and an init cut short before its config are fine; the
    // new directory is private.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    Repository::init(&empty, None).unwrap();
    let fresh = tmp.path().join("fresh");
    Repository::init(&fresh, None).unwrap();
    assert_eq!(crate::test_util::mode_of(&fresh), 0o700);
    let cut = tmp.path().join("cut");
    fs::create_dir_all(cut.join(".tmp")).unwrap();
    fs::create_dir_all(cut.join("chunks")).unwrap();
    Repository::init(&cut, None).unwrap();
}

#[test]
fn init_and_open() {
    let tmp = TestDir::new("repo-init");
    let root = tmp.path().join("repo");
    assert!(matches!(
        Repository::open(&root, None),
        Err(RepoError::NotARepository { .. })
    ));
    Repository::init(&root, None).unwrap();
    assert!(matches!(
        Repository::init(&root, None),
        Err(RepoError::AlreadyInitialized { .. })
    ));
    let repo = Repository::open(&root, None).unwrap();
    assert!(repo.point_ids().unwrap().is_empty());
    // A damaged config is refused.
    let config = root.join("config.json");
    let mut bytes = fs::read(&config).unwrap();
    bytes[3] ^= 1;
    fs::write(&config, &bytes).unwrap();
    assert!(matches!(
        Repository::open(&root, None),
        Err(RepoError::Config(_))
    ));
}

#[test]
fn five_incremental_points_restore_exactly() {
    let tmp = TestDir::new("repo-five");
    let repo = Repository::init(tmp.path(), None).unwrap();
    let mut seeds = vec![1u8, 0, 3, 4, 5, 6, 7, 8];
    let mut mems = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    for generation in 0..5u32 {
        let changed = [2 + generation as usize % 5];
        if generation > 0 {
            seeds[changed[0]] = seeds[changed[0]].wrapping_add(100);
        }
        let mem = memory(8, &seeds);
        let parent = ids.last().map(String::as_str);
        let point = backup(&repo, "vm1", parent, &mem, Some(&changed), generation);
        if generation == 0 {
            assert_eq!(point.stats.chunks_hashed, 8 + 2);
            // The zero chunk is stored once; every other chunk is new.
            assert_eq!(point.stats.chunks_new, 8 + 2);
            assert_eq!(point.parent, None);
        } else {
            assert_eq!(point.parent.as_deref(), ids.last().map(String::as_str));
            assert_eq!(point.stats.chunks_reused, 7, "generation {generation}");
            assert_eq!(point.stats.chunks_hashed, 1 + 2);
            // The changed chunk is new; state and disk: the state differs, the disk dedups.
            assert_eq!(point.stats.chunks_new, 2, "generation {generation}");
            assert!(point.stats.bytes_hashed < 2 * MIB as u64);
        }
        assert_eq!(point.stats.chunks_total, 8 + 2);
        ids.push(point.id.clone());
        mems.push(mem);
    }
    assert_eq!(repo.point_ids().unwrap(), {
        let mut sorted = ids.clone();
        sorted.sort();
        sorted
    });
    for (generation, (id, mem)) in ids.iter().zip(&mems).enumerate() {
        assert_eq!(&restore_memory(&repo, id), mem, "point {generation}");
        let point = repo.read_point(id).unwrap();
        let state: VmState = repo.read_state(&point, "vm-state").unwrap();
        assert_eq!(state.generation, generation as u32);
    }
    assert_eq!(repo.latest_point("vm1").unwrap().unwrap().id, ids[4]);
    assert!(repo.latest_point("vm2").unwrap().is_none());
    assert!(repo.verify(|_| ()).unwrap().is_clean());
}

#[test]
fn identical_backups_store_nothing_new() {
    let tmp = TestDir::new("repo-dedup");
    let repo = Repository::init(tmp.path(), None).unwrap();
    let mem = memory(4, &[1, 0, 3, 4]);
    let first = backup(&repo, "vm1", None, &mem, None, 0);
    // A full (non-incremental) backup of another VM with the same memory shares every chunk.
    let second = backup(&repo, "vm2", None, &mem, None, 0);
    assert!(first.stats.chunks_new > 0);
    assert_eq!(second.stats.chunks_new, 0);
    assert_eq!(second.stats.bytes_stored, 0);
    assert_eq!(second.stats.chunks_hashed, 4 + 2);
    // Zero and patterned chunks compress.
    assert!(first.stats.bytes_stored < first.stats.bytes_total / 2);
}

#[test]
fn verify_names_damaged_chunks_and_points() {
    let tmp = TestDir::new("repo-verify");
    let repo = Repository::init(tmp.path(), None).unwrap();
    let mem = memory(3, &[1, 0, 3]);
    let a = backup(&repo, "vm1", None, &mem, None, 0);
    let b = backup(&repo, "vm1", Some(&a.id), &mem, Some(&[]), 1);
    let files = chunk_files(tmp.path());
    assert_eq!(files.len(), 3 + 3);
    // Flip one byte in every chunk file in turn: verify names it and both points.
    let target = a.object("memory").unwrap().chunks[2];
    let file = tmp.path().join(chunk_object_name(&target));
    let original = fs::read(&file).unwrap();
    for pos in [0, 1, original.len() / 2, original.len() - 1] {
        let mut damaged = original.clone();
        damaged[pos] ^= 0x10;
        fs::write(&file, &damaged).unwrap();
        let report = repo.verify(|_| ()).unwrap();
        assert_eq!(report.damaged_chunks.len(), 1, "flip at {pos}");
        assert_eq!(report.damaged_chunks[0].id, target);
        assert_eq!(
            report.damaged_chunks[0].points,
            vec![a.id.clone(), b.id.clone()]
        );
        assert!(matches!(
            repo.read_object(&b, "memory", &mut Vec::new()),
            Err(RepoError::ChunkDamaged { .. })
        ));
    }
    fs::write(&file, &original).unwrap();
    assert!(repo.verify(|_| ()).unwrap().is_clean());

    // A missing chunk.
    fs::remove_file(&file).unwrap();
    let report = repo.verify(|_| ()).unwrap();
    assert_eq!(report.damaged_chunks[0].problem, "missing");
    fs::write(&file, &original).unwrap();

    // A flipped byte in a point manifest.
    let manifest = tmp.path().join(point_object_name(&b.id));
    let original = fs::read(&manifest).unwrap();
    for pos in (0..original.len()).step_by(11) {
        let mut damaged = original.clone();
        damaged[pos] ^= 1;
        fs::write(&manifest, &damaged).unwrap();
        let report = repo.verify(|_| ()).unwrap();
        assert_eq!(report.damaged_points.len(), 1, "flip at {pos}");
        assert_eq!(report.unrestorable_points(), [b.id.clone()].into());
        assert!(repo.read_point(&b.id).is_err());
    }
    fs::write(&manifest, &original).unwrap();
    let mut last = None;
    assert!(repo.verify(|p| last = Some(*p)).unwrap().is_clean());
    assert_eq!(last.map(|p| (p.chunks_done, p.chunks_total)), Some((6, 6)));
}

#[test]
fn prune_collects_exactly_the_unused_chunks() {
    let tmp = TestDir::new("repo-prune");
    let repo = Repository::init(tmp.path(), None).unwrap();
    let mut seeds = vec![1u8, 0, 3, 4];
    let mut ids = Vec::new();
    let mut mems = Vec::new();
    for generation in 0..4u32 {
        seeds[3] = seeds[3].wrapping_add(10);
        let mem = memory(4, &seeds);
        let parent = ids.last().map(String::as_str);
        let point = backup(&repo, "vm1", parent, &mem, Some(&[3]), generation);
        ids.push(point.id);
        mems.push(mem);
    }
    let before = chunk_files(tmp.path()).len();
    let report = repo.prune(&KeepPolicy::last(2)).unwrap();
    assert_eq!(report.removed, ids[..2].to_vec());
    assert_eq!(report.kept, ids[2..].to_vec());
    // Each removed point had its own chunk 3 and its own state chunk.
    assert_eq!(report.gc.chunks_removed, 4);
    assert_eq!(chunk_files(tmp.path()).len(), before - 4);
    assert_eq!(report.gc.chunks_kept as usize, before - 4);
    assert!(repo.verify(|_| ()).unwrap().is_clean());
    for (id, mem) in ids[2..].iter().zip(&mems[2..]) {
        assert_eq!(&restore_memory(&repo, id), mem);
    }
    // Collecting again removes nothing.
    assert_eq!(repo.gc().unwrap().chunks_removed, 0);
}

#[test]
fn abandoned_backup_is_invisible_and_collected() {
    let tmp = TestDir::new("repo-crash");
    let repo = Repository::init(tmp.path(), None).unwrap();
    let mem = memory(2, &[1, 0]);
    let kept = backup(&repo, "vm1", None, &mem, None, 0);
    {
        let mut writer = repo.start_backup("vm1", None).unwrap();
        let object = writer
            .add_object("memory", PartKind::Memory, MIB as u64)
            .unwrap();
        object.put_chunk(0, &vec![42u8; MIB]).unwrap();
        // Dropped without commit, as a crash would leave it.
    }
    // A leftover of an interrupted object write.
    fs::write(tmp.path().join(".tmp/99999-1"), b"partial").unwrap();
    assert_eq!(repo.point_ids().unwrap(), vec![kept.id.clone()]);
    let report = repo.gc().unwrap();
    assert_eq!(report.chunks_removed, 1);
    assert_eq!(report.incomplete_removed, 1);
    assert!(repo.verify(|_| ()).unwrap().is_clean());
    assert_eq!(restore_memory(&repo, &kept.id), mem);
}

#[test]
fn prune_waits_for_backups_and_blocks_on_damage() {
    let tmp = TestDir::new("repo-lock");
    let repo = Repository::init(tmp.path(), None).unwrap();
    let writer = repo.start_backup("vm1", None).unwrap();
    assert!(matches!(
        repo.store().lock(LockMode::Exclusive, false),
        Err(StoreError::Locked { .. })
    ));
    drop(writer);
    assert!(repo.store().lock(LockMode::Exclusive, false).is_ok());

    let mem = memory(2, &[1, 0]);
    let point = backup(&repo, "vm1", None, &mem, None, 0);
    let manifest = tmp.path().join(point_object_name(&point.id));
    let mut bytes = fs::read(&manifest).unwrap();
    bytes[10] ^= 1;
    fs::write(&manifest, &bytes).unwrap();
    assert!(matches!(repo.gc(), Err(RepoError::GcBlocked { .. })));
    repo.remove_point(&point.id).unwrap();
    assert_eq!(repo.gc().unwrap().chunks_kept, 0);
}

#[test]
fn two_vms_back_up_at_once() {
    let tmp = TestDir::new("repo-concurrent");
    let repo = Repository::init(tmp.path(), None).unwrap();
    let points: Vec<PointManifest> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2u8)
            .map(|vm| {
                let repo = &repo;
                s.spawn(move || {
                    let mem = memory(6, &[vm, 0, 2, 3, vm + 10, 5]);
                    backup(repo, &format!("vm{vm}"), None, &mem, None, 0)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(repo.point_ids().unwrap().len(), 2);
    assert!(repo.verify(|_| ()).unwrap().is_clean());
    for (vm, point) in points.iter().enumerate() {
        let vm = vm as u8;
        assert_eq!(
            restore_memory(&repo, &point.id),
            memory(6, &[vm, 0, 2, 3, vm + 10, 5])
        );
    }
}

#[test]
fn misuse_is_refused() {
    let tmp = TestDir::new("repo-misuse");
    let repo = Repository::init(tmp.path(), None).unwrap();
    assert!(matches!(
        repo.start_backup("bad/name", None),
        Err(RepoError::BadVmName { .. })
    ));
    assert!(matches!(
        repo.start_backup("vm1", Some("nope")),
        Err(RepoError::NoSuchPoint { .. })
    ));
    let mut writer = repo.start_backup("vm1", None).unwrap();
    let object = writer
        .add_object("memory", PartKind::Memory, MIB as u64 + 1)
        .unwrap();
    assert!(!object.has_parent());
    assert!(object.reuse_parent_chunk(0).is_err());
    assert!(object.put_chunk(1, &[0, 0]).is_err());
    assert!(object.put_chunk(2, &[0]).is_err());
    object.put_chunk(1, &[0]).unwrap();
    assert!(writer.add_object("memory", PartKind::Raw, 1).is_err());
    assert!(matches!(
        writer.finish_object(object),
        Err(RepoError::ChunkNotWritten { index: 0, .. })
    ));
    let _unfinished = writer.add_object("disk-0", PartKind::Raw, 1).unwrap();
    assert!(matches!(
        writer.commit(),
        Err(RepoError::ObjectMisuse { .. })
    ));
    assert!(repo.point_ids().unwrap().is_empty());
}

/// Writes a snapshot directory with a memory part in standard chunks (the last one partial),
/// a state part and a raw part.
fn write_snapshot_dir(target: &Path, mem: &[u8]) {
    let mut snap = crate::dir::SnapshotWriter::create(target).unwrap();
    snap.write_state_part("vm-state", &VmState { generation: 9 })
        .unwrap();
    let mut disk = snap.add_part("disk-0").unwrap();
    std::io::Write::write_all(&mut disk, &vec![3u8; MIB + 17]).unwrap();
    snap.finish_part(disk).unwrap();
    let memory = snap
        .add_memory_part("memory", mem.len() as u64, CHUNK_SIZE as u64)
        .unwrap();
    for (i, chunk) in mem.chunks(MIB).enumerate() {
        memory.write_chunk(i as u64, chunk).unwrap();
    }
    snap.finish_memory_part(memory).unwrap();
    snap.commit().unwrap();
}

#[test]
fn snapshot_directories_go_in_and_come_out() {
    let tmp = TestDir::new("repo-transfer");
    let repo = Repository::init(&tmp.path().join("repo"), None).unwrap();
    let mut mem = memory(4, &[1, 0, 3, 4]);
    mem.truncate(3 * MIB + 4096);
    let dir = tmp.path().join("snap");
    write_snapshot_dir(&dir, &mem);
    let reader = crate::dir::SnapshotReader::open(&dir).unwrap();

    let first = repo.store_snapshot(&reader, "vm1", None).unwrap();
    assert_eq!(first.stats.chunks_reused, 0);
    assert!(first.stats.chunks_new > 0);
    // The same snapshot again: memory chunks are found by their table ids, not read.
    let second = repo
        .store_snapshot(&reader, "vm1", Some(&first.id))
        .unwrap();
    assert_eq!(second.stats.chunks_reused, 4);
    assert_eq!(second.stats.chunks_new, 0);
    assert_eq!(
        second.object("memory").unwrap().chunks,
        first.object("memory").unwrap().chunks
    );
    // The point's memory chunk ids are the snapshot's chunk table.
    let table = &reader
        .manifest()
        .part("memory")
        .unwrap()
        .chunks
        .as_ref()
        .unwrap()
        .hashes;
    assert_eq!(&first.object("memory").unwrap().chunks, table);

    let out = tmp.path().join("restored");
    let manifest = repo.export_point(&second.id, &out).unwrap();
    assert_eq!(manifest.parts.len(), 3);
    let restored = crate::dir::SnapshotReader::open(&out).unwrap();
    restored.verify_all(|_| ()).unwrap();
    let state: VmState = restored.read_state_part("vm-state").unwrap();
    assert_eq!(state.generation, 9);
    assert_eq!(fs::read(out.join("memory")).unwrap(), mem);
    assert_eq!(
        fs::read(out.join("disk-0")).unwrap(),
        fs::read(dir.join("disk-0")).unwrap()
    );
    // Exporting onto an existing directory is refused.
    assert!(matches!(
        repo.export_point(&second.id, &out),
        Err(RepoError::Snapshot(
            crate::dir::SnapshotError::Exists { .. }
        ))
    ));
}

#[test]
fn damaged_snapshot_is_not_stored() {
    let tmp = TestDir::new("repo-transfer-damage");
    let repo = Repository::init(&tmp.path().join("repo"), None).unwrap();
    let mem = memory(2, &[1, 0]);
    let dir = tmp.path().join("snap");
    write_snapshot_dir(&dir, &mem);
    for part in ["disk-0", "memory", "vm-state"] {
        let path = dir.join(part);
        let original = fs::read(&path).unwrap();
        let mut damaged = original.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0x04;
        fs::write(&path, &damaged).unwrap();
        let reader = crate::dir::SnapshotReader::open(&dir).unwrap();
        assert!(repo.store_snapshot(&reader, "vm1", None).is_err(), "{part}");
        assert!(repo.point_ids().unwrap().is_empty(), "{part}");
        fs::write(&path, &original).unwrap();
    }
}

/// Every file under `root`, recursively.
fn all_files(root: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

#[test]
fn encrypted_repository() {
    let tmp = TestDir::new("repo-encrypted");
    let root = tmp.path().join("repo");
    let key_path = tmp.path().join("repo.key");
    let key = RepoKey::create_file(&key_path).unwrap();
    let repo = Repository::init(&root, Some(key)).unwrap();
    assert!(repo.is_encrypted());
    let secret = b"ARKVM-SECRET-PAGE";
    let mut mem = memory(3, &[1, 0, 3]);
    for chunk in mem.chunks_mut(4096) {
        chunk[..secret.len()].copy_from_slice(secret);
    }
    let first = backup(&repo, "vm1", None, &mem, None, 4);
    let second = backup(&repo, "vm1", Some(&first.id), &mem, Some(&[]), 5);
    assert_eq!(second.stats.chunks_reused, 3);
    // A full backup of the same memory dedups under the key too.
    let third = backup(&repo, "vm1", None, &mem, None, 6);
    assert_eq!(third.stats.chunks_new, 1, "only the new state chunk");
    assert_eq!(restore_memory(&repo, &first.id), mem);
    let point = repo.read_point(&second.id).unwrap();
    let state: VmState = repo.read_state(&point, "vm-state").unwrap();
    assert_eq!(state.generation, 5);
    assert!(repo.verify(|_| ()).unwrap().is_clean());

    // Nothing readable is stored: neither the memory nor the manifests' contents.
    for file in all_files(&root) {
        let bytes = fs::read(&file).unwrap();
        let shown = file.display();
        assert!(!bytes.windows(secret.len()).any(|w| w == secret), "{shown}");
        assert!(!bytes.windows(6).any(|w| w == b"memory"), "{shown}");
    }

    // The key is required, and must be the right one.
    assert!(matches!(
        Repository::open(&root, None),
        Err(RepoError::KeyRequired)
    ));
    assert!(matches!(
        Repository::open(&root, Some(RepoKey::generate())),
        Err(RepoError::WrongKey { .. })
    ));
    let reopened = Repository::open(&root, Some(RepoKey::load(&key_path).unwrap())).unwrap();
    assert_eq!(restore_memory(&reopened, &second.id), mem);

    // Tampering with a chunk or a manifest is detected.
    let chunk = root.join(chunk_object_name(
        &first.object("memory").unwrap().chunks[0],
    ));
    let mut bytes = fs::read(&chunk).unwrap();
    bytes[40] ^= 1;
    fs::write(&chunk, &bytes).unwrap();
    let report = reopened.verify(|_| ()).unwrap();
    assert_eq!(report.damaged_chunks.len(), 1);
    assert_eq!(report.damaged_chunks[0].points.len(), 3);
    let manifest = root.join(point_object_name(&third.id));
    let mut bytes = fs::read(&manifest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&manifest, &bytes).unwrap();
    assert!(matches!(
        reopened.read_point(&third.id),
        Err(RepoError::PointUnauthentic { .. })
    ));

    // A plain repository refuses a key.
    let plain = tmp.path().join("plain");
    Repository::init(&plain, None).unwrap();
    assert!(matches!(
        Repository::open(&plain, Some(RepoKey::generate())),
        Err(RepoError::KeyNotUsed)
    ));
}

#[test]
fn encrypted_snapshot_transfer() {
    let tmp = TestDir::new("repo-encrypted-transfer");
    let repo = Repository::init(&tmp.path().join("repo"), Some(RepoKey::generate())).unwrap();
    let mem = memory(2, &[1, 0]);
    let dir = tmp.path().join("snap");
    write_snapshot_dir(&dir, &mem);
    let reader = crate::dir::SnapshotReader::open(&dir).unwrap();
    let point = repo.store_snapshot(&reader, "vm1", None).unwrap();
    // Chunk table ids are not the keyed ids, so the memory was read and hashed.
    assert_eq!(point.stats.chunks_reused, 0);
    let out = tmp.path().join("out");
    repo.export_point(&point.id, &out).unwrap();
    assert_eq!(fs::read(out.join("memory")).unwrap(), mem);
    crate::dir::SnapshotReader::open(&out)
        .unwrap()
        .verify_all(|_| ())
        .unwrap();
}

#[test]
fn every_flipped_byte_of_a_small_repository_is_detected() {
    use std::os::unix::fs::FileExt;
    for key in [None, Some(RepoKey::generate())] {
        let tmp = TestDir::new("repo-flip-all");
        let root = tmp.path().join("repo");
        let repo = Repository::init(&root, key.clone()).unwrap();
        let mut writer = repo.start_backup("vm1", None).unwrap();
        writer
            .put_state("vm-state", &VmState { generation: 3 })
            .unwrap();
        let object = writer.add_object("memory", PartKind::Memory, 3000).unwrap();
        let mem: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        object.put_chunk(0, &mem).unwrap();
        writer.finish_object(object).unwrap();
        let point = writer.commit().unwrap();
        let id = point.id.clone();

        // Everything a restore does, and a full verify; Ok only if both are clean.
        let check = |repo: &Repository| -> bool {
            let restored = (|| -> Result<(), RepoError> {
                let point = repo.read_point(&id)?;
                let state: VmState = repo.read_state(&point, "vm-state")?;
                let mut out = Vec::new();
                repo.read_object(&point, "memory", &mut out)?;
                assert_eq!((state.generation, out.as_slice()), (3, mem.as_slice()));
                Ok(())
            })();
            restored.is_ok() && repo.verify(|_| ()).is_ok_and(|r| r.is_clean())
        };
        assert!(check(&repo));
        let files: Vec<_> = all_files(&root)
            .into_iter()
            .filter(|p| !p.ends_with(".lock"))
            .collect();
        assert_eq!(files.len(), 1 + 2 + 1, "config, two chunks, one point");
        for path in &files {
            let original = fs::read(path).unwrap();
            let file = fs::OpenOptions::new().write(true).open(path).unwrap();
            for (pos, &byte) in original.iter().enumerate() {
                file.write_all_at(&[byte ^ 0x01], pos as u64).unwrap();
                // The config is read at open; the rest by restore and verify.
                let detected = match Repository::open(&root, key.clone()) {
                    Err(_) => true,
                    Ok(reopened) => !check(&reopened),
                };
                let shown = path.display();
                assert!(detected, "flip at byte {pos} of {shown} went unnoticed");
                file.write_all_at(&[byte], pos as u64).unwrap();
            }
        }
        assert!(check(&Repository::open(&root, key.clone()).unwrap()));
    }
}

#[test]
fn a_damaged_all_zero_chunk_is_restored_from_its_id() {
    for key in [None, Some(RepoKey::generate())] {
        let dir = TestDir::new("repo-zero-chunk");
        let repo = Repository::init(dir.path(), key.clone()).unwrap();
        let mem = memory(3, &[1, 0, 3]);
        let point = backup(&repo, "vm1", None, &mem, None, 1);
        // Damage every stored copy of the zero chunk (chunk 1 of the memory).
        let zero = chunk_id(&vec![0u8; MIB], key.as_ref());
        let path = dir.path().join(chunk_object_name(&zero));
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(restore_memory(&repo, &point.id), mem);
        let reader = repo.object_reader(&point, "memory").unwrap();
        let mut buf = vec![1u8; MIB];
        reader.read_chunk(1, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // A damaged chunk that is not all zeros is still refused.
        fs::remove_file(&path).unwrap();
        let other = dir.path().join(chunk_object_name(
            &point.object("memory").unwrap().chunks[0],
        ));
        let mut bytes = fs::read(&other).unwrap();
        let end = bytes.len() - 1;
        bytes[end] ^= 0xff;
        fs::write(&other, &bytes).unwrap();
        assert!(repo.read_object(&point, "memory", &mut Vec::new()).is_err());
        assert!(reader.read_chunk(0, &mut buf).is_err());
    }
}

/// A local store whose lock says it was not held throughout (as an S3 lease renewed late).
struct GappyLockStore(LocalDirStore);

struct GappyLock;

impl LockGuard for GappyLock {
    fn unbroken(&self) -> bool {
        false
    }
}

impl ChunkStore for GappyLockStore {
    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> Result<bool, StoreError> {
        self.0.put_if_absent(name, bytes)
    }
    fn sync(&self) -> Result<(), StoreError> {
        self.0.sync()
    }
    fn get(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.0.get(name)
    }
    fn contains(&self, name: &str) -> Result<bool, StoreError> {
        self.0.contains(name)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.0.list(prefix)
    }
    fn delete(&self, name: &str) -> Result<(), StoreError> {
        self.0.delete(name)
    }
    fn lock(&self, _mode: LockMode, _wait: bool) -> Result<StoreLock, StoreError> {
        Ok(StoreLock::new(Box::new(GappyLock)))
    }
    fn clean_incomplete(&self) -> Result<usize, StoreError> {
        self.0.clean_incomplete()
    }
    fn location(&self) -> String {
        self.0.location()
    }
}

#[test]
fn a_backup_whose_parent_is_gone_when_it_starts_is_refused() {
    let tmp = TestDir::new("repo-parent-gone");
    let root = tmp.path().join("repo");
    let repo = Repository::init(&root, None).unwrap();
    let mem = memory(4, &[1, 0, 3, 4]);
    let first = backup(&repo, "vm", None, &mem, None, 1);
    repo.store()
        .delete(&super::point::point_object_name(&first.id))
        .unwrap();
    let err = repo
        .start_backup("vm", Some(&first.id))
        .err()
        .expect("a backup on a removed parent started");
    assert!(matches!(err, RepoError::NoSuchPoint { .. }), "{err:?}");
}

#[test]
fn after_a_gap_in_the_lock_every_reused_chunk_is_checked_at_commit() {
    let tmp = TestDir::new("repo-gappy-lock");
    let root = tmp.path().join("repo");
    Repository::init(&root, None).unwrap();
    let gappy = || {
        Repository::open_store(
            Box::new(GappyLockStore(LocalDirStore::open(&root).unwrap())),
            None,
        )
        .unwrap()
    };
    let repo = gappy();
    let mem = memory(4, &[1, 0, 3, 4]);
    let first = backup(&repo, "vm", None, &mem, None, 1);
    // A clean incremental commits: every reused chunk is there.
    let second = backup(&repo, "vm", Some(&first.id), &mem, Some(&[]), 2);
    assert_eq!(restore_memory(&repo, &second.id), mem);
    // Chunk 3 of the parent disappears while the next backup runs (what a prune in the gap
    // could do): the commit finds it and refuses.
    let mut writer = repo.start_backup("vm", Some(&second.id)).unwrap();
    let object = writer
        .add_object("memory", PartKind::Memory, mem.len() as u64)
        .unwrap();
    let mut gone = None;
    for i in 0..4u64 {
        let id = object.reuse_parent_chunk(i).unwrap();
        if i == 3 {
            gone = Some(id);
        }
    }
    writer.finish_object(object).unwrap();
    let gone = gone.unwrap();
    repo.store()
        .delete(&super::codec::chunk_object_name(&gone))
        .unwrap();
    let err = writer.commit().expect_err("committed a missing chunk");
    assert!(
        matches!(&err, RepoError::ChunkMissing { id } if *id == gone.to_hex()),
        "{err:?}"
    );
    assert_eq!(repo.point_ids().unwrap().len(), 2, "no third point");
}

#[test]
fn compression_off_stores_plain_chunks_that_read_back() {
    let tmp = TestDir::new("repo-compression");
    let repo = Repository::init(&tmp.path().join("repo"), None).unwrap();
    let mem = memory(3, &[5, 0, 9]);
    let mut stored = Vec::new();
    for compression in [Compression::Off, Compression::Default, Compression::Fast] {
        let mut writer = repo
            .start_backup(&format!("vm-{compression}"), None)
            .unwrap();
        writer.set_compression(compression);
        let object = writer
            .add_object("memory", PartKind::Memory, mem.len() as u64)
            .unwrap();
        // Distinct bytes per VM, so no chunk is shared between the three backups.
        let mine: Vec<u8> = mem
            .iter()
            .map(|b| b ^ compression.name().len() as u8)
            .collect();
        for (i, chunk) in mine.chunks(MIB).enumerate() {
            object.put_chunk(i as u64, chunk).unwrap();
        }
        writer.finish_object(object).unwrap();
        let point = writer.commit().unwrap();
        assert_eq!(restore_memory(&repo, &point.id), mine, "{compression}");
        stored.push(point.stats.bytes_stored);
    }
    // Two non-zero chunks of a repeating pattern: plain they take 2 MiB, compressed far less.
    assert!(stored[0] >= 2 * MIB as u64, "off: {}", stored[0]);
    assert!(stored[1] < MIB as u64 / 4, "default: {}", stored[1]);
    assert!(stored[2] < MIB as u64 / 4, "fast: {}", stored[2]);
}

#[test]
fn a_chunk_repeated_in_one_object_is_encoded_and_stored_once() {
    let tmp = TestDir::new("repo-repeated-chunk");
    let repo = Repository::init(&tmp.path().join("repo"), None).unwrap();
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    let mut writer = repo.start_backup("vm", None).unwrap();
    let object = writer
        .add_object("memory", PartKind::Memory, 3 * MIB as u64)
        .unwrap();
    for i in 0..3 {
        object.put_chunk(i, &chunk).unwrap();
    }
    let stages = object.stage_times().summary();
    writer.finish_object(object).unwrap();
    let point = writer.commit().unwrap();
    assert_eq!(point.stats.chunks_new, 1);
    assert_eq!(point.stats.chunks_hashed, 3, "every chunk is hashed");
    assert!(
        stages.contains(&format!("compress={MIB}B/")),
        "compressed once: {stages}"
    );
    assert_eq!(restore_memory(&repo, &point.id), chunk.repeat(3));
}

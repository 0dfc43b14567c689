//! Restoring a VM from a snapshot directory.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use snapshot::{chunk_hash, SnapshotReader};

use crate::builder::{build, BuildError, BuiltVm, Restore};
use crate::restore::lazy_memory::{MemorySource, RegionSource};
use crate::saved_state::{disk_part_name, VmSnapshotState, MAX_STATE_LEN, MEMORY_PART, STATE_PART};

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("the snapshot's memory part holds {part} bytes but its state describes {state} bytes")]
    MemorySize { part: u64, state: u64 },
    #[error("the snapshot was taken with --memory {snap_mib}M, not the {asked_mib}M asked for")]
    MemoryMismatch { snap_mib: u64, asked_mib: u64 },
    #[error("disk directory {0} already exists; choose another with --disk-dir")]
    DiskDirExists(std::path::PathBuf),
    #[error("cannot write restored disk {0}")]
    WriteDisk(std::path::PathBuf, #[source] std::io::Error),
    #[error("cannot open the snapshot's memory part")]
    OpenMemory(#[source] std::io::Error),
}

/// Opens and checks a snapshot: manifest, state part and memory part sizes.
pub fn open_snapshot(dir: &Path) -> Result<(SnapshotReader, VmSnapshotState), RestoreError> {
    let reader = SnapshotReader::open(dir)?;
    let state: VmSnapshotState = reader.read_state_part(STATE_PART)?;
    let _ = MAX_STATE_LEN;
    let part = reader.memory_part(MEMORY_PART)?;
    let described: u64 = state.memory.iter().map(|r| r.len).sum();
    if part.size() != described || described != state.config.memory_bytes {
        return Err(RestoreError::MemorySize {
            part: part.size(),
            state: described,
        });
    }
    Ok((reader, state))
}

/// Builds the restored VM (paused), loading memory lazily from the snapshot.
pub fn restore_from_dir(
    dir: &Path,
    expect_memory: Option<u64>,
    disk_dir: Option<&Path>,
    out: Box<dyn Write + Send>,
) -> Result<(BuiltVm, VmSnapshotState), RestoreError> {
    let (reader, mut state) = open_snapshot(dir)?;
    if !state.config.disks.is_empty() {
        let target = match disk_dir {
            Some(d) => d.to_path_buf(),
            None => {
                let mut name = dir.file_name().unwrap_or_default().to_os_string();
                name.push(".disks");
                dir.with_file_name(name)
            }
        };
        materialize_disks(&reader, &mut state, &target)?;
    }
    if let Some(asked) = expect_memory {
        if asked != state.config.memory_bytes {
            return Err(RestoreError::MemoryMismatch {
                snap_mib: state.config.memory_bytes >> 20,
                asked_mib: asked >> 20,
            });
        }
    }
    let part = Arc::new(reader.memory_part(MEMORY_PART)?);
    let chunk_size = part.chunk_size();
    let zero_hash = chunk_hash(&vec![0u8; chunk_size as usize]);
    let zero_chunks = part
        .chunk_hashes()
        .iter()
        .map(|h| *h == zero_hash)
        .collect();
    let file = part.file().try_clone().map_err(RestoreError::OpenMemory)?;
    let verifier = part.clone();
    let regions = state.memory.clone();
    let memory = Box::new(move |layout: &[(u64, u64, u64)]| MemorySource {
        file,
        chunk_size,
        regions: layout
            .iter()
            .zip(regions.iter())
            .map(|(&(host, _, len), r)| RegionSource {
                host_addr: host,
                len,
                file_offset: r.part_offset,
            })
            .collect(),
        zero_chunks,
        verify: Box::new(move |index, data| {
            verifier
                .verify_chunk(index as u64, data)
                .map_err(|e| crate::error_chain(&e))
        }),
    });
    let restore = Restore {
        state: &state,
        memory,
    };
    let built = build(&state.config, Some(restore), out)?;
    Ok((built, state))
}

/// Copies every disk part (verified against its hash while copying) into `target`, and points
/// the configuration at the copies.
fn materialize_disks(
    reader: &SnapshotReader,
    state: &mut VmSnapshotState,
    target: &Path,
) -> Result<(), RestoreError> {
    if target.exists() {
        return Err(RestoreError::DiskDirExists(target.to_path_buf()));
    }
    std::fs::create_dir_all(target)
        .map_err(|e| RestoreError::WriteDisk(target.to_path_buf(), e))?;
    for (i, disk) in state.config.disks.iter_mut().enumerate() {
        let id = disk.device_id(i);
        let path = target.join(format!("{id}.img"));
        let mut file =
            std::fs::File::create(&path).map_err(|e| RestoreError::WriteDisk(path.clone(), e))?;
        reader.copy_part(&disk_part_name(&id), &mut file)?;
        file.sync_all()
            .map_err(|e| RestoreError::WriteDisk(path.clone(), e))?;
        if disk.readonly {
            let mut perm = file
                .metadata()
                .map_err(|e| RestoreError::WriteDisk(path.clone(), e))?
                .permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o444);
            std::fs::set_permissions(&path, perm)
                .map_err(|e| RestoreError::WriteDisk(path.clone(), e))?;
        }
        disk.path = path;
        disk.overlay = None;
        // Keep the id the snapshot used, so the saved device state finds its disk.
        disk.id = Some(id);
    }
    Ok(())
}

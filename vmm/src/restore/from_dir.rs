//! Restoring a VM from a snapshot directory or a backup point ([`RestoreSource`]): open and
//! check the source, copy its disks out, build the VM through the builder with memory loaded by
//! [`LazyMemory`](crate::restore::lazy_memory::LazyMemory).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::builder::{build, BuildError, BuiltVm, Restore};
use crate::restore::disk_hydration::DiskHydration;
use crate::restore::lazy_memory::first_output::FirstOutputWriter;
use crate::restore::lazy_memory::LazyMemoryError;
use crate::restore::source::{OpenedSource, RestoreSource, SourceError};
use crate::saved_state::VmSnapshotState;

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Memory(#[from] LazyMemoryError),
    #[error("cannot start hydrating the disks")]
    Hydrate(#[source] std::io::Error),
    #[error("the snapshot was taken with --memory {snap_mib}M, not the {asked_mib}M asked for")]
    MemoryMismatch { snap_mib: u64, asked_mib: u64 },
    #[error("--net id={0}: the snapshot has no network device of that id")]
    UnknownNet(String),
}

/// Points the saved network devices named in `overrides` (`id=NAME,tap=IFNAME`) at other taps.
fn apply_net_overrides(
    nets: &mut [devices::virtio::net::NetConfig],
    overrides: &[devices::virtio::net::NetConfig],
) -> Result<(), RestoreError> {
    for o in overrides {
        let id = o.id.clone().unwrap_or_default();
        let found = nets
            .iter_mut()
            .enumerate()
            .find(|(i, n)| n.device_id(*i) == id)
            .ok_or_else(|| RestoreError::UnknownNet(id.clone()))?;
        let (i, net) = found;
        net.id = Some(net.device_id(i));
        net.tap = o.tap.clone();
    }
    Ok(())
}

/// A restored VM, paused, ready to run.
pub struct RestoredVm {
    pub built: BuiltVm,
    pub state: VmSnapshotState,
    /// Where it came from (a directory, or `REPO#ID`).
    pub label: String,
}

/// How the disks of a backup point are hydrated.
#[derive(Clone, Copy, Debug)]
pub struct DiskOptions {
    /// How long a chunk that cannot be read is retried before the VM stops.
    pub fetch_retry: Duration,
    /// The background pass's limit in bytes per second (`None`: as fast as it goes).
    pub rate: Option<u64>,
}

/// Builds the restored VM (paused), memory loaded from the source while the guest runs, or
/// before it runs for a backup point. The disks of a snapshot directory are copied to
/// `disk_dir` (or `DIR.disks`); those of a backup point are served from the point and hydrated
/// into `disk_dir` (or a temporary directory) while the guest runs, a chunk that cannot be read
/// being retried for `disk_options.fetch_retry` ([`DiskHydration`]).
pub fn restore(
    source: RestoreSource,
    expect_memory: Option<u64>,
    net_overrides: &[devices::virtio::net::NetConfig],
    disk_dir: Option<&Path>,
    disk_options: DiskOptions,
    out: Box<dyn Write + Send>,
) -> Result<RestoredVm, RestoreError> {
    let default_disk_dir = source.default_disk_dir();
    let mut opened = source.open()?;
    apply_net_overrides(&mut opened.state.config.nets, net_overrides)?;
    let hydration = DiskHydration::prepare(
        &mut opened,
        disk_dir,
        disk_options.fetch_retry,
        disk_options.rate,
    )?
    .map(Arc::new);
    let result = build_restored(
        opened,
        hydration.clone(),
        expect_memory,
        disk_dir,
        &default_disk_dir,
        out,
    );
    if result.is_err() {
        if let Some(h) = &hydration {
            h.abandon();
        }
    }
    result
}

fn build_restored(
    mut opened: OpenedSource,
    hydration: Option<Arc<DiskHydration>>,
    expect_memory: Option<u64>,
    disk_dir: Option<&Path>,
    default_disk_dir: &Path,
    out: Box<dyn Write + Send>,
) -> Result<RestoredVm, RestoreError> {
    if hydration.is_none() {
        opened.materialize_disks(disk_dir.unwrap_or(default_disk_dir))?;
    }
    let state = &opened.state;
    if let Some(asked) = expect_memory {
        if asked != state.config.memory_bytes {
            return Err(RestoreError::MemoryMismatch {
                snap_mib: state.config.memory_bytes >> 20,
                asked_mib: asked >> 20,
            });
        }
    }
    let restore = Restore {
        state,
        memory: opened.memory,
        label: &opened.label,
    };
    let (out, first_output) = FirstOutputWriter::new(out);
    let mut built = build(&state.config, Some(restore), Box::new(out))?;
    if let Some(lazy) = &built.lazy_memory {
        let _ = first_output.set(lazy.progress());
    }
    if opened.load_before_resume {
        if let Some(lazy) = &built.lazy_memory {
            lazy.wait_all_loaded()?;
        }
    }
    if let Some(h) = &hydration {
        h.start(built.exit.clone()).map_err(RestoreError::Hydrate)?;
    }
    built.disk_hydration = hydration;
    Ok(RestoredVm {
        built,
        state: opened.state,
        label: opened.label,
    })
}

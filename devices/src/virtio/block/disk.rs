//! A virtual disk as a stack of layers: a raw base image, then overlays, newest on top.
//!
//! Guest writes go to the top layer; reads take each 64 KiB cluster from the topmost layer
//! that holds it. The snapshot code uses three operations, all safe while the guest runs:
//! - [`Disk::start_overlay`] pushes a fresh overlay; the layers below freeze, and the returned
//!   [`FrozenImage`] reads them (the disk as it was at that instant) while the guest writes on.
//! - [`Disk::take_changed_blocks`] returns and clears the changed-block bitmap.
//! - [`Disk::merge_overlay`] folds the top overlay back into the layer below it.
//!
//! Every guest request holds the layer lock shared; the three operations above take it
//! exclusively, so each one happens between two guest requests, never inside one.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use super::cbt::{ChangedBlockTracker, ChangedBlocks};
use super::config::DiskConfig;
use super::hydrate::{unavailable, Hydration};
use super::overlay::{sync_parent_dir, OverlayError, OverlayFile, CLUSTER_SIZE};

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The base image could not be opened or inspected.
    #[error("cannot open disk image {path}")]
    OpenBase {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An overlay could not be created, opened or written.
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    /// Reading or writing a layer failed.
    #[error("disk I/O on {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The request reaches past the end of the disk.
    #[error("disk access at {offset:#x}+{len:#x} is past the end ({size:#x})")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The disk is read-only.
    #[error("the disk is read-only")]
    ReadOnly,
    /// A chunk of a disk hydrating from a backup point cannot be had (the VM is stopped; the
    /// request must not be answered).
    #[error("{0}")]
    Unavailable(String),
    /// There is no snapshot overlay to merge (the `overlay=` file is never merged away).
    #[error("the disk has no snapshot overlay to merge")]
    NoOverlay,
    /// A merge is already running.
    #[error("an overlay merge is already running on this disk")]
    MergeRunning,
    /// A frozen image is still being read; merging would change it underneath.
    #[error("the frozen disk image is still in use")]
    FrozenImageInUse,
}

/// One layer of the stack.
#[derive(Debug)]
pub enum Layer {
    /// The raw base image.
    Raw {
        /// Its path.
        path: PathBuf,
        /// The open file (read-only for a read-only disk).
        file: File,
        /// Written since the last fdatasync.
        dirty: AtomicBool,
        /// While the file is being hydrated from a backup point: fetches each chunk before it
        /// is read or written.
        fill: Option<Arc<Hydration>>,
    },
    /// An overlay.
    Overlay(OverlayFile),
}

impl Layer {
    fn path(&self) -> &Path {
        match self {
            Layer::Raw { path, .. } => path,
            Layer::Overlay(o) => o.path(),
        }
    }

    fn flush(&self) -> Result<(), DiskError> {
        match self {
            Layer::Raw {
                path, file, dirty, ..
            } => {
                if dirty.swap(false, Ordering::SeqCst) {
                    file.sync_data().map_err(|source| {
                        dirty.store(true, Ordering::SeqCst);
                        DiskError::Io {
                            path: path.clone(),
                            source,
                        }
                    })?;
                }
                Ok(())
            }
            Layer::Overlay(o) => Ok(o.flush()?),
        }
    }
}

/// Reads `buf` at `offset` through `layers` (the last one is the top).
fn read_layers(layers: &[Arc<Layer>], offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let Some((base, overlays)) = layers.split_first() else {
        return Err(io::Error::other("a disk without layers"));
    };
    let Layer::Raw {
        file: base_file,
        fill,
        ..
    } = &**base
    else {
        return Err(io::Error::other("the bottom layer is not a raw image"));
    };
    let read_base = |piece: &mut [u8], pos: u64| {
        if let Some(fill) = fill {
            fill.ensure(pos, piece.len() as u64)?;
        }
        base_file.read_exact_at(piece, pos)
    };
    if overlays.is_empty() {
        return read_base(buf, offset);
    }
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let cluster = pos / CLUSTER_SIZE;
        let in_off = pos % CLUSTER_SIZE;
        let n = ((CLUSTER_SIZE - in_off) as usize).min(buf.len() - done);
        let piece = &mut buf[done..done + n];
        let found = overlays.iter().rev().find_map(|l| match &**l {
            Layer::Overlay(o) => o.lookup(cluster).map(|off| (o, off)),
            Layer::Raw { .. } => None,
        });
        match found {
            Some((o, off)) => o.read_at(off + in_off, piece)?,
            None => read_base(piece, pos)?,
        }
        done += n;
    }
    Ok(())
}

/// Writes `data` at `offset` into `layers[idx]`, copying up from the layers below it.
fn write_layer(
    layers: &[Arc<Layer>],
    idx: usize,
    offset: u64,
    data: &[u8],
) -> Result<(), DiskError> {
    match &*layers[idx] {
        Layer::Raw {
            path,
            file,
            dirty,
            fill,
        } => {
            let io_err = |source| DiskError::Io {
                path: path.clone(),
                source,
            };
            if let Some(fill) = fill {
                // A partial write must land on the point's bytes, not on the sparse hole.
                fill.ensure(offset, data.len() as u64)
                    .map_err(|e| match unavailable(&e) {
                        Some(why) => DiskError::Unavailable(why),
                        None => io_err(e),
                    })?;
            }
            dirty.store(true, Ordering::SeqCst);
            file.write_all_at(data, offset).map_err(io_err)
        }
        Layer::Overlay(o) => {
            let below = &layers[..idx];
            let mut done = 0usize;
            while done < data.len() {
                let pos = offset + done as u64;
                let cluster = pos / CLUSTER_SIZE;
                let in_off = pos % CLUSTER_SIZE;
                let n = ((CLUSTER_SIZE - in_off) as usize).min(data.len() - done);
                o.write_in_cluster(cluster, in_off, &data[done..done + n], |buf| {
                    read_layers(below, cluster * CLUSTER_SIZE, buf)
                })?;
                done += n;
            }
            Ok(())
        }
    }
}

#[derive(Debug)]
struct LayerStack {
    layers: Vec<Arc<Layer>>,
    /// While a merge runs: the layer that also receives every guest write.
    write_through: Option<usize>,
}

/// How much a merge copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Clusters copied into the lower layer.
    pub clusters: u64,
    /// Bytes copied.
    pub bytes: u64,
}

/// A disk: the layer stack, its size and its changed-block tracker.
#[derive(Debug)]
pub struct Disk {
    size: u64,
    readonly: bool,
    stack: RwLock<LayerStack>,
    cbt: ChangedBlockTracker,
    frozen_token: Arc<()>,
    snapshot_overlay: PathBuf,
    /// Layers named on the command line (base, and the `overlay=` file): never merged away.
    configured_layers: usize,
}

/// Name of the overlay a live snapshot adds to a disk whose top configured file is `top`.
fn snapshot_overlay_for(top: &Path) -> PathBuf {
    let mut name = top.file_name().unwrap_or_default().to_os_string();
    name.push(SNAPSHOT_OVERLAY_SUFFIX);
    top.with_file_name(name)
}

/// Suffix of the overlay file a live snapshot creates next to the disk.
pub const SNAPSHOT_OVERLAY_SUFFIX: &str = ".arkvm-snap";

impl Disk {
    /// Opens the base image (and the overlay, created if absent) of `cfg`. Call
    /// [`super::validate_disks`] first for friendly errors.
    pub fn open(cfg: &DiskConfig) -> Result<Self, DiskError> {
        let open_err = |source| DiskError::OpenBase {
            path: cfg.path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.readonly)
            .open(&cfg.path)
            .map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        let fill = super::hydrate::take_registered(&cfg.path);
        let mut layers = vec![Arc::new(Layer::Raw {
            path: cfg.path.clone(),
            file,
            dirty: AtomicBool::new(false),
            fill,
        })];
        if let Some(path) = &cfg.overlay {
            let overlay = if path.exists() {
                OverlayFile::open(path, size)?
            } else {
                OverlayFile::create(path, size)?
            };
            layers.push(Arc::new(Layer::Overlay(overlay)));
        }
        let snapshot_overlay = snapshot_overlay_for(cfg.overlay.as_ref().unwrap_or(&cfg.path));
        let leftover = match OverlayFile::open(&snapshot_overlay, size) {
            Ok(o) => Some(o),
            Err(OverlayError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                None
            }
            Err(OverlayError::BadHeader { path, reason }) => {
                // The header is made durable before an overlay is switched to, so an overlay
                // without one never took a write. Keep it aside rather than delete it.
                let mut aside = path.clone().into_os_string();
                aside.push(".bad");
                let aside = PathBuf::from(aside);
                tracing::warn!(
                    "disk: ignoring unusable snapshot overlay {} ({reason}); moved to {}",
                    path.display(),
                    aside.display()
                );
                std::fs::rename(&path, &aside).map_err(|source| DiskError::Io {
                    path: path.clone(),
                    source,
                })?;
                None
            }
            Err(e) => return Err(e.into()),
        };
        let configured_layers = layers.len();
        let recovered = leftover.is_some();
        if let Some(o) = leftover {
            layers.push(Arc::new(Layer::Overlay(o)));
        }
        let disk = Self {
            size,
            readonly: cfg.readonly,
            stack: RwLock::new(LayerStack {
                layers,
                write_through: None,
            }),
            cbt: ChangedBlockTracker::new(size),
            frozen_token: Arc::new(()),
            snapshot_overlay,
            configured_layers,
        };
        // Nothing is known about writes before this process: the first take reports every
        // block, unless the caller clears it knowing the disk equals a backup point.
        disk.cbt.mark_all();
        if recovered {
            // A snapshot was interrupted (crash or kill) before its overlay was merged back.
            tracing::info!(
                "disk: merging leftover snapshot overlay {}",
                disk.snapshot_overlay.display()
            );
            let stats = disk.merge_overlay()?;
            tracing::info!(
                "disk: merged {} clusters from the leftover overlay",
                stats.clusters
            );
        }
        Ok(disk)
    }

    /// Where [`Disk::start_snapshot_overlay`] puts its overlay: next to the disk's top
    /// configured file, named `<file>.arkvm-snap`. A file left there by a crash is merged back
    /// by [`Disk::open`].
    pub fn snapshot_overlay_path(&self) -> &Path {
        &self.snapshot_overlay
    }

    /// Waits until no overlay merge runs on this disk, or `timeout` passes; true when none
    /// runs. A snapshot cannot freeze a disk while the previous snapshot's overlay is still
    /// being merged back.
    pub fn wait_merge_done(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.read_stack().write_through.is_none() {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// [`Disk::start_overlay`] at [`Disk::snapshot_overlay_path`].
    pub fn start_snapshot_overlay(&self) -> Result<FrozenImage, DiskError> {
        self.start_overlay(&self.snapshot_overlay)
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the disk refuses writes.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Paths of the layers, base first.
    pub fn layer_paths(&self) -> Vec<PathBuf> {
        self.read_stack()
            .layers
            .iter()
            .map(|l| l.path().to_path_buf())
            .collect()
    }

    fn read_stack(&self) -> std::sync::RwLockReadGuard<'_, LayerStack> {
        snapshot::read_lock(&self.stack)
    }

    fn write_stack(&self) -> std::sync::RwLockWriteGuard<'_, LayerStack> {
        snapshot::write_lock(&self.stack)
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), DiskError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiskError::OutOfRange {
                offset,
                len: len as u64,
                size: self.size,
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset` as the guest sees the disk.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check_range(offset, buf.len())?;
        let st = self.read_stack();
        read_layers(&st.layers, offset, buf).map_err(|source| match unavailable(&source) {
            Some(why) => DiskError::Unavailable(why),
            None => DiskError::Io {
                path: st
                    .layers
                    .last()
                    .map(|l| l.path().to_path_buf())
                    .unwrap_or_default(),
                source,
            },
        })
    }

    /// Writes `data` at `offset` (to the top layer, and during a merge also to the layer
    /// below it), then marks the blocks changed.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        if self.readonly {
            return Err(DiskError::ReadOnly);
        }
        self.check_range(offset, data.len())?;
        let st = self.read_stack();
        let top = st.layers.len() - 1;
        write_layer(&st.layers, top, offset, data)?;
        if let Some(lower) = st.write_through {
            write_layer(&st.layers, lower, offset, data)?;
        }
        // Marked after the data is in place and before the shared lock is released, so a
        // take either sees the whole write or leaves it for the next take.
        self.cbt.mark(offset, data.len() as u64);
        Ok(())
    }

    /// Makes every completed write durable (all layers written since their last sync).
    pub fn flush(&self) -> Result<(), DiskError> {
        let st = self.read_stack();
        st.layers.iter().try_for_each(|l| l.flush())
    }

    /// Returns the blocks written since the last take (or since open) and clears the bitmap,
    /// between two guest writes.
    pub fn take_changed_blocks(&self) -> ChangedBlocks {
        let _exclusive = self.write_stack();
        self.cbt.take()
    }

    /// Marks every block changed (no previous backup to be incremental against).
    pub fn mark_all_changed(&self) {
        self.cbt.mark_all();
    }

    /// Save order: save the virtio transport (queue indexes) *before* this call. A request
    /// completed after the save then lands in the frozen image too and is merely replayed by
    /// the restored guest; the other order can lose a write (docs/disk-overlay.md).
    ///
    /// Puts a new overlay file at `path` on top, between two guest requests. From then on the
    /// layers below are frozen: the returned image reads them, and carries the changed blocks
    /// up to this instant (the tracker restarts empty).
    pub fn start_overlay(&self, path: &Path) -> Result<FrozenImage, DiskError> {
        if self.read_stack().write_through.is_some() {
            return Err(DiskError::MergeRunning);
        }
        let overlay = Arc::new(Layer::Overlay(OverlayFile::create_reserved(
            path, self.size,
        )?));
        let mut st = self.write_stack();
        if st.write_through.is_some() {
            drop(st);
            let _ = std::fs::remove_file(path);
            return Err(DiskError::MergeRunning);
        }
        let frozen = st.layers.clone();
        st.layers.push(overlay);
        let changed = self.cbt.take();
        drop(st);
        tracing::info!(
            "disk {}: writes now go to overlay {}",
            frozen[0].path().display(),
            path.display()
        );
        Ok(FrozenImage {
            layers: frozen,
            size: self.size,
            changed,
            _token: self.frozen_token.clone(),
        })
    }

    /// Merges the top overlay into the layer below it while the guest keeps running, then
    /// removes the overlay file.
    ///
    /// Each cluster is copied between two guest requests, and guest writes meanwhile go to
    /// both layers, so the overlay stays a complete record until it is deleted: a crash at any
    /// point leaves "lower layer + overlay" reading exactly as before. The lower layer is
    /// synced before the overlay file is removed. Refused while a [`FrozenImage`] is alive.
    pub fn merge_overlay(&self) -> Result<MergeStats, DiskError> {
        let (top, lower) = self.begin_merge()?;
        let result = self.copy_down(&top, lower, usize::MAX).and_then(|stats| {
            self.retire(&top, lower)?;
            Ok(stats)
        });
        let mut st = self.write_stack();
        st.write_through = None;
        if result.is_ok() {
            st.layers.pop();
            drop(st);
            tracing::info!("disk: merged overlay {}", top.path().display());
        }
        result
    }

    /// Enters write-through mode; returns the top layer and the index of the one below.
    fn begin_merge(&self) -> Result<(Arc<Layer>, usize), DiskError> {
        let mut st = self.write_stack();
        if st.write_through.is_some() {
            return Err(DiskError::MergeRunning);
        }
        if st.layers.len() <= self.configured_layers {
            return Err(DiskError::NoOverlay);
        }
        if Arc::strong_count(&self.frozen_token) > 1 {
            return Err(DiskError::FrozenImageInUse);
        }
        let lower = st.layers.len() - 2;
        st.write_through = Some(lower);
        Ok((st.layers[lower + 1].clone(), lower))
    }

    /// Copies up to `limit` of the top overlay's clusters into layer `lower`, each between
    /// two guest requests.
    fn copy_down(&self, top: &Layer, lower: usize, limit: usize) -> Result<MergeStats, DiskError> {
        let Layer::Overlay(overlay) = top else {
            return Err(DiskError::NoOverlay);
        };
        let io_err = |source| DiskError::Io {
            path: overlay.path().to_path_buf(),
            source,
        };
        let mut stats = MergeStats::default();
        let mut buf = vec![0u8; CLUSTER_SIZE as usize];
        for cluster in overlay.mapped_clusters().into_iter().take(limit) {
            let start = cluster * CLUSTER_SIZE;
            let len = CLUSTER_SIZE.min(self.size - start) as usize;
            let st = self.write_stack();
            let off = overlay.lookup(cluster).ok_or(DiskError::NoOverlay)?;
            overlay.read_at(off, &mut buf[..len]).map_err(io_err)?;
            write_layer(&st.layers, lower, start, &buf[..len])?;
            drop(st);
            stats.clusters += 1;
            stats.bytes += len as u64;
        }
        Ok(stats)
    }

    /// The lower layer holds everything now: make it durable, then delete the overlay file.
    /// Guest writes keep reaching both layers until the caller takes the overlay off the stack.
    fn retire(&self, top: &Layer, lower: usize) -> Result<(), DiskError> {
        let path = top.path();
        let io_err = |source| DiskError::Io {
            path: path.to_path_buf(),
            source,
        };
        self.read_stack().layers[lower].flush()?;
        std::fs::remove_file(path).map_err(io_err)?;
        sync_parent_dir(path).map_err(io_err)
    }

    /// Test hook: a merge that "crashes" after copying `clusters` clusters (write-through
    /// stays on, nothing is retired).
    #[cfg(test)]
    pub(crate) fn merge_prefix(&self, clusters: usize) -> Result<MergeStats, DiskError> {
        let (top, lower) = self.begin_merge()?;
        self.copy_down(&top, lower, clusters)
    }

    /// Runs [`Disk::merge_overlay`] on a thread of its own.
    pub fn merge_overlay_in_background(
        self: &Arc<Self>,
    ) -> io::Result<std::thread::JoinHandle<Result<MergeStats, DiskError>>> {
        let disk = self.clone();
        std::thread::Builder::new()
            .name("disk-merge".into())
            .spawn(move || disk.merge_overlay())
    }
}

/// The disk as it was when an overlay was started: read-only access to the frozen layers.
#[derive(Debug)]
pub struct FrozenImage {
    layers: Vec<Arc<Layer>>,
    size: u64,
    changed: ChangedBlocks,
    _token: Arc<()>,
}

impl FrozenImage {
    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The blocks written between the previous mark and the freeze.
    pub fn changed_blocks(&self) -> &ChangedBlocks {
        &self.changed
    }

    /// Reads the frozen content at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.size => read_layers(&self.layers, offset, buf),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read past the end of the disk",
            )),
        }
    }
}

#[cfg(test)]
#[path = "disk_tests.rs"]
mod tests;

//! The overlay file: a log of uncommitted updates on top of a lower disk layer.
//!
//! Layout (all integers little-endian; the full description is in `docs/disk-overlay.md`):
//!
//! ```text
//! 0      header slot A (512 bytes)   \ two slots written alternately (by sequence number),
//! 512    header slot B (512 bytes)   / so a torn header write leaves the other one valid
//! 4096   cluster map: one u64 per 64 KiB cluster of the disk; 0 = not in this overlay,
//!        otherwise the file offset of the cluster's data
//! data_offset (map end rounded up to 64 KiB): cluster data, appended in allocation order
//! ```
//!
//! Crash rules: a cluster's data is written before its map entry, and both are written (to
//! the page cache) before the guest sees the request complete, so `kill -9` loses no
//! completed write. A guest FLUSH makes everything durable (fdatasync) and then records the
//! durable end of the data area (`synced_end`) and the kernel's boot id in the header. After
//! a reboot (different boot id) map entries past `synced_end` are dropped, because their data
//! may never have reached the disk: power loss can lose unflushed writes but never exposes
//! garbage or loses flushed ones.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::cbt::CBT_BLOCK_SIZE;

/// First bytes of every overlay file.
pub const OVERLAY_MAGIC: [u8; 8] = *b"ARKVMOVL";
/// Version of the layout described above.
pub const OVERLAY_VERSION: u32 = 1;
/// Bytes per overlay cluster (the same as the changed-block tracking block).
pub const CLUSTER_SIZE: u64 = CBT_BLOCK_SIZE;

const SLOT_SIZE: u64 = 512;
const MAP_OFFSET: u64 = 4096;
const CHECKED_LEN: usize = 80;

/// Why an overlay file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// A file operation failed.
    #[error("overlay {path}: cannot {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The overlay's filesystem cannot hold every write the guest may make during a snapshot.
    #[error(
        "no room for the snapshot overlay {path}: it needs up to {needed} bytes there for the \
         guest's writes during the snapshot, and its filesystem has {free} bytes free; the \
         snapshot did not start (docs/disk-overlay.md)"
    )]
    NoSpace {
        path: PathBuf,
        needed: u64,
        free: u64,
    },
    /// `create` found a file already there.
    #[error("overlay {0} already exists")]
    Exists(PathBuf),
    /// Neither header slot is valid, or the header contradicts the file.
    #[error("overlay {path} is not a valid overlay: {reason}")]
    BadHeader { path: PathBuf, reason: String },
    /// The overlay was made for a disk of another size.
    #[error("overlay {path} is for a disk of {overlay} bytes, this disk has {disk}")]
    SizeMismatch {
        path: PathBuf,
        overlay: u64,
        disk: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    seq: u64,
    disk_size: u64,
    synced_end: u64,
    boot_id: [u8; 16],
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn map_entries(disk_size: u64) -> u64 {
    disk_size.div_ceil(CLUSTER_SIZE)
}

fn data_offset(disk_size: u64) -> u64 {
    (MAP_OFFSET + map_entries(disk_size) * 8).next_multiple_of(CLUSTER_SIZE)
}

impl Header {
    fn encode(&self) -> [u8; SLOT_SIZE as usize] {
        let mut b = [0u8; SLOT_SIZE as usize];
        b[0..8].copy_from_slice(&OVERLAY_MAGIC);
        b[8..12].copy_from_slice(&OVERLAY_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(CLUSTER_SIZE as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.disk_size.to_le_bytes());
        b[32..40].copy_from_slice(&MAP_OFFSET.to_le_bytes());
        b[40..48].copy_from_slice(&map_entries(self.disk_size).to_le_bytes());
        b[48..56].copy_from_slice(&data_offset(self.disk_size).to_le_bytes());
        b[56..64].copy_from_slice(&self.synced_end.to_le_bytes());
        b[64..80].copy_from_slice(&self.boot_id);
        let sum = fnv1a64(&b[..CHECKED_LEN]);
        b[80..88].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes one slot; `None` when it is blank or torn.
    fn decode(b: &[u8]) -> Option<Result<Header, String>> {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8-byte slice"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4-byte slice"));
        if b[0..8] != OVERLAY_MAGIC || u64_at(80) != fnv1a64(&b[..CHECKED_LEN]) {
            return None;
        }
        let h = Header {
            seq: u64_at(16),
            disk_size: u64_at(24),
            synced_end: u64_at(56),
            boot_id: b[64..80].try_into().expect("16-byte slice"),
        };
        let check = || {
            if u32_at(8) != OVERLAY_VERSION {
                return Err(format!(
                    "format version {} (this arkvm reads {OVERLAY_VERSION})",
                    u32_at(8)
                ));
            }
            if u64::from(u32_at(12)) != CLUSTER_SIZE {
                return Err(format!("cluster size {}", u32_at(12)));
            }
            if u64_at(32) != MAP_OFFSET
                || u64_at(40) != map_entries(h.disk_size)
                || u64_at(48) != data_offset(h.disk_size)
            {
                return Err("inconsistent map geometry".into());
            }
            Ok(h)
        };
        Some(check())
    }
}

/// The kernel's boot id: it changes when the machine reboots (and page-cache contents die).
fn current_boot_id() -> [u8; 16] {
    static BOOT_ID: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    *BOOT_ID.get_or_init(|| {
        let mut id = [0u8; 16];
        if let Ok(text) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
            let hex: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
            for (i, pair) in hex.chunks(2).take(16).enumerate() {
                let s = std::str::from_utf8(pair).unwrap_or("0");
                id[i] = u8::from_str_radix(s, 16).unwrap_or(0);
            }
        }
        id
    })
}

/// Makes a directory entry (creation or removal of `path`) durable.
pub(crate) fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[derive(Debug)]
struct OverlayMap {
    map: Vec<u64>,
    data_end: u64,
    header: Header,
    unsynced: bool,
}

/// An open overlay file.
#[derive(Debug)]
pub struct OverlayFile {
    path: PathBuf,
    file: File,
    disk_size: u64,
    state: Mutex<OverlayMap>,
}

impl OverlayFile {
    fn io(&self, what: &'static str) -> impl FnOnce(io::Error) -> OverlayError + '_ {
        move |source| OverlayError::Io {
            path: self.path.clone(),
            what,
            source,
        }
    }

    /// Creates an empty overlay for a disk of `disk_size` bytes; refuses an existing file.
    /// The new file and its directory entry are durable when this returns.
    pub fn create(path: &Path, disk_size: u64) -> Result<Self, OverlayError> {
        let io = |what| {
            move |source| OverlayError::Io {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        // The overlay holds the guest's disk writes: private whatever the umask.
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(OverlayError::Exists(path.to_path_buf()))
            }
            Err(e) => return Err(io("create the file")(e)),
        };
        let header = Header {
            seq: 1,
            disk_size,
            synced_end: data_offset(disk_size),
            boot_id: current_boot_id(),
        };
        file.write_all_at(&header.encode(), SLOT_SIZE * (header.seq & 1))
            .map_err(io("write the header"))?;
        file.set_len(data_offset(disk_size))
            .map_err(io("size the map"))?;
        file.sync_all().map_err(io("sync the new file"))?;
        sync_parent_dir(path).map_err(io("sync its directory"))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            disk_size,
            state: Mutex::new(OverlayMap {
                map: vec![0; map_entries(disk_size) as usize],
                data_end: data_offset(disk_size),
                header,
                unsynced: false,
            }),
        })
    }

    /// [`OverlayFile::create`], then reserves the filesystem space of the worst case (every
    /// cluster of the disk written), so that the guest's writes to this overlay cannot fail for
    /// lack of space. On failure the file is removed again.
    pub fn create_reserved(path: &Path, disk_size: u64) -> Result<Self, OverlayError> {
        let overlay = Self::create(path, disk_size)?;
        let end = data_offset(disk_size) + map_entries(disk_size) * CLUSTER_SIZE;
        if let Err(e) = super::reserve::reserve(&overlay.file, path, data_offset(disk_size), end) {
            drop(overlay);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(overlay)
    }

    /// Opens an existing overlay for a disk of `disk_size` bytes and recovers it after a
    /// crash (see the module documentation).
    pub fn open(path: &Path, disk_size: u64) -> Result<Self, OverlayError> {
        Self::open_as_boot(path, disk_size, current_boot_id())
    }

    fn open_as_boot(path: &Path, disk_size: u64, boot_id: [u8; 16]) -> Result<Self, OverlayError> {
        let io = |what| {
            move |source| OverlayError::Io {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        let bad = |reason: String| OverlayError::BadHeader {
            path: path.to_path_buf(),
            reason,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io("open"))?;
        let file_len = file.metadata().map_err(io("inspect"))?.len();
        let mut slots = [0u8; 2 * SLOT_SIZE as usize];
        if file_len < MAP_OFFSET {
            return Err(bad("file is shorter than its header".into()));
        }
        file.read_exact_at(&mut slots, 0)
            .map_err(io("read the header"))?;
        let mut best: Option<Header> = None;
        for slot in slots.chunks(SLOT_SIZE as usize) {
            match Header::decode(slot) {
                Some(Ok(h)) if best.is_none_or(|b| h.seq > b.seq) => best = Some(h),
                Some(Err(reason)) => return Err(bad(reason)),
                _ => {}
            }
        }
        let header = best.ok_or_else(|| bad("no valid header".into()))?;
        if header.disk_size != disk_size {
            return Err(OverlayError::SizeMismatch {
                path: path.to_path_buf(),
                overlay: header.disk_size,
                disk: disk_size,
            });
        }
        let entries = map_entries(disk_size) as usize;
        let data_start = data_offset(disk_size);
        if file_len < data_start {
            return Err(bad("file is shorter than its cluster map".into()));
        }
        let mut raw = vec![0u8; entries * 8];
        file.read_exact_at(&mut raw, MAP_OFFSET)
            .map_err(io("read the cluster map"))?;
        let mut map: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunk")))
            .collect();

        // Keep an entry only if its data is certainly there: inside the file, on a cluster
        // boundary of the data area, not shared, and (after a reboot) known durable.
        let same_boot = header.boot_id == boot_id;
        let durable_end = if same_boot {
            file_len
        } else {
            header.synced_end.min(file_len)
        };
        let mut used = std::collections::HashSet::new();
        let mut dropped = 0usize;
        for (cluster, entry) in map.iter_mut().enumerate() {
            let off = *entry;
            if off == 0 {
                continue;
            }
            let ok = off >= data_start
                && (off - data_start) % CLUSTER_SIZE == 0
                && off
                    .checked_add(CLUSTER_SIZE)
                    .is_some_and(|e| e <= durable_end)
                && used.insert(off);
            if !ok {
                *entry = 0;
                dropped += 1;
                file.write_all_at(&0u64.to_le_bytes(), MAP_OFFSET + cluster as u64 * 8)
                    .map_err(io("repair the cluster map"))?;
            }
        }
        if dropped > 0 {
            tracing::warn!(
                "overlay {}: dropped {dropped} clusters not known to be on disk",
                path.display()
            );
        }
        let mut ovl = Self {
            path: path.to_path_buf(),
            file,
            disk_size,
            state: Mutex::new(OverlayMap {
                map,
                data_end: file_len.max(data_start).next_multiple_of(CLUSTER_SIZE),
                header,
                unsynced: dropped > 0 || !same_boot,
            }),
        };
        if !same_boot {
            let st = ovl.state.get_mut().unwrap_or_else(|p| p.into_inner());
            st.header.boot_id = boot_id;
            st.header.synced_end = durable_end.max(data_start);
        }
        ovl.flush()?;
        Ok(ovl)
    }

    /// The overlay's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OverlayMap> {
        snapshot::lock(&self.state)
    }

    /// Where cluster `cluster`'s data sits in the file, if this overlay holds it.
    pub fn lookup(&self, cluster: u64) -> Option<u64> {
        self.lock()
            .map
            .get(cluster as usize)
            .copied()
            .filter(|&o| o != 0)
    }

    /// The clusters this overlay holds, ascending.
    pub fn mapped_clusters(&self) -> Vec<u64> {
        let st = self.lock();
        (0..st.map.len() as u64)
            .filter(|&c| st.map[c as usize] != 0)
            .collect()
    }

    /// Reads `buf.len()` bytes at `file_offset` (from a [`OverlayFile::lookup`] result).
    pub fn read_at(&self, file_offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, file_offset)
    }

    /// Writes `data` at byte `in_off` of cluster `cluster`. When the overlay does not hold the
    /// cluster yet it is allocated, filled first by `fill_lower` with the lower layers'
    /// content of the cluster (the first `len` bytes, `len` being the cluster's part of the
    /// disk), then the data is appended, then the map entry is written.
    pub fn write_in_cluster(
        &self,
        cluster: u64,
        in_off: u64,
        data: &[u8],
        fill_lower: impl FnOnce(&mut [u8]) -> io::Result<()>,
    ) -> Result<(), OverlayError> {
        let mut st = self.lock();
        let Some(&entry) = st.map.get(cluster as usize) else {
            return Err(OverlayError::Io {
                path: self.path.clone(),
                what: "write past the end of the disk",
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        };
        st.unsynced = true;
        if entry != 0 {
            return self
                .file
                .write_all_at(data, entry + in_off)
                .map_err(self.io("write data"));
        }
        let valid = CLUSTER_SIZE.min(self.disk_size - cluster * CLUSTER_SIZE) as usize;
        let mut buf = vec![0u8; CLUSTER_SIZE as usize];
        let start = in_off as usize;
        if start != 0 || data.len() != valid {
            fill_lower(&mut buf[..valid]).map_err(self.io("read the lower layer for copy-up"))?;
        }
        buf[start..start + data.len()].copy_from_slice(data);
        let off = st.data_end;
        self.file
            .write_all_at(&buf, off)
            .map_err(self.io("append a cluster"))?;
        self.file
            .write_all_at(&off.to_le_bytes(), MAP_OFFSET + cluster * 8)
            .map_err(self.io("write a map entry"))?;
        st.map[cluster as usize] = off;
        st.data_end = off + CLUSTER_SIZE;
        Ok(())
    }

    /// Makes every write so far durable, then records the durable data end in the header.
    pub fn flush(&self) -> Result<(), OverlayError> {
        let mut st = self.lock();
        if !st.unsynced {
            return Ok(());
        }
        self.file.sync_data().map_err(self.io("sync data"))?;
        if st.data_end != st.header.synced_end || st.header.boot_id != current_boot_id() {
            st.header.seq += 1;
            st.header.synced_end = st.data_end;
            st.header.boot_id = current_boot_id();
            self.file
                .write_all_at(&st.header.encode(), SLOT_SIZE * (st.header.seq & 1))
                .map_err(self.io("write the header"))?;
            self.file.sync_data().map_err(self.io("sync the header"))?;
        }
        st.unsynced = false;
        Ok(())
    }
}

impl Drop for OverlayFile {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!("{e}");
        }
    }
}

#[cfg(test)]
#[path = "overlay_tests.rs"]
mod tests;

//! The state the copy-on-write tracker shares with its fault thread (see [`super::cow`]): the
//! userfaultfd, the per-unit flags, the active snapshot and the staging pool, and how one unit
//! is captured for the snapshot.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use snapshot::{lock, MappedLayout, MemorySink};
use userfaultfd::Uffd;
use vm_memory::{Bytes, GuestAddress};

use super::cow_counters::FaultCounters;
use super::error::{CaptureError, CowError};
use super::progress::Progress;
use super::staging::{StagedUnit, StagingPool};
use devices::GuestMemoryMmap;

pub(super) const PAGE_SIZE: u64 = 4096;

/// Snapshot chunks per protection unit.
pub(super) const CHUNKS_PER_UNIT: u64 = 2;

/// The snapshot being copied, while there is one.
pub(super) struct ActiveCopy {
    pub(super) sink: Arc<dyn MemorySink>,
    pub(super) progress: Progress,
}

pub(super) struct Shared {
    pub(super) uffd: Uffd,
    pub(super) mem: GuestMemoryMmap,
    /// Chunk <-> guest and host addresses.
    pub(super) layout: MappedLayout,
    pub(super) chunk_count: u64,
    /// Per unit: copied into the active snapshot (or nothing to copy).
    pub(super) copied: Vec<Mutex<bool>>,
    /// Per unit: written since the last snapshot instant (its protection is lifted).
    pub(super) written: Vec<AtomicBool>,
    pub(super) active: Mutex<Option<ActiveCopy>>,
    pub(super) stop: AtomicBool,
    pub(super) pages_early: AtomicU64,
    /// The first error of the fault thread; the copier reports it.
    pub(super) error: Mutex<Option<Arc<CaptureError>>>,
    /// Units the fault thread copied out for the copier to write.
    pub(super) staging: StagingPool,
    /// What the faults of the active snapshot cost.
    pub(super) counters: FaultCounters,
}

/// What [`Shared::capture_unit`] did with a unit.
pub(super) enum Captured {
    /// Nothing to do: copied already, or no snapshot is copying.
    Nothing,
    /// Copied into the staging pool (`bytes`).
    Staged(u64),
    /// Written to the target (`bytes`).
    Written(u64),
}

impl Shared {
    /// The snapshot chunks of unit `unit`.
    pub(super) fn unit_chunks(&self, unit: u64) -> std::ops::Range<u64> {
        let first = unit * CHUNKS_PER_UNIT;
        first..(first + CHUNKS_PER_UNIT).min(self.chunk_count)
    }

    /// Guest address and length of unit `unit` (its chunks are contiguous in one region).
    pub(super) fn unit_guest_range(&self, unit: u64) -> Option<(u64, u64)> {
        let layout = self.layout.layout();
        let chunks = self.unit_chunks(unit);
        let (guest, _) = layout.chunk_guest_range(chunks.start)?;
        let len = chunks
            .map(|c| layout.chunk_guest_range(c).map_or(0, |(_, l)| l))
            .sum();
        Some((guest, len))
    }

    /// Host address and length of unit `unit`.
    pub(super) fn host_range(&self, unit: u64) -> Option<(u64, u64)> {
        let chunks = self.unit_chunks(unit);
        let (host, _) = self.layout.chunk_host_range(chunks.start)?;
        let len = chunks
            .map(|c| self.layout.chunk_host_range(c).map_or(0, |(_, l)| l))
            .sum();
        Some((host, len))
    }

    pub(super) fn unit_of_host(&self, host: u64) -> Option<u64> {
        self.layout
            .chunk_of_host_addr(host)
            .map(|c| c / CHUNKS_PER_UNIT)
    }

    pub(super) fn active(&self) -> Option<(Arc<dyn MemorySink>, Progress)> {
        lock(&self.active)
            .as_ref()
            .map(|a| (a.sink.clone(), a.progress.clone()))
    }

    /// Records the first error for the copier.
    pub(super) fn record_error(&self, e: CaptureError) {
        lock(&self.error).get_or_insert_with(|| Arc::new(e));
    }

    /// Reads unit `unit` of guest memory into `buf`.
    fn read_unit(&self, unit: u64, buf: &mut Vec<u8>) -> Result<u64, CaptureError> {
        let (guest, len) = self
            .unit_guest_range(unit)
            .ok_or(CowError::UnitOutside(unit))?;
        buf.resize(len as usize, 0);
        self.mem
            .read_slice(buf, GuestAddress(guest))
            .map_err(|source| CaptureError::ReadMemory {
                addr: guest,
                source,
            })?;
        Ok(len)
    }

    /// Writes the bytes of unit `unit` (as read at the instant) to `sink`.
    fn write_unit(
        &self,
        sink: &dyn MemorySink,
        unit: u64,
        data: &[u8],
    ) -> Result<(), CaptureError> {
        let chunk_size = self.layout.layout().chunk_size() as usize;
        for (i, chunk) in self.unit_chunks(unit).enumerate() {
            let start = i * chunk_size;
            let end = (start + chunk_size).min(data.len());
            let part = data.get(start..end).ok_or(CowError::UnitOutside(unit))?;
            sink.write_chunk(chunk, part)?;
        }
        Ok(())
    }

    /// Captures unit `unit` for the active snapshot unless it is done: with `stage`, into a
    /// staging buffer if one is free; otherwise into `buf` and on to the target. Only the first
    /// capture of a unit counts; its lock's flag records it.
    pub(super) fn capture_unit(
        &self,
        unit: u64,
        buf: &mut Vec<u8>,
        stage: bool,
    ) -> Result<Captured, CaptureError> {
        let Some(slot) = self.copied.get(unit as usize) else {
            return Err(CowError::UnitOutside(unit).into());
        };
        let mut copied = lock(slot);
        if *copied {
            return Ok(Captured::Nothing);
        }
        let Some((sink, progress)) = self.active() else {
            *copied = true;
            return Ok(Captured::Nothing);
        };
        if stage {
            if let Some(mut data) = self.staging.take_buffer() {
                let len = match self.read_unit(unit, &mut data) {
                    Ok(len) => len,
                    Err(e) => {
                        self.staging.give_back(data);
                        return Err(e);
                    }
                };
                // Queued while the lock is held, so the copier's final drain (after it took
                // every unit's lock) finds it.
                self.staging.push(StagedUnit { unit, data });
                *copied = true;
                return Ok(Captured::Staged(len));
            }
        }
        let len = self.read_unit(unit, buf)?;
        *copied = true;
        if stage {
            // The fault path with no buffer free: the lock stays held until the bytes are in
            // the target, so that `end` waits for this copy.
            self.write_unit(&*sink, unit, buf)?;
            drop(copied);
        } else {
            // The copier: the bytes are its own now, so a writer need not wait for the I/O.
            // `end` runs on this same thread after this write.
            drop(copied);
            self.write_unit(&*sink, unit, buf)?;
        }
        progress.update(|s| s.bytes_written += len);
        Ok(Captured::Written(len))
    }

    /// Writes every staged unit to the active snapshot's target.
    pub(super) fn drain_staged(&self) -> Result<(), CaptureError> {
        while let Some(staged) = self.staging.pop() {
            let written = match self.active() {
                Some((sink, progress)) => {
                    let r = self.write_unit(&*sink, staged.unit, &staged.data);
                    if r.is_ok() {
                        progress.update(|s| s.bytes_written += staged.data.len() as u64);
                    }
                    r
                }
                None => Ok(()),
            };
            self.staging.give_back(staged.data);
            written?;
        }
        Ok(())
    }

    /// Lifts the protection of one page and wakes its writer.
    pub(super) fn lift_page(&self, page: u64) {
        if let Err(e) = self
            .uffd
            .remove_write_protection(page as *mut _, PAGE_SIZE as usize, true)
        {
            tracing::error!("cannot lift write-protection of page {page:#x}: {e}");
        }
    }

    pub(super) fn unprotect_all(&self) {
        for (host, len) in self.layout.host_regions() {
            let _ = self
                .uffd
                .remove_write_protection(host as *mut _, len as usize, true);
            let _ = self.uffd.unregister(host as *mut _, len as usize);
        }
    }
}

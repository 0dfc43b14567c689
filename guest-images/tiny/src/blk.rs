//! A polling virtio-blk driver over virtio-mmio: one split virtqueue, no interrupts.
//!
//! Requests use fixed "slots": slot `s` owns descriptors `3s` (header), `3s+1` (data) and
//! `3s+2` (status), a header, a status byte and a 64 KiB data buffer, so up to
//! `Blk::slots()` requests can be in flight. The driver asks the device not to interrupt
//! (`VIRTQ_AVAIL_F_NO_INTERRUPT`) and polls the used ring.

use crate::virtio_mmio::{reg, status, Mmio, DEVICE_ID_BLOCK, MAGIC};
use core::fmt;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

/// Largest queue used.
pub const QSIZE: usize = 64;
/// Request slots (bounded by the data buffers: 16 x 64 KiB).
pub const SLOTS: usize = 16;
/// Bytes per slot data buffer (the largest request).
pub const SLOT_BYTES: usize = 64 * 1024;
/// Used-ring polls without a completion after which a wait gives up (`BLK STALLED`): about a
/// minute of vCPU run time. Counted in polls, not TSC time, so that a paused or snapshotted
/// VM does not trip it.
pub const STALL_POLLS: u64 = 1 << 31;
/// Sector size of virtio-blk addressing.
pub const SECTOR: u64 = 512;
/// Queue memories (at most two devices are driven at once, e.g. by the hostile mode).
pub const QUEUE_MEMS: usize = 2;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_BLK_F_SIZE_MAX.
pub const F_SIZE_MAX: u64 = 1 << 1;
/// VIRTIO_BLK_F_SEG_MAX.
pub const F_SEG_MAX: u64 = 1 << 2;
/// VIRTIO_BLK_F_RO.
pub const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_BLK_SIZE.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// VIRTIO_BLK_F_FLUSH.
pub const F_FLUSH: u64 = 1 << 9;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const F_INDIRECT_DESC: u64 = 1 << 28;

/// VIRTIO_BLK_T_IN (read).
pub const T_IN: u32 = 0;
/// VIRTIO_BLK_T_OUT (write).
pub const T_OUT: u32 = 1;
/// VIRTIO_BLK_T_FLUSH.
pub const T_FLUSH: u32 = 4;
/// VIRTIO_BLK_T_GET_ID.
pub const T_GET_ID: u32 = 8;

/// VIRTIO_BLK_S_OK.
pub const S_OK: u8 = 0;
/// VIRTIO_BLK_S_IOERR.
pub const S_IOERR: u8 = 1;

/// VIRTQ_DESC_F_NEXT.
pub const DESC_NEXT: u16 = 1;
/// VIRTQ_DESC_F_WRITE (device writes the buffer).
pub const DESC_WRITE: u16 = 2;
/// VIRTQ_DESC_F_INDIRECT.
pub const DESC_INDIRECT: u16 = 4;

/// A split-virtqueue descriptor.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Desc {
    /// Guest-physical buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `DESC_*` flags.
    pub flags: u16,
    /// Next descriptor when `DESC_NEXT` is set.
    pub next: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C, align(4096))]
struct QueueMem {
    desc: [Desc; QSIZE],
    avail_flags: u16,
    avail_idx: u16,
    avail_ring: [u16; QSIZE],
    used_event: u16,
    _pad: [u8; 4096 - 16 * QSIZE - 6 - 2 * QSIZE],
    used_flags: u16,
    used_idx: u16,
    used_ring: [UsedElem; QSIZE],
    avail_event: u16,
}

/// The virtio-blk request header.
#[repr(C)]
#[derive(Clone, Copy)]
struct ReqHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

#[repr(C, align(4096))]
struct DataBuffers([[u8; SLOT_BYTES]; SLOTS]);

const EMPTY_QUEUE: QueueMem = QueueMem {
    desc: [Desc {
        addr: 0,
        len: 0,
        flags: 0,
        next: 0,
    }; QSIZE],
    avail_flags: 0,
    avail_idx: 0,
    avail_ring: [0; QSIZE],
    used_event: 0,
    _pad: [0; 4096 - 16 * QSIZE - 6 - 2 * QSIZE],
    used_flags: 0,
    used_idx: 0,
    used_ring: [UsedElem { id: 0, len: 0 }; QSIZE],
    avail_event: 0,
};

static mut QUEUES: [QueueMem; QUEUE_MEMS] = [EMPTY_QUEUE, EMPTY_QUEUE];
static mut HEADERS: [[ReqHeader; SLOTS]; QUEUE_MEMS] = [[ReqHeader {
    kind: 0,
    reserved: 0,
    sector: 0,
}; SLOTS]; QUEUE_MEMS];
static mut STATUS_BYTES: [[u8; SLOTS]; QUEUE_MEMS] = [[0; SLOTS]; QUEUE_MEMS];
static mut DATA: DataBuffers = DataBuffers([[0; SLOT_BYTES]; SLOTS]);

/// What went wrong while bringing a virtio-blk device up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// No virtio device answers at this address.
    NoDevice,
    /// The device is not a block device.
    NotBlock(u32),
    /// Legacy (version 1) register layout; only modern devices are driven.
    Legacy(u32),
    /// The device did not acknowledge a reset.
    ResetTimeout,
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// The device cleared FEATURES_OK.
    FeaturesRejected,
    /// Queue 0 is missing or already live.
    QueueUnavailable,
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlkError::NoDevice => write!(f, "no virtio device"),
            BlkError::NotBlock(id) => write!(f, "device id {id} is not virtio-blk"),
            BlkError::Legacy(v) => write!(f, "virtio-mmio version {v} is not modern"),
            BlkError::ResetTimeout => write!(f, "device did not acknowledge reset"),
            BlkError::NoVersion1 => write!(f, "device does not offer VIRTIO_F_VERSION_1"),
            BlkError::FeaturesRejected => write!(f, "device rejected the features"),
            BlkError::QueueUnavailable => write!(f, "queue 0 is unavailable"),
        }
    }
}

/// A completed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Slot (or, for raw chains, the head descriptor index).
    pub id: u32,
    /// Bytes the device reports it wrote.
    pub len: u32,
}

/// A driven virtio-blk device.
pub struct Blk {
    mmio: Mmio,
    qm: usize,
    qsize: u16,
    avail_idx: u16,
    used_seen: u16,
    features: u64,
    capacity: u64,
    max_request: usize,
    free: u32,
    slots: usize,
}

impl Blk {
    /// Resets and initialises the device at `mmio` with queue memory `qm` (< QUEUE_MEMS),
    /// negotiating VERSION_1 plus FLUSH, RO, BLK_SIZE, SIZE_MAX, SEG_MAX and `extra` when offered.
    pub fn init(mmio: Mmio, qm: usize, extra: u64) -> Result<Blk, BlkError> {
        Self::init_sized(mmio, qm, extra, QSIZE)
    }

    /// `init` with a queue of at most `limit` entries (the largest power of two that the
    /// device and `QSIZE` allow).
    pub fn init_sized(mmio: Mmio, qm: usize, extra: u64, limit: usize) -> Result<Blk, BlkError> {
        assert!(qm < QUEUE_MEMS, "queue memory index out of range");
        if mmio.read(reg::MAGIC) != MAGIC {
            return Err(BlkError::NoDevice);
        }
        let version = mmio.read(reg::VERSION);
        if version != 2 {
            return Err(BlkError::Legacy(version));
        }
        let id = mmio.read(reg::DEVICE_ID);
        if id != DEVICE_ID_BLOCK {
            return Err(BlkError::NotBlock(id));
        }
        if !mmio.reset() {
            return Err(BlkError::ResetTimeout);
        }
        mmio.write(reg::STATUS, status::ACKNOWLEDGE);
        mmio.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        mmio.write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(mmio.read(reg::DEVICE_FEATURES));
        mmio.write(reg::DEVICE_FEATURES_SEL, 1);
        let offered = lo | (u64::from(mmio.read(reg::DEVICE_FEATURES)) << 32);
        if offered & F_VERSION_1 == 0 {
            mmio.write(reg::STATUS, status::FAILED);
            return Err(BlkError::NoVersion1);
        }
        let features =
            offered & (F_VERSION_1 | F_FLUSH | F_RO | F_BLK_SIZE | F_SIZE_MAX | F_SEG_MAX | extra);
        mmio.write(reg::DRIVER_FEATURES_SEL, 0);
        mmio.write(reg::DRIVER_FEATURES, features as u32);
        mmio.write(reg::DRIVER_FEATURES_SEL, 1);
        mmio.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
        let st = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        mmio.write(reg::STATUS, st);
        if mmio.status() & status::FEATURES_OK == 0 {
            mmio.write(reg::STATUS, status::FAILED);
            return Err(BlkError::FeaturesRejected);
        }
        mmio.write(reg::QUEUE_SEL, 0);
        let max = mmio.read(reg::QUEUE_NUM_MAX) as usize;
        if max < 2 || mmio.read(reg::QUEUE_READY) != 0 {
            mmio.write(reg::STATUS, status::FAILED);
            return Err(BlkError::QueueUnavailable);
        }
        let mut qsize = 1usize;
        while qsize * 2 <= max.min(QSIZE).min(limit.max(2)) {
            qsize *= 2;
        }
        // SAFETY: `qm` is in bounds; the device is reset, so nothing else reads or writes this
        // queue memory until it is handed over below.
        let q = unsafe { addr_of_mut!(QUEUES[qm]) };
        // SAFETY: as above; writing a fresh value resets indexes and rings.
        unsafe { write_volatile(q, EMPTY_QUEUE) };
        // SAFETY: as above.
        unsafe { write_volatile(addr_of_mut!((*q).avail_flags), 1) }; // VIRTQ_AVAIL_F_NO_INTERRUPT
        mmio.write(reg::QUEUE_NUM, qsize as u32);
        // SAFETY: only addresses are taken.
        let (d, a, u) = unsafe {
            (
                addr_of!((*q).desc) as u64,
                addr_of!((*q).avail_flags) as u64,
                addr_of!((*q).used_flags) as u64,
            )
        };
        mmio.write64(reg::QUEUE_DESC_LOW, d);
        mmio.write64(reg::QUEUE_DRIVER_LOW, a);
        mmio.write64(reg::QUEUE_DEVICE_LOW, u);
        fence(Ordering::SeqCst);
        mmio.write(reg::QUEUE_READY, 1);
        mmio.write(reg::STATUS, st | status::DRIVER_OK);
        let capacity = mmio.config64(0).saturating_mul(SECTOR);
        let mut max_request = SLOT_BYTES;
        if features & F_SIZE_MAX != 0 {
            let size_max = mmio.config32(8) as usize;
            if size_max >= SECTOR as usize {
                max_request = max_request.min(size_max / SECTOR as usize * SECTOR as usize);
            }
        }
        let slots = (qsize / 3).min(SLOTS);
        Ok(Blk {
            mmio,
            qm,
            qsize: qsize as u16,
            avail_idx: 0,
            used_seen: 0,
            features,
            capacity,
            max_request,
            free: (1u32 << slots) - 1,
            slots,
        })
    }

    /// The transport.
    pub fn mmio(&self) -> Mmio {
        self.mmio
    }

    /// Disk size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Queue size in use.
    pub fn qsize(&self) -> u16 {
        self.qsize
    }

    /// Request slots (maximum requests in flight).
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Largest request data length (64 KiB unless the device's size_max is smaller).
    pub fn max_request(&self) -> usize {
        self.max_request
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.slots - self.free.count_ones() as usize
    }

    /// Takes a free slot.
    pub fn alloc_slot(&mut self) -> Option<usize> {
        if self.free == 0 {
            return None;
        }
        let s = self.free.trailing_zeros() as usize;
        self.free &= !(1 << s);
        Some(s)
    }

    /// Returns a slot taken by `alloc_slot` whose request completed (or was never posted).
    pub fn free_slot(&mut self, slot: usize) {
        self.free |= 1 << slot;
    }

    /// The data buffer of `slot`. Only touch it while no request of that slot is in flight.
    #[allow(clippy::mut_from_ref)]
    pub fn data(&self, slot: usize) -> &mut [u8] {
        assert!(slot < SLOTS, "slot out of range");
        // SAFETY: slots are handed out once (`alloc_slot`), the device only accesses a slot's
        // buffer between `submit` and the completion, and the guest is single-threaded, so
        // the returned slice is the only live reference while the caller uses it.
        unsafe { &mut *addr_of_mut!(DATA.0[slot]) }
    }

    /// Guest-physical address of `slot`'s data buffer.
    pub fn data_addr(&self, slot: usize) -> u64 {
        // SAFETY: only the address is taken.
        unsafe { addr_of!(DATA.0[slot]) as u64 }
    }

    /// Guest-physical address of `slot`'s request header.
    pub fn header_addr(&self, slot: usize) -> u64 {
        // SAFETY: only the address is taken.
        unsafe { addr_of!(HEADERS[self.qm][slot]) as u64 }
    }

    /// Guest-physical address of `slot`'s status byte.
    pub fn status_addr(&self, slot: usize) -> u64 {
        // SAFETY: only the address is taken.
        unsafe { addr_of!(STATUS_BYTES[self.qm][slot]) as u64 }
    }

    /// Writes the request header of `slot`.
    pub fn set_header(&mut self, slot: usize, kind: u32, sector: u64) {
        // SAFETY: the slot is not in flight (caller contract), so the device does not read it.
        unsafe {
            write_volatile(
                addr_of_mut!(HEADERS[self.qm][slot]),
                ReqHeader {
                    kind,
                    reserved: 0,
                    sector,
                },
            )
        }
    }

    /// Sets `slot`'s status byte (e.g. to a marker the device must overwrite).
    pub fn set_status(&mut self, slot: usize, value: u8) {
        // SAFETY: as in `set_header`.
        unsafe { write_volatile(addr_of_mut!(STATUS_BYTES[self.qm][slot]), value) }
    }

    /// Reads `slot`'s status byte.
    pub fn status_of(&self, slot: usize) -> u8 {
        // SAFETY: a plain volatile read of a byte the device may have written.
        unsafe { read_volatile(addr_of!(STATUS_BYTES[self.qm][slot])) }
    }

    /// Writes descriptor `index` of the table (raw access, also for malformed chains).
    pub fn set_desc(&mut self, index: usize, desc: Desc) {
        assert!(index < QSIZE, "descriptor index out of range");
        // SAFETY: the descriptor is not part of a chain the device is processing (caller
        // contract); the index is in bounds.
        unsafe { write_volatile(addr_of_mut!(QUEUES[self.qm].desc[index]), desc) }
    }

    /// Makes the chain starting at `head` available (does not notify).
    pub fn push_avail(&mut self, head: u16) {
        let i = usize::from(self.avail_idx % self.qsize);
        // SAFETY: the driver owns the avail ring; the device reads an entry only after the
        // index store below, which the fence orders after this store.
        unsafe {
            write_volatile(addr_of_mut!(QUEUES[self.qm].avail_ring[i]), head);
            fence(Ordering::SeqCst);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            write_volatile(addr_of_mut!(QUEUES[self.qm].avail_idx), self.avail_idx);
        }
    }

    /// Publishes `idx` as the available index as is (also a bogus one; later `push_avail`s
    /// continue from it).
    pub fn set_avail_idx(&mut self, idx: u16) {
        fence(Ordering::SeqCst);
        self.avail_idx = idx;
        // SAFETY: the driver owns the available index.
        unsafe { write_volatile(addr_of_mut!(QUEUES[self.qm].avail_idx), idx) }
    }

    /// The available index last published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Tells the device that queue 0 has new buffers.
    pub fn notify(&self) {
        fence(Ordering::SeqCst);
        self.mmio.write(reg::QUEUE_NOTIFY, 0);
    }

    /// Posts a request on `slot` (descriptors 3s..3s+2): `len` data bytes at `sector`.
    /// `T_FLUSH` posts header + status only. Does not notify.
    pub fn submit(&mut self, slot: usize, kind: u32, sector: u64, len: usize) {
        assert!(slot < self.slots && len <= SLOT_BYTES, "bad slot or length");
        let d0 = (3 * slot) as u16;
        self.set_header(slot, kind, sector);
        self.set_status(slot, 0xFF);
        let status_desc = Desc {
            addr: self.status_addr(slot),
            len: 1,
            flags: DESC_WRITE,
            next: 0,
        };
        let header = Desc {
            addr: self.header_addr(slot),
            len: 16,
            flags: DESC_NEXT,
            next: d0 + 1,
        };
        if kind == T_FLUSH || len == 0 {
            self.set_desc(
                usize::from(d0),
                Desc {
                    next: d0 + 2,
                    ..header
                },
            );
        } else {
            let dflags = if kind == T_OUT {
                DESC_NEXT
            } else {
                DESC_NEXT | DESC_WRITE
            };
            self.set_desc(usize::from(d0), header);
            let data = Desc {
                addr: self.data_addr(slot),
                len: len as u32,
                flags: dflags,
                next: d0 + 2,
            };
            self.set_desc(usize::from(d0) + 1, data);
        }
        self.set_desc(usize::from(d0) + 2, status_desc);
        self.push_avail(d0);
    }

    /// Takes the next used-ring entry, if any (raw: `id` is the head descriptor index).
    pub fn poll_used(&mut self) -> Option<Completion> {
        // SAFETY: the used ring is written by the device; volatile reads see its stores, and
        // the fence keeps the entry read after the index read.
        unsafe {
            let idx = read_volatile(addr_of!(QUEUES[self.qm].used_idx));
            if idx == self.used_seen {
                return None;
            }
            fence(Ordering::SeqCst);
            let i = usize::from(self.used_seen % self.qsize);
            let e = read_volatile(addr_of!(QUEUES[self.qm].used_ring[i]));
            self.used_seen = self.used_seen.wrapping_add(1);
            Some(Completion {
                id: e.id,
                len: e.len,
            })
        }
    }

    /// Waits for the next completion of a slot request; returns `(slot, status)`.
    /// Faults (with a message) if the device enters NEEDS_RESET, returns a foreign id, or
    /// stays silent for `STALL_POLLS` polls.
    pub fn wait(&mut self) -> (usize, u8) {
        let mut spins = 0u64;
        loop {
            if let Some(c) = self.poll_used() {
                let slot = (c.id / 3) as usize;
                if c.id % 3 != 0 || slot >= self.slots {
                    crate::gprintln!("BLK BAD-USED id={} len={}", c.id, c.len);
                    crate::fault();
                }
                return (slot, self.status_of(slot));
            }
            spins += 1;
            if spins % (1 << 20) == 0 && self.mmio.status() & status::NEEDS_RESET != 0 {
                crate::gprintln!("BLK NEEDS-RESET base={:#x}", self.mmio.base());
                crate::fault();
            }
            if spins == STALL_POLLS {
                crate::gprintln!(
                    "BLK STALLED base={:#x} in_flight={}",
                    self.mmio.base(),
                    self.in_flight()
                );
                crate::fault();
            }
            core::hint::spin_loop();
        }
    }

    /// One synchronous request on a free slot; returns its status. The data (for writes) must
    /// already be in `data(slot)` where `slot` is the slot passed in.
    pub fn io_on(&mut self, slot: usize, kind: u32, sector: u64, len: usize) -> u8 {
        self.submit(slot, kind, sector, len);
        self.notify();
        loop {
            let (s, st) = self.wait();
            if s == slot {
                return st;
            }
        }
    }

    /// Writes `VIRTIO_BLK_T_FLUSH` and waits for it; returns its status (2 = unsupported,
    /// also reported without asking when FLUSH was not negotiated).
    pub fn flush(&mut self) -> u8 {
        if self.features & F_FLUSH == 0 {
            return 2;
        }
        let slot = self.alloc_slot().expect("flush needs a free slot");
        let st = self.io_on(slot, T_FLUSH, 0, 0);
        self.free_slot(slot);
        st
    }

    /// Runs `n` requests with up to `slots()` in flight. `prepare(op, buf)` fills the slot
    /// buffer (for writes) and returns `(kind, sector, len)`; `complete(op, status, buf)` sees
    /// the finished request and its buffer.
    pub fn pipeline(
        &mut self,
        n: u64,
        mut prepare: impl FnMut(u64, &mut [u8]) -> (u32, u64, usize),
        mut complete: impl FnMut(u64, u8, &[u8]),
    ) {
        let mut ops = [(0u64, 0usize); SLOTS];
        let mut next = 0u64;
        let mut done = 0u64;
        while done < n {
            let mut posted = false;
            while next < n {
                let Some(slot) = self.alloc_slot() else { break };
                let (kind, sector, len) = prepare(next, self.data(slot));
                ops[slot] = (next, len);
                self.submit(slot, kind, sector, len);
                next += 1;
                posted = true;
            }
            if posted {
                self.notify();
            }
            let (slot, st) = self.wait();
            let (op, len) = ops[slot];
            complete(op, st, &self.data(slot)[..len]);
            self.free_slot(slot);
            done += 1;
        }
    }
}

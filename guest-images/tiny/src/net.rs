//! A polling virtio-net driver over virtio-mmio: an RX and a TX split virtqueue of [`Q`]
//! entries, fixed 1536-byte buffers, no interrupts (`VIRTQ_AVAIL_F_NO_INTERRUPT`).
//!
//! RX descriptor `i` always points at RX buffer `i`; TX descriptor `i` at TX buffer `i`. The
//! raw-chain helpers let the hostile mode post descriptor chains of its own making.

use crate::blk::{Desc, DESC_NEXT, DESC_WRITE};
use crate::virtio_mmio::{reg, status, Mmio, MAGIC};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

/// Entries per queue the driver uses (the device offers more).
pub const Q: usize = 128;
/// Bytes per buffer.
pub const BUF: usize = 1536;
/// The virtio-net header (virtio_net_hdr_v1).
pub const HDR: usize = 12;
/// Device id of virtio-net.
pub const DEVICE_ID_NET: u32 = 1;
/// VIRTIO_F_VERSION_1.
const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_NET_F_MAC.
const F_MAC: u64 = 1 << 5;
const RXQ: usize = 0;
const TXQ: usize = 1;

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; Q],
    avail_event: u16,
}

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct QMem {
    desc: [Desc; Q],
    avail_flags: u16,
    avail_idx: u16,
    avail_ring: [u16; Q],
    used_event: u16,
    used: Used,
}

const EMPTY: QMem = QMem {
    desc: [Desc {
        addr: 0,
        len: 0,
        flags: 0,
        next: 0,
    }; Q],
    avail_flags: 0,
    avail_idx: 0,
    avail_ring: [0; Q],
    used_event: 0,
    used: Used {
        flags: 0,
        idx: 0,
        ring: [UsedElem { id: 0, len: 0 }; Q],
        avail_event: 0,
    },
};

#[repr(C, align(4096))]
struct Buffers([[u8; BUF]; Q]);

static mut QUEUES: [QMem; 2] = [EMPTY, EMPTY];
static mut RX_BUFS: Buffers = Buffers([[0; BUF]; Q]);
static mut TX_BUFS: Buffers = Buffers([[0; BUF]; Q]);

fn qm(i: usize) -> *mut QMem {
    // SAFETY: only the address is taken; `i` < 2 at every call site.
    unsafe { addr_of_mut!(QUEUES[i]) }
}

/// The guest-physical address of RX buffer `i` (identity-mapped).
pub fn rx_buf_addr(i: usize) -> u64 {
    // SAFETY: only the address is taken.
    unsafe { addr_of!(RX_BUFS.0[i % Q]) as u64 }
}

/// The guest-physical address of TX buffer `i`.
pub fn tx_buf_addr(i: usize) -> u64 {
    // SAFETY: only the address is taken.
    unsafe { addr_of!(TX_BUFS.0[i % Q]) as u64 }
}

/// A driven virtio-net device.
pub struct Net {
    mmio: Mmio,
    mac: [u8; 6],
    rx_seen: u16,
    rx_avail: u16,
    tx_avail: u16,
    tx_seen: u16,
    rx_unkicked: u16,
    tx_unkicked: u16,
}

impl Net {
    /// Resets and brings up the device at `mmio`; with `post_rx`, every RX buffer is posted.
    pub fn init(mmio: Mmio, post_rx: bool) -> Result<Net, &'static str> {
        if mmio.read(reg::MAGIC) != MAGIC || mmio.read(reg::VERSION) != 2 {
            return Err("not a modern virtio-mmio device");
        }
        if mmio.read(reg::DEVICE_ID) != DEVICE_ID_NET {
            return Err("not a virtio-net device");
        }
        if !mmio.reset() {
            return Err("device did not acknowledge reset");
        }
        mmio.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        mmio.write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(mmio.read(reg::DEVICE_FEATURES));
        mmio.write(reg::DEVICE_FEATURES_SEL, 1);
        let offered = lo | (u64::from(mmio.read(reg::DEVICE_FEATURES)) << 32);
        if offered & (F_VERSION_1 | F_MAC) != F_VERSION_1 | F_MAC {
            return Err("device lacks VERSION_1 or MAC");
        }
        let features = F_VERSION_1 | F_MAC;
        mmio.write(reg::DRIVER_FEATURES_SEL, 0);
        mmio.write(reg::DRIVER_FEATURES, features as u32);
        mmio.write(reg::DRIVER_FEATURES_SEL, 1);
        mmio.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
        let st = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        mmio.write(reg::STATUS, st);
        if mmio.status() & status::FEATURES_OK == 0 {
            return Err("device rejected the features");
        }
        for q in [RXQ, TXQ] {
            mmio.write(reg::QUEUE_SEL, q as u32);
            if (mmio.read(reg::QUEUE_NUM_MAX) as usize) < Q {
                return Err("queue too small");
            }
            let m = qm(q);
            // SAFETY: the device is reset, so it does not touch this queue memory.
            unsafe {
                write_volatile(m, EMPTY);
                write_volatile(addr_of_mut!((*m).avail_flags), 1);
            }
            for i in 0..Q {
                let d = if q == RXQ {
                    Desc {
                        addr: rx_buf_addr(i),
                        len: BUF as u32,
                        flags: DESC_WRITE,
                        next: 0,
                    }
                } else {
                    Desc {
                        addr: tx_buf_addr(i),
                        len: 0,
                        flags: 0,
                        next: 0,
                    }
                };
                // SAFETY: as above; `i` < Q.
                unsafe { write_volatile(addr_of_mut!((*m).desc[i]), d) };
            }
            mmio.write(reg::QUEUE_NUM, Q as u32);
            // SAFETY: only addresses are taken.
            let (d, a, u) = unsafe {
                (
                    addr_of!((*m).desc) as u64,
                    addr_of!((*m).avail_flags) as u64,
                    addr_of!((*m).used) as u64,
                )
            };
            mmio.write64(reg::QUEUE_DESC_LOW, d);
            mmio.write64(reg::QUEUE_DRIVER_LOW, a);
            mmio.write64(reg::QUEUE_DEVICE_LOW, u);
            mmio.write(reg::QUEUE_READY, 1);
        }
        fence(Ordering::SeqCst);
        mmio.write(reg::STATUS, st | status::DRIVER_OK);
        let mut mac = [0u8; 6];
        let w0 = mmio.config32(0).to_le_bytes();
        let w1 = mmio.config32(4).to_le_bytes();
        mac[..4].copy_from_slice(&w0);
        mac[4..].copy_from_slice(&w1[..2]);
        let mut net = Net {
            mmio,
            mac,
            rx_seen: 0,
            rx_avail: 0,
            tx_avail: 0,
            tx_seen: 0,
            rx_unkicked: 0,
            tx_unkicked: 0,
        };
        if post_rx {
            for i in 0..Q {
                net.post_rx(i as u16);
            }
            net.notify(RXQ);
        }
        Ok(net)
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The transport.
    pub fn mmio(&self) -> Mmio {
        self.mmio
    }

    /// Whether the device reports DEVICE_NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.mmio.status() & status::NEEDS_RESET != 0
    }

    fn notify(&self, q: usize) {
        fence(Ordering::SeqCst);
        self.mmio.write(reg::QUEUE_NOTIFY, q as u32);
    }

    fn push_avail(&mut self, q: usize, head: u16) {
        let m = qm(q);
        let idx = if q == RXQ {
            &mut self.rx_avail
        } else {
            &mut self.tx_avail
        };
        // SAFETY: the driver owns the available ring; volatile so the device sees the writes
        // in order (the fence orders the entry before the index).
        unsafe {
            write_volatile(addr_of_mut!((*m).avail_ring[*idx as usize % Q]), head);
            fence(Ordering::SeqCst);
            *idx = idx.wrapping_add(1);
            write_volatile(addr_of_mut!((*m).avail_idx), *idx);
        }
    }

    fn used_idx(q: usize) -> u16 {
        // SAFETY: the device writes the used ring; volatile read of its index.
        unsafe { read_volatile(addr_of!((*qm(q)).used.idx)) }
    }

    fn post_rx(&mut self, i: u16) {
        self.push_avail(RXQ, i);
    }

    /// The next received frame (without the virtio-net header), copied into `out`; returns its
    /// length. Its buffer is posted again at once.
    pub fn recv(&mut self, out: &mut [u8]) -> Option<usize> {
        if Self::used_idx(RXQ) == self.rx_seen {
            return None;
        }
        fence(Ordering::SeqCst);
        // SAFETY: the entry below the used index was written by the device.
        let e = unsafe { read_volatile(addr_of!((*qm(RXQ)).used.ring[self.rx_seen as usize % Q])) };
        self.rx_seen = self.rx_seen.wrapping_add(1);
        let id = e.id as usize % Q;
        let len = (e.len as usize).clamp(HDR, BUF) - HDR;
        let n = len.min(out.len());
        // SAFETY: the device is done with buffer `id` (it is in the used ring).
        let buf = unsafe { &*addr_of!(RX_BUFS.0[id]) };
        out[..n].copy_from_slice(&buf[HDR..HDR + n]);
        self.post_rx(id as u16);
        self.rx_unkicked += 1;
        if self.rx_unkicked >= (Q / 4) as u16 {
            self.flush();
        }
        Some(n)
    }

    /// Tells the device about RX buffers posted and TX frames queued since the last call
    /// (one notification per queue for a batch).
    pub fn flush(&mut self) {
        if self.rx_unkicked > 0 {
            self.rx_unkicked = 0;
            self.notify(RXQ);
        }
        if self.tx_unkicked > 0 {
            self.tx_unkicked = 0;
            self.notify(TXQ);
        }
    }

    fn reclaim_tx(&mut self) {
        self.tx_seen = Self::used_idx(TXQ);
    }

    /// Queues `frame` for sending (the device is told at the next [`Net::flush`], or once a
    /// quarter of the ring is queued); false when the TX ring is full.
    pub fn send(&mut self, frame: &[u8]) -> bool {
        self.reclaim_tx();
        if self.tx_avail.wrapping_sub(self.tx_seen) as usize >= Q || frame.len() + HDR > BUF {
            return false;
        }
        let slot = self.tx_avail as usize % Q;
        // SAFETY: slot `slot` is not in flight (checked against the used index above).
        unsafe {
            let b = &mut *addr_of_mut!(TX_BUFS.0[slot]);
            b[..HDR].fill(0);
            b[HDR..HDR + frame.len()].copy_from_slice(frame);
            write_volatile(
                addr_of_mut!((*qm(TXQ)).desc[slot]),
                Desc {
                    addr: tx_buf_addr(slot),
                    len: (HDR + frame.len()) as u32,
                    flags: 0,
                    next: 0,
                },
            );
        }
        self.push_avail(TXQ, slot as u16);
        self.tx_unkicked += 1;
        if self.tx_unkicked >= (Q / 4) as u16 {
            self.flush();
        }
        true
    }

    /// Hostile: writes `chain` as descriptors 0.. of queue `q` (0 RX, 1 TX), links them in
    /// order unless `raw`, and makes descriptor 0 available.
    pub fn post_raw(&mut self, q: usize, chain: &[Desc], raw: bool) {
        let m = qm(q);
        for (i, d) in chain.iter().enumerate() {
            let mut d = *d;
            if !raw && i + 1 < chain.len() {
                d.flags |= DESC_NEXT;
                d.next = (i + 1) as u16;
            }
            // SAFETY: the hostile mode owns the rings; `i` < Q.
            unsafe { write_volatile(addr_of_mut!((*m).desc[i % Q]), d) };
        }
        self.push_avail(q, 0);
        self.notify(q);
    }
}

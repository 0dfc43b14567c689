//! One virtio-blk request: checking the guest's descriptor chain and carrying it out.
//!
//! A chain is `header (16 readable bytes) | data | status (1 writable byte)`, framed over any
//! number of descriptors. Every address and length comes from the guest and is checked before
//! use. A chain whose status byte can be written gets an error status for any other fault;
//! a chain without a usable status byte (or that loops, or runs past the queue) cannot be
//! answered, and the device asks for a reset instead.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::config::{MAX_ID_LEN, SECTOR_SIZE};
use super::disk::{Disk, DiskError};
use crate::GuestMemoryMmap;

/// Largest bounce buffer one transfer step uses.
const CHUNK: usize = 1 << 20;

/// Why a chain could not even be answered with a status byte.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain has no descriptor that can be read (bad head index or table address).
    #[error("descriptor chain {0} is empty or unreadable")]
    Empty(u16),
    /// The chain loops, is longer than the queue, or links to a missing descriptor.
    #[error("descriptor chain {0} loops or is longer than the queue")]
    Unterminated(u16),
    /// The last descriptor is not a writable buffer in guest memory.
    #[error("descriptor chain {0} has no writable status byte")]
    NoStatus(u16),
    /// The data is not available (a damaged chunk of a disk hydrating from a backup point):
    /// the request is held, never answered, and the VM is being stopped.
    #[error("descriptor chain {0} is held: {1}")]
    Held(u16, String),
}

/// Outcome counters of handled requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestCounters {
    /// Requests completed with OK.
    pub ok: u64,
    /// Requests completed with IOERR.
    pub ioerr: u64,
    /// Requests completed with UNSUPP.
    pub unsupported: u64,
    /// Data bytes read from the disk by completed read requests.
    pub read_bytes: u64,
    /// Data bytes written to the disk by completed write requests.
    pub written_bytes: u64,
}

impl RequestCounters {
    /// Counts one answered request.
    pub fn record(&mut self, handled: &Handled) {
        match u32::from(handled.status) {
            VIRTIO_BLK_S_OK => self.ok += 1,
            VIRTIO_BLK_S_IOERR => self.ioerr += 1,
            VIRTIO_BLK_S_UNSUPP => self.unsupported += 1,
            _ => {}
        }
        match handled.transfer {
            Transfer::None => {}
            Transfer::Read(n) => self.read_bytes += n,
            Transfer::Written(n) => self.written_bytes += n,
        }
    }
}

/// The disk data a completed request moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transfer {
    /// None (a failed request, a flush, an id).
    None,
    /// This many bytes read from the disk.
    Read(u64),
    /// This many bytes written to the disk.
    Written(u64),
}

/// An answered request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handled {
    /// Bytes written into the chain (for the used ring), the status byte included.
    pub used_len: u32,
    /// The status byte reported to the guest.
    pub status: u8,
    /// The disk data it moved.
    pub transfer: Transfer,
}

/// A run of guest memory taken from one descriptor.
type Segment = (GuestAddress, usize);

/// Copies between a list of guest segments and host buffers, front to back.
struct Segments<'a> {
    mem: &'a GuestMemoryMmap,
    list: Vec<Segment>,
    idx: usize,
    off: usize,
}

impl<'a> Segments<'a> {
    fn new(mem: &'a GuestMemoryMmap, list: Vec<Segment>) -> Self {
        Self {
            mem,
            list,
            idx: 0,
            off: 0,
        }
    }

    fn total(&self) -> usize {
        self.list.iter().map(|s| s.1).sum()
    }

    /// Calls `f(guest_address, host_range)` for the next `len` bytes.
    fn walk(
        &mut self,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> bool,
    ) -> bool {
        let mut done = 0;
        while done < len {
            let Some(&(addr, seg_len)) = self.list.get(self.idx) else {
                return false;
            };
            let n = (seg_len - self.off).min(len - done);
            if !f(addr.unchecked_add(self.off as u64), done..done + n) {
                return false;
            }
            done += n;
            self.off += n;
            if self.off == seg_len {
                self.idx += 1;
                self.off = 0;
            }
        }
        true
    }

    fn read_into(&mut self, buf: &mut [u8]) -> bool {
        let mem = self.mem;
        self.walk(buf.len(), |a, r| mem.read_slice(&mut buf[r], a).is_ok())
    }

    fn write_from(&mut self, buf: &[u8]) -> bool {
        let mem = self.mem;
        self.walk(buf.len(), |a, r| mem.write_slice(&buf[r], a).is_ok())
    }
}

/// Handles one chain: checks it, serves it, writes the status byte. Returns the number of
/// bytes written into the chain (for the used ring), the status it reported and the disk data
/// it moved.
pub fn handle_chain<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    disk: &Disk,
    id: &str,
) -> Result<Handled, RequestError>
where
    M: Deref<Target = GuestMemoryMmap>,
{
    let head = chain.head_index();
    let descs: Vec<_> = chain.collect();
    let last = descs.last().ok_or(RequestError::Empty(head))?;
    if last.has_next() {
        return Err(RequestError::Unterminated(head));
    }
    if !last.is_write_only() || last.len() == 0 {
        return Err(RequestError::NoStatus(head));
    }
    let status_addr = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .filter(|&a| mem.check_range(a, 1, Permissions::Write))
        .ok_or(RequestError::NoStatus(head))?;

    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut framing_ok = true;
    for d in &descs {
        let seg = (d.addr(), d.len() as usize);
        let access = if d.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(seg.0, seg.1, access) {
            framing_ok = false;
        }
        if d.is_write_only() {
            writable.push(seg);
        } else if writable.is_empty() {
            readable.push(seg);
        } else {
            framing_ok = false; // a readable buffer after a writable one
        }
    }
    // The status byte is not data.
    if let Some(seg) = writable.last_mut() {
        seg.1 -= 1;
    }

    let (status, written, transfer) = if framing_ok {
        serve(
            disk,
            id,
            Segments::new(mem, readable),
            Segments::new(mem, writable),
        )
        .map_err(|why| RequestError::Held(head, why))?
    } else {
        (VIRTIO_BLK_S_IOERR, 0, Transfer::None)
    };
    let status = status as u8;
    // Checked above: the status byte is inside guest memory.
    mem.write_obj(status, status_addr)
        .map_err(|_| RequestError::NoStatus(head))?;
    Ok(Handled {
        used_len: written.saturating_add(1),
        status,
        transfer,
    })
}

/// Serves a well-framed request; returns (status, data bytes written to the guest, disk data
/// moved), or why it must be held unanswered.
fn serve(
    disk: &Disk,
    id: &str,
    readable: Segments<'_>,
    writable: Segments<'_>,
) -> Result<(u32, u32, Transfer), String> {
    let held = std::cell::RefCell::new(None);
    let outcome = serve_inner(disk, id, readable, writable, &held);
    match held.into_inner() {
        Some(why) => Err(why),
        None => Ok(outcome),
    }
}

/// Notes in `held` why data could not be had, and says whether `r` succeeded.
fn disk_ok(r: Result<(), DiskError>, held: &std::cell::RefCell<Option<String>>) -> bool {
    match r {
        Ok(()) => true,
        Err(DiskError::Unavailable(why)) => {
            *held.borrow_mut() = Some(why);
            false
        }
        Err(_) => false,
    }
}

fn serve_inner(
    disk: &Disk,
    id: &str,
    mut readable: Segments<'_>,
    mut writable: Segments<'_>,
    held: &std::cell::RefCell<Option<String>>,
) -> (u32, u32, Transfer) {
    let mut header = [0u8; 16];
    if !readable.read_into(&mut header) {
        return (VIRTIO_BLK_S_IOERR, 0, Transfer::None);
    }
    let req_type = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    match req_type {
        VIRTIO_BLK_T_IN => {
            let len = writable.total();
            if readable.total() != header.len() {
                return (VIRTIO_BLK_S_IOERR, 0, Transfer::None); // data buffers the device would have to read
            }
            let Some(offset) = data_range(disk, sector, len) else {
                return (VIRTIO_BLK_S_IOERR, 0, Transfer::None);
            };
            let mut buf = vec![0u8; len.min(CHUNK)];
            let mut done = 0usize;
            while done < len {
                let n = (len - done).min(CHUNK);
                if !disk_ok(disk.read_at(offset + done as u64, &mut buf[..n]), held)
                    || !writable.write_from(&buf[..n])
                {
                    return (VIRTIO_BLK_S_IOERR, done as u32, Transfer::None);
                }
                done += n;
            }
            (VIRTIO_BLK_S_OK, len as u32, Transfer::Read(len as u64))
        }
        VIRTIO_BLK_T_OUT => {
            let len = readable.total() - header.len();
            if disk.readonly() || writable.total() != 0 {
                return (VIRTIO_BLK_S_IOERR, 0, Transfer::None);
            }
            let Some(offset) = data_range(disk, sector, len) else {
                return (VIRTIO_BLK_S_IOERR, 0, Transfer::None);
            };
            let mut buf = vec![0u8; len.min(CHUNK)];
            let mut done = 0usize;
            while done < len {
                let n = (len - done).min(CHUNK);
                if !readable.read_into(&mut buf[..n])
                    || !disk_ok(disk.write_at(offset + done as u64, &buf[..n]), held)
                {
                    return (VIRTIO_BLK_S_IOERR, 0, Transfer::None);
                }
                done += n;
            }
            (VIRTIO_BLK_S_OK, 0, Transfer::Written(len as u64))
        }
        VIRTIO_BLK_T_FLUSH => match disk.flush() {
            Ok(()) => (VIRTIO_BLK_S_OK, 0, Transfer::None),
            Err(e) => {
                tracing::warn!("virtio-blk flush failed: {e}");
                (VIRTIO_BLK_S_IOERR, 0, Transfer::None)
            }
        },
        VIRTIO_BLK_T_GET_ID => {
            let mut serial = [0u8; MAX_ID_LEN];
            let bytes = id.as_bytes();
            let n = bytes.len().min(MAX_ID_LEN);
            serial[..n].copy_from_slice(&bytes[..n]);
            let len = writable.total().min(MAX_ID_LEN);
            if !writable.write_from(&serial[..len]) {
                return (VIRTIO_BLK_S_IOERR, 0, Transfer::None);
            }
            (VIRTIO_BLK_S_OK, len as u32, Transfer::None)
        }
        _ => (VIRTIO_BLK_S_UNSUPP, 0, Transfer::None),
    }
}

/// The byte offset of a transfer of `len` bytes at `sector`, if it is whole sectors inside
/// the disk.
fn data_range(disk: &Disk, sector: u64, len: usize) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len as u64)?;
    (len as u64 % SECTOR_SIZE == 0 && end <= disk.size()).then_some(offset)
}

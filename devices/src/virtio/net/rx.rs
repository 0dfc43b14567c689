//! Receive: frames read from the tap are written, behind a zeroed virtio-net header, into the
//! guest's RX buffers. A frame waits in the device while the guest has no buffer posted; the
//! tap is watched edge-triggered, so the RX queue notification resumes reading.

use std::io::ErrorKind;

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::device::{Net, RX};
use super::{MIN_RX_BUFFER, NET_HDR_LEN};
use crate::virtio::VIRTIO_MMIO_INT_VRING;
use crate::GuestMemoryMmap;

/// Most frames moved per event-loop wakeup; the rest are rescheduled.
const BATCH: usize = 256;

/// Where one RX chain may be written: its segments, checked to lie in guest memory.
pub(super) fn writable_segments<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
) -> Result<Vec<(GuestAddress, usize)>, String>
where
    M: std::ops::Deref<Target = GuestMemoryMmap>,
{
    let head = chain.head_index();
    let descs: Vec<_> = chain.collect();
    let last = descs
        .last()
        .ok_or_else(|| format!("RX descriptor chain {head} is empty or unreadable"))?;
    if last.has_next() {
        return Err(format!(
            "RX descriptor chain {head} loops or is longer than the queue"
        ));
    }
    let mut segs = Vec::with_capacity(descs.len());
    for d in &descs {
        if !d.is_write_only() {
            return Err(format!(
                "RX descriptor chain {head} has a device-readable buffer"
            ));
        }
        let len = d.len() as usize;
        if !mem.check_range(d.addr(), len, Permissions::Write) {
            return Err(format!(
                "RX descriptor chain {head} points outside guest memory ({:#x}+{len})",
                d.addr().0
            ));
        }
        segs.push((d.addr(), len));
    }
    Ok(segs)
}

impl Net {
    /// Moves waiting frames from the tap into the guest's RX buffers.
    pub(crate) fn process_rx(&mut self) {
        let Some(active) = &self.active else { return };
        if self.broken {
            return;
        }
        let mem = active.mem.clone();
        let interrupt = active.interrupt.clone();
        let mut used_any = false;
        let mut failure = None;
        let mut more = true;
        for _ in 0..BATCH {
            let len = match self.rx_pending.take() {
                Some(n) => n,
                None => match self.gate.tap().read_frame(&mut self.rx_buf[NET_HDR_LEN..]) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        more = false;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!("virtio-net {}: tap read: {e}", self.id);
                        more = false;
                        break;
                    }
                },
            };
            let queue = &mut self.queues[RX];
            let chain = match queue.iter(&mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    failure = Some(format!("bad RX available ring: {e}"));
                    break;
                }
            };
            let Some(chain) = chain else {
                // No buffer: keep the frame until the driver posts one.
                self.rx_pending = Some(len);
                break;
            };
            let head = chain.head_index();
            let segs = match writable_segments(chain, &mem) {
                Ok(s) => s,
                Err(why) => {
                    failure = Some(why);
                    break;
                }
            };
            let capacity: usize = segs.iter().map(|s| s.1).fold(0, usize::saturating_add);
            let total = NET_HDR_LEN + len;
            if capacity < total {
                if capacity < MIN_RX_BUFFER {
                    failure = Some(format!(
                        "RX buffer {head} holds {capacity} bytes, less than the {MIN_RX_BUFFER} a driver must post"
                    ));
                    break;
                }
                // A frame beyond what the driver must accept: drop it, keep the buffer.
                self.stats.rx_dropped += 1;
                queue.go_to_previous_position();
                continue;
            }
            // virtio_net_hdr_v1: no flags, no GSO, num_buffers = 1.
            self.rx_buf[..NET_HDR_LEN].fill(0);
            self.rx_buf[10] = 1;
            let mut done = 0;
            for (addr, seg_len) in segs {
                let n = seg_len.min(total - done);
                if n == 0 {
                    break;
                }
                if mem.write_slice(&self.rx_buf[done..done + n], addr).is_err() {
                    failure = Some(format!("cannot write RX buffer {head} at {:#x}", addr.0));
                    break;
                }
                done += n;
            }
            if failure.is_some() {
                break;
            }
            if let Err(e) = queue.add_used(&mem, head, total as u32) {
                failure = Some(format!("cannot complete RX chain {head}: {e}"));
                break;
            }
            used_any = true;
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += len as u64;
        }
        let queue = &mut self.queues[RX];
        if used_any && queue.needs_notification(&mem).unwrap_or(true) {
            interrupt.trigger(VIRTIO_MMIO_INT_VRING);
        }
        if let Some(why) = failure {
            self.fail(why);
        } else if more && self.rx_pending.is_none() {
            // The batch ran out with the tap maybe still readable: come back (edge-triggered).
            if let Err(e) = self.queue_evts[RX].write(1) {
                tracing::warn!("virtio-net {}: cannot reschedule RX: {e}", self.id);
            }
        }
    }
}

//! Transmit: each TX chain (virtio-net header, then the frame, all device-readable) is
//! gathered, checked, stripped of its header and handed to the output gate (the tap, or the
//! held queue of DR output commit).

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory, Permissions};

use super::commit::Sent;
use super::device::{Net, TX};
use super::{MAX_FRAME, NET_HDR_LEN};
use crate::virtio::VIRTIO_MMIO_INT_VRING;

/// Most frames moved per event-loop wakeup; the rest are rescheduled.
const BATCH: usize = 256;

impl Net {
    /// Sends the frames the guest posted on the TX queue.
    pub(crate) fn process_tx(&mut self) {
        let Some(active) = &self.active else { return };
        if self.broken {
            return;
        }
        let mem = active.mem.clone();
        let interrupt = active.interrupt.clone();
        let mut used_any = false;
        let mut failure: Option<String> = None;
        let mut budget = BATCH;
        let mut more = false;
        'outer: loop {
            let queue = &mut self.queues[TX];
            if let Err(e) = queue.disable_notification(&mem) {
                failure = Some(format!("cannot update the TX used ring: {e}"));
                break;
            }
            loop {
                let queue = &mut self.queues[TX];
                let chain = match queue.iter(&mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        failure = Some(format!("bad TX available ring: {e}"));
                        break 'outer;
                    }
                };
                let Some(chain) = chain else { break };
                if budget == 0 {
                    queue.go_to_previous_position();
                    more = true;
                    break 'outer;
                }
                budget -= 1;
                let head = chain.head_index();
                let descs: Vec<_> = chain.collect();
                let Some(last) = descs.last() else {
                    failure = Some(format!("TX descriptor chain {head} is empty or unreadable"));
                    break 'outer;
                };
                if last.has_next() {
                    failure = Some(format!(
                        "TX descriptor chain {head} loops or is longer than the queue"
                    ));
                    break 'outer;
                }
                let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
                if total < NET_HDR_LEN as u64 || total > (NET_HDR_LEN + MAX_FRAME) as u64 {
                    failure = Some(format!(
                        "TX chain {head} holds {total} bytes (a frame needs {NET_HDR_LEN}..={} with its header)",
                        NET_HDR_LEN + MAX_FRAME
                    ));
                    break 'outer;
                }
                self.tx_buf.clear();
                for d in &descs {
                    let len = d.len() as usize;
                    if d.is_write_only() || !mem.check_range(d.addr(), len, Permissions::Read) {
                        failure = Some(format!(
                            "TX chain {head} has a buffer the device cannot read ({:#x}+{len})",
                            d.addr().0
                        ));
                        break 'outer;
                    }
                    let start = self.tx_buf.len();
                    self.tx_buf.resize(start + len, 0);
                    if mem.read_slice(&mut self.tx_buf[start..], d.addr()).is_err() {
                        failure = Some(format!("cannot read TX chain {head}"));
                        break 'outer;
                    }
                }
                match self.gate.send(&self.tx_buf[NET_HDR_LEN..]) {
                    Sent::Full => {
                        // Held queue full: leave the chain for after the next release.
                        self.queues[TX].go_to_previous_position();
                        break 'outer;
                    }
                    Sent::Written | Sent::Held => {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += (self.tx_buf.len() - NET_HDR_LEN) as u64;
                    }
                }
                match self.queues[TX].add_used(&mem, head, 0) {
                    Ok(()) => used_any = true,
                    Err(e) => {
                        failure = Some(format!("cannot complete TX chain {head}: {e}"));
                        break 'outer;
                    }
                }
            }
            match self.queues[TX].enable_notification(&mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    failure = Some(format!("cannot update the TX used ring: {e}"));
                    break;
                }
            }
        }
        if used_any && self.queues[TX].needs_notification(&mem).unwrap_or(true) {
            interrupt.trigger(VIRTIO_MMIO_INT_VRING);
        }
        if let Some(why) = failure {
            self.fail(why);
        } else if more {
            if let Err(e) = self.queue_evts[TX].write(1) {
                tracing::warn!("virtio-net {}: cannot reschedule TX: {e}", self.id);
            }
        }
    }
}

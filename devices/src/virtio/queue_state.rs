//! The saved state of one virtqueue (a serde mirror of `virtio_queue::QueueState`).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

/// Everything needed to rebuild a virtqueue where the guest left it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState {
    /// The largest size the device offers.
    pub max_size: u16,
    /// The driver-selected size.
    pub size: u16,
    /// Whether the driver made the queue ready.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used (device) ring.
    pub used_ring: u64,
    /// The next available-ring entry the device will consume.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
    /// Whether VIRTIO_RING_F_EVENT_IDX is in use.
    pub event_idx_enabled: bool,
}

impl From<&Queue> for VirtqueueState {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl TryFrom<&VirtqueueState> for Queue {
    type Error = virtio_queue::Error;

    fn try_from(s: &VirtqueueState) -> Result<Self, Self::Error> {
        let state = QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        };
        let q = Queue::try_from(state)?;
        debug_assert_eq!(q.max_size(), s.max_size);
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_bad_size() {
        let mut q = Queue::new(16).unwrap();
        q.set_size(8);
        q.set_desc_table_address(Some(0x1000), None);
        q.set_avail_ring_address(Some(0x2000), None);
        q.set_used_ring_address(Some(0x3000), None);
        q.set_next_avail(5);
        q.set_next_used(4);
        q.set_ready(true);
        let s = VirtqueueState::from(&q);
        let back = Queue::try_from(&s).unwrap();
        assert_eq!(back.next_avail(), 5);
        assert_eq!(back.next_used(), 4);
        assert_eq!(back.size(), 8);
        assert_eq!(back.avail_ring(), 0x2000);
        assert!(back.ready());
        let bad = VirtqueueState { size: 3, ..s };
        assert!(Queue::try_from(&bad).is_err());
    }
}

//! The virtio-blk device: feature bits, configuration space, queue processing on the event
//! loop, and save/restore of its state.

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::{DiskConfig, SECTOR_SIZE};
use super::disk::{Disk, DiskError};
use super::request::{handle_chain, RequestCounters, RequestError};
use crate::virtio::{
    ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
};
use crate::GuestMemoryMmap;
use snapshot::Persist;

/// Entries per virtqueue the device offers.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments per request (the queue minus header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most requests served per event-loop wakeup, so that the device lock (which saving the
/// device state takes) is never held for long.
const BATCH: usize = 32;
/// Bytes of `struct virtio_blk_config` the device fills (capacity .. blk_size).
const CONFIG_LEN: usize = 24;

/// Why a block device could not be built or restored.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk could not be opened.
    #[error("cannot open the disk")]
    Disk(#[from] DiskError),
    /// The queue eventfd could not be created.
    #[error("cannot create a virtio-blk queue eventfd")]
    EventFd(#[source] std::io::Error),
    /// The saved state does not fit the disk it is restored onto.
    #[error("saved virtio-blk state of '{id}' does not match the disk: {reason}")]
    StateMismatch { id: String, reason: String },
}

#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-blk device serving one [`Disk`].
#[derive(Debug)]
pub struct Block {
    id: String,
    disk: Arc<Disk>,
    avail_features: u64,
    acked_features: u64,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    active: Option<Active>,
    broken: bool,
    counters: RequestCounters,
}

impl Block {
    /// A block device with the stable id `id` over `disk`.
    pub fn new(id: impl Into<String>, disk: Arc<Disk>) -> Result<Self, BlockError> {
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX);
        if disk.readonly() {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        Ok(Self {
            id: id.into(),
            disk,
            avail_features,
            acked_features: 0,
            queues: vec![Queue::new(QUEUE_SIZE).expect("QUEUE_SIZE is a power of two")],
            queue_evts: vec![EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?],
            active: None,
            broken: false,
            counters: RequestCounters::default(),
        })
    }

    /// Opens the disk of `cfg` (disk number `index` on the command line) and builds its device.
    pub fn from_config(cfg: &DiskConfig, index: usize) -> Result<Self, BlockError> {
        Self::new(cfg.device_id(index), Arc::new(Disk::open(cfg)?))
    }

    /// The stable device id (also what GET_ID returns).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The disk, for the snapshot code (overlays, changed blocks, merges).
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// How many requests completed with each status.
    pub fn counters(&self) -> RequestCounters {
        self.counters
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&(self.disk.size() / SECTOR_SIZE).to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }

    fn fail(&mut self, why: &str) {
        tracing::debug!("virtio-blk {}: {why}; the device needs a reset", self.id);
        self.broken = true;
        if let Some(active) = &self.active {
            active.interrupt.signal_needs_reset();
        }
    }

    /// Serves the requests posted on queue `index` (at most a batch; the queue eventfd is
    /// signalled again when more remain), then interrupts the guest if it wants.
    pub fn process_queue(&mut self, index: usize) {
        let (Some(active), Some(queue)) = (&self.active, self.queues.get_mut(index)) else {
            return;
        };
        if self.broken {
            return;
        }
        let mem = &active.mem;
        let mut used_any = false;
        let mut failure: Option<String> = None;
        let mut budget = BATCH;
        let mut more = false;
        'outer: loop {
            if let Err(e) = queue.disable_notification(mem) {
                failure = Some(format!("cannot update the used ring: {e}"));
                break;
            }
            loop {
                let chain = match queue.iter(mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        failure = Some(format!("bad available ring: {e}"));
                        break 'outer;
                    }
                };
                let Some(chain) = chain else { break };
                if budget == 0 {
                    // Leave the rest for the next round of the event loop.
                    queue.go_to_previous_position();
                    more = true;
                    break 'outer;
                }
                budget -= 1;
                let head = chain.head_index();
                if head >= queue.size() {
                    // Checked here: virtio-queue's `add_used` would log an ERROR line for
                    // each such head, which would let a guest flood the host's log.
                    failure = Some(format!(
                        "descriptor chain head {head} is outside the queue of {}",
                        queue.size()
                    ));
                    break 'outer;
                }
                let (len, result) = match handle_chain(chain, mem, &self.disk, &self.id) {
                    Err(RequestError::Held(_, why)) => {
                        // Never answered: the guest waits while the VM is stopped.
                        tracing::error!("virtio-blk {}: request {head} held: {why}", self.id);
                        break 'outer;
                    }
                    Ok(handled) => {
                        self.counters.record(&handled);
                        (handled.used_len, None)
                    }
                    Err(e) => (0, Some(e.to_string())),
                };
                match queue.add_used(mem, head, len) {
                    Ok(()) => used_any = true,
                    Err(e) => failure = Some(format!("cannot complete chain {head}: {e}")),
                }
                if let Some(why) = result.or(failure.take()) {
                    failure = Some(why);
                    break 'outer;
                }
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    failure = Some(format!("cannot update the used ring: {e}"));
                    break;
                }
            }
        }
        if used_any && queue.needs_notification(mem).unwrap_or(true) {
            active.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
        }
        if let Some(why) = failure {
            self.fail(&why);
        } else if more {
            if let Err(e) = self.queue_evts[index].write(1) {
                tracing::warn!(
                    "virtio-blk {}: cannot reschedule queue {index}: {e}",
                    self.id
                );
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(
            "virtio-blk {}: ignoring config write at {offset:#x}",
            self.id
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActivated);
        }
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.is_valid(&mem) {
                return Err(ActivateError::QueueNotUsable(i));
            }
            q.set_event_idx(event_idx);
        }
        self.active = Some(Active { mem, interrupt });
        self.broken = false;
        tracing::info!("virtio-blk {}: activated", self.id);
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.broken = false;
        self.acked_features = 0;
        self.queues.iter_mut().for_each(Queue::reset);
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                tracing::error!("virtio-blk {}: cannot watch queue {i}: {e}", self.id);
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let index = events.data() as usize;
        let Some(evt) = self.queue_evts.get(index) else {
            return;
        };
        // Non-blocking: a spurious wakeup just finds nothing to read.
        let _ = evt.read();
        self.process_queue(index);
    }
}

/// The saved state of a block device (its queues are saved by the transport).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The stable device id.
    pub id: String,
    /// Disk size in bytes (the capacity in the configuration space).
    pub disk_size: u64,
    /// Whether the disk was offered read-only.
    pub readonly: bool,
    /// Offered features.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Whether the device had asked for a reset.
    pub broken: bool,
}

/// What a block device is rebuilt from, besides its state.
pub struct BlockArgs {
    /// The disk, opened from the snapshot's disk image.
    pub disk: Arc<Disk>,
}

impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = BlockArgs;
    type Error = BlockError;

    fn save(&self) -> BlockState {
        BlockState {
            id: self.id.clone(),
            disk_size: self.disk.size(),
            readonly: self.disk.readonly(),
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            broken: self.broken,
        }
    }

    fn restore(args: BlockArgs, state: &BlockState) -> Result<Self, BlockError> {
        let mismatch = |reason: String| BlockError::StateMismatch {
            id: state.id.clone(),
            reason,
        };
        if args.disk.size() != state.disk_size {
            return Err(mismatch(format!(
                "{} bytes saved, {} now",
                state.disk_size,
                args.disk.size()
            )));
        }
        if args.disk.readonly() != state.readonly {
            return Err(mismatch("read-only setting differs".into()));
        }
        let mut block = Block::new(state.id.clone(), args.disk)?;
        if block.avail_features != state.avail_features {
            return Err(mismatch(format!(
                "features {:#x} saved, {:#x} now",
                state.avail_features, block.avail_features
            )));
        }
        block.acked_features = state.acked_features & block.avail_features;
        block.broken = state.broken;
        Ok(block)
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;

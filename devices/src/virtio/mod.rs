//! Virtio devices: the generic device trait, the interrupt line shared between a device and its
//! transport, the virtio-mmio transport and the virtio-blk device.

pub mod block;
pub mod mmio;
pub mod net;
mod queue_state;
#[cfg(test)]
pub(crate) mod test_utils;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::GuestMemoryMmap;

pub use mmio::{MmioTransport, MmioTransportError, MmioTransportState};
pub use queue_state::VirtqueueState;

/// Feature bit: the device complies with virtio 1.x (mandatory for the modern transport).
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Interrupt status bit: a used ring was updated.
pub const VIRTIO_MMIO_INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration (or the NEEDS_RESET status) changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A queue the device needs was not made ready by the driver.
    #[error("virtio queue {0} is not ready or does not fit in guest memory")]
    QueueNotUsable(usize),
    /// The device is already running.
    #[error("the device is already activated")]
    AlreadyActivated,
}

/// A virtio device as the transport sees it.
///
/// The device owns its queues at all times; the transport configures them through
/// [`VirtioDevice::queues_mut`] and hands over guest memory and the interrupt line when the
/// driver sets DRIVER_OK.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 for a block device).
    fn device_type(&self) -> u32;
    /// The feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// The feature bits the driver accepted (a subset of [`VirtioDevice::avail_features`]).
    fn acked_features(&self) -> u64;
    /// Records the features the driver accepted when it sets FEATURES_OK.
    fn set_acked_features(&mut self, features: u64);
    /// The device's queues, in queue-index order.
    fn queues(&self) -> &[Queue];
    /// The device's queues, for the transport to configure.
    fn queues_mut(&mut self) -> &mut [Queue];
    /// Eventfds signalled when the driver notifies a queue (one per queue, same order).
    fn queue_events(&self) -> &[EventFd];
    /// Reads the device-specific configuration space at `offset`; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored where it is read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device: from now on it serves its queues in `mem` and raises `interrupt`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: std::sync::Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Whether [`VirtioDevice::activate`] succeeded and no reset happened since.
    fn is_activated(&self) -> bool;
    /// Stops the device and returns its queues to their reset state.
    fn reset(&mut self);
}

/// The interrupt line of one virtio-mmio device: the InterruptStatus bits and the irqfd.
///
/// The device sets bits and signals the eventfd (which the VMM registers as an irqfd for the
/// device's GSI); the transport reports the bits to the driver and clears the ones it acks.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    evt: EventFd,
}

impl VirtioInterrupt {
    /// Creates an interrupt line with a fresh non-blocking eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The eventfd to register as an irqfd.
    pub fn evt(&self) -> &EventFd {
        &self.evt
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("failed to signal a virtio interrupt: {e}");
        }
    }

    /// The current InterruptStatus bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Overwrites the InterruptStatus bits (reset and restore).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// The device found the driver's data structures broken: the transport reports
    /// DEVICE_NEEDS_RESET and a configuration-change interrupt is raised (virtio 1.x, 2.1.2).
    pub fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.trigger(VIRTIO_MMIO_INT_CONFIG);
    }

    /// Whether the device asked for a reset since the last one.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Forgets a NEEDS_RESET request (on device reset) or restores one.
    pub fn set_needs_reset(&self, value: bool) {
        self.needs_reset.store(value, Ordering::SeqCst);
    }
}

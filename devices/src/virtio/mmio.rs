//! The virtio-mmio transport (virtio 1.x modern only, register layout of spec 4.2.2).
//!
//! One transport fronts one [`VirtioDevice`] in a 4 KiB MMIO window. The VMM registers an
//! ioeventfd on QueueNotify (offset 0x50, datamatch = queue index) for each eventfd of
//! [`MmioTransport::queue_evts`] and an irqfd on the device's GSI for
//! [`MmioTransport::irq_evt`]. A QueueNotify write that reaches the bus anyway signals the same
//! eventfd, so both paths work.
//!
//! The driver is never trusted: misaligned or wrongly sized accesses, writes at the wrong
//! point of the status sequence and unusable queue settings are ignored, or reported with
//! DEVICE_NEEDS_RESET (0x40) where the spec asks for it. Nothing the guest does panics here.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioDevice, VirtioInterrupt, VirtqueueState, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::GuestMemoryMmap;
use snapshot::Persist;

/// Size of one virtio-mmio window.
pub const MMIO_LEN: u64 = 0x1000;
/// The register that QueueNotify writes hit; the VMM's ioeventfds sit on it.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d56_4b41; // "AKVM"
const CONFIG_SPACE_OFFSET: u64 = 0x100;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

/// The Linux kernel command-line entry that declares a virtio-mmio device at `base` using
/// interrupt `irq`, e.g. `virtio_mmio.device=4K@0xd0000000:5`.
pub fn cmdline_entry(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}
use status::*;

/// Why a transport could not be built or restored.
#[derive(Debug, thiserror::Error)]
pub enum MmioTransportError {
    /// The interrupt eventfd could not be created.
    #[error("cannot create the virtio interrupt eventfd")]
    InterruptEvent(#[source] std::io::Error),
    /// A queue eventfd could not be duplicated.
    #[error("cannot duplicate a virtio queue eventfd")]
    QueueEvent(#[source] std::io::Error),
    /// The saved state belongs to another kind of device.
    #[error("saved transport state is for device type {saved}, not {actual}")]
    DeviceTypeMismatch { saved: u32, actual: u32 },
    /// The saved state has a different number of queues than the device.
    #[error("saved transport state has {saved} queues, the device has {actual}")]
    QueueCountMismatch { saved: usize, actual: usize },
    /// A saved queue is not a valid virtqueue.
    #[error("saved virtqueue {index} is invalid: {reason}")]
    BadQueue { index: usize, reason: String },
    /// The device refused to start again with the saved queues.
    #[error("cannot reactivate the restored device")]
    Activate(#[source] super::ActivateError),
}

/// The virtio-mmio register file of one device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queue_evts: Vec<EventFd>,
    device_type: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// Puts `device` behind a new transport that will hand `mem` to it on activation.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, MmioTransportError> {
        let interrupt =
            Arc::new(VirtioInterrupt::new().map_err(MmioTransportError::InterruptEvent)?);
        let (device_type, queue_evts) = {
            let dev = snapshot::lock(&device);
            let evts = dev
                .queue_events()
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<Vec<_>, _>>()
                .map_err(MmioTransportError::QueueEvent)?;
            (dev.device_type(), evts)
        };
        Ok(Self {
            device,
            mem,
            interrupt,
            queue_evts,
            device_type,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// The eventfds the VMM registers as ioeventfds on QueueNotify, index = datamatch value.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The eventfd the VMM registers as an irqfd on the device's GSI.
    pub fn irq_evt(&self) -> &EventFd {
        self.interrupt.evt()
    }

    /// The interrupt line shared with the device.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The device status as the driver reads it.
    pub fn device_status(&self) -> u32 {
        let mut s = self.status;
        if self.interrupt.needs_reset() {
            s |= DEVICE_NEEDS_RESET;
        }
        s
    }

    fn locked_device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        snapshot::lock(&self.device)
    }

    /// Queue registers may only change between FEATURES_OK and DRIVER_OK, on a queue that
    /// exists and is not ready yet (spec 4.2.3.2).
    fn with_config_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if self.status & (FEATURES_OK | DRIVER_OK | FAILED) != FEATURES_OK {
            tracing::debug!("virtio-mmio: queue register written outside queue setup");
            return;
        }
        let sel = self.queue_select as usize;
        let mut dev = self.locked_device();
        match dev.queues_mut().get_mut(sel) {
            Some(q) if !q.ready() => f(q),
            _ => tracing::debug!("virtio-mmio: write to missing or ready queue {sel}"),
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = self.locked_device().avail_features();
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self
                .locked_device()
                .queues()
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self
                .locked_device()
                .queues()
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.device_status(),
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = v,
            REG_DRIVER_FEATURES => {
                if self.status & (DRIVER | FEATURES_OK | FAILED) != DRIVER {
                    tracing::debug!("virtio-mmio: driver features written at the wrong time");
                    return;
                }
                match self.driver_features_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = v,
            REG_QUEUE_SEL => self.queue_select = v,
            REG_QUEUE_NUM => match u16::try_from(v) {
                Ok(size) => self.with_config_queue(|q| q.set_size(size)),
                Err(_) => tracing::debug!("virtio-mmio: queue size {v} out of range"),
            },
            REG_QUEUE_READY => match v {
                0 => self.with_config_queue(|q| q.set_ready(false)),
                1 => self.with_config_queue(|q| q.set_ready(true)),
                _ => tracing::debug!("virtio-mmio: bad QueueReady value {v}"),
            },
            REG_QUEUE_DESC_LOW => {
                self.with_config_queue(|q| q.set_desc_table_address(Some(v), None))
            }
            REG_QUEUE_DESC_HIGH => {
                self.with_config_queue(|q| q.set_desc_table_address(None, Some(v)))
            }
            REG_QUEUE_DRIVER_LOW => {
                self.with_config_queue(|q| q.set_avail_ring_address(Some(v), None))
            }
            REG_QUEUE_DRIVER_HIGH => {
                self.with_config_queue(|q| q.set_avail_ring_address(None, Some(v)))
            }
            REG_QUEUE_DEVICE_LOW => {
                self.with_config_queue(|q| q.set_used_ring_address(Some(v), None))
            }
            REG_QUEUE_DEVICE_HIGH => {
                self.with_config_queue(|q| q.set_used_ring_address(None, Some(v)))
            }
            NOTIFY_REG_OFFSET => match self.queue_evts.get(v as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        tracing::warn!("virtio-mmio: cannot signal queue {v}: {e}");
                    }
                }
                None => tracing::debug!("virtio-mmio: notify for missing queue {v}"),
            },
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.write_status(v),
            _ => tracing::debug!("virtio-mmio: write to read-only or unknown register {offset:#x}"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The device owns NEEDS_RESET; the driver can only add bits, never clear them.
        let v = v & !DEVICE_NEEDS_RESET;
        if v & self.status != self.status {
            tracing::debug!("virtio-mmio: driver tried to clear status bits without a reset");
            return;
        }
        let added = v & !self.status;
        if added & !(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED) != 0 {
            tracing::debug!("virtio-mmio: unknown status bits {added:#x}");
            return;
        }
        self.status |= added & (ACKNOWLEDGE | DRIVER | FAILED);
        if added & FEATURES_OK != 0 {
            self.negotiate_features();
        }
        if added & DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn negotiate_features(&mut self) {
        if self.status & DRIVER == 0 {
            tracing::debug!("virtio-mmio: FEATURES_OK before DRIVER");
            return;
        }
        let mut dev = self.locked_device();
        let offered = dev.avail_features();
        let wanted = self.driver_features;
        if wanted & !offered != 0 || wanted & (1 << VIRTIO_F_VERSION_1) == 0 {
            // Leaving FEATURES_OK clear tells the driver the subset is unusable (spec 3.1.1).
            tracing::debug!("virtio-mmio: refusing driver features {wanted:#x}");
            return;
        }
        dev.set_acked_features(wanted);
        drop(dev);
        self.status |= FEATURES_OK;
    }

    fn activate(&mut self) {
        if self.status & FEATURES_OK == 0 {
            tracing::debug!("virtio-mmio: DRIVER_OK before FEATURES_OK");
            return;
        }
        self.status |= DRIVER_OK;
        let mem = self.mem.clone();
        let interrupt = self.interrupt.clone();
        let result = self.locked_device().activate(mem, interrupt);
        if let Err(e) = result {
            tracing::warn!(
                "virtio-mmio: device type {} not activated: {e}",
                self.device_type
            );
            self.interrupt.signal_needs_reset();
        }
    }

    fn reset(&mut self) {
        self.locked_device().reset();
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.status = 0;
        self.interrupt.set_status(0);
        self.interrupt.set_needs_reset(false);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.locked_device()
                .read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            tracing::debug!(
                "virtio-mmio: bad register read at {offset:#x}+{}",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.locked_device()
                .write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "virtio-mmio: bad register write size {} at {offset:#x}",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            tracing::debug!("virtio-mmio: misaligned register write at {offset:#x}");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

/// The saved registers of a transport and the queues of its device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The virtio device id of the device behind it (checked on restore).
    pub device_type: u32,
    /// The device status register (without NEEDS_RESET, saved separately).
    pub status: u32,
    /// Whether the device had asked for a reset.
    pub needs_reset: bool,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// The features the driver wrote (accepted ones once FEATURES_OK is set).
    pub driver_features: u64,
    /// QueueSel.
    pub queue_select: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Every queue of the device, ring addresses and indexes included.
    pub queues: Vec<VirtqueueState>,
}

/// What a transport is rebuilt from, besides its state.
pub struct MmioTransportArgs {
    /// Guest memory (the restored VM's).
    pub mem: GuestMemoryMmap,
    /// The device, already restored.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type ConstructorArgs = MmioTransportArgs;
    type Error = MmioTransportError;

    fn save(&self) -> MmioTransportState {
        let dev = self.locked_device();
        MmioTransportState {
            device_type: self.device_type,
            status: self.status,
            needs_reset: self.interrupt.needs_reset(),
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            queues: dev.queues().iter().map(VirtqueueState::from).collect(),
        }
    }

    fn restore(args: MmioTransportArgs, state: &MmioTransportState) -> Result<Self, Self::Error> {
        let mut t = Self::new(args.mem, args.device)?;
        if t.device_type != state.device_type {
            return Err(MmioTransportError::DeviceTypeMismatch {
                saved: state.device_type,
                actual: t.device_type,
            });
        }
        {
            let mut dev = t.locked_device();
            let actual = dev.queues().len();
            if actual != state.queues.len() {
                return Err(MmioTransportError::QueueCountMismatch {
                    saved: state.queues.len(),
                    actual,
                });
            }
            for (index, (slot, saved)) in dev.queues_mut().iter_mut().zip(&state.queues).enumerate()
            {
                if saved.max_size != slot.max_size() {
                    return Err(MmioTransportError::BadQueue {
                        index,
                        reason: format!("max size {} != {}", saved.max_size, slot.max_size()),
                    });
                }
                *slot = Queue::try_from(saved).map_err(|e| MmioTransportError::BadQueue {
                    index,
                    reason: e.to_string(),
                })?;
            }
            if state.status & FEATURES_OK != 0 {
                dev.set_acked_features(state.driver_features);
            }
        }
        t.device_features_select = state.device_features_select;
        t.driver_features_select = state.driver_features_select;
        t.driver_features = state.driver_features;
        t.queue_select = state.queue_select;
        t.status = state.status & !DEVICE_NEEDS_RESET;
        t.config_generation = state.config_generation;
        t.interrupt.set_status(state.interrupt_status);
        t.interrupt.set_needs_reset(state.needs_reset);
        if t.status & DRIVER_OK != 0 && !state.needs_reset {
            let mem = t.mem.clone();
            let interrupt = t.interrupt.clone();
            t.locked_device()
                .activate(mem, interrupt)
                .map_err(MmioTransportError::Activate)?;
            // Requests the guest posted before the snapshot may not have been seen yet, and an
            // edge-triggered irqfd forgets a pending interrupt: kick both once.
            for evt in &t.queue_evts {
                evt.write(1).map_err(MmioTransportError::QueueEvent)?;
            }
        }
        if state.interrupt_status != 0 {
            t.interrupt
                .evt()
                .write(1)
                .map_err(MmioTransportError::InterruptEvent)?;
        }
        Ok(t)
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;

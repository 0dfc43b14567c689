//! The virtio-mmio transport (virtio 1.x "modern", register layout version 2): register access
//! and device discovery in arkvm's MMIO window.

use core::ptr::{read_volatile, write_volatile};

/// First virtio-mmio slot.
pub const MMIO_BASE: u64 = 0xD000_0000;
/// Distance between slots.
pub const SLOT_SIZE: u64 = 0x1000;
/// Slots arkvm may populate.
pub const MAX_SLOTS: usize = 8;
/// "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// Device id of virtio-blk.
pub const DEVICE_ID_BLOCK: u32 = 2;

/// Register offsets.
pub mod reg {
    /// MagicValue.
    pub const MAGIC: u64 = 0x000;
    /// Version (2 = modern).
    pub const VERSION: u64 = 0x004;
    /// DeviceID.
    pub const DEVICE_ID: u64 = 0x008;
    /// DeviceFeatures.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// DeviceFeaturesSel.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// DriverFeatures.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// DriverFeaturesSel.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// QueueSel.
    pub const QUEUE_SEL: u64 = 0x030;
    /// QueueNumMax.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// QueueNum.
    pub const QUEUE_NUM: u64 = 0x038;
    /// QueueReady.
    pub const QUEUE_READY: u64 = 0x044;
    /// QueueNotify.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// InterruptStatus.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// InterruptACK.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Status.
    pub const STATUS: u64 = 0x070;
    /// QueueDescLow.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// QueueDescHigh.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// QueueDriverLow (avail ring).
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// QueueDriverHigh.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// QueueDeviceLow (used ring).
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// QueueDeviceHigh.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// ConfigGeneration.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u32 = 1;
    /// DRIVER.
    pub const DRIVER: u32 = 2;
    /// DRIVER_OK.
    pub const DRIVER_OK: u32 = 4;
    /// FEATURES_OK.
    pub const FEATURES_OK: u32 = 8;
    /// DEVICE_NEEDS_RESET.
    pub const NEEDS_RESET: u32 = 0x40;
    /// FAILED.
    pub const FAILED: u32 = 0x80;
}

/// One virtio-mmio register window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mmio {
    base: u64,
}

impl Mmio {
    /// The window at `base` (one of arkvm's slots).
    pub const fn new(base: u64) -> Self {
        Mmio { base }
    }

    /// Guest-physical base address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Reads a 32-bit register.
    pub fn read(&self, off: u64) -> u32 {
        // SAFETY: the window lies in the MMIO hole, mapped (uncached, user-accessible) by the
        // prologue; a 32-bit aligned load there is an MMIO exit arkvm serves.
        unsafe { read_volatile((self.base + off) as *const u32) }
    }

    /// Writes a 32-bit register.
    pub fn write(&self, off: u64, value: u32) {
        // SAFETY: as in `read`.
        unsafe { write_volatile((self.base + off) as *mut u32, value) }
    }

    /// Writes a 64-bit value to a Low/High register pair.
    pub fn write64(&self, low_off: u64, value: u64) {
        self.write(low_off, value as u32);
        self.write(low_off + 4, (value >> 32) as u32);
    }

    /// Reads a 64-bit configuration field (two 32-bit reads, retried until ConfigGeneration
    /// is stable).
    pub fn config64(&self, off: u64) -> u64 {
        loop {
            let gen = self.read(reg::CONFIG_GENERATION);
            let lo = u64::from(self.read(reg::CONFIG + off));
            let hi = u64::from(self.read(reg::CONFIG + off + 4));
            if self.read(reg::CONFIG_GENERATION) == gen {
                return lo | (hi << 32);
            }
        }
    }

    /// Reads a 32-bit configuration field.
    pub fn config32(&self, off: u64) -> u32 {
        self.read(reg::CONFIG + off)
    }

    /// Device status register.
    pub fn status(&self) -> u32 {
        self.read(reg::STATUS)
    }

    /// Writes 0 to the status register and waits (bounded) until it reads back 0.
    /// Returns whether the device acknowledged the reset.
    pub fn reset(&self) -> bool {
        self.write(reg::STATUS, 0);
        for _ in 0..1_000_000 {
            if self.status() == 0 {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }
}

/// The windows of all devices with `device_id`, lowest slot first; returns them and the count.
pub fn find_devices(device_id: u32) -> ([Mmio; MAX_SLOTS], usize) {
    let mut found = [Mmio::new(0); MAX_SLOTS];
    let mut n = 0;
    for i in 0..MAX_SLOTS as u64 {
        let m = Mmio::new(MMIO_BASE + i * SLOT_SIZE);
        if m.read(reg::MAGIC) == MAGIC && m.read(reg::DEVICE_ID) == device_id {
            found[n] = m;
            n += 1;
        }
    }
    (found, n)
}

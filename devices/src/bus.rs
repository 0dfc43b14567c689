//! A bus of address ranges (port I/O or MMIO) on which devices register.
//!
//! Each device sits behind its own mutex, so an exit only locks the device it targets; the
//! range map itself is read-mostly.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device that answers reads and writes on a bus.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a bus operation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one that is already registered.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    /// A zero-length range was given.
    #[error("bus range at {0:#x} has zero length")]
    ZeroLength(u64),
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A set of devices keyed by the base address of their range.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` on `[base, base + len)`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let mut map = snapshot::write_lock(&self.devices);
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        // The previous range must end before `base`; the next must start at or after `end`.
        if let Some((prev_base, prev)) = map.range(..=base).next_back() {
            if prev_base + prev.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        if let Some((next_base, _)) = map.range(base..).next() {
            if *next_base < end {
                return Err(BusError::Overlap { base, len });
            }
        }
        map.insert(base, Entry { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let map = snapshot::read_lock(&self.devices);
        let (base, entry) = map.range(..=addr).next_back()?;
        if addr - base < entry.len {
            Some((addr - base, entry.device.clone()))
        } else {
            None
        }
    }

    /// Dispatches a read; returns false when no device covers `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                snapshot::lock(&dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device covers `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                snapshot::lock(&dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(1))), 0x10, 8).unwrap();
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Echo(2))), 0x14, 8),
            Err(BusError::Overlap { base: 0x14, len: 8 })
        );
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Echo(2))), 0x8, 9),
            Err(BusError::Overlap { base: 0x8, len: 9 })
        );
        bus.insert(Arc::new(Mutex::new(Echo(5))), 0x18, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x18, &[9]));
        assert!(bus.read(0x18, &mut b));
        assert_eq!(b[0], 9);
        assert!(!bus.read(0x20, &mut b));
        assert!(!bus.read(0x0, &mut b));
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Echo(0))), 0x30, 0),
            Err(BusError::ZeroLength(0x30))
        );
    }
}

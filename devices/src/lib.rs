//! arkvm devices: the PIO/MMIO bus, the legacy devices and the virtio devices.

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

/// Guest memory as every device and the VMM see it: mmap-backed regions with a dirty bitmap
/// that records writes made by devices and the VMM (KVM's dirty log records the vCPUs' writes).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;

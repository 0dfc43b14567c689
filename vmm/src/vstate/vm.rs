//! The KVM VM: memory slots, the in-kernel irqchip and PIT, and the VM-wide state a snapshot
//! saves (PIC master and slave, IOAPIC, PIT, clock).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::arch::layout;
use crate::vstate::memory::region_layout;
use devices::GuestMemoryMmap;

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM VM ioctl failed.
    #[error("KVM failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The host lacks a KVM capability arkvm needs.
    #[error("this host's KVM lacks the {0} capability")]
    MissingCap(&'static str),
}

/// The VM-wide state saved in a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// A memory slot as registered with KVM.
#[derive(Clone, Copy, Debug)]
pub struct MemSlot {
    pub slot: u32,
    pub guest_addr: u64,
    pub size: u64,
    pub host_addr: u64,
}

/// A KVM VM.
pub struct Vm {
    fd: VmFd,
    slots: Vec<MemSlot>,
}

impl Vm {
    /// Creates a VM with its in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT.
    pub fn new(kvm: &Kvm) -> Result<Self, VmError> {
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("create the VM", e))?;
        if !kvm.check_extension(kvm_ioctls::Cap::Irqchip) {
            return Err(VmError::MissingCap("IRQCHIP"));
        }
        fd.set_tss_address(layout::KVM_TSS_ADDRESS)
            .map_err(|e| VmError::Kvm("set the TSS address", e))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| VmError::Kvm("set the identity map address", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Kvm("create the irqchip", e))?;
        let pit_config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit_config)
            .map_err(|e| VmError::Kvm("create the PIT", e))?;
        Ok(Self {
            fd,
            slots: Vec::new(),
        })
    }

    /// The VM's file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The memory slots, in order.
    pub fn slots(&self) -> &[MemSlot] {
        &self.slots
    }

    /// Registers every region of `mem` as a memory slot.
    pub fn register_memory(&mut self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (i, (host, guest, size)) in region_layout(mem).into_iter().enumerate() {
            let slot = MemSlot {
                slot: i as u32,
                guest_addr: guest,
                size,
                host_addr: host,
            };
            self.set_slot(&slot, false)?;
            self.slots.push(slot);
        }
        Ok(())
    }

    fn set_slot(&self, slot: &MemSlot, dirty_log: bool) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot: slot.slot,
            guest_phys_addr: slot.guest_addr,
            memory_size: slot.size,
            userspace_addr: slot.host_addr,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the host range belongs to guest memory that outlives the VM (the builder keeps
        // both for the VMM's lifetime), and slots never overlap because they come from
        // non-overlapping guest memory regions.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| VmError::Kvm("register guest memory", e))
    }

    /// Turns KVM's dirty-page logging on or off for every slot.
    pub fn set_dirty_logging(&self, enable: bool) -> Result<(), VmError> {
        for slot in &self.slots {
            self.set_slot(slot, enable)?;
        }
        Ok(())
    }

    /// Reads and clears the dirty bitmap of every slot (one bit per 4 KiB page).
    pub fn take_dirty_log(&self) -> Result<Vec<Vec<u64>>, VmError> {
        self.slots
            .iter()
            .map(|s| {
                self.fd
                    .get_dirty_log(s.slot, s.size as usize)
                    .map_err(|e| VmError::Kvm("read the dirty log", e))
            })
            .collect()
    }

    /// Saves the irqchip, PIT and clock state. Call with every vCPU paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(|e| VmError::Kvm("save the irqchip", e))?;
            Ok(c)
        };
        let mut clock = self
            .fd
            .get_clock()
            .map_err(|e| VmError::Kvm("save the clock", e))?;
        // Only the time itself is restorable; the flags describe the host's clock source.
        clock.flags = 0;
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self
                .fd
                .get_pit2()
                .map_err(|e| VmError::Kvm("save the PIT", e))?,
            clock,
        })
    }

    /// Restores the state saved by [`Vm::save_state`].
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        self.fd
            .set_pit2(&state.pit)
            .map_err(|e| VmError::Kvm("restore the PIT", e))?;
        self.fd
            .set_clock(&state.clock)
            .map_err(|e| VmError::Kvm("restore the clock", e))?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(|e| VmError::Kvm("restore the irqchip", e))?;
        }
        Ok(())
    }
}

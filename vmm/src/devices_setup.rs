//! Creating the virtio-blk disks of a VM: one virtio-mmio transport per disk on the MMIO bus,
//! its queue notifications through ioeventfd, its interrupt through irqfd.

use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use snapshot::Persist;

use crate::arch::layout;
use crate::vstate::vm::Vm;
use devices::virtio::block::{
    Block, BlockArgs, BlockError, BlockState, DiskConfig, DiskConfigError,
};
use devices::virtio::mmio::{cmdline_entry, MmioTransportArgs, MMIO_LEN};
use devices::virtio::{MmioTransport, MmioTransportError, MmioTransportState};
use devices::{Bus, BusError, GuestMemoryMmap};

/// Why a disk could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum DiskSetupError {
    #[error(transparent)]
    Config(#[from] DiskConfigError),
    #[error("cannot open disk {0}")]
    Block(String, #[source] BlockError),
    #[error("cannot create the virtio transport of disk {0}")]
    Transport(String, #[source] MmioTransportError),
    #[error("cannot place disk {0} on the MMIO bus")]
    Bus(String, #[source] BusError),
    #[error("KVM failed to connect disk {0}'s {1}")]
    Kvm(String, &'static str, #[source] kvm_ioctls::Error),
    #[error("at most {0} disks are supported")]
    TooMany(u32),
    #[error("the snapshot's disk state does not match disk {0}")]
    StateMismatch(String),
}

/// A saved disk: device and transport state, by stable id.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct DiskDeviceState {
    pub id: String,
    pub block: BlockState,
    pub transport: MmioTransportState,
}

/// An attached disk.
pub struct AttachedDisk {
    pub id: String,
    pub config: DiskConfig,
    pub block: Arc<Mutex<Block>>,
    pub transport: Arc<Mutex<MmioTransport>>,
}

impl AttachedDisk {
    /// Saves the transport and device state (transport first: its lock comes first).
    pub fn save(&self) -> DiskDeviceState {
        let transport = self
            .transport
            .lock()
            .expect("transport lock poisoned")
            .save();
        let block = self.block.lock().expect("block lock poisoned").save();
        DiskDeviceState {
            id: self.id.clone(),
            block,
            transport,
        }
    }
}

/// The command-line words that declare the disks to Linux.
pub fn kernel_cmdline_entries(count: usize) -> Vec<String> {
    (0..count as u64)
        .map(|i| {
            cmdline_entry(
                layout::VIRTIO_MMIO_BASE + i * layout::VIRTIO_MMIO_SIZE,
                layout::VIRTIO_IRQ_BASE + i as u32,
            )
        })
        .collect()
}

/// Opens and attaches every disk; with `saved`, restores their device and transport state.
pub fn attach_disks(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio: &Bus,
    disks: &[DiskConfig],
    saved: Option<&[DiskDeviceState]>,
) -> Result<Vec<AttachedDisk>, DiskSetupError> {
    if disks.len() as u32 > layout::VIRTIO_MAX_DEVICES {
        return Err(DiskSetupError::TooMany(layout::VIRTIO_MAX_DEVICES));
    }
    devices::virtio::block::validate_disks(disks)?;
    let mut out = Vec::with_capacity(disks.len());
    for (i, cfg) in disks.iter().enumerate() {
        let id = cfg.device_id(i);
        let block = Block::from_config(cfg, i).map_err(|e| DiskSetupError::Block(id.clone(), e))?;
        let block = match saved {
            None => block,
            Some(states) => {
                let st = states
                    .iter()
                    .find(|s| s.id == id)
                    .ok_or_else(|| DiskSetupError::StateMismatch(id.clone()))?;
                Block::restore(
                    BlockArgs {
                        disk: block.disk().clone(),
                    },
                    &st.block,
                )
                .map_err(|e| DiskSetupError::Block(id.clone(), e))?
            }
        };
        let block = Arc::new(Mutex::new(block));
        let transport = match saved.and_then(|s| s.iter().find(|s| s.id == id)) {
            None => MmioTransport::new(mem.clone(), block.clone()),
            Some(st) => MmioTransport::restore(
                MmioTransportArgs {
                    mem: mem.clone(),
                    device: block.clone(),
                },
                &st.transport,
            ),
        }
        .map_err(|e| DiskSetupError::Transport(id.clone(), e))?;
        let base = layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_SIZE;
        let irq = layout::VIRTIO_IRQ_BASE + i as u32;
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            vm.fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + devices::virtio::mmio::NOTIFY_REG_OFFSET),
                    q as u32,
                )
                .map_err(|e| DiskSetupError::Kvm(id.clone(), "queue notification", e))?;
        }
        vm.fd()
            .register_irqfd(transport.irq_evt(), irq)
            .map_err(|e| DiskSetupError::Kvm(id.clone(), "interrupt", e))?;
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, MMIO_LEN)
            .map_err(|e| DiskSetupError::Bus(id.clone(), e))?;
        out.push(AttachedDisk {
            id,
            config: cfg.clone(),
            block,
            transport,
        });
    }
    Ok(out)
}

//! The device manager: it owns every device of a VM under a stable id, places each on a bus,
//! connects its interrupt, writes its kernel command-line word, saves and restores it, and
//! reports it.
//!
//! ```text
//!  builder ─ registers ─▶ DeviceManager ─────▶ PIO bus:  com1 0x3f8 (IRQ 4), i8042 0x60
//!   (cold or restore,       │                ▶ MMIO bus: virtio-mmio slot i at
//!    same calls)            │                            0xd0000000 + i*0x1000, IRQ 5+i
//!                           ├─ cmdline_words()    virtio_mmio.device=4K@0xd0000000:5 ...
//!                           ├─ subscribers()  ──▶ event loop (virtio queue notifications)
//!                           ├─ save_state()   ──▶ DevicesState [{id, kind, state}] (capture)
//!                           ├─ freeze_disks() / merge_disk_overlays()             (capture)
//!                           └─ info()         ──▶ GET /vm
//! ```
//!
//! A device is registered once, and the same registration serves a cold boot and a restore, as
//! Cloud Hypervisor's `Ioapic::new(.., state: Option<&IoapicState>)` does: its constructor gets
//! its saved state (found by kind and id) when the VM is being restored, `None` otherwise. Each
//! device is saved through its own `Persist` impl into a `serde_json::Value`, so a new kind of
//! device needs no change to the saved-state types, capture or restore: only its folder in
//! `devices/` and one registration in [`DeviceManager::add_configured_devices`] (an
//! `add_virtio_device`, `add_pio_device` or `add_mmio_device` call).
//!
//! Restore is strict both ways: a registered device with no saved state, and a saved device
//! that nothing registered, are refused with the device's kind and id.
//!
//! Devices are saved in registration order, all before KVM state (see `capture/mod.rs`).

pub mod disk;
pub mod legacy;
pub mod net;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_ioctls::IoEventAddress;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout;
use crate::config::VmConfig;
use crate::saved_state::{DevicesState, SavedDevice};
use crate::vstate::vcpu::{ExitSignal, IoBuses};
use crate::vstate::vm::Vm;
use devices::legacy::serial::SerialDevice;
use devices::virtio::mmio::{cmdline_entry, MmioTransportArgs, MMIO_LEN, NOTIFY_REG_OFFSET};
use devices::virtio::{MmioTransport, MmioTransportError, MmioTransportState, VirtioDevice};
use devices::{BusDevice, BusError, GuestMemoryMmap};
use snapshot::{lock, Persist};

pub use disk::{AttachedDisk, DiskSetupError, FreezeError, FrozenDisk, DISK_KIND};
pub use legacy::{LegacyError, I8042_ID, I8042_KIND, SERIAL_ID, SERIAL_IRQ, SERIAL_KIND};
pub use net::{AttachedNet, NetInfo, NET_KIND};

/// Why a device could not be registered, restored or saved.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// Two devices of one kind were given the same id.
    #[error("{kind} id '{id}' is used twice")]
    DuplicateId { kind: &'static str, id: String },
    /// Restoring, and the snapshot holds no state for a registered device.
    #[error("the snapshot's {kind} state does not match {kind} {id}")]
    MissingState { kind: &'static str, id: String },
    /// Restoring, and the snapshot's device of that id is of another kind.
    #[error("the snapshot's device {id} is a {saved}, not a {kind}")]
    KindMismatch {
        kind: &'static str,
        id: String,
        saved: String,
    },
    /// Restoring, and the snapshot holds a device that this VM does not have.
    #[error("the snapshot holds {kind} {id}, which this VM does not have")]
    Unexpected { kind: String, id: String },
    /// The saved state of a device does not deserialize as that kind's state.
    #[error("the snapshot's state of {kind} {id} is not valid")]
    BadState {
        kind: &'static str,
        id: String,
        #[source]
        source: serde_json::Error,
    },
    /// A device's state does not serialize.
    #[error("cannot save the state of {kind} {id}")]
    Save {
        kind: &'static str,
        id: String,
        #[source]
        source: serde_json::Error,
    },
    /// The device's own constructor failed; its error names the device.
    #[error(transparent)]
    Device(Box<dyn std::error::Error + Send + Sync>),
    /// The device's range is taken or empty.
    #[error("cannot place {kind} {id} on the {bus} bus")]
    Bus {
        kind: &'static str,
        id: String,
        bus: BusKind,
        #[source]
        source: BusError,
    },
    /// An event fd could not be created.
    #[error("cannot create an event fd for {kind} {id}")]
    EventFd {
        kind: &'static str,
        id: String,
        #[source]
        source: std::io::Error,
    },
    /// KVM refused an irqfd or ioeventfd.
    #[error("KVM failed to connect {kind} {id}'s {what}")]
    Kvm {
        kind: &'static str,
        id: String,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The virtio-mmio transport could not be created or restored.
    #[error("cannot create the virtio transport of {kind} {id}")]
    Transport {
        kind: &'static str,
        id: String,
        #[source]
        source: MmioTransportError,
    },
    /// Every virtio-mmio slot is taken.
    #[error("no virtio-mmio slot is left for {kind} {id} (there are {max})")]
    NoVirtioSlot {
        kind: &'static str,
        id: String,
        max: u32,
    },
    /// Attaching the configured disks failed.
    #[error(transparent)]
    Disk(#[from] DiskSetupError),
    /// Creating the legacy devices failed.
    #[error(transparent)]
    Legacy(#[from] LegacyError),
}

/// The bus a device sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// Port I/O.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

impl std::fmt::Display for BusKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pio => "port I/O",
            Self::Mmio => "MMIO",
        })
    }
}

/// Where a device sits: its range on its bus and its interrupt line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub base: u64,
    pub len: u64,
    /// The guest IRQ line; the manager connects an irqfd to it and hands it to the device.
    pub irq: Option<u32>,
}

/// What a bus device's constructor gets from the manager.
pub struct DeviceArgs<'s, S> {
    /// The device's saved state when the VM is being restored; `None` on a cold boot.
    pub saved: Option<&'s S>,
    /// The interrupt line asked for in [`Placement::irq`], already connected to the guest IRQ.
    pub irq: Option<EventFd>,
}

/// A device as `GET /vm` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    pub id: String,
    pub kind: &'static str,
    pub bus: BusKind,
    pub placement: Placement,
    /// For a disk: its image and whether the guest sees it read-only.
    pub disk: Option<DiskDeviceInfo>,
}

/// What `GET /vm` says about a disk (the shape of `api::DiskInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiskDeviceInfo {
    pub path: PathBuf,
    pub read_only: bool,
}

/// An event-loop subscriber (the same type as `runtime::Subscriber`).
pub type DeviceSubscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Saves one registered device into JSON. Implemented once per way of attaching a device, not
/// per device: every device saves through its own `Persist` impl.
trait SaveDevice: Send {
    fn save(&self) -> Result<serde_json::Value, serde_json::Error>;
}

/// A bus device saved through its `Persist` impl.
struct PersistSaver<D>(Arc<Mutex<D>>);

impl<D> SaveDevice for PersistSaver<D>
where
    D: Persist + Send,
    D::State: Serialize,
{
    fn save(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::to_value(lock(&self.0).save())
    }
}

/// The saved state of a virtio device: its own, and its transport's (queues included).
#[derive(Serialize, Deserialize)]
struct VirtioSaved<S> {
    device: S,
    transport: MmioTransportState,
}

/// A virtio device and its transport.
struct VirtioSaver<D> {
    device: Arc<Mutex<D>>,
    transport: Arc<Mutex<MmioTransport>>,
}

impl<D> SaveDevice for VirtioSaver<D>
where
    D: Persist + Send,
    D::State: Serialize,
{
    fn save(&self) -> Result<serde_json::Value, serde_json::Error> {
        // The transport first: its save takes the device's lock, which must be free.
        let transport = lock(&self.transport).save();
        let device = lock(&self.device).save();
        serde_json::to_value(VirtioSaved { device, transport })
    }
}

/// A registered device.
struct Registered {
    id: String,
    kind: &'static str,
    bus: BusKind,
    placement: Placement,
    saver: Box<dyn SaveDevice>,
}

/// Every device of one VM.
pub struct DeviceManager {
    vm: Arc<Vm>,
    mem: GuestMemoryMmap,
    buses: Arc<IoBuses>,
    exit: Arc<ExitSignal>,
    /// In registration order, which is the save order.
    devices: Vec<Registered>,
    /// While a restored VM is being built: the saved devices no registration has claimed yet.
    unclaimed: Option<Vec<SavedDevice>>,
    subscribers: Vec<DeviceSubscriber>,
    cmdline: Vec<String>,
    virtio_slots: u32,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    disks: Vec<AttachedDisk>,
    nets: Vec<AttachedNet>,
    output_commit: Arc<devices::virtio::net::OutputCommit>,
}

impl DeviceManager {
    /// Creates the manager of a new VM and registers the legacy devices (serial port writing to
    /// `serial_out`, i8042). With `saved`, every registration restores its device from there,
    /// and [`DeviceManager::finish_restore`] must follow the last registration.
    pub fn new(
        vm: Arc<Vm>,
        mem: GuestMemoryMmap,
        buses: Arc<IoBuses>,
        exit: Arc<ExitSignal>,
        saved: Option<&DevicesState>,
        serial_out: Box<dyn std::io::Write + Send>,
    ) -> Result<Self, DeviceManagerError> {
        let mut manager = Self {
            vm,
            mem,
            buses,
            exit,
            devices: Vec::new(),
            unclaimed: saved.map(|s| s.devices.clone()),
            subscribers: Vec::new(),
            cmdline: Vec::new(),
            virtio_slots: 0,
            serial: None,
            disks: Vec::new(),
            nets: Vec::new(),
            output_commit: devices::virtio::net::OutputCommit::new(),
        };
        manager.add_legacy_devices(serial_out)?;
        Ok(manager)
    }

    /// Registers the devices `config` asks for, after the legacy ones: this is where a new kind
    /// of device is registered (one line).
    pub fn add_configured_devices(&mut self, config: &VmConfig) -> Result<(), DeviceManagerError> {
        self.add_disks(&config.disks)?;
        self.add_nets(&config.nets)?;
        Ok(())
    }

    /// Ends a restore's registrations: refuses saved devices that nothing registered.
    pub fn finish_restore(&mut self) -> Result<(), DeviceManagerError> {
        match self.unclaimed.take().unwrap_or_default().into_iter().next() {
            Some(d) => Err(DeviceManagerError::Unexpected {
                kind: d.kind,
                id: d.id,
            }),
            None => Ok(()),
        }
    }

    /// The VM, for a device that needs more from KVM than the manager connects.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// Guest memory, for devices that read or write it.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Registers a port-I/O device. `create` builds it, from its saved state on restore.
    pub fn add_pio_device<D, E>(
        &mut self,
        id: &str,
        kind: &'static str,
        at: Placement,
        create: impl FnOnce(DeviceArgs<'_, D::State>) -> Result<D, E>,
    ) -> Result<Arc<Mutex<D>>, DeviceManagerError>
    where
        D: BusDevice + Persist + 'static,
        D::State: Serialize + DeserializeOwned,
        E: std::error::Error + Send + Sync + 'static,
    {
        self.add_bus_device(BusKind::Pio, id, kind, at, create)
    }

    /// Registers an MMIO device (not virtio: see [`DeviceManager::add_virtio_device`]).
    /// `create` builds it, from its saved state on restore.
    pub fn add_mmio_device<D, E>(
        &mut self,
        id: &str,
        kind: &'static str,
        at: Placement,
        create: impl FnOnce(DeviceArgs<'_, D::State>) -> Result<D, E>,
    ) -> Result<Arc<Mutex<D>>, DeviceManagerError>
    where
        D: BusDevice + Persist + 'static,
        D::State: Serialize + DeserializeOwned,
        E: std::error::Error + Send + Sync + 'static,
    {
        self.add_bus_device(BusKind::Mmio, id, kind, at, create)
    }

    /// Registers a virtio device behind a virtio-mmio transport in the next free slot (slot `i`
    /// at `0xd0000000 + i * 0x1000`, IRQ `5 + i`), with its queue notifications as ioeventfds,
    /// its interrupt as an irqfd, its command-line word and its event-loop subscriber. `create`
    /// builds the device, from its saved state on restore; the manager restores the transport.
    pub fn add_virtio_device<D, E>(
        &mut self,
        id: &str,
        kind: &'static str,
        create: impl FnOnce(Option<&D::State>) -> Result<D, E>,
    ) -> Result<Arc<Mutex<D>>, DeviceManagerError>
    where
        D: VirtioDevice + MutEventSubscriber + Persist + 'static,
        D::State: Serialize + DeserializeOwned,
        E: std::error::Error + Send + Sync + 'static,
    {
        self.check_unique(kind, id)?;
        let slot = self.virtio_slots;
        if slot >= layout::VIRTIO_MAX_DEVICES {
            return Err(DeviceManagerError::NoVirtioSlot {
                kind,
                id: id.into(),
                max: layout::VIRTIO_MAX_DEVICES,
            });
        }
        let saved: Option<VirtioSaved<D::State>> = self.claim(kind, id)?;
        let device = create(saved.as_ref().map(|s| &s.device))
            .map_err(|e| DeviceManagerError::Device(Box::new(e)))?;
        let device = Arc::new(Mutex::new(device));
        let as_virtio: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let transport = match &saved {
            None => MmioTransport::new(self.mem.clone(), as_virtio),
            Some(s) => MmioTransport::restore(
                MmioTransportArgs {
                    mem: self.mem.clone(),
                    device: as_virtio,
                },
                &s.transport,
            ),
        }
        .map_err(|source| DeviceManagerError::Transport {
            kind,
            id: id.into(),
            source,
        })?;
        let base = layout::VIRTIO_MMIO_BASE + u64::from(slot) * layout::VIRTIO_MMIO_SIZE;
        let irq = layout::VIRTIO_IRQ_BASE + slot;
        let kvm = |what, source| DeviceManagerError::Kvm {
            kind,
            id: id.into(),
            what,
            source,
        };
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            self.vm
                .fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET),
                    q as u32,
                )
                .map_err(|e| kvm("queue notification", e))?;
        }
        self.vm
            .fd()
            .register_irqfd(transport.irq_evt(), irq)
            .map_err(|e| kvm("interrupt", e))?;
        let transport = Arc::new(Mutex::new(transport));
        self.buses
            .mmio
            .insert(transport.clone(), base, MMIO_LEN)
            .map_err(|source| DeviceManagerError::Bus {
                kind,
                id: id.into(),
                bus: BusKind::Mmio,
                source,
            })?;
        self.virtio_slots += 1;
        self.cmdline.push(cmdline_entry(base, irq));
        self.subscribers.push(device.clone());
        self.devices.push(Registered {
            id: id.into(),
            kind,
            bus: BusKind::Mmio,
            placement: Placement {
                base,
                len: MMIO_LEN,
                irq: Some(irq),
            },
            saver: Box::new(VirtioSaver {
                device: device.clone(),
                transport,
            }),
        });
        Ok(device)
    }

    /// Adds an event-loop subscriber for a device registered on a bus.
    pub fn add_subscriber(&mut self, subscriber: DeviceSubscriber) {
        self.subscribers.push(subscriber);
    }

    /// The event-loop subscribers of the devices, for the event loop to add.
    pub fn subscribers(&self) -> Vec<DeviceSubscriber> {
        self.subscribers.clone()
    }

    /// The kernel command-line words that declare the devices to Linux.
    pub fn cmdline_words(&self) -> &[String] {
        &self.cmdline
    }

    /// The serial console.
    pub fn serial(&self) -> Arc<Mutex<SerialDevice>> {
        self.serial
            .clone()
            .expect("DeviceManager::new registers the serial port")
    }

    /// Saves every device, in registration order, keyed by kind and id. Call with the vCPUs
    /// paused and before saving KVM state.
    pub fn save_state(&self) -> Result<DevicesState, DeviceManagerError> {
        let devices = self
            .devices
            .iter()
            .map(|d| {
                let state = d.saver.save().map_err(|source| DeviceManagerError::Save {
                    kind: d.kind,
                    id: d.id.clone(),
                    source,
                })?;
                Ok(SavedDevice {
                    id: d.id.clone(),
                    kind: d.kind.into(),
                    state,
                })
            })
            .collect::<Result<_, DeviceManagerError>>()?;
        Ok(DevicesState { devices })
    }

    /// Every device, in registration order, as `GET /vm` reports it.
    pub fn info(&self) -> Vec<DeviceInfo> {
        self.devices
            .iter()
            .map(|d| DeviceInfo {
                id: d.id.clone(),
                kind: d.kind,
                bus: d.bus,
                placement: d.placement,
                disk: (d.kind == DISK_KIND)
                    .then(|| self.disks.iter().find(|x| x.id == d.id))
                    .flatten()
                    .map(|x| DiskDeviceInfo {
                        path: x.config.path.clone(),
                        read_only: x.config.readonly,
                    }),
            })
            .collect()
    }

    fn add_bus_device<D, E>(
        &mut self,
        bus: BusKind,
        id: &str,
        kind: &'static str,
        at: Placement,
        create: impl FnOnce(DeviceArgs<'_, D::State>) -> Result<D, E>,
    ) -> Result<Arc<Mutex<D>>, DeviceManagerError>
    where
        D: BusDevice + Persist + 'static,
        D::State: Serialize + DeserializeOwned,
        E: std::error::Error + Send + Sync + 'static,
    {
        self.check_unique(kind, id)?;
        let saved: Option<D::State> = self.claim(kind, id)?;
        let irq = match at.irq {
            None => None,
            Some(line) => {
                let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| {
                    DeviceManagerError::EventFd {
                        kind,
                        id: id.into(),
                        source,
                    }
                })?;
                self.vm.fd().register_irqfd(&evt, line).map_err(|source| {
                    DeviceManagerError::Kvm {
                        kind,
                        id: id.into(),
                        what: "interrupt",
                        source,
                    }
                })?;
                Some(evt)
            }
        };
        let device = create(DeviceArgs {
            saved: saved.as_ref(),
            irq,
        })
        .map_err(|e| DeviceManagerError::Device(Box::new(e)))?;
        let device = Arc::new(Mutex::new(device));
        let target = match bus {
            BusKind::Pio => &self.buses.pio,
            BusKind::Mmio => &self.buses.mmio,
        };
        target
            .insert(device.clone(), at.base, at.len)
            .map_err(|source| DeviceManagerError::Bus {
                kind,
                id: id.into(),
                bus,
                source,
            })?;
        self.devices.push(Registered {
            id: id.into(),
            kind,
            bus,
            placement: at,
            saver: Box::new(PersistSaver(device.clone())),
        });
        Ok(device)
    }

    fn check_unique(&self, kind: &'static str, id: &str) -> Result<(), DeviceManagerError> {
        if self.devices.iter().any(|d| d.kind == kind && d.id == id) {
            return Err(DeviceManagerError::DuplicateId {
                kind,
                id: id.into(),
            });
        }
        Ok(())
    }

    /// On restore, takes the saved state of device `kind`/`id` (refusing its absence); on a
    /// cold boot, `None`.
    fn claim<S: DeserializeOwned>(
        &mut self,
        kind: &'static str,
        id: &str,
    ) -> Result<Option<S>, DeviceManagerError> {
        let Some(unclaimed) = &mut self.unclaimed else {
            return Ok(None);
        };
        let Some(pos) = unclaimed.iter().position(|d| d.kind == kind && d.id == id) else {
            return Err(match unclaimed.iter().find(|d| d.id == id) {
                Some(other) => DeviceManagerError::KindMismatch {
                    kind,
                    id: id.into(),
                    saved: other.kind.clone(),
                },
                None => DeviceManagerError::MissingState {
                    kind,
                    id: id.into(),
                },
            });
        };
        let saved = unclaimed.remove(pos);
        serde_json::from_value(saved.state)
            .map(Some)
            .map_err(|source| DeviceManagerError::BadState {
                kind,
                id: id.into(),
                source,
            })
    }
}

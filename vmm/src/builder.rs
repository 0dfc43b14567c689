//! Builds a VM from its configuration: KVM VM, guest memory, legacy devices, vCPUs and the
//! loaded kernel. Restore (a later stage) reuses the same steps with saved state.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::CpuId;
use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{boot_params, cpuid, gdt, mptable, regs};
use crate::boot;
use crate::config::VmConfig;
use crate::devices_setup::{attach_disks, kernel_cmdline_entries, AttachedDisk, DiskSetupError};
use crate::restore::lazy_memory::{LazyMemory, LazyMemoryError};
use crate::saved_state::VmSnapshotState;
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{ExitSignal, IoBuses, Vcpu, VcpuError, VcpuHandle};
use crate::vstate::vcpu_state::{readable_msrs, VcpuState};
use crate::vstate::vm::{Vm, VmError};
use devices::legacy::i8042::I8042Device;
use devices::legacy::serial::{SerialConstructorArgs, SerialDevice, SerialState};
use devices::{Bus, BusError, GuestMemoryMmap};
use snapshot::Persist;

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot set up the boot page tables")]
    Gdt(#[from] gdt::GdtError),
    #[error("cannot write the MP table")]
    Mptable(#[from] mptable::MptableError),
    #[error("cannot write the Linux zero page")]
    BootParams(#[from] boot_params::BootParamsError),
    #[error("cannot set up vCPU {0}")]
    Regs(u8, #[source] regs::RegsError),
    #[error("cannot build the CPUID table")]
    Cpuid(#[from] cpuid::CpuidError),
    #[error("KVM failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot register a device on the bus")]
    Bus(#[from] BusError),
    #[error("cannot create an event fd")]
    EventFd(#[source] std::io::Error),
    #[error("the snapshot does not match this VM: {0}")]
    StateMismatch(&'static str),
    #[error("cannot restore vCPU {0}")]
    RestoreVcpu(u8, #[source] crate::vstate::vcpu_state::VcpuStateError),
    #[error("cannot restore the serial port")]
    RestoreSerial(#[source] devices::legacy::serial::SerialError),
    #[error(transparent)]
    LazyMemory(#[from] LazyMemoryError),
    #[error(transparent)]
    Disk(#[from] DiskSetupError),
    #[error("this host's KVM supports at most {max} vCPUs, {asked} were asked for")]
    TooManyVcpus { asked: u8, max: usize },
}

/// The IRQ line of the serial port (COM1).
const SERIAL_IRQ: u32 = 4;

/// How long each build step took, for the start-up benchmark.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootTimings {
    pub create_vm_us: u128,
    pub memory_us: u128,
    pub vcpus_us: u128,
    pub load_us: u128,
}

/// A built VM whose vCPU threads wait, paused, to be resumed.
pub struct BuiltVm {
    pub kvm: Kvm,
    pub vm: Arc<Vm>,
    pub mem: GuestMemoryMmap,
    pub vcpus: Vec<VcpuHandle>,
    pub buses: Arc<IoBuses>,
    pub exit: Arc<ExitSignal>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub timings: BootTimings,
    /// The lazy memory loader of a restored VM, until every chunk is in.
    pub lazy_memory: Option<LazyMemory>,
    /// The virtio-blk disks.
    pub disks: Vec<AttachedDisk>,
}

fn us_since(t: Instant) -> u128 {
    t.elapsed().as_micros()
}

/// Creates the legacy devices and registers them on the port I/O bus.
fn setup_legacy_devices(
    vm: &Vm,
    pio: &Bus,
    exit: &ExitSignal,
    out: Box<dyn Write + Send>,
    saved: Option<&SerialState>,
) -> Result<Arc<Mutex<SerialDevice>>, BuildError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.fd()
        .register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(|e| BuildError::Kvm("connect the serial IRQ", e))?;
    let serial = match saved {
        None => SerialDevice::new(serial_irq, out),
        Some(state) => SerialDevice::restore(
            SerialConstructorArgs {
                irq: serial_irq,
                out,
            },
            state,
        )
        .map_err(BuildError::RestoreSerial)?,
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(
        serial.clone(),
        SerialDevice::PORT_BASE,
        SerialDevice::PORT_LEN,
    )?;
    // The i8042 reset line wakes the event loop through the exit signal's event fd; an exit
    // event with no recorded reason is a reset request.
    let reset = exit.eventfd().try_clone().map_err(BuildError::EventFd)?;
    let i8042 = Arc::new(Mutex::new(I8042Device::new(reset)));
    pio.insert(i8042, I8042Device::PORT_BASE, I8042Device::PORT_LEN)?;
    Ok(serial)
}

/// The KVM handle, VM and memory: the first steps of both cold boot and restore.
fn create_vm(
    config: &VmConfig,
    timings: &mut BootTimings,
) -> Result<(Kvm, Vm, GuestMemoryMmap), BuildError> {
    let t = Instant::now();
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let max = kvm.get_max_vcpus();
    if usize::from(config.vcpus) > max {
        return Err(BuildError::TooManyVcpus {
            asked: config.vcpus,
            max,
        });
    }
    let mut vm = Vm::new(&kvm)?;
    timings.create_vm_us = us_since(t);

    let t = Instant::now();
    let mem = create_guest_memory(config.memory_bytes)?;
    vm.register_memory(&mem)?;
    timings.memory_us = us_since(t);
    Ok((kvm, vm, mem))
}

/// How each vCPU is initialized.
enum VcpuInit<'a> {
    /// Cold boot: the boot processor enters the kernel at this address.
    Boot { entry: u64 },
    /// Restore: every vCPU takes its saved state.
    Restore(&'a [VcpuState]),
}

/// Creates the vCPUs and starts their threads, paused.
fn create_vcpus(
    kvm: &Kvm,
    vm: &Vm,
    config: &VmConfig,
    init: VcpuInit,
    buses: &Arc<IoBuses>,
    exit: &Arc<ExitSignal>,
) -> Result<Vec<VcpuHandle>, BuildError> {
    let base_cpuid = cpuid::supported_cpuid(kvm)?;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    let mut msr_list = None;
    for index in 0..config.vcpus {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| BuildError::Kvm("create a vCPU", e))?;
        let r = |e| BuildError::Regs(index, e);
        let vcpu_cpuid = match &init {
            VcpuInit::Boot { entry } => {
                let mut c = base_cpuid.clone();
                cpuid::patch_for_vcpu(&mut c, index, config.vcpus);
                fd.set_cpuid2(&c)
                    .map_err(|e| BuildError::Kvm("set CPUID", e))?;
                regs::setup_msrs(&fd).map_err(r)?;
                regs::setup_fpu(&fd).map_err(r)?;
                regs::setup_lint(&fd).map_err(r)?;
                if index == 0 {
                    regs::setup_regs(&fd, *entry).map_err(r)?;
                    regs::setup_sregs(&fd).map_err(r)?;
                }
                // Application processors keep KVM's reset state: they wait for INIT/SIPI.
                c
            }
            VcpuInit::Restore(states) => {
                let state = states
                    .get(usize::from(index))
                    .ok_or(BuildError::StateMismatch(
                        "fewer saved vCPUs than configured",
                    ))?;
                state
                    .restore(&fd)
                    .map_err(|e| BuildError::RestoreVcpu(index, e))?;
                CpuId::from_entries(&state.cpuid)
                    .map_err(|_| BuildError::StateMismatch("a saved CPUID table is too long"))?
            }
        };
        let list = msr_list
            .get_or_insert_with(|| readable_msrs(kvm, &fd))
            .clone();
        vcpus.push(
            Vcpu {
                index,
                fd,
                cpuid: vcpu_cpuid,
                msr_list: list,
                buses: buses.clone(),
                exit: exit.clone(),
            }
            .start()?,
        );
    }
    Ok(vcpus)
}

/// Builds a VM that boots `config`'s kernel. Serial output goes to `out`.
pub fn build_cold(config: &VmConfig, out: Box<dyn Write + Send>) -> Result<BuiltVm, BuildError> {
    let mut timings = BootTimings::default();
    let (kvm, vm, mem) = create_vm(config, &mut timings)?;

    let t = Instant::now();
    let loaded = boot::load_kernel(&mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(p) => Some(boot::load_initrd(&mem, p, loaded.kernel_end)?),
        None => None,
    };
    let mut cmdline = config.cmdline.clone();
    for entry in kernel_cmdline_entries(config.disks.len()) {
        cmdline.push(' ');
        cmdline.push_str(&entry);
    }
    let cmdline_len = boot::load_cmdline(&mem, cmdline.trim())?;
    gdt::write_boot_tables(&mem)?;
    mptable::setup_mptable(&mem, config.vcpus)?;
    boot_params::write_zero_page(
        &mem,
        config.memory_bytes,
        cmdline_len,
        loaded.setup_header,
        initrd,
    )?;
    timings.load_us = us_since(t);

    let buses = Arc::new(IoBuses {
        pio: Bus::new(),
        mmio: Bus::new(),
    });
    let exit = Arc::new(ExitSignal::new().map_err(BuildError::EventFd)?);
    let serial = setup_legacy_devices(&vm, &buses.pio, &exit, out, None)?;
    let disks = attach_disks(&vm, &mem, &buses.mmio, &config.disks, None)?;

    let t = Instant::now();
    let vcpus = create_vcpus(
        &kvm,
        &vm,
        config,
        VcpuInit::Boot {
            entry: loaded.entry,
        },
        &buses,
        &exit,
    )?;
    timings.vcpus_us = us_since(t);

    Ok(BuiltVm {
        kvm,
        vm: Arc::new(vm),
        mem,
        vcpus,
        buses,
        exit,
        serial,
        timings,
        lazy_memory: None,
        disks,
    })
}

/// Builds a VM from a snapshot's state; guest memory is filled lazily from `memory` while the
/// guest runs. Serial output goes to `out`.
pub fn build_restored(
    state: &VmSnapshotState,
    memory: Arc<dyn snapshot::ChunkSource>,
    out: Box<dyn Write + Send>,
) -> Result<BuiltVm, BuildError> {
    let mut timings = BootTimings::default();
    let config = &state.config;
    if state.vcpus.len() != usize::from(config.vcpus) {
        return Err(BuildError::StateMismatch(
            "the number of saved vCPUs differs from the configuration",
        ));
    }
    let (kvm, vm, mem) = create_vm(config, &mut timings)?;
    let layout = crate::vstate::memory::region_layout(&mem);
    let saved: Vec<(u64, u64)> = state.memory.iter().map(|r| (r.guest_addr, r.len)).collect();
    let ours: Vec<(u64, u64)> = layout.iter().map(|&(_, g, l)| (g, l)).collect();
    if saved != ours {
        return Err(BuildError::StateMismatch(
            "the saved memory layout differs from the configured memory size",
        ));
    }

    let buses = Arc::new(IoBuses {
        pio: Bus::new(),
        mmio: Bus::new(),
    });
    let exit = Arc::new(ExitSignal::new().map_err(BuildError::EventFd)?);
    let serial = setup_legacy_devices(&vm, &buses.pio, &exit, out, Some(&state.devices.serial))?;
    let disks = attach_disks(
        &vm,
        &mem,
        &buses.mmio,
        &config.disks,
        Some(&state.devices.disks),
    )?;

    let t = Instant::now();
    let lazy = LazyMemory::start(
        memory,
        crate::vstate::memory::mapped_layout(&mem),
        exit.clone(),
    )?;
    timings.load_us = us_since(t);

    let t = Instant::now();
    // The irqchip, PIT and clock first, then every vCPU (its LAPIC lands on a restored IOAPIC).
    vm.restore_state(&state.vm)?;
    let vcpus = create_vcpus(
        &kvm,
        &vm,
        config,
        VcpuInit::Restore(&state.vcpus),
        &buses,
        &exit,
    )?;
    timings.vcpus_us = us_since(t);

    Ok(BuiltVm {
        kvm,
        vm: Arc::new(vm),
        mem,
        vcpus,
        buses,
        exit,
        serial,
        timings,
        lazy_memory: Some(lazy),
        disks,
    })
}

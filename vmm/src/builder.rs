//! Builds a VM from its configuration: KVM VM, guest memory, legacy devices, vCPUs and the
//! loaded kernel. Restore (a later stage) reuses the same steps with saved state.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{boot_params, cpuid, gdt, mptable, regs};
use crate::boot;
use crate::config::VmConfig;
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{ExitSignal, IoBuses, Vcpu, VcpuError, VcpuHandle};
use crate::vstate::vcpu_state::readable_msrs;
use crate::vstate::vm::{Vm, VmError};
use devices::legacy::i8042::I8042Device;
use devices::legacy::serial::SerialDevice;
use devices::{Bus, BusError, GuestMemoryMmap};

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
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    pub vcpus: Vec<VcpuHandle>,
    pub buses: Arc<IoBuses>,
    pub exit: Arc<ExitSignal>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub timings: BootTimings,
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
) -> Result<Arc<Mutex<SerialDevice>>, BuildError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.fd()
        .register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(|e| BuildError::Kvm("connect the serial IRQ", e))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, out)));
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

/// Builds a VM that boots `config`'s kernel. Serial output goes to `out`.
pub fn build_cold(config: &VmConfig, out: Box<dyn Write + Send>) -> Result<BuiltVm, BuildError> {
    let mut timings = BootTimings::default();
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

    let t = Instant::now();
    let loaded = boot::load_kernel(&mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(p) => Some(boot::load_initrd(&mem, p, loaded.kernel_end)?),
        None => None,
    };
    let cmdline_len = boot::load_cmdline(&mem, &config.cmdline)?;
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
    let serial = setup_legacy_devices(&vm, &buses.pio, &exit, out)?;

    let t = Instant::now();
    let base_cpuid = cpuid::supported_cpuid(&kvm)?;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    let mut msr_list = None;
    for index in 0..config.vcpus {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| BuildError::Kvm("create a vCPU", e))?;
        let mut vcpu_cpuid = base_cpuid.clone();
        cpuid::patch_for_vcpu(&mut vcpu_cpuid, index, config.vcpus);
        fd.set_cpuid2(&vcpu_cpuid)
            .map_err(|e| BuildError::Kvm("set CPUID", e))?;
        let r = |e| BuildError::Regs(index, e);
        regs::setup_msrs(&fd).map_err(r)?;
        regs::setup_fpu(&fd).map_err(r)?;
        regs::setup_lint(&fd).map_err(r)?;
        if index == 0 {
            regs::setup_regs(&fd, loaded.entry).map_err(r)?;
            regs::setup_sregs(&fd).map_err(r)?;
        }
        // Application processors keep KVM's reset state: they wait for INIT/SIPI.
        let list = msr_list
            .get_or_insert_with(|| readable_msrs(&kvm, &fd))
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
    timings.vcpus_us = us_since(t);

    Ok(BuiltVm {
        kvm,
        vm,
        mem,
        vcpus,
        buses,
        exit,
        serial,
        timings,
    })
}

//! Builds a VM, for a cold boot and a restore alike: KVM VM, guest memory, the devices (through
//! the device manager), vCPUs, and either the loaded kernel or the saved state. As in Cloud
//! Hypervisor, one constructor takes the saved state as an option:
//!
//! ```text
//! build(config, restore)
//!   create_vm             KVM VM + guest memory                            (both)
//!   check the layout      saved vCPU count and memory regions vs config    (restore)
//!   load the kernel       kernel + initrd                                  (cold)
//!   DeviceManager::new    serial, i8042   ┐ each restored from its saved  (both)
//!   configured, extras    disks, ...      ┘ state on restore
//!   finish_restore        refuse saved devices nothing registered          (restore)
//!   boot data             command line (+ device words), GDT, MP table,    (cold)
//!                         zero page
//!   lazy memory           LazyMemory::start over the restore's source      (restore)
//!   irqchip, PIT, clock   Vm::restore_state, before the vCPUs' LAPICs      (restore)
//!   create_vcpus          boot registers, or each vCPU's saved state       (both)
//! ```

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::CpuId;
use kvm_ioctls::Kvm;

use crate::arch::{boot_params, cpuid, gdt, mptable, regs};
use crate::boot;
use crate::config::VmConfig;
use crate::device_manager::{DeviceManager, DeviceManagerError};
use crate::restore::disk_hydration::DiskHydration;
use crate::restore::lazy_memory::{LazyMemory, LazyMemoryError};
use crate::saved_state::VmSnapshotState;
use crate::vstate::memory::{create_guest_memory, mapped_layout, region_layout, MemoryError};
use crate::vstate::vcpu::{ExitSignal, IoBuses, Vcpu, VcpuError, VcpuHandle};
use crate::vstate::vcpu_state::{readable_msrs, VcpuState};
use crate::vstate::vm::{Vm, VmError};
use devices::{Bus, GuestMemoryMmap};

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
    #[error("cannot create an event fd")]
    EventFd(#[source] std::io::Error),
    #[error("the snapshot does not match this VM: {0}")]
    StateMismatch(&'static str),
    #[error("cannot restore vCPU {0}")]
    RestoreVcpu(u8, #[source] crate::vstate::vcpu_state::VcpuStateError),
    #[error(transparent)]
    LazyMemory(#[from] LazyMemoryError),
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    #[error("this host's KVM supports at most {max} vCPUs, {asked} were asked for")]
    TooManyVcpus { asked: u8, max: usize },
}

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
    pub timings: BootTimings,
    /// The lazy memory loader of a restored VM, until every chunk is in.
    pub lazy_memory: Option<LazyMemory>,
    /// The disks of a VM restored from a backup point, while they are hydrated (and after).
    pub disk_hydration: Option<Arc<DiskHydration>>,
    /// Every device: serial, i8042, disks, and any registered beyond the configuration.
    pub devices: DeviceManager,
}

fn us_since(t: Instant) -> u128 {
    t.elapsed().as_micros()
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

/// What a restore gives [`build`]: the saved state, and where guest memory is loaded from.
pub struct Restore<'a> {
    /// The snapshot's state: memory layout, KVM VM state, vCPUs and devices.
    pub state: &'a VmSnapshotState,
    /// Where guest memory is loaded from. This is the one place where the builder meets the
    /// memory source.
    pub memory: Arc<dyn snapshot::ChunkSource>,
    /// Where the memory comes from (a directory or `REPO#ID`), for the loader's messages.
    pub label: &'a str,
}

/// How a build starts: a loaded kernel (and initrd), or a snapshot.
enum Start<'a> {
    Boot(boot::LoadedKernel, Option<boot_params::InitrdRange>),
    Restore(Restore<'a>),
}

/// Registers devices beyond the configured ones, after them (a test's, or an embedder's).
pub type ExtraDevices<'a> = &'a dyn Fn(&mut DeviceManager) -> Result<(), DeviceManagerError>;

/// Builds a VM: with `restore`, from a snapshot's state, with guest memory filled lazily while
/// the guest runs; without, booting `config`'s kernel. Serial output goes to `out`. The vCPU
/// threads wait, paused.
pub fn build(
    config: &VmConfig,
    restore: Option<Restore<'_>>,
    out: Box<dyn Write + Send>,
) -> Result<BuiltVm, BuildError> {
    build_with_devices(config, restore, out, &|_| Ok(()))
}

/// [`build`], with `extra` registering more devices after the configured ones. A restore must
/// register the same devices as the VM that was saved.
pub fn build_with_devices(
    config: &VmConfig,
    restore: Option<Restore<'_>>,
    out: Box<dyn Write + Send>,
    extra: ExtraDevices<'_>,
) -> Result<BuiltVm, BuildError> {
    let mut timings = BootTimings::default();
    if let Some(r) = &restore {
        if r.state.vcpus.len() != usize::from(config.vcpus) {
            return Err(BuildError::StateMismatch(
                "the number of saved vCPUs differs from the configuration",
            ));
        }
    }
    let (kvm, vm, mem) = create_vm(config, &mut timings)?;
    if let Some(r) = &restore {
        let saved: Vec<(u64, u64)> = r
            .state
            .memory
            .iter()
            .map(|m| (m.guest_addr, m.len))
            .collect();
        let ours: Vec<(u64, u64)> = region_layout(&mem)
            .iter()
            .map(|&(_, g, l)| (g, l))
            .collect();
        if saved != ours {
            return Err(BuildError::StateMismatch(
                "the saved memory layout differs from the configured memory size",
            ));
        }
    }

    // A cold boot loads the kernel before any device is made, so its errors come first.
    let t = Instant::now();
    let start = match restore {
        Some(r) => Start::Restore(r),
        None => {
            let loaded = boot::load_kernel(&mem, &config.kernel)?;
            let initrd = match &config.initrd {
                Some(p) => Some(boot::load_initrd(&mem, p, loaded.kernel_end)?),
                None => None,
            };
            Start::Boot(loaded, initrd)
        }
    };
    let kernel_us = us_since(t);

    let vm = Arc::new(vm);
    let buses = Arc::new(IoBuses {
        pio: Bus::new(),
        mmio: Bus::new(),
    });
    let exit = Arc::new(ExitSignal::new().map_err(BuildError::EventFd)?);
    let saved_devices = match &start {
        Start::Restore(r) => Some(&r.state.devices),
        Start::Boot(..) => None,
    };
    let mut devices = DeviceManager::new(
        vm.clone(),
        mem.clone(),
        buses.clone(),
        exit.clone(),
        saved_devices,
        out,
    )?;
    devices.add_configured_devices(config)?;
    extra(&mut devices)?;
    devices.finish_restore()?;

    let (init, lazy_memory, vcpus_started) = match start {
        Start::Restore(r) => {
            let t = Instant::now();
            let lazy = LazyMemory::start(r.memory, mapped_layout(&mem), r.label, exit.clone())?;
            timings.load_us = us_since(t);
            let t = Instant::now();
            // The irqchip, PIT and clock first, then every vCPU (its LAPIC lands on a restored
            // IOAPIC).
            vm.restore_state(&r.state.vm)?;
            (VcpuInit::Restore(&r.state.vcpus), Some(lazy), t)
        }
        Start::Boot(loaded, initrd) => {
            let t = Instant::now();
            let mut cmdline = config.cmdline.clone();
            for word in devices.cmdline_words() {
                cmdline.push(' ');
                cmdline.push_str(word);
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
            timings.load_us = kernel_us + us_since(t);
            let init = VcpuInit::Boot {
                entry: loaded.entry,
            };
            (init, None, Instant::now())
        }
    };

    let vcpus = create_vcpus(&kvm, &vm, config, init, &buses, &exit)?;
    timings.vcpus_us = us_since(vcpus_started);

    Ok(BuiltVm {
        kvm,
        vm,
        mem,
        vcpus,
        buses,
        exit,
        timings,
        lazy_memory,
        disk_hydration: None,
        devices,
    })
}

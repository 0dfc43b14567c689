//! The per-vCPU KVM state a snapshot saves, and the order it is restored in.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// Why vCPU state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM vCPU ioctl failed.
    #[error("KVM failed to {0} the vCPU's state")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// A FAM wrapper (MSRs, CPUID) could not be built.
    #[error("too many {0} entries")]
    TooMany(&'static str),
    /// KVM did not take every saved MSR.
    #[error("KVM restored only {set} of {wanted} MSRs")]
    PartialMsrs { set: usize, wanted: usize },
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

const MSR_BATCH: usize = 64;

/// MSRs KVM lists that a vCPU can actually read, found once at start so that saves stay quick.
pub fn readable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Vec<u32> {
    let Ok(list) = kvm.get_msr_index_list() else {
        return Vec::new();
    };
    list.as_slice()
        .iter()
        .copied()
        .filter(|&index| {
            let Ok(mut one) = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }]) else {
                return false;
            };
            matches!(vcpu.get_msrs(&mut one), Ok(1))
        })
        .collect()
}

fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    for batch in indices.chunks(MSR_BATCH) {
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany("MSR"))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| VcpuStateError::Kvm("save MSRs of", e))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
    }
    Ok(out)
}

impl VcpuState {
    /// Saves a paused vCPU's state.
    pub fn save(
        id: u8,
        vcpu: &VcpuFd,
        cpuid: &CpuId,
        msr_list: &[u32],
    ) -> Result<Self, VcpuStateError> {
        let k = |what| move |e| VcpuStateError::Kvm(what, e);
        // mp_state first and vcpu_events last, like KVM's own migration users: the events
        // reflect what the other reads left pending.
        let mp_state = vcpu.get_mp_state().map_err(k("save mp_state of"))?;
        let regs = vcpu.get_regs().map_err(k("save registers of"))?;
        let sregs = vcpu.get_sregs().map_err(k("save segments of"))?;
        let xsave = vcpu.get_xsave().map_err(k("save XSAVE of"))?;
        let xcrs = vcpu.get_xcrs().map_err(k("save XCRs of"))?;
        let debug_regs = vcpu
            .get_debug_regs()
            .map_err(k("save debug registers of"))?;
        let lapic = vcpu.get_lapic().map_err(k("save the LAPIC of"))?;
        let msrs = read_msrs(vcpu, msr_list)?;
        let vcpu_events = vcpu.get_vcpu_events().map_err(k("save events of"))?;
        Ok(Self {
            id,
            cpuid: cpuid.as_slice().to_vec(),
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz: vcpu.get_tsc_khz().ok(),
        })
    }

    /// Restores the state into a fresh vCPU. The order matters: CPUID before anything that
    /// depends on features, MSRs after the LAPIC (x2APIC MSRs), events last.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), VcpuStateError> {
        let k = |what| move |e| VcpuStateError::Kvm(what, e);
        let cpuid =
            CpuId::from_entries(&self.cpuid).map_err(|_| VcpuStateError::TooMany("CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(k("restore CPUID of"))?;
        if let Some(khz) = self.tsc_khz {
            // Not every host can scale the TSC; a mismatch only costs time accuracy.
            if let Err(e) = vcpu.set_tsc_khz(khz) {
                tracing::debug!("could not set TSC frequency {khz} kHz: {e}");
            }
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(k("restore mp_state of"))?;
        vcpu.set_regs(&self.regs)
            .map_err(k("restore registers of"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(k("restore segments of"))?;
        // SAFETY: the xsave area was produced by KVM_GET_XSAVE on the same architecture and is
        // the legacy 4 KiB size that KVM_SET_XSAVE reads.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(k("restore XSAVE of"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(k("restore XCRs of"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(k("restore debug registers of"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(k("restore the LAPIC of"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| VcpuStateError::TooMany("MSR"))?;
        let set = vcpu.set_msrs(&msrs).map_err(k("restore MSRs of"))?;
        if set != self.msrs.len() {
            return Err(VcpuStateError::PartialMsrs {
                set,
                wanted: self.msrs.len(),
            });
        }
        vcpu.set_vcpu_events(&self.vcpu_events)
            .map_err(k("restore events of"))?;
        Ok(())
    }
}

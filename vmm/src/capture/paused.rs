//! The paused snapshot: pause the vCPUs, save every piece of state, write all of memory, commit,
//! resume. The guest is stopped for the whole copy; the live strategies build on the same
//! pieces.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use snapshot::{Persist, SnapshotWriter, CHUNK_SIZE};

use super::memory_copy::copy_all;
use super::progress::Progress;
use super::state::{DevicesState, VmSnapshotState, MEMORY_PART, STATE_PART};
use super::CaptureError;
use crate::runtime::{RunState, Vmm};
use crate::vstate::memory::region_layout;
use crate::vstate::vcpu::{VcpuEvent, VcpuResponse};

/// Saves the state of a paused VM: devices first, then vCPUs, then the VM-wide KVM state.
pub fn save_frozen_state(vmm: &Vmm) -> Result<VmSnapshotState, CaptureError> {
    // Devices before KVM state: an interrupt a device raises while being saved must already be
    // in the irqchip state saved below.
    let devices = DevicesState {
        serial: vmm
            .built
            .serial
            .lock()
            .expect("serial lock poisoned")
            .save(),
    };
    let mut vcpus = Vec::with_capacity(vmm.built.vcpus.len());
    for v in &vmm.built.vcpus {
        v.send(VcpuEvent::SaveState)?;
    }
    for v in &vmm.built.vcpus {
        match v.recv()? {
            VcpuResponse::Saved(s) => vcpus.push(*s),
            _ => {
                return Err(crate::vstate::vcpu::VcpuError::Unexpected(
                    v.index(),
                    "another answer",
                    "Saved",
                )
                .into())
            }
        }
    }
    let vm = vmm.built.vm.save_state()?;
    let regions: Vec<(u64, u64)> = region_layout(&vmm.built.mem)
        .into_iter()
        .map(|(_, g, l)| (g, l))
        .collect();
    Ok(VmSnapshotState {
        config: vmm.config.clone(),
        memory: VmSnapshotState::memory_layout(&regions),
        vm,
        vcpus,
        devices,
    })
}

/// Takes a paused snapshot into `out`, which must not exist.
pub fn snapshot_paused(
    vmm: &mut Vmm,
    out: &Path,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<(), CaptureError> {
    let mut writer = SnapshotWriter::create(out)?;
    let was_running = vmm.state() == RunState::Running;
    let paused_at = Instant::now();
    vmm.pause()?;
    let result = (|| -> Result<(), CaptureError> {
        let state = save_frozen_state(vmm)?;
        let mem_size: u64 = state.memory.iter().map(|r| r.len).sum();
        progress.update(|r| r.bytes_total = mem_size);
        let part = writer.add_memory_part(MEMORY_PART, mem_size, CHUNK_SIZE as u64)?;
        copy_all(&vmm.built.mem, &state.memory, &part, progress, cancel)?;
        writer.finish_memory_part(part)?;
        writer.write_state_part(STATE_PART, &state)?;
        writer.commit()?;
        Ok(())
    })();
    // Resume whatever happened: a failed snapshot must leave the guest as it was.
    if was_running {
        vmm.resume()?;
    }
    let pause_us = paused_at.elapsed().as_micros() as u64;
    progress.update(|r| r.pause_us = pause_us);
    result
}

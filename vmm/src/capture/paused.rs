//! The paused snapshot: pause the vCPUs, save every piece of state, write all of memory, commit,
//! resume. The guest is stopped for the whole copy; the live strategies build on the same
//! pieces.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::disks::{copy_frozen_disks, freeze_disks, frozen_bytes};
use super::job::SnapshotJob;
use super::memory_copy::copy_all;
use super::progress::Progress;
use super::sink::SnapshotOut;
use super::target::plan_incremental;
use super::CaptureError;
use crate::runtime::{RunState, Vmm};
use crate::saved_state::VmSnapshotState;
use crate::vstate::memory::region_layout;
use crate::vstate::vcpu::{VcpuEvent, VcpuResponse};

/// Saves the state of a paused VM: devices first, then vCPUs, then the VM-wide KVM state.
pub fn save_frozen_state(vmm: &Vmm) -> Result<VmSnapshotState, CaptureError> {
    // Devices before KVM state: an interrupt a device raises while being saved must already be
    // in the irqchip state saved below.
    let devices = vmm.built.devices.save_state()?;
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

/// Starts a paused snapshot into `out`: pauses the vCPUs, saves the state, and leaves the
/// memory and disk copy and the commit to a worker thread. The event loop resumes the vCPUs
/// when the worker ends (see [`SnapshotJob`]).
pub fn start_paused(
    vmm: &mut Vmm,
    mut out: SnapshotOut,
    progress: Progress,
    done: Arc<EventFd>,
) -> Result<SnapshotJob, CaptureError> {
    let was_running = vmm.state() == RunState::Running;
    let paused_at = Instant::now();
    vmm.pause()?;
    let frozen = (|| {
        let state = save_frozen_state(vmm)?;
        let clean = plan_incremental(vmm, &out, &state.memory)?;
        let disks = freeze_disks(vmm)?;
        Ok::<_, CaptureError>((state, clean, disks))
    })();
    let (state, clean, disks) = match frozen {
        Ok(s) => s,
        Err(e) => {
            if was_running {
                vmm.resume()?;
            }
            return Err(e);
        }
    };
    let mem = vmm.built.mem.clone();
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    let p = progress.clone();
    let job = SnapshotJob::spawn(
        progress,
        cancel,
        done,
        was_running,
        Some(paused_at),
        move || {
            let mem_size: u64 = state.memory.iter().map(|r| r.len).sum();
            p.update(|r| r.bytes_total = mem_size + frozen_bytes(&disks));
            let incremental = clean.is_some();
            let part = out.add_memory(mem_size)?;
            copy_all(&mem, &state.memory, &part, &p, &c, clean.as_deref())?;
            out.finish_memory(part)?;
            copy_frozen_disks(&mut out, disks, incremental, &p, &c)?;
            out.write_state(&state)?;
            out.commit()
        },
    );
    match job {
        Ok(j) => Ok(j),
        Err(e) => {
            if was_running {
                vmm.resume()?;
            }
            Err(CaptureError::Spawn(e))
        }
    }
}

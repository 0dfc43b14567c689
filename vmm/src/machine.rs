//! The machine: the built VM with its configuration, its run state and where it was restored
//! from. It pauses and resumes the vCPUs, and it gives capture its narrow handle on the VM by
//! implementing [`CaptureVm`], so that the dependency points from here to capture and never back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::builder::BuiltVm;
use crate::capture::{CaptureError, CaptureVm, FrozenDisk};
use crate::config::VmConfig;
use crate::restore::lazy_memory::progress::LoaderProgress;
use crate::saved_state::VmSnapshotState;
use crate::vstate::memory::mapped_layout;
use crate::vstate::vcpu::{VcpuError, VcpuEvent, VcpuResponse};
use crate::vstate::vm::Vm;
use devices::GuestMemoryMmap;

/// Whether the guest's vCPUs are running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
}

/// A built VM and what the VMM knows about it.
pub struct Machine {
    pub built: BuiltVm,
    pub config: VmConfig,
    state: RunState,
    /// The snapshot directory or `REPO#ID` this VM was restored from, if any.
    pub restored_from: Option<String>,
    /// The restore's memory loader progress (kept after the loader is gone).
    pub memory_loader: Option<Arc<LoaderProgress>>,
}

impl Machine {
    /// Wraps a built VM whose vCPUs wait, paused.
    pub fn new(config: VmConfig, built: BuiltVm, restored_from: Option<String>) -> Self {
        let memory_loader = built.lazy_memory.as_ref().map(|l| l.progress());
        Self {
            built,
            config,
            state: RunState::Paused,
            restored_from,
            memory_loader,
        }
    }

    /// The current run state.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// Pauses every vCPU and returns how long it took.
    pub fn pause(&mut self) -> Result<Duration, VcpuError> {
        let t = Instant::now();
        for v in &self.built.vcpus {
            v.send(VcpuEvent::Pause)?;
        }
        for v in &self.built.vcpus {
            let r = v.recv()?;
            if !matches!(r, VcpuResponse::Paused) {
                return Err(VcpuError::Unexpected(v.index(), "other", "Paused"));
            }
        }
        self.state = RunState::Paused;
        tracing::debug!(
            "paused {} vCPUs in {:?}",
            self.built.vcpus.len(),
            t.elapsed()
        );
        Ok(t.elapsed())
    }

    /// Resumes every vCPU.
    pub fn resume(&mut self) -> Result<(), VcpuError> {
        for v in &self.built.vcpus {
            v.send(VcpuEvent::Resume)?;
        }
        for v in &self.built.vcpus {
            v.recv()?;
        }
        self.state = RunState::Running;
        Ok(())
    }
}

impl CaptureVm for Machine {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn is_running(&self) -> bool {
        self.state == RunState::Running
    }

    fn pause(&mut self) -> Result<(), CaptureError> {
        Machine::pause(self)
            .map(|_| ())
            .map_err(CaptureError::PauseResume)
    }

    fn resume(&mut self) -> Result<(), CaptureError> {
        Machine::resume(self).map_err(CaptureError::PauseResume)
    }

    fn save_state(&self) -> Result<VmSnapshotState, CaptureError> {
        // Devices before KVM state: an interrupt a device raises while being saved must already
        // be in the irqchip state saved below.
        let devices = self.built.devices.save_state()?;
        let mut vcpus = Vec::with_capacity(self.built.vcpus.len());
        for v in &self.built.vcpus {
            v.send(VcpuEvent::SaveState)?;
        }
        for v in &self.built.vcpus {
            match v.recv()? {
                VcpuResponse::Saved(s) => vcpus.push(*s),
                _ => return Err(VcpuError::Unexpected(v.index(), "another answer", "Saved").into()),
            }
        }
        let vm = self.built.vm.save_state()?;
        Ok(VmSnapshotState {
            config: self.config.clone(),
            memory: mapped_layout(&self.built.mem).layout().regions().to_vec(),
            vm,
            vcpus,
            devices,
        })
    }

    fn freeze_disks(&self) -> Result<Vec<FrozenDisk>, CaptureError> {
        self.built
            .devices
            .freeze_disks()
            .map_err(|e| CaptureError::Disk(e.id, e.source))
    }

    fn merge_disk_overlays(&self) {
        self.built.devices.merge_disk_overlays();
    }

    fn memory(&self) -> &GuestMemoryMmap {
        &self.built.mem
    }

    fn vm(&self) -> &Arc<Vm> {
        &self.built.vm
    }

    fn wait_memory_loaded(&mut self, timeout: Duration) -> bool {
        if let Some(lazy) = &self.built.lazy_memory {
            if !lazy.wait_loaded(timeout) {
                return false;
            }
            self.built.lazy_memory = None;
        }
        true
    }
}

//! The device manager: where the configured devices sit and what Linux is told, save and
//! restore by kind and id with its refusals, and the seam's acceptance test: a device registered
//! from outside the configuration survives a real paused snapshot and a restore, with no change
//! to capture or restore.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use super::*;
use crate::builder::{build_with_devices, BuildError, BuiltVm, ExtraDevices, Restore};
use crate::machine::Machine;
use crate::saved_state::{VmSnapshotState, MEMORY_PART, STATE_PART};
use crate::vstate::memory::create_guest_memory;
use devices::virtio::block::DiskConfig;

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("arkvm-dm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn disk_image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    p
}

/// What a manager is made with: a fresh KVM VM with 16 MiB of memory, empty buses.
struct Parts {
    vm: Arc<Vm>,
    mem: GuestMemoryMmap,
    buses: Arc<IoBuses>,
    exit: Arc<ExitSignal>,
}

fn parts() -> Parts {
    let kvm = Kvm::new().unwrap();
    let mut vm = Vm::new(&kvm).unwrap();
    let mem = create_guest_memory(16 << 20).unwrap();
    vm.register_memory(&mem).unwrap();
    Parts {
        vm: Arc::new(vm),
        mem,
        buses: Arc::new(IoBuses {
            pio: devices::Bus::new(),
            mmio: devices::Bus::new(),
        }),
        exit: Arc::new(ExitSignal::new().unwrap()),
    }
}

/// Registers what the builder registers for `disks`, restoring from `saved` if given.
fn manager(
    p: &Parts,
    saved: Option<&DevicesState>,
    disks: &[DiskConfig],
) -> Result<DeviceManager, DeviceManagerError> {
    let mut m = DeviceManager::new(
        p.vm.clone(),
        p.mem.clone(),
        p.buses.clone(),
        p.exit.clone(),
        saved,
        Box::new(std::io::sink()),
    )?;
    m.add_disks(disks)?;
    m.finish_restore()?;
    Ok(m)
}

fn disk(path: &Path, readonly: bool, id: Option<&str>) -> DiskConfig {
    DiskConfig {
        path: path.to_path_buf(),
        readonly,
        overlay: None,
        id: id.map(String::from),
    }
}

#[test]
fn devices_sit_where_they_always_did_and_info_reports_the_disks() {
    let dir = TempDir::new("info");
    let d0 = disk_image(&dir.0, "d0.img");
    let d1 = disk_image(&dir.0, "d1.img");
    let p = parts();
    let m = manager(
        &p,
        None,
        &[disk(&d0, false, None), disk(&d1, true, Some("data"))],
    )
    .unwrap();

    let at = |base, len, irq| Placement { base, len, irq };
    let info = m.info();
    assert_eq!(
        info,
        vec![
            DeviceInfo {
                id: "com1".into(),
                kind: "serial",
                bus: BusKind::Pio,
                placement: at(0x3f8, 8, Some(4)),
                disk: None,
            },
            DeviceInfo {
                id: "i8042".into(),
                kind: "i8042",
                bus: BusKind::Pio,
                placement: at(0x60, 5, None),
                disk: None,
            },
            DeviceInfo {
                id: "disk0".into(),
                kind: "disk",
                bus: BusKind::Mmio,
                placement: at(0xd000_0000, 0x1000, Some(5)),
                disk: Some(DiskDeviceInfo {
                    path: d0.clone(),
                    read_only: false,
                }),
            },
            DeviceInfo {
                id: "data".into(),
                kind: "disk",
                bus: BusKind::Mmio,
                placement: at(0xd000_1000, 0x1000, Some(6)),
                disk: Some(DiskDeviceInfo {
                    path: d1.clone(),
                    read_only: true,
                }),
            },
        ]
    );
    assert_eq!(
        m.cmdline_words(),
        [
            "virtio_mmio.device=4K@0xd0000000:5",
            "virtio_mmio.device=4K@0xd0001000:6"
        ]
    );
    assert_eq!(m.subscribers().len(), 2, "one subscriber per virtio device");
    assert_eq!(m.disks().len(), 2);
    // The transports answer on the MMIO bus: magic value "virt".
    let mut magic = [0u8; 4];
    assert!(p.buses.mmio.read(0xd000_1000, &mut magic));
    assert_eq!(&magic, b"virt");
}

#[test]
fn saved_devices_are_restored_by_id_and_mismatches_are_refused() {
    let dir = TempDir::new("restore");
    let d0 = disk_image(&dir.0, "d0.img");
    let disks = [disk(&d0, false, None)];
    let p = parts();
    let m = manager(&p, None, &disks).unwrap();
    // The serial port's scratch register (offset 7) holds a value that must come back.
    assert!(p.buses.pio.write(0x3f8 + 7, &[0x5a]));
    let saved = m.save_state().unwrap();
    let keys: Vec<(&str, &str)> = saved
        .devices
        .iter()
        .map(|d| (d.kind.as_str(), d.id.as_str()))
        .collect();
    assert_eq!(
        keys,
        [("serial", "com1"), ("i8042", "i8042"), ("disk", "disk0")]
    );
    assert!(saved.devices[2].state.get("transport").is_some());
    assert!(saved.devices[2].state.get("device").is_some());

    let q = parts();
    let back = manager(&q, Some(&saved), &disks).unwrap();
    assert_eq!(back.save_state().unwrap(), saved);
    let mut b = [0u8];
    assert!(q.buses.pio.read(0x3f8 + 7, &mut b));
    assert_eq!(b[0], 0x5a);

    // A saved device nothing registers.
    let mut stray = saved.clone();
    stray.devices.push(SavedDevice {
        id: "rng0".into(),
        kind: "rng".into(),
        state: serde_json::json!({}),
    });
    let e = manager(&parts(), Some(&stray), &disks).err().unwrap();
    assert_eq!(
        e.to_string(),
        "the snapshot holds rng rng0, which this VM does not have"
    );

    // A registered device with no saved state: the message disks always had.
    let mut missing = saved.clone();
    missing.devices.pop();
    let e = manager(&parts(), Some(&missing), &disks).err().unwrap();
    assert_eq!(
        e.to_string(),
        "the snapshot's disk state does not match disk disk0"
    );

    // The same id saved as another kind.
    let mut other = saved.clone();
    other.devices[2].kind = "net".into();
    let e = manager(&parts(), Some(&other), &disks).err().unwrap();
    assert!(matches!(e, DeviceManagerError::KindMismatch { .. }), "{e}");

    // State that is not the kind's state.
    let mut bad = saved;
    bad.devices[0].state = serde_json::json!("not a serial port");
    let e = manager(&parts(), Some(&bad), &disks).err().unwrap();
    assert!(matches!(e, DeviceManagerError::BadState { .. }), "{e}");
}

// ---- The acceptance test: a device from outside the configuration, through a snapshot. ----

/// A 32-bit MMIO scratch register: the smallest device with state.
struct ScratchRegister {
    value: u32,
}

#[derive(Serialize, Deserialize)]
struct ScratchState {
    value: u32,
}

/// What the register holds after a reset.
const SCRATCH_RESET: u32 = 0;
/// Where it sits: in the MMIO hole, past the virtio-mmio slots.
const SCRATCH_BASE: u64 = 0xd100_0000;
const SCRATCH_ID: &str = "scratch0";

impl BusDevice for ScratchRegister {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let bytes = self.value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut bytes = self.value.to_le_bytes();
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        self.value = u32::from_le_bytes(bytes);
    }
}

impl Persist for ScratchRegister {
    type State = ScratchState;
    type ConstructorArgs = ();
    type Error = std::convert::Infallible;

    fn save(&self) -> ScratchState {
        ScratchState { value: self.value }
    }

    fn restore(_: (), state: &ScratchState) -> Result<Self, Self::Error> {
        Ok(Self { value: state.value })
    }
}

/// The one registration the new device needs.
fn add_scratch(devices: &mut DeviceManager) -> Result<(), DeviceManagerError> {
    devices.add_mmio_device(
        SCRATCH_ID,
        "scratch",
        Placement {
            base: SCRATCH_BASE,
            len: 4,
            irq: None,
        },
        |args: DeviceArgs<'_, ScratchState>| match args.saved {
            None => Ok(ScratchRegister {
                value: SCRATCH_RESET,
            }),
            Some(state) => ScratchRegister::restore((), state),
        },
    )?;
    Ok(())
}

fn read_scratch(buses: &IoBuses) -> u32 {
    let mut b = [0u8; 4];
    assert!(buses.mmio.read(SCRATCH_BASE, &mut b), "no scratch device");
    u32::from_le_bytes(b)
}

/// The guest's serial output.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn passes(&self) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.starts_with("PASS "))
            .count()
    }

    /// Waits until the guest has printed more than `after` PASS lines.
    fn wait_pass(&self, after: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.passes() <= after {
            assert!(
                Instant::now() < deadline,
                "the guest printed no PASS line: {}",
                String::from_utf8_lossy(&self.0.lock().unwrap())
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The memory guest from the guest image cache (`$ARKVM_CACHE` or `~/.cache/arkvm`).
fn memory_guest() -> PathBuf {
    let cache = std::env::var("ARKVM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/arkvm")
        });
    let p = cache.join("guests/memory.elf");
    assert!(
        p.exists(),
        "guest image {} is missing: run guest-images/build-tiny.sh",
        p.display()
    );
    p
}

/// Takes a paused snapshot into `dir` the way `PUT /snapshot` with `"mode": "paused"` does.
/// This is the test's one call into capture (with the capture seam: `CaptureEngine::start` with
/// a paused `SnapshotRequest`, then `poll` until it ends).
fn take_paused_snapshot(vmm: &mut Machine, dir: &Path) {
    use crate::capture::{
        CaptureEngine, SnapshotMode, SnapshotRequest, SnapshotStrategy, SnapshotTarget,
    };
    let mut engine = CaptureEngine::new().unwrap();
    let request = SnapshotRequest {
        target: SnapshotTarget::Dir(dir.to_path_buf()),
        mode: SnapshotMode::Paused,
        strategy: SnapshotStrategy::Cow,
        key: None,
        compression: Default::default(),
    };
    engine.start(vmm, &request).unwrap();
    let ended = loop {
        if let Some(ended) = engine.poll(vmm) {
            break ended;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    ended.result.unwrap();
}

/// Guest memory from the snapshot's memory part, as `restore::from_dir` reads it.
fn memory_of(reader: &snapshot::SnapshotReader) -> Arc<dyn snapshot::ChunkSource> {
    Arc::new(reader.memory_part(MEMORY_PART).unwrap())
}

/// Restores the snapshot in `dir` through the one builder, with `extra` registered after the
/// configured devices: the restore path, with no restore-specific code for the new device.
fn restore_snapshot(
    dir: &Path,
    extra: ExtraDevices<'_>,
    out: Console,
) -> Result<(BuiltVm, VmSnapshotState), BuildError> {
    let reader = snapshot::SnapshotReader::open(dir).unwrap();
    let state: VmSnapshotState = reader.read_state_part(STATE_PART).unwrap();
    let restore = Restore {
        state: &state,
        memory: memory_of(&reader),
        label: "test snapshot",
    };
    let built = build_with_devices(&state.config, Some(restore), Box::new(out), extra)?;
    Ok((built, state))
}

#[test]
fn a_device_registered_outside_the_configuration_survives_a_snapshot_and_restore() {
    const VALUE: u32 = 0x5eed_cafe;
    assert_ne!(VALUE, SCRATCH_RESET, "the test must be able to fail");
    let dir = TempDir::new("accept");
    let snap = dir.0.join("snap");
    let config = VmConfig {
        name: "dm-test".into(),
        kernel: memory_guest(),
        initrd: None,
        cmdline: String::new(),
        memory_bytes: 64 << 20,
        vcpus: 1,
        disks: Vec::new(),
        nets: Vec::new(),
    };

    // Boot with the scratch register, set it through its bus, let the guest run, snapshot.
    let console = Console::default();
    let built = build_with_devices(&config, None, Box::new(console.clone()), &add_scratch).unwrap();
    assert_eq!(read_scratch(&built.buses), SCRATCH_RESET);
    assert!(built.buses.mmio.write(SCRATCH_BASE, &VALUE.to_le_bytes()));
    let mut vmm = Machine::new(config, built, None);
    vmm.resume().unwrap();
    console.wait_pass(0);
    take_paused_snapshot(&mut vmm, &snap);
    drop(vmm);

    let state: VmSnapshotState = snapshot::SnapshotReader::open(&snap)
        .unwrap()
        .read_state_part(STATE_PART)
        .unwrap();
    let saved = state
        .devices
        .devices
        .iter()
        .find(|d| d.id == SCRATCH_ID)
        .expect("the snapshot holds the scratch register");
    assert_eq!(saved.kind, "scratch");
    assert_eq!(saved.state, serde_json::json!({ "value": VALUE }));

    // A VM without the device refuses the snapshot, naming the device.
    let refused = restore_snapshot(&snap, &|_| Ok(()), Console::default());
    let e = crate::error_chain(&refused.err().expect("the restore must be refused"));
    assert!(e.contains("scratch scratch0"), "{e}");

    // Restored through the one builder, with the same registration: the value is back.
    let console = Console::default();
    let (built, state) = restore_snapshot(&snap, &add_scratch, console.clone()).unwrap();
    assert_eq!(read_scratch(&built.buses), VALUE);

    // And the restored guest runs on.
    let mut vmm = Machine::new(state.config.clone(), built, None);
    vmm.resume().unwrap();
    console.wait_pass(0);
    vmm.pause().unwrap();
    assert_eq!(read_scratch(&vmm.built.buses), VALUE);
}

//! Tests of the virtio-blk device with hand-built descriptor chains, hostile ones included.

use super::*;
use crate::virtio::mmio::{MmioTransport, MmioTransportArgs};
use crate::virtio::test_utils::{guest_memory, TestQueue, F_NEXT, F_WRITE};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

const DISK_SIZE: u64 = 1 << 20;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;
const OUTSIDE: u64 = 0x4000_0000; // beyond the 16 MiB of guest memory

struct Rig {
    _dir: TempDir,
    path: std::path::PathBuf,
    mem: GuestMemoryMmap,
    q: TestQueue,
    block: Block,
    irq: Arc<VirtioInterrupt>,
}

fn rig(readonly: bool) -> Rig {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("disk.img");
    std::fs::write(&path, vec![0u8; DISK_SIZE as usize]).unwrap();
    let cfg = DiskConfig {
        path: path.clone(),
        readonly,
        overlay: None,
        id: Some("serial-1".into()),
    };
    let mut block = Block::from_config(&cfg, 0).unwrap();
    let mem = guest_memory();
    let q = TestQueue::new(8);
    q.configure(&mut block.queues_mut()[0]);
    block.set_acked_features(block.avail_features());
    let irq = Arc::new(VirtioInterrupt::new().unwrap());
    block.activate(mem.clone(), irq.clone()).unwrap();
    Rig {
        _dir: dir,
        path,
        mem,
        q,
        block,
        irq,
    }
}

impl Rig {
    fn header(&self, req: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Posts a chain, lets the device run, and returns (used len, status byte).
    fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> (u32, u8) {
        let before = self.q.used_idx(&self.mem);
        self.q.add_chain(&self.mem, bufs);
        self.block.process_queue(0);
        assert_eq!(
            self.q.used_idx(&self.mem),
            before.wrapping_add(1),
            "request completed"
        );
        let (_, len) = self.q.used_elem(&self.mem, before);
        (len, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.header(VIRTIO_BLK_T_OUT, sector);
        self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
        self.submit(&[
            (HDR, 16, false),
            (DATA, data.len() as u32, false),
            (STATUS, 1, true),
        ])
        .1
    }

    fn read(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>) {
        self.header(VIRTIO_BLK_T_IN, sector);
        let (used, status) = self.submit(&[
            (HDR, 16, false),
            (DATA, len as u32, true),
            (STATUS, 1, true),
        ]);
        if status == 0 {
            assert_eq!(used as usize, len + 1);
        }
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(DATA)).unwrap();
        (status, v)
    }

    fn works(&mut self) -> bool {
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        self.write(3, &pattern) == 0 && self.read(3, 1024) == (0, pattern)
    }
}

#[test]
fn write_read_flush_and_get_id() {
    let mut r = rig(false);
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    assert_eq!(r.write(100, &data), 0);
    assert_eq!(r.read(100, 8192), (0, data.clone()));
    // Data split over several descriptors, header split too.
    r.header(VIRTIO_BLK_T_IN, 100);
    let (len, status) = r.submit(&[
        (HDR, 4, false),
        (HDR + 4, 12, false),
        (DATA, 512, true),
        (DATA + 0x1000, 1024, true),
        (STATUS, 1, true),
    ]);
    assert_eq!((len, status), (1537, 0));
    let mut second = vec![0u8; 1024];
    r.mem
        .read_slice(&mut second, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(second, data[512..1536]);

    r.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(r.submit(&[(HDR, 16, false), (STATUS, 1, true)]), (1, 0));
    let file = std::fs::read(&r.path).unwrap();
    assert_eq!(&file[100 * 512..100 * 512 + 8192], &data[..]);

    r.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]),
        (21, 0)
    );
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..9], b"serial-1\0");

    r.header(11, 0); // DISCARD: not offered
    assert_eq!(r.submit(&[(HDR, 16, false), (STATUS, 1, true)]), (1, 2));
    assert_eq!(
        r.block.counters(),
        RequestCounters {
            ok: 5,
            ioerr: 0,
            unsupported: 1,
            // Two reads (8192 and 512 + 1024 bytes) and one write; the id is not disk data.
            read_bytes: 8192 + 1536,
            written_bytes: 8192,
        }
    );
    assert!(r.irq.status() & crate::virtio::VIRTIO_MMIO_INT_VRING != 0);
}

#[test]
fn a_long_queue_is_served_in_batches() {
    let mut r = rig(false);
    r.q = TestQueue::new(8);
    let mut q64 = TestQueue::new(64);
    r.block.reset();
    q64.configure(&mut r.block.queues_mut()[0]);
    r.block.activate(r.mem.clone(), r.irq.clone()).unwrap();
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    for _ in 0..40 {
        q64.add_chain(&r.mem, &[(HDR, 16, false), (STATUS, 1, true)]);
    }
    r.block.process_queue(0);
    assert_eq!(q64.used_idx(&r.mem), BATCH as u16);
    assert_eq!(
        r.block.queue_events()[0].read().unwrap(),
        1,
        "rescheduled itself"
    );
    r.block.process_queue(0);
    assert_eq!(q64.used_idx(&r.mem), 40);
    assert!(
        r.block.queue_events()[0].read().is_err(),
        "nothing left to do"
    );
}

#[test]
fn config_space_reports_capacity_and_features() {
    let r = rig(true);
    let mut cap = [0u8; 8];
    r.block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SIZE / 512);
    let mut seg = [0u8; 4];
    r.block.read_config(12, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), u32::from(QUEUE_SIZE) - 2);
    let mut far = [0xffu8; 4];
    r.block.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
    assert_ne!(r.block.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        rig(false).block.avail_features() & (1 << VIRTIO_BLK_F_RO),
        0
    );
}

#[test]
fn readonly_disk_refuses_writes_and_stays_unchanged() {
    let mut r = rig(true);
    let before = std::fs::read(&r.path).unwrap();
    assert_eq!(r.write(0, &[0xab; 4096]), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(r.read(0, 512), (0, vec![0; 512]));
    assert_eq!(std::fs::read(&r.path).unwrap(), before);
}

#[test]
fn malformed_requests_get_an_error_status_and_the_device_goes_on() {
    let mut r = rig(false);
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    // Data buffer outside guest memory.
    r.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (OUTSIDE, 512, true), (STATUS, 1, true)])
            .1,
        ioerr
    );
    // Data buffer that starts inside memory and runs off its end.
    r.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        r.submit(&[
            (HDR, 16, false),
            ((16 << 20) - 512, 1024, false),
            (STATUS, 1, true)
        ])
        .1,
        ioerr
    );
    // Wrong direction: a device-readable buffer for a read, and readable after writable.
    r.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)])
            .1,
        ioerr
    );
    r.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        r.submit(&[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA, 512, false),
            (STATUS, 1, true)
        ])
        .1,
        ioerr
    );
    // The header in a device-writable buffer, and a header that is too short.
    r.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(r.submit(&[(HDR, 16, true), (STATUS, 1, true)]).1, ioerr);
    assert_eq!(r.submit(&[(HDR, 8, false), (STATUS, 1, true)]).1, ioerr);
    // Past the end of the disk, a huge sector, and a partial sector.
    r.header(VIRTIO_BLK_T_IN, DISK_SIZE / 512);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)])
            .1,
        ioerr
    );
    r.header(VIRTIO_BLK_T_OUT, u64::MAX / 256);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)])
            .1,
        ioerr
    );
    r.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 100, false), (STATUS, 1, true)])
            .1,
        ioerr
    );
    assert_eq!(r.block.counters().ioerr, 9);
    assert!(!r.irq.needs_reset());
    assert!(r.works(), "the device still serves good requests");
}

/// Posts a chain built from raw descriptors, runs the device, and says whether it gave up.
fn hostile(build: impl FnOnce(&mut Rig)) -> Rig {
    let mut r = rig(false);
    assert!(r.works());
    build(&mut r);
    r.block.process_queue(0);
    r
}

#[test]
fn unanswerable_chains_put_the_device_in_needs_reset() {
    type Build = Box<dyn FnOnce(&mut Rig)>;
    let cases: Vec<(&str, Build)> = vec![
        (
            "loop",
            Box::new(|r: &mut Rig| {
                r.header(VIRTIO_BLK_T_IN, 0);
                r.q.write_desc(&r.mem, 4, HDR, 16, F_NEXT, 5);
                r.q.write_desc(&r.mem, 5, DATA, 512, F_NEXT | F_WRITE, 4);
                r.q.publish(&r.mem, 4);
            }),
        ),
        (
            "next past the queue",
            Box::new(|r: &mut Rig| {
                r.q.write_desc(&r.mem, 4, HDR, 16, F_NEXT, 200);
                r.q.publish(&r.mem, 4);
            }),
        ),
        (
            "head past the queue",
            Box::new(|r: &mut Rig| r.q.publish(&r.mem, 9)),
        ),
        (
            "status outside memory",
            Box::new(|r: &mut Rig| {
                r.q.add_chain(&r.mem, &[(HDR, 16, false), (OUTSIDE, 1, true)]);
            }),
        ),
        (
            "status not writable",
            Box::new(|r: &mut Rig| {
                r.q.add_chain(&r.mem, &[(HDR, 16, false), (STATUS, 1, false)]);
            }),
        ),
        (
            "avail index far ahead",
            Box::new(|r: &mut Rig| r.q.set_avail_idx(&r.mem, 1000)),
        ),
    ];
    for (name, build) in cases {
        let mut r = hostile(build);
        assert!(r.irq.needs_reset(), "{name}: NEEDS_RESET");
        assert_ne!(
            r.irq.status() & crate::virtio::VIRTIO_MMIO_INT_CONFIG,
            0,
            "{name}"
        );
        // Nothing more is served until the driver resets the device; then it works again.
        r.q.add_chain(&r.mem, &[(HDR, 16, false), (STATUS, 1, true)]);
        let used = r.q.used_idx(&r.mem);
        r.block.process_queue(0);
        assert_eq!(r.q.used_idx(&r.mem), used, "{name}: stopped");
        r.block.reset();
        r.irq.set_needs_reset(false);
        r.q = TestQueue::new(8);
        r.mem
            .write_slice(&[0u8; 0x2000], GuestAddress(r.q.avail))
            .unwrap();
        r.q.configure(&mut r.block.queues_mut()[0]);
        r.block.activate(r.mem.clone(), r.irq.clone()).unwrap();
        assert!(r.works(), "{name}: works after reset");
    }
}

#[test]
fn activation_needs_a_usable_queue() {
    let mut r = rig(false);
    r.block.reset();
    assert!(!r.block.is_activated());
    assert!(matches!(
        r.block.activate(r.mem.clone(), r.irq.clone()),
        Err(ActivateError::QueueNotUsable(0))
    ));
    let mut q = TestQueue::new(8);
    q.desc = OUTSIDE;
    q.configure(&mut r.block.queues_mut()[0]);
    assert!(r.block.activate(r.mem.clone(), r.irq.clone()).is_err());
}

#[test]
fn event_loop_serves_the_queue() {
    use event_manager::{EventManager, SubscriberOps};
    let r = rig(false);
    let (mem, mut q, irq, path) = (
        r.mem.clone(),
        TestQueue::new(8),
        r.irq.clone(),
        r.path.clone(),
    );
    let block = Arc::new(std::sync::Mutex::new(r.block));
    let mut em = EventManager::<Arc<std::sync::Mutex<Block>>>::new().unwrap();
    em.add_subscriber(block.clone());
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    q.add_chain(
        &mem,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    block.lock().unwrap().queue_events()[0].write(1).unwrap();
    assert!(em.run_with_timeout(1000).unwrap() >= 1);
    assert_eq!(q.used_idx(&mem), 1);
    assert_eq!(irq.evt().read().unwrap(), 1);
    assert_eq!(&std::fs::read(path).unwrap()[..512], &[0x5a; 512][..]);
    drop(r._dir);
}

#[test]
fn save_and_restore_continue_the_queue() {
    let r = rig(false);
    let Rig {
        _dir,
        mem,
        mut q,
        block,
        ..
    } = r;
    let disk = block.disk().clone();
    let dev: Arc<std::sync::Mutex<Block>> = Arc::new(std::sync::Mutex::new(block));
    let mut t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
    // Bring the transport to DRIVER_OK over the bus, like a driver.
    let w = |t: &mut MmioTransport, off: u64, v: u32| {
        crate::bus::BusDevice::write(t, off, &v.to_le_bytes())
    };
    dev.lock().unwrap().reset();
    w(&mut t, 0x70, 3);
    w(&mut t, 0x24, 1);
    w(&mut t, 0x20, 1);
    w(&mut t, 0x70, 11);
    w(&mut t, 0x38, 8);
    w(&mut t, 0x80, q.desc as u32);
    w(&mut t, 0x90, q.avail as u32);
    w(&mut t, 0xa0, q.used as u32);
    w(&mut t, 0x44, 1);
    w(&mut t, 0x70, 15);
    assert!(dev.lock().unwrap().is_activated());

    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
    for _ in 0..3 {
        q.add_chain(
            &mem,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
    }
    dev.lock().unwrap().process_queue(0);
    assert_eq!(q.used_idx(&mem), 3);

    let block_state = dev.lock().unwrap().save();
    let transport_state = t.save();
    assert_eq!(transport_state.queues[0].next_avail, 3);
    assert_eq!(block_state.id, "serial-1");
    let json = serde_json::to_string(&(&block_state, &transport_state)).unwrap();
    let (bs, ts): (BlockState, crate::virtio::MmioTransportState) =
        serde_json::from_str(&json).unwrap();
    drop(t);
    drop(dev);

    let dev2 = Arc::new(std::sync::Mutex::new(
        Block::restore(BlockArgs { disk: disk.clone() }, &bs).unwrap(),
    ));
    let t2 = MmioTransport::restore(
        MmioTransportArgs {
            mem: mem.clone(),
            device: dev2.clone(),
        },
        &ts,
    )
    .unwrap();
    assert_eq!(t2.save(), transport_state);
    // The guest goes on: a read of what it wrote, on the next ring slots.
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    q.add_chain(
        &mem,
        &[
            (HDR, 16, false),
            (DATA + 0x1000, 512, true),
            (STATUS, 1, true),
        ],
    );
    dev2.lock().unwrap().process_queue(0);
    assert_eq!(q.used_idx(&mem), 4);
    assert_eq!(q.used_elem(&mem, 3).1, 513);
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(back, [0x11; 512]);

    let other = BlockState {
        disk_size: 4096,
        ..bs
    };
    assert!(matches!(
        Block::restore(BlockArgs { disk }, &other),
        Err(BlockError::StateMismatch { .. })
    ));
}

#[path = "device_fuzz_tests.rs"]
mod fuzz;

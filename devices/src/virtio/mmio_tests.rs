//! Tests of the virtio-mmio transport against a stub device.

use super::*;
use crate::virtio::test_utils::{guest_memory, TestQueue};
use crate::virtio::ActivateError;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

struct StubDevice {
    queues: Vec<Queue>,
    evts: Vec<EventFd>,
    acked: u64,
    active: bool,
    resets: u32,
    config: [u8; 8],
}

const STUB_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | 0b101;

impl StubDevice {
    fn shared() -> Arc<Mutex<StubDevice>> {
        Arc::new(Mutex::new(StubDevice {
            queues: vec![Queue::new(16).unwrap()],
            evts: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
            acked: 0,
            active: false,
            resets: 0,
            config: [1, 2, 3, 4, 5, 6, 7, 8],
        }))
    }
}

impl VirtioDevice for StubDevice {
    fn device_type(&self) -> u32 {
        7
    }
    fn avail_features(&self) -> u64 {
        STUB_FEATURES
    }
    fn acked_features(&self) -> u64 {
        self.acked
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn queues(&self) -> &[Queue] {
        &self.queues
    }
    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Some(dst) = self
            .config
            .get_mut(offset as usize..offset as usize + data.len())
        {
            dst.copy_from_slice(data);
        }
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _i: Arc<VirtioInterrupt>,
    ) -> Result<(), super::super::ActivateError> {
        if !self.queues[0].is_valid(&mem) {
            return Err(ActivateError::QueueNotUsable(0));
        }
        self.active = true;
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.active
    }
    fn reset(&mut self) {
        self.active = false;
        self.resets += 1;
        self.queues.iter_mut().for_each(Queue::reset);
    }
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn transport() -> (MmioTransport, Arc<Mutex<StubDevice>>) {
    let dev = StubDevice::shared();
    let t = MmioTransport::new(guest_memory(), dev.clone()).unwrap();
    (t, dev)
}

/// Runs the driver's initialisation sequence (spec 3.1.1) with the test queue layout.
fn bring_up(t: &mut MmioTransport, q: &TestQueue) {
    wr(t, REG_STATUS, ACKNOWLEDGE);
    wr(t, REG_STATUS, ACKNOWLEDGE | DRIVER);
    wr(t, REG_DRIVER_FEATURES_SEL, 1);
    wr(t, REG_DRIVER_FEATURES, 1); // VERSION_1
    wr(t, REG_DRIVER_FEATURES_SEL, 0);
    wr(t, REG_DRIVER_FEATURES, 0b100);
    wr(t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_ne!(rd(t, REG_STATUS) & FEATURES_OK, 0);
    wr(t, REG_QUEUE_SEL, 0);
    wr(t, REG_QUEUE_NUM, u32::from(q.size));
    wr(t, REG_QUEUE_DESC_LOW, q.desc as u32);
    wr(t, REG_QUEUE_DESC_HIGH, 0);
    wr(t, REG_QUEUE_DRIVER_LOW, q.avail as u32);
    wr(t, REG_QUEUE_DRIVER_HIGH, 0);
    wr(t, REG_QUEUE_DEVICE_LOW, q.used as u32);
    wr(t, REG_QUEUE_DEVICE_HIGH, 0);
    wr(t, REG_QUEUE_READY, 1);
    wr(
        t,
        REG_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
}

#[test]
fn cmdline_entry_matches_the_linux_syntax() {
    assert_eq!(
        cmdline_entry(0xd000_1000, 6),
        "virtio_mmio.device=4K@0xd0001000:6"
    );
}

#[test]
fn identity_registers_and_config_space() {
    let (mut t, _) = transport();
    assert_eq!(rd(&mut t, REG_MAGIC), 0x7472_6976);
    assert_eq!(rd(&mut t, REG_VERSION), 2);
    assert_eq!(rd(&mut t, REG_DEVICE_ID), 7);
    assert_eq!(rd(&mut t, REG_VENDOR_ID), VENDOR_ID);
    assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 16);
    wr(&mut t, REG_QUEUE_SEL, 3);
    assert_eq!(
        rd(&mut t, REG_QUEUE_NUM_MAX),
        0,
        "a missing queue has size 0"
    );
    let mut b = [0u8; 2];
    t.read(0x102, &mut b);
    assert_eq!(b, [3, 4]);
    t.write(0x100, &[9]);
    t.read(0x100, &mut b);
    assert_eq!(b, [9, 2]);
    // Register accesses must be aligned 32-bit; anything else reads 0 and changes nothing.
    let mut short = [0xffu8; 2];
    t.read(REG_MAGIC, &mut short);
    assert_eq!(short, [0, 0]);
    t.read(REG_MAGIC + 1, &mut [0u8; 4]);
    t.write(REG_STATUS, &[1]);
    t.write(REG_STATUS + 2, &1u32.to_le_bytes());
    assert_eq!(rd(&mut t, REG_STATUS), 0);
}

#[test]
fn feature_negotiation_checks_the_driver() {
    let (mut t, dev) = transport();
    wr(&mut t, REG_DEVICE_FEATURES_SEL, 0);
    assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 0b101);
    wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1);
    wr(&mut t, REG_DEVICE_FEATURES_SEL, 2);
    assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 0);

    // Features before DRIVER are ignored.
    wr(&mut t, REG_DRIVER_FEATURES, 0b1);
    wr(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER);
    // No VERSION_1: FEATURES_OK stays clear.
    wr(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut t, REG_STATUS), ACKNOWLEDGE | DRIVER);
    // A feature the device does not offer: refused too.
    wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
    wr(&mut t, REG_DRIVER_FEATURES, 1);
    wr(&mut t, REG_DRIVER_FEATURES_SEL, 0);
    wr(&mut t, REG_DRIVER_FEATURES, 0b10);
    wr(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut t, REG_STATUS) & FEATURES_OK, 0);
    wr(&mut t, REG_DRIVER_FEATURES, 0b1);
    wr(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_ne!(rd(&mut t, REG_STATUS) & FEATURES_OK, 0);
    assert_eq!(dev.lock().unwrap().acked, (1 << 32) | 1);
    // The driver cannot clear bits without a reset.
    wr(&mut t, REG_STATUS, ACKNOWLEDGE);
    assert_eq!(rd(&mut t, REG_STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

#[test]
fn queue_setup_activates_and_notify_signals() {
    let (mut t, dev) = transport();
    let q = TestQueue::new(8);
    // Queue registers before FEATURES_OK are ignored.
    wr(&mut t, REG_QUEUE_NUM, 8);
    assert_eq!(dev.lock().unwrap().queues[0].size(), 16);
    bring_up(&mut t, &q);
    assert!(dev.lock().unwrap().active);
    assert_eq!(
        rd(&mut t, REG_STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    );
    assert_eq!(rd(&mut t, REG_QUEUE_READY), 1);
    {
        let d = dev.lock().unwrap();
        assert_eq!(d.queues[0].size(), 8);
        assert_eq!(d.queues[0].avail_ring(), q.avail);
    }
    // After DRIVER_OK the queue cannot be moved.
    wr(&mut t, REG_QUEUE_DRIVER_LOW, 0x4000);
    assert_eq!(dev.lock().unwrap().queues[0].avail_ring(), q.avail);

    // QueueNotify through the bus signals the same eventfd an ioeventfd would.
    assert!(t.queue_evts()[0].read().is_err());
    wr(&mut t, NOTIFY_REG_OFFSET, 0);
    assert_eq!(t.queue_evts()[0].read().unwrap(), 1);
    wr(&mut t, NOTIFY_REG_OFFSET, 9); // no such queue: ignored
    assert!(t.queue_evts()[0].read().is_err());

    // Interrupt status and ack.
    t.interrupt().trigger(crate::virtio::VIRTIO_MMIO_INT_VRING);
    assert_eq!(t.irq_evt().read().unwrap(), 1);
    assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 1);
    wr(&mut t, REG_INTERRUPT_ACK, 1);
    assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);

    // Reset.
    wr(&mut t, REG_STATUS, 0);
    assert_eq!(rd(&mut t, REG_STATUS), 0);
    let d = dev.lock().unwrap();
    assert!(!d.active);
    assert_eq!(d.resets, 1);
    assert!(!d.queues[0].ready());
}

#[test]
fn unusable_queue_sets_needs_reset() {
    let (mut t, dev) = transport();
    let mut q = TestQueue::new(8);
    q.used = 0x7fff_0000; // outside the 16 MiB of guest memory
    bring_up(&mut t, &q);
    assert!(!dev.lock().unwrap().active);
    let status = rd(&mut t, REG_STATUS);
    assert_ne!(status & DEVICE_NEEDS_RESET, 0);
    assert_ne!(
        rd(&mut t, REG_INTERRUPT_STATUS) & crate::virtio::VIRTIO_MMIO_INT_CONFIG,
        0
    );
    // Misaligned and oversized settings are ignored rather than applied.
    wr(&mut t, REG_STATUS, 0);
    assert_eq!(rd(&mut t, REG_STATUS), 0, "reset clears NEEDS_RESET");
    wr(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER);
    wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
    wr(&mut t, REG_DRIVER_FEATURES, 1);
    wr(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    wr(&mut t, REG_QUEUE_DESC_LOW, 0x1001);
    wr(&mut t, REG_QUEUE_NUM, 0x10000);
    wr(&mut t, REG_QUEUE_NUM, 3);
    let d = dev.lock().unwrap();
    assert_ne!(d.queues[0].desc_table(), 0x1001);
    assert_eq!(d.queues[0].size(), 16);
}

#[test]
fn save_and_restore_resume_the_queue() {
    let (mut t, _dev) = transport();
    let q = TestQueue::new(8);
    bring_up(&mut t, &q);
    {
        let mut d = t.device().lock().unwrap();
        d.queues_mut()[0].set_next_avail(3);
        d.queues_mut()[0].set_next_used(3);
    }
    t.interrupt().trigger(crate::virtio::VIRTIO_MMIO_INT_VRING);
    let state = t.save();
    assert_eq!(state.queues[0].next_avail, 3);

    let dev2 = StubDevice::shared();
    let mut t2 = MmioTransport::restore(
        MmioTransportArgs {
            mem: guest_memory(),
            device: dev2.clone(),
        },
        &state,
    )
    .unwrap();
    assert_eq!(t2.save(), state);
    assert!(dev2.lock().unwrap().active);
    assert_eq!(dev2.lock().unwrap().acked, state.driver_features);
    assert_eq!(rd(&mut t2, REG_INTERRUPT_STATUS), 1);
    assert_eq!(
        t2.queue_evts()[0].read().unwrap(),
        1,
        "restore kicks the queue"
    );
    assert_eq!(
        t2.irq_evt().read().unwrap(),
        1,
        "restore re-raises a pending interrupt"
    );

    let mut bad = state.clone();
    bad.device_type = 2;
    assert!(matches!(
        MmioTransport::restore(
            MmioTransportArgs {
                mem: guest_memory(),
                device: StubDevice::shared()
            },
            &bad
        ),
        Err(MmioTransportError::DeviceTypeMismatch { .. })
    ));
    let mut bad = state;
    bad.queues[0].size = 5;
    assert!(matches!(
        MmioTransport::restore(
            MmioTransportArgs {
                mem: guest_memory(),
                device: StubDevice::shared()
            },
            &bad
        ),
        Err(MmioTransportError::BadQueue { .. })
    ));
}

//! Fuzz target for the virtio-blk descriptor-chain handling: random and adversarial descriptor
//! tables (loops, chains past the table, reads into read-only buffers, lengths of 0 and 4 GiB,
//! addresses outside guest memory or wrapping), random request headers and available-ring
//! indices, posted to the device. No input may panic the device, and guest memory outside the
//! buffers the descriptors name (a canary region) never changes. 256 cases by default (about 2 s);
//! `ARKVM_FUZZ_CASES=N` for a long run (docs/fuzzing.md).

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};

use super::*;

const CANARY: u64 = 0xF0_0000;
const CANARY_LEN: usize = 0x4_0000;

fn cases() -> u32 {
    std::env::var("ARKVM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn address() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(HDR),
        Just(DATA),
        Just(STATUS),
        Just(OUTSIDE),
        Just(u64::MAX - 15),
        Just(0xFF_FFFF),
        (0u64..0x700).prop_map(|k| 0x4_0000 + k * 0x1000 + (k % 7)),
    ]
}

fn length() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(16),
        Just(512),
        Just(4096),
        Just(0x1_0000),
        Just(u32::MAX),
        0u32..0x8_0000,
    ]
}

/// One descriptor: address, length, flags (mostly NEXT and WRITE), next index (some past the
/// table).
fn descriptor() -> impl Strategy<Value = (u64, u32, u16, u16)> {
    let flags = prop_oneof![
        4 => 0u16..4,
        1 => any::<u16>(),
    ];
    (address(), length(), flags, 0u16..10)
}

fn request_type() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(VIRTIO_BLK_T_IN),
        Just(VIRTIO_BLK_T_OUT),
        Just(VIRTIO_BLK_T_FLUSH),
        Just(VIRTIO_BLK_T_GET_ID),
        any::<u32>(),
    ]
}

fn sector() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..(DISK_SIZE / 512 + 4),
        Just(u64::MAX),
        Just(u64::MAX / 512),
        any::<u64>(),
    ]
}

proptest! {
    #![proptest_config(Config {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    })]

    #[test]
    fn descriptor_chains(
        descs in proptest::collection::vec(descriptor(), 1..9),
        req in request_type(),
        sec in sector(),
        heads in proptest::collection::vec(0u16..10, 1..4),
        avail in proptest::option::of(any::<u16>()),
    ) {
        let mut r = rig(false);
        let canary: Vec<u8> = (0..CANARY_LEN).map(|i| (i * 13 + 5) as u8).collect();
        r.mem.write_slice(&canary, GuestAddress(CANARY)).unwrap();
        r.header(req, sec);
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            r.q.write_desc(&r.mem, i as u16, addr, len, flags, next);
        }
        for head in heads {
            r.q.publish(&r.mem, head);
        }
        if let Some(idx) = avail {
            r.q.set_avail_idx(&r.mem, idx);
        }
        r.block.process_queue(0);
        let mut after = vec![0u8; CANARY_LEN];
        r.mem.read_slice(&mut after, GuestAddress(CANARY)).unwrap();
        prop_assert!(after == canary, "guest memory outside the descriptors changed");
    }
}

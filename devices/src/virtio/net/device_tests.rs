//! Unit tests of the virtio-net device: features, configuration space, save/restore, a busy tap.

use super::*;
use crate::virtio::net::test_tap::TestTap;

#[test]
fn save_restore_round_trip_and_busy_tap() {
    let tap = TestTap::new("d");
    let other = TestTap::new("e");
    let commit = OutputCommit::new();
    let mac = [0x52, 0x54, 0, 1, 2, 3];
    let mut net = Net::new("net0", &tap.name, mac, commit.clone()).unwrap();
    assert_eq!(net.device_type(), VIRTIO_ID_NET);
    assert_eq!(net.queues().len(), 2);
    assert!(net.queues().iter().all(|q| q.max_size() >= 256));
    let f = net.avail_features();
    assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(f & (1 << VIRTIO_NET_F_MAC), 0);
    net.set_acked_features(f | (1 << 40));
    assert_eq!(net.acked_features(), f, "unoffered bits are not acked");
    let mut cfg = [0u8; 8];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &mac);
    assert_eq!(&cfg[6..], &[0, 0]);
    // The tap is held: a second device on it is refused as busy.
    let busy = Net::new("net1", &tap.name, mac, commit.clone()).unwrap_err();
    assert!(
        matches!(
            busy,
            NetError::Tap {
                source: TapError::Busy(_),
                ..
            }
        ),
        "{busy:?}"
    );
    let state = net.save();
    assert_eq!(state.tap, tap.name);
    drop(net);
    // Restore onto another tap (as `restore --net id=..,tap=..` does).
    let back = Net::restore(
        NetArgs {
            tap: other.name.clone(),
            commit: commit.clone(),
        },
        &state,
    )
    .unwrap();
    assert_eq!(back.mac(), mac);
    assert_eq!(back.acked_features(), f);
    assert_eq!(back.tap_name(), other.name);
    let json = serde_json::to_string(&back.save()).unwrap();
    let again: NetState = serde_json::from_str(&json).unwrap();
    assert_eq!(again.mac, mac);
    let bad = NetState {
        avail_features: 1,
        ..state
    };
    drop(back);
    assert!(matches!(
        Net::restore(
            NetArgs {
                tap: other.name.clone(),
                commit
            },
            &bad
        ),
        Err(NetError::StateMismatch { .. })
    ));
}

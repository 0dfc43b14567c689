//! The virtio-net device: feature bits, configuration space (the MAC), event-loop wiring, and
//! save/restore. Frame movement is in `rx.rs` and `tx.rs`.

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::commit::{GateStats, OutputCommit, TxGate};
use super::config::format_mac;
use super::tap::{Tap, TapError};
use super::{MAX_FRAME, NET_HDR_LEN, QUEUE_SIZE};
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::GuestMemoryMmap;
use snapshot::Persist;

/// Queue indexes.
pub(super) const RX: usize = 0;
pub(super) const TX: usize = 1;
/// Event-loop data of the tap fd (after the queue indexes).
const TAP_EVENT: u32 = 2;

/// Why a network device could not be built or restored.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap could not be attached.
    #[error("network device {id}")]
    Tap {
        id: String,
        #[source]
        source: TapError,
    },
    /// A queue eventfd could not be created.
    #[error("cannot create a virtio-net eventfd")]
    EventFd(#[source] std::io::Error),
    /// The saved state does not fit this build of the device.
    #[error("saved virtio-net state of '{id}' does not match: {reason}")]
    StateMismatch { id: String, reason: String },
}

/// Frame counters of one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest (without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames from the tap that were dropped (too large for the guest's buffer).
    pub rx_dropped: u64,
    /// Frames the guest transmitted.
    pub tx_frames: u64,
    /// Bytes the guest transmitted (without the virtio-net header).
    pub tx_bytes: u64,
    /// Transmitted chains dropped as malformed (no header, too large).
    pub tx_dropped: u64,
    /// Times the device found the driver's rings broken and asked for a reset.
    pub device_errors: u64,
}

#[derive(Debug)]
pub(super) struct Active {
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-net device on a tap.
pub struct Net {
    pub(super) id: String,
    pub(super) mac: [u8; 6],
    avail_features: u64,
    acked_features: u64,
    pub(super) queues: Vec<Queue>,
    pub(super) queue_evts: Vec<EventFd>,
    pub(super) active: Option<Active>,
    pub(super) broken: bool,
    pub(super) gate: Arc<TxGate>,
    pub(super) stats: NetStats,
    /// The last device error, for status reports.
    pub(super) last_error: Option<String>,
    /// A frame read from the tap that waits for an RX buffer: its length in `rx_buf`.
    pub(super) rx_pending: Option<usize>,
    pub(super) rx_buf: Vec<u8>,
    pub(super) tx_buf: Vec<u8>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("id", &self.id)
            .field("tap", &self.gate.tap().name())
            .field("mac", &format_mac(&self.mac))
            .finish()
    }
}

impl Net {
    /// A network device `id` with guest MAC `mac` on the tap `tap_name`, transmitting through
    /// `commit`'s gate.
    pub fn new(
        id: impl Into<String>,
        tap_name: &str,
        mac: [u8; 6],
        commit: Arc<OutputCommit>,
    ) -> Result<Self, NetError> {
        let id = id.into();
        let tap = Tap::open(tap_name).map_err(|source| NetError::Tap {
            id: id.clone(),
            source,
        })?;
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd);
        let queue_evts = vec![evt()?, evt()?];
        let wake = queue_evts[TX].try_clone().map_err(NetError::EventFd)?;
        let gate = TxGate::new(Arc::new(tap), commit, wake);
        Ok(Self {
            id,
            mac,
            avail_features: (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC),
            acked_features: 0,
            queues: vec![
                Queue::new(QUEUE_SIZE).expect("QUEUE_SIZE is a power of two"),
                Queue::new(QUEUE_SIZE).expect("QUEUE_SIZE is a power of two"),
            ],
            queue_evts,
            active: None,
            broken: false,
            gate,
            stats: NetStats::default(),
            last_error: None,
            rx_pending: None,
            rx_buf: vec![0; NET_HDR_LEN + MAX_FRAME],
            tx_buf: Vec::with_capacity(NET_HDR_LEN + MAX_FRAME),
        })
    }

    /// The stable device id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The tap's name.
    pub fn tap_name(&self) -> &str {
        self.gate.tap().name()
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Frame counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Output-commit counters (held frames, release lag).
    pub fn gate_stats(&self) -> GateStats {
        self.gate.stats()
    }

    /// Whether the device asked for a reset, and why.
    pub fn error(&self) -> Option<&str> {
        if self.broken {
            self.last_error.as_deref().or(Some("needs reset"))
        } else {
            None
        }
    }

    /// The driver broke the rings: stop serving them and ask for a reset.
    pub(super) fn fail(&mut self, why: String) {
        tracing::warn!("virtio-net {}: {why}; the device needs a reset", self.id);
        self.broken = true;
        self.stats.device_errors += 1;
        self.last_error = Some(why);
        if let Some(active) = &self.active {
            active.interrupt.signal_needs_reset();
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.mac.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(
            "virtio-net {}: ignoring config write at {offset:#x}",
            self.id
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActivated);
        }
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.is_valid(&mem) {
                return Err(ActivateError::QueueNotUsable(i));
            }
        }
        self.active = Some(Active { mem, interrupt });
        self.broken = false;
        tracing::info!(
            "virtio-net {}: activated on tap {}",
            self.id,
            self.tap_name()
        );
        // Frames may already wait on the tap (edge-triggered: no new edge would come).
        self.process_rx();
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.broken = false;
        self.acked_features = 0;
        self.rx_pending = None;
        self.queues.iter_mut().for_each(Queue::reset);
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                tracing::error!("virtio-net {}: cannot watch queue {i}: {e}", self.id);
            }
        }
        let tap = self.gate.tap().clone();
        if let Err(e) = ops.add(Events::with_data(
            tap.as_ref(),
            TAP_EVENT,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )) {
            tracing::error!(
                "virtio-net {}: cannot watch tap {}: {e}",
                self.id,
                tap.name()
            );
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TAP_EVENT => self.process_rx(),
            i => {
                let Some(evt) = self.queue_evts.get(i as usize) else {
                    return;
                };
                // Non-blocking: a spurious wakeup just finds nothing to read.
                let _ = evt.read();
                if i as usize == RX {
                    self.process_rx();
                } else {
                    self.process_tx();
                }
            }
        }
    }
}

/// The saved state of a network device (its queues are saved by the transport).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The stable device id.
    pub id: String,
    /// The tap it was attached to (restore attaches to the same name unless told otherwise).
    pub tap: String,
    /// The guest's MAC address (the configuration space).
    pub mac: [u8; 6],
    /// Offered features.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Whether the device had asked for a reset.
    pub broken: bool,
}

/// What a network device is rebuilt from, besides its state.
pub struct NetArgs {
    /// The tap to attach to (the saved one, or the one `--net id=..,tap=..` names).
    pub tap: String,
    /// The VM's output-commit switch.
    pub commit: Arc<OutputCommit>,
}

impl Persist for Net {
    type State = NetState;
    type ConstructorArgs = NetArgs;
    type Error = NetError;

    fn save(&self) -> NetState {
        NetState {
            id: self.id.clone(),
            tap: self.tap_name().into(),
            mac: self.mac,
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            broken: self.broken,
        }
    }

    fn restore(args: NetArgs, state: &NetState) -> Result<Self, NetError> {
        let mut net = Net::new(state.id.clone(), &args.tap, state.mac, args.commit)?;
        if net.avail_features != state.avail_features {
            return Err(NetError::StateMismatch {
                id: state.id.clone(),
                reason: format!(
                    "features {:#x} saved, {:#x} now",
                    state.avail_features, net.avail_features
                ),
            });
        }
        net.acked_features = state.acked_features & net.avail_features;
        net.broken = state.broken;
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
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
}

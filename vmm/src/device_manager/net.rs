//! The virtio-net devices: one per `--net`, after the disks, each on its tap; on restore each
//! takes its saved device and transport state by id and attaches to the tap its configuration
//! names (the saved one, or the one `restore --net id=..,tap=..` gave).

use std::sync::{Arc, Mutex};

use devices::virtio::net::{Net, NetArgs, NetConfig, NetState, OutputCommit};
use serde::Serialize;
use snapshot::{lock, Persist};

use super::{DeviceManager, DeviceManagerError};

/// The kind of a virtio-net device.
pub const NET_KIND: &str = "net";

/// An attached network device.
pub struct AttachedNet {
    pub id: String,
    pub net: Arc<Mutex<Net>>,
}

/// What `GET /vm` and `arkvm status` say about one network device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct NetInfo {
    pub id: String,
    pub tap: String,
    pub mac: String,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    /// Frames the tap refused.
    pub tx_errors: u64,
    /// Frames held by DR output commit right now.
    pub held_frames: u64,
    pub held_bytes: u64,
    /// Frames released after being held, and how long they were held (microseconds).
    pub released_frames: u64,
    pub release_lag_last_us: u64,
    pub release_lag_max_us: u64,
    /// Times the guest's TX ring was left waiting because the held queue was full.
    pub held_full_stalls: u64,
    /// Times the device found the driver's rings broken and asked for a reset.
    pub device_errors: u64,
    /// Why the device needs a reset, while it does.
    pub error: Option<String>,
}

impl DeviceManager {
    /// Opens and registers every configured network device, in order.
    pub fn add_nets(&mut self, nets: &[NetConfig]) -> Result<(), DeviceManagerError> {
        for (i, cfg) in nets.iter().enumerate() {
            let id = cfg.device_id(i);
            let commit = self.output_commit.clone();
            let net =
                self.add_virtio_device(&id, NET_KIND, |saved: Option<&NetState>| match saved {
                    None => Net::new(id.clone(), &cfg.tap, cfg.mac_for(&id), commit),
                    Some(state) => Net::restore(
                        NetArgs {
                            tap: cfg.tap.clone(),
                            commit,
                        },
                        state,
                    ),
                })?;
            self.nets.push(AttachedNet { id, net });
        }
        Ok(())
    }

    /// The switch and epoch counter of DR output commit for every network device.
    pub fn output_commit(&self) -> &Arc<OutputCommit> {
        &self.output_commit
    }

    /// Every network device with its counters.
    pub fn net_info(&self) -> Vec<NetInfo> {
        self.nets
            .iter()
            .map(|a| {
                let n = lock(&a.net);
                let s = n.stats();
                let g = n.gate_stats();
                NetInfo {
                    id: a.id.clone(),
                    tap: n.tap_name().into(),
                    mac: devices::virtio::net::format_mac(&n.mac()),
                    rx_frames: s.rx_frames,
                    rx_bytes: s.rx_bytes,
                    rx_dropped: s.rx_dropped,
                    tx_frames: s.tx_frames,
                    tx_bytes: s.tx_bytes,
                    tx_dropped: s.tx_dropped,
                    tx_errors: g.tx_errors,
                    held_frames: g.held_frames,
                    held_bytes: g.held_bytes,
                    released_frames: g.released_frames,
                    release_lag_last_us: g.release_lag_last_us,
                    release_lag_max_us: g.release_lag_max_us,
                    held_full_stalls: g.full_stalls,
                    device_errors: s.device_errors,
                    error: n.error().map(str::to_string),
                }
            })
            .collect()
    }
}

//! The virtio-net device on a host tap interface: `--net tap=IFNAME[,mac=MAC][,id=NAME]`.
//!
//! ```text
//!   guest TX ring ──(ioeventfd, queue 1)──▶ tx.rs ──▶ OutputCommit gate ──▶ tap write
//!                                                  (held per checkpoint epoch
//!                                                   when DR output commit is on)
//!   tap readable ──(edge-triggered epoll)──▶ rx.rs ──▶ guest RX ring ──▶ irqfd
//! ```
//!
//! Every frame on the rings carries the 12-byte `virtio_net_hdr_v1` (VERSION_1 is required);
//! the tap is opened without `IFF_VNET_HDR`, so the device strips the header on TX and writes a
//! zeroed one (`num_buffers = 1`) on RX. No offloads are offered, so the header never asks for
//! a checksum or segmentation.

pub mod commit;
mod config;
mod device;
mod rx;
pub mod tap;
#[cfg(test)]
mod test_tap;
mod tx;

pub use commit::{GateStats, OutputCommit, TxGate};
pub use config::{format_mac, parse_options, NetConfig, NetConfigError};
pub use device::{Net, NetArgs, NetError, NetState, NetStats};
pub use tap::{Tap, TapError};

/// Entries per virtqueue the device offers.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of `struct virtio_net_hdr_v1` (with `num_buffers`).
pub const NET_HDR_LEN: usize = 12;
/// Largest frame the device moves either way (a 64 KiB IP packet plus an Ethernet header).
pub const MAX_FRAME: usize = 65_550;
/// Smallest receive buffer a driver must post without mergeable buffers (1514 + header).
pub const MIN_RX_BUFFER: usize = 1514 + NET_HDR_LEN;

//! Disaster recovery: checkpoints (backup points) sent from a primary's repository to a receiver
//! on a second host over an authenticated, encrypted TCP link.
//!
//! - [`link`]: the Noise handshake (pre-shared key, ephemeral Diffie-Hellman) and the sealed
//!   frames.
//! - [`message`]: the protocol messages.
//! - [`sender`]: [`send_point`], [`query_status`] and the retrying [`DrSender`].
//! - [`receiver`]: [`Receiver`], which verifies checkpoints and commits them whole or not at all.
//!
//! A checkpoint is: offer (point id, VM, every distinct chunk id) → the receiver answers the
//! chunks it lacks → those chunks, as stored → the point manifest → the receiver checks every
//! chunk is present (the new ones decoded and re-hashed on arrival), creates the point with
//! create-if-absent and prunes to the last K points of the VM. The protocol is described in
//! `docs/dr-protocol.md`.

pub mod link;
pub mod message;
pub mod receiver;
pub mod sender;

#[cfg(test)]
mod stall_tests;
#[cfg(test)]
mod tests;

use std::io;

pub use link::{LinkKey, SecureLink, LINK_MAGIC, MAX_FRAME_LEN, PROTOCOL_VERSION};
pub use message::{CommitReport, Message, OfferHeader};
pub use receiver::{CheckpointRecord, Receiver, ReceiverConfig, ReceiverStatus, VmStatus};
pub use sender::{
    query_status, send_checkpoint, send_point, CheckpointInfo, DrClient, DrSender, SendReport,
    SenderConfig, SenderStats,
};

use crate::repo::{RepoError, StoreError};

/// Why a DR operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DrError {
    /// No connection could be made.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The network failed (or timed out, or the peer hung up).
    #[error("cannot {action}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer speaks another version of the DR protocol.
    #[error(
        "the peer speaks DR protocol version {theirs} and this side speaks protocol version \
         {ours}: run the same arkvm release on both hosts"
    )]
    VersionMismatch {
        /// This side's version.
        ours: u8,
        /// The peer's version.
        theirs: u8,
    },
    /// The Noise handshake or transport could not be set up.
    #[error("the Noise protocol state could not be set up")]
    Noise(#[source] snow::Error),
    /// The handshake showed the peer does not hold the same key.
    #[error("authentication failed: {0}")]
    AuthFailed(&'static str),
    /// A frame did not authenticate: it was altered, replayed, reordered or dropped.
    #[error("a frame failed authentication (altered, replayed, reordered or dropped on the way)")]
    FrameUnauthentic,
    /// A frame is larger than allowed.
    #[error("a frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// Its length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The receiver refused the checkpoint (and discarded it).
    #[error("the receiver refused the checkpoint: {0}")]
    Refused(String),
    /// The local repository failed.
    #[error("repository operation failed")]
    Repo(#[from] RepoError),
    /// The local store failed.
    #[error("repository storage failed")]
    Store(#[from] StoreError),
}

impl DrError {
    fn io(action: &'static str, source: io::Error) -> Self {
        DrError::Io { action, source }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

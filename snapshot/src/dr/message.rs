//! The DR protocol's messages, one per sealed frame: a type byte and a body (JSON for control
//! messages, binary for chunk ids and chunks).

use serde::{Deserialize, Serialize};

use super::DrError;
use crate::chunk::ContentHash;

const OFFER: u8 = 1;
const NEED: u8 = 2;
const CHUNK: u8 = 3;
const MANIFEST: u8 = 4;
const COMMITTED: u8 = 5;
const REFUSED: u8 = 6;
const STATUS_REQUEST: u8 = 7;
const STATUS: u8 = 8;

/// What a sender says about the checkpoint it offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferHeader {
    /// The backup point's id.
    pub point_id: String,
    /// The VM's name.
    pub vm: String,
    /// Whether the sender's repository is encrypted (chunks travel as stored).
    pub encrypted: bool,
    /// How long the guest was paused for this checkpoint, if the sender knows.
    #[serde(default)]
    pub pause_us: Option<u64>,
}

/// What the receiver did with a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitReport {
    /// The committed point.
    pub point_id: String,
    /// Whether the receiver had the point already (nothing was written).
    pub already_present: bool,
    /// Points the receiver holds for this VM after pruning.
    pub points_kept: u64,
    /// Points pruned after this commit.
    pub points_pruned: u64,
}

/// One protocol message.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    /// Sender: a checkpoint, and every distinct chunk id its point uses.
    Offer {
        /// About the point.
        header: OfferHeader,
        /// The chunk ids.
        ids: Vec<ContentHash>,
    },
    /// Receiver: the indexes (into the offer's ids) of the chunks it lacks.
    Need(Vec<u32>),
    /// Sender: one chunk as its repository stores it.
    Chunk {
        /// Its id.
        id: ContentHash,
        /// Its stored encoding.
        stored: Vec<u8>,
    },
    /// Sender: the point's manifest as its repository stores it; asks for the commit.
    Manifest(Vec<u8>),
    /// Receiver: the checkpoint is committed.
    Committed(CommitReport),
    /// Receiver: the request was refused; the checkpoint is discarded.
    Refused(String),
    /// Sender or any client: asks for the receiver's status.
    StatusRequest,
    /// Receiver: its status, as JSON (see `ReceiverStatus`).
    Status(serde_json::Value),
}

impl Message {
    /// Encodes the message as a frame's plaintext.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Message::Offer { header, ids } => Self::encode_offer(header, ids),
            Message::Need(indexes) => {
                let mut out = Vec::with_capacity(1 + indexes.len() * 4);
                out.push(NEED);
                for index in indexes {
                    out.extend_from_slice(&index.to_le_bytes());
                }
                out
            }
            Message::Chunk { id, stored } => {
                let mut out = Vec::with_capacity(33 + stored.len());
                out.push(CHUNK);
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(stored);
                out
            }
            Message::Manifest(bytes) => {
                let mut out = Vec::with_capacity(1 + bytes.len());
                out.push(MANIFEST);
                out.extend_from_slice(bytes);
                out
            }
            Message::Committed(report) => json_frame(COMMITTED, report),
            Message::Refused(why) => json_frame(REFUSED, why),
            Message::StatusRequest => vec![STATUS_REQUEST],
            Message::Status(value) => json_frame(STATUS, value),
        }
    }

    /// Encodes an offer without building the message.
    pub fn encode_offer(header: &OfferHeader, ids: &[ContentHash]) -> Vec<u8> {
        let json = serde_json::to_vec(header).expect("offer headers serialize");
        let mut out = Vec::with_capacity(5 + json.len() + ids.len() * 32);
        out.push(OFFER);
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        for id in ids {
            out.extend_from_slice(id.as_bytes());
        }
        out
    }

    /// Decodes a frame's plaintext.
    pub fn decode(frame: &[u8]) -> Result<Self, DrError> {
        let (&kind, body) = frame.split_first().ok_or_else(|| bad("an empty message"))?;
        Ok(match kind {
            OFFER => {
                let len = body
                    .get(..4)
                    .map(|b| u32::from_le_bytes(b.try_into().expect("four bytes")) as usize)
                    .ok_or_else(|| bad("a truncated offer"))?;
                let json = body
                    .get(4..4 + len)
                    .ok_or_else(|| bad("a truncated offer"))?;
                let header = serde_json::from_slice(json)
                    .map_err(|e| bad(&format!("an offer header that does not parse: {e}")))?;
                let rest = &body[4 + len..];
                if rest.len() % 32 != 0 {
                    return Err(bad("an offer with a partial chunk id"));
                }
                let ids = rest.chunks(32).map(hash_of).collect();
                Message::Offer { header, ids }
            }
            NEED => {
                if body.len() % 4 != 0 {
                    return Err(bad("a partial chunk index"));
                }
                Message::Need(
                    body.chunks(4)
                        .map(|b| u32::from_le_bytes(b.try_into().expect("four bytes")))
                        .collect(),
                )
            }
            CHUNK => {
                if body.len() < 32 {
                    return Err(bad("a truncated chunk"));
                }
                Message::Chunk {
                    id: hash_of(&body[..32]),
                    stored: body[32..].to_vec(),
                }
            }
            MANIFEST => Message::Manifest(body.to_vec()),
            COMMITTED => Message::Committed(parse_json(body)?),
            REFUSED => Message::Refused(parse_json(body)?),
            STATUS_REQUEST if body.is_empty() => Message::StatusRequest,
            STATUS => Message::Status(parse_json(body)?),
            other => return Err(bad(&format!("an unknown message type {other}"))),
        })
    }

    /// The message's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Offer { .. } => "offer",
            Message::Need(_) => "need",
            Message::Chunk { .. } => "chunk",
            Message::Manifest(_) => "manifest",
            Message::Committed(_) => "committed",
            Message::Refused(_) => "refused",
            Message::StatusRequest => "status request",
            Message::Status(_) => "status",
        }
    }
}

fn json_frame<T: Serialize>(kind: u8, value: &T) -> Vec<u8> {
    let mut out = vec![kind];
    serde_json::to_writer(&mut out, value).expect("protocol messages serialize");
    out
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, DrError> {
    serde_json::from_slice(body).map_err(|e| bad(&format!("a message that does not parse: {e}")))
}

fn hash_of(bytes: &[u8]) -> ContentHash {
    ContentHash::from_bytes(bytes.try_into().expect("32-byte slices"))
}

fn bad(what: &str) -> DrError {
    DrError::Protocol(format!("the peer sent {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::chunk_hash;

    #[test]
    fn messages_round_trip() {
        let messages = vec![
            Message::Offer {
                header: OfferHeader {
                    point_id: "p1".into(),
                    vm: "vm1".into(),
                    encrypted: true,
                    pause_us: Some(1200),
                },
                ids: vec![chunk_hash(b"a"), chunk_hash(b"b")],
            },
            Message::Need(vec![0, 7, u32::MAX]),
            Message::Chunk {
                id: chunk_hash(b"a"),
                stored: b"Pa".to_vec(),
            },
            Message::Manifest(b"{}".to_vec()),
            Message::Committed(CommitReport {
                point_id: "p1".into(),
                points_kept: 3,
                ..CommitReport::default()
            }),
            Message::Refused("no".into()),
            Message::StatusRequest,
            Message::Status(serde_json::json!({"points": 2})),
        ];
        for message in messages {
            assert_eq!(Message::decode(&message.encode()).unwrap(), message);
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        for frame in [
            &[][..],
            &[OFFER, 200, 0, 0, 0, b'{'][..],
            &[NEED, 1, 2, 3][..],
            &[CHUNK, 1, 2][..],
            &[STATUS_REQUEST, 0][..],
            &[99][..],
        ] {
            assert!(
                matches!(Message::decode(frame), Err(DrError::Protocol(_))),
                "{frame:?}"
            );
        }
    }
}

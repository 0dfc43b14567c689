//! The DR link: a Noise handshake with a pre-shared key over TCP
//! (`Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`), then frames sealed by Noise's transport ciphers.
//!
//! ```text
//! client -> server   hello: "ARKVMDR2" | client nonce (32)
//! server -> client   hello: "ARKVMDR2" | server nonce (32)
//!                    both hellos (client's first) are the Noise prologue
//! client -> server   Noise message 1 (psk, e): ephemeral key (32) | tag (16)
//! server -> client   Noise message 2 (e, ee):  ephemeral key (32) | tag (16)
//! then, each way:    frames, see below
//! ```
//!
//! The pre-shared key comes from the repository key ([`LinkKey`]) and authenticates both ends;
//! the ephemeral-ephemeral Diffie-Hellman makes the session keys, so a key that leaks later
//! does not open recorded sessions. The server checks the client's first Noise message (which
//! only the key's holder can make for this server nonce) before it sends anything but its
//! hello, and closes the connection if it does not authenticate. The server gives a peer one
//! absolute deadline for the whole handshake ([`SecureLink::server_by`]): a peer that trickles
//! its bytes cannot stretch it, since every read waits only for what is left of it.
//!
//! A frame of L plaintext bytes is sealed as the plaintext `S (u32 BE) | the L bytes`, cut into
//! pieces of at most 65519 bytes, each a Noise transport message (at most 65535 bytes: the
//! piece and a 16-byte tag). On the wire it is `S (u32 BE) | the messages`, where S is the
//! sum of the messages' lengths; the receiver cuts them at every 65535 bytes. S is checked
//! against the limit before anything past it is read, the copy of S sealed inside the first
//! message authenticates it, and the frame's buffer grows only as authenticated messages
//! arrive. See `docs/dr-protocol.md`.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Instant;

use chacha20poly1305::aead::{KeyInit, OsRng};
use chacha20poly1305::ChaCha20Poly1305;
use snow::{HandshakeState, TransportState};

use super::DrError;
use crate::chunk::MAX_CHUNK_SIZE;
use crate::repo::RepoKey;

/// The version of the DR protocol this build speaks; the last byte of [`LINK_MAGIC`].
pub const PROTOCOL_VERSION: u8 = 2;

/// The first bytes each side sends: protocol name and version.
pub const LINK_MAGIC: &[u8; 8] = b"ARKVMDR2";

/// The protocol name before its version byte: a hello that starts with it but carries another
/// version comes from another release of arkvm.
const MAGIC_NAME: &[u8; 7] = b"ARKVMDR";

/// The Noise protocol of the handshake and the transport.
const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";

/// The largest plaintext frame either side accepts: one chunk of the largest chunk size with
/// room for its encoding, or an offer of two million chunk ids.
pub const MAX_FRAME_LEN: usize = MAX_CHUNK_SIZE as usize + 4096;

/// Bytes of a hello: the magic and a random nonce.
const HELLO_LEN: usize = LINK_MAGIC.len() + 32;

/// Bytes of each Noise handshake message: an ephemeral public key and the tag of an empty
/// payload.
const HANDSHAKE_MESSAGE_LEN: usize = 32 + TAG_LEN;

/// Bytes of a Poly1305 tag.
const TAG_LEN: usize = 16;

/// The longest Noise message (the Noise specification's limit).
const MAX_MESSAGE_LEN: usize = 65535;

/// The most plaintext one Noise message carries.
const MAX_PIECE_LEN: usize = MAX_MESSAGE_LEN - TAG_LEN;

/// Bytes of the sealed length repeated at the start of a frame's plaintext.
const HEADER_LEN: usize = 4;

/// The sealed length of a frame of `plain` bytes: its header and bytes, plus one tag per
/// Noise message.
const fn sealed_len(plain: usize) -> usize {
    let inner = HEADER_LEN + plain;
    inner + TAG_LEN * inner.div_ceil(MAX_PIECE_LEN)
}

/// The largest sealed frame either side accepts.
const MAX_SEALED_LEN: usize = sealed_len(MAX_FRAME_LEN);

/// The link secret derived from a repository key; both ends must hold the same one.
#[derive(Clone)]
pub struct LinkKey {
    /// The Noise pre-shared key.
    psk: [u8; 32],
}

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(..)")
    }
}

impl LinkKey {
    /// Derives the link key from a repository key.
    ///
    /// [`RepoKey`] exposes one pseudo-random function of its secret: the keyed blake3 it names
    /// chunks with. It is applied here to an input longer than any chunk may be (a label padded
    /// past [`MAX_CHUNK_SIZE`]), so the result can never be the name of a stored chunk, and is
    /// then turned into the Noise pre-shared key with `blake3::derive_key`. That costs one hash
    /// of 64 MiB of zeros (tens of milliseconds), so the result is cached in this process, per
    /// key.
    pub fn from_repo_key(key: &RepoKey) -> Self {
        static CACHE: Mutex<Vec<([u8; 32], LinkKey)>> = Mutex::new(Vec::new());
        // Only an in-memory lookup tag: it reveals nothing about the link key.
        let tag = *key.chunk_id(b"arkvm dr link key cache tag").as_bytes();
        let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, link)) = cache.iter().find(|(t, _)| *t == tag) {
            return link.clone();
        }
        let mut input = Vec::with_capacity(MAX_CHUNK_SIZE as usize + 64);
        input.extend_from_slice(b"arkvm dr link root v1 (padded past the largest chunk)");
        input.resize(MAX_CHUNK_SIZE as usize + 64, 0);
        let link = Self::from_secret(*key.chunk_id(&input).as_bytes());
        if cache.len() >= 16 {
            cache.remove(0);
        }
        cache.push((tag, link.clone()));
        link
    }

    /// Builds the link key from a 32-byte secret.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self {
            psk: blake3::derive_key("arkvm dr link noise psk v2", &secret),
        }
    }

    /// A Noise handshake with this key, bound to both hellos.
    fn handshake(
        &self,
        client_hello: &[u8; HELLO_LEN],
        server_hello: &[u8; HELLO_LEN],
        initiator: bool,
    ) -> Result<HandshakeState, DrError> {
        let mut prologue = [0u8; 2 * HELLO_LEN];
        prologue[..HELLO_LEN].copy_from_slice(client_hello);
        prologue[HELLO_LEN..].copy_from_slice(server_hello);
        let builder =
            snow::Builder::new(NOISE_PARAMS.parse().expect("a valid Noise protocol name"))
                .psk(0, &self.psk)
                .and_then(|b| b.prologue(&prologue))
                .map_err(DrError::Noise)?;
        if initiator {
            builder.build_initiator()
        } else {
            builder.build_responder()
        }
        .map_err(DrError::Noise)
    }
}

/// A hello: the magic and 32 random bytes from the OS.
fn new_hello() -> [u8; HELLO_LEN] {
    let nonce: [u8; 32] = ChaCha20Poly1305::generate_key(&mut OsRng).into();
    let mut hello = [0u8; HELLO_LEN];
    hello[..LINK_MAGIC.len()].copy_from_slice(LINK_MAGIC);
    hello[LINK_MAGIC.len()..].copy_from_slice(&nonce);
    hello
}

/// Checks the magic of the peer's hello.
fn check_hello(hello: &[u8; HELLO_LEN]) -> Result<(), DrError> {
    match peer_version(hello) {
        Some(PROTOCOL_VERSION) => Ok(()),
        Some(theirs) => Err(DrError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs,
        }),
        None => Err(DrError::Protocol(format!(
            "the peer does not speak the arkvm DR protocol (version {PROTOCOL_VERSION})"
        ))),
    }
}

/// The protocol version a hello announces, if it is an arkvm DR hello at all.
fn peer_version(hello: &[u8; HELLO_LEN]) -> Option<u8> {
    let version = hello[MAGIC_NAME.len()];
    (hello[..MAGIC_NAME.len()] == MAGIC_NAME[..] && version.is_ascii_digit())
        .then(|| version - b'0')
}

impl std::fmt::Debug for SecureLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureLink")
            .field("peer", &self.stream.peer_addr().ok())
            .field("bytes_sent", &self.bytes_sent)
            .field("bytes_received", &self.bytes_received)
            .finish()
    }
}

/// An authenticated, encrypted connection.
pub struct SecureLink {
    stream: TcpStream,
    noise: TransportState,
    /// One sealed Noise message as read from the wire.
    piece: Vec<u8>,
    /// The first Noise message of a frame, opened.
    opened: Vec<u8>,
    bytes_sent: u64,
    bytes_received: u64,
}

impl SecureLink {
    /// Runs the client side of the handshake on a connected stream.
    pub fn client(mut stream: TcpStream, key: &LinkKey) -> Result<Self, DrError> {
        let client_hello = new_hello();
        write_raw(&mut stream, &client_hello, "send the handshake")?;
        let mut server_hello = [0u8; HELLO_LEN];
        stream.read_exact(&mut server_hello).map_err(|e| {
            if e.kind() == ErrorKind::UnexpectedEof {
                DrError::io(
                    "read the receiver's handshake",
                    std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        format!(
                            "the receiver closed the connection: it has no free connection \
                             slot, or it is an older arkvm that speaks another DR protocol \
                             version (this side speaks version {PROTOCOL_VERSION})"
                        ),
                    ),
                )
            } else {
                DrError::io("read the receiver's handshake", e)
            }
        })?;
        check_hello(&server_hello)?;
        let mut noise = key.handshake(&client_hello, &server_hello, true)?;
        let mut message = [0u8; HANDSHAKE_MESSAGE_LEN];
        let len = noise
            .write_message(&[], &mut message)
            .map_err(DrError::Noise)?;
        debug_assert_eq!(len, HANDSHAKE_MESSAGE_LEN);
        write_raw(&mut stream, &message, "send the key exchange")?;
        stream.read_exact(&mut message).map_err(|e| {
            if e.kind() == ErrorKind::UnexpectedEof {
                DrError::AuthFailed("the receiver closed the connection: it holds another key")
            } else {
                DrError::io("read the receiver's key exchange", e)
            }
        })?;
        noise.read_message(&message, &mut []).map_err(|_| {
            DrError::AuthFailed("the receiver's key exchange is wrong: it holds another key")
        })?;
        Self::established(stream, noise)
    }

    /// Runs the server side of the handshake on an accepted stream, with the stream's own
    /// timeouts. A peer that does not prove the key is refused before anything but a hello
    /// is sent to it.
    pub fn server(stream: TcpStream, key: &LinkKey) -> Result<Self, DrError> {
        Self::server_within(stream, key, None)
    }

    /// As [`SecureLink::server`], but the whole handshake must end by `deadline`: each read
    /// and write waits at most for what is left of it, however the peer spaces its bytes. The
    /// stream's read and write timeouts are left set to the last wait; set them again after.
    pub fn server_by(stream: TcpStream, key: &LinkKey, deadline: Instant) -> Result<Self, DrError> {
        Self::server_within(stream, key, Some(deadline))
    }

    fn server_within(
        mut stream: TcpStream,
        key: &LinkKey,
        deadline: Option<Instant>,
    ) -> Result<Self, DrError> {
        let mut client_hello = [0u8; HELLO_LEN];
        read_exact_by(
            &mut stream,
            &mut client_hello,
            deadline,
            "read the handshake",
        )?;
        let server_hello = new_hello();
        if let Err(e) = check_hello(&client_hello) {
            // Another release of arkvm gets this side's hello, so that it can say which
            // version it met; anything else gets nothing.
            if matches!(e, DrError::VersionMismatch { .. }) {
                let _ = write_by(&mut stream, &server_hello, deadline, "send the handshake");
            }
            return Err(e);
        }
        write_by(&mut stream, &server_hello, deadline, "send the handshake")?;
        let mut noise = key.handshake(&client_hello, &server_hello, false)?;
        let mut message = [0u8; HANDSHAKE_MESSAGE_LEN];
        read_exact_by(
            &mut stream,
            &mut message,
            deadline,
            "read the sender's key exchange",
        )?;
        noise.read_message(&message, &mut []).map_err(|_| {
            DrError::AuthFailed("the peer's key exchange is wrong: it does not hold the key")
        })?;
        let len = noise
            .write_message(&[], &mut message)
            .map_err(DrError::Noise)?;
        debug_assert_eq!(len, HANDSHAKE_MESSAGE_LEN);
        write_by(&mut stream, &message, deadline, "send the key exchange")?;
        Self::established(stream, noise)
    }

    fn established(stream: TcpStream, noise: HandshakeState) -> Result<Self, DrError> {
        Ok(Self {
            stream,
            noise: noise.into_transport_mode().map_err(DrError::Noise)?,
            piece: vec![0u8; MAX_MESSAGE_LEN],
            opened: vec![0u8; MAX_PIECE_LEN],
            bytes_sent: 0,
            bytes_received: 0,
        })
    }

    /// The underlying stream (for timeouts and shutdown).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Bytes written to the wire since the handshake.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Bytes read from the wire since the handshake.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    /// Seals and sends one frame.
    pub fn send_frame(&mut self, plain: &[u8]) -> Result<(), DrError> {
        if plain.len() > MAX_FRAME_LEN {
            return Err(DrError::FrameTooLarge {
                len: plain.len() as u64,
                limit: MAX_FRAME_LEN as u64,
            });
        }
        let sealed = sealed_len(plain.len());
        let header = (sealed as u32).to_be_bytes();
        let mut wire = vec![0u8; 4 + sealed];
        wire[..4].copy_from_slice(&header);
        // The first message carries the header and the start of the frame.
        let first = plain.len().min(MAX_PIECE_LEN - HEADER_LEN);
        let mut piece = Vec::with_capacity(HEADER_LEN + first);
        piece.extend_from_slice(&header);
        piece.extend_from_slice(&plain[..first]);
        let mut at = 4 + self.seal(&piece, &mut wire[4..])?;
        for part in plain[first..].chunks(MAX_PIECE_LEN) {
            at += self.seal(part, &mut wire[at..])?;
        }
        debug_assert_eq!(at, wire.len());
        write_raw(&mut self.stream, &wire, "send a frame")?;
        self.bytes_sent += wire.len() as u64;
        Ok(())
    }

    /// Seals one piece into the start of `out`; returns the sealed length.
    fn seal(&mut self, piece: &[u8], out: &mut [u8]) -> Result<usize, DrError> {
        self.noise
            .write_message(piece, out)
            .map_err(|_| DrError::Protocol("the frame counter is exhausted".into()))
    }

    /// Receives and opens one frame. `Ok(None)` is a clean end of stream between frames.
    pub fn recv_frame(&mut self) -> Result<Option<Vec<u8>>, DrError> {
        let mut header = [0u8; 4];
        match read_full(&mut self.stream, &mut header)? {
            0 => return Ok(None),
            4 => {}
            _ => return Err(DrError::io("read a frame", eof())),
        }
        let sealed = u32::from_be_bytes(header) as usize;
        // Checked before allocating: a peer cannot make this side reserve more.
        if !(sealed_len(0)..=MAX_SEALED_LEN).contains(&sealed) {
            return Err(DrError::FrameTooLarge {
                len: sealed as u64,
                limit: MAX_SEALED_LEN as u64,
            });
        }
        // The plaintext length follows from the sealed one; a sealed length that no frame
        // has was altered on the way.
        let pieces = sealed.div_ceil(MAX_MESSAGE_LEN);
        let plain_len = sealed
            .checked_sub(TAG_LEN * pieces + HEADER_LEN)
            .filter(|&plain| sealed_len(plain) == sealed)
            .ok_or(DrError::FrameUnauthentic)?;
        // The buffer grows as authenticated messages arrive (doubling, up to the frame's
        // length), so a length header alone costs the receiver no memory.
        let mut plain = Vec::new();
        let mut left = sealed;
        for index in 0..pieces {
            let message_len = left.min(MAX_MESSAGE_LEN);
            left -= message_len;
            let message = &mut self.piece[..message_len];
            self.stream
                .read_exact(message)
                .map_err(|e| DrError::io("read a frame", e))?;
            self.bytes_received += message_len as u64;
            let opened_len = message_len - TAG_LEN;
            let filled = plain.len();
            if index == 0 {
                // The first message opens into scratch space, to check and drop the header.
                let opened = &mut self.opened[..opened_len];
                self.noise
                    .read_message(message, opened)
                    .map_err(|_| DrError::FrameUnauthentic)?;
                if opened[..HEADER_LEN] != header {
                    return Err(DrError::FrameUnauthentic);
                }
                plain.reserve_exact((2 * MAX_PIECE_LEN).min(plain_len));
                plain.extend_from_slice(&opened[HEADER_LEN..]);
            } else {
                let want = (filled + opened_len)
                    .max(2 * plain.capacity())
                    .min(plain_len);
                plain.reserve_exact(want - filled);
                plain.resize(filled + opened_len, 0);
                self.noise
                    .read_message(message, &mut plain[filled..])
                    .map_err(|_| DrError::FrameUnauthentic)?;
            }
        }
        let filled = plain.len();
        self.bytes_received += 4;
        debug_assert_eq!(filled, plain_len);
        Ok(Some(plain))
    }

    /// Receives a frame, treating the end of the stream as an error.
    pub fn recv_required(&mut self, waiting_for: &'static str) -> Result<Vec<u8>, DrError> {
        self.recv_frame()?
            .ok_or_else(|| DrError::io(waiting_for, eof()))
    }
}

fn eof() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the peer closed the connection",
    )
}

/// The error of a handshake that ran past its deadline.
fn too_slow(action: &'static str) -> DrError {
    DrError::io(
        action,
        std::io::Error::new(
            ErrorKind::TimedOut,
            "the peer did not complete the handshake in time",
        ),
    )
}

/// The time left until `deadline`, or the handshake's timeout error if none is left.
fn left_until(deadline: Instant, action: &'static str) -> Result<std::time::Duration, DrError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(too_slow(action))
    } else {
        Ok(left)
    }
}

/// Fills `buf` from `stream`; with a deadline, each read waits only for what is left of it.
fn read_exact_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Option<Instant>,
    action: &'static str,
) -> Result<(), DrError> {
    let Some(deadline) = deadline else {
        return stream.read_exact(buf).map_err(|e| DrError::io(action, e));
    };
    let mut done = 0;
    while done < buf.len() {
        let left = left_until(deadline, action)?;
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| DrError::io("set the socket timeout", e))?;
        match stream.read(&mut buf[done..]) {
            Ok(0) => return Err(DrError::io(action, eof())),
            Ok(n) => done += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(too_slow(action))
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(DrError::io(action, e)),
        }
    }
    Ok(())
}

/// Writes `bytes`; with a deadline, the write waits at most for what is left of it.
fn write_by(
    stream: &mut TcpStream,
    bytes: &[u8],
    deadline: Option<Instant>,
    action: &'static str,
) -> Result<(), DrError> {
    if let Some(deadline) = deadline {
        let left = left_until(deadline, action)?;
        stream
            .set_write_timeout(Some(left))
            .map_err(|e| DrError::io("set the socket timeout", e))?;
    }
    write_raw(stream, bytes, action)
}

fn write_raw(stream: &mut TcpStream, bytes: &[u8], action: &'static str) -> Result<(), DrError> {
    stream.write_all(bytes).map_err(|e| DrError::io(action, e))
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(stream: &mut TcpStream, buf: &mut [u8]) -> Result<usize, DrError> {
    let mut done = 0;
    while done < buf.len() {
        match stream.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DrError::io("read a frame", e)),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests;

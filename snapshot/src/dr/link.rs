//! The DR link: a pre-shared-key handshake over TCP, then length-prefixed frames sealed with
//! ChaCha20-Poly1305 under per-direction session keys and counter nonces.
//!
//! ```text
//! client -> server   "ARKVMDR1" | client nonce (32)
//! server -> client   "ARKVMDR1" | server nonce (32)
//! client -> server   client proof = blake3_keyed(auth key, "client" | magic | nonces) (32)
//! server -> client   server proof = blake3_keyed(auth key, "server" | magic | nonces) (32)
//! then, each way:    u32 BE ciphertext length | ChaCha20-Poly1305(session key, counter, aad = length)
//! ```
//!
//! The server checks the client's proof before it sends anything but its random nonce, and
//! closes the connection on a wrong proof. The server gives a peer one absolute deadline for the
//! whole handshake ([`SecureLink::server_by`]): a peer that trickles its bytes cannot stretch it,
//! since every read waits only for what is left of it. See `docs/dr-protocol.md`.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Instant;

use chacha20poly1305::aead::{Aead, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};

use super::DrError;
use crate::chunk::MAX_CHUNK_SIZE;
use crate::repo::RepoKey;

/// The first bytes each side sends: protocol name and version.
pub const LINK_MAGIC: &[u8; 8] = b"ARKVMDR1";

/// The largest plaintext frame either side accepts: one chunk of the largest chunk size with
/// room for its encoding, or an offer of two million chunk ids.
pub const MAX_FRAME_LEN: usize = MAX_CHUNK_SIZE as usize + 4096;

/// Bytes of a Poly1305 tag.
const TAG_LEN: usize = 16;

/// The link secret derived from a repository key; both ends must hold the same one.
#[derive(Clone)]
pub struct LinkKey {
    auth: [u8; 32],
    session: [u8; 32],
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
    /// then split with `blake3::derive_key`. That costs one hash of 64 MiB of zeros (tens of
    /// milliseconds), so the result is cached in this process, per key.
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
            auth: blake3::derive_key("arkvm dr link auth v1", &secret),
            session: blake3::derive_key("arkvm dr link session v1", &secret),
        }
    }

    /// The proof of `role` ("client" or "server") for this pair of nonces.
    fn proof(&self, role: &str, client: &[u8; 32], server: &[u8; 32]) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new_keyed(&self.auth);
        hasher.update(role.as_bytes());
        hasher.update(LINK_MAGIC);
        hasher.update(client);
        hasher.update(server);
        hasher.finalize()
    }

    /// The session key of one direction ("c2s" or "s2c") for this pair of nonces.
    fn direction_key(&self, direction: &str, client: &[u8; 32], server: &[u8; 32]) -> [u8; 32] {
        let mut material = Vec::with_capacity(32 * 3 + direction.len());
        material.extend_from_slice(&self.session);
        material.extend_from_slice(client);
        material.extend_from_slice(server);
        material.extend_from_slice(direction.as_bytes());
        blake3::derive_key("arkvm dr link direction key v1", &material)
    }
}

/// 32 random bytes from the OS.
fn random_nonce() -> [u8; 32] {
    ChaCha20Poly1305::generate_key(&mut OsRng).into()
}

/// One direction's cipher and frame counter.
struct Direction {
    cipher: ChaCha20Poly1305,
    counter: u64,
}

impl Direction {
    fn new(key: [u8; 32]) -> Self {
        Self {
            cipher: ChaCha20Poly1305::new(&key.into()),
            counter: 0,
        }
    }

    /// The nonce of the next frame; each is used once.
    fn next_nonce(&mut self) -> Result<Nonce, DrError> {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&self.counter.to_le_bytes());
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| DrError::Protocol("the frame counter is exhausted".into()))?;
        Ok(nonce.into())
    }
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
    send: Direction,
    recv: Direction,
    bytes_sent: u64,
    bytes_received: u64,
}

impl SecureLink {
    /// Runs the client side of the handshake on a connected stream.
    pub fn client(mut stream: TcpStream, key: &LinkKey) -> Result<Self, DrError> {
        let client_nonce = random_nonce();
        let mut hello = LINK_MAGIC.to_vec();
        hello.extend_from_slice(&client_nonce);
        write_raw(&mut stream, &hello, "send the handshake")?;
        let server_nonce = read_hello(&mut stream)?;
        let proof = key.proof("client", &client_nonce, &server_nonce);
        write_raw(&mut stream, proof.as_bytes(), "send the key proof")?;
        let mut answer = [0u8; 32];
        stream.read_exact(&mut answer).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                DrError::AuthFailed("the receiver closed the connection: it holds another key")
            } else {
                DrError::io("read the receiver's key proof", e)
            }
        })?;
        // blake3::Hash compares in constant time.
        if key.proof("server", &client_nonce, &server_nonce) != blake3::Hash::from(answer) {
            return Err(DrError::AuthFailed(
                "the receiver's key proof is wrong: it holds another key",
            ));
        }
        Ok(Self::established(
            stream,
            key,
            &client_nonce,
            &server_nonce,
            true,
        ))
    }

    /// Runs the server side of the handshake on an accepted stream, with the stream's own
    /// timeouts. A peer that does not prove the key is refused before anything but a random
    /// nonce is sent to it.
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
        let mut hello = [0u8; 40];
        read_exact_by(&mut stream, &mut hello, deadline, "read the handshake")?;
        let client_nonce = check_hello(&hello)?;
        let server_nonce = random_nonce();
        let mut hello = LINK_MAGIC.to_vec();
        hello.extend_from_slice(&server_nonce);
        write_by(&mut stream, &hello, deadline, "send the handshake")?;
        let mut proof = [0u8; 32];
        read_exact_by(
            &mut stream,
            &mut proof,
            deadline,
            "read the sender's key proof",
        )?;
        if key.proof("client", &client_nonce, &server_nonce) != blake3::Hash::from(proof) {
            return Err(DrError::AuthFailed(
                "the peer's key proof is wrong: it does not hold the key",
            ));
        }
        let answer = key.proof("server", &client_nonce, &server_nonce);
        write_by(
            &mut stream,
            answer.as_bytes(),
            deadline,
            "send the key proof",
        )?;
        Ok(Self::established(
            stream,
            key,
            &client_nonce,
            &server_nonce,
            false,
        ))
    }

    fn established(
        stream: TcpStream,
        key: &LinkKey,
        client_nonce: &[u8; 32],
        server_nonce: &[u8; 32],
        is_client: bool,
    ) -> Self {
        let c2s = Direction::new(key.direction_key("c2s", client_nonce, server_nonce));
        let s2c = Direction::new(key.direction_key("s2c", client_nonce, server_nonce));
        let (send, recv) = if is_client { (c2s, s2c) } else { (s2c, c2s) };
        Self {
            stream,
            send,
            recv,
            bytes_sent: 0,
            bytes_received: 0,
        }
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
        let len = ((plain.len() + TAG_LEN) as u32).to_be_bytes();
        let nonce = self.send.next_nonce()?;
        let sealed = self
            .send
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: &len,
                },
            )
            .map_err(|_| DrError::Protocol("frame encryption failed".into()))?;
        let mut wire = Vec::with_capacity(4 + sealed.len());
        wire.extend_from_slice(&len);
        wire.extend_from_slice(&sealed);
        write_raw(&mut self.stream, &wire, "send a frame")?;
        self.bytes_sent += wire.len() as u64;
        Ok(())
    }

    /// Receives and opens one frame. `Ok(None)` is a clean end of stream between frames.
    pub fn recv_frame(&mut self) -> Result<Option<Vec<u8>>, DrError> {
        let mut len = [0u8; 4];
        match read_full(&mut self.stream, &mut len)? {
            0 => return Ok(None),
            4 => {}
            _ => return Err(DrError::io("read a frame", eof())),
        }
        let sealed_len = u32::from_be_bytes(len) as usize;
        // Checked before allocating: a peer cannot make this side reserve more.
        if !(TAG_LEN..=MAX_FRAME_LEN + TAG_LEN).contains(&sealed_len) {
            return Err(DrError::FrameTooLarge {
                len: sealed_len as u64,
                limit: (MAX_FRAME_LEN + TAG_LEN) as u64,
            });
        }
        let mut sealed = vec![0u8; sealed_len];
        self.stream
            .read_exact(&mut sealed)
            .map_err(|e| DrError::io("read a frame", e))?;
        self.bytes_received += 4 + sealed_len as u64;
        let nonce = self.recv.next_nonce()?;
        let plain = self
            .recv
            .cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: &sealed,
                    aad: &len,
                },
            )
            .map_err(|_| DrError::FrameUnauthentic)?;
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

/// Reads the peer's hello and returns its nonce.
fn read_hello(stream: &mut TcpStream) -> Result<[u8; 32], DrError> {
    let mut hello = [0u8; 40];
    stream
        .read_exact(&mut hello)
        .map_err(|e| DrError::io("read the handshake", e))?;
    check_hello(&hello)
}

/// Checks a hello's magic and returns its nonce.
fn check_hello(hello: &[u8; 40]) -> Result<[u8; 32], DrError> {
    if &hello[..8] != LINK_MAGIC {
        return Err(DrError::Protocol(
            "the peer does not speak the arkvm DR protocol (version 1)".into(),
        ));
    }
    let mut nonce = [0u8; 32];
    nonce.copy_from_slice(&hello[8..]);
    Ok(nonce)
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
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(
        client_key: LinkKey,
        server_key: LinkKey,
    ) -> (Result<SecureLink, DrError>, Result<SecureLink, DrError>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            SecureLink::server(stream, &server_key)
        });
        let client = SecureLink::client(TcpStream::connect(addr).unwrap(), &client_key);
        (client, server.join().unwrap())
    }

    #[test]
    fn handshake_and_frames_both_ways() {
        let key = LinkKey::from_secret([7; 32]);
        let (client, server) = pair(key.clone(), key);
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        client.send_frame(b"hello receiver").unwrap();
        client.send_frame(b"").unwrap();
        assert_eq!(server.recv_frame().unwrap().unwrap(), b"hello receiver");
        assert_eq!(server.recv_frame().unwrap().unwrap(), b"");
        server.send_frame(b"hello sender").unwrap();
        assert_eq!(client.recv_frame().unwrap().unwrap(), b"hello sender");
        assert_eq!(client.bytes_sent(), server.bytes_received());
        drop(client);
        assert!(server.recv_frame().unwrap().is_none());
    }

    #[test]
    fn wrong_key_fails_on_both_sides() {
        let (client, server) = pair(LinkKey::from_secret([1; 32]), LinkKey::from_secret([2; 32]));
        assert!(matches!(server, Err(DrError::AuthFailed(_))), "{server:?}");
        assert!(matches!(client, Err(DrError::AuthFailed(_))), "{client:?}");
    }

    #[test]
    fn repo_keys_derive_distinct_link_keys() {
        let a = RepoKey::from_secret([3; 32]);
        let b = RepoKey::from_secret([4; 32]);
        let (ka, ka2, kb) = (
            LinkKey::from_repo_key(&a),
            LinkKey::from_repo_key(&a),
            LinkKey::from_repo_key(&b),
        );
        assert_eq!(ka.auth, ka2.auth);
        assert_ne!(ka.auth, kb.auth);
        // The cached keys are the derived ones.
        let mut input = b"arkvm dr link root v1 (padded past the largest chunk)".to_vec();
        input.resize(MAX_CHUNK_SIZE as usize + 64, 0);
        let fresh = LinkKey::from_secret(*b.chunk_id(&input).as_bytes());
        assert_eq!((kb.auth, kb.session), (fresh.auth, fresh.session));
        assert_eq!(LinkKey::from_repo_key(&b).auth, fresh.auth);
        assert_ne!(ka.auth, ka.session);
        // The link secret is no chunk id of the label.
        assert_ne!(
            &ka.auth,
            a.chunk_id(b"arkvm dr link root v1 (padded past the largest chunk)")
                .as_bytes()
        );
    }

    #[test]
    fn replayed_or_reordered_frames_are_refused() {
        // Record what the client sends, then replay it out of order to a fresh server half.
        let key = LinkKey::from_secret([9; 32]);
        let (client, server) = pair(key.clone(), key);
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        client.send_frame(b"first").unwrap();
        client.send_frame(b"second").unwrap();
        // Swap the two frames by reading raw bytes from the server's socket.
        let mut raw = vec![0u8; client.bytes_sent() as usize];
        server.stream.read_exact(&mut raw).unwrap();
        let first_len = 4 + u32::from_be_bytes(raw[..4].try_into().unwrap()) as usize;
        let (first, second) = raw.split_at(first_len);
        let mut swapped = second.to_vec();
        swapped.extend_from_slice(first);
        let (mut tx, rx) = loopback();
        let mut forged = SecureLink {
            stream: rx,
            send: Direction::new([0; 32]),
            recv: std::mem::replace(&mut server.recv, Direction::new([0; 32])),
            bytes_sent: 0,
            bytes_received: 0,
        };
        tx.write_all(&swapped).unwrap();
        assert!(matches!(
            forged.recv_frame(),
            Err(DrError::FrameUnauthentic)
        ));
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let key = LinkKey::from_secret([5; 32]);
        let (client, server) = pair(key.clone(), key);
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        client.stream.write_all(&u32::MAX.to_be_bytes()).unwrap();
        assert!(matches!(
            server.recv_frame(),
            Err(DrError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn a_trickling_peer_cannot_stretch_the_handshake_past_its_deadline() {
        let key = LinkKey::from_secret([3; 32]);
        let (mut peer, stream) = loopback();
        // A per-read timeout of 1 s would never fire: a byte comes every 200 ms.
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let started = Instant::now();
        let deadline = started + std::time::Duration::from_secs(1);
        let server = std::thread::spawn(move || SecureLink::server_by(stream, &key, deadline));
        let mut hello = LINK_MAGIC.to_vec();
        hello.extend_from_slice(&[0u8; 32]);
        for byte in hello.iter().cycle().take(200) {
            if peer.write_all(&[*byte]).is_err() || server.is_finished() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let result = server.join().unwrap();
        let took = started.elapsed();
        assert!(
            matches!(&result, Err(DrError::Io { source, .. }) if source.kind() == ErrorKind::TimedOut),
            "{result:?}"
        );
        // 1 s deadline; the rest is slack for a loaded machine (the whole trickle lasts 40 s).
        assert!(
            took < std::time::Duration::from_secs(6),
            "held for {took:?}"
        );
    }

    #[test]
    fn a_handshake_within_its_deadline_succeeds() {
        let key = LinkKey::from_secret([4; 32]);
        let (client, stream) = loopback();
        let server_key = key.clone();
        let server = std::thread::spawn(move || {
            SecureLink::server_by(
                stream,
                &server_key,
                Instant::now() + std::time::Duration::from_secs(30),
            )
        });
        let mut client = SecureLink::client(client, &key).unwrap();
        let mut server = server.join().unwrap().unwrap();
        client.send_frame(b"ok").unwrap();
        assert_eq!(server.recv_frame().unwrap().unwrap(), b"ok");
    }

    fn loopback() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        (a, b)
    }
}

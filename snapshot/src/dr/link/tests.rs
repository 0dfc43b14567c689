//! Tests of the DR link: the handshake, frames, limits and deadlines.

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
    assert_eq!(ka.psk, ka2.psk);
    assert_ne!(ka.psk, kb.psk);
    // The cached keys are the derived ones.
    let mut input = b"arkvm dr link root v1 (padded past the largest chunk)".to_vec();
    input.resize(MAX_CHUNK_SIZE as usize + 64, 0);
    let fresh = LinkKey::from_secret(*b.chunk_id(&input).as_bytes());
    assert_eq!(kb.psk, fresh.psk);
    assert_eq!(LinkKey::from_repo_key(&b).psk, fresh.psk);
    // The link secret is no chunk id of the label.
    assert_ne!(
        &ka.psk,
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
    // Feed them back to the same server half through a fresh socket.
    let (mut tx, rx) = loopback();
    server.stream = rx;
    tx.write_all(&swapped).unwrap();
    assert!(matches!(
        server.recv_frame(),
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

/// A connected client and server with the same key.
fn linked(secret: u8) -> (SecureLink, SecureLink) {
    let key = LinkKey::from_secret([secret; 32]);
    let (client, server) = pair(key.clone(), key);
    (client.unwrap(), server.unwrap())
}

/// Sends `frames` from `client` and returns the bytes that reached the wire, read raw from the
/// server's socket (the server half's receive state does not advance).
fn wire_bytes(client: &mut SecureLink, server: &mut SecureLink, frames: &[&[u8]]) -> Vec<u8> {
    let before = client.bytes_sent();
    for frame in frames {
        client.send_frame(frame).unwrap();
    }
    let mut raw = vec![0u8; (client.bytes_sent() - before) as usize];
    server.stream.read_exact(&mut raw).unwrap();
    raw
}

/// Feeds `raw` to `server` as if it came from its peer, and returns what it receives.
fn receive_raw(server: &mut SecureLink, raw: &[u8]) -> Result<Option<Vec<u8>>, DrError> {
    let (mut tx, rx) = loopback();
    server.stream = rx;
    tx.write_all(raw).unwrap();
    drop(tx);
    server.recv_frame()
}

#[test]
fn two_sessions_with_one_key_seal_the_same_frame_differently() {
    let plain = vec![0x5a; 100_000];
    let (mut client_a, mut server_a) = linked(11);
    let (mut client_b, mut server_b) = linked(11);
    let a = wire_bytes(&mut client_a, &mut server_a, &[&plain]);
    let b = wire_bytes(&mut client_b, &mut server_b, &[&plain]);
    // Same length header, different ciphertext: each session has its own keys.
    assert_eq!(a.len(), b.len());
    assert_eq!(a[..4], b[..4]);
    let same = a[4..].iter().zip(&b[4..]).filter(|(x, y)| x == y).count();
    assert!(same < a.len() / 64, "{same} of {} bytes equal", a.len());
    // Both still open on their own session.
    assert_eq!(receive_raw(&mut server_a, &a).unwrap().unwrap(), plain);
    assert_eq!(receive_raw(&mut server_b, &b).unwrap().unwrap(), plain);
}

#[test]
fn a_frame_of_another_session_is_refused() {
    let (mut client_a, mut server_a) = linked(12);
    let (_client_b, mut server_b) = linked(12);
    let a = wire_bytes(&mut client_a, &mut server_a, &[b"for session a"]);
    assert!(matches!(
        receive_raw(&mut server_b, &a),
        Err(DrError::FrameUnauthentic)
    ));
}

#[test]
fn frames_larger_than_a_noise_message_round_trip() {
    let (mut client, mut server) = linked(13);
    let first = MAX_PIECE_LEN - HEADER_LEN;
    let sizes = [
        0,
        1,
        first - 1,
        first,
        first + 1,
        first + MAX_PIECE_LEN,
        first + MAX_PIECE_LEN + 1,
        MAX_MESSAGE_LEN,
        64 << 10,
        (64 << 10) + 1,
        1 << 20,
        (3 << 20) + 12_345,
    ];
    for size in sizes {
        let plain: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        let (sent, received) = (client.bytes_sent(), server.bytes_received());
        client.send_frame(&plain).unwrap();
        let got = server.recv_frame().unwrap().unwrap();
        assert!(got == plain, "a frame of {size} bytes came back changed");
        let on_wire = 4 + sealed_len(size) as u64;
        assert_eq!(client.bytes_sent() - sent, on_wire, "{size}");
        assert_eq!(server.bytes_received() - received, on_wire, "{size}");
        // And the other way.
        server.send_frame(&plain).unwrap();
        assert!(client.recv_frame().unwrap().unwrap() == plain, "{size}");
    }
}

#[test]
fn the_largest_frame_round_trips_and_one_byte_more_is_refused() {
    let (mut client, mut server) = linked(14);
    let plain = vec![7u8; MAX_FRAME_LEN];
    let sender = std::thread::spawn(move || {
        client.send_frame(&plain).unwrap();
        let too_large = client.send_frame(&vec![0u8; MAX_FRAME_LEN + 1]);
        assert!(
            matches!(too_large, Err(DrError::FrameTooLarge { .. })),
            "{too_large:?}"
        );
        client
    });
    let got = server.recv_frame().unwrap().unwrap();
    assert_eq!(got.len(), MAX_FRAME_LEN);
    assert!(got.iter().all(|&b| b == 7));
    drop(sender.join().unwrap());
    assert!(server.recv_frame().unwrap().is_none());
}

#[test]
fn a_sealed_length_past_the_limit_is_refused_before_reading() {
    let (_client, mut server) = linked(15);
    for len in [MAX_SEALED_LEN + 1, 0, sealed_len(0) - 1] {
        let result = receive_raw(&mut server, &(len as u32).to_be_bytes());
        assert!(
            matches!(result, Err(DrError::FrameTooLarge { .. })),
            "{len}: {result:?}"
        );
    }
}

#[test]
fn a_sealed_length_that_no_frame_has_is_refused() {
    // Two messages whose second is shorter than its tag: no frame seals to this length.
    let (_client, mut server) = linked(16);
    let len = MAX_MESSAGE_LEN + TAG_LEN - 1;
    let mut raw = (len as u32).to_be_bytes().to_vec();
    raw.resize(4 + len, 0);
    assert!(matches!(
        receive_raw(&mut server, &raw),
        Err(DrError::FrameUnauthentic)
    ));
}

#[test]
fn a_tampered_frame_is_refused_wherever_it_is_changed() {
    let plain: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    let (mut client, mut server) = linked(17);
    let raw = wire_bytes(&mut client, &mut server, &[&plain]);
    // The length header, the first message (its header, body and tag), a later message, and
    // the last byte.
    let positions = [
        1,
        3,
        4,
        4 + 2,
        4 + 1000,
        4 + MAX_MESSAGE_LEN - 1,
        4 + MAX_MESSAGE_LEN + 5,
        raw.len() - 1,
    ];
    for at in positions {
        // A fresh session for each try: the receive state must be the one the frame was
        // sealed for.
        let (mut client, mut server) = linked(17);
        let mut damaged = wire_bytes(&mut client, &mut server, &[&plain]);
        assert_eq!(damaged.len(), raw.len());
        damaged[at] ^= 0x01;
        let result = receive_raw(&mut server, &damaged);
        assert!(
            matches!(
                result,
                Err(DrError::FrameUnauthentic | DrError::FrameTooLarge { .. } | DrError::Io { .. })
            ),
            "a change at byte {at} was not caught: {result:?}"
        );
    }
}

#[test]
fn a_truncated_frame_is_refused() {
    let (mut client, mut server) = linked(18);
    let raw = wire_bytes(&mut client, &mut server, &[&[3u8; 70_000]]);
    let result = receive_raw(&mut server, &raw[..raw.len() - 1]);
    assert!(
        matches!(&result, Err(DrError::Io { source, .. }) if source.kind() == ErrorKind::UnexpectedEof),
        "{result:?}"
    );
}

#[test]
fn a_peer_with_another_psk_gets_nothing_after_the_hello() {
    let key = LinkKey::from_secret([19; 32]);
    let (mut peer, stream) = loopback();
    let server = std::thread::spawn(move || SecureLink::server(stream, &key));
    // A well-formed first Noise message, made with another pre-shared key.
    let client_hello = new_hello();
    peer.write_all(&client_hello).unwrap();
    let mut server_hello = [0u8; HELLO_LEN];
    peer.read_exact(&mut server_hello).unwrap();
    let mut noise = LinkKey::from_secret([20; 32])
        .handshake(&client_hello, &server_hello, true)
        .unwrap();
    let mut message = [0u8; HANDSHAKE_MESSAGE_LEN];
    noise.write_message(&[], &mut message).unwrap();
    peer.write_all(&message).unwrap();
    let result = server.join().unwrap();
    assert!(matches!(result, Err(DrError::AuthFailed(_))), "{result:?}");
    let mut rest = Vec::new();
    peer.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let _ = peer.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn a_replayed_first_message_is_refused() {
    // The first Noise message is bound to the server's fresh hello, so a recorded one fails
    // on any later connection.
    let key = LinkKey::from_secret([21; 32]);
    let (mut peer, stream) = loopback();
    let server_key = key.clone();
    let server = std::thread::spawn(move || SecureLink::server(stream, &server_key));
    let client_hello = new_hello();
    peer.write_all(&client_hello).unwrap();
    let mut server_hello = [0u8; HELLO_LEN];
    peer.read_exact(&mut server_hello).unwrap();
    let mut noise = key.handshake(&client_hello, &server_hello, true).unwrap();
    let mut recorded = [0u8; HANDSHAKE_MESSAGE_LEN];
    noise.write_message(&[], &mut recorded).unwrap();
    peer.write_all(&recorded).unwrap();
    assert!(server.join().unwrap().is_ok());

    let (mut peer, stream) = loopback();
    let server_key = key.clone();
    let server = std::thread::spawn(move || SecureLink::server(stream, &server_key));
    peer.write_all(&client_hello).unwrap();
    peer.read_exact(&mut server_hello).unwrap();
    peer.write_all(&recorded).unwrap();
    let result = server.join().unwrap();
    assert!(matches!(result, Err(DrError::AuthFailed(_))), "{result:?}");
}

#[test]
fn an_older_client_is_told_the_version_and_answered_with_ours() {
    let key = LinkKey::from_secret([22; 32]);
    let (mut peer, stream) = loopback();
    let server = std::thread::spawn(move || SecureLink::server(stream, &key));
    let mut hello = b"ARKVMDR1".to_vec();
    hello.extend_from_slice(&[9; 32]);
    peer.write_all(&hello).unwrap();
    // The old client reads our hello and can say which version it met.
    let mut answer = [0u8; HELLO_LEN];
    peer.read_exact(&mut answer).unwrap();
    assert_eq!(&answer[..8], LINK_MAGIC);
    let result = server.join().unwrap();
    assert!(
        matches!(
            result,
            Err(DrError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: 1
            })
        ),
        "{result:?}"
    );
    let message = result.unwrap_err().to_string();
    assert!(message.contains("protocol version"), "{message}");
}

#[test]
fn a_newer_receiver_is_named_by_its_version() {
    let (client, mut fake) = loopback();
    let fake = std::thread::spawn(move || {
        let mut hello = [0u8; HELLO_LEN];
        fake.read_exact(&mut hello).unwrap();
        let mut answer = b"ARKVMDR3".to_vec();
        answer.extend_from_slice(&[1; 32]);
        fake.write_all(&answer).unwrap();
        fake
    });
    let result = SecureLink::client(client, &LinkKey::from_secret([23; 32]));
    drop(fake.join().unwrap());
    assert!(
        matches!(result, Err(DrError::VersionMismatch { theirs: 3, .. })),
        "{result:?}"
    );
}

#[test]
fn an_older_receiver_that_hangs_up_is_explained() {
    // A version 1 receiver reads the hello, finds the wrong magic and closes.
    let (client, mut fake) = loopback();
    let fake = std::thread::spawn(move || {
        let mut hello = [0u8; HELLO_LEN];
        fake.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], LINK_MAGIC);
    });
    let result = SecureLink::client(client, &LinkKey::from_secret([24; 32]));
    fake.join().unwrap();
    let Err(DrError::Io { source, .. }) = &result else {
        panic!("{result:?}");
    };
    assert_eq!(source.kind(), ErrorKind::UnexpectedEof);
    assert!(
        source.to_string().contains("DR protocol version"),
        "{source}"
    );
}

#[test]
fn a_stranger_that_is_not_arkvm_gets_nothing() {
    let key = LinkKey::from_secret([25; 32]);
    let (mut peer, stream) = loopback();
    let server = std::thread::spawn(move || SecureLink::server(stream, &key));
    peer.write_all(&[b'x'; HELLO_LEN]).unwrap();
    let result = server.join().unwrap();
    assert!(matches!(result, Err(DrError::Protocol(_))), "{result:?}");
    let mut rest = Vec::new();
    let _ = peer.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{rest:?}");
}

//! Strangers that trickle bytes at the DR port: they hold a slot for at most the handshake
//! deadline and at most their address's share of the slots, so a legitimate client still gets
//! through.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use super::*;
use crate::repo::{RepoKey, Repository};
use crate::test_util::TestDir;

/// Strangers connecting at once.
const TRICKLERS: usize = 32;
/// Time between two bytes of a trickler.
const TRICKLE_EVERY: Duration = Duration::from_secs(5);
/// How long the legitimate client may take to get its answer.
const CLIENT_BUDGET: Duration = Duration::from_secs(15);

/// A TCP connection to `to` from the local address `from` (any port).
fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let from: SocketAddr = format!("{from}:0").parse().expect("a loopback address");
    socket.bind(&from.into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
    Ok(socket.into())
}

/// One stranger: connects from `from`, sends one byte of a plausible hello every
/// [`TRICKLE_EVERY`], and reconnects at once whenever the receiver closes it, until `stop`.
fn trickle(from: &'static str, to: SocketAddr, stop: Arc<AtomicBool>, connected: Arc<AtomicUsize>) {
    let hello = LINK_MAGIC.to_vec();
    let mut first = true;
    while !stop.load(Ordering::SeqCst) {
        let Ok(mut stream) = connect_from(from, to) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if first {
            connected.fetch_add(1, Ordering::SeqCst);
            first = false;
        }
        let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
        let mut next_byte = Instant::now();
        let mut sent = 0usize;
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            if Instant::now() >= next_byte {
                if stream.write_all(&[hello[sent % hello.len()]]).is_err() {
                    break;
                }
                sent += 1;
                next_byte += TRICKLE_EVERY;
            }
            // Waits 100 ms; an end of stream or an error means the receiver closed us.
            match stream.read(&mut [0u8; 64]) {
                Ok(_) => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
    }
}

#[test]
fn trickling_strangers_do_not_stop_a_status_client() {
    let dir = TestDir::new("dr-stall");
    let key = RepoKey::generate();
    let repo = Repository::init(dir.path(), Some(key.clone())).unwrap();
    // The defaults of `arkvm dr serve`: 8 slots, a 10 s handshake deadline.
    let config = ReceiverConfig::default();
    let per_peer = config.per_peer_limit();
    assert!(per_peer < config.max_connections);
    let receiver = Arc::new(Receiver::new(repo, &key, config));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = Arc::clone(&receiver);
    std::thread::spawn(move || serving.serve(listener));

    // The strangers come from 127.0.0.2, the client from 127.0.0.1.
    let stop = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicUsize::new(0));
    let tricklers: Vec<_> = (0..TRICKLERS)
        .map(|_| {
            let (stop, connected) = (Arc::clone(&stop), Arc::clone(&connected));
            std::thread::spawn(move || trickle("127.0.0.2", addr, stop, connected))
        })
        .collect();
    let stop_all = || {
        stop.store(true, Ordering::SeqCst);
        for t in tricklers {
            t.join().unwrap();
        }
    };
    // Wait until every stranger has connected and they hold every slot they can get.
    let ready_by = Instant::now() + Duration::from_secs(30);
    while connected.load(Ordering::SeqCst) < TRICKLERS || receiver.connections() < per_peer {
        if Instant::now() > ready_by {
            stop_all();
            panic!(
                "the strangers never got going: {} connected, {} slots held",
                connected.load(Ordering::SeqCst),
                receiver.connections()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let started = Instant::now();
    let mut attempts = 0;
    let mut last_error = None;
    let answered = loop {
        if started.elapsed() > CLIENT_BUDGET {
            break false;
        }
        attempts += 1;
        match query_status(
            &addr.to_string(),
            &LinkKey::from_repo_key(&key),
            Duration::from_secs(5),
        ) {
            Ok(status) => {
                assert!(status.encrypted);
                break true;
            }
            Err(e) => {
                last_error = Some(e.to_string());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let took = started.elapsed();
    let held = receiver.connections();
    stop_all();
    assert!(
        answered && took <= CLIENT_BUDGET,
        "no status within {CLIENT_BUDGET:?} ({attempts} attempts, last error {last_error:?})"
    );
    assert!(
        held <= per_peer + 1,
        "the strangers held {held} slots, more than their address's {per_peer}"
    );
}

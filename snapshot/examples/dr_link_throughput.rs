//! A loopback throughput benchmark of the DR link:
//!
//! ```text
//! cargo run --release -p snapshot --example dr_link_throughput
//! ```
//!
//! It sends `ARKVM_LINK_BENCH_MIB` MiB (default 256) in frames of 1 MiB (the size of a memory
//! chunk) and of 16 KiB from a client link to a server link on 127.0.0.1 and prints the rate.
//! It asserts only that every frame arrives whole; speed depends on the machine.

use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use snapshot::dr::{LinkKey, SecureLink};

fn links() -> (SecureLink, SecureLink) {
    let key = LinkKey::from_secret([42; 32]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    let server_key = key.clone();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        SecureLink::server(stream, &server_key).expect("server handshake")
    });
    let client = SecureLink::client(TcpStream::connect(addr).expect("connect"), &key)
        .expect("client handshake");
    (client, server.join().expect("server thread"))
}

/// Sends `total` bytes in frames of `frame` bytes; returns MiB/s.
fn measure(total: usize, frame: usize) -> f64 {
    let (mut client, mut server) = links();
    let frames = total / frame;
    let payload: Vec<u8> = (0..frame).map(|i| (i * 131 % 251) as u8).collect();
    let expected = payload.clone();
    let started = Instant::now();
    let receiver = std::thread::spawn(move || {
        for _ in 0..frames {
            let got = server.recv_required("a bench frame").expect("a frame");
            assert_eq!(got.len(), expected.len());
            assert_eq!(got[got.len() - 1], expected[expected.len() - 1]);
        }
        server.bytes_received()
    });
    for _ in 0..frames {
        client.send_frame(&payload).expect("send a frame");
    }
    let received = receiver.join().expect("receiver thread");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(received, client.bytes_sent());
    (frames * frame) as f64 / (1 << 20) as f64 / secs
}

fn main() {
    let mib: usize = std::env::var("ARKVM_LINK_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    for frame in [1 << 20, 16 << 10] {
        let rates: Vec<f64> = (0..3).map(|_| measure(mib << 20, frame)).collect();
        let best = rates.iter().cloned().fold(0.0, f64::max);
        println!(
            "frames of {frame} bytes: best {best:.0} MiB/s of {:?}",
            rates.iter().map(|r| r.round()).collect::<Vec<_>>()
        );
    }
}

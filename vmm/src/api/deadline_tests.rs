//! The request deadline: clients that trickle their request heads hold every connection slot,
//! yet each is answered 408 and closed within the deadline, and a legitimate client gets
//! through.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use super::{ApiServer, MAX_CONNECTIONS, REQUEST_DEADLINE};

/// Sends a request head one byte every 200 ms, forever; returns what the server answered and
/// when the connection ended.
fn trickle(sock: &Path, started: &Barrier) -> (String, Duration) {
    let mut stream = UnixStream::connect(sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    started.wait();
    let t0 = Instant::now();
    let head = b"GET /vm HTTP/1.1\r\nX-Slow: "
        .iter()
        .chain(std::iter::repeat(&b'a'));
    let mut answer = Vec::new();
    for &b in head {
        let _ = stream.write_all(&[b]);
        let mut buf = [0u8; 512];
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "never cut off");
    }
    (String::from_utf8_lossy(&answer).into_owned(), t0.elapsed())
}

/// One quick request that the server answers without the VMM (an unknown path).
fn quick_request(sock: &Path) -> Option<String> {
    let mut stream = UnixStream::connect(sock).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET /nope HTTP/1.1\r\n\r\n").ok()?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    Some(answer)
}

#[test]
fn trickling_clients_are_cut_off_at_the_deadline_and_others_get_through() {
    let dir = std::env::temp_dir().join(format!("arkvm-api-deadline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let server = ApiServer::bind(&sock).unwrap();
    let started = Arc::new(Barrier::new(MAX_CONNECTIONS + 1));
    let tricklers: Vec<_> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let (sock, started) = (sock.clone(), started.clone());
            thread::spawn(move || trickle(&sock, &started))
        })
        .collect();
    started.wait();
    let t0 = Instant::now();
    // Every slot is held now; a legitimate client retries until it is served.
    let served = loop {
        if let Some(a) = quick_request(&sock) {
            if a.starts_with("HTTP/1.1 404") {
                break t0.elapsed();
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "never served");
        thread::sleep(Duration::from_millis(200));
    };
    let slack = Duration::from_secs(8);
    assert!(served < REQUEST_DEADLINE + slack, "served after {served:?}");
    for t in tricklers {
        let (answer, took) = t.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
        assert!(answer.contains("did not arrive within"), "{answer:?}");
        assert!(
            took >= REQUEST_DEADLINE - Duration::from_secs(1) && took < REQUEST_DEADLINE + slack,
            "cut off after {took:?}"
        );
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

//! Tests of the DR protocol over loopback TCP between temporary repositories: commits, resume,
//! wrong keys, tampered and cut connections, strangers, retention and the retrying sender.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::chunk::CHUNK_SIZE;
use crate::manifest::PartKind;
use crate::repo::{PointManifest, RepoKey, Repository, CHUNK_PREFIX};
use crate::test_util::TestDir;

const TIMEOUT: Duration = Duration::from_secs(20);

/// `chunks` MiB of incompressible memory; chunk `i` comes from `seeds[i]`.
fn memory(seeds: &[u32]) -> Vec<u8> {
    let mut mem = vec![0u8; seeds.len() * CHUNK_SIZE];
    for (chunk, seed) in mem.chunks_mut(CHUNK_SIZE).zip(seeds) {
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(chunk);
    }
    mem
}

/// Stores `mem` and a generation state as a point of `vm`.
fn make_point(repo: &Repository, vm: &str, mem: &[u8], generation: u32) -> PointManifest {
    let mut backup = repo.start_backup(vm, None).unwrap();
    backup.put_state("vm-state", &generation).unwrap();
    let object = backup
        .add_object("memory", PartKind::Memory, mem.len() as u64)
        .unwrap();
    for (i, chunk) in mem.chunks(CHUNK_SIZE).enumerate() {
        object.put_chunk(i as u64, chunk).unwrap();
    }
    backup.finish_object(object).unwrap();
    backup.commit().unwrap()
}

fn link_key(n: u8) -> LinkKey {
    LinkKey::from_secret([n; 32])
}

/// A receiver serving a fresh repository on a loopback port.
struct Site {
    dir: TestDir,
    receiver: Arc<Receiver>,
    addr: SocketAddr,
}

impl Site {
    fn start(tag: &str, repo_key: Option<&RepoKey>, link: LinkKey, keep_last: usize) -> Self {
        let dir = TestDir::new(tag);
        let key = repo_key.cloned().unwrap_or_else(RepoKey::generate);
        let repo = Repository::init(dir.path(), repo_key.cloned()).unwrap();
        let config = ReceiverConfig {
            keep_last,
            io_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            ..ReceiverConfig::default()
        };
        let receiver = Arc::new(Receiver::with_link_key(repo, &key, link, config));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = Arc::clone(&receiver);
        std::thread::spawn(move || serving.serve(listener));
        Self {
            dir,
            receiver,
            addr,
        }
    }

    fn addr(&self) -> String {
        self.addr.to_string()
    }

    fn point_ids(&self) -> Vec<String> {
        self.receiver.repository().point_ids().unwrap()
    }

    /// Waits until the receiver holds exactly `ids` (pruning runs after its answer).
    fn wait_points(&self, ids: &[String]) {
        for _ in 0..250 {
            if self.point_ids() == ids {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(self.point_ids(), ids);
    }

    fn chunk_count(&self) -> usize {
        self.receiver
            .repository()
            .store()
            .list(CHUNK_PREFIX)
            .unwrap()
            .len()
    }

    /// Waits until the receiver has counted a discarded checkpoint (its thread may still be
    /// finishing when the sender sees the failure).
    fn wait_discarded(&self, count: u64) -> ReceiverStatus {
        for _ in 0..200 {
            let status = self.receiver.status().unwrap();
            if status.checkpoints_discarded >= count {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the receiver never discarded the checkpoint");
    }
}

/// What a proxy does to one connection's client-to-server bytes.
#[derive(Clone, Copy)]
enum Plan {
    /// Forwards everything.
    Pass,
    /// Forwards this many bytes, then cuts both directions.
    Cut(usize),
    /// Flips the byte at this offset.
    Flip(usize),
}

/// A TCP proxy to `target` that treats its n-th connection by `plans[n]` (later ones pass).
fn proxy(target: SocketAddr, plans: Vec<Plan>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for (n, client) in listener.incoming().enumerate() {
            let Ok(mut client) = client else { continue };
            let plan = plans.get(n).copied().unwrap_or(Plan::Pass);
            let mut server = TcpStream::connect(target).unwrap();
            let (mut client_back, mut server_back) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server_back, &mut client_back);
                let _ = client_back.shutdown(Shutdown::Both);
            });
            std::thread::spawn(move || {
                let mut offset = 0usize;
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match client.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let mut data = &mut buf[..n];
                    match plan {
                        Plan::Pass => {}
                        Plan::Flip(at) if (offset..offset + n).contains(&at) => {
                            data[at - offset] ^= 0x40;
                        }
                        Plan::Flip(_) => {}
                        Plan::Cut(limit) => {
                            let keep = limit.saturating_sub(offset).min(n);
                            data = &mut data[..keep];
                        }
                    }
                    if server.write_all(data).is_err() {
                        break;
                    }
                    offset += n;
                    if matches!(plan, Plan::Cut(limit) if offset >= limit) {
                        break;
                    }
                }
                let _ = server.shutdown(Shutdown::Both);
                let _ = client.shutdown(Shutdown::Both);
            });
        }
    });
    addr.to_string()
}

fn send(repo: &Repository, id: &str, addr: &str, key: &LinkKey) -> Result<SendReport, DrError> {
    send_checkpoint(repo, id, addr, key, TIMEOUT, &CheckpointInfo::default())
}

#[test]
fn checkpoints_commit_and_send_only_what_the_receiver_lacks() {
    let src_dir = TestDir::new("dr-src");
    let src = Repository::init(src_dir.path(), None).unwrap();
    let site = Site::start("dr-dst", None, link_key(1), 0);
    let mem1 = memory(&[1, 2, 3, 4, 5, 6]);
    let p1 = make_point(&src, "vm1", &mem1, 1);
    let report = send(&src, &p1.id, &site.addr(), &link_key(1)).unwrap();
    // Six memory chunks and one state chunk.
    assert_eq!(report.chunks_total, 7);
    assert_eq!(report.chunks_sent, 7);
    assert!(report.bytes_sent > 6 * CHUNK_SIZE as u64, "{report:?}");
    assert!(!report.commit.already_present);
    assert_eq!(site.point_ids(), vec![p1.id.clone()]);
    let dst = site.receiver.repository();
    let point = dst.read_point(&p1.id).unwrap();
    assert_eq!(point, p1);
    let mut restored = Vec::new();
    dst.read_object(&point, "memory", &mut restored).unwrap();
    assert_eq!(restored, mem1);
    assert!(dst.verify(|_| {}).unwrap().is_clean());

    // One memory chunk and the state changed: two chunks travel.
    let p2 = make_point(&src, "vm1", &memory(&[1, 2, 3, 40, 5, 6]), 2);
    let report = send(&src, &p2.id, &site.addr(), &link_key(1)).unwrap();
    assert_eq!((report.chunks_sent, report.chunks_skipped), (2, 5));
    assert!(report.bytes_sent < 3 * CHUNK_SIZE as u64);
    // Sending a point again changes nothing.
    let again = send(&src, &p2.id, &site.addr(), &link_key(1)).unwrap();
    assert_eq!(again.chunks_sent, 0);
    assert!(again.commit.already_present);
    assert_eq!(site.point_ids(), vec![p1.id.clone(), p2.id.clone()]);

    let status = query_status(&site.addr(), &link_key(1), TIMEOUT).unwrap();
    assert_eq!(status.points, 2);
    assert_eq!(status.vms.len(), 1);
    assert_eq!(status.vms[0].last_point_id, p2.id);
    assert_eq!(status.vms[0].last_created_unix_ms, p2.created_unix_ms);
    assert_eq!(status.checkpoints_committed, 3);
    assert_eq!(status.recent.last().unwrap().chunks_received, 0);
    assert_eq!(status.recent[1].chunks_received, 2);
}

#[test]
fn a_sender_with_the_wrong_key_is_rejected() {
    let src_dir = TestDir::new("dr-wrongkey-src");
    let src = Repository::init(src_dir.path(), None).unwrap();
    let site = Site::start("dr-wrongkey-dst", None, link_key(1), 0);
    let p1 = make_point(&src, "vm1", &memory(&[1, 2]), 1);
    let err = send(&src, &p1.id, &site.addr(), &link_key(2)).unwrap_err();
    assert!(matches!(err, DrError::AuthFailed(_)), "{err:?}");
    assert!(matches!(
        query_status(&site.addr(), &link_key(2), TIMEOUT),
        Err(DrError::AuthFailed(_))
    ));
    assert!(site.point_ids().is_empty());
    assert_eq!(site.chunk_count(), 0);
}

#[test]
fn a_tampered_frame_is_rejected_and_the_checkpoint_discarded() {
    let src_dir = TestDir::new("dr-tamper-src");
    let src = Repository::init(src_dir.path(), None).unwrap();
    let site = Site::start("dr-tamper-dst", None, link_key(1), 0);
    let p1 = make_point(&src, "vm1", &memory(&[1, 2, 3, 4]), 1);
    // Well inside the second chunk frame (each is about 1 MiB: the memory does not compress).
    let via = proxy(site.addr, vec![Plan::Flip(CHUNK_SIZE + CHUNK_SIZE / 2)]);
    let err = send(&src, &p1.id, &via, &link_key(1)).unwrap_err();
    assert!(
        matches!(err, DrError::Refused(_) | DrError::Io { .. }),
        "{err:?}"
    );
    let status = site.wait_discarded(1);
    assert!(
        status
            .last_discard
            .as_deref()
            .is_some_and(|why| why.contains("authentication")),
        "{status:?}"
    );
    assert!(site.point_ids().is_empty());
    // The chunks before the damaged frame (the state and the first memory chunk) were kept
    // and are not sent again.
    let stored = site.chunk_count() as u64;
    assert_eq!(stored, 2);
    let report = send(&src, &p1.id, &via, &link_key(1)).unwrap();
    assert_eq!(report.chunks_sent, report.chunks_total - stored);
    assert_eq!(site.point_ids(), vec![p1.id.clone()]);
}

#[test]
fn a_stranger_gets_nothing_and_writes_nothing() {
    let site = Site::start("dr-stranger", None, link_key(1), 0);
    // Not the protocol: closed without a byte.
    let mut s = TcpStream::connect(site.addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.is_empty(), "{got:?}");
    // The protocol without the key: a random nonce, then nothing, whatever it sends.
    let mut s = TcpStream::connect(site.addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut hello = LINK_MAGIC.to_vec();
    hello.extend_from_slice(&[0; 32]);
    s.write_all(&hello).unwrap();
    let mut server_hello = [0u8; 40];
    s.read_exact(&mut server_hello).unwrap();
    assert_eq!(&server_hello[..8], LINK_MAGIC);
    let _ = s.write_all(&[0xAA; 32]);
    let status_request = Message::StatusRequest.encode();
    let _ = s.write_all(&(status_request.len() as u32 + 16).to_be_bytes());
    let _ = s.write_all(&status_request);
    let _ = s.write_all(&[0; 16]);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.is_empty(), "{got:?}");
    assert!(site.point_ids().is_empty());
    assert_eq!(site.chunk_count(), 0);
    // The receiver still serves keyed peers.
    assert_eq!(
        query_status(&site.addr(), &link_key(1), TIMEOUT)
            .unwrap()
            .points,
        0
    );
}

#[test]
fn a_cut_connection_leaves_no_point_and_the_next_try_resumes() {
    let src_dir = TestDir::new("dr-cut-src");
    let src = Repository::init(src_dir.path(), None).unwrap();
    let site = Site::start("dr-cut-dst", None, link_key(1), 0);
    let p1 = make_point(&src, "vm1", &memory(&[1, 2, 3, 4, 5, 6, 7, 8]), 1);
    // Cut in the middle of the fourth chunk frame.
    let via = proxy(site.addr, vec![Plan::Cut(3 * CHUNK_SIZE + CHUNK_SIZE / 2)]);
    assert!(send(&src, &p1.id, &via, &link_key(1)).is_err());
    site.wait_discarded(1);
    assert!(site.point_ids().is_empty());
    let stored = site.chunk_count() as u64;
    assert!((2..=4).contains(&stored), "{stored} chunks stored");
    let report = send(&src, &p1.id, &via, &link_key(1)).unwrap();
    assert_eq!(report.chunks_sent, report.chunks_total - stored);
    assert_eq!(site.point_ids(), vec![p1.id.clone()]);
    assert!(site
        .receiver
        .repository()
        .verify(|_| {})
        .unwrap()
        .is_clean());
}

#[test]
fn the_receiver_keeps_the_last_k_points_per_vm() {
    let src_dir = TestDir::new("dr-keep-src");
    let src = Repository::init(src_dir.path(), None).unwrap();
    let site = Site::start("dr-keep-dst", None, link_key(1), 2);
    let mut ids = Vec::new();
    for generation in 0..4u32 {
        let p = make_point(&src, "vm1", &memory(&[generation, 100]), generation);
        let report = send(&src, &p.id, &site.addr(), &link_key(1)).unwrap();
        assert_eq!(report.commit.points_kept, (generation as u64 + 1).min(2));
        ids.push(p.id);
    }
    let other = make_point(&src, "vm2", &memory(&[7]), 0);
    send(&src, &other.id, &site.addr(), &link_key(1)).unwrap();
    let mut expected = vec![ids[2].clone(), ids[3].clone(), other.id.clone()];
    expected.sort();
    site.wait_points(&expected);
    // Chunks only the pruned points used are gone: 2 + 2 (vm1, sharing chunk 100) + 2 (vm2)
    // memory and state chunks... counted exactly from the kept manifests.
    let dst = site.receiver.repository();
    let used: std::collections::HashSet<_> = expected
        .iter()
        .flat_map(|id| {
            dst.read_point(id)
                .unwrap()
                .chunk_ids()
                .copied()
                .collect::<Vec<_>>()
        })
        .collect();
    // The shared lock waits for the collection to finish.
    let lock = dst
        .store()
        .lock(crate::repo::LockMode::Shared, true)
        .unwrap();
    assert_eq!(site.chunk_count(), used.len());
    drop(lock);
    assert!(dst.verify(|_| {}).unwrap().is_clean());
}

#[test]
fn the_retrying_sender_reconnects_and_resumes() {
    let src_dir = TestDir::new("dr-retry-src");
    let src = Repository::init(src_dir.path(), None).unwrap();
    let site = Site::start("dr-retry-dst", None, link_key(1), 0);
    let p1 = make_point(&src, "vm1", &memory(&[1, 2, 3, 4, 5, 6]), 1);
    let via = proxy(site.addr, vec![Plan::Cut(2 * CHUNK_SIZE + CHUNK_SIZE / 2)]);
    let mut sender = DrSender::with_link_key(
        &via,
        link_key(1),
        SenderConfig {
            timeout: TIMEOUT,
            attempts: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(100),
        },
    );
    let report = sender
        .send(
            &src,
            &p1.id,
            &CheckpointInfo {
                pause_us: Some(900),
            },
        )
        .unwrap();
    assert!(report.chunks_sent < report.chunks_total, "{report:?}");
    assert_eq!(sender.stats().failed_attempts, 1);
    assert_eq!(sender.stats().checkpoints_sent, 1);
    assert_eq!(
        sender.stats().last_point_created_unix_ms,
        Some(p1.created_unix_ms)
    );
    assert_eq!(sender.stats().rpo_ms(p1.created_unix_ms + 1500), Some(1500));
    sender.skip_interval();
    assert_eq!(sender.stats().intervals_skipped, 1);
    // The kept connection carries the next checkpoint and a status request.
    let p2 = make_point(&src, "vm1", &memory(&[1, 2, 3, 4, 5, 60]), 2);
    assert_eq!(
        sender
            .send(&src, &p2.id, &CheckpointInfo::default())
            .unwrap()
            .chunks_sent,
        2
    );
    let status = sender.receiver_status().unwrap();
    assert_eq!(status.points, 2);
    assert_eq!(status.recent[0].pause_us, Some(900));
    assert_eq!(sender.stats().failed_attempts, 1);
}

#[test]
fn encrypted_repositories_travel_sealed_and_must_match() {
    let key = RepoKey::generate();
    let link = LinkKey::from_repo_key(&key);
    let src_dir = TestDir::new("dr-enc-src");
    let src = Repository::init(src_dir.path(), Some(key.clone())).unwrap();
    let sealed_site = Site::start("dr-enc-dst", Some(&key), link.clone(), 0);
    let plain_site = Site::start("dr-enc-plain", None, link.clone(), 0);
    let p1 = make_point(&src, "vm1", &memory(&[1, 2]), 1);
    let report = send(&src, &p1.id, &sealed_site.addr(), &link).unwrap();
    assert_eq!(report.chunks_sent, 3);
    let dst = sealed_site.receiver.repository();
    assert!(dst.is_encrypted());
    assert_eq!(dst.read_point(&p1.id).unwrap(), p1);
    let err = send(&src, &p1.id, &plain_site.addr(), &link).unwrap_err();
    assert!(matches!(err, DrError::Refused(_)), "{err:?}");
    assert!(plain_site.point_ids().is_empty());
    drop(sealed_site.dir);
}

#[test]
fn two_vms_send_at_once_and_both_commit() {
    let src_dir = TestDir::new("dr-two-src");
    let src = Repository::init(src_dir.path(), None).unwrap();
    let site = Site::start("dr-two-dst", None, link_key(1), 1);
    let a1 = make_point(&src, "vma", &memory(&[1, 2, 3]), 1);
    let b1 = make_point(&src, "vmb", &memory(&[4, 5, 6]), 1);
    let a2 = make_point(&src, "vma", &memory(&[1, 2, 30]), 2);
    let b2 = make_point(&src, "vmb", &memory(&[4, 5, 60]), 2);
    let addr = site.addr();
    let (a_ids, b_ids) = ([a1.id, a2.id.clone()], [b1.id, b2.id.clone()]);
    std::thread::scope(|s| {
        let (src, addr) = (&src, &addr);
        let a = s.spawn(move || {
            for id in &a_ids {
                send(src, id, addr, &link_key(1)).unwrap();
            }
        });
        let b = s.spawn(move || {
            for id in &b_ids {
                send(src, id, addr, &link_key(1)).unwrap();
            }
        });
        a.join().unwrap();
        b.join().unwrap();
    });
    // Both newest points are there; the older ones are pruned now or at the next commit.
    let ids = site.point_ids();
    assert!(ids.contains(&a2.id) && ids.contains(&b2.id), "{ids:?}");
    let c = make_point(&src, "vmc", &memory(&[7]), 1);
    send(&src, &c.id, &site.addr(), &link_key(1)).unwrap();
    let mut expected = vec![a2.id.clone(), b2.id.clone(), c.id.clone()];
    expected.sort();
    site.wait_points(&expected);
    assert!(site
        .receiver
        .repository()
        .verify(|_| {})
        .unwrap()
        .is_clean());
}

#[test]
fn the_retrying_sender_gives_up_on_a_dead_receiver() {
    let src_dir = TestDir::new("dr-dead-src");
    let src = Repository::init(src_dir.path(), None).unwrap();
    let p1 = make_point(&src, "vm1", &memory(&[1]), 1);
    // A port nobody listens on.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut sender = DrSender::with_link_key(
        &addr,
        link_key(1),
        SenderConfig {
            timeout: Duration::from_secs(2),
            attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
        },
    );
    let err = sender
        .send(&src, &p1.id, &CheckpointInfo::default())
        .unwrap_err();
    assert!(matches!(err, DrError::Connect { .. }), "{err:?}");
    let stats = sender.stats();
    assert_eq!(
        (
            stats.failed_attempts,
            stats.checkpoints_failed,
            stats.checkpoints_sent
        ),
        (3, 1, 0)
    );
    assert!(stats.last_error.is_some());
    // A local repository failure is not retried.
    let err = sender
        .send(&src, "no-such-point", &CheckpointInfo::default())
        .unwrap_err();
    assert!(matches!(err, DrError::Repo(_)), "{err:?}");
    assert_eq!(sender.stats().failed_attempts, 3);
    assert_eq!(sender.stats().checkpoints_failed, 2);
}

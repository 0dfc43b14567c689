//! End-to-end tests of the control API: a server on a temporary socket, a fake VMM thread
//! answering its calls, and clients (the `ApiClient`, and raw bytes for misuse).

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::http::{self, MessageReader};
use super::*;

/// A fresh directory for one test's socket, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "arkvm-api-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("api.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The fake VMM's state: just enough to give each endpoint a real answer and a real 409.
struct FakeVmm {
    paused: bool,
    snapshot: Option<SnapshotStatus>,
    dr: Option<DrParams>,
}

impl FakeVmm {
    fn answer(&mut self, request: &ApiRequest) -> ApiResponse {
        match request {
            ApiRequest::GetRoot => ApiResponse::root(&RootInfo {
                name: "arkvm".into(),
                version: "0".into(),
                state: VmState::Running,
            }),
            ApiRequest::GetMetrics => ApiResponse::metrics("arkvm_up 1\n".into()),
            ApiRequest::GetVm => ApiResponse::vm(&VmInfo {
                state: if self.paused {
                    VmState::Paused
                } else {
                    VmState::Running
                },
                config: VmConfigInfo {
                    vcpus: 2,
                    memory_bytes: 256 << 20,
                    kernel: Some("/k".into()),
                    initrd: None,
                    cmdline: Some("console=ttyS0".into()),
                    disks: vec![],
                    restored_from: None,
                },
                disk_hydration: None,
                memory_loader: None,
                net: vec![],
            }),
            ApiRequest::PauseVm if self.paused => ApiResponse::conflict("the VM is already paused"),
            ApiRequest::PauseVm => {
                self.paused = true;
                ApiResponse::no_content()
            }
            ApiRequest::ResumeVm if !self.paused => ApiResponse::conflict("the VM is running"),
            ApiRequest::ResumeVm => {
                self.paused = false;
                ApiResponse::no_content()
            }
            ApiRequest::ShutdownVm => ApiResponse::no_content(),
            ApiRequest::CreateSnapshot(params) => {
                if self
                    .snapshot
                    .as_ref()
                    .is_some_and(|s| s.state == SnapshotState::Running)
                {
                    return ApiResponse::conflict("a snapshot is already running");
                }
                self.snapshot = Some(SnapshotStatus {
                    id: "snap-1".into(),
                    state: SnapshotState::Running,
                    mode: params.mode,
                    strategy: params.strategy,
                    bytes_written: 4096,
                    bytes_total: 256 << 20,
                    pause_us: Some(900),
                    total_ms: 3,
                    pages_copied_early: 1,
                    pages_recopied: 0,
                    precopy_rounds: None,
                    precopy_converged: None,
                    cow: None,
                    precopy: None,
                    error: None,
                });
                ApiResponse::snapshot_started(&SnapshotStarted {
                    id: "snap-1".into(),
                })
            }
            ApiRequest::GetSnapshot => match &self.snapshot {
                Some(s) => ApiResponse::snapshot(s),
                None => ApiResponse::not_found("no snapshot has been taken"),
            },
            ApiRequest::CancelSnapshot => match &mut self.snapshot {
                Some(s) if s.state == SnapshotState::Running => {
                    s.state = SnapshotState::Cancelled;
                    ApiResponse::no_content()
                }
                _ => ApiResponse::conflict("no snapshot is running"),
            },
            ApiRequest::StartDr(params) => {
                self.dr = Some(params.clone());
                ApiResponse::dr_started(&self.dr_status())
            }
            ApiRequest::StopDr => match self.dr.take() {
                Some(_) => ApiResponse::no_content(),
                None => ApiResponse::conflict("DR is not running"),
            },
            ApiRequest::GetDr => ApiResponse::dr(&self.dr_status()),
        }
    }

    fn dr_status(&self) -> DrStatus {
        DrStatus {
            state: if self.dr.is_some() {
                DrState::Running
            } else {
                DrState::Stopped
            },
            target: self.dr.as_ref().map(|d| d.target.clone()),
            interval_ms: self.dr.as_ref().map(|d| d.interval_ms),
            last_checkpoint: None,
            rpo_ms: None,
            checkpoints_committed: 0,
            checkpoints_failed: 0,
            intervals_skipped: 0,
            last_error: None,
            output_commit: false,
        }
    }
}

/// Runs a fake VMM on `server` until shutdown or 20 s without a call; returns the server.
fn spawn_vmm(server: ApiServer) -> JoinHandle<ApiServer> {
    thread::spawn(move || {
        let mut vmm = FakeVmm {
            paused: false,
            snapshot: None,
            dr: None,
        };
        while let Some(call) = server.recv_timeout(Duration::from_secs(20)) {
            let shutdown = call.request == ApiRequest::ShutdownVm;
            let response = vmm.answer(&call.request);
            call.respond(response);
            if shutdown {
                break;
            }
        }
        server
    })
}

/// Sends raw bytes on a new connection and reads one response: status, `Allow`, JSON body.
fn raw_exchange(sock: &Path, bytes: &[u8]) -> (u16, Option<String>, Value) {
    let stream = UnixStream::connect(sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Write on another thread: a server refusing early stops reading, and a large body must
    // not keep us from reading its answer.
    let mut writer = stream.try_clone().unwrap();
    let bytes = bytes.to_vec();
    let w = thread::spawn(move || {
        let _ = writer.write_all(&bytes);
    });
    let (status, allow, body) = read_one(&stream);
    drop(stream);
    w.join().unwrap();
    (status, allow, body)
}

fn read_one(stream: &UnixStream) -> (u16, Option<String>, Value) {
    let mut reader = MessageReader::new(stream);
    let head = reader.read_response_head().unwrap();
    let len = http::body_length(&head.headers, false).unwrap();
    let body = reader.read_body(len, 1 << 20).unwrap();
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap()
    };
    (
        head.status,
        head.headers.get("Allow").map(str::to_string),
        body,
    )
}

fn assert_serving(sock: &Path) {
    let reply = ApiClient::connect(sock).unwrap().get("/vm").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
}

#[test]
fn every_endpoint_round_trips_through_a_fake_vmm() {
    let dir = TempDir::new();
    let vmm = spawn_vmm(ApiServer::bind(dir.sock()).unwrap());
    let mut c = ApiClient::connect(dir.sock()).unwrap();

    let info: VmInfo = c.get("/vm").unwrap().parse().unwrap();
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.config.vcpus, 2);

    let r = c.put("/vm/resume", None).unwrap();
    assert_eq!(r.status, 409);
    assert_eq!(r.error_message(), Some("the VM is running"));
    assert_eq!(c.put("/vm/pause", None).unwrap().status, 204);
    let info: VmInfo = c.get("/vm").unwrap().parse().unwrap();
    assert_eq!(info.state, VmState::Paused);
    assert_eq!(c.put("/vm/pause", None).unwrap().status, 409);
    assert_eq!(c.put("/vm/resume", None).unwrap().status, 204);

    assert_eq!(c.get("/snapshot").unwrap().status, 404);
    let params = SnapshotParams {
        target: SnapshotTarget::Dir("/backups/s1".into()),
        mode: SnapshotMode::Live,
        strategy: SnapshotStrategy::Precopy,
        key: None,
        compression: Default::default(),
    };
    let body = serde_json::to_value(&params).unwrap();
    let r = c.put("/snapshot", Some(&body)).unwrap();
    assert_eq!(r.status, 202);
    let started: SnapshotStarted = r.parse().unwrap();
    assert_eq!(started.id, "snap-1");
    let again = c.put("/snapshot", Some(&body)).unwrap();
    assert_eq!(again.status, 409);
    assert!(matches!(
        again.into_result(),
        Err(ApiClientError::Status { status: 409, .. })
    ));
    let s: SnapshotStatus = c.get("/snapshot").unwrap().parse().unwrap();
    assert_eq!(
        (s.state, s.strategy),
        (SnapshotState::Running, SnapshotStrategy::Precopy)
    );
    assert_eq!(c.delete("/snapshot").unwrap().status, 204);
    let s: SnapshotStatus = c.get("/snapshot").unwrap().parse().unwrap();
    assert_eq!(s.state, SnapshotState::Cancelled);
    assert_eq!(c.delete("/snapshot").unwrap().status, 409);

    let dr = json!({"target": "drhost:7070", "interval_ms": 1000, "key": "/etc/dr.key"});
    let r = c.put("/dr", Some(&dr)).unwrap();
    assert_eq!(r.status, 202);
    let st: DrStatus = r.parse().unwrap();
    assert_eq!(st.state, DrState::Running);
    assert_eq!(st.target.as_deref(), Some("drhost:7070"));
    let st: DrStatus = c.get("/dr").unwrap().parse().unwrap();
    assert_eq!(st.interval_ms, Some(1000));
    assert_eq!(c.delete("/dr").unwrap().status, 204);
    assert_eq!(c.delete("/dr").unwrap().status, 409);

    let r = c.put("/vm/shutdown", None).unwrap();
    assert_eq!((r.status, r.body), (204, None));
    let server = vmm.join().unwrap();
    drop(server);
    assert!(!dir.sock().exists());
}

#[test]
fn socket_is_0600_and_removed_on_drop() {
    let dir = TempDir::new();
    let server = ApiServer::bind(dir.sock()).unwrap();
    let mode = std::fs::metadata(dir.sock()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    assert_eq!(server.path(), dir.sock());
    drop(server);
    assert!(std::fs::symlink_metadata(dir.sock()).is_err());
    assert!(matches!(
        ApiClient::connect(dir.sock()),
        Err(ApiClientError::NoSocket(_))
    ));
}

#[test]
fn a_path_too_long_for_a_socket_is_refused() {
    let dir = TempDir::new();
    let long = dir.0.join("s".repeat(120));
    let err = ApiServer::bind(&long).unwrap_err();
    assert!(matches!(err, ApiServerError::InvalidPath(_)), "{err:?}");
    assert!(!long.exists());
}

#[test]
fn a_stale_socket_of_a_dead_owner_is_replaced() {
    let dir = TempDir::new();
    drop(UnixListener::bind(dir.sock()).unwrap()); // std leaves the file behind: stale
    let stale_inode = std::fs::symlink_metadata(dir.sock()).unwrap().ino();
    assert!(matches!(
        ApiClient::connect(dir.sock()),
        Err(ApiClientError::NotServing(_))
    ));
    let vmm = spawn_vmm(ApiServer::bind(dir.sock()).unwrap());
    let meta = std::fs::symlink_metadata(dir.sock()).unwrap();
    assert_ne!(meta.ino(), stale_inode, "the stale socket is still there");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_serving(&dir.sock());
    ApiClient::connect(dir.sock())
        .unwrap()
        .put("/vm/shutdown", None)
        .unwrap();
    drop(vmm.join().unwrap());
    // Only the socket is left behind by nobody: no temporary names.
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
}

#[test]
fn the_socket_accepts_connections_the_moment_it_appears() {
    let dir = TempDir::new();
    for round in 0..300 {
        let sock = dir.0.join(format!("api-{round}.sock"));
        // A client that connects as soon as the path exists, spinning without a pause (the old
        // bind-chmod-listen order failed this within 300 rounds every time here).
        let watcher = {
            let sock = sock.clone();
            thread::spawn(move || {
                let give_up = Instant::now() + Duration::from_secs(60);
                loop {
                    match UnixStream::connect(&sock) {
                        Ok(_) => return Ok(()),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            if Instant::now() > give_up {
                                return Err(e);
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
            })
        };
        let server = ApiServer::bind(&sock).unwrap();
        let result = watcher.join().unwrap();
        drop(server);
        if let Err(e) = result {
            panic!("round {round}: connecting the moment the socket appeared failed: {e}");
        }
    }
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
}

#[test]
fn a_served_socket_and_a_plain_file_are_refused() {
    let dir = TempDir::new();
    let first = spawn_vmm(ApiServer::bind(dir.sock()).unwrap());
    let err = ApiServer::bind(dir.sock()).unwrap_err();
    assert!(matches!(err, ApiServerError::AlreadyServing(_)), "{err:?}");
    assert!(err.to_string().starts_with("another arkvm is serving"));
    assert_serving(&dir.sock()); // the first server is unharmed
    ApiClient::connect(dir.sock())
        .unwrap()
        .put("/vm/shutdown", None)
        .unwrap();
    drop(first.join().unwrap());

    let file = dir.0.join("plain");
    std::fs::write(&file, b"keep me").unwrap();
    let err = ApiServer::bind(&file).unwrap_err();
    assert!(matches!(err, ApiServerError::NotASocket(_)), "{err:?}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn misuse_gets_4xx_json_and_the_server_keeps_serving() {
    let dir = TempDir::new();
    let sock = dir.sock();
    let vmm = spawn_vmm(ApiServer::bind(&sock).unwrap());

    let put = |path: &str, body: &[u8]| {
        let mut req = format!(
            "PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        req
    };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed JSON", put("/snapshot", b"{\"out\": "), 400),
        (
            "unknown field",
            put("/snapshot", br#"{"out": "/x", "fast": true}"#),
            400,
        ),
        ("8 MiB body", put("/snapshot", &vec![b' '; 8 << 20]), 413),
        ("unknown path", b"GET /vms HTTP/1.1\r\n\r\n".to_vec(), 404),
        (
            "wrong method",
            b"POST /vm/pause HTTP/1.1\r\n\r\n".to_vec(),
            405,
        ),
        ("garbage head", b"\x16\x03\x01 hello\r\n\r\n".to_vec(), 400),
        (
            "bad expectation",
            b"PUT /vm/pause HTTP/1.1\r\nExpect: 200-ok\r\n\r\n".to_vec(),
            417,
        ),
    ];
    for (what, bytes, want) in cases {
        let (status, allow, body) = raw_exchange(&sock, &bytes);
        assert_eq!(status, want, "{what}: {body}");
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(!msg.is_empty(), "{what}: no error sentence in {body}");
        if want == 405 {
            assert_eq!(allow.as_deref(), Some("PUT"), "{what}");
        }
        assert_serving(&sock);
    }

    ApiClient::connect(&sock)
        .unwrap()
        .put("/vm/shutdown", None)
        .unwrap();
    drop(vmm.join().unwrap());
}

#[test]
fn oversized_bodies_are_refused_without_being_read() {
    let dir = TempDir::new();
    let sock = dir.sock();
    let vmm = spawn_vmm(ApiServer::bind(&sock).unwrap());

    // A declared 1 TiB body that never comes: the answer must not wait for it.
    let stream = UnixStream::connect(&sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    (&stream)
        .write_all(b"PUT /snapshot HTTP/1.1\r\nContent-Length: 1099511627776\r\n\r\n{")
        .unwrap();
    let start = Instant::now();
    let (status, _, body) = read_one(&stream);
    assert_eq!(status, 413, "{body}");
    assert!(start.elapsed() < Duration::from_secs(2));

    // With Expect: 100-continue, an oversized body is refused before the 100.
    let stream = UnixStream::connect(&sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    (&stream)
        .write_all(
            b"PUT /snapshot HTTP/1.1\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n",
        )
        .unwrap();
    assert_eq!(read_one(&stream).0, 413);

    // A chunked body is cut off as soon as it passes the cap.
    let mut chunked = b"PUT /snapshot HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n", 8192).as_bytes());
        chunked.extend_from_slice(&[b' '; 8192]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(raw_exchange(&sock, &chunked).0, 413);

    // A small chunked body with Expect: 100-continue is accepted after the interim 100.
    let body = br#"{"out": "/s"}"#;
    let req = format!(
        "PUT /snapshot HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        body.len(),
        std::str::from_utf8(body).unwrap()
    );
    let stream = UnixStream::connect(&sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    (&stream).write_all(req.as_bytes()).unwrap();
    let mut reader = MessageReader::new(&stream);
    assert_eq!(reader.read_response_head().unwrap().status, 100);
    assert_eq!(reader.read_response_head().unwrap().status, 202);

    ApiClient::connect(&sock)
        .unwrap()
        .put("/vm/shutdown", None)
        .unwrap();
    drop(vmm.join().unwrap());
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let dir = TempDir::new();
    let vmm = spawn_vmm(ApiServer::bind(dir.sock()).unwrap());
    let stream = UnixStream::connect(dir.sock()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    (&stream)
        .write_all(b"GET /nope HTTP/1.1\r\n\r\nGET /vm HTTP/1.1\r\n\r\nPUT /vm/shutdown HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    let mut reader = MessageReader::new(&stream);
    let mut statuses = vec![];
    for _ in 0..3 {
        let head = reader.read_response_head().unwrap();
        let len = http::body_length(&head.headers, false).unwrap();
        let len = if head.status == 204 {
            http::BodyLength::Exact(0)
        } else {
            len
        };
        reader.read_body(len, 1 << 20).unwrap();
        statuses.push(head.status);
    }
    assert_eq!(statuses, [404, 200, 204]);
    drop(vmm.join().unwrap());
}

#[test]
fn event_fd_signals_each_call_to_an_event_loop() {
    let dir = TempDir::new();
    let server = ApiServer::bind(dir.sock()).unwrap();
    let epoll = Epoll::new().unwrap();
    epoll
        .ctl(
            ControlOperation::Add,
            server.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 7),
        )
        .unwrap();
    let mut events = [EpollEvent::default(); 1];
    assert_eq!(epoll.wait(0, &mut events).unwrap(), 0);
    assert!(server.try_recv().is_none());

    let sock = dir.sock();
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let sock = sock.clone();
            thread::spawn(move || ApiClient::connect(&sock).unwrap().get("/dr").unwrap())
        })
        .collect();
    let mut answered = 0;
    while answered < 2 {
        assert_eq!(epoll.wait(10_000, &mut events).unwrap(), 1, "no wake-up");
        assert_eq!(events[0].data(), 7);
        if let Some(call) = server.try_recv() {
            assert_eq!(call.request, ApiRequest::GetDr);
            call.respond(ApiResponse::internal("DR is broken in this test"));
            answered += 1;
        }
    }
    assert_eq!(epoll.wait(0, &mut events).unwrap(), 0, "count left behind");
    for c in clients {
        let reply = c.join().unwrap();
        assert_eq!(reply.status, 500);
        assert_eq!(reply.error_message(), Some("DR is broken in this test"));
    }
}

#[test]
fn unanswered_and_queued_calls_get_errors() {
    let dir = TempDir::new();
    let server = ApiServer::bind(dir.sock()).unwrap();
    let sock = dir.sock();
    let client = thread::spawn(move || ApiClient::connect(&sock).unwrap().get("/vm").unwrap());
    let call = server.recv_timeout(Duration::from_secs(10)).unwrap();
    drop(call.responder); // the VMM forgets to answer
    let reply = client.join().unwrap();
    assert_eq!(reply.status, 500, "{reply:?}");
    // recv_timeout may take a call before its count lands; clear that count so that the wait
    // below sees only the next call.
    while server.event_fd().read().is_ok() {}

    let sock = dir.sock();
    let client = thread::spawn(move || {
        ApiClient::connect(&sock)
            .unwrap()
            .put("/vm/pause", None)
            .unwrap()
    });
    let epoll = Epoll::new().unwrap();
    epoll
        .ctl(
            ControlOperation::Add,
            server.event_fd().as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .unwrap();
    let mut events = [EpollEvent::default(); 1];
    assert_eq!(
        epoll.wait(10_000, &mut events).unwrap(),
        1,
        "the call never came"
    );
    drop(server); // shutting down with the call still queued
    let reply = client.join().unwrap();
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(reply.error_message(), Some("arkvm is shutting down"));
}

#[test]
fn connections_beyond_the_limit_get_503() {
    let dir = TempDir::new();
    let vmm = spawn_vmm(ApiServer::bind(dir.sock()).unwrap());
    let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(dir.sock()).unwrap())
        .collect();
    let (status, _, body) = raw_exchange(&dir.sock(), b"GET /vm HTTP/1.1\r\n\r\n");
    assert_eq!(status, 503, "{body}");
    drop(idle);
    // The idle connections' threads notice the close and free their slots.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, _) = raw_exchange(&dir.sock(), b"GET /vm HTTP/1.1\r\n\r\n");
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "slots never freed");
        thread::sleep(Duration::from_millis(20));
    }
    ApiClient::connect(dir.sock())
        .unwrap()
        .put("/vm/shutdown", None)
        .unwrap();
    drop(vmm.join().unwrap());
}

#[test]
fn client_reports_a_server_that_answers_garbage() {
    let dir = TempDir::new();
    let listener = UnixListener::bind(dir.sock()).unwrap();
    let fake = thread::spawn(move || {
        drop(listener.accept().unwrap()); // ApiClient::connect's probe
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{x}")
            .unwrap();
    });
    let err = ApiClient::connect(dir.sock())
        .unwrap()
        .get("/vm")
        .unwrap_err();
    assert!(matches!(err, ApiClientError::BadJson(_)), "{err:?}");
    fake.join().unwrap();
}

/// `docs/api.yaml` must describe what the code serves.
#[test]
fn openapi_document_matches_the_endpoints_and_fields() {
    let doc = include_str!("../../../docs/api.yaml");
    let paths = &doc[doc.find("\npaths:\n").unwrap()..doc.find("\ncomponents:\n").unwrap()];
    for (path, methods) in super::request::ENDPOINTS {
        let start = paths
            .find(&format!("\n  {path}:\n"))
            .unwrap_or_else(|| panic!("{path} is not in docs/api.yaml"));
        let rest = &paths[start + 1..];
        let section = &rest[..rest[1..].find("\n  /").map_or(rest.len(), |i| i + 1)];
        for method in ["get", "put", "delete", "post", "patch"] {
            let served = methods.split(", ").any(|m| m.eq_ignore_ascii_case(method));
            let documented = section.contains(&format!("\n    {method}:\n"));
            assert_eq!(served, documented, "{method} {path}");
        }
    }

    let mut vmm = FakeVmm {
        paused: false,
        snapshot: None,
        dr: None,
    };
    let mut bodies = vec![];
    for request in [
        ApiRequest::GetVm,
        ApiRequest::CreateSnapshot(SnapshotParams {
            target: SnapshotTarget::Repo("/r".into()),
            mode: SnapshotMode::Live,
            strategy: SnapshotStrategy::Precopy,
            key: Some("/k".into()),
            compression: Default::default(),
        }),
        ApiRequest::GetSnapshot,
        ApiRequest::GetDr,
        ApiRequest::CancelSnapshot,
        ApiRequest::CancelSnapshot,
    ] {
        bodies.extend(vmm.answer(&request).body().cloned()); // 204s have none
    }
    let mut dr = serde_json::to_value(vmm.dr_status()).unwrap();
    dr["last_checkpoint"] = serde_json::to_value(DrCheckpoint {
        id: "c".into(),
        taken_at_unix_ms: 0,
        committed_at_unix_ms: 0,
        bytes_sent: 0,
        pause_us: 0,
    })
    .unwrap();
    bodies.push(dr);
    bodies.push(json!({"target": "h:1", "interval_ms": 10, "key": "/k"}));
    bodies.push(json!({"out": "/o", "repo": "/r", "mode": "live", "strategy": "cow", "key": "/k"}));
    fn keys(v: &Value, out: &mut Vec<String>) {
        if let Value::Object(map) = v {
            for (k, v) in map {
                out.push(k.clone());
                keys(v, out);
            }
        }
    }
    let mut names = vec![];
    for body in &bodies {
        keys(body, &mut names);
    }
    assert!(names.len() > 30, "too few fields checked: {names:?}");
    for name in names {
        assert!(
            doc.contains(&format!(" {name}:")) || doc.contains(&format!(" {name}: ")),
            "field {name} is not in docs/api.yaml"
        );
    }
}

//! The control socket server: a Unix socket serving HTTP/1.1 with JSON bodies on its own threads,
//! handing each parsed request to the VMM as an [`ApiCall`] and writing back its answer.
//!
//! Threads: one accept thread waits (epoll) on the listening socket and on a stop eventfd, and
//! starts one thread per connection (at most [`MAX_CONNECTIONS`]). A connection thread reads a
//! request, routes it to an [`ApiRequest`], sends an [`ApiCall`] over an mpsc channel, signals
//! [`ApiServer::event_fd`], and blocks until the VMM answers through [`ApiResponder::respond`]
//! (or [`VMM_REPLY_TIMEOUT`] passes). The VMM never touches the socket: a slow or stuck client
//! costs a connection thread, not the event loop.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK, EFD_SEMAPHORE};

use super::deadline::{DeadlineReader, REQUEST_DEADLINE};
use super::http::{self, BodyLength, HttpError, MessageReader, RequestHead};
use super::request::{route, ApiRequest};
use super::response::ApiResponse;
use super::socket::{bind_listener, remove_socket_if_ours, ApiServerError};

/// Largest request body accepted; a larger declared body is refused with 413 unread.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a connection may sit idle or stall mid-message before it is closed.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection thread waits for the VMM to answer before replying 504.
pub const VMM_REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// After the last response, input is discarded for at most this long (and
/// [`LINGER_MAX_BYTES`]) so that a client still sending an oversized body reads the error
/// instead of a reset.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_MAX_BYTES: usize = 16 << 20;
/// How long dropping the server waits for answers still being written.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// One request for the VMM, with the way back to the client that sent it.
#[derive(Debug)]
pub struct ApiCall {
    pub request: ApiRequest,
    pub responder: ApiResponder,
}

impl ApiCall {
    /// Answers the call (shorthand for `self.responder.respond(response)`).
    pub fn respond(self, response: ApiResponse) {
        self.responder.respond(response);
    }
}

/// Sends the answer to one [`ApiCall`]. Dropping it unanswered makes the client get a 500.
#[derive(Debug)]
pub struct ApiResponder {
    reply: Sender<ApiResponse>,
}

impl ApiResponder {
    /// Sends the answer; if the client has gone away meanwhile, it is dropped quietly.
    pub fn respond(self, response: ApiResponse) {
        if self.reply.send(response).is_err() {
            debug!("an API client went away before its answer was ready");
        }
    }
}

/// State shared by the server's threads.
struct Shared {
    calls: Sender<ApiCall>,
    /// Semaphore eventfd: one count per call queued, so it stays readable while calls wait.
    call_event: EventFd,
    connections: AtomicUsize,
    in_flight: Mutex<usize>,
    idle: Condvar,
}

impl Shared {
    fn begin_request(self: &Arc<Self>) -> InFlightGuard {
        *self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += 1;
        InFlightGuard(Arc::clone(self))
    }
}

/// Counts a request from its head until its response is written.
struct InFlightGuard(Arc<Shared>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut n = self
            .0
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *n = n.saturating_sub(1);
        self.0.idle.notify_all();
    }
}

/// Counts an open connection.
struct ConnectionGuard(Arc<Shared>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The control socket. Bound by [`ApiServer::bind`]; serves until dropped, and removes its
/// socket file when dropped.
///
/// The VMM's side: wait for [`ApiServer::event_fd`] to be readable (it is a level-triggered
/// semaphore eventfd, one count per queued call; register it with the event loop), then call
/// [`ApiServer::try_recv`] and answer each [`ApiCall`]. Without an event loop,
/// [`ApiServer::recv_timeout`] blocks for the next call instead.
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket file this server created, so that drop removes only it.
    socket_id: (u64, u64),
    calls: Receiver<ApiCall>,
    shared: Arc<Shared>,
    stop: EventFd,
    accept_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Creates the socket at `path` with mode 0600 and starts serving.
    ///
    /// The socket is bound under a temporary name in the same directory, made 0600, put in the
    /// listening state, and only then renamed to `path` (see `socket.rs`): a client that
    /// connects the moment the path exists is accepted, and a connect before the chmod is
    /// refused by the kernel, so there is no moment at which anyone but the owner can connect.
    ///
    /// What is at `path` already: a socket another process answers on is refused
    /// ([`ApiServerError::AlreadyServing`]); a stale socket whose owner is dead (connecting is
    /// refused) is replaced in one atomic rename; anything that is not a socket is refused
    /// ([`ApiServerError::NotASocket`]) and never removed.
    pub fn bind(path: impl AsRef<Path>) -> Result<ApiServer, ApiServerError> {
        let path = path.as_ref();
        let (listener, socket_id) = bind_listener(path)?;
        let abs_path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        match start_serving(listener) {
            Ok(serving) => {
                info!("serving the control API on {}", abs_path.display());
                Ok(ApiServer {
                    path: abs_path,
                    socket_id,
                    calls: serving.calls,
                    shared: serving.shared,
                    stop: serving.stop,
                    accept_thread: Some(serving.accept_thread),
                })
            }
            Err(e) => {
                remove_socket_if_ours(&abs_path, socket_id);
                Err(ApiServerError::Setup(e))
            }
        }
    }

    /// The socket's path (absolute).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Readable while calls wait: one count per call. [`ApiServer::try_recv`] takes one count
    /// with each call it returns.
    pub fn event_fd(&self) -> &EventFd {
        &self.shared.call_event
    }

    /// The next waiting call, if any. Call it when [`ApiServer::event_fd`] is readable; `None`
    /// is possible (a spurious wake-up) and harmless.
    pub fn try_recv(&self) -> Option<ApiCall> {
        // Take one count first: the sender queues the call before it adds the count, so a
        // count taken here always has its call already in the channel.
        let _ = self.shared.call_event.read();
        self.calls.try_recv().ok()
    }

    /// Waits up to `timeout` for the next call (for a VMM without an event loop, and tests).
    pub fn recv_timeout(&self, timeout: Duration) -> Option<ApiCall> {
        let call = self.calls.recv_timeout(timeout).ok()?;
        let _ = self.shared.call_event.read();
        Some(call)
    }

    /// Answers every queued call with 503, until the in-flight requests are written or `until`.
    fn drain(&self, until: Instant) {
        loop {
            while let Ok(call) = self.calls.try_recv() {
                call.respond(ApiResponse::unavailable("arkvm is shutting down"));
            }
            let n = self
                .shared
                .in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let left = until.saturating_duration_since(Instant::now());
            if *n == 0 || left.is_zero() {
                return;
            }
            let step = left.min(Duration::from_millis(10));
            let _ = self
                .shared
                .idle
                .wait_timeout(n, step)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl AsRawFd for ApiServer {
    /// The fd of [`ApiServer::event_fd`].
    fn as_raw_fd(&self) -> RawFd {
        self.shared.call_event.as_raw_fd()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            warn!("cannot stop the API accept thread: {e}");
        } else if let Some(t) = self.accept_thread.take() {
            if t.join().is_err() {
                warn!("the API accept thread panicked");
            }
        }
        remove_socket_if_ours(&self.path, self.socket_id);
        // Answers still waiting in the queue get 503; answers already given get written.
        self.drain(Instant::now() + DRAIN_TIMEOUT);
        info!("closed the control API socket {}", self.path.display());
    }
}

/// The running parts of a server, as `start_serving` returns them.
struct Serving {
    calls: Receiver<ApiCall>,
    shared: Arc<Shared>,
    stop: EventFd,
    accept_thread: JoinHandle<()>,
}

/// Starts the accept thread on `listener`.
fn start_serving(listener: UnixListener) -> io::Result<Serving> {
    let call_event = EventFd::new(EFD_NONBLOCK | EFD_SEMAPHORE)?;
    let stop = EventFd::new(EFD_NONBLOCK)?;
    let thread_stop = stop.try_clone()?;
    let (calls_tx, calls) = mpsc::channel();
    let shared = Arc::new(Shared {
        calls: calls_tx,
        call_event,
        connections: AtomicUsize::new(0),
        in_flight: Mutex::new(0),
        idle: Condvar::new(),
    });
    let poll = AcceptPoll::new(&listener, &thread_stop)?;
    let thread_shared = Arc::clone(&shared);
    let accept_thread = thread::Builder::new()
        .name("arkvm-api".to_string())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::Api);
            accept_loop(listener, poll, thread_stop, thread_shared)
        })?;
    Ok(Serving {
        calls,
        shared,
        stop,
        accept_thread,
    })
}

/// The accept thread's epoll set: the listener and the stop eventfd.
struct AcceptPoll(Epoll);

const TOKEN_LISTENER: u64 = 0;
const TOKEN_STOP: u64 = 1;

impl AcceptPoll {
    fn new(listener: &UnixListener, stop: &EventFd) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (listener.as_raw_fd(), TOKEN_LISTENER),
            (stop.as_raw_fd(), TOKEN_STOP),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(AcceptPoll(epoll))
    }
}

fn accept_loop(listener: UnixListener, poll: AcceptPoll, _stop: EventFd, shared: Arc<Shared>) {
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match poll.0.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("the API server stopped: waiting for connections failed: {e}");
                return;
            }
        };
        if events[..n].iter().any(|e| e.data() == TOKEN_STOP) {
            return;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => start_connection(stream, &shared),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of fds or memory: back off instead of spinning on a readable listener.
                    warn!("accepting an API connection failed: {e}");
                    thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
    }
}

fn start_connection(stream: UnixStream, shared: &Arc<Shared>) {
    let open = shared.connections.fetch_add(1, Ordering::SeqCst);
    let guard = ConnectionGuard(Arc::clone(shared));
    if open >= MAX_CONNECTIONS {
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        send_error(
            &stream,
            503,
            &format!("too many API connections (at most {MAX_CONNECTIONS})"),
            None,
            false,
        );
        return;
    }
    let spawned = thread::Builder::new()
        .name("arkvm-api-conn".to_string())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::Api);
            let guard = guard;
            serve_connection(&stream, &guard.0);
            close_gracefully(&stream);
        });
    if let Err(e) = spawned {
        warn!("cannot start a thread for an API connection: {e}");
    }
}

/// Serves requests on one connection until it closes, errs, or a response closes it.
fn serve_connection(stream: &UnixStream, shared: &Arc<Shared>) {
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(IO_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(IO_TIMEOUT)).is_err()
    {
        return;
    }
    let mut reader = MessageReader::new(DeadlineReader::new(stream, IO_TIMEOUT));
    loop {
        // The whole request (or, on an idle connection, its first byte) must arrive within
        // REQUEST_DEADLINE, however slowly it trickles.
        reader.get_mut().start(REQUEST_DEADLINE);
        let head = match reader.read_request_head() {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(e) => {
                if reader.get_ref().expired() && reader.buffered() > 0 {
                    let message = format!(
                        "the request did not arrive within {} s",
                        REQUEST_DEADLINE.as_secs()
                    );
                    send_error(stream, 408, &message, None, false);
                } else if let Some(status) = error_status(&e) {
                    send_error(stream, status, &e.to_string(), None, false);
                }
                return;
            }
        };
        let _busy = shared.begin_request();
        if !serve_request(&head, &mut reader, stream, shared) {
            return;
        }
    }
}

/// Serves one request whose head has been read. Returns whether the connection stays open.
fn serve_request(
    head: &RequestHead,
    reader: &mut MessageReader<DeadlineReader<'_>>,
    stream: &UnixStream,
    shared: &Shared,
) -> bool {
    let length = match http::body_length(&head.headers, true) {
        Ok(length) => length,
        Err(e) => return refuse(stream, &e),
    };
    let expects_continue = match head.headers.get("Expect") {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("100-continue") => true,
        Some(v) => {
            send_error(
                stream,
                417,
                &format!("Expect: {v} is not supported"),
                None,
                false,
            );
            return false;
        }
    };
    if let BodyLength::Exact(n) = length {
        if n > MAX_BODY_BYTES as u64 {
            return refuse(
                stream,
                &HttpError::BodyTooLarge {
                    limit: MAX_BODY_BYTES,
                },
            );
        }
    }
    if expects_continue && length != BodyLength::Exact(0) && http::write_continue(stream).is_err() {
        return false;
    }
    let body = match reader.read_body(length, MAX_BODY_BYTES) {
        Ok(body) => body,
        Err(e) => return refuse(stream, &e),
    };
    let keep_alive = head.keep_alive();
    let response = match route(&head.method, &head.target, &body) {
        Ok(request) => {
            debug!("API {} {}", head.method, head.target);
            forward(shared, request)
        }
        Err(e) => {
            send_error(stream, e.status, &e.message, e.allow, keep_alive);
            return keep_alive;
        }
    };
    if let Some(text) = response.text() {
        return http::write_typed_response(
            stream,
            response.status(),
            &[],
            Some(text.as_bytes()),
            METRICS_CONTENT_TYPE,
            keep_alive,
        )
        .is_ok()
            && keep_alive;
    }
    let body = response.body().map(|b| b.to_string().into_bytes());
    http::write_response(stream, response.status(), &[], body.as_deref(), keep_alive).is_ok()
        && keep_alive
}

/// The content type of a text answer: the Prometheus text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Answers a framing error (if it deserves an answer) and closes the connection.
fn refuse(stream: &UnixStream, e: &HttpError) -> bool {
    if let Some(status) = error_status(e) {
        send_error(stream, status, &e.to_string(), None, false);
    }
    false
}

/// The status for a request that could not be read, or `None` if the connection is gone.
fn error_status(e: &HttpError) -> Option<u16> {
    match e {
        HttpError::Io(_) | HttpError::UnexpectedEof => None,
        HttpError::MalformedHead(_)
        | HttpError::BadContentLength
        | HttpError::AmbiguousLength
        | HttpError::BadChunk => Some(400),
        HttpError::HeadTooLarge => Some(431),
        HttpError::BodyTooLarge { .. } => Some(413),
        HttpError::UnsupportedTransferEncoding(_) => Some(501),
    }
}

fn send_error(
    stream: &UnixStream,
    status: u16,
    message: &str,
    allow: Option<&str>,
    keep_alive: bool,
) {
    let response = ApiResponse::error(status, message);
    let body = response.body().map(|b| b.to_string().into_bytes());
    let allow_header: Vec<(&str, &str)> = allow.map(|a| ("Allow", a)).into_iter().collect();
    let _ = http::write_response(
        stream,
        response.status(),
        &allow_header,
        body.as_deref(),
        keep_alive,
    );
}

/// Hands `request` to the VMM and waits for its answer.
fn forward(shared: &Shared, request: ApiRequest) -> ApiResponse {
    let (reply, answer) = mpsc::channel();
    let call = ApiCall {
        request,
        responder: ApiResponder { reply },
    };
    if shared.calls.send(call).is_err() {
        return ApiResponse::unavailable("arkvm is shutting down");
    }
    if let Err(e) = shared.call_event.write(1) {
        // The call is queued; the VMM finds it at its next wake-up.
        warn!("cannot signal an API call to the VMM: {e}");
    }
    match answer.recv_timeout(VMM_REPLY_TIMEOUT) {
        Ok(response) => response,
        Err(RecvTimeoutError::Timeout) => ApiResponse::error(
            504,
            format!(
                "the VMM did not answer within {} s",
                VMM_REPLY_TIMEOUT.as_secs()
            ),
        ),
        Err(RecvTimeoutError::Disconnected) => {
            ApiResponse::internal("the VMM dropped the request without answering")
        }
    }
}

/// Closes our side for writing, then discards what the client still sends for a short, bounded
/// while, so that a client in the middle of an oversized upload reads our error, not a reset.
fn close_gracefully(stream: &UnixStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut discarded = 0usize;
    let mut buf = [0u8; 16 * 1024];
    while discarded < LINGER_MAX_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match (&*stream).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => discarded += n,
        }
    }
}

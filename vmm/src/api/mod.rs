//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (`--api-socket PATH`), so that
//! `curl --unix-socket PATH http://localhost/vm` works. `docs/api.yaml` is its OpenAPI
//! description and must change together with this module.
//!
//! ```text
//!  client (CLI, curl)            server threads                      VMM event loop
//!  ──────────────────   HTTP   ──────────────────  ApiCall (mpsc)   ─────────────────
//!  ApiClient ─────────────────▶ connection thread ─────────────────▶ ApiServer::try_recv
//!                               (parse, limits,    + event_fd count   (event_fd readable)
//!                                route, 4xx)                                │
//!            ◀──────────────── write response ◀──── ApiResponse ◀──── ApiCall::respond
//! ```
//!
//! - [`ApiServer::bind`] creates the socket with mode 0600 under a temporary name (bind, chmod,
//!   listen: nobody can connect before the chmod), then renames it into place, so that it
//!   accepts connections the moment its path exists. It refuses a path where another arkvm
//!   answers or that is not a socket (and never deletes those), replaces a stale socket whose
//!   owner is dead, and removes its own socket on drop.
//! - The server answers malformed requests itself, and the VMM never sees them: a malformed
//!   head, bad framing or malformed JSON gets 400; an unknown field 400; a body declared larger
//!   than [`MAX_BODY_BYTES`] gets 413 before any of it is read; an unknown path 404; a wrong
//!   method 405 with `Allow`. Every error body is `{"error": "<one sentence>"}`.
//! - Valid requests reach the VMM as a typed [`ApiRequest`] inside an [`ApiCall`]. The VMM
//!   decides the status: 2xx bodies through the typed constructors of [`ApiResponse`], and
//!   409 for requests that conflict with its state (resume while running, a second snapshot).
//! - Paths in request bodies must be absolute: the VMM resolves them, not the client, and the
//!   two may have different working directories. The CLI makes them absolute before sending.

mod client;
mod deadline;
mod http;
mod request;
mod response;
mod server;
mod socket;

pub use client::{ApiClient, ApiClientError, ApiReply, DEFAULT_CLIENT_TIMEOUT};
pub use deadline::REQUEST_DEADLINE;
pub use request::{
    ApiRequest, DrParams, SnapshotMode, SnapshotParams, SnapshotStrategy, SnapshotTarget,
    MIN_DR_INTERVAL_MS,
};
pub use response::{
    ApiResponse, DiskHydrationInfo, DiskInfo, DrCheckpoint, DrState, DrStatus, ErrorBody,
    RootInfo, SnapshotStarted, SnapshotState, SnapshotStatus, VmConfigInfo, VmInfo, VmState,
};
pub use server::{
    ApiCall, ApiResponder, ApiServer, MAX_BODY_BYTES, MAX_CONNECTIONS, VMM_REPLY_TIMEOUT,
};
pub use socket::ApiServerError;

#[cfg(test)]
mod deadline_tests;
#[cfg(test)]
mod tests;

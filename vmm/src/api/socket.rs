//! Creating the control socket so that it is ready the moment its path exists.
//!
//! ```text
//! DIR/.arkvm-api-<pid>-<n>   bind here, chmod 0600, listen     (nobody knows the name yet,
//!            │                                                   and nothing listens before
//!            │ rename                                            the chmod)
//!            ▼
//! DIR/<name>                 appears already listening: a client that connects as soon as
//!                            the path exists is accepted, never refused
//! ```
//!
//! What is at the path already decides the rename: nothing (a rename that never replaces), a
//! stale socket whose owner is dead (connecting is refused: it is replaced in one atomic
//! rename), a socket another process answers on (refused, left alone), or a file that is not a
//! socket (refused, never deleted).

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use socket2::{Domain, SockAddr, Socket, Type};
use tracing::{info, warn};

/// Connections the kernel queues before the accept thread takes them.
const LISTEN_BACKLOG: i32 = 32;

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("another arkvm is serving {}", .0.display())]
    AlreadyServing(PathBuf),
    #[error("{} exists and is not a socket; choose another API socket path", .0.display())]
    NotASocket(PathBuf),
    #[error("{} cannot name a Unix socket (it must name a file, in at most 107 bytes, with room in its directory for a temporary name of about 20 bytes)", .0.display())]
    InvalidPath(PathBuf),
    #[error("cannot create the API socket {}", .path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the API server")]
    Setup(#[source] io::Error),
}

/// Tries at moving the socket into place when the path keeps changing under us.
const PLACE_ATTEMPTS: usize = 4;

/// What is at the socket's path before the rename.
#[derive(Debug, PartialEq, Eq)]
enum Occupant {
    /// Nothing.
    Absent,
    /// A socket nothing listens on (connecting is refused): its owner is gone.
    Stale,
}

/// Creates a listening socket with mode 0600 at `path`, through a temporary name in the same
/// directory, and returns it with the device and inode of its file.
pub(super) fn bind_listener(path: &Path) -> Result<(UnixListener, (u64, u64)), ApiServerError> {
    let invalid = || ApiServerError::InvalidPath(path.to_path_buf());
    path.file_name().ok_or_else(invalid)?;
    SockAddr::unix(path).map_err(|_| invalid())?;
    // Refuse early, before creating anything, what the rename would refuse anyway.
    inspect(path)?;
    let tmp = temporary_path(path);
    let tmp_addr = SockAddr::unix(&tmp).map_err(|_| invalid())?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(ApiServerError::Setup)?;
    socket
        .bind(&tmp_addr)
        .map_err(|source| ApiServerError::Bind {
            path: tmp.clone(),
            source,
        })?;
    let bound = || -> io::Result<(u64, u64)> {
        let meta = std::fs::symlink_metadata(&tmp)?;
        // Before listen: until then every connect is refused, so nobody but the owner can
        // ever connect.
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        socket.listen(LISTEN_BACKLOG)?;
        socket.set_nonblocking(true)?;
        Ok((meta.dev(), meta.ino()))
    };
    let placed = bound()
        .map_err(|source| ApiServerError::Bind {
            path: path.to_path_buf(),
            source,
        })
        .and_then(|socket_id| place(&tmp, path).map(|()| socket_id));
    match placed {
        Ok(socket_id) => Ok((UnixListener::from(OwnedFd::from(socket)), socket_id)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// `DIR/.arkvm-api-<pid>-<n>`: short, so that it fits wherever the final path fits but for
/// the longest paths.
fn temporary_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    path.with_file_name(format!(
        ".arkvm-api-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Moves the listening socket at `tmp` to `path`, replacing only a stale socket.
fn place(tmp: &Path, path: &Path) -> Result<(), ApiServerError> {
    let bind_error = |source| ApiServerError::Bind {
        path: path.to_path_buf(),
        source,
    };
    for _ in 0..PLACE_ATTEMPTS {
        match inspect(path)? {
            Occupant::Absent => match snapshot::fs_util::rename_noreplace(tmp, path) {
                Ok(()) => return Ok(()),
                // Something appeared meanwhile: look again.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(bind_error(e)),
            },
            Occupant::Stale => {
                // One atomic rename: the path never disappears in between. (Two arkvm
                // replacing the same stale socket at the same instant both succeed, and the
                // later one wins the path; each removes only its own socket on exit.)
                std::fs::rename(tmp, path).map_err(bind_error)?;
                info!(
                    "replaced the stale API socket {} (nothing answered on it)",
                    path.display()
                );
                return Ok(());
            }
        }
    }
    Err(bind_error(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "the path kept changing while the socket was put in place",
    )))
}

/// Looks at what is at `path`: nothing, a stale socket, or something that must be left alone
/// (an error).
fn inspect(path: &Path) -> Result<Occupant, ApiServerError> {
    let path_buf = path.to_path_buf();
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Occupant::Absent),
        Err(source) => Err(ApiServerError::Bind {
            path: path_buf,
            source,
        }),
        Ok(m) if !m.file_type().is_socket() => Err(ApiServerError::NotASocket(path_buf)),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(ApiServerError::AlreadyServing(path_buf)),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(Occupant::Stale),
            Err(source) => Err(ApiServerError::Bind {
                path: path_buf,
                source,
            }),
        },
    }
}

/// Removes the socket file at `path` if it is still the one with `socket_id` (device, inode).
pub(super) fn remove_socket_if_ours(path: &Path, socket_id: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == socket_id => {
            if let Err(e) = std::fs::remove_file(path) {
                warn!("cannot remove the API socket {}: {e}", path.display());
            }
        }
        Ok(_) => warn!(
            "{} was replaced by another file; leaving it in place",
            path.display()
        ),
        Err(_) => {}
    }
}

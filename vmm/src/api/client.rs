//! A blocking client of the control socket, for the CLI (`arkvm pause|resume|status|...
//! --api-socket PATH`): one HTTP/1.1 exchange per call over the Unix socket.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::http::{self, BodyLength, HttpError, MessageReader};

/// How long a call waits for the answer by default; longer than the server's own wait for the
/// VMM, so that a slow VMM shows up as the server's 504 rather than as a client timeout.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest response body accepted.
const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// Why a call on the control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    #[error("there is no API socket at {}; is arkvm running with --api-socket {}?", .0.display(), .0.display())]
    NoSocket(PathBuf),
    #[error("nothing answers on {}; the arkvm that created it is gone (remove the stale socket)", .0.display())]
    NotServing(PathBuf),
    #[error("permission denied on {}; the socket belongs to the user who started arkvm", .0.display())]
    PermissionDenied(PathBuf),
    #[error("cannot connect to {}", .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the connection to {} failed", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("arkvm did not answer within {} s", .0.as_secs_f32())]
    Timeout(Duration),
    #[error("arkvm sent a malformed HTTP response: {0}")]
    Protocol(String),
    #[error("arkvm's answer is not the JSON expected")]
    BadJson(#[source] serde_json::Error),
    #[error("{message} (HTTP {status})")]
    Status { status: u16, message: String },
}

/// One answer: the HTTP status and the JSON body (`None` for an empty body, as with 204).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiReply {
    pub status: u16,
    pub body: Option<serde_json::Value>,
}

impl ApiReply {
    /// True for a 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `"error"` sentence of an error answer.
    pub fn error_message(&self) -> Option<&str> {
        self.body.as_ref()?.get("error")?.as_str()
    }

    /// The body of a 2xx answer; any other status becomes [`ApiClientError::Status`].
    pub fn into_result(self) -> Result<Option<serde_json::Value>, ApiClientError> {
        if self.is_success() {
            return Ok(self.body);
        }
        let message = self
            .error_message()
            .map(str::to_string)
            .unwrap_or_else(|| "arkvm refused the request".to_string());
        Err(ApiClientError::Status {
            status: self.status,
            message,
        })
    }

    /// The body of a 2xx answer as `T` (e.g. [`VmInfo`](super::response::VmInfo) for `GET /vm`).
    pub fn parse<T: DeserializeOwned>(self) -> Result<T, ApiClientError> {
        let body = self.into_result()?.unwrap_or(serde_json::Value::Null);
        serde_json::from_value(body).map_err(ApiClientError::BadJson)
    }
}

/// A client of one control socket. Each call uses a fresh connection (`Connection: close`), so
/// a client may be kept for as long as the VMM runs, with no idle connection to go stale.
#[derive(Debug)]
pub struct ApiClient {
    path: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// Checks that something serves the socket at `path` (by connecting once), so that a
    /// missing socket or a dead server is reported here, before any request is made.
    pub fn connect(path: impl AsRef<Path>) -> Result<ApiClient, ApiClientError> {
        let path = path.as_ref().to_path_buf();
        drop(open(&path)?);
        Ok(ApiClient {
            path,
            timeout: DEFAULT_CLIENT_TIMEOUT,
        })
    }

    /// Sets how long each call waits for its answer.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// `GET path`.
    pub fn get(&mut self, path: &str) -> Result<ApiReply, ApiClientError> {
        self.request("GET", path, None)
    }

    /// `PUT path` with an optional JSON body.
    pub fn put(
        &mut self,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<ApiReply, ApiClientError> {
        self.request("PUT", path, body)
    }

    /// `DELETE path`.
    pub fn delete(&mut self, path: &str) -> Result<ApiReply, ApiClientError> {
        self.request("DELETE", path, None)
    }

    /// Sends one request and reads its answer. Any status is a successful exchange; use
    /// [`ApiReply::into_result`] or [`ApiReply::parse`] to turn 4xx/5xx into errors.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<ApiReply, ApiClientError> {
        let stream = open(&self.path)?;
        let io_err = |source| ApiClientError::Io {
            path: self.path.clone(),
            source,
        };
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(io_err)?;
        let body = body.map(|b| b.to_string().into_bytes());
        if let Err(e) = http::write_request(&stream, method, path, body.as_deref()) {
            // A server that refuses a request early (413) stops reading; its answer is still
            // there to read.
            if !matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) {
                return Err(self.map_http(HttpError::Io(e)));
            }
        }
        let (status, bytes) = read_reply(&stream).map_err(|e| self.map_http(e))?;
        let body = if bytes.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            Some(serde_json::from_slice(&bytes).map_err(ApiClientError::BadJson)?)
        };
        Ok(ApiReply { status, body })
    }

    fn map_http(&self, e: HttpError) -> ApiClientError {
        match e {
            HttpError::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                ApiClientError::Timeout(self.timeout)
            }
            HttpError::Io(source) => ApiClientError::Io {
                path: self.path.clone(),
                source,
            },
            other => ApiClientError::Protocol(other.to_string()),
        }
    }
}

fn open(path: &Path) -> Result<UnixStream, ApiClientError> {
    UnixStream::connect(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => ApiClientError::NoSocket(path.to_path_buf()),
        io::ErrorKind::ConnectionRefused => ApiClientError::NotServing(path.to_path_buf()),
        io::ErrorKind::PermissionDenied => ApiClientError::PermissionDenied(path.to_path_buf()),
        _ => ApiClientError::Connect {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Reads one final response (skipping interim 1xx ones): its status and raw body.
fn read_reply(stream: &UnixStream) -> Result<(u16, Vec<u8>), HttpError> {
    let mut reader = MessageReader::new(stream);
    let head = loop {
        let head = reader.read_response_head()?;
        if !(100..200).contains(&head.status) {
            break head;
        }
    };
    let length = if head.status == 204 || head.status == 304 {
        BodyLength::Exact(0)
    } else {
        http::body_length(&head.headers, false)?
    };
    let bytes = reader.read_body(length, MAX_RESPONSE_BYTES)?;
    Ok((head.status, bytes))
}

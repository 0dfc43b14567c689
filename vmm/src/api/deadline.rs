//! An absolute deadline for a whole request on the control socket: a client that trickles its
//! request one byte at a time is cut off [`REQUEST_DEADLINE`] after the request began, however
//! often it sends, so it cannot hold a connection slot.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The longest a whole request (head and body) may take to arrive.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// Reads from a connection, each read bounded by the idle timeout and by the current deadline.
pub(crate) struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    idle: Duration,
    deadline: Option<Instant>,
}

impl<'a> DeadlineReader<'a> {
    pub(crate) fn new(stream: &'a UnixStream, idle: Duration) -> Self {
        Self {
            stream,
            idle,
            deadline: None,
        }
    }

    /// The next reads must all be done within `within` from now.
    pub(crate) fn start(&mut self, within: Duration) {
        self.deadline = Some(Instant::now() + within);
    }

    /// Whether the deadline has passed.
    pub(crate) fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let timeout = match self.deadline {
            None => self.idle,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the request did not arrive in time",
                    ));
                }
                left.min(self.idle)
            }
        };
        self.stream.set_read_timeout(Some(timeout))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

//! HTTP/1.1 message framing for the control socket, shared by the server and the client.
//!
//! `httparse` parses request and response heads and chunk-size lines; this file only decides
//! where a body ends (Content-Length, chunked, or end of stream), reads it under a size cap that
//! is checked before any of it is read, and writes responses. Every buffer is bounded: a head may
//! not exceed [`MAX_HEAD_BYTES`] and a body may not exceed the caller's limit.

use std::io::{self, Read, Write};

/// Largest request or response head (start line plus headers) accepted.
pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header fields accepted in one head.
const MAX_HEADERS: usize = 48;
/// Largest chunk-size line (with extensions) or trailer section accepted.
const MAX_CHUNK_LINE: usize = 1024;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 * 1024;

/// What went wrong while reading or writing an HTTP message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    #[error("the peer closed the connection in the middle of a message")]
    UnexpectedEof,
    #[error("the socket failed")]
    Io(#[source] io::Error),
    #[error("the message head is malformed ({0})")]
    MalformedHead(httparse::Error),
    #[error("the message head is larger than {MAX_HEAD_BYTES} bytes or has more than {MAX_HEADERS} fields")]
    HeadTooLarge,
    #[error("the body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the Content-Length header is invalid")]
    BadContentLength,
    #[error("both Content-Length and Transfer-Encoding are present")]
    AmbiguousLength,
    #[error("the transfer coding \"{0}\" is not supported (only chunked is)")]
    UnsupportedTransferEncoding(String),
    #[error("the chunked body is malformed")]
    BadChunk,
}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        HttpError::Io(e)
    }
}

/// Header fields of a parsed head, names as sent, values as raw bytes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Headers(Vec<(String, Vec<u8>)>);

impl Headers {
    fn from_parsed(parsed: &[httparse::Header<'_>]) -> Self {
        Headers(
            parsed
                .iter()
                .map(|h| (h.name.to_string(), h.value.to_vec()))
                .collect(),
        )
    }

    /// All values of the field `name` (case-insensitive), trimmed, in order.
    fn all<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> + 'a {
        let name = name.to_string();
        self.0
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(&name))
            .map(|(_, v)| std::str::from_utf8(v).unwrap_or("\u{fffd}").trim())
    }

    /// True if any value of `name` lists `token` (comma-separated, case-insensitive).
    pub(crate) fn has_token(&self, name: &str, token: &str) -> bool {
        self.all(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The single value of `name`, if present.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.all(name).next()
    }
}

/// The parsed head of a request.
#[derive(Debug, Clone)]
pub(crate) struct RequestHead {
    pub(crate) method: String,
    pub(crate) target: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub(crate) minor_version: u8,
    pub(crate) headers: Headers,
}

impl RequestHead {
    /// Whether the client wants the connection kept open after the response.
    pub(crate) fn keep_alive(&self) -> bool {
        if self.headers.has_token("Connection", "close") {
            return false;
        }
        self.minor_version >= 1 || self.headers.has_token("Connection", "keep-alive")
    }
}

/// The parsed head of a response.
#[derive(Debug, Clone)]
pub(crate) struct ResponseHead {
    pub(crate) status: u16,
    pub(crate) headers: Headers,
}

/// Where a message body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLength {
    /// Exactly this many bytes follow the head.
    Exact(u64),
    /// Chunked transfer coding.
    Chunked,
    /// The body runs to the end of the stream (responses only).
    UntilEof,
}

/// Decides the body framing from the headers. A request without either header has no body; a
/// response without either runs to the end of the stream.
pub(crate) fn body_length(headers: &Headers, is_request: bool) -> Result<BodyLength, HttpError> {
    let mut codings = headers
        .all("Transfer-Encoding")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .peekable();
    let chunked = if codings.peek().is_some() {
        let codings: Vec<&str> = codings.collect();
        match codings.as_slice() {
            [only] if only.eq_ignore_ascii_case("chunked") => true,
            _ => return Err(HttpError::UnsupportedTransferEncoding(codings.join(", "))),
        }
    } else {
        false
    };
    let mut length: Option<u64> = None;
    for value in headers.all("Content-Length") {
        for part in value.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::BadContentLength);
            }
            let n: u64 = part.parse().map_err(|_| HttpError::BadContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(HttpError::BadContentLength);
            }
            length = Some(n);
        }
    }
    match (chunked, length) {
        (true, Some(_)) => Err(HttpError::AmbiguousLength),
        (true, None) => Ok(BodyLength::Chunked),
        (false, Some(n)) => Ok(BodyLength::Exact(n)),
        (false, None) if is_request => Ok(BodyLength::Exact(0)),
        (false, None) => Ok(BodyLength::UntilEof),
    }
}

/// A buffered reader of HTTP messages over one stream. Bytes read past the end of one message
/// stay buffered for the next one (keep-alive).
pub(crate) struct MessageReader<R> {
    stream: R,
    buf: Vec<u8>,
}

impl<R: Read> MessageReader<R> {
    pub(crate) fn new(stream: R) -> Self {
        MessageReader {
            stream,
            buf: Vec::new(),
        }
    }

    /// The stream.
    pub(crate) fn get_ref(&self) -> &R {
        &self.stream
    }

    /// How many bytes are buffered (read but not yet part of a message).
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The stream, mutably.
    pub(crate) fn get_mut(&mut self) -> &mut R {
        &mut self.stream
    }

    /// Reads more bytes into the buffer; returns how many (0 at end of stream).
    fn fill(&mut self) -> Result<usize, HttpError> {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(HttpError::Io(e)),
            }
        }
    }

    /// Reads one head with `parse`, which returns the head's length and its owned form. Returns
    /// `None` if the stream ends cleanly before the first byte of a head.
    fn read_head<T>(
        &mut self,
        parse: impl Fn(&[u8]) -> Result<httparse::Status<(usize, T)>, httparse::Error>,
    ) -> Result<Option<T>, HttpError> {
        loop {
            if !self.buf.is_empty() {
                match parse(&self.buf) {
                    Ok(httparse::Status::Complete((len, head))) => {
                        self.buf.drain(..len);
                        return Ok(Some(head));
                    }
                    Ok(httparse::Status::Partial) => {
                        if self.buf.len() > MAX_HEAD_BYTES {
                            return Err(HttpError::HeadTooLarge);
                        }
                    }
                    Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
                    Err(e) => return Err(HttpError::MalformedHead(e)),
                }
            }
            if self.fill()? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(HttpError::UnexpectedEof)
                };
            }
        }
    }

    /// Reads the next request head, or `None` at a clean end of stream.
    pub(crate) fn read_request_head(&mut self) -> Result<Option<RequestHead>, HttpError> {
        self.read_head(|buf| {
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut fields);
            Ok(match req.parse(buf)? {
                httparse::Status::Partial => httparse::Status::Partial,
                httparse::Status::Complete(len) => httparse::Status::Complete((
                    len,
                    RequestHead {
                        method: req.method.unwrap_or_default().to_string(),
                        target: req.path.unwrap_or_default().to_string(),
                        minor_version: req.version.unwrap_or(1),
                        headers: Headers::from_parsed(req.headers),
                    },
                )),
            })
        })
    }

    /// Reads the next response head; the end of the stream before it is an error.
    pub(crate) fn read_response_head(&mut self) -> Result<ResponseHead, HttpError> {
        let head = self.read_head(|buf| {
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut fields);
            Ok(match resp.parse(buf)? {
                httparse::Status::Partial => httparse::Status::Partial,
                httparse::Status::Complete(len) => httparse::Status::Complete((
                    len,
                    ResponseHead {
                        status: resp.code.unwrap_or_default(),
                        headers: Headers::from_parsed(resp.headers),
                    },
                )),
            })
        })?;
        head.ok_or(HttpError::UnexpectedEof)
    }

    /// Reads a body framed as `length`. A declared length above `limit` is refused before any
    /// byte of the body is read; a chunked or unframed body is refused as soon as it passes
    /// `limit`.
    pub(crate) fn read_body(
        &mut self,
        length: BodyLength,
        limit: usize,
    ) -> Result<Vec<u8>, HttpError> {
        match length {
            BodyLength::Exact(n) => {
                let n = usize::try_from(n)
                    .ok()
                    .filter(|&n| n <= limit)
                    .ok_or(HttpError::BodyTooLarge { limit })?;
                self.take_exact(n)
            }
            BodyLength::Chunked => self.read_chunked(limit),
            BodyLength::UntilEof => {
                while self.fill()? > 0 {
                    if self.buf.len() > limit {
                        return Err(HttpError::BodyTooLarge { limit });
                    }
                }
                Ok(std::mem::take(&mut self.buf))
            }
        }
    }

    /// Takes exactly `n` bytes from the buffer and the stream.
    fn take_exact(&mut self, n: usize) -> Result<Vec<u8>, HttpError> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(HttpError::UnexpectedEof);
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn read_chunked(&mut self, limit: usize) -> Result<Vec<u8>, HttpError> {
        let mut body = Vec::new();
        loop {
            let (line_len, size) = loop {
                match httparse::parse_chunk_size(&self.buf) {
                    Ok(httparse::Status::Complete(found)) => break found,
                    Ok(httparse::Status::Partial) if self.buf.len() <= MAX_CHUNK_LINE => {
                        if self.fill()? == 0 {
                            return Err(HttpError::UnexpectedEof);
                        }
                    }
                    _ => return Err(HttpError::BadChunk),
                }
            };
            self.buf.drain(..line_len);
            if size == 0 {
                self.skip_trailers()?;
                return Ok(body);
            }
            let size = usize::try_from(size)
                .ok()
                .filter(|&s| body.len().saturating_add(s) <= limit)
                .ok_or(HttpError::BodyTooLarge { limit })?;
            body.extend_from_slice(&self.take_exact(size)?);
            if self.take_exact(2)? != b"\r\n" {
                return Err(HttpError::BadChunk);
            }
        }
    }

    /// Consumes the trailer section that ends a chunked body.
    fn skip_trailers(&mut self) -> Result<(), HttpError> {
        loop {
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(&self.buf, &mut fields) {
                Ok(httparse::Status::Complete((len, _))) => {
                    self.buf.drain(..len);
                    return Ok(());
                }
                Ok(httparse::Status::Partial) if self.buf.len() <= MAX_CHUNK_LINE => {
                    if self.fill()? == 0 {
                        return Err(HttpError::UnexpectedEof);
                    }
                }
                _ => return Err(HttpError::BadChunk),
            }
        }
    }
}

/// The reason phrase for the status codes this API uses.
pub(crate) fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// Writes a complete response with a JSON body (or none) and flushes it.
pub(crate) fn write_response(
    out: impl Write,
    status: u16,
    extra_headers: &[(&str, &str)],
    body: Option<&[u8]>,
    keep_alive: bool,
) -> io::Result<()> {
    write_typed_response(
        out,
        status,
        extra_headers,
        body,
        "application/json",
        keep_alive,
    )
}

/// Writes a complete response with a body of `content_type` (or none) and flushes it.
pub(crate) fn write_typed_response(
    mut out: impl Write,
    status: u16,
    extra_headers: &[(&str, &str)],
    body: Option<&[u8]>,
    content_type: &str,
    keep_alive: bool,
) -> io::Result<()> {
    let mut msg = format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    for (name, value) in extra_headers {
        msg.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        msg.push_str(&format!("Content-Type: {content_type}\r\n"));
        msg.push_str(&format!("Content-Length: {}\r\n", body.len()));
    } else if status != 204 {
        msg.push_str("Content-Length: 0\r\n");
    }
    let connection = if keep_alive { "keep-alive" } else { "close" };
    msg.push_str(&format!("Connection: {connection}\r\n\r\n"));
    let mut bytes = msg.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    out.write_all(&bytes)?;
    out.flush()
}

/// Writes an interim `100 Continue`, telling a client that waits for it to send its body.
pub(crate) fn write_continue(mut out: impl Write) -> io::Result<()> {
    out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    out.flush()
}

/// Writes a request with an optional JSON body and flushes it.
pub(crate) fn write_request(
    mut out: impl Write,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
) -> io::Result<()> {
    let mut msg = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n");
    if let Some(body) = body {
        msg.push_str("Content-Type: application/json\r\n");
        msg.push_str(&format!("Content-Length: {}\r\n", body.len()));
    } else if method != "GET" {
        msg.push_str("Content-Length: 0\r\n");
    }
    msg.push_str("\r\n");
    let mut bytes = msg.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    out.write_all(&bytes)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(bytes: &[u8]) -> MessageReader<&[u8]> {
        MessageReader::new(bytes)
    }

    #[test]
    fn request_head_and_exact_body_then_next_request() {
        let wire = b"PUT /snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /vm HTTP/1.1\r\n\r\n";
        let mut r = reader(wire);
        let head = r.read_request_head().unwrap().unwrap();
        assert_eq!(head.method, "PUT");
        assert_eq!(head.target, "/snapshot");
        assert!(head.keep_alive());
        let len = body_length(&head.headers, true).unwrap();
        assert_eq!(len, BodyLength::Exact(5));
        assert_eq!(r.read_body(len, 64).unwrap(), b"hello");
        let next = r.read_request_head().unwrap().unwrap();
        assert_eq!((next.method.as_str(), next.target.as_str()), ("GET", "/vm"));
        assert!(r.read_request_head().unwrap().is_none());
    }

    #[test]
    fn chunked_body_is_decoded_and_capped() {
        let wire = b"4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\nX-Trailer: 1\r\n\r\n";
        assert_eq!(
            reader(wire).read_body(BodyLength::Chunked, 64).unwrap(),
            b"abcdefg"
        );
        assert!(matches!(
            reader(wire).read_body(BodyLength::Chunked, 6),
            Err(HttpError::BodyTooLarge { limit: 6 })
        ));
        assert!(matches!(
            reader(b"4\r\nabcdXX").read_body(BodyLength::Chunked, 64),
            Err(HttpError::BadChunk)
        ));
    }

    #[test]
    fn oversized_declared_length_is_refused_before_reading() {
        // Only the head is present: the refusal must not wait for the body.
        let mut r = reader(b"");
        assert!(matches!(
            r.read_body(BodyLength::Exact(8 << 20), 64 * 1024),
            Err(HttpError::BodyTooLarge { .. })
        ));
    }

    #[test]
    fn framing_errors_are_detected() {
        let head = |raw: &[u8]| reader(raw).read_request_head().unwrap().unwrap().headers;
        let h = head(b"PUT / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(
            body_length(&h, true),
            Err(HttpError::AmbiguousLength)
        ));
        let h = head(b"PUT / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n");
        assert!(matches!(
            body_length(&h, true),
            Err(HttpError::BadContentLength)
        ));
        let h = head(b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n");
        assert!(matches!(
            body_length(&h, true),
            Err(HttpError::BadContentLength)
        ));
        let h = head(b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert!(matches!(
            body_length(&h, true),
            Err(HttpError::UnsupportedTransferEncoding(_))
        ));
        let h = head(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(body_length(&h, true).unwrap(), BodyLength::Exact(0));
        assert_eq!(body_length(&h, false).unwrap(), BodyLength::UntilEof);
    }

    #[test]
    fn malformed_and_oversized_heads_are_errors() {
        assert!(matches!(
            reader(b"GET /\x01 HTTP/1.1\r\n\r\n").read_request_head(),
            Err(HttpError::MalformedHead(_))
        ));
        let big = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n",
            "a".repeat(MAX_HEAD_BYTES + 10)
        );
        assert!(matches!(
            reader(big.as_bytes()).read_request_head(),
            Err(HttpError::HeadTooLarge)
        ));
        assert!(matches!(
            reader(b"GET / HTTP/1.1\r\nHost").read_request_head(),
            Err(HttpError::UnexpectedEof)
        ));
    }

    #[test]
    fn http10_closes_unless_asked_and_close_token_wins() {
        let h = |raw: &[u8]| reader(raw).read_request_head().unwrap().unwrap();
        assert!(!h(b"GET / HTTP/1.0\r\n\r\n").keep_alive());
        assert!(h(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive());
        assert!(!h(b"GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n").keep_alive());
    }

    #[test]
    fn response_round_trip() {
        let mut wire = Vec::new();
        write_response(&mut wire, 409, &[], Some(br#"{"error":"x"}"#), false).unwrap();
        let mut r = reader(&wire);
        let head = r.read_response_head().unwrap();
        assert_eq!(head.status, 409);
        assert_eq!(head.headers.get("Connection"), Some("close"));
        let len = body_length(&head.headers, false).unwrap();
        assert_eq!(r.read_body(len, 1024).unwrap(), br#"{"error":"x"}"#);
    }
}

//! The splice lane: bodiless GETs to a plain-HTTP upstream over connections of our own, so
//! that the answer's body can be spliced to the client (see [`crate::splice`]). hyper's
//! client would read every body into user space first.
//!
//! Speaks just enough HTTP/1.1 for that: one request at a time per connection, bodies
//! delimited by `Content-Length` or by the connection's end. Any other answer (chunked,
//! informational) is [`RawError::Unsupported`], and the caller sends the request again through
//! the pooled client. Owns these connections and their idle pool; what is sent, and with
//! which credentials, is decided by [`super::Upstream`].

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use url::Url;

use crate::splice::SpliceSource;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 << 10;
const MAX_HEADERS: usize = 128;
/// Most bytes read per frame when the body is read rather than spliced.
const READ_CHUNK: usize = 256 << 10;
/// Idle connections kept per upstream.
const MAX_IDLE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// Not an answer this lane handles; send the request through the pooled client.
    #[error("answer needs the pooled client")]
    Unsupported,
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("bad response: {0}")]
    Protocol(String),
}

/// Connections to one plain-HTTP upstream.
#[derive(Clone)]
pub struct Lane(Arc<LaneInner>);

struct LaneInner {
    /// `host:port` to connect to.
    address: String,
    host_header: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    idle: Mutex<Vec<(TcpStream, Instant)>>,
}

impl Lane {
    /// A lane for `url`, if it is plain HTTP.
    pub fn for_url(url: &Url, connect_timeout: Duration, idle_timeout: Duration) -> Option<Lane> {
        if url.scheme() != "http" {
            return None;
        }
        // `host_str` keeps an IPv6 address's brackets.
        let host = url.host_str()?;
        let address = format!("{host}:{}", url.port_or_known_default()?);
        let host_header = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        Some(Lane(Arc::new(LaneInner {
            address,
            host_header,
            connect_timeout,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
        })))
    }

    /// Sends a bodiless request (its URI on this lane's upstream) and reads the answer's head.
    pub async fn send<B>(&self, request: &Request<B>) -> Result<Response<RawBody>, RawError> {
        let head = self.request_head(request);
        // A pooled connection may have been closed by the upstream meanwhile: one fresh retry.
        if let Some(stream) = self.take_idle() {
            match self.exchange(stream, &head).await {
                Err(RawError::Io(_)) => {}
                other => return other,
            }
        }
        let stream = self.connect().await?;
        self.exchange(stream, &head).await
    }

    fn request_head<B>(&self, request: &Request<B>) -> Vec<u8> {
        let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let mut head = Vec::with_capacity(512);
        head.extend_from_slice(request.method().as_str().as_bytes());
        head.extend_from_slice(b" ");
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        head.extend_from_slice(self.0.host_header.as_bytes());
        head.extend_from_slice(b"\r\n");
        for (name, value) in request.headers() {
            // `HeaderValue`s hold no CR or LF: nothing can be smuggled in here.
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        head
    }

    async fn connect(&self) -> Result<TcpStream, RawError> {
        let timeout = self.0.connect_timeout;
        let stream = tokio::time::timeout(timeout, TcpStream::connect(&self.0.address))
            .await
            .map_err(|_| RawError::ConnectTimeout(timeout))??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn exchange(
        &self,
        mut stream: TcpStream,
        head: &[u8],
    ) -> Result<Response<RawBody>, RawError> {
        stream.write_all(head).await?;
        let mut buf = BytesMut::with_capacity(16 << 10);
        loop {
            buf.reserve(8 << 10);
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            if let Some(response) = Self::parse_head(&mut buf)? {
                return Ok(response
                    .map(|framing| RawBody::new(self.clone(), stream, buf.freeze(), framing)));
            }
            if buf.len() > MAX_HEAD {
                return Err(RawError::Protocol("response head too large".into()));
            }
        }
    }

    /// The head, once `buf` holds all of it; `buf` keeps what follows (the body's start).
    fn parse_head(buf: &mut BytesMut) -> Result<Option<Response<Framing>>, RawError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        let len = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(RawError::Protocol(e.to_string())),
        };
        let status = parsed
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| RawError::Protocol("bad status".into()))?;
        let version = if parsed.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        let mut map = HeaderMap::with_capacity(parsed.headers.len());
        for h in parsed.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|e| RawError::Protocol(e.to_string()))?;
            let value =
                HeaderValue::from_bytes(h.value).map_err(|e| RawError::Protocol(e.to_string()))?;
            map.append(name, value);
        }
        if status.is_informational() || map.contains_key(header::TRANSFER_ENCODING) {
            return Err(RawError::Unsupported);
        }
        let length = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Some(0)
        } else {
            content_length(&map)?
        };
        let closes = version == Version::HTTP_10
            || map
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case("close"));
        let _ = buf.split_to(len);
        let mut response = Response::new(Framing {
            length,
            reusable: !closes && length.is_some(),
        });
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = map;
        Ok(Some(response))
    }

    fn take_idle(&self) -> Option<TcpStream> {
        let mut idle = self.0.idle.lock().ok()?;
        while let Some((stream, since)) = idle.pop() {
            if since.elapsed() < self.0.idle_timeout && is_quiet(&stream) {
                return Some(stream);
            }
        }
        None
    }

    fn put_idle(&self, stream: TcpStream) {
        if let Ok(mut idle) = self.0.idle.lock() {
            idle.retain(|(_, since)| since.elapsed() < self.0.idle_timeout);
            if idle.len() < MAX_IDLE {
                idle.push((stream, Instant::now()));
            }
        }
    }
}

/// An idle connection is usable while it has neither data nor an end to read.
fn is_quiet(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, RawError> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let n = value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| RawError::Protocol("bad Content-Length".into()))?;
        if length.is_some_and(|l| l != n) {
            return Err(RawError::Protocol("conflicting Content-Length".into()));
        }
        length = Some(n);
    }
    Ok(length)
}

struct Framing {
    /// `None`: until the connection closes.
    length: Option<u64>,
    reusable: bool,
}

/// The body of an answer on the lane: read like any other, or spliced.
pub struct RawBody {
    lane: Lane,
    /// `None` once finished (back in the pool, or closed).
    stream: Option<TcpStream>,
    /// Bytes read together with the head.
    buffered: Bytes,
    /// Bytes still in the socket; `None`: until it closes.
    remaining: Option<u64>,
    reusable: bool,
    read_buf: BytesMut,
}

impl RawBody {
    fn new(lane: Lane, stream: TcpStream, mut buffered: Bytes, framing: Framing) -> RawBody {
        let mut reusable = framing.reusable;
        let remaining = framing.length.map(|len| {
            let early = buffered.len() as u64;
            if early > len {
                // More than the answer: the connection is out of step; never reuse it.
                buffered.truncate(len as usize);
                reusable = false;
            }
            len - buffered.len() as u64
        });
        let mut body = RawBody {
            lane,
            stream: Some(stream),
            buffered,
            remaining,
            reusable,
            read_buf: BytesMut::new(),
        };
        body.release_if_done();
        body
    }

    fn release_if_done(&mut self) {
        if self.remaining == Some(0)
            && let Some(stream) = self.stream.take()
            && self.reusable
        {
            self.lane.put_idle(stream);
        }
    }

    fn consumed(&mut self, n: usize) {
        if let Some(r) = &mut self.remaining {
            *r -= n as u64;
        }
        self.release_if_done();
    }
}

impl HttpBody for RawBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if !this.buffered.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut this.buffered)))));
        }
        let Some(stream) = &this.stream else {
            return Poll::Ready(None);
        };
        let want = this.remaining.map_or(READ_CHUNK, |r| {
            READ_CHUNK.min(usize::try_from(r).unwrap_or(usize::MAX))
        });
        this.read_buf.reserve(want);
        let read = loop {
            if let Err(e) = ready!(stream.poll_read_ready(cx)) {
                return Poll::Ready(Some(Err(e)));
            }
            match stream.try_read_buf(&mut (&mut this.read_buf).limit(want)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        };
        if read == 0 {
            this.stream = None;
            return match this.remaining {
                None => Poll::Ready(None),
                Some(_) => Poll::Ready(Some(Err(io::ErrorKind::UnexpectedEof.into()))),
            };
        }
        this.consumed(read);
        Poll::Ready(Some(Ok(Frame::data(this.read_buf.split().freeze()))))
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_empty() && self.remaining == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        let buffered = self.buffered.len() as u64;
        match self.remaining {
            Some(r) => SizeHint::with_exact(buffered + r),
            None => {
                let mut hint = SizeHint::new();
                hint.set_lower(buffered);
                hint
            }
        }
    }
}

impl SpliceSource for RawBody {
    fn take_buffered(&mut self) -> Option<Bytes> {
        Some(std::mem::take(&mut self.buffered))
    }

    fn remaining(&self) -> u64 {
        self.remaining.unwrap_or(0)
    }

    fn poll_splice_into(
        &mut self,
        cx: &mut Context<'_>,
        pipe: BorrowedFd<'_>,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        let Some(stream) = &self.stream else {
            return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
        };
        let moved = loop {
            ready!(stream.poll_read_ready(cx))?;
            match stream.try_io(Interest::READABLE, || {
                crate::splice::splice(stream.as_fd(), pipe, len)
            }) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        };
        self.consumed(moved);
        Poll::Ready(Ok(moved))
    }
}

//! Zero-copy forwarding of blob bodies between plain TCP sockets (Linux `splice(2)`).
//!
//! A blob fetched over plain HTTP/1.1 for a client on a plain HTTP/1.1 connection need not
//! pass through user space: its bytes can go upstream socket → pipe → client socket inside
//! the kernel, as a registry's `sendfile` sends its files. hyper still writes the response
//! head and counts the body. The body ([`SplicedBody`]) hands hyper *placeholder* frames,
//! slices of one zeroed buffer that is never read, and the client connection's writer
//! ([`SpliceStream`]) recognises them and splices that many bytes out of the connection's
//! pipe instead. The placeholders stay separate slices only while hyper queues body frames
//! (its `writev` strategy), which the listener forces for these connections.
//!
//! Owns the pipe, the placeholder buffer and the accounting between them. Knows nothing of
//! HTTP: which bodies qualify is the pipeline's decision.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::body::BoxError;

/// The pipe size asked for: large enough that a fill and a drain move a good share of a blob.
const PIPE_CAPACITY: usize = 1 << 20;
/// Below this (a user over the kernel's pipe-buffer quota gets tiny pipes) copying is cheaper.
const MIN_PIPE_CAPACITY: usize = 64 << 10;
/// Bodies smaller than this are copied: a pipe round trip would cost more than it saves.
const MIN_SPLICED_BODY: u64 = 64 << 10;

/// The placeholder buffer: calloc'd and never written, so it costs no resident memory.
fn placeholders() -> &'static Bytes {
    static ZEROS: OnceLock<Bytes> = OnceLock::new();
    ZEROS.get_or_init(|| Bytes::from(vec![0u8; PIPE_CAPACITY]))
}

fn placeholder(len: usize) -> Bytes {
    placeholders().slice(..len)
}

fn is_placeholder(slice: &[u8]) -> bool {
    let base = placeholders().as_ptr() as usize;
    let start = slice.as_ptr() as usize;
    !slice.is_empty() && start >= base && start + slice.len() <= base + PIPE_CAPACITY
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        use rustix::pipe::{PipeFlags, fcntl_getpipe_size, fcntl_setpipe_size, pipe_with};
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // Refused past the per-user quota; the pipe then keeps the size it has.
        let _ = fcntl_setpipe_size(&write, PIPE_CAPACITY);
        let capacity = fcntl_getpipe_size(&write)?.min(PIPE_CAPACITY);
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

pub(crate) fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    use rustix::pipe::SpliceFlags;
    rustix::pipe::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
    )
    .map_err(io::Error::from)
}

/// Where spliced bytes wait between a body and its connection's writer. One per plain TCP
/// connection; HTTP/1 sends one response at a time, so one pipe serves them all in turn.
#[derive(Clone, Default)]
pub struct Outlet(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    pipe: Option<Pipe>,
    /// Bytes in the pipe that hyper holds placeholders for.
    in_pipe: usize,
    /// A body waiting for the pipe to empty.
    waiting: Option<Waker>,
}

impl std::fmt::Debug for Outlet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outlet")
    }
}

impl Outlet {
    /// Whether a body can be spliced now: the pipe exists (made on first use), is large enough
    /// and holds nothing from an earlier response.
    fn ready(&self) -> bool {
        let Ok(mut state) = self.0.lock() else {
            return false;
        };
        if state.pipe.is_none() {
            match Pipe::new() {
                Ok(pipe) => state.pipe = Some(pipe),
                Err(e) => {
                    tracing::debug!(error = %e, "no pipe for splicing; copying instead");
                    return false;
                }
            }
        }
        state.in_pipe == 0
            && state
                .pipe
                .as_ref()
                .is_some_and(|p| p.capacity >= MIN_PIPE_CAPACITY)
    }

    /// Moves up to `max` bytes from `source` into the empty pipe. Filling only an empty pipe
    /// keeps "would block" unambiguous: it can then only mean the source has nothing yet.
    fn poll_fill(
        &self,
        cx: &mut Context<'_>,
        source: &mut dyn SpliceSource,
        max: u64,
    ) -> Poll<io::Result<usize>> {
        let mut state = self.lock()?;
        if state.in_pipe > 0 {
            state.waiting = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let Some(pipe) = &state.pipe else {
            return Poll::Ready(Err(io::Error::other("splice pipe missing")));
        };
        let len = usize::try_from(max)
            .unwrap_or(usize::MAX)
            .min(pipe.capacity);
        let moved = ready!(source.poll_splice_into(cx, pipe.write.as_fd(), len))?;
        state.in_pipe += moved;
        Poll::Ready(Ok(moved))
    }

    /// Sends up to `len` bytes of the pipe to `socket`: what hyper wrote as a placeholder.
    fn poll_drain(
        &self,
        cx: &mut Context<'_>,
        socket: &TcpStream,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        let mut state = self.lock()?;
        let len = len.min(state.in_pipe);
        let Some(pipe) = state.pipe.as_ref().filter(|_| len > 0) else {
            // A placeholder with nothing behind it would put zeros on the wire.
            return Poll::Ready(Err(io::Error::other("placeholder without spliced bytes")));
        };
        let sent = loop {
            ready!(socket.poll_write_ready(cx))?;
            match socket.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_fd(), socket.as_fd(), len)
            }) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        };
        state.in_pipe -= sent;
        crate::metrics::spliced(sent as u64);
        if state.in_pipe == 0
            && let Some(waker) = state.waiting.take()
        {
            waker.wake();
        }
        Poll::Ready(Ok(sent))
    }

    fn lock(&self) -> io::Result<std::sync::MutexGuard<'_, State>> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("splice state poisoned"))
    }
}

/// A body whose bytes can be spliced out of a socket.
pub trait SpliceSource: Send + Sync + Unpin + 'static {
    /// Bytes already read into memory (with the response head), sent before the rest.
    fn take_buffered(&mut self) -> Option<Bytes>;
    /// Bytes still in the socket (0 when unknown: such a body is not spliced).
    fn remaining(&self) -> u64;
    /// Splices up to `len` (≤ `remaining`) bytes into `pipe`; an early end is an error.
    fn poll_splice_into(
        &mut self,
        cx: &mut Context<'_>,
        pipe: BorrowedFd<'_>,
        len: usize,
    ) -> Poll<io::Result<usize>>;
}

/// A response body that moves through the connection's pipe; hyper sees placeholders.
pub struct SplicedBody<S> {
    source: S,
    outlet: Outlet,
    buffered: Option<Bytes>,
}

impl<S: SpliceSource> SplicedBody<S> {
    /// The spliced body, or `source` back when splicing is not possible or not worth it.
    pub fn try_new(mut source: S, outlet: &Outlet) -> Result<SplicedBody<S>, S> {
        if source.remaining() < MIN_SPLICED_BODY || !outlet.ready() {
            return Err(source);
        }
        let buffered = source.take_buffered().filter(|b| !b.is_empty());
        Ok(SplicedBody {
            source,
            outlet: outlet.clone(),
            buffered,
        })
    }
}

impl<S: SpliceSource> HttpBody for SplicedBody<S> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(bytes) = this.buffered.take() {
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        let remaining = this.source.remaining();
        if remaining == 0 {
            return Poll::Ready(None);
        }
        match ready!(this.outlet.poll_fill(cx, &mut this.source, remaining)) {
            Ok(moved) => Poll::Ready(Some(Ok(Frame::data(placeholder(moved))))),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_none() && self.source.remaining() == 0
    }

    fn size_hint(&self) -> SizeHint {
        let buffered = self.buffered.as_ref().map_or(0, |b| b.len() as u64);
        SizeHint::with_exact(buffered + self.source.remaining())
    }
}

/// A client connection's socket as hyper sees it: ordinary reads and writes, except that a
/// written placeholder is replaced by bytes spliced from the pipe.
pub struct SpliceStream {
    socket: TcpStream,
    outlet: Outlet,
}

impl SpliceStream {
    pub fn new(socket: TcpStream, outlet: Outlet) -> SpliceStream {
        SpliceStream { socket, outlet }
    }
}

impl AsyncRead for SpliceStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_read(cx, buf)
    }
}

impl AsyncWrite for SpliceStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if is_placeholder(buf) {
            return this.outlet.poll_drain(cx, &this.socket, buf.len());
        }
        Pin::new(&mut this.socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let bufs = match bufs.iter().position(|b| !b.is_empty()) {
            Some(first) => &bufs[first..],
            None => return Poll::Ready(Ok(0)),
        };
        if is_placeholder(&bufs[0]) {
            return this.outlet.poll_drain(cx, &this.socket, bufs[0].len());
        }
        // Real bytes up to the first placeholder; the placeholder goes in the next call.
        let real = bufs
            .iter()
            .position(|b| is_placeholder(b))
            .unwrap_or(bufs.len());
        Pin::new(&mut this.socket).poll_write_vectored(cx, &bufs[..real])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_shutdown(cx)
    }
}

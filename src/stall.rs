//! Connections whose client stops taking response bytes are closed after `send_timeout`.
//!
//! A stalled response holds what it streams: an open (pinned) cache object, an upstream
//! connection, buffers. Over HTTP/1.1 the client stops reading and the socket fills; over
//! HTTP/2 it simply grants no flow-control window, and nothing is ever written again, so no
//! socket-level timeout sees it. What both have in common: hyper stops asking the response
//! body for bytes, or keeps a frame it took without sending it. So each response's [`Clock`]
//! records when its body was last asked, and whether the body is the one keeping the client
//! waiting (an upstream slower than the client is no stall). The clock lives as long as the
//! body or any frame it produced, and the connection's socket wrapper ([`Guarded`]) checks its
//! clocks periodically and fails the connection when one has stood still too long while the
//! socket took less than [`MIN_PROGRESS`] bytes: a slow client that keeps reading is no
//! stall, even while one large frame (2 MiB of a cached object) is being written.
//!
//! Knows nothing of the protocol: frames are bytes, connections are sockets.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::body::{Body, BoxError};

/// One response's progress.
struct Clock {
    /// Milliseconds since the connection's start when the body was last asked for bytes.
    asked: AtomicU64,
    /// The body returned `Pending`: the client waits for us, not we for it.
    ours: AtomicBool,
}

/// Bytes a connection must write per `send_timeout` to count as progressing.
const MIN_PROGRESS: u64 = 64 << 10;

/// The clocks of one connection's responses.
pub(crate) struct Watch {
    start: Instant,
    timeout: Duration,
    clocks: Mutex<Vec<Weak<Clock>>>,
    /// Bytes the socket has taken.
    written: AtomicU64,
    /// When the connection last made [`MIN_PROGRESS`], and its byte count then.
    progressed: Mutex<(u64, u64)>,
}

impl Watch {
    pub(crate) fn new(timeout: Duration) -> Arc<Watch> {
        Arc::new(Watch {
            start: Instant::now(),
            timeout,
            clocks: Mutex::default(),
            written: AtomicU64::new(0),
            progressed: Mutex::new((0, 0)),
        })
    }

    fn wrote(&self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Wraps a response body so that this connection watches it.
    pub(crate) fn body(&self, inner: Body) -> Body {
        let clock = Arc::new(Clock {
            asked: AtomicU64::new(self.now()),
            ours: AtomicBool::new(false),
        });
        {
            let mut clocks = self.clocks.lock();
            clocks.retain(|c| c.strong_count() > 0);
            clocks.push(Arc::downgrade(&clock));
        }
        crate::body::boxed(Watched {
            inner,
            clock,
            start: self.start,
        })
    }

    /// Whether a response has waited on its client longer than the timeout, with the
    /// connection making no progress meanwhile.
    fn stalled(&self) -> bool {
        let now = self.now();
        let limit = self.timeout.as_millis() as u64;
        let written = self.written.load(Ordering::Relaxed);
        {
            let mut progressed = self.progressed.lock();
            if written.saturating_sub(progressed.1) >= MIN_PROGRESS {
                *progressed = (now, written);
            }
            if now.saturating_sub(progressed.0) <= limit {
                return false;
            }
        }
        let clocks = self.clocks.lock();
        clocks.iter().filter_map(Weak::upgrade).any(|c| {
            !c.ours.load(Ordering::Acquire)
                && now.saturating_sub(c.asked.load(Ordering::Acquire)) > limit
        })
    }
}

struct Watched {
    inner: Body,
    clock: Arc<Clock>,
    start: Instant,
}

/// A frame's bytes, keeping its response's clock alive while a connection still holds them.
struct Owned {
    data: Bytes,
    _clock: Arc<Clock>,
}

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let now = self.start.elapsed().as_millis() as u64;
        self.clock.asked.store(now, Ordering::Release);
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        self.clock
            .ours
            .store(polled.is_pending(), Ordering::Release);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                let clock = self.clock.clone();
                Poll::Ready(Some(Ok(frame.map_data(|data| {
                    Bytes::from_owner(Owned {
                        data,
                        _clock: clock,
                    })
                }))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's socket, failed (read and write) once one of its responses stalls.
pub(crate) struct Guarded<T> {
    inner: T,
    watch: Arc<Watch>,
    checks: tokio::time::Interval,
}

impl<T> Guarded<T> {
    pub(crate) fn new(inner: T, watch: Arc<Watch>) -> Guarded<T> {
        let period = (watch.timeout / 4).max(Duration::from_millis(100));
        let mut checks = tokio::time::interval(period);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Guarded {
            inner,
            watch,
            checks,
        }
    }

    /// While the connection waits (to read or to write), checks its responses now and then.
    fn check<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            return polled;
        }
        while self.checks.poll_tick(cx).is_ready() {
            if self.watch.stalled() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client took no bytes for {:?}", self.watch.timeout),
                )));
            }
        }
        Poll::Pending
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.check(cx, polled)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.watch.wrote(n);
        }
        self.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.watch.wrote(n);
        }
        self.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    /// A body fed by the test.
    struct Source(mpsc::Receiver<Bytes>);

    impl http_body::Body for Source {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx).map(|d| d.map(|d| Ok(Frame::data(d))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_nobody_asks_for_bytes_stalls_one_that_waits_on_its_source_does_not() {
        let watch = Watch::new(Duration::from_secs(10));
        let (tx, rx) = mpsc::channel(1);
        let mut body = watch.body(crate::body::boxed(Source(rx)));
        // Waiting on a slow source is not the client's fault.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!watch.stalled());
        // A frame taken but never sent, the body not asked again: a stall, also once the body
        // is gone while the frame is still held.
        tx.send(Bytes::from_static(b"x")).await.unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        // Slow but steady writes are progress.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(9)).await;
            watch.wrote(MIN_PROGRESS as usize);
            assert!(!watch.stalled(), "the client is still reading");
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(watch.stalled());
        drop(body);
        assert!(watch.stalled(), "the frame is still held");
        drop(frame);
        assert!(!watch.stalled(), "nothing of the response is left");
    }
}

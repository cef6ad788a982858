//! The one body type every phase passes along, and the wrapper that observes a body as it
//! streams (bytes counted, access log written once at its end).
//!
//! Nothing here buffers: bodies are polled frame by frame, so backpressure reaches the peer.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed body from anywhere: a client, an upstream, or a small local answer.
pub(crate) type Body = BoxBody<Bytes, BoxError>;

pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub(crate) fn boxed<B>(body: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// Reads a small body whole (a JSON answer to be rewritten, a form), refusing one over
/// `limit` as soon as it is.
pub(crate) async fn read_to_limit(mut body: Body, limit: usize) -> Result<Bytes, String> {
    let mut whole = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() else {
            continue;
        };
        if whole.len() + data.len() > limit {
            return Err(format!("longer than {limit} bytes"));
        }
        whole.extend_from_slice(&data);
    }
    Ok(whole.freeze())
}

/// Called exactly once when an observed body ends, errs, or is dropped unfinished.
pub(crate) trait Finish: Send + Sync + 'static {
    fn finish(self: Box<Self>, bytes: u64, outcome: Outcome);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Complete,
    Failed,
    /// The peer went away before the end.
    Aborted,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Failed => "failed",
            Outcome::Aborted => "aborted",
        }
    }
}

pin_project_lite::pin_project! {
    /// Counts the bytes of an inner body and reports them once, however the body ends.
    pub(crate) struct Observed {
        #[pin]
        inner: Body,
        bytes: u64,
        on_finish: Option<Box<dyn Finish>>,
    }

    impl PinnedDrop for Observed {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(f) = this.on_finish.take() {
                f.finish(*this.bytes, Outcome::Aborted);
            }
        }
    }
}

impl Observed {
    pub(crate) fn new(inner: Body, on_finish: Box<dyn Finish>) -> Observed {
        let mut observed = Observed {
            inner,
            bytes: 0,
            on_finish: Some(on_finish),
        };
        // An empty body may never be polled; report it now.
        if observed.inner.is_end_stream()
            && let Some(f) = observed.on_finish.take()
        {
            f.finish(0, Outcome::Complete);
        }
        observed
    }
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.bytes += data.len() as u64;
                }
                // Bodies of known length are not polled past their last frame.
                if this.inner.is_end_stream()
                    && let Some(f) = this.on_finish.take()
                {
                    f.finish(*this.bytes, Outcome::Complete);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = this.on_finish.take() {
                    f.finish(*this.bytes, Outcome::Failed);
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = this.on_finish.take() {
                    f.finish(*this.bytes, Outcome::Complete);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Record(Arc<Mutex<Vec<(u64, Outcome)>>>);
    impl Finish for Record {
        fn finish(self: Box<Self>, bytes: u64, outcome: Outcome) {
            self.0.lock().unwrap().push((bytes, outcome));
        }
    }

    #[tokio::test]
    async fn reports_once_on_completion() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let body = Observed::new(full("hello"), Box::new(Record(log.clone())));
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"hello");
        assert_eq!(*log.lock().unwrap(), vec![(5, Outcome::Complete)]);
    }

    #[tokio::test]
    async fn reports_abort_when_dropped_early() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"def"))),
        ];
        let stream = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let mut body = Observed::new(boxed(stream), Box::new(Record(log.clone())));
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap().len(), 3);
        assert!(log.lock().unwrap().is_empty());
        drop(body);
        assert_eq!(*log.lock().unwrap(), vec![(3, Outcome::Aborted)]);
    }

    #[tokio::test]
    async fn small_bodies_are_read_whole_and_large_ones_refused() {
        assert_eq!(
            &read_to_limit(full("12345"), 5).await.unwrap()[..],
            b"12345"
        );
        assert!(read_to_limit(full("123456"), 5).await.is_err());
        assert!(read_to_limit(empty(), 0).await.unwrap().is_empty());
    }

    #[test]
    fn empty_body_reports_immediately() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let _body = Observed::new(empty(), Box::new(Record(log.clone())));
        assert_eq!(*log.lock().unwrap(), vec![(0, Outcome::Complete)]);
    }
}

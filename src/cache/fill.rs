//! Streaming objects between the upstream, the disk and clients.
//!
//! A **fill** writes one upstream body to a temp file while hashing it, and commits it to the
//! store only if size and digest match. Fills are single-flight: concurrent requests for the
//! object attach to the one in progress and stream from the temp file as bytes arrive. The
//! fill runs in its own task, so it outlives a client that disconnects.
//!
//! A **reader** streams a committed object or a fill to one client through a small bounded
//! channel (backpressure: it reads the next chunk only when the client took the last). A
//! reader never sends an object's last chunk before its digest is known to match, so a
//! client of a bad fill, or of a file corrupted on disk, sees a broken transfer, never a
//! complete wrong one.
//!
//! Must not decide what may be served to whom: that is the cache stage's job.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use super::store::{Reader, Store};
use crate::body::{Body, BoxError};

/// Bytes per disk read and per batched disk write.
const CHUNK: usize = 256 << 10;
/// An upstream body that sends nothing for this long fails the fill.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The leader is still waiting for the upstream's answer.
    Starting,
    /// The upstream said 200 with this length; this many bytes are on disk.
    Writing { size: u64, written: u64 },
    /// Verified and committed.
    Done { size: u64 },
    /// Upstream error, timeout, wrong length or wrong digest: nothing was kept.
    Failed,
    /// The upstream did not answer 200: there is nothing to attach to.
    Abandoned,
}

pub struct Fill {
    temp: PathBuf,
    progress: watch::Receiver<Progress>,
}

impl Fill {
    /// Waits until the upstream has answered: `Some(size)` when bytes are coming.
    pub async fn size(&self) -> Option<u64> {
        let mut rx = self.progress.clone();
        loop {
            match *rx.borrow_and_update() {
                Progress::Starting => {}
                Progress::Writing { size, .. } | Progress::Done { size } => return Some(size),
                Progress::Failed | Progress::Abandoned => return None,
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Waits for the end: whether the object was committed.
    pub async fn finished(&self) -> bool {
        let mut rx = self.progress.clone();
        loop {
            match *rx.borrow_and_update() {
                Progress::Done { .. } => return true,
                Progress::Failed | Progress::Abandoned => return false,
                Progress::Starting | Progress::Writing { .. } => {}
            }
            if rx.changed().await.is_err() {
                return false;
            }
        }
    }
}

/// The fill this request must make: dropping it before [`FillWriter::start`] abandons it.
pub struct FillWriter {
    fills: Arc<Fills>,
    digest: String,
    file: Option<tokio::fs::File>,
    temp: PathBuf,
    tx: Option<watch::Sender<Progress>>,
}

impl Drop for FillWriter {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            self.fills.forget(&self.digest);
            let _ = std::fs::remove_file(&self.temp);
            let _ = tx.send(Progress::Abandoned);
        }
    }
}

pub enum Join {
    /// Nobody is fetching it: this request does.
    Leader(FillWriter),
    /// A fill is in progress: stream from it.
    Follower(Arc<Fill>),
}

pub struct Fills {
    store: Arc<Store>,
    inflight: Mutex<HashMap<String, Arc<Fill>>>,
}

impl Fills {
    pub fn new(store: Arc<Store>) -> Arc<Fills> {
        Arc::new(Fills {
            store,
            inflight: Mutex::new(HashMap::new()),
        })
    }

    /// Attaches to the fill of `digest`, or reserves it for this request.
    pub fn join(self: &Arc<Self>, digest: &str) -> std::io::Result<Join> {
        let mut inflight = self
            .inflight
            .lock()
            .map_err(|_| std::io::Error::other("fills poisoned"))?;
        if let Some(fill) = inflight.get(digest) {
            return Ok(Join::Follower(fill.clone()));
        }
        let temp = self.store.temp_path();
        let file = std::fs::File::create(&temp)?;
        let (tx, rx) = watch::channel(Progress::Starting);
        inflight.insert(
            digest.to_string(),
            Arc::new(Fill {
                temp: temp.clone(),
                progress: rx,
            }),
        );
        Ok(Join::Leader(FillWriter {
            fills: self.clone(),
            digest: digest.to_string(),
            file: Some(tokio::fs::File::from_std(file)),
            temp,
            tx: Some(tx),
        }))
    }

    fn forget(&self, digest: &str) {
        if let Ok(mut inflight) = self.inflight.lock() {
            inflight.remove(digest);
        }
    }

    /// Ends a fill: commits a verified object (under the lock, so that a request either
    /// attaches to the fill or finds the object), or throws the temp file away.
    fn finish(&self, digest: &str, temp: &PathBuf, size: u64, verified: bool) -> bool {
        let Ok(mut inflight) = self.inflight.lock() else {
            return false;
        };
        let committed = verified
            && match self.store.commit(temp, digest, size) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "cannot commit a cache fill");
                    false
                }
            };
        if !committed {
            let _ = std::fs::remove_file(temp);
        }
        inflight.remove(digest);
        committed
    }

    /// A reader of the fill of `digest` (opened now, so a commit's rename cannot race it).
    pub fn reader(&self, fill: &Arc<Fill>, size: u64, head: bool) -> Option<Body> {
        let _inflight = self.inflight.lock().ok()?;
        let file = std::fs::File::open(&fill.temp).ok()?;
        Some(stream(
            Handle::Fill(file),
            0,
            size,
            Source::Fill(fill.progress.clone()),
            head,
        ))
    }
}

impl FillWriter {
    /// Starts writing `body` (`size` bytes that must hash to the digest) in its own task, and
    /// returns the fill for readers to stream from.
    pub fn start(mut self, body: Incoming, size: u64) -> Option<Arc<Fill>> {
        let tx = self.tx.take()?;
        let file = self.file.take()?;
        let fill = self
            .fills
            .inflight
            .lock()
            .ok()?
            .get(&self.digest)
            .cloned()?;
        let _ = tx.send(Progress::Writing { size, written: 0 });
        let fills = self.fills.clone();
        let digest = self.digest.clone();
        let temp = self.temp.clone();
        tokio::spawn(async move {
            let outcome = write(file, body, size, &tx).await;
            let verified = match &outcome {
                Ok(hex) => {
                    let ok = digest.strip_prefix("sha256:") == Some(hex.as_str());
                    if !ok {
                        tracing::warn!(%digest, got = %format!("sha256:{hex}"), "upstream sent bytes that do not match the digest: nothing cached");
                        crate::metrics::cache_rejected("digest_mismatch");
                    }
                    ok
                }
                Err(reason) => {
                    tracing::warn!(%digest, %reason, "cache fill failed: nothing cached");
                    crate::metrics::cache_rejected("fill_failed");
                    false
                }
            };
            let committed = fills.finish(&digest, &temp, size, verified);
            let _ = tx.send(if committed {
                Progress::Done { size }
            } else {
                Progress::Failed
            });
        });
        Some(fill)
    }
}

/// Writes the upstream body to disk in batches, publishing progress after each flush (only
/// then can other file descriptors see the bytes). The hex SHA-256 of exactly `size` bytes.
async fn write(
    mut file: tokio::fs::File,
    mut body: Incoming,
    size: u64,
    tx: &watch::Sender<Progress>,
) -> Result<String, String> {
    let mut hasher = Sha256::new();
    let mut batch: Vec<u8> = Vec::with_capacity(CHUNK);
    let mut written = 0u64;
    loop {
        let frame = tokio::time::timeout(IDLE_TIMEOUT, body.frame())
            .await
            .map_err(|_| format!("the upstream sent nothing for {IDLE_TIMEOUT:?}"))?;
        let data = match frame {
            None => None,
            Some(Err(e)) => return Err(format!("upstream body: {e}")),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => Some(d),
                Err(_) => continue, // trailers
            },
        };
        let ended = data.is_none();
        if let Some(d) = &data {
            hasher.update(d);
            batch.extend_from_slice(d);
            crate::metrics::cache_bytes("upstream", d.len() as u64);
        }
        if written + batch.len() as u64 > size {
            return Err(format!("the upstream sent more than its {size} bytes"));
        }
        if batch.len() >= CHUNK || (ended && !batch.is_empty()) {
            file.write_all(&batch)
                .await
                .map_err(|e| format!("disk: {e}"))?;
            file.flush().await.map_err(|e| format!("disk: {e}"))?;
            written += batch.len() as u64;
            batch.clear();
            let _ = tx.send(Progress::Writing { size, written });
        }
        if ended {
            break;
        }
    }
    if written != size {
        return Err(format!("the upstream sent {written} of {size} bytes"));
    }
    Ok(hex::encode(hasher.finalize()))
}

/// What a reader streams from.
enum Source {
    /// A committed object; `Some` when its digest must be checked on this read.
    Committed(Option<Verify>),
    /// A fill in progress.
    Fill(watch::Receiver<Progress>),
}

struct Verify {
    store: Arc<Store>,
    digest: String,
    hasher: Sha256,
}

/// Streams `[start, end)` of a committed object. A full read of an object not yet verified
/// by this process checks its digest before the last chunk goes out.
pub fn object(
    store: &Arc<Store>,
    digest: &str,
    reader: Reader,
    range: Option<(u64, u64)>,
    head: bool,
) -> Body {
    let (start, end) = range.unwrap_or((0, reader.size));
    let verify = (!reader.verified && range.is_none()).then(|| Verify {
        store: store.clone(),
        digest: digest.to_string(),
        hasher: Sha256::new(),
    });
    stream(
        Handle::Object(reader),
        start,
        end,
        Source::Committed(verify),
        head,
    )
}

/// An open file to read from; an object's read guard lives as long as its handle.
enum Handle {
    Object(Reader),
    Fill(std::fs::File),
}

impl Handle {
    fn file(&self) -> &std::fs::File {
        match self {
            Handle::Object(r) => &r.file,
            Handle::Fill(f) => f,
        }
    }
}

fn stream(handle: Handle, start: u64, end: u64, source: Source, head: bool) -> Body {
    if head || start >= end {
        return crate::body::empty();
    }
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(pump(Arc::new(handle), start, end, source, tx));
    crate::body::boxed(ChannelBody {
        rx,
        remaining: end - start,
    })
}

type Chunk = Result<Bytes, BoxError>;

async fn pump(
    handle: Arc<Handle>,
    start: u64,
    end: u64,
    mut source: Source,
    tx: mpsc::Sender<Chunk>,
) {
    let mut pos = start;
    while pos < end {
        // How far this reader may go now; the last byte only once the object is verified.
        let limit = match &mut source {
            Source::Committed(_) => end,
            Source::Fill(rx) => match current(rx) {
                Progress::Done { .. } => end,
                Progress::Writing { written, .. } => written.min(end - 1),
                Progress::Starting => start,
                Progress::Failed | Progress::Abandoned => {
                    let _ = tx.send(Err("the upstream transfer failed".into())).await;
                    return;
                }
            },
        };
        if pos >= limit {
            if let Source::Fill(rx) = &mut source
                && rx.changed().await.is_err()
            {
                let _ = tx.send(Err("the cache fill went away".into())).await;
                return;
            }
            continue;
        }
        let len = (limit - pos).min(CHUNK as u64) as usize;
        let h = handle.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            let mut filled = 0;
            while filled < len {
                match h.file().read_at(&mut buf[filled..], pos + filled as u64)? {
                    0 => break,
                    n => filled += n,
                }
            }
            buf.truncate(filled);
            Ok::<_, std::io::Error>(buf)
        })
        .await;
        let chunk = match read {
            Ok(Ok(buf)) if !buf.is_empty() => Bytes::from(buf),
            Ok(Ok(_)) => {
                let _ = tx
                    .send(Err("the cached file is shorter than its size".into()))
                    .await;
                fail_verify(&source);
                return;
            }
            Ok(Err(e)) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        pos += chunk.len() as u64;
        if let Source::Committed(Some(v)) = &mut source {
            v.hasher.update(&chunk);
            if pos == end {
                let hex = hex::encode(std::mem::take(&mut v.hasher).finalize());
                if v.digest.strip_prefix("sha256:") == Some(hex.as_str()) {
                    v.store.mark_verified(&v.digest);
                } else {
                    fail_verify(&source);
                    let _ = tx
                        .send(Err("the cached file does not match its digest".into()))
                        .await;
                    return;
                }
            }
        }
        if matches!(source, Source::Committed(_)) {
            crate::metrics::cache_bytes("cache", chunk.len() as u64);
        }
        if tx.send(Ok(chunk)).await.is_err() {
            return; // the client went away
        }
    }
}

/// The latest progress, copied out so no lock is held across an await.
fn current(rx: &mut watch::Receiver<Progress>) -> Progress {
    *rx.borrow_and_update()
}

/// A file found corrupt is dropped, so the next request fetches it again.
fn fail_verify(source: &Source) {
    if let Source::Committed(Some(v)) = source {
        tracing::warn!(digest = %v.digest, "cached file is corrupt or truncated: dropped");
        crate::metrics::cache_rejected("corrupt");
        v.store.remove(&v.digest);
    }
}

/// A body fed by a reader task; ends when the task has sent `remaining` bytes.
struct ChannelBody {
    rx: mpsc::Receiver<Chunk>,
    remaining: u64,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                self.remaining = self.remaining.saturating_sub(chunk.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(Some(Err("the cache reader stopped early".into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

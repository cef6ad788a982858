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
//! Must not decide what may be served to whom: that is the cache phase's job ([`super::Cache::serve`]).

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use super::store::{ObjectPin, Reader, Store};
use crate::body::{Body, BoxError};

/// Bytes per disk read and per batched disk write of a fill.
const CHUNK: usize = 256 << 10;
/// Bytes per frame of a committed object (slices of its mapping: no copy).
const MAPPED_CHUNK: usize = 2 << 20;
/// An upstream body that sends nothing for this long fails the fill.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Progress {
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

pub(crate) struct Fill {
    temp: PathBuf,
    progress: watch::Receiver<Progress>,
    /// Set when bytes start coming: held by the fill's readers and its writer, and handed to
    /// the committed object, so it is not evicted under a slow reader.
    pin: std::sync::OnceLock<Arc<ObjectPin>>,
}

impl Fill {
    /// Waits until the upstream has answered: `Some(size)` when bytes are coming.
    pub(crate) async fn size(&self) -> Option<u64> {
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
}

/// The fill this request must make: dropping it before [`FillWriter::start`] abandons it.
pub(crate) struct FillWriter {
    fills: Arc<Fills>,
    digest: String,
    file: Option<tokio::fs::File>,
    temp: PathBuf,
    tx: Option<watch::Sender<Progress>>,
    /// Disk space reserved for this fill under `tmp/`.
    reserved: u64,
}

impl Drop for FillWriter {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            self.fills.forget(&self.digest);
            self.fills.release(self.reserved);
            let _ = std::fs::remove_file(&self.temp);
            let _ = tx.send(Progress::Abandoned);
        }
    }
}

pub(crate) enum Join {
    /// Nobody is fetching it: this request does.
    Leader(FillWriter),
    /// A fill is in progress: stream from it.
    Follower(Arc<Fill>),
    /// Committed since the caller last looked: read it from the store.
    Stored,
}

pub(crate) struct Fills {
    store: Arc<Store>,
    inflight: Mutex<HashMap<String, Arc<Fill>>>,
    /// Bytes that fills in progress will write. With the committed objects and the unlinked
    /// ones still open, at most `max_size`: disk use never exceeds it (clients that start
    /// fills and go away included); what does not fit is passed through.
    reserved: Mutex<u64>,
}

impl Fills {
    pub(crate) fn new(store: Arc<Store>) -> Arc<Fills> {
        Arc::new(Fills {
            store,
            inflight: Mutex::new(HashMap::new()),
            reserved: Mutex::new(0),
        })
    }

    /// Reserves room for `size` bytes of fills in progress, evicting what nobody reads to
    /// make it; `false` when it does not fit.
    fn reserve(&self, size: u64) -> bool {
        let mut reserved = self.reserved.lock();
        let fits = self.store.make_room(*reserved + size);
        if fits {
            *reserved += size;
        }
        fits
    }

    fn release(&self, size: u64) {
        let mut reserved = self.reserved.lock();
        *reserved = reserved.saturating_sub(size);
    }

    /// Attaches to the fill of `digest`, or reserves it for this request (which then
    /// creates its file: [`FillWriter::create`]).
    pub(crate) fn join(self: &Arc<Self>, digest: &str) -> Join {
        let mut inflight = self.inflight.lock();
        if let Some(fill) = inflight.get(digest) {
            return Join::Follower(fill.clone());
        }
        // Commits happen under this lock: looking again here closes the window in which a
        // request missed just before a commit and would fetch the object a second time.
        if self.store.contains(digest) {
            return Join::Stored;
        }
        let temp = self.store.temp_path();
        let (tx, rx) = watch::channel(Progress::Starting);
        inflight.insert(
            digest.to_string(),
            Arc::new(Fill {
                temp: temp.clone(),
                progress: rx,
                pin: std::sync::OnceLock::new(),
            }),
        );
        Join::Leader(FillWriter {
            fills: self.clone(),
            digest: digest.to_string(),
            file: None,
            temp,
            tx: Some(tx),
            reserved: 0,
        })
    }

    fn forget(&self, digest: &str) {
        self.inflight.lock().remove(digest);
    }

    /// Ends a fill: commits a verified object (under the lock, so that a request either
    /// attaches to the fill or finds the object), or throws the temp file away.
    fn finish(&self, digest: &str, fill: &Fill, size: u64, verified: bool) -> bool {
        let temp = &fill.temp;
        let mut inflight = self.inflight.lock();
        let committed = verified
            && match self.store.commit(temp, digest, size, fill.pin.get()) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "cannot commit a cache fill");
                    false
                }
            };
        if !committed {
            self.store.discard(temp, fill.pin.get().map(|p| &**p));
        }
        inflight.remove(digest);
        drop(inflight);
        if committed {
            self.store.evict();
        }
        committed
    }

    /// A reader of the fill (its file opened under the lock, so a commit's rename cannot
    /// race it); `None` once the fill has ended and its file has moved.
    pub(crate) fn reader(&self, fill: &Arc<Fill>, size: u64) -> Option<Body> {
        let _inflight = self.inflight.lock();
        let file = std::fs::File::open(&fill.temp).ok()?;
        Some(stream(
            file,
            size,
            fill.progress.clone(),
            fill.pin.get().cloned(),
        ))
    }
}

impl FillWriter {
    /// Creates the fill's file, off the async workers and outside the fills' lock. Followers
    /// open it only once writing has started.
    pub(crate) async fn create(&mut self) -> std::io::Result<()> {
        self.file = Some(tokio::fs::File::create(&self.temp).await?);
        Ok(())
    }

    /// Reserves disk room for `size` bytes; without it the object is not worth a fill now
    /// (the caller passes the upstream's answer through instead).
    pub(crate) fn reserve(&mut self, size: u64) -> bool {
        let ok = self.fills.reserve(size);
        if ok {
            self.reserved += size;
        }
        ok
    }

    /// Starts writing `body` (`size` bytes that must hash to the digest) in its own task, and
    /// returns the fill and this request's reader of it, opened before the writing starts
    /// (a small object could otherwise be committed and moved before the reader opens it).
    pub(crate) fn start(mut self, body: Body, size: u64) -> Option<(Arc<Fill>, Body)> {
        // Looked up first: on failure, dropping `self` abandons the fill cleanly.
        let fill = self.fills.inflight.lock().get(&self.digest).cloned()?;
        let reader = std::fs::File::open(&self.temp).ok()?;
        let _ = fill.pin.set(self.fills.store.pin(size));
        let tx = self.tx.take()?;
        let file = self.file.take()?;
        let _ = tx.send(Progress::Writing { size, written: 0 });
        let fills = self.fills.clone();
        let digest = self.digest.clone();
        let reserved = std::mem::take(&mut self.reserved);
        let writing = fill.clone();
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
            let committed = fills.finish(&digest, &writing, size, verified);
            fills.release(reserved);
            let _ = tx.send(if committed {
                Progress::Done { size }
            } else {
                Progress::Failed
            });
        });
        let body = stream(reader, size, fill.progress.clone(), fill.pin.get().cloned());
        Some((fill, body))
    }
}

/// Writes the upstream body to disk in batches, publishing progress after each flush (only
/// then can other file descriptors see the bytes). The hex SHA-256 of exactly `size` bytes.
async fn write(
    mut file: tokio::fs::File,
    mut body: Body,
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

struct Verify {
    store: Arc<Store>,
    digest: String,
    hasher: Sha256,
}

/// Streams `[start, end)` of a committed object from a read-only mapping of its file, so
/// the bytes go from the page cache to the socket with one copy (as `sendfile` would) and
/// memory use is the kernel's cache, not ours. A full read of an object this process has
/// not yet verified checks its digest before the last chunk goes out.
pub(crate) fn object(
    store: &Arc<Store>,
    digest: &str,
    reader: Reader,
    range: Option<(u64, u64)>,
    read: super::Read,
) -> std::io::Result<Body> {
    let (start, end) = range.unwrap_or((0, reader.size));
    if read == super::Read::Head || start >= end {
        return Ok(crate::body::empty());
    }
    // SAFETY: objects are immutable: written under tmp/, renamed in once verified, never
    // written again, and only ever unlinked (which keeps a mapping valid). The mapping is
    // read-only and lives no longer than the `Reader` kept beside it.
    let map = unsafe { memmap2::Mmap::map(&reader.file) }?;
    let verified = reader.verified;
    let _ = map.advise(memmap2::Advice::Sequential);
    let mapped = Arc::new(Mapping {
        map,
        _reader: reader,
    });
    let verify = (!verified && range.is_none()).then(|| Verify {
        store: store.clone(),
        digest: digest.to_string(),
        hasher: Sha256::new(),
    });
    Ok(crate::body::boxed(MappedBody {
        data: Bytes::from_owner(SharedMap(mapped.clone())),
        map: mapped,
        pos: start as usize,
        end: end as usize,
        verify,
    }))
}

/// An object's mapping with its `Reader`: whoever holds a slice of the mapping (the body, or
/// a frame a connection has not sent yet) keeps the object pinned, so that its blocks are
/// never both allocated and uncounted.
struct Mapping {
    map: memmap2::Mmap,
    _reader: Reader,
}

/// A mapping that frames (`Bytes` slices) and the body can both hold.
struct SharedMap(Arc<Mapping>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        &self.0.map
    }
}

/// A committed object's bytes, handed out in slices of its mapping.
struct MappedBody {
    data: Bytes,
    map: Arc<Mapping>,
    pos: usize,
    end: usize,
    verify: Option<Verify>,
}

impl http_body::Body for MappedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.pos >= self.end {
            return Poll::Ready(None);
        }
        let next = (self.pos + MAPPED_CHUNK).min(self.end);
        let chunk = self.data.slice(self.pos..next);
        self.pos = next;
        // Start reading the chunk after this one from disk now, so that the socket write of
        // the next frame rarely waits for a page fault on a cold object.
        if next < self.end {
            let ahead = MAPPED_CHUNK.min(self.end - next);
            let _ = self
                .map
                .map
                .advise_range(memmap2::Advice::WillNeed, next, ahead);
        }
        let at_end = next == self.end;
        if let Some(v) = self.verify.as_mut() {
            v.hasher.update(&chunk);
            if at_end {
                let hex = hex::encode(std::mem::take(&mut v.hasher).finalize());
                if v.digest.strip_prefix("sha256:") != Some(hex.as_str()) {
                    tracing::warn!(digest = %v.digest, "cached file is corrupt or truncated: dropped");
                    crate::metrics::cache_rejected("corrupt");
                    v.store.remove(&v.digest);
                    return Poll::Ready(Some(Err(
                        "the cached file does not match its digest".into()
                    )));
                }
                v.store.mark_verified(&v.digest);
            }
        }
        crate::metrics::cache_bytes("cache", chunk.len() as u64);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact((self.end - self.pos) as u64)
    }
}

/// Streams a fill to one client as bytes reach the disk; `pin` is held while it does.
fn stream(
    file: std::fs::File,
    size: u64,
    progress: watch::Receiver<Progress>,
    pin: Option<Arc<ObjectPin>>,
) -> Body {
    if size == 0 {
        return crate::body::empty();
    }
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        pump(Arc::new(file), size, progress, tx).await;
        drop(pin);
    });
    crate::body::boxed(ChannelBody {
        rx,
        remaining: size,
    })
}

type Chunk = Result<Bytes, BoxError>;

async fn pump(
    file: Arc<std::fs::File>,
    size: u64,
    mut progress: watch::Receiver<Progress>,
    tx: mpsc::Sender<Chunk>,
) {
    let mut pos = 0;
    while pos < size {
        // How far this reader may go now: the last byte only once the fill is verified.
        let limit = match current(&mut progress) {
            Progress::Done { .. } => size,
            Progress::Writing { written, .. } => written.min(size - 1),
            Progress::Starting => 0,
            Progress::Failed | Progress::Abandoned => {
                let _ = tx.send(Err("the upstream transfer failed".into())).await;
                return;
            }
        };
        if pos >= limit {
            if progress.changed().await.is_err() {
                let _ = tx.send(Err("the cache fill went away".into())).await;
                return;
            }
            continue;
        }
        let len = (limit - pos).min(CHUNK as u64) as usize;
        let f = file.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, pos)?;
            Ok::<_, std::io::Error>(buf)
        })
        .await;
        let chunk = match read {
            Ok(Ok(buf)) => Bytes::from(buf),
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
        if tx.send(Ok(chunk)).await.is_err() {
            return; // the client went away
        }
    }
}

/// The latest progress, copied out so no lock is held across an await.
fn current(rx: &mut watch::Receiver<Progress>) -> Progress {
    *rx.borrow_and_update()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fills_in_progress_reserve_at_most_max_size() {
        let dir = tempfile::tempdir().unwrap();
        let fills =
            Fills::new(Store::open(dir.path(), 100, crate::cache::Ownership::Owner).unwrap());
        let Join::Leader(mut a) = fills.join("sha256:aa") else {
            panic!("the first request leads");
        };
        assert!(matches!(fills.join("sha256:aa"), Join::Follower(_)));
        a.create().await.unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            1
        );
        assert!(a.reserve(60));
        let Join::Leader(mut b) = fills.join("sha256:bb") else {
            panic!("another digest, another leader");
        };
        assert!(!b.reserve(41), "60 + 41 bytes of fills exceed max_size");
        assert!(b.reserve(40));
        // An abandoned fill gives its room and its temp file back.
        drop(a);
        drop(b);
        assert!(fills.reserve(100));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert!(matches!(fills.join("sha256:aa"), Join::Leader(_)));
    }
}

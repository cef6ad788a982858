//! The content-addressed store on disk: one file per digest under `objects/`, written under
//! `tmp/` and renamed in only once verified, an in-memory index (size, last access, who has
//! it open, whether this process has verified it) rebuilt from the directory at start, and
//! LRU eviction down to `max_size`.
//!
//! Everyone with an object's file open holds its [`ObjectPin`]: a pinned object is never
//! evicted, and one unlinked anyway (a corrupt file, a replaced one) still counts against
//! `max_size` until its last holder lets go, since its blocks stay on disk until then.
//!
//! Holds bytes by digest and nothing else: it must not know about repositories, tags or
//! upstreams.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use super::Ownership;

/// How stale a file's modification time (our record of its last access) may get before a
/// hit refreshes it: often enough for LRU across restarts, rarely enough to cost nothing.
const TOUCH_AFTER: Duration = Duration::from_secs(60);

/// What [`Store::note_access`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Recorded,
    FileStale,
}

#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub digest: String,
    pub size: u64,
    pub last_access: SystemTime,
}

struct Entry {
    size: u64,
    last_access: SystemTime,
    /// When the file was last opened (and its time set): accesses without opening it (see
    /// [`Store::note_access`]) open it again after [`TOUCH_AFTER`].
    file_seen: SystemTime,
    /// Alive while anyone has the file open.
    pin: Weak<ObjectPin>,
    /// Hashed by this process (filled here, or read through once since the start).
    verified: bool,
}

impl Entry {
    fn pinned(&self) -> bool {
        self.pin.strong_count() > 0
    }
}

/// Held by everyone who has an object's file open: readers, mappings, the readers and the
/// writer of the fill that becomes it.
pub(crate) struct ObjectPin {
    size: u64,
    /// Its file was unlinked while it was open: its bytes are counted in `held`.
    unlinked: AtomicBool,
    store: Weak<Store>,
}

impl ObjectPin {
    /// Its file is gone from the directory but still open.
    fn unlink(&self, store: &Store) {
        if !self.unlinked.swap(true, Ordering::AcqRel) {
            store.held.fetch_add(self.size, Ordering::AcqRel);
        }
    }
}

impl Drop for ObjectPin {
    fn drop(&mut self) {
        let Some(store) = self.store.upgrade() else {
            return;
        };
        if *self.unlinked.get_mut() {
            store.held.fetch_sub(self.size, Ordering::AcqRel);
        }
        // A released object may be what eviction was waiting for.
        if store.over() {
            store.evict_in_background();
        }
    }
}

#[derive(Default)]
struct Index {
    entries: HashMap<String, Entry>,
    total: u64,
}

pub struct Store {
    root: PathBuf,
    max_size: u64,
    index: Mutex<Index>,
    /// Bytes of unlinked files still open (see [`ObjectPin`]).
    held: AtomicU64,
    temp_seq: AtomicU64,
    /// Only the server evicts: a CLI command must not delete what it merely looks at.
    owner: bool,
}

/// An object opened for reading; it cannot be evicted while this lives.
pub(crate) struct Reader {
    pub(crate) file: std::fs::File,
    pub(crate) size: u64,
    /// False after a restart until one full read has checked the digest.
    pub(crate) verified: bool,
    _pin: Arc<ObjectPin>,
}

impl Store {
    /// Opens (creating) the store at `root` and indexes `objects/` from file sizes and
    /// modification times. The `owner` (the server) also removes fills a crash left in
    /// `tmp/`; the CLI must not, as a running server may be writing there.
    pub(crate) fn open(
        root: &Path,
        max_size: u64,
        ownership: Ownership,
    ) -> std::io::Result<Arc<Store>> {
        let owner = ownership == Ownership::Owner;
        let tmp = root.join("tmp");
        if owner && tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        std::fs::create_dir_all(root.join("objects"))?;
        let mut index = Index::default();
        // Anything that is not `objects/<alg>/<fan>/<hex>` of a valid digest is skipped.
        let dirs = |p: &Path| -> Vec<std::fs::DirEntry> {
            std::fs::read_dir(p)
                .map(|d| d.flatten().collect())
                .unwrap_or_default()
        };
        for algorithm in dirs(&root.join("objects")) {
            let alg = algorithm.file_name().to_string_lossy().into_owned();
            for fan in dirs(&algorithm.path()) {
                for file in dirs(&fan.path()) {
                    let hex = file.file_name().to_string_lossy().into_owned();
                    let digest = format!("{alg}:{hex}");
                    let Ok(meta) = file.metadata() else { continue };
                    if !meta.is_file() || crate::oci::path::validate_digest(&digest).is_err() {
                        continue;
                    }
                    index.total += meta.len();
                    index.entries.insert(
                        digest,
                        Entry {
                            size: meta.len(),
                            last_access: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                            file_seen: SystemTime::UNIX_EPOCH,
                            pin: Weak::new(),
                            verified: false,
                        },
                    );
                }
            }
        }
        let store = Arc::new(Store {
            root: root.to_path_buf(),
            max_size,
            index: Mutex::new(index),
            held: AtomicU64::new(0),
            temp_seq: AtomicU64::new(0),
            owner,
        });
        store.evict();
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    /// A pin for an object of `size` bytes about to be written (a fill): its readers hold it,
    /// and [`Store::commit`] hands it to the committed object.
    pub(crate) fn pin(self: &Arc<Self>, size: u64) -> Arc<ObjectPin> {
        Arc::new(ObjectPin {
            size,
            unlinked: AtomicBool::new(false),
            store: Arc::downgrade(self),
        })
    }

    /// A fill's file is thrown away: its readers may still hold it open, so its bytes count
    /// as held until they let go.
    pub(crate) fn discard(&self, temp: &Path, pin: Option<&ObjectPin>) {
        if let Some(pin) = pin {
            pin.unlink(self);
        }
        let _ = std::fs::remove_file(temp);
    }

    /// Bytes on disk that count against `max_size`: committed objects and unlinked ones
    /// still open.
    pub(crate) fn used(&self) -> u64 {
        self.total() + self.held.load(Ordering::Acquire)
    }

    fn over(&self) -> bool {
        self.used() > self.max_size
    }

    /// Evicts until `extra` more bytes (fills about to be written) fit beside what is used;
    /// whether they do. Only the owner evicts: for others, only `extra` itself must fit.
    pub(crate) fn make_room(&self, extra: u64) -> bool {
        if !self.owner {
            return extra <= self.max_size;
        }
        self.evict_to(self.max_size.saturating_sub(extra));
        self.used() + extra <= self.max_size
    }

    fn object_path(&self, digest: &str) -> Option<PathBuf> {
        let (alg, hex) = digest.split_once(':')?;
        let fan = hex.get(..2)?;
        Some(self.root.join("objects").join(alg).join(fan).join(hex))
    }

    /// A fresh path under `tmp/` for a fill.
    pub(crate) fn temp_path(&self) -> PathBuf {
        let n = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()))
    }

    pub(crate) fn contains(&self, digest: &str) -> bool {
        self.index.lock().entries.contains_key(digest)
    }

    /// Records an access to `digest` without opening its file (a manifest served from
    /// memory). `None` when it is not cached; [`Access::FileStale`] when the file was last
    /// opened over [`TOUCH_AFTER`] ago: then open it instead, which refreshes its time (the
    /// record of the access across restarts) and finds a file removed behind our back.
    pub(crate) fn note_access(&self, digest: &str) -> Option<Access> {
        let mut index = self.index.lock();
        let entry = index.entries.get_mut(digest)?;
        let now = SystemTime::now();
        if now
            .duration_since(entry.file_seen)
            .is_ok_and(|d| d > TOUCH_AFTER)
        {
            return Some(Access::FileStale);
        }
        entry.last_access = now;
        Some(Access::Recorded)
    }

    /// Opens an object for reading and records the access. `None` when it is not cached (or
    /// its file went away, say by `ocigate cache prune` on a running server).
    pub(crate) fn open_object(self: &Arc<Self>, digest: &str) -> Option<Reader> {
        let path = self.object_path(digest)?;
        let mut index = self.index.lock();
        let entry = index.entries.get_mut(digest)?;
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(_) => {
                let size = entry.size;
                index.entries.remove(digest);
                index.total -= size;
                return None;
            }
        };
        let now = SystemTime::now();
        if now
            .duration_since(entry.file_seen)
            .is_ok_and(|d| d > TOUCH_AFTER)
        {
            let _ = file.set_modified(now);
            entry.file_seen = now;
        }
        entry.last_access = now;
        let pin = match entry.pin.upgrade() {
            Some(pin) => pin,
            None => {
                let pin = self.pin(entry.size);
                entry.pin = Arc::downgrade(&pin);
                pin
            }
        };
        Some(Reader {
            file,
            size: entry.size,
            verified: entry.verified,
            _pin: pin,
        })
    }

    /// Eviction unlinks files, which can take a while for large ones: not on a request's
    /// thread when there is a runtime to hand it to.
    pub(crate) fn evict_in_background(self: &Arc<Self>) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let store = self.clone();
                rt.spawn_blocking(move || store.evict());
            }
            Err(_) => self.evict(),
        }
    }

    /// Moves a verified fill into place (the caller then evicts, outside its own locks). An
    /// object larger than the whole cache is not kept. `pin` is the fill's: whoever reads the
    /// fill holds the committed object too.
    pub(crate) fn commit(
        &self,
        temp: &Path,
        digest: &str,
        size: u64,
        pin: Option<&Arc<ObjectPin>>,
    ) -> std::io::Result<()> {
        let path = self
            .object_path(digest)
            .ok_or_else(|| std::io::Error::other("not a digest"))?;
        if size > self.max_size {
            return std::fs::remove_file(temp);
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(temp, &path)?;
        {
            let mut index = self.index.lock();
            let old = index.entries.remove(digest);
            // Readers of the file this one replaced still hold it open.
            if let Some(old_pin) = old.as_ref().and_then(|e| e.pin.upgrade()) {
                old_pin.unlink(self);
            }
            index.total = index.total - old.map_or(0, |e| e.size) + size;
            index.entries.insert(
                digest.to_string(),
                Entry {
                    size,
                    last_access: SystemTime::now(),
                    file_seen: SystemTime::now(),
                    pin: pin.map_or_else(Weak::new, Arc::downgrade),
                    verified: true,
                },
            );
        }
        Ok(())
    }

    pub(crate) fn mark_verified(&self, digest: &str) {
        let mut index = self.index.lock();
        if let Some(e) = index.entries.get_mut(digest) {
            e.verified = true;
        }
    }

    /// Drops an object whose bytes turned out wrong. Readers that still have it open keep
    /// their file descriptor; the next request fetches it again.
    pub fn remove(&self, digest: &str) {
        let mut index = self.index.lock();
        if let Some(e) = index.entries.remove(digest) {
            index.total -= e.size;
            if let Some(pin) = e.pin.upgrade() {
                pin.unlink(self);
            }
        }
        if let Some(path) = self.object_path(digest) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Evicts least recently used objects that nobody has open until what is used fits.
    pub(crate) fn evict(&self) {
        self.evict_to(self.max_size);
    }

    /// Evicts objects nobody has open and nobody used since `cutoff` (`cache.inactive`).
    pub(crate) fn evict_unused_since(&self, cutoff: SystemTime) {
        self.evict_while(Some(cutoff), |_| true);
    }

    /// Evicts until committed and held bytes are at most `limit`.
    fn evict_to(&self, limit: u64) {
        let held = self.held.load(Ordering::Acquire);
        self.evict_while(None, |total| total + held > limit);
    }

    /// Evicts least recently used objects that nobody has open (and, with `unused_since`,
    /// that nobody used since then) while `over(total)` holds. Files are unlinked under the
    /// index lock, so a commit of the same digest cannot slip in between.
    fn evict_while(&self, unused_since: Option<SystemTime>, over: impl Fn(u64) -> bool) {
        if !self.owner {
            return;
        }
        let mut index = self.index.lock();
        if !over(index.total) {
            return;
        }
        let mut candidates: Vec<(SystemTime, String, u64)> = index
            .entries
            .iter()
            .filter(|(_, e)| !e.pinned())
            .filter(|(_, e)| unused_since.is_none_or(|c| e.last_access < c))
            .map(|(d, e)| (e.last_access, d.clone(), e.size))
            .collect();
        candidates.sort();
        for (_, digest, size) in candidates {
            if !over(index.total) {
                break;
            }
            index.entries.remove(&digest);
            index.total -= size;
            if let Some(path) = self.object_path(&digest) {
                let _ = std::fs::remove_file(path);
            }
            tracing::debug!(%digest, size, "cache eviction");
            crate::metrics::cache_eviction();
        }
    }

    /// Every object, least recently used first.
    pub fn objects(&self) -> Vec<ObjectInfo> {
        let mut all: Vec<ObjectInfo> = self
            .index
            .lock()
            .entries
            .iter()
            .map(|(d, e)| ObjectInfo {
                digest: d.clone(),
                size: e.size,
                last_access: e.last_access,
            })
            .collect();
        all.sort_by(|a, b| (a.last_access, &a.digest).cmp(&(b.last_access, &b.digest)));
        all
    }

    pub fn total(&self) -> u64 {
        self.index.lock().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    fn put(store: &Store, data: &[u8]) -> String {
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)));
        let temp = store.temp_path();
        std::fs::write(&temp, data).unwrap();
        store
            .commit(&temp, &digest, data.len() as u64, None)
            .unwrap();
        store.evict();
        digest
    }

    #[test]
    fn inactive_objects_go_unless_being_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20, Ownership::Owner).unwrap();
        let a = put(&store, b"used long ago");
        let b = put(&store, b"also");
        store.evict_unused_since(SystemTime::UNIX_EPOCH);
        assert!(
            store.contains(&a) && store.contains(&b),
            "used since the cutoff: kept"
        );
        let reading = store.open_object(&a).unwrap();
        store.evict_unused_since(SystemTime::now() + Duration::from_secs(1));
        assert!(store.contains(&a), "an object being read is never evicted");
        assert!(!store.contains(&b));
        drop(reading);
        store.evict_unused_since(SystemTime::now() + Duration::from_secs(1));
        assert!(!store.contains(&a));
        assert_eq!(store.total(), 0);
    }

    #[test]
    fn lru_eviction_spares_objects_being_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 25, Ownership::Owner).unwrap();
        let a = put(&store, &[b'a'; 10]);
        let b = put(&store, &[b'b'; 10]);
        // `a` is being read and is the least recently used: `b` goes instead.
        let reading = store.open_object(&a).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let _ = store.open_object(&b).map(drop);
        let c = put(&store, &[b'c'; 10]);
        assert!(store.contains(&a), "an object being read is never evicted");
        assert!(!store.contains(&b));
        assert!(store.contains(&c));
        assert_eq!(store.total(), 20);
        drop(reading);
        let d = put(&store, &[b'd'; 10]);
        assert!(!store.contains(&a), "least recently used once released");
        assert!(store.contains(&c) && store.contains(&d));
    }

    #[test]
    fn restart_rebuilds_the_index_unverified_and_drops_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20, Ownership::Owner).unwrap();
        let a = put(&store, b"hello");
        assert!(store.open_object(&a).unwrap().verified);
        std::fs::write(store.temp_path(), b"half a fill").unwrap();
        drop(store);
        let store = Store::open(dir.path(), 1 << 20, Ownership::Owner).unwrap();
        let r = store.open_object(&a).unwrap();
        assert_eq!(r.size, 5);
        assert!(
            !r.verified,
            "files found at start are checked on their first full read"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        // A file removed behind the store's back is a miss, not an error.
        store.remove(&a);
        assert!(store.open_object(&a).is_none());
    }

    #[test]
    fn only_the_owner_evicts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 100, Ownership::Owner).unwrap();
        let a = put(&store, &[b'a'; 30]);
        let b = put(&store, &[b'b'; 30]);
        drop(store);
        // `ocigate cache ls` with a smaller max_size in its config deletes nothing.
        let looking = Store::open(dir.path(), 10, Ownership::Guest).unwrap();
        assert!(looking.contains(&a) && looking.contains(&b));
        drop(looking);
        let serving = Store::open(dir.path(), 40, Ownership::Owner).unwrap();
        assert_eq!(
            serving.total(),
            30,
            "the server evicts down to its max_size"
        );
    }

    #[test]
    fn open_objects_unlinked_anyway_count_until_closed_and_room_is_made_for_fills() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 30, Ownership::Owner).unwrap();
        let a = put(&store, &[b'a'; 10]);
        let b = put(&store, &[b'b'; 10]);
        let reading = store.open_object(&a).unwrap();
        store.remove(&a);
        assert_eq!(store.used(), 20, "a's blocks are still held open");
        assert!(
            !store.make_room(21),
            "10 held + 21 > 30, even with b evicted"
        );
        assert!(!store.contains(&b), "evicted to make room");
        drop(reading);
        assert_eq!(store.used(), 0);
        assert!(store.make_room(25));
        // A fill's pin keeps the committed object from eviction while its readers read.
        let pin = store.pin(10);
        let temp = store.temp_path();
        std::fs::write(&temp, [b'c'; 10]).unwrap();
        let c = format!("sha256:{}", hex::encode(sha2::Sha256::digest([b'c'; 10])));
        store.commit(&temp, &c, 10, Some(&pin)).unwrap();
        assert!(!store.make_room(25));
        assert!(store.contains(&c), "pinned by the fill's readers");
        drop(pin);
        assert!(store.make_room(25));
        // A failed fill's file still open by a reader counts until the reader lets go.
        let pin = store.pin(10);
        let temp = store.temp_path();
        std::fs::write(&temp, [b'x'; 10]).unwrap();
        store.discard(&temp, Some(&pin));
        assert!(!temp.exists());
        assert_eq!(store.used(), store.total() + 10);
        drop(pin);
        assert_eq!(store.used(), store.total());
    }

    #[test]
    fn an_object_larger_than_the_cache_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 4, Ownership::Owner).unwrap();
        let d = put(&store, b"too big");
        assert!(!store.contains(&d));
        assert_eq!(store.total(), 0);
    }
}

//! The content-addressed store on disk: one file per digest under `objects/`, written under
//! `tmp/` and renamed in only once verified, an in-memory index (size, last access, open
//! readers, whether this process has verified it) rebuilt from the directory at start, and
//! LRU eviction down to `max_size`.
//!
//! Holds bytes by digest and nothing else: it must not know about repositories, tags or
//! upstreams, and it never deletes an object that is being read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How stale a file's modification time (our record of its last access) may get before a
/// hit refreshes it: often enough for LRU across restarts, rarely enough to cost nothing.
const TOUCH_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub digest: String,
    pub size: u64,
    pub last_access: SystemTime,
}

struct Entry {
    size: u64,
    last_access: SystemTime,
    readers: u32,
    /// Hashed by this process (filled here, or read through once since the start).
    verified: bool,
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
    temp_seq: AtomicU64,
    /// Only the server evicts: a CLI command must not delete what it merely looks at.
    owner: bool,
}

/// An object opened for reading; it cannot be evicted while this lives.
pub struct Reader {
    pub file: std::fs::File,
    pub size: u64,
    /// False after a restart until one full read has checked the digest.
    pub verified: bool,
    _guard: ReadGuard,
}

struct ReadGuard {
    store: Arc<Store>,
    digest: String,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        self.store.release(&self.digest);
    }
}

impl Store {
    /// Opens (creating) the store at `root` and indexes `objects/` from file sizes and
    /// modification times. The `owner` (the server) also removes fills a crash left in
    /// `tmp/`; the CLI must not, as a running server may be writing there.
    pub fn open(root: &Path, max_size: u64, owner: bool) -> std::io::Result<Arc<Store>> {
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
                            readers: 0,
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

    fn object_path(&self, digest: &str) -> Option<PathBuf> {
        let (alg, hex) = digest.split_once(':')?;
        let fan = hex.get(..2)?;
        Some(self.root.join("objects").join(alg).join(fan).join(hex))
    }

    /// A fresh path under `tmp/` for a fill.
    pub fn temp_path(&self) -> PathBuf {
        let n = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()))
    }

    pub fn contains(&self, digest: &str) -> bool {
        self.index
            .lock()
            .is_ok_and(|i| i.entries.contains_key(digest))
    }

    /// Opens an object for reading and records the access. `None` when it is not cached (or
    /// its file went away, say by `ocigate cache prune` on a running server).
    pub fn open_object(self: &Arc<Self>, digest: &str) -> Option<Reader> {
        let path = self.object_path(digest)?;
        let mut index = self.index.lock().ok()?;
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
            .duration_since(entry.last_access)
            .is_ok_and(|d| d > TOUCH_AFTER)
        {
            let _ = file.set_modified(now);
        }
        entry.last_access = now;
        entry.readers += 1;
        Some(Reader {
            file,
            size: entry.size,
            verified: entry.verified,
            _guard: ReadGuard {
                store: self.clone(),
                digest: digest.to_string(),
            },
        })
    }

    fn release(self: &Arc<Self>, digest: &str) {
        let over = match self.index.lock() {
            Ok(mut index) => {
                if let Some(e) = index.entries.get_mut(digest) {
                    e.readers = e.readers.saturating_sub(1);
                }
                index.total > self.max_size
            }
            Err(_) => false,
        };
        if over {
            self.evict_in_background();
        }
    }

    /// Eviction unlinks files, which can take a while for large ones: not on a request's
    /// thread when there is a runtime to hand it to.
    pub fn evict_in_background(self: &Arc<Self>) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let store = self.clone();
                rt.spawn_blocking(move || store.evict());
            }
            Err(_) => self.evict(),
        }
    }

    /// Moves a verified fill into place (the caller then evicts, outside its own locks). An
    /// object larger than the whole cache is not kept.
    pub fn commit(&self, temp: &Path, digest: &str, size: u64) -> std::io::Result<()> {
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
        if let Ok(mut index) = self.index.lock() {
            let old = index.entries.remove(digest);
            // Readers of the file this one replaced still hold it open.
            let readers = old.as_ref().map_or(0, |e| e.readers);
            index.total = index.total - old.map_or(0, |e| e.size) + size;
            index.entries.insert(
                digest.to_string(),
                Entry {
                    size,
                    last_access: SystemTime::now(),
                    readers,
                    verified: true,
                },
            );
        }
        Ok(())
    }

    pub fn mark_verified(&self, digest: &str) {
        if let Ok(mut index) = self.index.lock()
            && let Some(e) = index.entries.get_mut(digest)
        {
            e.verified = true;
        }
    }

    /// Drops an object whose bytes turned out wrong. Readers that still have it open keep
    /// their file descriptor; the next request fetches it again.
    pub fn remove(&self, digest: &str) {
        if let Ok(mut index) = self.index.lock()
            && let Some(e) = index.entries.remove(digest)
        {
            index.total -= e.size;
        }
        if let Some(path) = self.object_path(digest) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Evicts least recently used objects that nobody reads until the total fits. Files are
    /// unlinked under the index lock, so a commit of the same digest cannot slip in between.
    pub fn evict(&self) {
        if !self.owner {
            return;
        }
        let Ok(mut index) = self.index.lock() else {
            return;
        };
        if index.total <= self.max_size {
            return;
        }
        let mut candidates: Vec<(SystemTime, String, u64)> = index
            .entries
            .iter()
            .filter(|(_, e)| e.readers == 0)
            .map(|(d, e)| (e.last_access, d.clone(), e.size))
            .collect();
        candidates.sort();
        for (_, digest, size) in candidates {
            if index.total <= self.max_size {
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
        let mut all: Vec<ObjectInfo> = match self.index.lock() {
            Ok(index) => index
                .entries
                .iter()
                .map(|(d, e)| ObjectInfo {
                    digest: d.clone(),
                    size: e.size,
                    last_access: e.last_access,
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        all.sort_by(|a, b| (a.last_access, &a.digest).cmp(&(b.last_access, &b.digest)));
        all
    }

    pub fn total(&self) -> u64 {
        self.index.lock().map_or(0, |i| i.total)
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
        store.commit(&temp, &digest, data.len() as u64).unwrap();
        store.evict();
        digest
    }

    #[test]
    fn lru_eviction_spares_objects_being_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 25, true).unwrap();
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
        let store = Store::open(dir.path(), 1 << 20, true).unwrap();
        let a = put(&store, b"hello");
        assert!(store.open_object(&a).unwrap().verified);
        std::fs::write(store.temp_path(), b"half a fill").unwrap();
        drop(store);
        let store = Store::open(dir.path(), 1 << 20, true).unwrap();
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
        let store = Store::open(dir.path(), 100, true).unwrap();
        let a = put(&store, &[b'a'; 30]);
        let b = put(&store, &[b'b'; 30]);
        drop(store);
        // `ocigate cache ls` with a smaller max_size in its config deletes nothing.
        let looking = Store::open(dir.path(), 10, false).unwrap();
        assert!(looking.contains(&a) && looking.contains(&b));
        drop(looking);
        let serving = Store::open(dir.path(), 40, true).unwrap();
        assert_eq!(
            serving.total(),
            30,
            "the server evicts down to its max_size"
        );
    }

    #[test]
    fn an_object_larger_than_the_cache_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 4, true).unwrap();
        let d = put(&store, b"too big");
        assert!(!store.contains(&d));
        assert_eq!(store.total(), 0);
    }
}

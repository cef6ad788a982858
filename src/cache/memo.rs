//! Verified manifests kept in memory, least recently used dropped first, bounded in bytes:
//! a manifest hit costs no file I/O. The store stays the truth: an entry is served only while
//! the store still holds the object ([`super::store::Store::note_access`]).

use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;

use crate::oci::Digest;

/// Bytes of manifests kept in memory at most.
pub(crate) const MEMO_BYTES: usize = 32 << 20;

pub(crate) struct Memo {
    inner: Mutex<Inner>,
    limit: usize,
}

struct Inner {
    entries: LruCache<Digest, Bytes>,
    bytes: usize,
}

impl Memo {
    pub(crate) fn new(limit: usize) -> Memo {
        Memo {
            inner: Mutex::new(Inner {
                entries: LruCache::unbounded(),
                bytes: 0,
            }),
            limit,
        }
    }

    pub(crate) fn get(&self, digest: &Digest) -> Option<Bytes> {
        self.inner.lock().entries.get(digest).cloned()
    }

    /// Keeps verified `bytes` of `digest`; what no longer fits goes, oldest first.
    pub(crate) fn put(&self, digest: &Digest, bytes: &Bytes) {
        if bytes.len() > self.limit {
            return;
        }
        let mut inner = self.inner.lock();
        if let Some(old) = inner.entries.put(digest.clone(), bytes.clone()) {
            inner.bytes -= old.len();
        }
        inner.bytes += bytes.len();
        while inner.bytes > self.limit {
            let Some((_, dropped)) = inner.entries.pop_lru() else {
                break;
            };
            inner.bytes -= dropped.len();
        }
    }

    pub(crate) fn remove(&self, digest: &Digest) {
        let mut inner = self.inner.lock();
        if let Some(old) = inner.entries.pop(digest) {
            inner.bytes -= old.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    #[test]
    fn bounded_in_bytes_oldest_out_first() {
        let memo = Memo::new(10);
        memo.put(&d('a'), &Bytes::from_static(b"aaaa"));
        memo.put(&d('b'), &Bytes::from_static(b"bbbb"));
        assert!(memo.get(&d('a')).is_some(), "a is now the most recent");
        memo.put(&d('c'), &Bytes::from_static(b"cccc"));
        assert!(memo.get(&d('b')).is_none(), "b was the oldest");
        assert_eq!(memo.get(&d('a')).as_deref(), Some(&b"aaaa"[..]));
        assert_eq!(memo.get(&d('c')).as_deref(), Some(&b"cccc"[..]));
        memo.put(&d('e'), &Bytes::from_static(b"too large to keep"));
        assert!(memo.get(&d('e')).is_none());
        memo.remove(&d('a'));
        assert!(memo.get(&d('a')).is_none());
        memo.put(&d('a'), &Bytes::from_static(b"aaaaaa"));
        assert!(memo.get(&d('c')).is_some(), "4 + 6 bytes fit in 10");
    }
}

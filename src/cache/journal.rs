//! What the cache knows besides bytes, kept in memory and in an append-only journal
//! (`journal.jsonl`) so it survives restarts:
//! - **links**: upstream + repository + digest, the upstream's word that this repository has
//!   this object (authorization evidence: nothing is served for a repository without it),
//!   and when it was given: evidence older than `evidence_ttl` is proven again;
//! - **tags**: upstream + repository + tag + Accept → digest, and when it was last checked;
//! - **media types** of manifests, by digest.
//!
//! Replayed at start (the last record wins) and rewritten compactly, dropping what refers
//! to objects no longer stored. What changes is known in memory at once; the file is
//! written by a thread of its own, in order, so requests never wait on the disk. Must not
//! read or write objects.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::Ownership;
use crate::oci::Digest;
use crate::rewrite::RemoteName;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Record {
    Link {
        upstream: String,
        repo: String,
        digest: String,
        /// Seconds since the epoch; journals written before this field count as never
        /// proven, so their links are proven again on first use.
        #[serde(default)]
        proven: u64,
    },
    /// The repository no longer has the digest (deleted through the proxy, or the upstream
    /// said 404): its link and the tags of the repository pointing at it are gone.
    Forget {
        upstream: String,
        repo: String,
        digest: String,
    },
    /// The tag is gone from the repository, in every representation.
    ForgetTag {
        upstream: String,
        repo: String,
        tag: String,
    },
    Tag {
        upstream: String,
        repo: String,
        tag: String,
        accept: String,
        digest: String,
        /// Seconds since the epoch.
        checked: u64,
    },
    Type {
        digest: String,
        media_type: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TagEntry {
    pub(crate) digest: Digest,
    pub(crate) checked: SystemTime,
}

/// How fresh a repository's evidence for a digest is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Evidence {
    /// Proven within `evidence_ttl`.
    Fresh,
    /// Proven once, longer ago: to be proven again.
    Stale,
}

#[derive(Default)]
struct State {
    /// Link key → when the upstream last showed it.
    links: HashMap<String, SystemTime>,
    tags: HashMap<String, TagEntry>,
    types: HashMap<String, String>,
}

pub struct Journal {
    state: Mutex<State>,
    writer: Writer,
    /// Records appended since the file was last written whole (only the owner compacts).
    appended: std::sync::atomic::AtomicUsize,
    owner: bool,
    evidence_ttl: Duration,
}

/// What the journal's thread is asked to write.
enum Job {
    Append(Record),
    /// The whole journal anew (temp file + rename).
    Rewrite(Vec<Record>),
}

/// The thread that owns the journal file. Dropping it waits for what was sent to be written
/// (`ocigate cache warm` exits right after its last record).
struct Writer {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(path: PathBuf, file: std::fs::File) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("cache-journal".into())
            .spawn(move || write_all(&path, file, rx))?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn send(&self, job: Job) {
        if let Some(tx) = &self.tx
            && tx.send(job).is_err()
        {
            tracing::warn!(
                "the cache journal's writer has stopped: this knowledge will not survive a restart"
            );
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer thread: appends records as they come, and rewrites the file when asked.
fn write_all(path: &Path, mut file: std::fs::File, rx: mpsc::Receiver<Job>) {
    for job in rx {
        let written = match job {
            Job::Append(record) => write_record(&mut file, &record),
            Job::Rewrite(records) => rewrite(path, &records).map(|f| file = f),
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot write the cache journal: this knowledge will not survive a restart");
        }
    }
}

/// Writes `records` as the whole journal (temp file + rename) and opens it for appending.
fn rewrite(path: &Path, records: &[Record]) -> std::io::Result<std::fs::File> {
    let temp = path.with_extension("jsonl.tmp");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&temp)?);
        for record in records {
            write_record(&mut out, record)?;
        }
        out.flush()?;
    }
    std::fs::rename(&temp, path)?;
    open_for_append(path)
}

fn open_for_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Records appended before the owner rewrites the journal (besides twice the live ones).
const COMPACT_AFTER: usize = 10_000;

fn link_key(upstream: &str, repo: &str, digest: &str) -> String {
    format!("{upstream}\0{repo}\0{digest}")
}

fn tag_key(upstream: &str, repo: &str, tag: &str, accept: &str) -> String {
    format!("{upstream}\0{repo}\0{tag}\0{accept}")
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Journal {
    /// Replays `dir/journal.jsonl` and keeps what `present` says is still stored. The
    /// `owner` (the server) rewrites the file with just that; others only append, as a
    /// running server holds the file open. A torn last line (a crash mid-append) is skipped.
    pub(crate) fn open(
        dir: &Path,
        present: impl Fn(&str) -> bool,
        ownership: Ownership,
        evidence_ttl: Duration,
    ) -> std::io::Result<Journal> {
        let owner = ownership == Ownership::Owner;
        let path = dir.join("journal.jsonl");
        let mut state = State::default();
        if let Ok(file) = std::fs::File::open(&path) {
            for line in std::io::BufReader::new(file).lines() {
                let Ok(record) = serde_json::from_str::<Record>(&line?) else {
                    continue;
                };
                match record {
                    Record::Link {
                        upstream,
                        repo,
                        digest,
                        proven,
                    } if present(&digest) => {
                        state.links.insert(
                            link_key(&upstream, &repo, &digest),
                            UNIX_EPOCH + Duration::from_secs(proven),
                        );
                    }
                    Record::Forget {
                        upstream,
                        repo,
                        digest,
                    } => state.forget(&upstream, &repo, &digest),
                    Record::ForgetTag {
                        upstream,
                        repo,
                        tag,
                    } => state.forget_tag(&upstream, &repo, &tag),
                    Record::Tag {
                        upstream,
                        repo,
                        tag,
                        accept,
                        digest,
                        checked,
                    } => {
                        // A record that names no digest (hand-edited, say) is no entry.
                        if let Ok(digest) = Digest::parse(&digest) {
                            state.tags.insert(
                                tag_key(&upstream, &repo, &tag, &accept),
                                TagEntry {
                                    digest,
                                    checked: UNIX_EPOCH + Duration::from_secs(checked),
                                },
                            );
                        }
                    }
                    Record::Type { digest, media_type } if present(&digest) => {
                        state.types.insert(digest, media_type);
                    }
                    _ => {}
                }
            }
        }
        state.tags.retain(|_, t| present(t.digest.as_str()));
        // The owner starts from a compact file; others append to what a server writes.
        let file = match owner {
            true => rewrite(&path, &state.records())?,
            false => open_for_append(&path)?,
        };
        Ok(Journal {
            state: Mutex::new(state),
            writer: Writer::start(path, file)?,
            appended: Default::default(),
            owner,
            evidence_ttl,
        })
    }

    /// Changes the state and queues the record that says so (`apply` returns it, or `None`
    /// when nothing changed), both under the state lock: the file then sees changes in the
    /// order memory did, and a compaction's snapshot holds every change queued before it.
    fn change(&self, apply: impl FnOnce(&mut State) -> Option<Record>) {
        let mut state = self.state.lock();
        let Some(record) = apply(&mut state) else {
            return;
        };
        self.writer.send(Job::Append(record));
        let appended = self
            .appended
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let live = state.links.len() + state.tags.len() + state.types.len();
        if self.owner && appended >= COMPACT_AFTER.max(2 * live) {
            self.appended.store(0, std::sync::atomic::Ordering::Relaxed);
            self.writer.send(Job::Rewrite(state.records()));
        }
    }

    /// The evidence that `repo` on `upstream` has `digest`, if any.
    pub(crate) fn link(
        &self,
        upstream: &str,
        repo: &RemoteName,
        digest: &Digest,
    ) -> Option<Evidence> {
        let (repo, digest) = (repo.as_str(), digest.as_str());
        let proven = *self
            .state
            .lock()
            .links
            .get(&link_key(upstream, repo, digest))?;
        let age = SystemTime::now()
            .duration_since(proven)
            .unwrap_or(Duration::ZERO);
        Some(if age < self.evidence_ttl {
            Evidence::Fresh
        } else {
            Evidence::Stale
        })
    }

    /// Whether `repo` on `upstream` has `digest` by fresh evidence.
    pub(crate) fn has_link(&self, upstream: &str, repo: &RemoteName, digest: &Digest) -> bool {
        self.link(upstream, repo, digest) == Some(Evidence::Fresh)
    }

    /// Records the upstream's word, just given, that `repo` has `digest`. Written to the
    /// journal when new, or when it renews evidence older than a tenth of `evidence_ttl`.
    pub(crate) fn add_link(&self, upstream: &str, repo: &RemoteName, digest: &Digest) {
        let (repo, digest) = (repo.as_str(), digest.as_str());
        let now = SystemTime::now();
        let renew_after = self.evidence_ttl / 10;
        self.change(|s| {
            let old = s.links.insert(link_key(upstream, repo, digest), now);
            let write =
                old.is_none_or(|t| now.duration_since(t).is_ok_and(|age| age >= renew_after));
            write.then(|| Record::Link {
                upstream: upstream.into(),
                repo: repo.into(),
                digest: digest.into(),
                proven: secs(now),
            })
        });
    }

    /// `repo` on `upstream` no longer has `digest`: its evidence and the repository's tags
    /// pointing at it are dropped.
    pub(crate) fn forget(&self, upstream: &str, repo: &RemoteName, digest: &Digest) {
        let (repo, digest) = (repo.as_str(), digest.as_str());
        self.change(|s| {
            let before = s.links.len() + s.tags.len();
            s.forget(upstream, repo, digest);
            let known = before != s.links.len() + s.tags.len();
            known.then(|| Record::Forget {
                upstream: upstream.into(),
                repo: repo.into(),
                digest: digest.into(),
            })
        });
    }

    /// A tag is gone from `repo`: every cached representation of it is dropped.
    pub(crate) fn forget_tag(&self, upstream: &str, repo: &RemoteName, tag: &str) {
        let repo = repo.as_str();
        self.change(|s| {
            let before = s.tags.len();
            s.forget_tag(upstream, repo, tag);
            let known = before != s.tags.len();
            known.then(|| Record::ForgetTag {
                upstream: upstream.into(),
                repo: repo.into(),
                tag: tag.into(),
            })
        });
    }

    pub(crate) fn tag(
        &self,
        upstream: &str,
        repo: &RemoteName,
        tag: &str,
        accept: &str,
    ) -> Option<TagEntry> {
        self.state
            .lock()
            .tags
            .get(&tag_key(upstream, repo.as_str(), tag, accept))
            .cloned()
    }

    /// Records that a tag points at `digest` as of now. Only a change is written to the
    /// journal: after a restart an unchanged tag is merely revalidated once more.
    pub(crate) fn set_tag(
        &self,
        upstream: &str,
        repo: &RemoteName,
        tag: &str,
        accept: &str,
        digest: &Digest,
    ) {
        let now = SystemTime::now();
        let repo = repo.as_str();
        self.change(|s| {
            let entry = TagEntry {
                digest: digest.clone(),
                checked: now,
            };
            let old = s.tags.insert(tag_key(upstream, repo, tag, accept), entry);
            let changed = old.is_none_or(|o| o.digest != *digest);
            changed.then(|| Record::Tag {
                upstream: upstream.into(),
                repo: repo.into(),
                tag: tag.into(),
                accept: accept.into(),
                digest: digest.to_string(),
                checked: secs(now),
            })
        });
    }

    /// The digests of every cached representation (Accept) of a tag.
    pub(crate) fn tag_representations(
        &self,
        upstream: &str,
        repo: &RemoteName,
        tag: &str,
    ) -> Vec<Digest> {
        let prefix = format!("{upstream}\0{repo}\0{tag}\0");
        self.state
            .lock()
            .tags
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, e)| e.digest.clone())
            .collect()
    }

    pub fn media_type(&self, digest: &Digest) -> Option<String> {
        self.state.lock().types.get(digest.as_str()).cloned()
    }

    pub(crate) fn set_media_type(&self, digest: &Digest, media_type: &str) {
        self.change(|s| {
            let old = s.types.insert(digest.to_string(), media_type.into());
            let changed = old.as_deref() != Some(media_type);
            changed.then(|| Record::Type {
                digest: digest.to_string(),
                media_type: media_type.into(),
            })
        });
    }

    /// Every cached tag (once per digest, whatever the representations), for
    /// `ocigate cache ls`.
    pub fn tags(&self) -> Vec<TagRecord> {
        let s = self.state.lock();
        let mut out: Vec<TagRecord> = s
            .tags
            .iter()
            .filter_map(|(key, e)| {
                let mut parts = key.split('\0');
                Some(TagRecord {
                    upstream: parts.next()?.to_string(),
                    repo: parts.next()?.to_string(),
                    tag: parts.next()?.to_string(),
                    digest: e.digest.to_string(),
                    checked: e.checked,
                })
            })
            .collect();
        out.sort_by(|a, b| a.key().cmp(&b.key()).then(a.checked.cmp(&b.checked)));
        out.dedup_by(|a, b| a.key() == b.key());
        out
    }
}

/// A cached tag: which digest it pointed at when last checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRecord {
    pub upstream: String,
    pub repo: String,
    pub tag: String,
    pub digest: String,
    pub checked: SystemTime,
}

impl TagRecord {
    fn key(&self) -> (&str, &str, &str, &str) {
        (&self.upstream, &self.repo, &self.tag, &self.digest)
    }
}

impl State {
    /// Everything known, as the records of a compact journal.
    fn records(&self) -> Vec<Record> {
        let mut out = Vec::with_capacity(self.links.len() + self.tags.len() + self.types.len());
        for (key, proven) in &self.links {
            let mut parts = key.split('\0');
            if let (Some(upstream), Some(repo), Some(digest)) =
                (parts.next(), parts.next(), parts.next())
            {
                out.push(Record::Link {
                    upstream: upstream.into(),
                    repo: repo.into(),
                    digest: digest.into(),
                    proven: secs(*proven),
                });
            }
        }
        for (key, entry) in &self.tags {
            let mut parts = key.split('\0');
            if let (Some(upstream), Some(repo), Some(tag), Some(accept)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            {
                out.push(Record::Tag {
                    upstream: upstream.into(),
                    repo: repo.into(),
                    tag: tag.into(),
                    accept: accept.into(),
                    digest: entry.digest.to_string(),
                    checked: secs(entry.checked),
                });
            }
        }
        for (digest, media_type) in &self.types {
            out.push(Record::Type {
                digest: digest.clone(),
                media_type: media_type.clone(),
            });
        }
        out
    }

    fn forget(&mut self, upstream: &str, repo: &str, digest: &str) {
        self.links.remove(&link_key(upstream, repo, digest));
        let prefix = format!("{upstream}\0{repo}\0");
        self.tags
            .retain(|k, t| !(k.starts_with(&prefix) && t.digest == digest));
    }

    fn forget_tag(&mut self, upstream: &str, repo: &str, tag: &str) {
        let prefix = format!("{upstream}\0{repo}\0{tag}\0");
        self.tags.retain(|k, _| !k.starts_with(&prefix));
    }
}

fn write_record(out: &mut impl Write, record: &Record) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    fn r(name: &str) -> RemoteName {
        RemoteName::new(name)
    }

    #[test]
    fn survives_a_restart_and_forgets_what_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let day = Duration::from_secs(86400);
        let j = Journal::open(dir.path(), |_| true, Ownership::Owner, day).unwrap();
        j.add_link("hub", &r("library/alpine"), &d('a'));
        j.add_link("hub", &r("library/alpine"), &d('b'));
        j.set_tag("hub", &r("library/alpine"), "3", "x", &d('a'));
        j.set_tag("hub", &r("library/alpine"), "3", "x", &d('b'));
        j.set_media_type(&d('b'), "application/vnd.oci.image.index.v1+json");
        drop(j);
        // A crash mid-append leaves a torn line: skipped.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("journal.jsonl"))
            .unwrap();
        f.write_all(b"{\"link\":{\"upstr").unwrap();
        drop(f);
        let j = Journal::open(dir.path(), |x| x == d('b').as_str(), Ownership::Owner, day).unwrap();
        assert!(j.has_link("hub", &r("library/alpine"), &d('b')));
        assert!(
            !j.has_link("hub", &r("library/alpine"), &d('a')),
            "its object is gone"
        );
        assert!(!j.has_link("other", &r("library/alpine"), &d('b')));
        assert_eq!(
            j.tag("hub", &r("library/alpine"), "3", "x").unwrap().digest,
            d('b')
        );
        assert!(j.tag("hub", &r("library/alpine"), "3", "y").is_none());
        assert_eq!(
            j.media_type(&d('b')).as_deref(),
            Some("application/vnd.oci.image.index.v1+json")
        );
        let lines = std::fs::read_to_string(dir.path().join("journal.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 3, "compacted: {lines}");
    }

    #[test]
    fn forgotten_evidence_and_tags_stay_forgotten_and_old_evidence_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let day = Duration::from_secs(86400);
        let j = Journal::open(dir.path(), |_| true, Ownership::Owner, day).unwrap();
        j.add_link("hub", &r("team/app"), &d('a'));
        j.add_link("hub", &r("team/other"), &d('a'));
        j.set_tag("hub", &r("team/app"), "v1", "x", &d('a'));
        j.set_tag("hub", &r("team/app"), "v2", "x", &d('b'));
        j.set_tag("hub", &r("team/app"), "v3", "x", &d('c'));
        assert_eq!(
            j.link("hub", &r("team/app"), &d('a')),
            Some(Evidence::Fresh)
        );
        j.forget("hub", &r("team/app"), &d('a'));
        j.forget_tag("hub", &r("team/app"), "v3");
        let check = |j: &Journal| {
            assert!(j.link("hub", &r("team/app"), &d('a')).is_none());
            assert!(
                j.tag("hub", &r("team/app"), "v1", "x").is_none(),
                "it pointed at aa"
            );
            assert!(j.tag("hub", &r("team/app"), "v3", "x").is_none());
            assert!(j.tag("hub", &r("team/app"), "v2", "x").is_some());
            assert!(
                j.has_link("hub", &r("team/other"), &d('a')),
                "other repositories keep it"
            );
        };
        check(&j);
        drop(j);
        check(&Journal::open(dir.path(), |_| true, Ownership::Guest, day).unwrap());
        // Evidence older than the bound is stale, and links of journals without proof
        // times were never proven.
        let zero = Journal::open(dir.path(), |_| true, Ownership::Guest, Duration::ZERO).unwrap();
        assert_eq!(
            zero.link("hub", &r("team/other"), &d('a')),
            Some(Evidence::Stale)
        );
        std::fs::write(
            dir.path().join("journal.jsonl"),
            format!(
                "{{\"link\":{{\"upstream\":\"hub\",\"repo\":\"r\",\"digest\":\"{}\"}}}}\n",
                d('d')
            ),
        )
        .unwrap();
        let old = Journal::open(dir.path(), |_| true, Ownership::Owner, day).unwrap();
        assert_eq!(old.link("hub", &r("r"), &d('d')), Some(Evidence::Stale));
    }
}

//! The cache phase: blobs and manifests of `cache: true` routes served from disk.
//!
//! Runs after `route` and `admit`, in remote names, before `send`. It reads the request's
//! method, endpoint and headers and answers with an [`Outcome`]: a
//! response of its own, the upstream's answer for the pipeline to pass on (refusals,
//! `404`s), or "not mine" (uploads, ranges of objects not cached, `sha512`).
//!
//! - Objects are stored once by digest ([`store`]), whatever repository, route or upstream
//!   they came from, and only after their digest checked out ([`fill`]).
//! - Nothing is served for a repository before the upstream has shown that the repository
//!   has it (a GET/HEAD for it succeeded, or a manifest of it references it in a field the
//!   registry verified: [`crate::oci::manifest::verified_references`]): [`journal`] keeps
//!   that evidence per upstream, proves it again after `evidence_ttl`, and forgets it on a
//!   `DELETE` through the proxy or an upstream `404`.
//! - Tags are cached per representation (Accept) for `tag_ttl`, then revalidated with a HEAD;
//!   with `serve_stale` a failing upstream gets the cached answer instead.
//! - Verified manifests are also kept in memory ([`memo`]); file I/O for manifests runs off
//!   the async workers.
//! - Offline (`cache.offline`), upstreams are never asked.
//!
//! Talks to upstreams only through [`Fetch`] (which sends as the request was admitted, by
//! [`Upstream::send`]); never sees local names. `warm` fills it ahead of pulls.

pub(crate) mod fill;
pub(crate) mod journal;
pub(crate) mod memo;
pub(crate) mod store;
pub mod warm;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::BodyExt;

use crate::body::{self, Body};
use crate::config::CacheConfig;
use crate::error::GatewayError;
use crate::flight::Gates;
use crate::oci::range::ByteRange;
use crate::oci::{API_VERSION, Digest, Endpoint, ErrorCode, OciError, Reference, Scope, manifest};
use crate::rewrite::RemoteName;
use crate::upstream::{Authorization, Redirects, Upstream, UpstreamError, UpstreamRequest};
use fill::{Fills, Join};
use journal::{Evidence, Journal};
use memo::Memo;
use store::{Access, Store};

/// Manifests larger than this are passed through, not cached (distribution refuses to store
/// them too).
pub(crate) const MAX_MANIFEST: usize = 4 << 20;

/// What a read asks for: the object, or only its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Read {
    Get,
    Head,
}

/// Who opens the cache directory: the server tidies it up; a CLI command that may run
/// beside a server (`ocigate cache warm`) leaves it alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    Owner,
    Guest,
}

/// What the cache phase did with a request.
pub(crate) enum Outcome {
    /// Answered by the cache.
    Served(Response<Body>),
    /// The upstream's answer, to be passed on as any other (refusals, `404`s, …).
    Upstream(Response<Body>),
    /// Not for the cache: the pipeline sends the request as usual.
    Pass,
}

/// How the cache asks the upstream on behalf of one request.
pub(crate) struct Fetch<'a> {
    pub(crate) upstream: &'a Upstream,
    /// The remote repository name.
    pub(crate) remote: &'a RemoteName,
    /// The scopes the request needs, in remote names.
    pub(crate) scopes: &'a [Scope],
    /// Whose authority the request goes upstream with.
    pub(crate) authorization: Authorization,
    /// The client's headers as the upstream may see them.
    pub(crate) headers: &'a HeaderMap,
    /// What becomes of a redirect in an upstream answer the client is given as it is (a
    /// blob HEAD not cached): the route's `redirects`, as for requests the cache passes.
    pub(crate) passed_on: Redirects,
}

impl Fetch<'_> {
    /// Asks the upstream for the cache's own use: a GET needs the bytes, whatever the route's
    /// redirect policy says to clients, so its redirects are followed; a HEAD's are not
    /// (object stores presign URLs for GET only, and a redirect is evidence already).
    async fn send(&self, method: Method, suffix: &str) -> Result<Response<Body>, UpstreamError> {
        let redirects = match method {
            Method::GET => Redirects::Follow,
            _ => Redirects::PassOn,
        };
        self.send_with(method, suffix, redirects).await
    }

    async fn send_with(
        &self,
        method: Method,
        suffix: &str,
        redirects: Redirects,
    ) -> Result<Response<Body>, UpstreamError> {
        let mut headers = HeaderMap::new();
        for name in [header::ACCEPT, header::USER_AGENT] {
            for v in self.headers.get_all(&name) {
                headers.append(name.clone(), v.clone());
            }
        }
        let request = UpstreamRequest {
            method,
            path_and_query: self.remote.api_path(suffix),
            headers,
            body: None,
            scopes: self.scopes.to_vec(),
        };
        self.upstream
            .send(request, &self.authorization, redirects)
            .await
    }
}

pub struct Cache {
    config: CacheConfig,
    store: Arc<Store>,
    journal: Journal,
    fills: Arc<Fills>,
    manifest_gates: Gates,
    memo: Memo,
}

#[derive(Debug, thiserror::Error)]
#[error("cache {dir}: {error}")]
pub struct CacheOpenError {
    dir: String,
    error: std::io::Error,
}

/// A manifest from the cache: its digest, media type and bytes.
pub(crate) struct Manifest {
    pub(crate) digest: Digest,
    pub(crate) media_type: String,
    pub(crate) bytes: Bytes,
}

impl Cache {
    /// Opens the cache directory, rebuilding the index and the journal from it. Only the
    /// owner (the server) tidies up: the CLI may run beside a server on the same directory.
    pub fn open(config: &CacheConfig, ownership: Ownership) -> Result<Cache, CacheOpenError> {
        let err = |error| CacheOpenError {
            dir: config.dir.display().to_string(),
            error,
        };
        let store = Store::open(&config.dir, config.max_size, ownership).map_err(err)?;
        let journal = Journal::open(
            &config.dir,
            |d| store.contains(d),
            ownership,
            config.evidence_ttl,
        )
        .map_err(err)?;
        Ok(Cache {
            config: config.clone(),
            fills: Fills::new(store.clone()),
            store,
            journal,
            manifest_gates: Gates::new(1024),
            memo: Memo::new(memo::MEMO_BYTES),
        })
    }

    /// With `cache.inactive`: deletes objects nobody used for that long, now and then, for
    /// as long as the runtime runs.
    pub(crate) fn sweep_inactive(&self) {
        let Some(inactive) = self.config.inactive else {
            return;
        };
        let store = self.store.clone();
        let period = (inactive / 24).clamp(Duration::from_secs(60), Duration::from_secs(3600));
        tokio::spawn(async move {
            loop {
                let cutoff = SystemTime::now().checked_sub(inactive);
                if let Some(cutoff) = cutoff {
                    let store = store.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || store.evict_unused_since(cutoff)).await;
                }
                tokio::time::sleep(period).await;
            }
        });
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The phase: a blob or manifest GET/HEAD of a cache route, once admitted and routed.
    pub(crate) async fn serve(
        &self,
        method: &Method,
        endpoint: &Endpoint,
        fetch: &Fetch<'_>,
    ) -> Result<Outcome, GatewayError> {
        let read = match *method {
            Method::GET => Read::Get,
            Method::HEAD => Read::Head,
            _ => return Ok(Outcome::Pass),
        };
        match endpoint {
            Endpoint::Blob(d) if d.is_sha256() => self.blob(read, d, fetch).await,
            Endpoint::Manifest(r) if !matches!(r, Reference::Digest(d) if !d.is_sha256()) => {
                let accept = manifest::accept_key(fetch.headers);
                Ok(match self.manifest(r, &accept, read, fetch).await? {
                    ManifestAnswer::Cached(m) => Outcome::Served(manifest_response(m, read)),
                    ManifestAnswer::Upstream(r) => Outcome::Upstream(r),
                    ManifestAnswer::NotCached => {
                        Outcome::Served(not_cached(ErrorCode::ManifestUnknown, r.as_str()))
                    }
                })
            }
            _ => Ok(Outcome::Pass),
        }
    }

    async fn blob(
        &self,
        read: Read,
        digest: &Digest,
        fetch: &Fetch<'_>,
    ) -> Result<Outcome, GatewayError> {
        let had_range = fetch.headers.contains_key(header::RANGE);
        // A Range we do not handle (several ranges, nonsense) may be ignored: a full answer.
        let range = fetch
            .headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(ByteRange::parse);
        let suffix = format!("blobs/{digest}");
        if self.store.contains(digest.as_str()) {
            if !self.linked(digest, &suffix, fetch).await? {
                return Ok(if self.config.offline {
                    Outcome::Served(not_cached(ErrorCode::BlobUnknown, digest.as_str()))
                } else {
                    Outcome::Pass
                });
            }
            if let Some(reader) = self.store.open_object(digest.as_str()) {
                let size = reader.size;
                let range = match range.map(|r| r.resolve(size)) {
                    Some(None) => return Ok(Outcome::Served(unsatisfiable(size))),
                    Some(r) => r,
                    None => None,
                };
                return Ok(
                    match fill::object(&self.store, digest.as_str(), reader, range, read) {
                        Ok(body) => {
                            crate::metrics::cache_request("blob", "hit");
                            Outcome::Served(blob_response(digest, size, range, body))
                        }
                        Err(e) => {
                            tracing::warn!(%digest, error = %e, "cannot map a cached object; passing through");
                            Outcome::Pass
                        }
                    },
                );
            }
        }
        if self.config.offline {
            return Ok(Outcome::Served(not_cached(
                ErrorCode::BlobUnknown,
                digest.as_str(),
            )));
        }
        if read == Read::Head {
            // A HEAD of an uncached blob goes upstream; a yes is evidence for later GETs.
            let response = fetch
                .send_with(Method::HEAD, &suffix, fetch.passed_on)
                .await?;
            self.learn_presence(response.status(), digest, fetch);
            return Ok(Outcome::Upstream(response));
        }
        if had_range {
            return Ok(Outcome::Pass);
        }
        match self.fill(digest, fetch).await? {
            Filled::Reading(size, body) => {
                Ok(Outcome::Served(blob_response(digest, size, None, body)))
            }
            Filled::Stored => Box::pin(self.blob(read, digest, fetch)).await,
            Filled::Upstream(response) => Ok(Outcome::Upstream(response)),
            Filled::Nothing => Ok(Outcome::Pass),
        }
    }

    /// Fetches `digest` into the cache, or attaches to the fetch in progress, and returns a
    /// reader that streams it as it arrives.
    async fn fill(&self, digest: &Digest, fetch: &Fetch<'_>) -> Result<Filled, GatewayError> {
        let suffix = format!("blobs/{digest}");
        match self.fills.join(digest.as_str()) {
            Join::Stored => Ok(Filled::Stored),
            Join::Follower(fill) => {
                crate::metrics::cache_coalesced();
                let Some(size) = fill.size().await else {
                    return Ok(Filled::Nothing);
                };
                // The fill may be for another repository: this one needs its own evidence.
                if !self.linked(digest, &suffix, fetch).await? {
                    return Ok(Filled::Nothing);
                }
                Ok(match self.fills.reader(&fill, size) {
                    Some(body) => Filled::Reading(size, body),
                    None => Filled::Stored,
                })
            }
            Join::Leader(mut writer) => {
                if let Err(e) = writer.create().await {
                    tracing::warn!(error = %e, "cache: cannot start a fill; passing through");
                    return Ok(Filled::Nothing);
                }
                crate::metrics::cache_request("blob", "miss");
                let response = fetch.send(Method::GET, &suffix).await?;
                let size = content_length(response.headers());
                // Not cached: refusals and errors (passed on), answers of unknown length,
                // empty objects (nothing to gain, and nothing to hold back until verified),
                // and objects for which fills in progress leave no room (larger than the
                // whole cache, for one).
                let cacheable = size.filter(|s| *s > 0 && writer.reserve(*s));
                self.learn_presence(response.status(), digest, fetch);
                let (StatusCode::OK, Some(size)) = (response.status(), cacheable) else {
                    return Ok(Filled::Upstream(response));
                };
                Ok(match writer.start(response.into_body(), size) {
                    Some((_, body)) => Filled::Reading(size, body),
                    None => Filled::Nothing,
                })
            }
        }
    }

    /// Whether this repository may be served the cached `digest`: by fresh evidence, or
    /// else by the upstream's answer to a HEAD. Offline, any evidence counts; with
    /// `serve_stale`, old evidence counts while the upstream cannot be asked.
    async fn linked(
        &self,
        digest: &Digest,
        suffix: &str,
        fetch: &Fetch<'_>,
    ) -> Result<bool, GatewayError> {
        let evidence = self
            .journal
            .link(fetch.upstream.name(), fetch.remote, digest);
        match evidence {
            Some(Evidence::Fresh) => Ok(true),
            _ if self.config.offline => Ok(evidence.is_some()),
            Some(Evidence::Stale) => match self.prove_link(digest, suffix, fetch).await {
                Err(e) if self.config.serve_stale => {
                    tracing::warn!(upstream = fetch.upstream.name(), repo = fetch.remote.as_str(), %digest, error = %e, "upstream failing: serving on old evidence");
                    Ok(true)
                }
                proven => proven,
            },
            None => self.prove_link(digest, suffix, fetch).await,
        }
    }

    /// Asks the upstream with a HEAD whether this repository has `digest` (HEADs are free on
    /// Docker Hub), and records the answer.
    async fn prove_link(
        &self,
        digest: &Digest,
        suffix: &str,
        fetch: &Fetch<'_>,
    ) -> Result<bool, GatewayError> {
        let response = fetch.send(Method::HEAD, suffix).await?;
        self.learn_presence(response.status(), digest, fetch);
        Ok(is_evidence(response.status()))
    }

    /// What an upstream answer for `digest` in this repository says: it has it (a link), or
    /// it does not (a `404` forgets what the cache knew).
    fn learn_presence(&self, status: StatusCode, digest: &Digest, fetch: &Fetch<'_>) {
        let upstream = fetch.upstream.name();
        if is_evidence(status) {
            self.journal.add_link(upstream, fetch.remote, digest);
        } else if status == StatusCode::NOT_FOUND {
            self.journal.forget(upstream, fetch.remote, digest);
        }
    }

    /// A `404` for a manifest: the repository no longer has that digest, or that tag.
    fn learn_manifest_absence(&self, status: StatusCode, reference: &Reference, fetch: &Fetch<'_>) {
        if status != StatusCode::NOT_FOUND {
            return;
        }
        let upstream = fetch.upstream.name();
        match reference {
            Reference::Digest(d) => self.journal.forget(upstream, fetch.remote, d),
            Reference::Tag(t) => self.journal.forget_tag(upstream, fetch.remote, t),
        }
    }

    /// A `DELETE` through the proxy succeeded: the cache forgets that the repository has
    /// the manifest or blob (and, for a manifest, its tags pointing at it), so deleted
    /// content is not served from the cache.
    pub(crate) fn deleted(&self, upstream: &str, remote: &RemoteName, endpoint: &Endpoint) {
        match endpoint {
            Endpoint::Blob(digest) | Endpoint::Manifest(Reference::Digest(digest)) => {
                self.journal.forget(upstream, remote, digest);
            }
            Endpoint::Manifest(Reference::Tag(tag)) => {
                self.journal.forget_tag(upstream, remote, tag);
            }
            _ => {}
        }
    }

    /// A manifest by tag or digest: from the cache when it may be, else fetched, verified
    /// and stored. A HEAD that misses is passed upstream as a HEAD (free on Docker Hub),
    /// not turned into a GET.
    pub(crate) async fn manifest(
        &self,
        reference: &Reference,
        accept: &str,
        read: Read,
        fetch: &Fetch<'_>,
    ) -> Result<ManifestAnswer, GatewayError> {
        match reference {
            Reference::Digest(digest) => {
                if self.store.contains(digest.as_str()) && self.journal.media_type(digest).is_some()
                {
                    let linked = self
                        .linked(digest, &format!("manifests/{digest}"), fetch)
                        .await?;
                    if linked && let Some(m) = self.cached_manifest(digest).await {
                        crate::metrics::cache_request("manifest", "hit");
                        return Ok(ManifestAnswer::Cached(m));
                    }
                }
            }
            Reference::Tag(tag) => {
                if let Some(answer) = self.cached_tag(tag, accept, fetch).await? {
                    return Ok(answer);
                }
            }
        }
        if self.config.offline {
            return Ok(ManifestAnswer::NotCached);
        }
        let fetched = if read == Read::Head {
            let suffix = format!("manifests/{}", reference.as_str());
            match fetch.send(Method::HEAD, &suffix).await {
                Ok(r) => {
                    self.learn_from_head(&r, reference, accept, fetch);
                    Ok(ManifestAnswer::Upstream(r))
                }
                Err(e) => Err(e.into()),
            }
        } else {
            self.fetch_manifest(reference, accept, fetch).await
        };
        // A tag cached only in another representation still beats an upstream failure.
        if let (true, Reference::Tag(tag)) = (self.config.serve_stale, reference) {
            let trouble = match &fetched {
                Err(GatewayError::Upstream(_)) => true,
                Ok(ManifestAnswer::Upstream(r)) => is_upstream_trouble(r.status()),
                _ => false,
            };
            if trouble && let Some(m) = self.any_representation(tag, accept, fetch).await {
                return Ok(stale(m, fetch, tag, "no answer for this representation"));
            }
        }
        fetched
    }

    /// A HEAD that went upstream still teaches the cache: the repository has the digest,
    /// and a tag points at it. Clients that HEAD a tag and then GET by digest (docker,
    /// containerd) find the tag cached next time, even with the upstream down.
    fn learn_from_head(
        &self,
        response: &Response<Body>,
        reference: &Reference,
        accept: &str,
        fetch: &Fetch<'_>,
    ) {
        self.learn_manifest_absence(response.status(), reference, fetch);
        let digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|d| Digest::parse(d).ok())
            .filter(Digest::is_sha256);
        let (StatusCode::OK, Some(digest)) = (response.status(), digest) else {
            return;
        };
        let upstream = fetch.upstream.name();
        self.journal.add_link(upstream, fetch.remote, &digest);
        if let Reference::Tag(tag) = reference {
            self.journal
                .set_tag(upstream, fetch.remote, tag, accept, &digest);
        }
    }

    /// A tag answered from the cache: fresh, revalidated, or stale while the upstream fails.
    async fn cached_tag(
        &self,
        tag: &str,
        accept: &str,
        fetch: &Fetch<'_>,
    ) -> Result<Option<ManifestAnswer>, GatewayError> {
        let upstream = fetch.upstream.name();
        let entry = self.journal.tag(upstream, fetch.remote, tag, accept);
        let cached = match &entry {
            Some(e) => self.cached_manifest(&e.digest).await,
            None => None,
        };
        let (Some(entry), Some(cached)) = (entry, cached) else {
            // Offline, any cached representation the client accepts beats a 404.
            if self.config.offline {
                return Ok(self
                    .any_representation(tag, accept, fetch)
                    .await
                    .map(ManifestAnswer::Cached));
            }
            return Ok(None);
        };
        let age = SystemTime::now()
            .duration_since(entry.checked)
            .unwrap_or(Duration::ZERO);
        if self.config.offline || age < self.config.tag_ttl_for(tag) {
            crate::metrics::cache_request("manifest", "hit");
            return Ok(Some(ManifestAnswer::Cached(cached)));
        }
        let checked = fetch.send(Method::HEAD, &format!("manifests/{tag}")).await;
        match checked {
            Ok(r) if r.status() == StatusCode::OK => {
                let now = r
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if now.as_deref() == Some(cached.digest.as_str()) {
                    self.journal
                        .set_tag(upstream, fetch.remote, tag, accept, &cached.digest);
                    crate::metrics::cache_request("manifest", "revalidated");
                    return Ok(Some(ManifestAnswer::Cached(cached)));
                }
                Ok(None) // moved (or no digest said): fetch it
            }
            Ok(r) if self.config.serve_stale && is_upstream_trouble(r.status()) => {
                Ok(Some(stale(cached, fetch, tag, r.status())))
            }
            // Gone, refused, …: the GET that follows gets the real answer (a HEAD's has no
            // body to pass on).
            Ok(r) => {
                self.learn_manifest_absence(r.status(), &Reference::Tag(tag.into()), fetch);
                Ok(None)
            }
            Err(e) if self.config.serve_stale => Ok(Some(stale(cached, fetch, tag, e))),
            Err(e) => Err(e.into()),
        }
    }

    /// Any cached representation of a tag whose media type the client accepts.
    async fn any_representation(
        &self,
        tag: &str,
        accept: &str,
        fetch: &Fetch<'_>,
    ) -> Option<Manifest> {
        let accepted: Vec<&str> = accept.split(',').filter(|a| !a.is_empty()).collect();
        let digests = self
            .journal
            .tag_representations(fetch.upstream.name(), fetch.remote, tag);
        for digest in digests {
            let Some(m) = self.cached_manifest(&digest).await else {
                continue;
            };
            if accepted.is_empty()
                || accepted.contains(&"*/*")
                || accepted.contains(&m.media_type.as_str())
            {
                return Some(m);
            }
        }
        None
    }

    /// A stored manifest: from memory, or read whole (it is small) off the async workers and
    /// checked if this process has not yet.
    async fn cached_manifest(&self, digest: &Digest) -> Option<Manifest> {
        let media_type = self.journal.media_type(digest)?;
        let remembered = match self.store.note_access(digest.as_str()) {
            None => {
                self.memo.remove(digest);
                return None;
            }
            Some(Access::Recorded) => self.memo.get(digest),
            Some(Access::FileStale) => None,
        };
        let bytes = match remembered {
            Some(bytes) => bytes,
            None => {
                let (store, owned) = (self.store.clone(), digest.clone());
                let read = tokio::task::spawn_blocking(move || read_manifest(&store, &owned))
                    .await
                    .ok()??;
                self.memo.put(digest, &read);
                read
            }
        };
        Some(Manifest {
            digest: digest.clone(),
            media_type,
            bytes,
        })
    }

    /// Fetches a manifest (one request per reference and Accept at a time), checks its
    /// digest, stores it and records what it references.
    async fn fetch_manifest(
        &self,
        reference: &Reference,
        accept: &str,
        fetch: &Fetch<'_>,
    ) -> Result<ManifestAnswer, GatewayError> {
        let upstream = fetch.upstream.name();
        let key = format!(
            "{upstream}\0{}\0{}\0{accept}",
            fetch.remote.as_str(),
            reference.as_str()
        );
        let gate = self.manifest_gates.gate(&key);
        let _turn = gate.lock().await;
        // Whoever held the gate may have fetched it just now.
        let fresh =
            match reference {
                Reference::Digest(d) if self.journal.has_link(upstream, fetch.remote, d) => {
                    self.cached_manifest(d).await
                }
                Reference::Digest(_) => None,
                Reference::Tag(t) => match self
                    .journal
                    .tag(upstream, fetch.remote, t, accept)
                    .filter(|e| {
                        e.checked
                            .elapsed()
                            .is_ok_and(|a| a < self.config.tag_ttl_for(t))
                    }) {
                    Some(e) => self.cached_manifest(&e.digest).await,
                    None => None,
                },
            };
        if let Some(m) = fresh {
            crate::metrics::cache_coalesced();
            return Ok(ManifestAnswer::Cached(m));
        }
        crate::metrics::cache_request("manifest", "miss");
        let response = fetch
            .send(Method::GET, &format!("manifests/{}", reference.as_str()))
            .await?;
        // Not cached: refusals and errors, manifests over the size limit, and signed schema 1
        // manifests (their digest is of a payload inside them, not of their bytes).
        let signed_schema1 = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|t| t.to_str().ok())
            .is_some_and(manifest::is_signed_schema1);
        let too_large = content_length(response.headers()).is_some_and(|n| n > MAX_MANIFEST as u64);
        if response.status() != StatusCode::OK || signed_schema1 || too_large {
            self.learn_manifest_absence(response.status(), reference, fetch);
            return Ok(ManifestAnswer::Upstream(response));
        }
        let bad = |reason: String| GatewayError::BadUpstreamAnswer {
            upstream: upstream.to_string(),
            what: "manifest",
            reason,
        };
        let (parts, incoming) = response.into_parts();
        let bytes = body::read_to_limit(incoming, MAX_MANIFEST)
            .await
            .map_err(bad)?;
        let digest = Digest::sha256_of(&bytes);
        let said = parts
            .headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok());
        let expected = match reference {
            Reference::Digest(d) => Some(d.as_str()),
            Reference::Tag(_) => said.filter(|d| d.starts_with("sha256:")),
        };
        if let Some(expected) = expected
            && digest != expected
        {
            crate::metrics::cache_rejected("digest_mismatch");
            return Err(bad(format!(
                "its bytes hash to {digest}, not {expected}: nothing cached"
            )));
        }
        let served_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let media_type = served_type
            .map(str::to_string)
            .or_else(|| manifest::media_type(&bytes))
            .unwrap_or_else(|| manifest::OCI_MANIFEST.into());
        self.store_manifest(&digest, &bytes)
            .await
            .map_err(|e| bad(format!("cannot store it: {e}")))?;
        self.memo.put(&digest, &bytes);
        self.journal.set_media_type(&digest, &media_type);
        self.journal.add_link(upstream, fetch.remote, &digest);
        // Only what the upstream checked before it took the manifest: anything else a body
        // names is proven with a HEAD when asked for.
        for referenced in manifest::verified_references(served_type, &bytes) {
            self.journal.add_link(upstream, fetch.remote, &referenced);
        }
        if let Reference::Tag(tag) = reference {
            self.journal
                .set_tag(upstream, fetch.remote, tag, accept, &digest);
        }
        Ok(ManifestAnswer::Cached(Manifest {
            digest,
            media_type,
            bytes,
        }))
    }

    /// Stores a verified manifest, off the async workers.
    async fn store_manifest(&self, digest: &Digest, bytes: &Bytes) -> std::io::Result<()> {
        if self.store.contains(digest.as_str()) {
            return Ok(());
        }
        let (store, digest, bytes) = (self.store.clone(), digest.to_string(), bytes.clone());
        tokio::task::spawn_blocking(move || {
            let temp = store.temp_path();
            std::fs::write(&temp, &bytes)?;
            store.commit(&temp, &digest, bytes.len() as u64, None)
        })
        .await
        .map_err(std::io::Error::other)??;
        // Manifests take no fill reservation: what they add is evicted like anything else.
        self.store.evict_in_background();
        Ok(())
    }

    /// Fetches a blob into the cache and waits for it (for `ocigate cache warm`). `true`
    /// when it is cached for this repository afterwards.
    pub(crate) async fn warm_blob(
        &self,
        digest: &Digest,
        fetch: &Fetch<'_>,
    ) -> Result<bool, GatewayError> {
        let linked = |c: &Cache| {
            c.store.contains(digest.as_str())
                && c.journal
                    .has_link(fetch.upstream.name(), fetch.remote, digest)
        };
        if linked(self) {
            return Ok(true);
        }
        if let Filled::Reading(_, mut body) = self.fill(digest, fetch).await? {
            // Reading it to the end (and dropping the bytes) waits for the fill and its
            // verification.
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    return Ok(false);
                }
            }
        }
        Ok(linked(self)
            || (self.store.contains(digest.as_str())
                && self
                    .prove_link(digest, &format!("blobs/{digest}"), fetch)
                    .await?))
    }
}

/// A stored manifest's bytes, checked against its digest unless this process already did;
/// a corrupt one is dropped from the store. Blocking: file I/O.
fn read_manifest(store: &Arc<Store>, digest: &Digest) -> Option<Bytes> {
    let reader = store.open_object(digest.as_str())?;
    let verified = reader.verified;
    let mut bytes = Vec::with_capacity(reader.size as usize);
    std::io::Read::read_to_end(&mut &reader.file, &mut bytes).ok()?;
    if !verified || bytes.len() as u64 != reader.size {
        if Digest::sha256_of(&bytes) != *digest {
            tracing::warn!(%digest, "cached manifest is corrupt: dropped");
            crate::metrics::cache_rejected("corrupt");
            drop(reader);
            store.remove(digest.as_str());
            return None;
        }
        store.mark_verified(digest.as_str());
    }
    Some(bytes.into())
}

/// What [`Cache::fill`] got.
enum Filled {
    /// Bytes are coming: the size and this request's reader.
    Reading(u64, Body),
    /// The object is in the store now.
    Stored,
    /// The upstream's answer, not for the cache.
    Upstream(Response<Body>),
    /// No fill (local trouble, or the other fill failed): go upstream as usual.
    Nothing,
}

pub(crate) enum ManifestAnswer {
    Cached(Manifest),
    /// The upstream's answer, to pass on.
    Upstream(Response<Body>),
    /// Offline and not cached.
    NotCached,
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn registry_headers(response: &mut Response<Body>, digest: &Digest, content_type: &str, len: u64) {
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
        h.insert("docker-content-digest", v.clone());
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{digest}\"")) {
            h.insert(header::ETAG, etag);
        }
    }
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static(API_VERSION),
    );
}

fn blob_response(
    digest: &Digest,
    size: u64,
    range: Option<(u64, u64)>,
    body: Body,
) -> Response<Body> {
    let mut response = Response::new(body);
    let len = range.map_or(size, |(s, e)| e - s);
    registry_headers(&mut response, digest, "application/octet-stream", len);
    response
        .headers_mut()
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some((start, end)) = range {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1)) {
            response.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    response
}

fn manifest_response(m: Manifest, read: Read) -> Response<Body> {
    let len = m.bytes.len() as u64;
    let body = match read {
        Read::Head => body::empty(),
        Read::Get => body::full(m.bytes),
    };
    let mut response = Response::new(body);
    registry_headers(&mut response, &m.digest, &m.media_type, len);
    response
}

fn unsatisfiable(size: u64) -> Response<Body> {
    let mut response = crate::error::oci_response(&OciError::new(
        ErrorCode::RangeInvalid,
        "requested range not satisfiable",
    ));
    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
        response.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    response
}

fn not_cached(code: ErrorCode, reference: &str) -> Response<Body> {
    crate::error::oci_response(
        &OciError::new(code, "not in the cache, and the cache is offline")
            .with_detail(serde_json::json!({ "reference": reference })),
    )
}

/// A stale cached answer while the upstream fails, logged and counted.
fn stale(m: Manifest, fetch: &Fetch<'_>, tag: &str, why: impl std::fmt::Display) -> ManifestAnswer {
    tracing::warn!(upstream = fetch.upstream.name(), repo = fetch.remote.as_str(), tag, %why, "upstream failing: serving a stale tag");
    crate::metrics::cache_request("manifest", "stale");
    ManifestAnswer::Cached(m)
}

/// A registry that answers a HEAD with 200, or with a redirect to the object's storage, has
/// the object in that repository.
fn is_evidence(status: StatusCode) -> bool {
    status == StatusCode::OK || status.is_redirection()
}

/// Upstream answers that `serve_stale` covers: rate limits and server errors.
fn is_upstream_trouble(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

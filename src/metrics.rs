//! Prometheus metrics: the names ocigate exports and the process-wide recorder behind
//! `GET /metrics`. Other modules record through the helpers here so names live in one place.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

const REQUESTS: &str = "ocigate_requests_total";
const UPSTREAM_LATENCY: &str = "ocigate_upstream_request_duration_seconds";
const BYTES: &str = "ocigate_bytes_streamed_total";
const TOKEN_FETCHES: &str = "ocigate_upstream_token_fetches_total";
const TOKENS_ISSUED: &str = "ocigate_tokens_issued_total";
#[cfg(feature = "ecr")]
const CREDENTIAL_REFRESHES: &str = "ocigate_credential_refreshes_total";
const CACHE_REQUESTS: &str = "ocigate_cache_requests_total";
const CACHE_BYTES: &str = "ocigate_cache_bytes_total";
const CACHE_EVICTIONS: &str = "ocigate_cache_evictions_total";
const CACHE_COALESCED: &str = "ocigate_cache_coalesced_total";
const CACHE_REJECTED: &str = "ocigate_cache_rejected_total";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder once per process (tests start many gateways in one process).
pub fn install() {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(UPSTREAM_LATENCY.to_string()),
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            )
            .ok()?
            .install_recorder()
            .ok()?;
        Some(recorder)
    });
}

/// The Prometheus text exposition of everything recorded so far.
pub(crate) fn render() -> String {
    match HANDLE.get() {
        Some(Some(h)) => h.render(),
        _ => String::new(),
    }
}

pub(crate) fn request(route: &str, method: &str, status: u16) {
    metrics::counter!(REQUESTS, "route" => route.to_string(), "method" => method.to_string(), "status" => status.to_string())
        .increment(1);
}

pub(crate) fn upstream_latency(upstream: &str, elapsed: Duration) {
    metrics::histogram!(UPSTREAM_LATENCY, "upstream" => upstream.to_string())
        .record(elapsed.as_secs_f64());
}

/// `direction` is `download` (to clients) or `upload` (from clients).
pub(crate) fn bytes(direction: &'static str, n: u64) {
    metrics::counter!(BYTES, "direction" => direction).increment(n);
}

/// A token-server answer: a token issued, or a login refused.
pub(crate) fn token_issued(ok: bool) {
    let result = if ok { "issued" } else { "refused" };
    metrics::counter!(TOKENS_ISSUED, "result" => result).increment(1);
}

pub(crate) fn token_fetch(upstream: &str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!(TOKEN_FETCHES, "upstream" => upstream.to_string(), "result" => result)
        .increment(1);
}

/// A cloud provider's credentials refreshed (or not) for an upstream.
#[cfg(feature = "ecr")]
pub(crate) fn credential_refresh(provider: &'static str, upstream: &str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!(CREDENTIAL_REFRESHES, "provider" => provider, "upstream" => upstream.to_string(), "result" => result)
        .increment(1);
}

/// A cache-route request for a blob or manifest: `hit`, `miss`, `revalidated` (a tag
/// checked with a HEAD and still the same) or `stale` (served while the upstream failed).
pub(crate) fn cache_request(kind: &'static str, result: &'static str) {
    metrics::counter!(CACHE_REQUESTS, "kind" => kind, "result" => result).increment(1);
}

/// Bytes the cache streamed to clients from disk (`cache`) or fetched into fills (`upstream`).
pub(crate) fn cache_bytes(source: &'static str, n: u64) {
    metrics::counter!(CACHE_BYTES, "source" => source).increment(n);
}

pub(crate) fn cache_eviction() {
    metrics::counter!(CACHE_EVICTIONS).increment(1);
}

/// A request that attached to a fill already in progress instead of fetching.
pub(crate) fn cache_coalesced() {
    metrics::counter!(CACHE_COALESCED).increment(1);
}

/// Bytes refused by the cache: `digest_mismatch`, `fill_failed`, `corrupt`.
pub(crate) fn cache_rejected(reason: &'static str) {
    metrics::counter!(CACHE_REJECTED, "reason" => reason).increment(1);
}

//! `GET /v2/_catalog`: the union of every upstream's catalog, seen through the namespace
//! routes. Only names that a route maps back to are listed, under their local names;
//! exact-repository routes (capability URLs) are never listed. Paging (`n`, `last`, `Link`)
//! runs over the local names. Each upstream's list is fetched by one request at a time and
//! kept for [`LIST_TTL`], so clients paging through (or hammering) `_catalog` cost the
//! upstreams one listing per upstream per [`LIST_TTL`].

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use parking_lot::Mutex;
use serde::Deserialize;

use crate::body::{self, Body};
use crate::error::GatewayError;
use crate::oci::{ErrorCode, OciError, Scope};
use crate::rewrite::response::MAX_REWRITTEN_BODY;
use crate::rewrite::{self, LocalName, RemoteName, RouteTable};
use crate::upstream::{Authorization, Redirects, Upstream, UpstreamRequest};

/// Upstream pages read per upstream and listing, so a huge registry cannot pin the gateway.
const MAX_PAGES: usize = 50;
const PAGE_SIZE: usize = 1000;
/// How long an upstream's listing is reused.
const LIST_TTL: Duration = Duration::from_secs(30);

/// One upstream's repository names, and when they were read.
type Listing = (Instant, Arc<Vec<RemoteName>>);

/// `_catalog`, with the upstreams' recent listings by upstream name.
pub(crate) struct Catalog {
    lists: Mutex<HashMap<String, Listing>>,
    gates: crate::flight::Gates,
}

impl Default for Catalog {
    fn default() -> Catalog {
        Catalog {
            lists: Mutex::default(),
            gates: crate::flight::Gates::new(64),
        }
    }
}

impl Catalog {
    fn fresh(&self, upstream: &str) -> Option<Arc<Vec<RemoteName>>> {
        let lists = self.lists.lock();
        let (at, list) = lists.get(upstream)?;
        (at.elapsed() < LIST_TTL).then(|| list.clone())
    }

    /// `upstream`'s repository names: recent ones, or fetched once for all who ask now.
    async fn list(&self, upstream: &Upstream) -> Result<Arc<Vec<RemoteName>>, GatewayError> {
        if let Some(list) = self.fresh(upstream.name()) {
            return Ok(list);
        }
        let gate = self.gates.gate(upstream.name());
        let _turn = gate.lock().await;
        if let Some(list) = self.fresh(upstream.name()) {
            return Ok(list);
        }
        let list = Arc::new(list_upstream(upstream).await?);
        self.lists
            .lock()
            .insert(upstream.name().to_string(), (Instant::now(), list.clone()));
        Ok(list)
    }
}

#[derive(Deserialize)]
struct CatalogPage {
    #[serde(default)]
    repositories: Vec<String>,
}

impl Catalog {
    /// `GET /v2/_catalog?n&last`, over every upstream a namespace route leads to.
    pub(crate) async fn serve(
        &self,
        routes: &RouteTable,
        upstreams: &HashMap<String, Arc<Upstream>>,
        method: &Method,
        query: &str,
    ) -> Result<Response<Body>, GatewayError> {
        if method != Method::GET && method != Method::HEAD {
            return Err(OciError::new(ErrorCode::Unsupported, "catalog is read-only").into());
        }
        let names = self.local_names(routes, upstreams).await?;
        page(&names, query)
    }

    /// The local names of every upstream's repositories that a namespace route reaches.
    async fn local_names(
        &self,
        routes: &RouteTable,
        upstreams: &HashMap<String, Arc<Upstream>>,
    ) -> Result<BTreeSet<LocalName>, GatewayError> {
        // Relay routes' repositories open to relay tokens only: never listed; host routes'
        // names live inside their host, which a catalog without one does not list.
        let listed = |r: &&crate::rewrite::Route| {
            r.config.is_namespace() && !r.config.relay && r.config.host.is_none()
        };
        let mut upstream_names: Vec<&str> = routes
            .routes()
            .iter()
            .filter(listed)
            .map(|r| r.config.upstream.as_str())
            .collect();
        upstream_names.sort_unstable();
        upstream_names.dedup();
        let mut names = BTreeSet::new();
        let mut failures = Vec::new();
        for name in &upstream_names {
            let Some(upstream) = upstreams.get(*name) else {
                continue;
            };
            match self.list(upstream).await {
                Ok(remote_names) => names.extend(
                    remote_names
                        .iter()
                        // What a capability URL opens stays unlisted, whatever route covers it.
                        .filter(|r| !routes.is_exact_target(name, r))
                        .filter_map(|r| routes.to_local(name, r))
                        .filter(|local| routes.resolve(local).is_some_and(|m| listed(&m.route))),
                ),
                Err(e) => failures.push(e),
            }
        }
        match failures.into_iter().next() {
            Some(e) if names.is_empty() && upstream_names.len() == 1 => Err(e),
            _ => Ok(names),
        }
    }
}

/// One page of the sorted local names, as `n` and `last` ask.
fn page(names: &BTreeSet<LocalName>, query: &str) -> Result<Response<Body>, GatewayError> {
    let n = match rewrite::query_param(query, "n") {
        None => None,
        Some(v) => Some(v.parse::<usize>().map_err(|_| {
            OciError::new(ErrorCode::Unsupported, "n must be a non-negative integer")
                .with_status(StatusCode::BAD_REQUEST)
        })?),
    };
    let last = rewrite::query_param(query, "last");
    let after: Vec<&str> = names
        .iter()
        .map(LocalName::as_str)
        .filter(|n| last.as_deref().is_none_or(|l| *n > l))
        .collect();
    let page: Vec<&str> = match n {
        Some(n) => after.iter().take(n).copied().collect(),
        None => after.clone(),
    };
    let more = page.len() < after.len();
    let json = serde_json::json!({ "repositories": page });
    let mut response = Response::new(body::full(json.to_string()));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let (true, Some(n), Some(last_name)) = (more, n, page.last()) {
        let link = format!(
            "</v2/_catalog?last={}&n={n}>; rel=\"next\"",
            url::form_urlencoded::byte_serialize(last_name.as_bytes()).collect::<String>()
        );
        if let Ok(v) = HeaderValue::from_str(&link) {
            h.insert(header::LINK, v);
        }
    }
    Ok(response)
}

/// Every repository name one upstream lists, following its `Link` pages. An upstream that
/// refuses the catalog (Docker Hub does) contributes nothing.
async fn list_upstream(upstream: &Upstream) -> Result<Vec<RemoteName>, GatewayError> {
    let mut out = Vec::new();
    let mut next = Some(format!("/v2/_catalog?n={PAGE_SIZE}"));
    for _ in 0..MAX_PAGES {
        let Some(path_and_query) = next.take() else {
            break;
        };
        let request = UpstreamRequest {
            method: Method::GET,
            path_and_query,
            headers: HeaderMap::new(),
            body: None,
            scopes: vec![Scope::catalog()],
        };
        let response = upstream
            .send(request, &Authorization::Proxy, Redirects::PassOn)
            .await?;
        if !response.status().is_success() {
            tracing::debug!(upstream = upstream.name(), status = %response.status(), "catalog refused");
            break;
        }
        next = response
            .headers()
            .get(header::LINK)
            .and_then(|v| v.to_str().ok())
            .and_then(next_link);
        let bad = |reason: String| GatewayError::BadUpstreamAnswer {
            upstream: upstream.name().to_string(),
            what: "catalog",
            reason,
        };
        let bytes = body::read_to_limit(response.into_body(), MAX_REWRITTEN_BODY)
            .await
            .map_err(bad)?;
        let page: CatalogPage = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        out.extend(page.repositories.into_iter().map(RemoteName::new));
    }
    Ok(out)
}

/// The path of a `rel="next"` link, if it stays on the upstream's `/v2/_catalog`.
fn next_link(value: &str) -> Option<String> {
    let open = value.find('<')?;
    let close = value.find('>')?;
    let url = value.get(open + 1..close)?;
    let path = match url.find("/v2/_catalog") {
        Some(i) => &url[i..],
        None => return None,
    };
    value[close..].contains("next").then(|| path.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_links() {
        assert_eq!(
            next_link(r#"</v2/_catalog?last=a&n=2>; rel="next""#).as_deref(),
            Some("/v2/_catalog?last=a&n=2")
        );
        assert_eq!(
            next_link(r#"<https://r.io/v2/_catalog?last=b>; rel="next""#).as_deref(),
            Some("/v2/_catalog?last=b")
        );
        assert_eq!(next_link(r#"</elsewhere>; rel="next""#), None);
    }
}

//! Answers the gateway gives itself, without an upstream: the `/v2/` version check,
//! `/healthz`, `/metrics`, the forward proxy's `/ca.crt`, and browser redirects to an
//! image's web page.

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};

use crate::body::{self, Body};
use crate::oci::{ErrorCode, OciError};
use crate::rewrite::{LocalName, RouteTable};

pub(crate) fn api_base() -> Response<Body> {
    crate::error::registry_json(StatusCode::OK, "{}".into())
}

pub(crate) fn healthz() -> Response<Body> {
    text("text/plain", "ok\n".into())
}

/// The forward proxy's interception CA, for clients to trust.
pub(crate) fn ca_certificate(pem: &str) -> Response<Body> {
    text("application/x-pem-file", pem.to_string())
}

fn text(content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(body::full(body));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub(crate) fn metrics() -> Response<Body> {
    let mut r = Response::new(body::full(crate::metrics::render()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

pub(crate) fn not_found(path: &str) -> OciError {
    OciError::new(ErrorCode::NameUnknown, "not found")
        .with_detail(serde_json::json!({ "path": path }))
}

/// Whether a request looks like a person's browser rather than a registry client.
pub(crate) fn is_browser(method: &Method, headers: &HeaderMap) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html"))
}

/// Where a browser visiting `path` should go: the upstream's page for the mapped repository.
/// Never for an exact route: its page would tell anyone what the capability URL opens.
pub(crate) fn browser_target(
    routes: &RouteTable,
    upstream_host: impl Fn(&str) -> Option<String>,
    path: &str,
) -> Option<String> {
    let local = path.trim_matches('/');
    let (route, remote) = if local.is_empty() {
        let route = routes
            .routes()
            .iter()
            .find(|r| r.config.host.is_none() && r.config.prefix.is_empty())?;
        (route, route.config.remote.trim_end_matches('/').to_string())
    } else {
        let m = routes
            .resolve(&LocalName::new(local))
            .filter(|m| m.route.config.is_namespace())?;
        (m.route, m.remote.as_str().to_string())
    };
    let host = upstream_host(&route.config.upstream)?;
    if route.docker_hub {
        return Some(match remote.strip_prefix("library/") {
            Some(official) => format!("https://hub.docker.com/_/{official}"),
            None if remote.is_empty() => "https://hub.docker.com/".to_string(),
            None => format!("https://hub.docker.com/r/{remote}"),
        });
    }
    Some(format!("https://{host}/{remote}"))
}

pub(crate) fn redirect(target: &str) -> Response<Body> {
    let mut r = Response::new(body::empty());
    *r.status_mut() = StatusCode::FOUND;
    if let Ok(v) = HeaderValue::from_str(target) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

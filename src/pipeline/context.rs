//! The per-request context the phases share, and the access log written from it.
//!
//! Each phase fills in its part: `parse` the API path, upload query and local scopes;
//! `route` the [`Target`]; `admit` the [`Admission`]. Later phases only read it, and
//! `observe` turns it into one access-log line when the answer's body has gone out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response};
use url::Url;

use crate::auth::Admission;
use crate::body::{self, Body, Finish, Observed, Outcome};
use crate::forward::Intercepted;
use crate::oci::{ApiPath, Scope};
use crate::rewrite::{LocalName, NameMap, NamedHost, RemoteName, Route, UploadQuery};
use crate::server::ConnInfo;
use crate::upstream::{Authorization, Upstream};

/// What the phases know about one request.
pub(crate) struct RequestContext<'g> {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) query: Option<String>,
    /// `scheme://host` under which clients reach us, for absolute URLs we hand out.
    pub(crate) public_base: String,
    pub(crate) peer: SocketAddr,
    /// `parse`: the `/v2/` path (`None` outside the API), inside the named host if any.
    pub(crate) api: Option<ApiPath>,
    /// `parse`: the registry host the request named (`?ns=`, in-path, intercepted); `None`
    /// routes by prefix alone.
    pub(crate) host: Option<NamedHost>,
    /// Set before the phases for a request through the forward proxy: which host it is
    /// for, and the proxy user.
    pub(crate) intercepted: Option<Arc<Intercepted>>,
    /// `parse`: the query of an upload POST, decoded once (its mount `from`, once `route`
    /// ran, in remote terms).
    pub(crate) upload: Option<UploadQuery>,
    /// `parse`: what the request needs, in local names.
    pub(crate) required: Vec<Scope>,
    /// `route`: where a repository request goes; `None` for names no route covers.
    pub(crate) target: Option<Target<'g>>,
    /// `admit`: who the request acts for; `None` until admitted.
    pub(crate) admission: Option<Admission>,
    /// Label for answers that are no route's (the token endpoint).
    pub(crate) label: &'static str,
    started: Instant,
}

/// The route a repository request takes, in upstream terms.
pub(crate) struct Target<'g> {
    pub(crate) route: &'g Route,
    pub(crate) upstream: &'g Arc<Upstream>,
    pub(crate) remote: RemoteName,
    /// The scopes the request needs upstream, in remote names (a mount's `from` too).
    pub(crate) scopes: Vec<Scope>,
    /// This request's remote names with their local names, for rewriting the answer.
    pub(crate) names: NameMap,
    /// `/v2/<remote>/<endpoint>?<query>`.
    pub(crate) path_and_query: String,
    /// The absolute upstream URL of `path_and_query`.
    pub(crate) url: Url,
}

impl<'g> RequestContext<'g> {
    pub(crate) fn new<B>(public_url: Option<&Url>, req: &Request<B>, conn: &ConnInfo) -> Self {
        RequestContext {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            query: req.uri().query().map(str::to_string),
            public_base: crate::headers::public_base(public_url, req, conn.tls),
            peer: conn.peer,
            api: None,
            host: None,
            intercepted: None,
            upload: None,
            required: Vec::new(),
            target: None,
            admission: None,
            label: "-",
            started: Instant::now(),
        }
    }

    pub(crate) fn query(&self) -> &str {
        self.query.as_deref().unwrap_or_default()
    }

    /// The name the client uses for `local`, a name inside the host it named (if any).
    pub(crate) fn client_name(&self, local: &LocalName) -> LocalName {
        match &self.host {
            Some(h) => h.client_name(local),
            None => local.clone(),
        }
    }

    /// Whose authority the request goes upstream with: a relay token's upstream token, or
    /// the upstream's own credentials.
    pub(crate) fn upstream_authorization(&self) -> Authorization {
        match &self.admission {
            Some(Admission::Relay {
                upstream_token: Some(token),
            }) => Authorization::Relayed(token.clone()),
            _ => Authorization::Proxy,
        }
    }

    /// The admitted request's route, for metrics and logs: nothing about where a request
    /// would have gone is told before it is admitted.
    fn admitted_target(&self) -> Option<&Target<'g>> {
        self.admission.as_ref().and(self.target.as_ref())
    }

    /// The `observe` phase: counts and logs the request once its body has gone out.
    pub(crate) fn observe(self, response: Response<Body>) -> Response<Body> {
        let (parts, body) = response.into_parts();
        let target = self.admitted_target();
        let route = target.map_or(self.label, |t| t.route.label()).to_string();
        let upstream = target.map(|t| t.upstream.name().to_string());
        let subject = self
            .admission
            .as_ref()
            .and_then(Admission::subject)
            .map(str::to_string);
        let head = self.method == Method::HEAD;
        let log = Box::new(AccessLog {
            method: self.method,
            path: self.path,
            peer: self.peer,
            status: parts.status.as_u16(),
            route,
            upstream,
            subject,
            started: self.started,
        });
        if head {
            // Answered with its headers: the body is never sent, nor polled.
            log.finish(0, Outcome::Complete);
            return Response::from_parts(parts, body);
        }
        Response::from_parts(parts, body::boxed(Observed::new(body, log)))
    }
}

struct AccessLog {
    method: Method,
    path: String,
    peer: SocketAddr,
    status: u16,
    route: String,
    upstream: Option<String>,
    subject: Option<String>,
    started: Instant,
}

impl Finish for AccessLog {
    fn finish(self: Box<Self>, bytes: u64, outcome: Outcome) {
        crate::metrics::request(&self.route, self.method.as_str(), self.status);
        crate::metrics::bytes("download", bytes);
        tracing::info!(
            target: "ocigate::access",
            method = %self.method,
            path = %self.path,
            status = self.status,
            bytes,
            outcome = outcome.as_str(),
            duration_ms = milliseconds(self.started.elapsed()),
            route = %self.route,
            upstream = self.upstream.as_deref().unwrap_or("-"),
            subject = self.subject.as_deref().unwrap_or("-"),
            peer = %self.peer,
        );
    }
}

/// Milliseconds with microsecond precision: `0.062`, not `0.062402000000000006`.
fn milliseconds(elapsed: std::time::Duration) -> f64 {
    elapsed.as_micros() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_logged_to_the_microsecond() {
        use std::time::Duration;
        assert_eq!(milliseconds(Duration::from_nanos(62_402_123)), 62.402);
        assert_eq!(milliseconds(Duration::from_nanos(62_402)), 0.062);
        assert_eq!(milliseconds(Duration::ZERO), 0.0);
    }
}

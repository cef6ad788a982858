//! The driver: the life of one request, stage by stage.
//!
//! 1. **parse** the path into an [`ApiPath`] (or answer locally: health, metrics, browser
//!    redirects);
//! 2. **client auth**: the client's bearer token must cover the request ([`crate::auth`]);
//!    only then `/v2/` and `_catalog` are answered;
//! 3. **rewrite**: pick the route, map local names to remote ones ([`crate::rewrite`]);
//! 4. **upstream**: credentials, token dance and pooled send ([`crate::upstream`]);
//! 5. **response rewriting**: `Location`, `Link`, `tags/list` names; an upstream's 401 becomes
//!    our own answer, never its challenge;
//! 6. **observe**: one access-log line and the metrics, when the body has finished streaming.
//!
//! Stages see a [`RequestContext`], not the gateway. Errors become answers only in
//! [`GatewayError::into_response`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use url::Url;

use crate::auth::ClientAuth;
use crate::auth::keys::KeyError;
use crate::body::{self, Body, Finish, Observed, Outcome};
use crate::cache::{self, Cache, CacheOpenError};
use crate::config::{Config, RedirectPolicy};
use crate::error::GatewayError;
use crate::local;
use crate::oci::{ApiPath, Endpoint, ErrorCode, OciError, Scope};
use crate::relay::{Relay, RelayError};
use crate::rewrite::{self, NameMap, Route, RouteTable, UploadQuery};
use crate::token::{TokenServer, TokenSetupError};
use crate::upstream::{Upstream, UpstreamBuildError, UpstreamRequest};

/// Largest upstream JSON answer the gateway reads in order to rewrite it (tags, catalog).
pub const MAX_REWRITTEN_BODY: usize = 16 << 20;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Everything shared by all requests: the config, the route table and the upstreams.
pub struct Gateway {
    pub config: Config,
    pub routes: RouteTable,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub auth: Option<ClientAuth>,
    pub token_server: Option<TokenServer>,
    pub relay: Option<Relay>,
    pub cache: Option<Cache>,
    /// Recent upstream catalogs, for `_catalog`.
    pub listings: crate::catalog::Listings,
}

/// What can stop a gateway from being built out of a valid config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Upstream(#[from] UpstreamBuildError),
    #[error("auth.token: {0}")]
    Auth(#[from] KeyError),
    #[error(transparent)]
    TokenServer(#[from] TokenSetupError),
    #[error("relay: {0}")]
    Relay(#[from] RelayError),
    #[error(transparent)]
    Cache(#[from] CacheOpenError),
}

/// What the stages know about one request.
#[derive(Debug)]
pub struct RequestContext {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    /// `scheme://host` under which clients reach us, for absolute URLs we hand out.
    pub public_base: String,
    pub peer: SocketAddr,
    /// Route label for metrics and logs; `-` when no route was involved.
    pub route: String,
    /// The verified client token's subject, for logs.
    pub subject: Option<String>,
    pub upstream: Option<String>,
    pub names: NameMap,
}

impl Gateway {
    /// The gateway a server runs: it owns the cache directory.
    pub fn new(config: Config) -> Result<Gateway, BuildError> {
        Gateway::build(config, true)
    }

    /// `owner: false` for CLI commands that may run beside a server (`ocigate cache warm`).
    pub fn build(config: Config, owner: bool) -> Result<Gateway, BuildError> {
        let offline = config.cache.as_ref().is_some_and(|c| c.offline);
        let mut upstreams = HashMap::new();
        for (name, u) in &config.upstreams {
            upstreams.insert(name.clone(), Arc::new(Upstream::new(u.clone(), offline)?));
        }
        let routes = RouteTable::new(
            config
                .routes
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    Route::new(
                        r.clone(),
                        config.upstreams[&r.upstream].is_docker_hub(),
                        i + 1,
                    )
                })
                .collect(),
        );
        let auth = match &config.auth {
            Some(a) => Some(ClientAuth::new(&a.token, &a.anonymous)?),
            None => None,
        };
        let token_server = match &config.token_server {
            Some(t) => Some(TokenServer::new(t)?),
            None => None,
        };
        let relay = match &config.relay {
            Some(r) => Some(Relay::new(
                r,
                config
                    .token_server
                    .as_ref()
                    .map_or(crate::relay::endpoint::PATH, |t| t.path.as_str()),
            )?),
            None => None,
        };
        let cache = match &config.cache {
            Some(c) => Some(Cache::open(c, owner)?),
            None => None,
        };
        Ok(Gateway {
            config,
            routes,
            upstreams,
            auth,
            token_server,
            relay,
            cache,
            listings: Default::default(),
        })
    }

    /// Network start-up work before serving: cloud credentials are fetched now, so a broken
    /// provider stops the start instead of failing the first pull.
    pub async fn start(&self) -> Result<(), BuildError> {
        for upstream in self.upstreams.values() {
            upstream.start().await?;
        }
        Ok(())
    }

    /// `ocigate cache warm`: fetches an image (`name[:tag|@digest]` in local names; every
    /// platform of an index) into the cache. Returns how many manifests and blobs it holds.
    pub async fn warm(&self, image: &str) -> Result<(usize, usize), GatewayError> {
        let unknown = |message: &str| {
            GatewayError::Oci(
                OciError::new(ErrorCode::NameUnknown, message)
                    .with_detail(serde_json::json!({ "image": image })),
            )
        };
        let cache = self
            .cache
            .as_ref()
            .ok_or_else(|| unknown("the config has no cache section"))?;
        let (name, reference) = split_image(image)?;
        let mapped = self
            .routes
            .resolve(&name)
            .filter(|m| m.route.config.cache)
            .ok_or_else(|| unknown("no cache route for this name"))?;
        let upstream = self
            .upstreams
            .get(&mapped.route.config.upstream)
            .ok_or_else(|| unknown("route has no upstream"))?;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static(cache::ACCEPT_ALL_MANIFESTS),
        );
        let fetch = cache::Fetch {
            upstream,
            remote: &mapped.remote,
            scopes: vec![Scope::repository(&mapped.remote, &["pull"])],
            relayed: None,
            headers: &headers,
        };
        let accept = cache::accept_key(&headers);
        let mut pending = vec![reference];
        let (mut manifests, mut blobs) = (0, 0);
        while let Some(reference) = pending.pop() {
            let m = match cache.manifest(&reference, &accept, false, &fetch).await? {
                cache::ManifestAnswer::Cached(m) => m,
                cache::ManifestAnswer::Upstream(r) => {
                    return Err(unknown(&format!(
                        "the upstream answered {} for {}",
                        r.status(),
                        reference.as_str()
                    )));
                }
                cache::ManifestAnswer::NotCached => return Err(unknown("not cached (offline)")),
            };
            manifests += 1;
            pending.extend(
                crate::oci::manifest::child_manifests(&m.bytes)
                    .into_iter()
                    .map(crate::oci::Reference::Digest),
            );
            for digest in crate::oci::manifest::blob_digests(&m.bytes) {
                if !cache.warm_blob(&digest, &fetch).await? {
                    return Err(unknown(&format!("could not fetch blob {digest}")));
                }
                blobs += 1;
            }
        }
        Ok((manifests, blobs))
    }

    /// Serves one request; never fails (errors are answers).
    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let started = Instant::now();
        let mut ctx = RequestContext {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            query: req.uri().query().map(str::to_string),
            public_base: public_base(&self.config, &req, conn),
            peer: conn.peer,
            route: "-".into(),
            subject: None,
            upstream: None,
            names: NameMap::default(),
        };
        let response = match self.process(&mut ctx, req).await {
            Ok(r) => r,
            Err(e) => {
                if matches!(
                    e,
                    GatewayError::Upstream(_) | GatewayError::BadUpstreamAnswer { .. }
                ) {
                    tracing::warn!(path = %ctx.path, error = %e, "upstream failure");
                }
                e.into_response()
            }
        };
        observe(ctx, response, started)
    }

    async fn process(
        &self,
        ctx: &mut RequestContext,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, GatewayError> {
        let token_path = self
            .token_server
            .as_ref()
            .map(TokenServer::path)
            .or(self.relay.as_ref().map(Relay::path));
        if token_path == Some(ctx.path.as_str()) {
            ctx.route = "token".into();
            return self.token_endpoint(req, ctx.peer.ip()).await;
        }
        let api = match ApiPath::parse(&ctx.path) {
            None => return self.non_api(ctx, &req),
            Some(parsed) => parsed?,
        };
        if matches!(api.endpoint, Endpoint::UploadStart | Endpoint::Upload(_)) {
            refuse_form_body(req.headers())?;
        }
        // Every POST on an upload path is checked as an upload start: that is what a registry
        // may take it for, mount and all.
        let upload = match (&api.endpoint, &ctx.method) {
            (Endpoint::UploadStart | Endpoint::Upload(_), &Method::POST) => Some(
                UploadQuery::parse(ctx.query.as_deref().unwrap_or_default())?,
            ),
            _ => None,
        };
        let mount_from = upload.as_ref().and_then(UploadQuery::from);
        let required = crate::auth::required_scopes(&ctx.method, &api, mount_from);
        let authorization = req.headers().get(header::AUTHORIZATION);
        // On relay routes the client shows a relay token, checked by the relay stage.
        let on_relay_route =
            self.relay.is_some() && api.name.as_deref().is_some_and(|n| self.is_relay_name(n));
        match (&self.auth, &self.relay) {
            (Some(auth), _) if !on_relay_route => {
                match auth.check(authorization, &required, &ctx.public_base).await {
                    Ok(subject) => ctx.subject = subject,
                    // `/v2/` takes a relay token too: clients of relay routes only hold those.
                    Err(denied) => {
                        let relay_login = api.endpoint == Endpoint::Base
                            && self.relay.as_ref().is_some_and(|r| {
                                self.relay_admits_base(r, authorization, ctx).is_ok()
                            });
                        if !relay_login {
                            return Err(GatewayError::Denied(denied));
                        }
                    }
                }
            }
            (None, Some(relay)) if api.endpoint == Endpoint::Base => {
                self.relay_admits_base(relay, authorization, ctx)
                    .map_err(GatewayError::Denied)?;
            }
            _ => {}
        }
        match &api.endpoint {
            Endpoint::Base => Ok(local::api_base()),
            Endpoint::Catalog => crate::catalog::serve(self, ctx).await,
            _ => self.proxy(ctx, api, upload, &required, req).await,
        }
    }

    /// The token endpoint. With the token server, clients log in there; scopes on relay
    /// routes come back sealed in a relay token, cut down to what the ACL grants (the relay
    /// never widens what a client may do). Without it, the relay's own anonymous endpoint.
    async fn token_endpoint(
        &self,
        req: Request<Incoming>,
        peer: std::net::IpAddr,
    ) -> Result<Response<Body>, GatewayError> {
        use crate::relay::endpoint;
        match (&self.token_server, &self.relay) {
            (Some(ts), relay) => {
                let login = ts.login(req, peer).await?;
                if let Some(relay) = relay
                    && login.scopes().iter().any(|s| self.is_relay_name(&s.name))
                {
                    let granted = ts.granted(&login);
                    return endpoint::issue(
                        relay,
                        &self.routes,
                        &self.upstreams,
                        login.scopes(),
                        &granted,
                    )
                    .await;
                }
                ts.answer(login)
            }
            (None, Some(relay)) => {
                let scopes = endpoint::requested_scopes(req).await?;
                endpoint::issue(relay, &self.routes, &self.upstreams, &scopes, &scopes).await
            }
            (None, None) => Err(local::not_found("/token").into()),
        }
    }

    fn is_relay_name(&self, local: &str) -> bool {
        self.routes
            .resolve(local)
            .is_some_and(|m| m.route.config.relay)
    }

    /// Whether `/v2/` may answer a client that shows a relay token.
    fn relay_admits_base(
        &self,
        relay: &Relay,
        authorization: Option<&HeaderValue>,
        ctx: &RequestContext,
    ) -> Result<(), crate::auth::Denied> {
        let relay_routes = self
            .routes
            .routes()
            .iter()
            .filter(|r| r.config.relay)
            .map(|r| r.config.prefix.as_str());
        relay.admit_base(authorization, relay_routes, &ctx.public_base)
    }

    fn non_api(
        &self,
        ctx: &RequestContext,
        req: &Request<Incoming>,
    ) -> Result<Response<Body>, GatewayError> {
        match ctx.path.as_str() {
            "/healthz" => return Ok(local::healthz()),
            "/metrics" if self.config.server.metrics_listen.is_none() => {
                return Ok(local::metrics());
            }
            _ => {}
        }
        if self.config.server.browser_redirects && local::is_browser(&ctx.method, req.headers()) {
            let host = |name: &str| {
                self.upstreams
                    .get(name)
                    .and_then(|u| u.config.url.host_str().map(str::to_string))
            };
            if let Some(target) = local::browser_target(&self.routes, host, &ctx.path) {
                return Ok(local::redirect(&target));
            }
        }
        Err(local::not_found(&ctx.path).into())
    }

    /// Stages 3–5 for a repository endpoint. `required` is what the request needs, in local
    /// names, for answering an upstream refusal.
    async fn proxy(
        &self,
        ctx: &mut RequestContext,
        api: ApiPath,
        upload: Option<UploadQuery>,
        required: &[Scope],
        req: Request<Incoming>,
    ) -> Result<Response<Body>, GatewayError> {
        let local_name = api.name.clone().unwrap_or_default();
        let mapped = self.routes.resolve(&local_name).ok_or_else(|| {
            OciError::new(
                ErrorCode::NameUnknown,
                "repository name not known to registry",
            )
            .with_detail(serde_json::json!({ "name": local_name }))
        })?;
        let upstream = self
            .upstreams
            .get(&mapped.route.config.upstream)
            .cloned()
            .ok_or_else(|| OciError::new(ErrorCode::NameUnknown, "route has no upstream"))?;
        ctx.route = mapped.route.label().to_string();
        ctx.upstream = Some(upstream.name().to_string());
        ctx.names.add(&mapped.remote, &local_name);

        let mut scopes = vec![Scope::repository(
            &mapped.remote,
            crate::oci::required_actions(&ctx.method),
        )];
        let query = match upload {
            Some(mut q) => {
                self.rewrite_mount(ctx, &mut q, &mapped.route.config.upstream, &mut scopes);
                Some(q.encode())
            }
            // A mount the auth stage did not check never reaches the upstream.
            None => ctx.query.as_deref().map(rewrite::without_mount),
        };
        let mut path_and_query = format!("/v2/{}/{}", mapped.remote, api.suffix());
        if let Some(q) = query.as_deref().filter(|q| !q.is_empty()) {
            path_and_query.push('?');
            path_and_query.push_str(q);
        }

        // Relay routes: the client's PASETO is exchanged for the upstream token it carries.
        let relayed = match (&self.relay, mapped.route.config.relay) {
            (Some(relay), true) => relay
                .admit(
                    req.headers().get(header::AUTHORIZATION),
                    &mapped.route.config.prefix,
                    upstream.name(),
                    required,
                    &ctx.public_base,
                )
                .map_err(GatewayError::Denied)?,
            _ => None,
        };
        let is_relay_route = mapped.route.config.relay;
        let (parts, incoming) = req.into_parts();
        let mut headers = forward_headers(&parts.headers);
        if api.endpoint == Endpoint::Tags {
            // The tags body is rewritten: it must arrive as plain JSON.
            headers.remove(header::ACCEPT_ENCODING);
        }
        let body = (!incoming.is_end_stream())
            .then(|| body::boxed(Observed::new(body::boxed(incoming), Box::new(UploadBytes))));
        let cached = match &self.cache {
            Some(cache) if mapped.route.config.cache => {
                let fetch = cache::Fetch {
                    upstream: &upstream,
                    remote: &mapped.remote,
                    scopes: scopes.clone(),
                    relayed: relayed.clone(),
                    headers: &headers,
                };
                cache.serve(&ctx.method, &api.endpoint, &fetch).await?
            }
            _ => cache::Outcome::Pass,
        };
        let response = match cached {
            cache::Outcome::Served(r) => return Ok(r),
            cache::Outcome::Upstream(r) => r,
            cache::Outcome::Pass => {
                let request = UpstreamRequest {
                    method: parts.method.clone(),
                    path_and_query: path_and_query.clone(),
                    headers,
                    body,
                    scopes,
                };
                match relayed {
                    Some(token) => upstream.send_as(request, token).await?,
                    None => upstream.send(request).await?,
                }
            }
        };
        // Deleted upstream, gone from the cache's evidence: whatever route it went through.
        if ctx.method == Method::DELETE
            && response.status().is_success()
            && let Some(cache) = &self.cache
        {
            cache.deleted(upstream.name(), &mapped.remote, &api.endpoint);
        }
        if response.status() == StatusCode::UNAUTHORIZED {
            if let (true, Some(relay)) = (is_relay_route, &self.relay) {
                // The relayed token no longer works upstream: the client gets a fresh one.
                return Err(GatewayError::Denied(relay.refusal(
                    &ctx.public_base,
                    required,
                    Some("invalid_token"),
                    "the upstream refused the relayed token",
                )));
            }
            return Err(self.upstream_refused(ctx, upstream.name(), required));
        }
        let asked = upstream.url(&path_and_query)?;
        let is_blob_read = matches!(api.endpoint, Endpoint::Blob(_))
            && (ctx.method == Method::GET || ctx.method == Method::HEAD);
        let response = if is_blob_read
            && response.status().is_redirection()
            && upstream.config.redirects == RedirectPolicy::Follow
        {
            upstream
                .follow_redirects(response, &ctx.method, asked.clone(), &parts.headers)
                .await?
        } else {
            response
        };
        rewrite_response(ctx, &upstream, &asked, &api, response).await
    }

    /// Maps `from=` of a cross-repository mount to its remote name. A `from` that is not routed
    /// to the same upstream, or is on a relay route, cannot be mounted there: the mount is dropped and the registry
    /// answers with a plain upload session, as the spec allows.
    fn rewrite_mount(
        &self,
        ctx: &mut RequestContext,
        query: &mut UploadQuery,
        upstream: &str,
        scopes: &mut Vec<Scope>,
    ) {
        let Some(from) = query.from().map(str::to_string) else {
            return;
        };
        // Never from a relay route: its repositories are opened only by relay tokens, which
        // the auth stage does not check (`auth.anonymous` could cover the `from` there).
        match self.routes.resolve(&from) {
            Some(m) if m.route.config.upstream == upstream && !m.route.config.relay => {
                ctx.names.add(&m.remote, &from);
                scopes.push(Scope::repository(&m.remote, &["pull"]));
                query.set_from(Some(&m.remote));
            }
            _ => query.set_from(None),
        }
    }

    /// The upstream refused the proxy's own credentials (after a fresh token). Its challenge
    /// is never passed on: clients send the credentials they hold for *this* host to
    /// whatever realm a challenge names. With client auth, the answer is our own challenge;
    /// without, a plain 403.
    fn upstream_refused(
        &self,
        ctx: &RequestContext,
        upstream: &str,
        required: &[Scope],
    ) -> GatewayError {
        let body = OciError::new(ErrorCode::Denied, "the upstream registry refused access")
            .with_detail(serde_json::json!({ "upstream": upstream }));
        match &self.auth {
            Some(auth) => GatewayError::Denied(auth.refusal(
                required,
                &ctx.public_base,
                Some("insufficient_scope"),
                body,
            )),
            None => GatewayError::Oci(body),
        }
    }
}

/// `name:tag`, `name@digest` or `name` (`latest`), validated.
fn split_image(image: &str) -> Result<(String, crate::oci::Reference), OciError> {
    use crate::oci::Reference;
    let (name, reference) = match image.split_once('@') {
        Some((name, digest)) => {
            crate::oci::path::validate_digest(digest)?;
            (name, Reference::Digest(digest.to_string()))
        }
        None => match image.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
            Some((name, tag)) => {
                crate::oci::path::validate_tag(tag)?;
                (name, Reference::Tag(tag.to_string()))
            }
            None => (image, Reference::Tag("latest".into())),
        },
    };
    crate::oci::path::validate_name(name)?;
    Ok((name.to_string(), reference))
}

struct UploadBytes;

impl Finish for UploadBytes {
    fn finish(self: Box<Self>, bytes: u64, _outcome: Outcome) {
        crate::metrics::bytes("upload", bytes);
    }
}

/// Registries read upload parameters (`mount`, `from`, `digest`) from form bodies as well as
/// from the query, so a form body could carry a mount past the auth stage: upload endpoints
/// take none. A `Content-Type` that cannot be read is refused too.
fn refuse_form_body(headers: &HeaderMap) -> Result<(), OciError> {
    let is_form = |v: &HeaderValue| {
        v.to_str().map_or(true, |t| {
            let essence = crate::oci::manifest::essence(t);
            essence == "application/x-www-form-urlencoded" || essence.starts_with("multipart/")
        })
    };
    if headers.get_all(header::CONTENT_TYPE).iter().any(is_form) {
        return Err(OciError::new(
            ErrorCode::Unsupported,
            "upload bodies are blob bytes: form bodies are not accepted",
        )
        .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE));
    }
    Ok(())
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the ones a proxy must not pass on.
fn is_hop_by_hop(name: &header::HeaderName, connection_listed: &[String]) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    ) || connection_listed.iter().any(|c| c == name.as_str())
}

fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect()
}

/// The client's headers as the upstream may see them: never the client's `Authorization`
/// (its token is for us, not for the upstream), never `Host` or hop-by-hop headers, and no
/// forwarding headers: they describe the client's hop to us, and a registry that trusted
/// them would build its `Location`s on our public host with its own names.
pub fn forward_headers(headers: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(headers);
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let dropped = is_hop_by_hop(name, &listed)
            || name == header::HOST
            || name == header::AUTHORIZATION
            || name == header::EXPECT
            || name == header::COOKIE
            || name == header::FORWARDED
            || name.as_str().starts_with("x-forwarded-");
        if !dropped {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed = connection_listed(headers);
    let names: Vec<header::HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n, &listed))
        .cloned()
        .collect();
    for n in names {
        headers.remove(n);
    }
}

/// `scheme://host` for absolute URLs handed to clients: `server.public_url`, else the
/// forwarded or direct `Host` with the forwarded or actual scheme.
fn public_base<B>(config: &Config, req: &Request<B>, conn: ConnInfo) -> String {
    if let Some(url) = &config.server.public_url {
        return url.as_str().trim_end_matches('/').to_string();
    }
    let first = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let scheme = first("x-forwarded-proto")
        .filter(|p| p == "http" || p == "https")
        .unwrap_or_else(|| if conn.tls { "https" } else { "http" }.to_string());
    let host = first("x-forwarded-host")
        .or_else(|| first("host"))
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'@')
        })
        .unwrap_or_else(|| "localhost".to_string());
    format!("{scheme}://{host}")
}

/// Stage 4: upstream names and URLs become local ones.
async fn rewrite_response(
    ctx: &RequestContext,
    upstream: &Upstream,
    asked: &Url,
    api: &ApiPath,
    response: Response<Incoming>,
) -> Result<Response<Body>, GatewayError> {
    let (mut parts, incoming) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(loc) = parts.headers.get(header::LOCATION).cloned()
        && let Some(new) = loc.to_str().ok().and_then(|l| rewrite_url(ctx, asked, l))
        && let Ok(v) = HeaderValue::from_str(&new)
    {
        parts.headers.insert(header::LOCATION, v);
    }
    rewrite_links(ctx, asked, &mut parts.headers);

    let is_tags = api.endpoint == Endpoint::Tags
        && ctx.method == Method::GET
        && parts.status == StatusCode::OK;
    let query = ctx.query.as_deref().unwrap_or_default();
    let client_pages = ["n", "last"]
        .iter()
        .any(|k| rewrite::query_param(query, k).is_some());
    let body = if is_tags && client_pages && !parts.headers.contains_key(header::LINK) {
        // The client asked for a page the upstream did not cut: the whole list is read (a
        // few at a time) and one page of it kept.
        let local = api.name.clone().unwrap_or_default();
        let _turn = PAGING.acquire().await;
        let bytes = read_json_body(upstream, incoming, "tags list").await?;
        let page = rewrite_tags_list(&bytes, &local, query).map_err(|reason| {
            GatewayError::BadUpstreamAnswer {
                upstream: upstream.name().to_string(),
                what: "tags list",
                reason,
            }
        })?;
        if let Some(link) = page.link.and_then(|l| HeaderValue::from_str(&l).ok()) {
            parts.headers.insert(header::LINK, link);
        }
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(page.body.len()));
        body::full(page.body)
    } else if is_tags {
        // Renamed as it streams: a list of any size costs a frame of memory.
        let mut rename = rewrite::TagsNameRewrite::new(api.name.as_deref().unwrap_or_default());
        parts.headers.remove(header::CONTENT_LENGTH);
        body::boxed(incoming.map_frame(move |frame| frame.map_data(|d| rename.feed(d))))
    } else {
        body::boxed(incoming)
    };
    Ok(Response::from_parts(parts, body))
}

/// Reads a small JSON answer that must be rewritten, refusing anything oversized.
pub async fn read_json_body(
    upstream: &Upstream,
    incoming: Incoming,
    what: &'static str,
) -> Result<Bytes, GatewayError> {
    Limited::new(incoming, MAX_REWRITTEN_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| GatewayError::BadUpstreamAnswer {
            upstream: upstream.name().to_string(),
            what,
            reason: e.to_string(),
        })
}

/// Tags lists cut into pages here at once: each holds a whole upstream list in memory.
static PAGING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Tags in one page cut here, at most: a page a client reads slowly stays small.
const MAX_TAGS_PAGE: usize = 1000;

struct TagsPage {
    body: Vec<u8>,
    link: Option<String>,
}

#[derive(serde::Deserialize)]
struct UpstreamTags<'a> {
    #[serde(borrow, default)]
    tags: Option<Vec<std::borrow::Cow<'a, str>>>,
}

/// The page of a tags list that the client asked for (`n`, `last`) when the upstream ignored
/// it (distribution 2.x does): in lexical order, at most [`MAX_TAGS_PAGE`] tags, with a `Link`
/// to the next page; named locally.
fn rewrite_tags_list(bytes: &[u8], local: &str, query: &str) -> Result<TagsPage, String> {
    let list: UpstreamTags = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let asked = rewrite::query_param(query, "n").and_then(|n| n.parse::<usize>().ok());
    let n = asked.unwrap_or(MAX_TAGS_PAGE).min(MAX_TAGS_PAGE);
    let last = rewrite::query_param(query, "last");
    let mut names: Vec<&str> = list
        .tags
        .iter()
        .flatten()
        .map(|t| t.as_ref())
        .filter(|t| last.as_deref().is_none_or(|l| *t > l))
        .collect();
    names.sort_unstable();
    let mut link = None;
    if names.len() > n {
        names.truncate(n);
        if let Some(last_tag) = names.last() {
            link = Some(format!(
                "</v2/{local}/tags/list?last={last_tag}&n={n}>; rel=\"next\""
            ));
        }
    }
    let body = serde_json::to_vec(&serde_json::json!({ "name": local, "tags": names }))
        .map_err(|e| e.to_string())?;
    Ok(TagsPage { body, link })
}

/// A URL the upstream handed out, as the client must see it. Upstream `/v2/` URLs of this
/// request's names point back at us; anything else (object storage, other hosts) is made
/// absolute against the upstream and otherwise left alone.
fn rewrite_url(ctx: &RequestContext, asked: &Url, value: &str) -> Option<String> {
    let absolute = asked.join(value).ok()?;
    if absolute.origin() == asked.origin() {
        let mut path = absolute.path().to_string();
        if let Some(q) = absolute.query() {
            path.push('?');
            path.push_str(q);
        }
        if let Some(local) = ctx.names.path(&path) {
            return Some(format!("{}{local}", ctx.public_base));
        }
    }
    Some(absolute.to_string())
}

fn rewrite_links(ctx: &RequestContext, asked: &Url, headers: &mut HeaderMap) {
    let values: Vec<String> = headers
        .get_all(header::LINK)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    if values.is_empty() {
        return;
    }
    headers.remove(header::LINK);
    for v in values {
        let new = rewrite::link_header(&v, |u| {
            if u.starts_with('/') {
                // Keep relative links relative: clients resolve them against us.
                ctx.names.path(u)
            } else {
                rewrite_url(ctx, asked, u)
            }
        });
        if let Ok(hv) = HeaderValue::from_str(&new) {
            headers.append(header::LINK, hv);
        }
    }
}

/// Stage 5: count and log the request once its body has gone out.
fn observe(ctx: RequestContext, response: Response<Body>, started: Instant) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let log = AccessLog {
        status: parts.status.as_u16(),
        ctx,
        started,
    };
    Response::from_parts(parts, body::boxed(Observed::new(body, Box::new(log))))
}

struct AccessLog {
    ctx: RequestContext,
    status: u16,
    started: Instant,
}

impl Finish for AccessLog {
    fn finish(self: Box<Self>, bytes: u64, outcome: Outcome) {
        let c = &self.ctx;
        crate::metrics::request(&c.route, c.method.as_str(), self.status);
        crate::metrics::bytes("download", bytes);
        tracing::info!(
            target: "ocigate::access",
            method = %c.method,
            path = %c.path,
            status = self.status,
            bytes,
            outcome = outcome.as_str(),
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            route = %c.route,
            upstream = c.upstream.as_deref().unwrap_or("-"),
            subject = c.subject.as_deref().unwrap_or("-"),
            peer = %c.peer,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_headers_drop_credentials_and_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client"),
        );
        h.insert(header::HOST, HeaderValue::from_static("proxy"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
        h.append(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
        );
        h.insert(header::RANGE, HeaderValue::from_static("bytes=0-9"));
        h.insert(
            "x-forwarded-host",
            HeaderValue::from_static("public.example.com"),
        );
        h.insert(
            header::FORWARDED,
            HeaderValue::from_static("host=public.example.com"),
        );
        let out = forward_headers(&h);
        assert!(out.get("x-forwarded-host").is_none());
        assert!(out.get(header::FORWARDED).is_none());
        assert!(out.get(header::AUTHORIZATION).is_none());
        assert!(out.get(header::HOST).is_none());
        assert!(out.get("x-private").is_none());
        assert!(out.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(out.get_all(header::ACCEPT).iter().count(), 2);
        assert_eq!(out.get(header::RANGE).unwrap(), "bytes=0-9");
    }

    fn context(names: &[(&str, &str)]) -> RequestContext {
        let mut ctx = RequestContext {
            method: Method::GET,
            path: "/v2/x".into(),
            query: None,
            public_base: "https://r.example.com".into(),
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
            route: "-".into(),
            subject: None,
            upstream: None,
            names: NameMap::default(),
        };
        for (remote, local) in names {
            ctx.names.add(remote, local);
        }
        ctx
    }

    #[test]
    fn upstream_urls_become_local_and_relative_redirects_absolute() {
        let ctx = context(&[("team/app", "mirror/app")]);
        let asked = Url::parse("https://up.example.com/v2/team/app/blobs/uploads/").unwrap();
        let rewrite = |v: &str| rewrite_url(&ctx, &asked, v).unwrap();
        // Upload sessions, relative or absolute, point back at the proxy under the local name.
        assert_eq!(
            rewrite("/v2/team/app/blobs/uploads/u1?_state=x%2By"),
            "https://r.example.com/v2/mirror/app/blobs/uploads/u1?_state=x%2By"
        );
        assert_eq!(
            rewrite("https://up.example.com/v2/team/app/blobs/uploads/u1"),
            "https://r.example.com/v2/mirror/app/blobs/uploads/u1"
        );
        // A relative blob redirect (Artifact Registry's style) is resolved against the upstream.
        assert_eq!(
            rewrite("/artifacts-downloads/namespaces/p/blobs/abc?sig=1"),
            "https://up.example.com/artifacts-downloads/namespaces/p/blobs/abc?sig=1"
        );
        // Object storage elsewhere is left alone.
        assert_eq!(
            rewrite("https://bucket.s3.example.net/data?X-Amz-Signature=z"),
            "https://bucket.s3.example.net/data?X-Amz-Signature=z"
        );
        // Another host's /v2/ path is not ours to rewrite.
        assert_eq!(
            rewrite("https://other.example.com/v2/team/app/blobs/uploads/u1"),
            "https://other.example.com/v2/team/app/blobs/uploads/u1"
        );
    }

    #[test]
    fn tags_list_name_is_local() {
        let page = rewrite_tags_list(
            br#"{"name":"team/app","tags":["b","a"]}"#,
            "mirror/app",
            "n=5",
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&page.body).unwrap();
        assert_eq!(v["name"], "mirror/app");
        assert_eq!(v["tags"], serde_json::json!(["a", "b"]));
        assert!(page.link.is_none());
        assert!(rewrite_tags_list(b"[1]", "x", "n=1").is_err());
    }

    #[test]
    fn tags_list_is_paged_when_the_upstream_does_not() {
        let body = br#"{"name":"team/app","tags":["t3","t1","t4","t2"]}"#;
        let page = rewrite_tags_list(body, "m/app", "n=2").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&page.body).unwrap();
        assert_eq!(v["tags"], serde_json::json!(["t1", "t2"]));
        assert_eq!(
            page.link.as_deref(),
            Some(r#"</v2/m/app/tags/list?last=t2&n=2>; rel="next""#)
        );
        let page = rewrite_tags_list(body, "m/app", "n=2&last=t2").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&page.body).unwrap();
        assert_eq!(v["tags"], serde_json::json!(["t3", "t4"]));
        assert!(page.link.is_none());
        // A page is never larger than MAX_TAGS_PAGE, whatever `n` says.
        let many: Vec<String> = (0..MAX_TAGS_PAGE + 5).map(|i| format!("t{i:05}")).collect();
        let body = serde_json::to_vec(&serde_json::json!({"name": "x", "tags": many})).unwrap();
        let page = rewrite_tags_list(&body, "m/app", "n=100000").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&page.body).unwrap();
        assert_eq!(v["tags"].as_array().unwrap().len(), MAX_TAGS_PAGE);
        assert!(page.link.unwrap().contains(&format!("n={MAX_TAGS_PAGE}")));
    }
}

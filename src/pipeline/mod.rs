//! The driver: builds the [`RequestContext`], runs the phases in the order `lib.rs` lists,
//! and turns the outcome into one answer. Phases are methods of [`Gateway`]; they never call
//! each other, and only `parse`, `route` and `admit` write the context (besides the log
//! label of token-endpoint answers). Errors become answers in one place
//! ([`GatewayError::into_response`]).

pub(crate) mod context;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body::Body as _;

use crate::auth::keys::KeyError;
use crate::auth::{Admission, ClientAuth};
use crate::body::{self, Body, BoxError, Finish, Observed, Outcome};
use crate::cache::{self, Cache, CacheOpenError, Ownership};
use crate::catalog::Catalog;
use crate::config::{Config, RedirectPolicy, UpstreamConfig};
use crate::error::GatewayError;
use crate::forward::{ForwardProxy, ForwardSetupError, InterceptTarget};
use crate::local;
use crate::oci::challenge::BearerError;
use crate::oci::host::{RegistryHost, looks_like_host};
use crate::oci::{ApiPath, Endpoint, ErrorCode, OciError, Scope};
use crate::relay::{Relay, RelayError};
use crate::rewrite::response::{Answering, TagsQuery};
use crate::rewrite::{LocalName, NameMap, NamedHost, Naming, RouteTable, UploadQuery};
use crate::server::{self, ConnInfo, Connect, Via};
use crate::token::{TokenServer, TokenSetupError};
use crate::upstream::client::Transport;
use crate::upstream::{Offline, Redirects, Upstream, UpstreamBuildError, UpstreamRequest};
pub(crate) use context::{RequestContext, Target};

/// Everything shared by all requests: the config, the route table and the upstreams.
pub struct Gateway {
    pub config: Config,
    pub routes: RouteTable,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub(crate) auth: Option<ClientAuth>,
    pub(crate) token_server: Option<TokenServer>,
    pub(crate) relay: Option<Relay>,
    pub cache: Option<Cache>,
    pub(crate) catalog: Catalog,
    pub(crate) forward: Option<Arc<ForwardProxy>>,
    /// The registry listeners' bound addresses (ports chosen at start included), for the
    /// forward proxy's `/setup/containerd`.
    listening: std::sync::OnceLock<Vec<std::net::SocketAddr>>,
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
    #[error(transparent)]
    ForwardProxy(#[from] ForwardSetupError),
}

impl Gateway {
    /// The gateway a server runs: it owns the cache directory.
    pub fn new(config: Config) -> Result<Gateway, BuildError> {
        Gateway::build(config, Ownership::Owner)
    }

    /// A gateway whose upstreams are reached over the network.
    pub fn build(config: Config, ownership: Ownership) -> Result<Gateway, BuildError> {
        Gateway::assemble(config, ownership, None)
    }

    /// `transport`: where every upstream's requests go instead of its own pooled client
    /// (an in-process registry, in tests).
    fn assemble(
        config: Config,
        ownership: Ownership,
        transport: Option<Arc<dyn Transport>>,
    ) -> Result<Gateway, BuildError> {
        let offline = match config.cache.as_ref().is_some_and(|c| c.offline) {
            true => Offline::Yes,
            false => Offline::No,
        };
        let upstream = |u: &UpstreamConfig| match &transport {
            Some(t) => Upstream::with_transport(u.clone(), offline, t.clone()),
            None => Upstream::new(u.clone(), offline),
        };
        let mut upstreams = HashMap::new();
        for (name, u) in &config.upstreams {
            upstreams.insert(name.clone(), Arc::new(upstream(u)?));
        }
        let routes = RouteTable::from_config(&config);
        let auth = match &config.auth {
            Some(a) => Some(ClientAuth::new(&a.token, &a.anonymous)?),
            None => None,
        };
        let token_server = match &config.token_server {
            Some(t) => Some(TokenServer::new(t)?),
            None => None,
        };
        let relay = match (&config.relay, &config.token_server) {
            (Some(r), Some(t)) => Some(Relay::new(r, &t.path)?.with_service(&t.service)),
            (Some(r), None) => Some(Relay::new(r, crate::relay::endpoint::PATH)?),
            (None, _) => None,
        };
        let cache = match &config.cache {
            Some(c) => Some(Cache::open(c, ownership)?),
            None => None,
        };
        let forward = match &config.forward_proxy {
            Some(f) => {
                let create_ca = matches!(ownership, Ownership::Owner);
                Some(Arc::new(ForwardProxy::new(f, &config, create_ca)?))
            }
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
            catalog: Catalog::default(),
            forward,
            listening: std::sync::OnceLock::new(),
        })
    }

    /// Records where the registry listeners are bound, once they are.
    pub fn listening_on(&self, addrs: Vec<std::net::SocketAddr>) {
        let _ = self.listening.set(addrs);
    }

    /// The registry listener's base URL for a node that reached us by `host` (a `Host`
    /// header): `server.public_url`, else that host name at the first listener's port.
    fn mirror_base(&self, host: &str) -> String {
        if let Some(url) = &self.config.server.public_url {
            return url.as_str().trim_end_matches('/').to_string();
        }
        let scheme = match self.config.server.tls {
            Some(_) => "https",
            None => "http",
        };
        let port = self
            .listening
            .get()
            .and_then(|a| a.first())
            .or(self.config.server.listen.first())
            .map_or(5000, |a| a.port());
        let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
        format!("{scheme}://{name}:{port}")
    }

    /// Network start-up work before serving: cloud credentials are fetched now, so a broken
    /// provider stops the start instead of failing the first pull.
    pub async fn start(&self) -> Result<(), BuildError> {
        for upstream in self.upstreams.values() {
            upstream.start().await?;
        }
        if let Some(cache) = &self.cache {
            cache.sweep_inactive();
        }
        Ok(())
    }

    /// Serves one request, whatever its body type; never fails (errors are answers).
    pub fn handle<B>(
        &self,
        req: Request<B>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send + '_
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        self.serve(req.map(body::boxed), conn)
    }

    async fn serve(&self, req: Request<Body>, conn: ConnInfo) -> Response<Body> {
        let mut ctx = RequestContext::new(self.config.server.public_url.as_ref(), &req, &conn);
        let response = match self.proxied(&mut ctx, &req, &conn).await {
            Err(answer) => Ok(answer),
            Ok(()) => self.phases(&mut ctx, req).await,
        };
        let response = match response {
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
        ctx.observe(response)
    }

    /// Before the phases, for requests through the forward proxy: the host an intercepted
    /// connection (or an absolute-form request) is for becomes the request's host; token
    /// realms are answered here. An `Err` is the whole answer.
    async fn proxied(
        &self,
        ctx: &mut RequestContext<'_>,
        req: &Request<Body>,
        conn: &ConnInfo,
    ) -> Result<(), Response<Body>> {
        let intercepted = match (&conn.via, &self.forward) {
            (Via::Direct, _) => return Ok(()),
            (Via::Intercepted(i), _) => i.clone(),
            (Via::ForwardProxy, Some(forward)) if req.uri().authority().is_some() => {
                let absolute = forward
                    .absolute(&self.routes, req.uri(), req.headers(), conn.peer)
                    .await
                    .map_err(|refused| refused.into_response())?;
                Arc::new(absolute)
            }
            // The proxy's own pages; the API is behind CONNECT.
            (Via::ForwardProxy, Some(forward)) => {
                if ctx.method != Method::GET && ctx.method != Method::HEAD {
                    let refused =
                        OciError::new(ErrorCode::Unsupported, "the proxy's pages answer GET")
                            .with_status(StatusCode::METHOD_NOT_ALLOWED);
                    return Err(GatewayError::from(refused).into_response());
                }
                // The Host goes into a script and TOML: a plain `host[:port]` only.
                let host = req
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("localhost");
                let plain =
                    |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']');
                if host.is_empty() || !host.chars().all(plain) {
                    let refused =
                        OciError::new(ErrorCode::Unsupported, "the Host header is not host[:port]")
                            .with_status(StatusCode::BAD_REQUEST);
                    return Err(GatewayError::from(refused).into_response());
                }
                let hosts: Vec<&RegistryHost> = self
                    .config
                    .routes
                    .iter()
                    .filter_map(|r| r.host.as_ref())
                    .collect();
                let mirror = self.mirror_base(host);
                let page = crate::forward::Page {
                    path: &ctx.path,
                    query: ctx.query(),
                    proxy: host,
                    mirror: &mirror,
                    hosts: &hosts,
                };
                if let Some(page) = forward.page(page, req.headers(), conn.peer.ip()).await {
                    return Err(page);
                }
                // Nothing else answers there: not the token endpoint, not /metrics.
                return match ctx.path.as_str() {
                    "/ca.crt" | "/healthz" => Ok(()),
                    _ => Err(GatewayError::from(local::not_found(&ctx.path)).into_response()),
                };
            }
            (Via::ForwardProxy, None) => return Ok(()),
        };
        ctx.label = "forward-proxy";
        match &intercepted.target {
            InterceptTarget::TokenRealm => return Err(crate::forward::realm_answer(&ctx.method)),
            InterceptTarget::Registry(host) => {
                ctx.host = Some(NamedHost {
                    host: host.clone(),
                    naming: Naming::Connection,
                });
            }
        }
        ctx.public_base = intercepted.base.clone();
        ctx.intercepted = Some(intercepted);
        Ok(())
    }

    /// The phases, in order (`lib.rs` describes each).
    async fn phases<'g>(
        &'g self,
        ctx: &mut RequestContext<'g>,
        req: Request<Body>,
    ) -> Result<Response<Body>, GatewayError> {
        if ctx.intercepted.is_none() && self.is_token_path(&ctx.path) {
            ctx.label = "token";
            return self.token(ctx, req).await;
        }
        if !self.parse(ctx, req.headers())? {
            if ctx.intercepted.is_some() {
                // An intercepted host is a registry to its clients: the API, nothing of ours.
                return Err(local::not_found(&ctx.path).into());
            }
            return self.non_api(ctx, req.headers());
        }
        self.route(ctx)?;
        self.admit(ctx, req.headers()).await?;
        if let Some(answer) = self.local(ctx).await? {
            return Ok(answer);
        }
        let ctx = &*ctx;
        let (Some(api), Some(target)) = (&ctx.api, &ctx.target) else {
            return Err(unknown_name(ctx));
        };
        let (parts, client_body) = req.into_parts();
        let headers = upstream_headers(api, &parts.headers);
        let response = match self.cache(ctx, target, api, &headers).await? {
            cache::Outcome::Served(answer) => return Ok(answer),
            cache::Outcome::Upstream(response) => response,
            cache::Outcome::Pass => {
                let request = upstream_request(target, parts.method, headers, client_body);
                self.send(ctx, target, api, request).await?
            }
        };
        self.learn(ctx, target, api, &response);
        self.respond(ctx, target, api, response).await
    }

    fn is_token_path(&self, path: &str) -> bool {
        let token_path = self
            .token_server
            .as_ref()
            .map(TokenServer::path)
            .or(self.relay.as_ref().map(Relay::path));
        token_path == Some(path)
    }

    /// `token`: the token endpoint. With the token server, clients log in there; scopes on
    /// relay routes come back sealed in a relay token, cut down to what the ACL grants (the
    /// relay never widens what a client may do). Without it, the relay's anonymous endpoint.
    async fn token(
        &self,
        ctx: &RequestContext<'_>,
        req: Request<Body>,
    ) -> Result<Response<Body>, GatewayError> {
        use crate::relay::endpoint;
        let on_relay_route = |s: &Scope| {
            self.routes
                .resolve(&LocalName::new(s.name.as_str()))
                .is_some_and(|m| m.route.config.relay)
        };
        match (&self.token_server, &self.relay) {
            (Some(ts), relay) => {
                let login = ts.login(req, ctx.peer.ip()).await?;
                if let Some(relay) = relay
                    && login.scopes().iter().any(on_relay_route)
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

    /// `parse`: the API path, an upload's query and the scopes the request needs, in local
    /// names. `false` for paths outside `/v2/`.
    ///
    /// A request that names its registry host (see [`Gateway::named_host`]) is parsed as a
    /// request inside that host, and the names it needs are qualified with the host.
    fn parse(
        &self,
        ctx: &mut RequestContext<'_>,
        headers: &HeaderMap,
    ) -> Result<bool, GatewayError> {
        let Some(rest) = ctx.path.strip_prefix("/v2/") else {
            return Ok(false);
        };
        let host = match &ctx.host {
            Some(connection) => Some(connection.clone()),
            None => self.named_host(rest, ctx.query())?,
        };
        let api = match &host {
            Some(h) if h.naming == Naming::InPath => {
                // After the segment as the client spelled it (`quay.io:443`, `index.docker.io`).
                let inside = rest
                    .split_once('/')
                    .map(|(_, inside)| inside)
                    .unwrap_or_default();
                ApiPath::parse(&format!("/v2/{inside}"), &ctx.method)
            }
            _ => ApiPath::parse(&ctx.path, &ctx.method),
        };
        let api = match api {
            None => return Ok(false),
            Some(parsed) => parsed?,
        };
        if host.is_some() && api.endpoint == Endpoint::Catalog {
            // The catalog lists what prefix routes open; a host's is its upstream's business.
            return Err(local::not_found(&ctx.path).into());
        }
        let upload_endpoint = matches!(api.endpoint, Endpoint::UploadStart | Endpoint::Upload(_));
        if upload_endpoint {
            crate::headers::refuse_form_body(headers)?;
        }
        // Every POST on an upload path is checked as an upload start: that is what a registry
        // may take it for, mount and all.
        if upload_endpoint && ctx.method == Method::POST {
            let mut upload = UploadQuery::parse(ctx.query())?;
            if let (Some(h), Some(from)) = (&host, upload.from()) {
                let inside = h.localize(from);
                upload.set_from(inside.as_ref().map(LocalName::as_str));
            }
            ctx.upload = Some(upload);
        }
        let mount_from = ctx.upload.as_ref().and_then(UploadQuery::from);
        ctx.required = crate::auth::required_scopes(&ctx.method, &api, mount_from);
        if let Some(h) = &host {
            for scope in &mut ctx.required {
                scope.name = h.qualified(&scope.name);
            }
        }
        ctx.api = Some(api);
        ctx.host = host;
        Ok(true)
    }

    /// The registry host a `/v2/` request names (`rest`: its path after `/v2/`): an in-path
    /// host (`/v2/<host>/<name>/…`) that a route serves, else `?ns=`. Both are keys into the
    /// routes, never hosts to dial: an `ns` no route serves is a 404 at once, so that a
    /// containerd mirror falls back to its next host without waiting.
    fn named_host(&self, rest: &str, query: &str) -> Result<Option<NamedHost>, GatewayError> {
        let in_path = rest
            .split_once('/')
            .map(|(first, _)| first)
            .filter(|first| looks_like_host(first))
            .and_then(RegistryHost::parse)
            .filter(|h| self.routes.serves_host(h));
        if let Some(host) = in_path {
            return Ok(Some(NamedHost {
                host,
                naming: Naming::InPath,
            }));
        }
        let Some(ns) = crate::rewrite::query_param(query, crate::rewrite::host::NS) else {
            return Ok(None);
        };
        match RegistryHost::parse(&ns).filter(|h| self.routes.serves_host(h)) {
            Some(host) => Ok(Some(NamedHost {
                host,
                naming: Naming::Query,
            })),
            None => Err(OciError::new(
                ErrorCode::NameUnknown,
                "no route serves the registry host named by `ns`",
            )
            .with_detail(serde_json::json!({ "ns": ns }))
            .into()),
        }
    }

    /// Paths outside `/v2/`: health, metrics, browser redirects; anything else is a 404.
    fn non_api(
        &self,
        ctx: &RequestContext<'_>,
        headers: &HeaderMap,
    ) -> Result<Response<Body>, GatewayError> {
        match ctx.path.as_str() {
            "/healthz" => return Ok(local::healthz()),
            "/ca.crt" => {
                if let Some(pem) = self.forward.as_ref().and_then(|f| f.ca_pem()) {
                    return Ok(local::ca_certificate(pem));
                }
            }
            "/metrics" if self.config.server.metrics_listen.is_none() => {
                return Ok(local::metrics());
            }
            _ => {}
        }
        if self.config.server.browser_redirects && local::is_browser(&ctx.method, headers) {
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

    /// `route`: the one place an upstream is chosen. A repository name picks the route
    /// (longest prefix); the name, a mount's `from` and the scopes are mapped to remote
    /// names. A name no route covers leaves no target: after admission it is a 404.
    fn route<'g>(&'g self, ctx: &mut RequestContext<'g>) -> Result<(), GatewayError> {
        let Some(local) = ctx.api.as_ref().and_then(|a| a.name.as_deref()) else {
            return Ok(());
        };
        let local = LocalName::new(local);
        let host = ctx.host.as_ref();
        let Some(mapped) = self.routes.resolve_in(host.map(|h| &h.host), &local) else {
            return Ok(());
        };
        let upstream = self
            .upstreams
            .get(&mapped.route.config.upstream)
            .ok_or_else(|| OciError::new(ErrorCode::NameUnknown, "route has no upstream"))?;
        let mut names = NameMap::default();
        names.add(&mapped.remote, &ctx.client_name(&local));
        let mut scopes = vec![Scope::repository(
            mapped.remote.as_str(),
            crate::oci::required_actions(&ctx.method),
        )];
        let query = match &mut ctx.upload {
            Some(upload) => {
                let from = self
                    .routes
                    .map_mount(upload, upstream.name(), host, &mut names);
                scopes.extend(from.map(|f| Scope::repository(f.as_str(), &["pull"])));
                upload.encode()
            }
            // A mount the admit phase did not check never reaches the upstream.
            None => crate::rewrite::forwarded_query(ctx.query()),
        };
        let suffix = ctx.api.as_ref().map(ApiPath::suffix).unwrap_or_default();
        let mut path_and_query = mapped.remote.api_path(&suffix);
        if !query.is_empty() {
            path_and_query.push('?');
            path_and_query.push_str(&query);
        }
        let url = upstream.url(&path_and_query)?;
        ctx.target = Some(Target {
            route: mapped.route,
            upstream,
            remote: mapped.remote,
            scopes,
            names,
            path_and_query,
            url,
        });
        Ok(())
    }

    /// `admit`: who the request acts for, decided once. On a relay route the client shows a
    /// relay token; elsewhere a client token (or nothing `auth.anonymous` covers), and `/v2/`
    /// takes a relay token too, since clients of relay routes hold only those.
    async fn admit(
        &self,
        ctx: &mut RequestContext<'_>,
        headers: &HeaderMap,
    ) -> Result<(), GatewayError> {
        if let (Some(intercepted), Some(forward)) = (&ctx.intercepted, &self.forward) {
            let admitted = forward.admit(
                intercepted,
                &ctx.method,
                &ctx.required,
                self.auth.as_ref(),
                self.token_server.as_ref(),
            )?;
            ctx.admission = Some(admitted);
            return Ok(());
        }
        let authorization = headers.get(header::AUTHORIZATION);
        let is_base = ctx
            .api
            .as_ref()
            .is_some_and(|a| a.endpoint == Endpoint::Base);
        let relay_route = ctx.target.as_ref().filter(|t| t.route.config.relay);
        let relay_base = |relay: &Relay| {
            let prefixes = self
                .routes
                .routes()
                .iter()
                .filter(|r| r.config.relay)
                .map(|r| r.config.prefix.as_str());
            relay.admit_base(authorization, prefixes, &ctx.public_base)
        };
        let admitted = match (&self.relay, relay_route) {
            (Some(relay), Some(target)) => relay.admit(
                authorization,
                &target.route.config.prefix,
                target.upstream.name(),
                &ctx.required,
                &ctx.public_base,
            ),
            _ => match (&self.auth, &self.relay) {
                (Some(auth), relay) => {
                    match auth
                        .check(authorization, &ctx.required, &ctx.public_base)
                        .await
                    {
                        Err(denied) if is_base => relay
                            .as_ref()
                            .and_then(|r| relay_base(r).ok())
                            .ok_or(denied),
                        checked => checked,
                    }
                }
                (None, Some(relay)) if is_base => relay_base(relay),
                (None, _) => Ok(Admission::Open),
            },
        };
        ctx.admission = Some(admitted.map_err(GatewayError::Denied)?);
        Ok(())
    }

    /// `local`: the admitted requests answered here: `/v2/` and `_catalog`.
    async fn local(
        &self,
        ctx: &RequestContext<'_>,
    ) -> Result<Option<Response<Body>>, GatewayError> {
        match ctx.api.as_ref().map(|a| &a.endpoint) {
            Some(Endpoint::Base) => Ok(Some(local::api_base())),
            Some(Endpoint::Catalog) => self
                .catalog
                .serve(&self.routes, &self.upstreams, &ctx.method, ctx.query())
                .await
                .map(Some),
            _ => Ok(None),
        }
    }

    /// `cache`: blob and manifest reads of a cache route, answered from disk or filled.
    async fn cache(
        &self,
        ctx: &RequestContext<'_>,
        target: &Target<'_>,
        api: &ApiPath,
        headers: &HeaderMap,
    ) -> Result<cache::Outcome, GatewayError> {
        let Some(cache) = self.cache.as_ref().filter(|_| target.route.config.cache) else {
            return Ok(cache::Outcome::Pass);
        };
        let fetch = cache::Fetch {
            upstream: target.upstream,
            remote: &target.remote,
            scopes: &target.scopes,
            authorization: ctx.upstream_authorization(),
            headers,
            passed_on: client_redirects(ctx, target, api),
        };
        cache.serve(&ctx.method, &api.endpoint, &fetch).await
    }

    /// `send`: the request goes upstream as admitted, its redirects as
    /// [`client_redirects`] says.
    async fn send(
        &self,
        ctx: &RequestContext<'_>,
        target: &Target<'_>,
        api: &ApiPath,
        request: UpstreamRequest,
    ) -> Result<Response<Body>, GatewayError> {
        let redirects = client_redirects(ctx, target, api);
        Ok(target
            .upstream
            .send(request, &ctx.upstream_authorization(), redirects)
            .await?)
    }

    /// What an answer teaches the cache: a deleted manifest or blob is gone from its
    /// evidence, whatever route the `DELETE` went through.
    fn learn(
        &self,
        ctx: &RequestContext<'_>,
        target: &Target<'_>,
        api: &ApiPath,
        response: &Response<Body>,
    ) {
        if ctx.method == Method::DELETE
            && response.status().is_success()
            && let Some(cache) = &self.cache
        {
            cache.deleted(target.upstream.name(), &target.remote, &api.endpoint);
        }
    }

    /// The upstream refused the request as admitted (after a fresh token). Its challenge is
    /// never passed on: clients send the credentials they hold for *this* host to whatever
    /// realm a challenge names. A relay client gets a fresh relay challenge; with client
    /// auth, our own challenge; without, a plain 403.
    fn upstream_refused(&self, ctx: &RequestContext<'_>, target: &Target<'_>) -> GatewayError {
        let body = OciError::new(ErrorCode::Denied, "the upstream registry refused access")
            .with_detail(serde_json::json!({ "upstream": target.upstream.name() }));
        match (&ctx.admission, &self.relay, &self.auth) {
            (Some(Admission::Relay { .. }), Some(relay), _) => GatewayError::Denied(relay.refusal(
                &ctx.public_base,
                &ctx.required,
                Some(BearerError::InvalidToken),
                "the upstream refused the relayed token",
            )),
            (Some(Admission::Anonymous | Admission::Client(_)), _, Some(auth)) => {
                GatewayError::Denied(auth.refusal(
                    &ctx.required,
                    &ctx.public_base,
                    Some(BearerError::InsufficientScope),
                    body,
                ))
            }
            _ => GatewayError::Oci(body),
        }
    }

    /// `respond`: an upstream refusal becomes our own answer; otherwise upstream names and
    /// URLs in the answer become local ones.
    async fn respond(
        &self,
        ctx: &RequestContext<'_>,
        target: &Target<'_>,
        api: &ApiPath,
        response: Response<Body>,
    ) -> Result<Response<Body>, GatewayError> {
        if response.status() == StatusCode::UNAUTHORIZED {
            return Err(self.upstream_refused(ctx, target));
        }
        let client_name = api
            .name
            .as_deref()
            .map(|n| ctx.client_name(&LocalName::new(n)));
        let tags = match (&api.endpoint, &client_name) {
            (Endpoint::Tags, Some(local)) if ctx.method == Method::GET => Some(TagsQuery {
                local: local.as_str(),
                query: ctx.query(),
            }),
            _ => None,
        };
        let answering = Answering {
            public_base: &ctx.public_base,
            names: &target.names,
            asked: &target.url,
            upstream: target.upstream.name(),
            tags,
            ns: ctx.host.as_ref().and_then(NamedHost::ns),
        };
        crate::rewrite::response::rewrite(&answering, response).await
    }
}

impl server::Service for Gateway {
    fn call(
        &self,
        req: Request<hyper::body::Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send {
        self.handle(req, conn)
    }

    async fn connect(&self, req: &Request<hyper::body::Incoming>, conn: &ConnInfo) -> Connect {
        match &self.forward {
            Some(forward) => {
                forward
                    .connect(&self.routes, req.uri(), req.headers(), conn.peer)
                    .await
            }
            // Only the forward-proxy listener hands CONNECTs over.
            None => Connect::Answer(
                GatewayError::from(local::not_found(&req.uri().to_string())).into_response(),
            ),
        }
    }
}

/// What becomes of a redirect the client would be answered with: blob reads follow it here
/// when the upstream's `redirects: follow` says so (its client may not reach the object
/// store); anything else is passed on, rewritten.
fn client_redirects(ctx: &RequestContext<'_>, target: &Target<'_>, api: &ApiPath) -> Redirects {
    let blob_read = matches!(api.endpoint, Endpoint::Blob(_))
        && (ctx.method == Method::GET || ctx.method == Method::HEAD);
    match target.upstream.config.redirects {
        RedirectPolicy::Follow if blob_read => Redirects::Follow,
        _ => Redirects::PassOn,
    }
}

fn unknown_name(ctx: &RequestContext<'_>) -> GatewayError {
    let name = ctx.api.as_ref().and_then(|a| a.name.as_deref());
    OciError::new(
        ErrorCode::NameUnknown,
        "repository name not known to registry",
    )
    .with_detail(serde_json::json!({ "name": name }))
    .into()
}

/// The client's headers as the upstream may see them.
fn upstream_headers(api: &ApiPath, client: &HeaderMap) -> HeaderMap {
    let mut headers = crate::headers::forward_headers(client);
    if api.endpoint == Endpoint::Tags {
        // The tags body is rewritten: it must arrive as plain JSON.
        headers.remove(header::ACCEPT_ENCODING);
    }
    headers
}

/// The client's request in upstream terms: its target's path and its body (counted as it
/// streams).
fn upstream_request(
    target: &Target<'_>,
    method: Method,
    headers: HeaderMap,
    client_body: Body,
) -> UpstreamRequest {
    let body = (!client_body.is_end_stream())
        .then(|| body::boxed(Observed::new(client_body, Box::new(UploadBytes))));
    UpstreamRequest {
        method,
        path_and_query: target.path_and_query.clone(),
        headers,
        body,
        scopes: target.scopes.clone(),
    }
}

struct UploadBytes;

impl Finish for UploadBytes {
    fn finish(self: Box<Self>, bytes: u64, _outcome: Outcome) {
        crate::metrics::bytes("upload", bytes);
    }
}

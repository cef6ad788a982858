//! Upstream registries: the only code that talks to them, by one road: [`Upstream::send`]
//! (the `send` phase and the cache's fills alike), as the request was admitted
//! ([`Authorization`]) and with a redirect policy ([`Redirects`]).
//!
//! An [`Upstream`] owns its pooled client, its credentials and the token dance: it learns the
//! upstream's challenge, fetches and caches bearer tokens per scope set, retries a replayable
//! request once after a 401, and follows blob redirects without `Authorization` when asked.
//! It sees requests already rewritten to remote names and must not know about local names.

pub(crate) mod client;
pub(crate) mod credentials;
pub(crate) mod dial;
pub(crate) mod token;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use parking_lot::RwLock;
use url::Url;

use crate::body::{self, Body};
use crate::config::UpstreamConfig;
use crate::oci::{Challenge, Scope};
use client::Transport;
use credentials::{CredentialError, CredentialSource, Secret};
use token::TokenCache;

/// How long a bodiless request may wait for response headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_REDIRECTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {upstream} unreachable: {reason}")]
    Unreachable { upstream: String, reason: String },
    #[error("upstream {upstream} did not answer within {0:?}", HEADER_TIMEOUT)]
    Timeout { upstream: String },
    #[error("upstream {upstream}: {source}")]
    Credentials {
        upstream: String,
        source: CredentialError,
    },
    #[error("upstream {upstream}: bad redirect: {reason}")]
    Redirect { upstream: String, reason: String },
    #[error("upstream {upstream}: its token realm refused the proxy's credentials")]
    TokenRefused { upstream: String },
    #[error("upstream {upstream} not asked: the cache is offline")]
    Offline { upstream: String },
}

/// `cache.offline`: whether upstreams may be asked at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offline {
    No,
    Yes,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamBuildError {
    #[error("upstream {upstream}: {source}")]
    Client {
        upstream: String,
        source: client::ClientBuildError,
    },
    #[error("upstream {upstream}: {source}")]
    Credentials {
        upstream: String,
        source: CredentialError,
    },
}

/// What the upstream told us about authentication, learned from its challenges.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AuthScheme {
    Unknown,
    Open,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

impl AuthScheme {
    fn from_challenge(c: &Challenge) -> AuthScheme {
        if c.is_basic() {
            AuthScheme::Basic
        } else if let (true, Some(realm)) = (c.is_bearer(), c.param("realm")) {
            AuthScheme::Bearer {
                realm: realm.to_string(),
                service: c.param("service").map(str::to_string),
            }
        } else {
            AuthScheme::Unknown
        }
    }
}

/// Whose authority a request goes upstream with.
#[derive(Debug, Clone)]
pub(crate) enum Authorization {
    /// The upstream's configured credentials, through the token dance.
    Proxy,
    /// Exactly this header: the upstream token a relay route's client showed.
    Relayed(HeaderValue),
}

/// What [`Upstream::send`] does with a redirect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Redirects {
    /// Answers with it: the client follows it.
    PassOn,
    /// Follows it here, without `Authorization`, and answers with the end of the chain.
    Follow,
}

/// A request already in upstream terms.
pub(crate) struct UpstreamRequest {
    pub(crate) method: Method,
    /// `/v2/<remote>/…?query`.
    pub(crate) path_and_query: String,
    /// End-to-end headers only: no `Host`, `Authorization` or hop-by-hop headers.
    pub(crate) headers: HeaderMap,
    /// `None` for a request without a body, which can be replayed after a 401.
    pub(crate) body: Option<Body>,
    /// The scopes the request needs, in remote names.
    pub(crate) scopes: Vec<Scope>,
}

pub struct Upstream {
    pub(crate) config: UpstreamConfig,
    client: Arc<dyn Transport>,
    credentials: CredentialSource,
    tokens: TokenCache,
    scheme: RwLock<AuthScheme>,
    warned_realm: AtomicBool,
    /// Never send anything (`cache.offline`).
    offline: bool,
    /// Which hosts its redirects and realms may lead to (IP literals; names are checked
    /// when the client resolves them).
    dial: dial::DialPolicy,
}

impl Upstream {
    pub(crate) fn new(
        config: UpstreamConfig,
        offline: Offline,
    ) -> Result<Upstream, UpstreamBuildError> {
        let client = client::build(&config).map_err(|source| UpstreamBuildError::Client {
            upstream: config.name.clone(),
            source,
        })?;
        Upstream::with_transport(config, offline, Arc::new(client))
    }

    /// An upstream whose requests (and token fetches) go through `client`.
    pub(crate) fn with_transport(
        config: UpstreamConfig,
        offline: Offline,
        client: Arc<dyn Transport>,
    ) -> Result<Upstream, UpstreamBuildError> {
        let credentials =
            CredentialSource::new(&config).map_err(|source| UpstreamBuildError::Credentials {
                upstream: config.name.clone(),
                source,
            })?;
        Ok(Upstream {
            dial: dial::DialPolicy::for_upstream(&config),
            config,
            client,
            credentials,
            tokens: TokenCache::default(),
            scheme: RwLock::new(AuthScheme::Unknown),
            warned_realm: AtomicBool::new(false),
            offline: offline == Offline::Yes,
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    /// Where this upstream's credentials come from, for `check-config`.
    pub fn credentials_summary(&self) -> &str {
        self.credentials.summary()
    }

    /// Network start-up work: fetches cloud credentials and starts their refresh (not when
    /// offline: nothing will be sent).
    pub(crate) async fn start(&self) -> Result<(), UpstreamBuildError> {
        if self.offline {
            return Ok(());
        }
        self.credentials
            .start()
            .await
            .map_err(|source| UpstreamBuildError::Credentials {
                upstream: self.config.name.clone(),
                source,
            })
    }

    /// The absolute URL of a path on this upstream.
    pub(crate) fn url(&self, path_and_query: &str) -> Result<Url, UpstreamError> {
        let bad = |why: String| UpstreamError::Unreachable {
            upstream: self.config.name.clone(),
            reason: format!("bad path {path_and_query:?}: {why}"),
        };
        let url = self
            .config
            .url
            .join(path_and_query)
            .map_err(|e| bad(e.to_string()))?;
        // Paths are built from validated segments; one that a URL parser would still change
        // (dot segments, stray characters) would reach another endpoint than was checked.
        let path = path_and_query.split('?').next().unwrap_or_default();
        if url.path() != path {
            return Err(bad(format!("it would be sent as {:?}", url.path())));
        }
        Ok(url)
    }

    /// The one road to the upstream: sends `req` with `authorization` and, as `redirects`
    /// says, passes redirects on or follows them (without `Authorization`).
    pub(crate) async fn send(
        &self,
        req: UpstreamRequest,
        authorization: &Authorization,
        redirects: Redirects,
    ) -> Result<Response<Body>, UpstreamError> {
        let followed = match redirects {
            Redirects::Follow => Some((
                req.method.clone(),
                self.url(&req.path_and_query)?,
                redirect_headers(&req.headers),
            )),
            Redirects::PassOn => None,
        };
        let response = match authorization {
            Authorization::Proxy => self.send_with_credentials(req).await?,
            Authorization::Relayed(header) => {
                let mut req = req;
                let body = req.body.take();
                self.dispatch(&req, Some(header.clone()), body).await?
            }
        };
        match followed {
            Some((method, from, headers)) if response.status().is_redirection() => {
                self.follow_redirects(response, &method, from, &headers)
                    .await
            }
            _ => Ok(response),
        }
    }

    /// Sends a request with whatever authorization the upstream wants, retrying a replayable
    /// request once after a 401 with a fresh token.
    async fn send_with_credentials(
        &self,
        mut req: UpstreamRequest,
    ) -> Result<Response<Body>, UpstreamError> {
        let secret = self.secret().await?;
        let body = req.body.take();
        if let Some(bearer) = secret.as_ref().and_then(Secret::static_bearer) {
            return self.dispatch(&req, Some(bearer), body).await;
        }
        let replayable = body.is_none();
        let mut scheme = self.scheme();
        if !replayable && scheme == AuthScheme::Unknown {
            // A streamed body cannot be sent twice: learn the challenge before sending it.
            scheme = self.ping().await;
        }
        let auth = self
            .authorization(&scheme, &req.scopes, secret.as_ref())
            .await;
        let response = self.dispatch(&req, auth.clone(), body).await?;
        if response.status() != StatusCode::UNAUTHORIZED || !replayable {
            return Ok(response);
        }
        let Some(challenge) = challenge_of(&response) else {
            return Ok(response);
        };
        let learned = AuthScheme::from_challenge(&challenge);
        self.set_scheme(learned.clone());
        // The token we sent (if any) was refused: never reuse it. The retry asks for the
        // request's own scopes only; the upstream's challenge may not widen what the proxy's
        // credentials are used for.
        if let Some(refused) = &auth {
            self.tokens
                .remove_if(&TokenCache::key(&req.scopes), refused);
        }
        match self
            .authorization(&learned, &req.scopes, secret.as_ref())
            .await
        {
            Some(retry_auth) if Some(&retry_auth) != auth.as_ref() => {
                self.dispatch(&req, Some(retry_auth), None).await
            }
            _ => Ok(response),
        }
    }

    /// Follows a blob redirect chain without `Authorization` (and with only `headers`, see
    /// [`redirect_headers`]), streaming the final answer.
    async fn follow_redirects(
        &self,
        mut response: Response<Body>,
        method: &Method,
        mut from: Url,
        headers: &HeaderMap,
    ) -> Result<Response<Body>, UpstreamError> {
        let bad = |reason: String| UpstreamError::Redirect {
            upstream: self.config.name.clone(),
            reason,
        };
        for _ in 0..MAX_REDIRECTS {
            if !response.status().is_redirection() {
                return Ok(response);
            }
            let target = location_of(&response, &from)
                .ok_or_else(|| bad("redirect without a usable Location".into()))?;
            self.dial.check(&target).await.map_err(bad)?;
            let mut request = Request::builder()
                .method(method.clone())
                .uri(target.as_str())
                .body(body::empty())
                .map_err(|e| bad(e.to_string()))?;
            request.headers_mut().extend(headers.clone());
            response = self.timed(request, true).await?;
            from = target;
        }
        Err(bad(format!("more than {MAX_REDIRECTS} redirects")))
    }

    /// The upstream's credentials, resolved now (credential helpers are asked at most every
    /// few minutes).
    async fn secret(&self) -> Result<Option<Secret>, UpstreamError> {
        self.credentials
            .resolve()
            .await
            .map_err(|source| UpstreamError::Credentials {
                upstream: self.config.name.clone(),
                source,
            })
    }

    fn scheme(&self) -> AuthScheme {
        self.scheme.read().clone()
    }

    fn set_scheme(&self, scheme: AuthScheme) {
        if scheme != AuthScheme::Unknown {
            *self.scheme.write() = scheme;
        }
    }

    /// `GET /v2/` to learn how the upstream authenticates.
    async fn ping(&self) -> AuthScheme {
        let probe = UpstreamRequest {
            method: Method::GET,
            path_and_query: "/v2/".into(),
            headers: HeaderMap::new(),
            body: None,
            scopes: Vec::new(),
        };
        let learned = match self.dispatch(&probe, None, None).await {
            Ok(r) if r.status().is_success() => AuthScheme::Open,
            Ok(r) => challenge_of(&r)
                .map(|c| AuthScheme::from_challenge(&c))
                .unwrap_or(AuthScheme::Unknown),
            Err(_) => AuthScheme::Unknown,
        };
        self.set_scheme(learned.clone());
        learned
    }

    async fn authorization(
        &self,
        scheme: &AuthScheme,
        scopes: &[Scope],
        secret: Option<&Secret>,
    ) -> Option<HeaderValue> {
        match scheme {
            AuthScheme::Unknown | AuthScheme::Open => None,
            AuthScheme::Basic => secret.and_then(Secret::basic_header),
            AuthScheme::Bearer { realm, service } => self
                .bearer_token(realm, service.as_deref(), scopes, secret, Duration::ZERO)
                .await
                .map(|t| t.header),
        }
    }

    /// A bearer token for `scopes` from the realm, cached per scope set.
    /// `min_left`: a cached token with less life left is fetched anew.
    async fn bearer_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scopes: &[Scope],
        secret: Option<&Secret>,
        min_left: Duration,
    ) -> Option<token::Token> {
        let key = TokenCache::key(scopes);
        if let Some(t) = self.tokens.get(&key, min_left) {
            return Some(t);
        }
        let gate = self.tokens.flight(&key);
        let _turn = gate.lock().await;
        // Whoever held the gate before us may have fetched it already.
        if let Some(t) = self.tokens.get(&key, min_left) {
            return Some(t);
        }
        if let Ok(url) = url::Url::parse(realm)
            && let Err(why) = self.dial.check(&url).await
        {
            tracing::warn!(upstream = %self.config.name, %realm, %why, "token realm not asked");
            crate::metrics::token_fetch(&self.config.name, false);
            return None;
        }
        let secret = secret.filter(|_| self.realm_allowed(realm));
        let fetched = token::fetch(self.client.as_ref(), realm, service, scopes, secret).await;
        crate::metrics::token_fetch(&self.config.name, fetched.is_ok());
        match fetched {
            Ok(t) => {
                self.tokens.put(key, t.clone());
                Some(t)
            }
            Err(e) => {
                tracing::warn!(upstream = %self.config.name, error = %e, "token fetch failed");
                None
            }
        }
    }

    /// For the relay: the upstream's bearer token for `scopes` (remote names), fetched with
    /// the upstream's credentials. `Ok(None)` when the upstream takes no bearer tokens (it is
    /// open, or uses Basic, which the proxy then sends itself).
    pub(crate) async fn bearer_for(
        &self,
        scopes: &[Scope],
        min_left: Duration,
    ) -> Result<Option<token::Token>, UpstreamError> {
        let secret = self.secret().await?;
        let mut scheme = self.scheme();
        if scheme == AuthScheme::Unknown {
            scheme = self.ping().await;
        }
        let AuthScheme::Bearer { realm, service } = &scheme else {
            return Ok(None);
        };
        self.bearer_token(realm, service.as_deref(), scopes, secret.as_ref(), min_left)
            .await
            .map(Some)
            .ok_or_else(|| UpstreamError::TokenRefused {
                upstream: self.config.name.clone(),
            })
    }

    fn realm_allowed(&self, realm: &str) -> bool {
        let allowed = Url::parse(realm).is_ok_and(|r| {
            token::realm_may_receive_credentials(&self.config.url, &r, &self.config.allowed_realms)
        });
        if !allowed && !self.warned_realm.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                upstream = %self.config.name,
                realm,
                "token realm is outside the upstream's domain and not in allowed_realms: asking it anonymously"
            );
        }
        allowed
    }

    async fn dispatch(
        &self,
        req: &UpstreamRequest,
        auth: Option<HeaderValue>,
        body: Option<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        let url = self.url(&req.path_and_query)?;
        let mut builder = Request::builder()
            .method(req.method.clone())
            .uri(url.as_str());
        if let Some(headers) = builder.headers_mut() {
            headers.extend(req.headers.clone());
            if let Some(a) = auth {
                headers.insert(header::AUTHORIZATION, a);
            }
        }
        let has_body = body.is_some();
        let request = builder
            .body(body.unwrap_or_else(body::empty))
            .map_err(|e| UpstreamError::Unreachable {
                upstream: self.config.name.clone(),
                reason: e.to_string(),
            })?;
        self.timed(request, !has_body).await
    }

    async fn timed(
        &self,
        request: Request<Body>,
        bounded: bool,
    ) -> Result<Response<Body>, UpstreamError> {
        if self.offline {
            return Err(UpstreamError::Offline {
                upstream: self.config.name.clone(),
            });
        }
        let started = Instant::now();
        let sent = self.client.send(request);
        let result = if bounded {
            tokio::time::timeout(HEADER_TIMEOUT, sent)
                .await
                .map_err(|_| UpstreamError::Timeout {
                    upstream: self.config.name.clone(),
                })?
        } else {
            sent.await
        };
        crate::metrics::upstream_latency(&self.config.name, started.elapsed());
        result.map_err(|e| UpstreamError::Unreachable {
            upstream: self.config.name.clone(),
            reason: error_chain(e.as_ref()),
        })
    }
}

/// What a followed redirect carries of the request: what selects the bytes, nothing that
/// authenticates (object stores sign their URLs).
fn redirect_headers(headers: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for name in [
        header::ACCEPT,
        header::RANGE,
        header::USER_AGENT,
        header::IF_NONE_MATCH,
    ] {
        if let Some(v) = headers.get(&name) {
            kept.insert(name, v.clone());
        }
    }
    kept
}

fn challenge_of<B>(response: &Response<B>) -> Option<Challenge> {
    response
        .headers()
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(Challenge::parse)
        .find(|c| c.is_bearer() || c.is_basic())
}

/// The `Location` of a response, resolved against the URL that was asked.
fn location_of<B>(response: &Response<B>, base: &Url) -> Option<Url> {
    let loc = response.headers().get(header::LOCATION)?.to_str().ok()?;
    let url = base.join(loc).ok()?;
    matches!(url.scheme(), "http" | "https").then_some(url)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

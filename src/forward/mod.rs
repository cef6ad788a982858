//! The forward proxy (`HTTPS_PROXY` clients, docker-registry-proxy's mode): what a `CONNECT`
//! or an absolute-form request on the forward-proxy listener is for, and who sent it.
//!
//! Owns the proxy users (`Proxy-Authorization: Basic`), the choice between interception (a
//! host route's host, or a token realm of one), a tunnel (`forward_proxy.tunnel`, never to
//! loopback or link-local addresses) and a refusal, the interception CA ([`ca`]), and what
//! a proxy user may do (`token_server.acl`, else `auth.anonymous`). Serves nothing itself:
//! [`crate::server`] terminates TLS and the pipeline serves intercepted requests. Must not
//! dial anything but a tunnel's target, which only a `tunnel` glob can name.

pub(crate) mod ca;
mod setup;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri, header};
use parking_lot::Mutex;
use tokio::net::TcpStream;

use crate::auth::{Admission, ClientAuth};
use crate::body::{self, Body};
use crate::config::{Config, ForwardProxyConfig};
use crate::error::GatewayError;
use crate::oci::host::RegistryHost;
use crate::oci::{ErrorCode, OciError, Scope};
use crate::rewrite::RouteTable;
use crate::server::Connect;
use crate::token::TokenServer;
use crate::token::guard::{LoginGuard, Refusal};
use crate::token::users::Htpasswd;
use crate::upstream::dial::{Reach, reach};
use ca::{Authority, CaError};

/// Docker Hub's token realm: intercepted when Docker Hub is, so that a client that asks it
/// for a token through the proxy gets one and goes on.
const DOCKER_HUB_REALM: &str = "auth.docker.io";
/// How long a checked proxy password is remembered (containers/image opens a CONNECT per
/// request: bcrypt on each would cost ~100 ms).
const VERIFIED_FOR: Duration = Duration::from_secs(300);
const VERIFIED_MAX: usize = 4096;
const TUNNEL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ForwardSetupError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("forward_proxy.users.htpasswd: {0}")]
    Users(#[from] crate::token::users::HtpasswdError),
}

/// A request for one of the forward-proxy listener's pages.
pub(crate) struct Page<'a> {
    pub(crate) path: &'a str,
    pub(crate) query: &'a str,
    pub(crate) proxy: &'a str,
    pub(crate) mirror: &'a str,
    pub(crate) hosts: &'a [&'a RegistryHost],
}

/// What a connection through the proxy is for, decided at its `CONNECT` (or absolute-form
/// request) and read by every request on it.
#[derive(Debug)]
pub struct Intercepted {
    pub(crate) target: InterceptTarget,
    /// The proxy user, when users are configured.
    pub(crate) user: Option<String>,
    /// `scheme://authority` the client uses for the host, for URLs handed back.
    pub(crate) base: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InterceptTarget {
    /// A host route's host: served by the pipeline among that host's routes.
    Registry(RegistryHost),
    /// A token realm of an intercepted registry: answered with a token nobody checks.
    TokenRealm,
}

pub(crate) struct ForwardProxy {
    /// `None` only where nothing is served (check-config on a CA not generated yet).
    authority: Option<Authority>,
    tunnel: Vec<String>,
    users: Option<ProxyUsers>,
    allow_push: bool,
    token_realms: Vec<String>,
}

impl ForwardProxy {
    /// `create_ca`: whether a missing CA may be generated (not by check-config).
    pub(crate) fn new(
        config: &ForwardProxyConfig,
        whole: &Config,
        create_ca: bool,
    ) -> Result<ForwardProxy, ForwardSetupError> {
        let hosts: Vec<&RegistryHost> = whole
            .routes
            .iter()
            .filter_map(|r| r.host.as_ref())
            .collect();
        let mut token_realms: Vec<String> = Vec::new();
        if hosts
            .iter()
            .any(|h| h.as_str() == crate::oci::host::DOCKER_HUB)
        {
            token_realms.push(DOCKER_HUB_REALM.to_string());
        }
        // Realms the config names for a host route's upstream are intercepted too.
        for route in whole.routes.iter().filter(|r| r.host.is_some()) {
            let realms = whole
                .upstreams
                .get(&route.upstream)
                .map(|u| u.allowed_realms.as_slice())
                .unwrap_or_default();
            token_realms.extend(
                realms
                    .iter()
                    .filter_map(|u| u.host_str())
                    .map(str::to_string),
            );
        }
        token_realms.sort();
        token_realms.dedup();
        let users = match &config.htpasswd {
            Some(path) => Some(ProxyUsers {
                htpasswd: Arc::new(Htpasswd::load(path)?),
                guard: LoginGuard::new(std::thread::available_parallelism().map_or(1, |n| n.get())),
                verified: Mutex::new(HashMap::new()),
            }),
            None => None,
        };
        let authority = Authority::open(&config.ca, create_ca)?;
        if let Some(a) = authority.as_ref().filter(|_| create_ca) {
            tracing::info!(sha256 = %a.fingerprint(), "interception CA (GET /ca.crt)");
        }
        Ok(ForwardProxy {
            authority,
            tunnel: config.tunnel.clone(),
            users,
            allow_push: config.allow_push,
            token_realms,
        })
    }

    /// The forward-proxy listener's own pages: `/setup/systemd` and `/setup/containerd`
    /// (which names the routed hosts: with users, for them only, logged in with `curl -u`).
    /// `proxy`: the `Host` the node reached the proxy by; `mirror`: the registry listener's
    /// base URL as that node reaches it; `hosts`: the host routes' hosts.
    pub(crate) async fn page(
        &self,
        page: Page<'_>,
        headers: &HeaderMap,
        peer: IpAddr,
    ) -> Option<Response<Body>> {
        match page.path {
            "/setup/systemd" => Some(setup::systemd_script(
                page.proxy,
                self.ca_pem()?,
                self.users.is_some(),
            )),
            "/setup/containerd" => {
                let login = self.authenticate_with(headers, header::AUTHORIZATION, peer);
                Some(match login.await {
                    Ok(_) => setup::containerd(page.hosts, page.mirror, page.query),
                    Err(refused) => refused.into_login_response(),
                })
            }
            _ => None,
        }
    }

    /// The CA certificate (PEM), for `GET /ca.crt`.
    pub(crate) fn ca_pem(&self) -> Option<&str> {
        self.authority.as_ref().map(Authority::cert_pem)
    }

    /// A `CONNECT`: intercepted, tunnelled or refused. The client is authenticated first,
    /// so that nothing about the proxy's routes is told to a stranger.
    pub(crate) async fn connect(
        self: &Arc<Self>,
        routes: &RouteTable,
        uri: &Uri,
        headers: &HeaderMap,
        peer: SocketAddr,
    ) -> Connect {
        let user = match self.authenticate(headers, peer.ip()).await {
            Ok(user) => user,
            Err(refused) => return Connect::Answer(refused.into_response()),
        };
        let bare = uri.scheme().is_none()
            && uri
                .path_and_query()
                .is_none_or(|p| p.as_str() == "/" || p.as_str().is_empty());
        let (name, port) = match target_authority(uri).filter(|_| bare) {
            Some((name, Some(port))) => (name, port),
            _ => {
                return Connect::Answer(
                    refusal(StatusCode::BAD_REQUEST, "CONNECT needs host:port").into_response(),
                );
            }
        };
        let target = match self.classify(routes, &name, port) {
            Ok(t) => t,
            Err(refused) => return Connect::Answer(refused.into_response()),
        };
        match target {
            Some(target) => {
                let base = match port {
                    443 => format!("https://{name}"),
                    p => format!("https://{name}:{p}"),
                };
                let intercepted = Arc::new(Intercepted { target, user, base });
                let proxy = self.clone();
                Connect::Intercept {
                    tls: Box::new(move |sni| proxy.server_config(sni, &name)),
                    intercepted,
                }
            }
            None => match self.tunnel_to(&name, port).await {
                Ok(stream) => {
                    tracing::debug!(host = %name, %peer, "tunnel");
                    Connect::Tunnel(stream)
                }
                Err(refused) => Connect::Answer(refused.into_response()),
            },
        }
    }

    /// An absolute-form request (`GET http://quay.io/v2/…`): a host route's host is served
    /// as if intercepted, over plain HTTP; anything else is refused.
    pub(crate) async fn absolute(
        &self,
        routes: &RouteTable,
        uri: &Uri,
        headers: &HeaderMap,
        peer: SocketAddr,
    ) -> Result<Intercepted, ProxyRefusal> {
        let user = self.authenticate(headers, peer.ip()).await?;
        let (name, port) = target_authority(uri)
            .filter(|_| uri.scheme() == Some(&http::uri::Scheme::HTTP))
            .ok_or_else(|| {
                refusal(
                    StatusCode::BAD_REQUEST,
                    "an absolute-form request needs an http://host[:port] URL",
                )
            })?;
        // Port 80 is plain HTTP's default, as 443 is a CONNECT's: the host's own name.
        let port = port.filter(|p| *p != 80).unwrap_or(443);
        match self.classify(routes, &name, port)? {
            Some(target) => Ok(Intercepted {
                target,
                user,
                base: match port {
                    443 => format!("http://{name}"),
                    p => format!("http://{name}:{p}"),
                },
            }),
            None => Err(refusal(
                StatusCode::FORBIDDEN,
                "this proxy forwards plain HTTP only to the registry hosts it routes",
            )),
        }
    }

    /// `Some`: intercepted (a host route's host, or a token realm); `None`: may be
    /// tunnelled; an answer: refused.
    fn classify(
        &self,
        routes: &RouteTable,
        name: &str,
        port: u16,
    ) -> Result<Option<InterceptTarget>, ProxyRefusal> {
        let literal = name.trim_matches(['[', ']']).parse::<IpAddr>().is_ok();
        if literal {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "this proxy does not connect to IP addresses, only to host names it is configured for",
            ));
        }
        let host = match port {
            443 => RegistryHost::parse(name),
            p => RegistryHost::parse(&format!("{name}:{p}")),
        }
        .ok_or_else(|| refusal(StatusCode::BAD_REQUEST, "not a host name"))?;
        if routes.serves_host(&host) {
            return Ok(Some(InterceptTarget::Registry(host)));
        }
        if port == 443 && self.token_realms.iter().any(|r| r == name) {
            return Ok(Some(InterceptTarget::TokenRealm));
        }
        let tunnelled = port == 443
            && self
                .tunnel
                .iter()
                .any(|g| crate::token::acl::glob_matches(g, name));
        if !tunnelled {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "no route serves this host and forward_proxy.tunnel does not name it",
            ));
        }
        Ok(None)
    }

    /// A tunnel's connection, to a public or private address only: a name that resolves to
    /// loopback, link-local or unspecified addresses is refused (`localhost`, metadata
    /// services), as is one that does not resolve.
    async fn tunnel_to(&self, name: &str, port: u16) -> Result<TcpStream, ProxyRefusal> {
        let unreachable = |why| refusal(StatusCode::BAD_GATEWAY, why);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name, port))
            .await
            .map_err(|_| unreachable("the host does not resolve"))?
            .collect();
        if addrs.is_empty() {
            return Err(unreachable("the host does not resolve"));
        }
        if addrs.iter().any(|a| {
            matches!(
                reach(a.ip()),
                Reach::Loopback | Reach::LinkLocal | Reach::Never
            )
        }) {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "the host resolves to a loopback, link-local or unspecified address",
            ));
        }
        let dial = async {
            let mut last = None;
            for addr in &addrs {
                match TcpStream::connect(addr).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            Err(last)
        };
        match tokio::time::timeout(TUNNEL_CONNECT_TIMEOUT, dial).await {
            Ok(Ok(stream)) => Ok(stream),
            _ => Err(unreachable("cannot connect to the host")),
        }
    }

    fn server_config(
        &self,
        sni: Option<&str>,
        connect_name: &str,
    ) -> Option<Arc<rustls::ServerConfig>> {
        // A leaf for the name the client checks, which must be the host it CONNECTed to:
        // a connection for one host cannot be made to present another's certificate.
        let name = sni
            .map(str::to_ascii_lowercase)
            .unwrap_or_else(|| connect_name.to_string());
        if name != connect_name {
            tracing::debug!(sni = %name, connect = %connect_name, "TLS server name is not the CONNECT host");
            return None;
        }
        let authority = self.authority.as_ref()?;
        match authority.server_config(&name) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "cannot mint a leaf certificate");
                None
            }
        }
    }

    /// The proxy user of a request (`None` when no users are configured), or a `407`.
    async fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: IpAddr,
    ) -> Result<Option<String>, ProxyRefusal> {
        self.authenticate_with(headers, header::PROXY_AUTHORIZATION, peer)
            .await
    }

    /// The user whose Basic credentials are in the `from` header.
    async fn authenticate_with(
        &self,
        headers: &HeaderMap,
        from: header::HeaderName,
        peer: IpAddr,
    ) -> Result<Option<String>, ProxyRefusal> {
        let Some(users) = &self.users else {
            return Ok(None);
        };
        let basic = headers
            .get(from)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
            .and_then(|(_, b64)| {
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .ok()
            })
            .and_then(|raw| String::from_utf8(raw).ok());
        let Some((user, password)) = basic.as_deref().and_then(|b| b.split_once(':')) else {
            return Err(proxy_challenge("proxy authentication required"));
        };
        match users.check(user, password, peer).await {
            Ok(true) => Ok(Some(user.to_string())),
            Ok(false) => {
                tracing::info!(account = %user, "proxy password refused");
                Err(proxy_challenge("invalid proxy username or password"))
            }
            Err(Refusal::Throttled { .. }) => Err(refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed proxy logins: try again later",
            )),
            Err(Refusal::Busy) => Err(refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "too many logins at once",
            )),
        }
    }

    /// The `admit` phase for a request through the proxy: a proxy user may do what
    /// `token_server.acl` grants it (everything without an ACL); without users, what
    /// `auth.anonymous` allows when client auth is configured, else anything. A refusal
    /// is a `403`: the client has no way to present other credentials through a proxy.
    pub(crate) fn admit(
        &self,
        intercepted: &Intercepted,
        method: &Method,
        required: &[Scope],
        auth: Option<&ClientAuth>,
        token_server: Option<&TokenServer>,
    ) -> Result<Admission, GatewayError> {
        let writes = !matches!(*method, Method::GET | Method::HEAD);
        if writes && !self.allow_push {
            return Err(OciError::new(
                ErrorCode::Unsupported,
                "pushes and deletes through this proxy are disabled (forward_proxy.allow_push: false)",
            )
            .with_status(StatusCode::METHOD_NOT_ALLOWED)
            .into());
        }
        let allowed = |scope: &Scope| {
            let one = std::slice::from_ref(scope);
            match (&intercepted.user, token_server, auth) {
                (Some(user), Some(ts), _) => ts.permits(user, one),
                (Some(_), None, _) => true,
                (None, _, Some(auth)) => auth.anonymous_allows(one),
                (None, _, None) => true,
            }
        };
        if let Some(s) = required.iter().find(|s| !allowed(s)) {
            let denied =
                serde_json::json!({ "type": s.kind, "name": s.name, "actions": s.actions });
            return Err(OciError::new(
                ErrorCode::Denied,
                "requested access to the resource is denied",
            )
            .with_status(StatusCode::FORBIDDEN)
            .with_detail(denied)
            .into());
        }
        Ok(Admission::Proxied {
            user: intercepted.user.clone(),
        })
    }
}

/// The host (lower case) and port of a request target, `None` when it has user info or a
/// port that is no port.
fn target_authority(uri: &Uri) -> Option<(String, Option<u16>)> {
    let authority = uri.authority()?;
    let rest = authority.as_str().strip_prefix(authority.host())?;
    let port = match rest.strip_prefix(':') {
        None if rest.is_empty() => None,
        None => return None,
        Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            Some(digits.parse::<u16>().ok()?)
        }
        Some(_) => return None,
    };
    Some((authority.host().to_ascii_lowercase(), port))
}

/// An answer for a token realm's host: any `GET` gets a token, which nothing checks (the
/// gateway authorises intercepted requests by proxy user, and never forwards a client's
/// `Authorization`).
pub(crate) fn realm_answer(method: &Method) -> Response<Body> {
    if *method != Method::GET && *method != Method::POST {
        return refusal(StatusCode::METHOD_NOT_ALLOWED, "token realms answer GET").into_response();
    }
    let issued_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let body = serde_json::json!({
        "token": "ocigate-intercepted",
        "access_token": "ocigate-intercepted",
        "expires_in": 3600,
        "issued_at": issued_at,
    });
    let mut response = Response::new(body::full(body.to_string()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Proxy users, with their checked passwords remembered for a while.
struct ProxyUsers {
    htpasswd: Arc<Htpasswd>,
    guard: LoginGuard,
    /// SHA-256 of `user:password` → when its check expires.
    verified: Mutex<HashMap<[u8; 32], Instant>>,
}

impl ProxyUsers {
    async fn check(&self, user: &str, password: &str, peer: IpAddr) -> Result<bool, Refusal> {
        use sha2::Digest as _;
        let key: [u8; 32] = sha2::Sha256::digest(format!("{user}:{password}")).into();
        let now = Instant::now();
        if self
            .verified
            .lock()
            .get(&key)
            .is_some_and(|until| *until > now)
        {
            return Ok(true);
        }
        let (htpasswd, u, pw) = (
            self.htpasswd.clone(),
            user.to_string(),
            password.to_string(),
        );
        let ok = self
            .guard
            .check(peer, user, move || htpasswd.verify(&u, &pw))
            .await?;
        if ok {
            let mut verified = self.verified.lock();
            if verified.len() >= VERIFIED_MAX {
                verified.retain(|_, until| *until > now);
                if verified.len() >= VERIFIED_MAX {
                    verified.clear();
                }
            }
            verified.insert(key, now + VERIFIED_FOR);
        }
        Ok(ok)
    }
}

/// A refusal from the proxy itself: answered in plain text (clients show it after the
/// status), with a `Proxy-Authenticate` challenge on a `407`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProxyRefusal {
    status: StatusCode,
    why: &'static str,
}

fn refusal(status: StatusCode, why: &'static str) -> ProxyRefusal {
    ProxyRefusal { status, why }
}

fn proxy_challenge(why: &'static str) -> ProxyRefusal {
    refusal(StatusCode::PROXY_AUTHENTICATION_REQUIRED, why)
}

impl ProxyRefusal {
    /// For the proxy's own pages: a `401` asking for a login instead of a `407`.
    fn into_login_response(self) -> Response<Body> {
        let mut response = self.into_response();
        if response.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
            *response.status_mut() = StatusCode::UNAUTHORIZED;
            let challenge = response.headers_mut().remove(header::PROXY_AUTHENTICATE);
            if let Some(c) = challenge {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, c);
            }
        }
        response
    }

    pub(crate) fn into_response(self) -> Response<Body> {
        let text = format!("ocigate forward proxy: {}\n", self.why);
        let mut response = Response::new(body::full(text));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if self.status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
            headers.insert(
                header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"ocigate\""),
            );
        }
        response
    }
}

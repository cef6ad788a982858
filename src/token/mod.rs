//! The built-in token server: distribution's token endpoint on the gateway's own listener.
//!
//! Authenticates the client (htpasswd Basic, `<provider>:<jwt>` OIDC, a refresh token, or
//! nobody), grants each requested scope the intersection of what was asked and what the ACL
//! allows, and mints a JWT the real registry and ocigate's own admission accept. Owns the
//! `/token` answers; must not talk to upstream registries.

pub(crate) mod acl;
pub(crate) mod guard;
pub(crate) mod issuer;
pub(crate) mod oidc;
pub(crate) mod users;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::json;

use crate::body::Body;
use crate::config::TokenServerConfig;
use crate::error::{GatewayError, registry_json};
use crate::oci::{ErrorCode, OciError, Scope};
use acl::{Acl, ClaimMap};
use issuer::{Issuer, IssuerError, RefreshBinding};
use oidc::Oidc;
use users::{Htpasswd, HtpasswdError};

const MAX_FORM: usize = 64 << 10;
pub(crate) const ANONYMOUS: &str = "anonymous";

#[derive(Debug, thiserror::Error)]
pub enum TokenSetupError {
    #[error(transparent)]
    Issuer(#[from] IssuerError),
    #[error("token_server.users.htpasswd {0}")]
    Users(#[from] HtpasswdError),
    #[error("token_server.oidc: {0}")]
    Oidc(#[from] crate::upstream::client::ClientBuildError),
}

pub struct TokenServer {
    path: String,
    issuer: Issuer,
    users: Option<Arc<Htpasswd>>,
    /// bcrypt is slow on purpose: one check per core at once, a bounded queue, and
    /// failed logins limited per peer and username.
    guard: guard::LoginGuard,
    oidc: Oidc,
    acl: Acl,
}

/// An authenticated token request.
pub(crate) struct Login {
    identity: Identity,
    scopes: Vec<Scope>,
    offline: bool,
}

impl Login {
    pub(crate) fn scopes(&self) -> &[Scope] {
        &self.scopes
    }
}

/// Who a token request speaks for.
struct Identity {
    account: String,
    claims: ClaimMap,
    /// The refresh token the client presented: handed back as it is, never renewed, so
    /// a login lasts at most `refresh_lifetime`.
    presented_refresh: Option<String>,
    /// What a new refresh token of this login is tied to.
    binding: RefreshBinding,
}

/// Reads the parameters of a GET (query) or POST (OAuth2 form) token request.
pub(crate) async fn read_request(req: Request<Body>) -> Result<(HeaderMap, Params), GatewayError> {
    let (parts, incoming) = req.into_parts();
    let mut params = Params::default();
    if let Some(q) = parts.uri.query() {
        params.read(q, false);
    }
    if parts.method == Method::POST {
        let form = crate::body::read_to_limit(incoming, MAX_FORM)
            .await
            .map_err(|_| bad_request("the form is too large or unreadable"))?;
        params.read(&String::from_utf8_lossy(&form), true);
    } else if parts.method != Method::GET {
        return Err(OciError::new(ErrorCode::Unsupported, "use GET or POST").into());
    }
    Ok((parts.headers, params))
}

/// The parameters of a GET or POST token request.
#[derive(Default)]
pub(crate) struct Params {
    service: Option<String>,
    scopes: Vec<String>,
    offline: bool,
    grant_type: Option<String>,
    username: Option<String>,
    password: Option<String>,
    refresh_token: Option<String>,
}

impl TokenServer {
    pub fn new(config: &TokenServerConfig) -> Result<TokenServer, TokenSetupError> {
        Ok(TokenServer {
            path: config.path.clone(),
            issuer: Issuer::load(config)?,
            users: match &config.htpasswd {
                Some(p) => Some(Arc::new(Htpasswd::load(p)?)),
                None => None,
            },
            guard: guard::LoginGuard::new(
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            ),
            oidc: Oidc::new(&config.oidc)?,
            acl: Acl::new(config.acl.clone()),
        })
    }

    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// A token for `account` (no credentials checked) covering what the ACL allows of
    /// `scopes`: `ocigate token`, for scripts and tests.
    pub fn token_for(&self, account: &str, scopes: &[Scope]) -> Result<String, IssuerError> {
        let access = self.grant(account, &ClaimMap::new(), scopes);
        Ok(self.issuer.access_token(account, &access)?.token)
    }

    /// Reads a token request and authenticates its client.
    /// `peer` is the client's address, for limiting failed logins.
    pub(crate) async fn login(
        &self,
        req: Request<Body>,
        peer: IpAddr,
    ) -> Result<Login, GatewayError> {
        let (headers, params) = read_request(req).await?;
        if let Some(s) = &params.service
            && s != self.issuer.service()
        {
            return Err(bad_request(&format!("unknown service {s:?}")));
        }
        let scopes = params.valid_scopes()?;
        let identity = self.authenticate(&headers, &params, peer).await?;
        Ok(Login {
            identity,
            scopes,
            offline: params.offline,
        })
    }

    /// The scopes `login` asked for, cut down to what the ACL allows (for the relay, which
    /// seals them instead of minting a JWT).
    pub(crate) fn granted(&self, login: &Login) -> Vec<Scope> {
        self.grant(
            &login.identity.account,
            &login.identity.claims,
            &login.scopes,
        )
    }

    /// Answers an authenticated request with a JWT for what the ACL grants.
    pub(crate) fn answer(&self, login: Login) -> Result<Response<Body>, GatewayError> {
        let Login {
            identity,
            scopes,
            offline,
        } = login;
        let access = self.grant(&identity.account, &identity.claims, &scopes);
        let minted = self
            .issuer
            .access_token(&identity.account, &access)
            .map_err(|e| internal(&e.to_string()))?;
        let mut answer = json!({
            "token": minted.token,
            "access_token": minted.token,
            "expires_in": minted.expires_in,
            "issued_at": minted.issued_at,
        });
        if offline && identity.account != ANONYMOUS {
            let refresh = match identity.presented_refresh {
                Some(r) => r,
                None => self
                    .issuer
                    .refresh_token(&identity.account, &identity.claims, &identity.binding)
                    .map_err(|e| internal(&e.to_string()))?,
            };
            answer["refresh_token"] = json!(refresh);
        }
        tracing::info!(
            account = %identity.account,
            granted = %access.iter().map(|a| format!("{}:{}:{}", a.kind, a.name, a.actions.join(","))).collect::<Vec<_>>().join(" "),
            "token issued"
        );
        crate::metrics::token_issued(true);
        Ok(registry_json(StatusCode::OK, answer.to_string()))
    }

    async fn authenticate(
        &self,
        headers: &HeaderMap,
        p: &Params,
        peer: IpAddr,
    ) -> Result<Identity, GatewayError> {
        let refused = |why: &str| {
            crate::metrics::token_issued(false);
            unauthorized(why)
        };
        if p.grant_type.as_deref() == Some("refresh_token") {
            let token = p
                .refresh_token
                .as_deref()
                .ok_or_else(|| bad_request("refresh_token is required"))?;
            let (account, claims, entry) = self
                .issuer
                .open_refresh(token)
                .map_err(|_| refused("invalid or expired refresh token"))?;
            // A password account must still have the password it logged in with; an OIDC
            // login keeps its claims until the refresh token expires (no later than its
            // identity token, unless the provider allows refresh).
            let federated = account
                .split_once(':')
                .is_some_and(|(provider, _)| self.oidc.has(provider));
            let current = self.users.as_ref().and_then(|u| u.fingerprint(&account));
            if !federated && (current.is_none() || current != entry) {
                return Err(refused(
                    "the account no longer exists or its password changed",
                ));
            }
            return Ok(Identity {
                account,
                claims,
                presented_refresh: Some(token.to_string()),
                binding: RefreshBinding::default(),
            });
        }
        let credentials = match (&p.username, &p.password) {
            (Some(u), Some(pw)) if p.grant_type.as_deref() == Some("password") => {
                Some((u.clone(), pw.clone()))
            }
            _ => basic_credentials(headers),
        };
        let Some((user, password)) = credentials else {
            return Ok(Identity {
                account: ANONYMOUS.into(),
                claims: ClaimMap::new(),
                presented_refresh: None,
                binding: RefreshBinding::default(),
            });
        };
        if self.oidc.has(&user) {
            let (account, claims) = self.oidc.verify(&user, &password).await.map_err(|e| {
                tracing::info!(provider = %user, error = %e, "identity token refused");
                match e {
                    oidc::OidcError::Unreachable(_) => GatewayError::Oci(
                        OciError::new(ErrorCode::Unavailable, "identity provider unreachable")
                            .with_status(StatusCode::SERVICE_UNAVAILABLE),
                    ),
                    _ => refused("invalid identity token"),
                }
            })?;
            let until = if self.oidc.allows_refresh(&user) {
                None
            } else {
                // Verified tokens always have an `exp`; without one, no refresh at all.
                Some(claims.get("exp").and_then(|e| e.parse().ok()).unwrap_or(0))
            };
            return Ok(Identity {
                account,
                claims,
                presented_refresh: None,
                binding: RefreshBinding { until, entry: None },
            });
        }
        let Some(users) = self.users.clone() else {
            return Err(refused("invalid username or password"));
        };
        let (u, pw) = (user.clone(), password);
        let checked = self
            .guard
            .check(peer, &user, move || users.verify(&u, &pw))
            .await;
        let ok = checked.map_err(|refusal| {
            let (message, retry_after) = match refusal {
                guard::Refusal::Throttled { retry_after } => {
                    tracing::info!(account = %user, %peer, "login throttled after failures");
                    ("too many failed logins: try again later", retry_after)
                }
                guard::Refusal::Busy => ("too many logins at once", Duration::from_secs(1)),
            };
            GatewayError::TooMany {
                error: OciError::new(ErrorCode::TooManyRequests, message),
                retry_after,
            }
        })?;
        if !ok {
            tracing::info!(account = %user, "password refused");
            return Err(refused("invalid username or password"));
        }
        let binding = RefreshBinding {
            until: None,
            entry: self.users.as_ref().and_then(|u| u.fingerprint(&user)),
        };
        Ok(Identity {
            account: user,
            claims: ClaimMap::new(),
            presented_refresh: None,
            binding,
        })
    }

    /// Whether the ACL grants `account` (with no claims: a password user) every action of
    /// every scope in `required`.
    pub(crate) fn permits(&self, account: &str, required: &[Scope]) -> bool {
        required.iter().all(|scope| {
            let granted = self.acl.grant(account, &ClaimMap::new(), scope);
            scope.actions.iter().all(|a| granted.contains(a))
        })
    }

    fn grant(&self, account: &str, claims: &ClaimMap, scopes: &[Scope]) -> Vec<Scope> {
        let mut access: Vec<Scope> = Vec::new();
        for scope in scopes {
            let actions = self.acl.grant(account, claims, scope);
            if actions.is_empty() {
                continue;
            }
            let kind = if scope.is_repository() {
                "repository"
            } else {
                scope.kind.as_str()
            };
            match access
                .iter_mut()
                .find(|a| a.kind == kind && a.name == scope.name)
            {
                Some(entry) => {
                    for a in actions {
                        if !entry.actions.contains(&a) {
                            entry.actions.push(a);
                        }
                    }
                }
                None => access.push(Scope {
                    kind: kind.to_string(),
                    name: scope.name.clone(),
                    actions,
                }),
            }
        }
        access
    }
}

impl Params {
    /// The requested scopes, parsed and bounded: valid repository names, at most 64.
    pub(crate) fn valid_scopes(&self) -> Result<Vec<Scope>, GatewayError> {
        if self.scopes.len() > 64 {
            return Err(bad_request("too many scopes"));
        }
        self.scopes
            .iter()
            .map(|s| {
                Scope::parse(s)
                    .filter(|scope| {
                        !scope.is_repository()
                            || crate::oci::host::valid_qualified_name(&scope.name)
                    })
                    .filter(|scope| scope.name.len() <= 255 && scope.actions.len() <= 8)
                    .ok_or_else(|| bad_request(&format!("invalid scope {s:?}")))
            })
            .collect()
    }

    fn read(&mut self, query: &str, form: bool) {
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            let v = v.into_owned();
            match k.as_ref() {
                "service" => self.service = Some(v),
                // GET repeats `scope`; the OAuth2 form separates scopes with spaces.
                "scope" if form => self.scopes.extend(v.split_whitespace().map(str::to_string)),
                "scope" => self.scopes.push(v),
                "offline_token" => self.offline |= v == "true",
                "access_type" => self.offline |= v == "offline",
                "grant_type" => self.grant_type = Some(v),
                "username" => self.username = Some(v),
                "password" => self.password = Some(v),
                "refresh_token" => self.refresh_token = Some(v),
                _ => {}
            }
        }
        // An OAuth2 password or refresh grant is an offline login.
        if form && self.grant_type.is_some() {
            self.offline = true;
        }
    }
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn unauthorized(why: &str) -> GatewayError {
    GatewayError::Login(OciError::new(ErrorCode::Unauthorized, why))
}

fn bad_request(why: &str) -> GatewayError {
    GatewayError::Oci(
        OciError::new(ErrorCode::Unsupported, why).with_status(StatusCode::BAD_REQUEST),
    )
}

fn internal(why: &str) -> GatewayError {
    GatewayError::Oci(OciError::new(ErrorCode::Unknown, why))
}

/// The challenge a failed login gets, so clients know to send Basic credentials.
pub(crate) fn login_challenge() -> HeaderValue {
    HeaderValue::from_static("Basic realm=\"ocigate token server\"")
}

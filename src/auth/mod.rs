//! Client admission: distribution token auth in front of any upstream, and the
//! [`Admission`] value every phase after `admit` reads.
//!
//! Reads the client's `Authorization: Bearer` token and the scopes the request needs (in
//! local names); verifies the token as distribution does ([`jwt`], [`keys`]), caching
//! verified tokens until they expire; answers with a 401 challenge when the token is missing,
//! invalid or too weak. Owns the one bearer-token parser and the one challenge builder
//! ([`Denied::bearer`]) that the relay uses too. Must not touch upstreams: the client's token
//! never goes further.

pub(crate) mod jwt;
pub mod keys;
pub(crate) mod remote;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method};

use crate::config::{JwksSource, TokenAuthConfig, UpstreamConfig};
use crate::oci::challenge::BearerError;
use crate::oci::{ApiPath, Challenge, Endpoint, ErrorCode, OciError, Scope};
use jwt::{Claims, Policy};
use keys::{KeyError, KeyStore};
use remote::RemoteKeys;

/// Verified tokens kept at most; beyond it expired ones are dropped, then all.
const CACHE_LIMIT: usize = 10_000;

/// Who a request acts for: decided once, by the admit phase, and read by every later one
/// (what the upstream is sent, how an upstream refusal is answered, the access log).
#[derive(Debug, Clone)]
pub(crate) enum Admission {
    /// No client authentication is configured: anyone may ask.
    Open,
    /// Client authentication is configured, and `auth.anonymous` covers the request.
    Anonymous,
    /// A verified client token: its subject and grants.
    Client(Arc<Claims>),
    /// A relay token (on a relay route, or at `/v2/`): the upstream token it sealed, `None`
    /// when the upstream takes no bearer tokens.
    Relay { upstream_token: Option<HeaderValue> },
    /// A request through the forward proxy, for its proxy user (`None`: no users are
    /// configured), as the ACL or `auth.anonymous` allow.
    Proxied { user: Option<String> },
}

impl Admission {
    /// The verified client token's subject, for logs.
    pub(crate) fn subject(&self) -> Option<&str> {
        match self {
            Admission::Client(claims) => claims.sub.as_deref(),
            Admission::Proxied { user } => user.as_deref(),
            _ => None,
        }
    }
}

/// A refusal: the challenge to send and the OCI error body.
#[derive(Debug, Clone)]
pub struct Denied {
    pub(crate) challenge: Challenge,
    pub(crate) error: OciError,
}

impl Denied {
    /// A 401 with a Bearer challenge for `required` at `realm`, saying why the token shown
    /// (if any) was refused.
    pub(crate) fn bearer(
        realm: &str,
        service: &str,
        required: &[Scope],
        why: Option<BearerError>,
        body: OciError,
    ) -> Denied {
        let challenge = Challenge::bearer(realm, service, required);
        Denied {
            challenge: match why {
                Some(why) => challenge.with_error(why),
                None => challenge,
            },
            error: body.with_status(http::StatusCode::UNAUTHORIZED),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer_token(authorization: Option<&HeaderValue>) -> Option<&str> {
    authorization
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
}

pub(crate) struct ClientAuth {
    realm: Option<String>,
    realm_path: String,
    service: String,
    policy: Policy,
    keys: KeyStore,
    /// Keys from a JWKS URL, fetched when a token names a `kid` we do not know.
    remote: Option<RemoteKeys>,
    anonymous: Vec<String>,
    verified: Mutex<HashMap<String, Arc<Claims>>>,
}

impl ClientAuth {
    pub(crate) fn new(
        config: &TokenAuthConfig,
        anonymous: &[String],
    ) -> Result<ClientAuth, KeyError> {
        let mut keys = KeyStore::default();
        for bundle in &config.rootcertbundles {
            keys.add_bundle(bundle)?;
        }
        let mut remote = None;
        match &config.jwks {
            None => {}
            Some(JwksSource::File(path)) => {
                let json = std::fs::read(path).map_err(|e| KeyError::File {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                let added = keys.add_jwks(&json, &path.display().to_string())?;
                if added == 0 {
                    return Err(KeyError::File {
                        path: path.display().to_string(),
                        reason: "no usable (RSA, EC P-256/P-384 or Ed25519) key in the set".into(),
                    });
                }
            }
            Some(JwksSource::Url(url)) => {
                let client =
                    crate::upstream::client::build(&UpstreamConfig::new("jwks", url.clone()))
                        .map_err(|e| KeyError::File {
                            path: url.to_string(),
                            reason: e.to_string(),
                        })?;
                remote = Some(RemoteKeys::jwks(url.as_str(), client));
            }
        }
        Ok(ClientAuth {
            realm: (!config.autoredirect)
                .then(|| config.realm.as_ref().map(|u| u.to_string()))
                .flatten(),
            realm_path: config.realm_path.clone(),
            service: config.service.clone(),
            policy: Policy {
                issuer: config.issuer.clone(),
                service: config.service.clone(),
                algorithms: config.signing_algorithms.clone(),
            },
            keys,
            remote,
            anonymous: anonymous.to_vec(),
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Checks the request's token against the scopes it needs: a verified client, or an
    /// anonymous request that `auth.anonymous` covers.
    pub(crate) async fn check(
        &self,
        authorization: Option<&HeaderValue>,
        required: &[Scope],
        public_base: &str,
    ) -> Result<Admission, Denied> {
        let Some(token) = bearer_token(authorization) else {
            if !required.is_empty() && required.iter().all(|s| self.anonymous_covers(s)) {
                return Ok(Admission::Anonymous);
            }
            return Err(self.refusal(
                required,
                public_base,
                None,
                OciError::new(ErrorCode::Unauthorized, "authentication required"),
            ));
        };
        let claims = self.verified(token).await.map_err(|reason| {
            tracing::debug!(%reason, "client token refused");
            self.refusal(
                required,
                public_base,
                Some(BearerError::InvalidToken),
                OciError::new(ErrorCode::Unauthorized, format!("invalid token: {reason}")),
            )
        })?;
        for scope in required {
            for action in &scope.actions {
                if !claims.grants(&scope.kind, &scope.name, action)
                    && !self.anonymous.iter().any(|a| a == action || a == "*")
                {
                    return Err(self.refusal(
                        required,
                        public_base,
                        Some(BearerError::InsufficientScope),
                        OciError::new(
                            ErrorCode::Denied,
                            "requested access to the resource is denied",
                        )
                        .with_detail(serde_json::json!({
                            "type": scope.kind, "name": scope.name, "action": action,
                        })),
                    ));
                }
            }
        }
        Ok(Admission::Client(claims))
    }

    /// Verifies against the configured keys and the JWKS URL's, fetching those again once
    /// when the token names a key neither has.
    async fn verify(&self, token: &str, now: u64) -> Result<Claims, jwt::Rejected> {
        let Some(remote) = &self.remote else {
            return jwt::verify(token, &[&self.keys], &self.policy, now);
        };
        let first = jwt::verify(token, &[&self.keys, &remote.current()], &self.policy, now);
        let kid = match (&first, jsonwebtoken::decode_header(token)) {
            (Err(jwt::Rejected::UnknownKey(_)), Ok(h)) => h.kid.unwrap_or_default(),
            _ => return first,
        };
        if let Err(e) = remote.refresh_if_needed(&kid).await {
            tracing::warn!(error = %e, "cannot fetch the JWKS");
            return first;
        }
        jwt::verify(token, &[&self.keys, &remote.current()], &self.policy, now)
    }

    /// Whether `auth.anonymous` covers every scope of `required` (none: yes).
    pub(crate) fn anonymous_allows(&self, required: &[Scope]) -> bool {
        required.iter().all(|s| self.anonymous_covers(s))
    }

    fn anonymous_covers(&self, scope: &Scope) -> bool {
        scope.is_repository()
            && scope
                .actions
                .iter()
                .all(|a| self.anonymous.iter().any(|x| x == a || x == "*"))
    }

    /// A verified token from the cache, or verified now and cached until it expires.
    async fn verified(&self, token: &str) -> Result<Arc<Claims>, jwt::Rejected> {
        let now = unix_now();
        if let Some(claims) = self.verified.lock().get(token)
            && now <= claims.exp.saturating_add(jwt::LEEWAY_SECS)
        {
            return Ok(claims.clone());
        }
        let claims = Arc::new(self.verify(token, now).await?);
        {
            let mut cache = self.verified.lock();
            if cache.len() >= CACHE_LIMIT {
                cache.retain(|_, c| now <= c.exp.saturating_add(jwt::LEEWAY_SECS));
                if cache.len() >= CACHE_LIMIT {
                    cache.clear();
                }
            }
            cache.insert(token.to_string(), claims.clone());
        }
        Ok(claims)
    }

    /// The realm clients are sent to: configured, or (autoredirect) our own token path.
    pub(crate) fn realm(&self, public_base: &str) -> String {
        self.realm
            .clone()
            .unwrap_or_else(|| format!("{public_base}{}", self.realm_path))
    }

    /// A 401 with our challenge for `required` (local names) and this body.
    pub(crate) fn refusal(
        &self,
        required: &[Scope],
        public_base: &str,
        why: Option<BearerError>,
        body: OciError,
    ) -> Denied {
        Denied::bearer(&self.realm(public_base), &self.service, required, why, body)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The access a request needs, in local names: pull for reads, pull+push for writes,
/// delete for DELETE, `registry:catalog:*` for the catalog, and pull on a mount's `from`.
pub(crate) fn required_scopes(
    method: &Method,
    api: &ApiPath,
    mount_from: Option<&str>,
) -> Vec<Scope> {
    let Some(name) = &api.name else {
        return match api.endpoint {
            Endpoint::Catalog => vec![Scope::catalog()],
            _ => Vec::new(),
        };
    };
    let mut scopes = vec![Scope::repository(
        name,
        crate::oci::required_actions(method),
    )];
    if let Some(from) = mount_from {
        scopes.push(Scope::repository(from, &["pull"]));
    }
    scopes
}

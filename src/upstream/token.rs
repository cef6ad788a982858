//! The upstream token dance's memory and its one network call: fetching a bearer token from
//! an upstream's realm, deciding whether that realm may see our credentials, and caching
//! tokens per scope set until shortly before they expire.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request, StatusCode, header};
use serde::Deserialize;
use url::Url;

use super::client::Transport;
use super::credentials::Secret;
use crate::body;
use crate::flight::{Gate, Gates};
use crate::oci::Scope;

const MAX_TOKEN_RESPONSE: usize = 1 << 20;
const MAX_TOKENS: usize = 4096;
/// A realm's whole answer (connect, headers, body) must come within this.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Tokens are used at most this long, whatever `expires_in` claims.
const MAX_LIFETIME: Duration = Duration::from_secs(86400);

#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("token realm {realm} is not a usable URL")]
    BadRealm { realm: String },
    #[error("token realm {realm} unreachable: {reason}")]
    Unreachable { realm: String, reason: String },
    #[error("token realm {realm} answered {status}")]
    Refused { realm: String, status: StatusCode },
    #[error("token realm {realm} answered without a token")]
    NoToken { realm: String },
}

/// Whether credentials may be sent to `realm` for an upstream at `upstream`: the same origin;
/// or, for https, a host on the same registrable domain; anything else (other domains, IP
/// literals, localhost) only when listed in `allowed_realms`.
pub(crate) fn realm_may_receive_credentials(upstream: &Url, realm: &Url, allowed: &[Url]) -> bool {
    let strip = |u: &Url| {
        let mut u = u.clone();
        u.set_query(None);
        u.set_fragment(None);
        u
    };
    if allowed.iter().any(|a| strip(a) == strip(realm)) {
        return true;
    }
    if realm.origin() == upstream.origin() {
        return true;
    }
    let (Some(realm_host), Some(upstream_host)) = (realm.host_str(), upstream.host_str()) else {
        return false;
    };
    let literal_or_local = |h: &str| {
        h.trim_matches(['[', ']']).parse::<IpAddr>().is_ok()
            || h == "localhost"
            || h.ends_with(".localhost")
    };
    if literal_or_local(realm_host) || realm.scheme() != "https" {
        return false;
    }
    match (psl::domain_str(realm_host), psl::domain_str(upstream_host)) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        _ => false,
    }
}

/// A bearer token and the moment to stop using it.
#[derive(Clone)]
pub(crate) struct Token {
    pub(crate) header: HeaderValue,
    pub(crate) valid_until: Instant,
}

pub(crate) struct TokenCache {
    entries: Mutex<HashMap<String, Token>>,
    /// One fetch per scope set at a time: concurrent cold requests wait for it instead of
    /// each asking the realm (registries rate-limit token requests too).
    flights: Gates,
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache {
            entries: Mutex::default(),
            flights: Gates::new(MAX_TOKENS),
        }
    }
}

impl TokenCache {
    pub(crate) fn key(scopes: &[Scope]) -> String {
        let mut s: Vec<String> = scopes.iter().map(Scope::to_string).collect();
        s.sort();
        s.join(" ")
    }

    /// A cached token with at least `min_left` of its life left.
    pub(crate) fn get(&self, key: &str, min_left: Duration) -> Option<Token> {
        let mut entries = self.entries.lock();
        match entries.get(key) {
            Some(t) if t.valid_until > Instant::now() + min_left => Some(t.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    pub(crate) fn put(&self, key: String, token: Token) {
        {
            let mut entries = self.entries.lock();
            // Bound the map: drop expired entries when it grows, and everything if that was
            // not enough (many distinct names within a token's lifetime).
            if entries.len() >= MAX_TOKENS {
                let now = Instant::now();
                entries.retain(|_, t| t.valid_until > now);
                if entries.len() >= MAX_TOKENS {
                    entries.clear();
                }
            }
            entries.insert(key, token);
        }
    }

    /// The gate for fetching `key`; hold its lock while fetching.
    pub(crate) fn flight(&self, key: &str) -> Gate {
        self.flights.gate(key)
    }

    /// Forgets the token for `key` if it is `refused` (and not one fetched meanwhile).
    pub(crate) fn remove_if(&self, key: &str, refused: &HeaderValue) {
        let mut entries = self.entries.lock();
        if entries.get(key).is_some_and(|t| t.header == *refused) {
            entries.remove(key);
        }
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// Asks `realm` for a token covering `scopes`.
pub(crate) async fn fetch(
    client: &dyn Transport,
    realm: &str,
    service: Option<&str>,
    scopes: &[Scope],
    secret: Option<&Secret>,
) -> Result<Token, TokenError> {
    let mut url = Url::parse(realm)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| TokenError::BadRealm {
            realm: realm.to_string(),
        })?;
    let request = match secret {
        Some(Secret::IdentityToken(refresh)) => {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "refresh_token");
            form.append_pair("refresh_token", refresh);
            form.append_pair("client_id", "ocigate");
            if let Some(s) = service {
                form.append_pair("service", s);
            }
            if !scopes.is_empty() {
                form.append_pair("scope", &crate::oci::challenge::join_scopes(scopes));
            }
            Request::builder()
                .method(Method::POST)
                .uri(url.as_str())
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(body::full(form.finish()))
        }
        _ => {
            {
                let mut q = url.query_pairs_mut();
                if let Some(s) = service {
                    q.append_pair("service", s);
                }
                for scope in scopes {
                    q.append_pair("scope", &scope.to_string());
                }
                if let Some(Secret::Basic { username, .. }) = secret {
                    q.append_pair("account", username);
                }
            }
            let mut b = Request::builder().method(Method::GET).uri(url.as_str());
            if let Some(v) = secret.and_then(Secret::basic_header) {
                b = b.header(header::AUTHORIZATION, v);
            }
            b.body(body::empty())
        }
    };
    let request = request.map_err(|_| TokenError::BadRealm {
        realm: realm.to_string(),
    })?;
    let unreachable = |reason: String| TokenError::Unreachable {
        realm: realm.to_string(),
        reason,
    };
    let exchange = async {
        let response = client
            .send(request)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(TokenError::Refused {
                realm: realm.to_string(),
                status,
            });
        }
        body::read_to_limit(response.into_body(), MAX_TOKEN_RESPONSE)
            .await
            .map_err(unreachable)
    };
    let bytes = tokio::time::timeout(FETCH_TIMEOUT, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {FETCH_TIMEOUT:?}")))??;
    let parsed: TokenResponse =
        serde_json::from_slice(&bytes).map_err(|_| TokenError::NoToken {
            realm: realm.to_string(),
        })?;
    let token = parsed
        .token
        .or(parsed.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| TokenError::NoToken {
            realm: realm.to_string(),
        })?;
    let mut header =
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| TokenError::NoToken {
            realm: realm.to_string(),
        })?;
    header.set_sensitive(true);
    // The spec's default lifetime is 60 s; stop using a token a little before it ends.
    let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(60).max(60)).min(MAX_LIFETIME);
    let margin = (lifetime / 5).min(Duration::from_secs(30));
    Ok(Token {
        header,
        valid_until: Instant::now() + lifetime - margin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn realm_rules() {
        let hub = u("https://registry-1.docker.io/");
        let none: &[Url] = &[];
        assert!(realm_may_receive_credentials(
            &hub,
            &u("https://auth.docker.io/token"),
            none
        ));
        assert!(!realm_may_receive_credentials(
            &hub,
            &u("http://auth.docker.io/token"),
            none
        ));
        assert!(!realm_may_receive_credentials(
            &hub,
            &u("https://evil.example/token"),
            none
        ));
        assert!(!realm_may_receive_credentials(
            &hub,
            &u("https://127.0.0.1/token"),
            none
        ));
        let ghcr = u("https://ghcr.io/");
        assert!(realm_may_receive_credentials(
            &ghcr,
            &u("https://ghcr.io/token"),
            none
        ));
        // Different tenants of a public suffix are different domains.
        let a = u("https://a.github.io/");
        assert!(!realm_may_receive_credentials(
            &a,
            &u("https://b.github.io/token"),
            none
        ));
        let local = u("http://127.0.0.1:5000/");
        let realm = u("http://127.0.0.1:5001/token");
        assert!(!realm_may_receive_credentials(&local, &realm, none));
        assert!(realm_may_receive_credentials(
            &local,
            &realm,
            std::slice::from_ref(&realm)
        ));
        assert!(realm_may_receive_credentials(
            &local,
            &u("http://127.0.0.1:5000/token"),
            none
        ));
        assert!(!realm_may_receive_credentials(
            &local,
            &u("http://localhost:5001/token"),
            none
        ));
    }

    #[test]
    fn cache_keys_ignore_order_and_expire() {
        let a = Scope::repository("a", &["pull"]);
        let b = Scope::repository("b", &["pull"]);
        assert_eq!(
            TokenCache::key(&[a.clone(), b.clone()]),
            TokenCache::key(&[b, a])
        );
        let cache = TokenCache::default();
        cache.put(
            "k".into(),
            Token {
                header: HeaderValue::from_static("Bearer x"),
                valid_until: Instant::now() - Duration::from_secs(1),
            },
        );
        assert!(cache.get("k", Duration::ZERO).is_none());
        cache.put(
            "k".into(),
            Token {
                header: HeaderValue::from_static("Bearer y"),
                valid_until: Instant::now() + Duration::from_secs(60),
            },
        );
        assert_eq!(cache.get("k", Duration::ZERO).unwrap().header, "Bearer y");
    }
}

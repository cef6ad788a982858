//! The PASETO relay: upstream tokens handed to clients sealed in v4.local PASETOs that only
//! this proxy can open (backplane/registryproxy's idea, without its flaws).
//!
//! A relay token carries the upstream token, the upstream and route it belongs to, the local
//! scopes it covers and an expiry no later than the upstream token's. The route is also the
//! PASETO's implicit assertion, so a token minted for one route does not even decrypt on
//! another. Owns sealing and opening, admission on relay routes ([`Relay::admit`]) and the token
//! endpoint ([`endpoint`]); must not decide routes (the pipeline resolves them).

pub(crate) mod endpoint;

use std::time::{SystemTime, UNIX_EPOCH};

use pasetors::Local;
use pasetors::keys::SymmetricKey;
use pasetors::token::UntrustedToken;
use pasetors::version4::{LocalToken, V4};
use serde::{Deserialize, Serialize};

use http::HeaderValue;

use crate::auth::{Admission, Denied, bearer_token};
use crate::config::RelayConfig;
use crate::oci::challenge::BearerError;
use crate::oci::{ErrorCode, OciError, Scope};

/// Relay tokens live at most this long, however long the upstream token would.
pub(crate) const MAX_LIFETIME_SECS: u64 = 300;

/// Sealed payloads are at least this long, then whole multiples of [`PAD_STEP`].
const PAD_MIN: usize = 4096;
const PAD_STEP: usize = 1024;

fn padded_len(len: usize) -> usize {
    len.div_ceil(PAD_STEP).max(PAD_MIN / PAD_STEP) * PAD_STEP
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RelayError {
    #[error("not a relay token")]
    Malformed,
    #[error("not sealed by this proxy for this route")]
    Unsealed,
    #[error("relay token expired")]
    Expired,
    #[error("relay token for another upstream")]
    OtherUpstream,
    #[error("cannot seal: {0}")]
    Seal(String),
}

/// What a relay token says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayClaims {
    /// The upstream's bearer token; empty when the upstream needs none.
    pub ut: String,
    /// Upstream name.
    pub up: String,
    /// Route prefix.
    pub rt: String,
    /// Granted scopes, in local names.
    pub sc: Vec<String>,
    pub iat: u64,
    pub exp: u64,
}

impl RelayClaims {
    /// Whether the token grants every action of every scope in `required`.
    pub(crate) fn covers(&self, required: &[Scope]) -> bool {
        let granted: Vec<Scope> = self.sc.iter().filter_map(|s| Scope::parse(s)).collect();
        crate::oci::challenge::covers(&granted, required)
    }
}

pub struct Relay {
    /// The current key first, then the previous ones (still opened, never used to seal).
    keys: Vec<SymmetricKey<V4>>,
    /// Where clients get relay tokens: `token_server.path` when there is one, else `/token`.
    path: String,
    /// The service challenges name: the token server's, which refuses any other; without
    /// one, the host clients reach us by.
    service: Option<String>,
}

impl Relay {
    pub fn new(config: &RelayConfig, path: &str) -> Result<Relay, RelayError> {
        let keys = std::iter::once(&config.secret_key)
            .chain(&config.previous_keys)
            .map(|k| SymmetricKey::<V4>::from(k).map_err(|e| RelayError::Seal(e.to_string())))
            .collect::<Result<_, _>>()?;
        Ok(Relay {
            keys,
            path: path.to_string(),
            service: None,
        })
    }

    /// Relay tokens come from the token server answering for `service`: challenges name it.
    pub(crate) fn with_service(mut self, service: &str) -> Relay {
        self.service = Some(service.to_string());
        self
    }

    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// Seals `claims`, padded to [`padded_len`]: a token's length says little about what it
    /// carries (a name on no relay route gets one as long as a route's).
    pub fn seal(&self, claims: &RelayClaims) -> Result<String, RelayError> {
        #[derive(Serialize)]
        struct Padded<'a> {
            #[serde(flatten)]
            claims: &'a RelayClaims,
            pd: String,
        }
        let err = |e: serde_json::Error| RelayError::Seal(e.to_string());
        let mut padded = Padded {
            claims,
            pd: String::new(),
        };
        let bare = serde_json::to_vec(&padded).map_err(err)?.len();
        padded.pd = "0".repeat(padded_len(bare) - bare);
        let payload = serde_json::to_vec(&padded).map_err(err)?;
        let key = self.keys.first().ok_or(RelayError::Seal("no key".into()))?;
        LocalToken::encrypt(key, &payload, None, Some(claims.rt.as_bytes()))
            .map_err(|e| RelayError::Seal(e.to_string()))
    }

    /// Opens a token presented on `route` for `upstream`, checking expiry.
    pub(crate) fn open(
        &self,
        token: &str,
        route: &str,
        upstream: &str,
        now: u64,
    ) -> Result<RelayClaims, RelayError> {
        let claims = self.open_on_route(token, route, now)?;
        if claims.up != upstream {
            return Err(RelayError::OtherUpstream);
        }
        Ok(claims)
    }

    /// Opens a token presented on `route` (its implicit assertion), checking expiry.
    fn open_on_route(&self, token: &str, route: &str, now: u64) -> Result<RelayClaims, RelayError> {
        let untrusted =
            UntrustedToken::<Local, V4>::try_from(token).map_err(|_| RelayError::Malformed)?;
        let trusted = self
            .keys
            .iter()
            .find_map(|k| LocalToken::decrypt(k, &untrusted, None, Some(route.as_bytes())).ok())
            .ok_or(RelayError::Unsealed)?;
        let claims: RelayClaims =
            serde_json::from_str(trusted.payload()).map_err(|_| RelayError::Malformed)?;
        if claims.rt != route {
            return Err(RelayError::Unsealed);
        }
        if now > claims.exp {
            return Err(RelayError::Expired);
        }
        Ok(claims)
    }

    /// The `/v2/` check: clients learn the realm from it, so it is challenged unless the
    /// client shows a relay token sealed for one of `routes` (or a scope-less login token).
    pub(crate) fn admit_base<'a>(
        &self,
        authorization: Option<&HeaderValue>,
        routes: impl Iterator<Item = &'a str>,
        public_base: &str,
    ) -> Result<Admission, Denied> {
        let now = unix_now();
        let valid = bearer_token(authorization).is_some_and(|t| {
            std::iter::once("")
                .chain(routes)
                .any(|route| self.open_on_route(t, route, now).is_ok())
        });
        if valid {
            Ok(Admission::Relay {
                upstream_token: None,
            })
        } else {
            Err(self.refusal(public_base, &[], None, "authentication required"))
        }
    }
}

impl Relay {
    /// Our challenge for a relay route: realm and service are the proxy's, scopes local.
    pub(crate) fn refusal(
        &self,
        public_base: &str,
        required: &[Scope],
        why: Option<BearerError>,
        message: &str,
    ) -> Denied {
        let code = match why {
            Some(BearerError::InsufficientScope) => ErrorCode::Denied,
            _ => ErrorCode::Unauthorized,
        };
        Denied::bearer(
            &format!("{public_base}{}", self.path),
            &self.service.clone().unwrap_or_else(|| service(public_base)),
            required,
            why,
            OciError::new(code, message),
        )
    }

    /// Admission on a relay route: the client's bearer PASETO must open for this route and
    /// upstream, be unexpired and cover `required` (local names). Admits with the upstream
    /// token to send instead; anything wrong is a 401 with a fresh challenge pointing at our
    /// token endpoint.
    pub(crate) fn admit(
        &self,
        authorization: Option<&HeaderValue>,
        route: &str,
        upstream: &str,
        required: &[Scope],
        public_base: &str,
    ) -> Result<Admission, Denied> {
        let Some(token) = bearer_token(authorization) else {
            return Err(self.refusal(public_base, required, None, "authentication required"));
        };
        let claims = self.open(token, route, upstream, unix_now()).map_err(|e| {
            self.refusal(
                public_base,
                required,
                Some(BearerError::InvalidToken),
                &e.to_string(),
            )
        })?;
        if !claims.covers(required) {
            return Err(self.refusal(
                public_base,
                required,
                Some(BearerError::InsufficientScope),
                "the relay token does not cover this request",
            ));
        }
        if claims.ut.is_empty() {
            return Ok(Admission::Relay {
                upstream_token: None,
            });
        }
        let mut header = HeaderValue::from_str(&format!("Bearer {}", claims.ut)).map_err(|_| {
            self.refusal(
                public_base,
                required,
                Some(BearerError::InvalidToken),
                "bad upstream token",
            )
        })?;
        header.set_sensitive(true);
        Ok(Admission::Relay {
            upstream_token: Some(header),
        })
    }
}

/// The relay's service name: the host clients reach us by.
pub(crate) fn service(public_base: &str) -> String {
    public_base
        .split_once("://")
        .map_or(public_base, |(_, host)| host)
        .to_string()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(key: u8, previous: &[u8]) -> Relay {
        Relay::new(
            &RelayConfig {
                secret_key: vec![key; 32],
                previous_keys: previous.iter().map(|p| vec![*p; 32]).collect(),
            },
            "/token",
        )
        .unwrap()
    }

    fn claims(route: &str, exp: u64) -> RelayClaims {
        RelayClaims {
            ut: "eyJhbGciOi.upstream.jwt".into(),
            up: "ghcr".into(),
            rt: route.into(),
            sc: vec!["repository:priv/app:pull".into()],
            iat: 1000,
            exp,
        }
    }

    #[test]
    fn sealed_tokens_open_only_on_their_route_and_key() {
        let r = relay(1, &[]);
        let t = r.seal(&claims("priv/", 2000)).unwrap();
        assert!(t.starts_with("v4.local."));
        assert!(!t.contains("eyJ"), "the upstream JWT must not be visible");
        assert_eq!(
            r.open(&t, "priv/", "ghcr", 1500).unwrap(),
            claims("priv/", 2000)
        );
        assert_eq!(
            r.open(&t, "other/", "ghcr", 1500).unwrap_err(),
            RelayError::Unsealed
        );
        assert_eq!(
            r.open(&t, "priv/", "hub", 1500).unwrap_err(),
            RelayError::OtherUpstream
        );
        assert_eq!(
            r.open(&t, "priv/", "ghcr", 2001).unwrap_err(),
            RelayError::Expired
        );
        assert_eq!(
            relay(2, &[]).open(&t, "priv/", "ghcr", 1500).unwrap_err(),
            RelayError::Unsealed
        );
        // Rotation: the old key still opens, the new one seals.
        assert!(relay(2, &[1]).open(&t, "priv/", "ghcr", 1500).is_ok());
        let mut tampered = t.clone();
        tampered.replace_range(20..21, if &t[20..21] == "A" { "B" } else { "A" });
        assert!(r.open(&tampered, "priv/", "ghcr", 1500).is_err());
        assert_eq!(
            r.open("eyJhbGciOi.x.y", "priv/", "ghcr", 1500).unwrap_err(),
            RelayError::Malformed
        );
    }

    #[test]
    fn coverage() {
        let c = claims("priv/", 2000);
        assert!(c.covers(&[Scope::repository("priv/app", &["pull"])]));
        assert!(!c.covers(&[Scope::repository("priv/app", &["pull", "push"])]));
        assert!(!c.covers(&[Scope::repository("priv/other", &["pull"])]));
        assert!(c.covers(&[]));
    }
}

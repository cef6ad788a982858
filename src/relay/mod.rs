//! The PASETO relay: upstream tokens handed to clients sealed in v4.local PASETOs that only
//! this proxy can open (backplane/registryproxy's idea, without its flaws).
//!
//! A relay token carries the upstream token, the upstream and route it belongs to, the local
//! scopes it covers and an expiry no later than the upstream token's. The route is also the
//! PASETO's implicit assertion, so a token minted for one route does not even decrypt on
//! another. Owns sealing and opening; the token endpoint and the request stage live in
//! [`crate::pipeline`] and use this.

use std::time::{SystemTime, UNIX_EPOCH};

use pasetors::Local;
use pasetors::keys::SymmetricKey;
use pasetors::token::UntrustedToken;
use pasetors::version4::{LocalToken, V4};
use serde::{Deserialize, Serialize};

use crate::config::RelayConfig;
use crate::oci::Scope;

/// Relay tokens live at most this long, however long the upstream token would.
pub const MAX_LIFETIME_SECS: u64 = 300;

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
    pub fn covers(&self, required: &[Scope]) -> bool {
        let granted: Vec<Scope> = self.sc.iter().filter_map(|s| Scope::parse(s)).collect();
        required.iter().all(|r| {
            r.actions.iter().all(|a| {
                granted.iter().any(|g| {
                    g.kind == r.kind
                        && g.name == r.name
                        && g.actions.iter().any(|x| x == a || x == "*")
                })
            })
        })
    }
}

pub struct Relay {
    /// The current key first, then the previous ones (still opened, never used to seal).
    keys: Vec<SymmetricKey<V4>>,
}

impl Relay {
    pub fn new(config: &RelayConfig) -> Result<Relay, RelayError> {
        let keys = std::iter::once(&config.secret_key)
            .chain(&config.previous_keys)
            .map(|k| SymmetricKey::<V4>::from(k).map_err(|e| RelayError::Seal(e.to_string())))
            .collect::<Result<_, _>>()?;
        Ok(Relay { keys })
    }

    pub fn seal(&self, claims: &RelayClaims) -> Result<String, RelayError> {
        let payload = serde_json::to_vec(claims).map_err(|e| RelayError::Seal(e.to_string()))?;
        let key = self.keys.first().ok_or(RelayError::Seal("no key".into()))?;
        LocalToken::encrypt(key, &payload, None, Some(claims.rt.as_bytes()))
            .map_err(|e| RelayError::Seal(e.to_string()))
    }

    /// Opens a token presented on `route` for `upstream`, checking expiry.
    pub fn open(
        &self,
        token: &str,
        route: &str,
        upstream: &str,
        now: u64,
    ) -> Result<RelayClaims, RelayError> {
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
        if claims.up != upstream {
            return Err(RelayError::OtherUpstream);
        }
        if now > claims.exp {
            return Err(RelayError::Expired);
        }
        Ok(claims)
    }
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
        Relay::new(&RelayConfig {
            secret_key: vec![key; 32],
            previous_keys: previous.iter().map(|p| vec![*p; 32]).collect(),
        })
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

//! Verifying a distribution token (JWT): header, key, signature, `iss`, `aud`, `exp`/`nbf`
//! with 60 s of leeway, and the `access` claim. Pure: the caller passes the clock.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use super::keys::{KeyStore, TrustedKey};
use crate::oci::Scope;

pub(crate) const LEEWAY_SECS: u64 = 60;

/// What a verified token grants.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Claims {
    #[serde(default)]
    pub(crate) sub: Option<String>,
    pub(crate) exp: u64,
    #[serde(default)]
    pub(crate) nbf: Option<u64>,
    #[serde(default)]
    pub(crate) access: Vec<Scope>,
}

impl Claims {
    /// Whether the token grants `action` on `kind:name`.
    pub(crate) fn grants(&self, kind: &str, name: &str, action: &str) -> bool {
        crate::oci::challenge::allows(&self.access, kind, name, action)
    }
}

/// Why a token was refused. Never includes the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Rejected {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0} is not allowed")]
    Algorithm(String),
    #[error("no trusted key for the token: {0}")]
    UnknownKey(String),
    #[error("algorithm {0:?} does not fit the signing key's type")]
    KeyMismatch(Algorithm),
    #[error("bad signature or claims: {0}")]
    Invalid(String),
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
}

/// The issuer, audience and algorithms tokens must have.
pub(crate) struct Policy {
    pub(crate) issuer: String,
    pub(crate) service: String,
    pub(crate) algorithms: Vec<Algorithm>,
}

/// Verifies `token` with the keys of `stores` (the configured ones, then fetched ones).
pub(crate) fn verify(
    token: &str,
    stores: &[&KeyStore],
    policy: &Policy,
    now: u64,
) -> Result<Claims, Rejected> {
    if token.split('.').count() != 3 {
        return Err(Rejected::Malformed("not three dot-separated parts".into()));
    }
    // `alg: none` and unknown algorithms fail here: they are not jsonwebtoken Algorithms.
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| Rejected::Malformed(e.to_string()))?;
    let alg = header.alg;
    if !policy.algorithms.contains(&alg) {
        return Err(Rejected::Algorithm(format!("{alg:?}")));
    }
    let key: Arc<TrustedKey> = if let Some(x5c) = &header.x5c {
        let roots = stores
            .iter()
            .find(|s| s.has_roots())
            .ok_or_else(|| Rejected::UnknownKey("x5c, but no rootcertbundle configured".into()))?;
        Arc::new(
            roots
                .verify_chain(x5c)
                .map_err(|e| Rejected::UnknownKey(e.to_string()))?,
        )
    } else if let Some(jwk) = &header.jwk {
        stores
            .iter()
            .find_map(|s| s.matching_jwk(jwk))
            .ok_or_else(|| Rejected::UnknownKey("the jwk header is not a trusted key".into()))?
    } else if let Some(kid) = &header.kid {
        stores
            .iter()
            .find_map(|s| s.by_kid(kid))
            .ok_or_else(|| Rejected::UnknownKey("unknown kid".into()))?
    } else {
        return Err(Rejected::UnknownKey("no x5c, jwk or kid".into()));
    };
    if !key.family.allows(alg) {
        return Err(Rejected::KeyMismatch(alg));
    }
    let mut validation = Validation::new(alg);
    // Time is checked below with our clock and leeway; everything else by jsonwebtoken.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.set_issuer(&[&policy.issuer]);
    validation.set_audience(&[&policy.service]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)
        .map_err(|e| Rejected::Invalid(e.to_string()))?;
    let claims = data.claims;
    if now > claims.exp.saturating_add(LEEWAY_SECS) {
        return Err(Rejected::Expired);
    }
    if claims
        .nbf
        .is_some_and(|nbf| nbf > now.saturating_add(LEEWAY_SECS))
    {
        return Err(Rejected::NotYetValid);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const NOW: u64 = 1_900_000_000;

    fn setup() -> (KeyStore, EncodingKey, Policy) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let point = &spki[spki.len() - 64..];
        let b64 =
            |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1",
            "x": b64(&point[..32]), "y": b64(&point[32..]),
        }]});
        let mut keys = KeyStore::default();
        assert_eq!(
            keys.add_jwks(jwks.to_string().as_bytes(), "test").unwrap(),
            1
        );
        let encoding = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        let policy = Policy {
            issuer: "iss".into(),
            service: "svc".into(),
            algorithms: vec![Algorithm::ES256],
        };
        (keys, encoding, policy)
    }

    fn token(encoding: &EncodingKey, exp: u64, nbf: u64) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        let claims = serde_json::json!({"iss": "iss", "aud": "svc", "exp": exp, "nbf": nbf});
        jsonwebtoken::encode(&h, &claims, encoding).unwrap()
    }

    #[test]
    fn leeway_is_sixty_seconds_either_way() {
        let (keys, enc, policy) = setup();
        let check = |exp, nbf| verify(&token(&enc, exp, nbf), &[&keys], &policy, NOW);
        assert!(check(NOW - 59, NOW - 100).is_ok());
        assert!(check(NOW - 60, NOW - 100).is_ok());
        assert_eq!(check(NOW - 61, NOW - 100).unwrap_err(), Rejected::Expired);
        assert!(check(NOW + 300, NOW + 59).is_ok());
        assert!(check(NOW + 300, NOW + 60).is_ok());
        assert_eq!(
            check(NOW + 300, NOW + 61).unwrap_err(),
            Rejected::NotYetValid
        );
    }

    #[test]
    fn access_grants_by_type_name_and_action() {
        let claims = Claims {
            sub: None,
            exp: 0,
            nbf: None,
            access: vec![
                Scope::repository("a/b", &["pull"]),
                Scope {
                    kind: "registry".into(),
                    name: "catalog".into(),
                    actions: vec!["*".into()],
                },
            ],
        };
        assert!(claims.grants("repository", "a/b", "pull"));
        assert!(!claims.grants("repository", "a/b", "push"));
        assert!(!claims.grants("repository", "a/bc", "pull"));
        assert!(claims.grants("registry", "catalog", "*"));
        assert!(!claims.grants("repository", "catalog", "*"));
    }
}

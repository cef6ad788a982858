//! Minting tokens: the signing key and its certificate chain (sent as `x5c`, its leaf's
//! libtrust fingerprint as `kid`, so distribution 2.x and 3.x both accept them), access tokens
//! with an `access` claim, and refresh tokens for `offline_token` logins.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header, Validation};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::acl::ClaimMap;
use crate::auth::keys::{KeyFamily, TrustedKey, libtrust_fingerprint};
use crate::config::TokenServerConfig;
use crate::oci::Scope;

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("token_server.certificate {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("token_server.signing_key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// A minted access token and its timing, as the token endpoint answers it.
pub(crate) struct Minted {
    pub(crate) token: String,
    pub(crate) expires_in: u64,
    pub(crate) issued_at: String,
}

#[derive(Serialize)]
struct AccessClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    access: &'a [Scope],
}

#[derive(Serialize, Deserialize)]
struct RefreshClaims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
    iat: u64,
    jti: String,
    /// The identity's claims at login, so ACL rules on claims keep working on refresh.
    #[serde(default)]
    claims: ClaimMap,
    /// A password account's entry fingerprint ([`RefreshBinding::entry`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entry: Option<String>,
}

/// What a refresh token is tied to besides its account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RefreshBinding {
    /// It expires no later than this (unix seconds): a federated login's identity token
    /// `exp`, unless the provider allows refresh.
    pub(crate) until: Option<u64>,
    /// A fingerprint of the account's password entry: the token dies with the password.
    pub(crate) entry: Option<String>,
}

pub(crate) struct Issuer {
    encoding: EncodingKey,
    leaf: TrustedKey,
    alg: Algorithm,
    x5c: Vec<String>,
    kid: String,
    issuer: String,
    service: String,
    lifetime: Duration,
    refresh_lifetime: Duration,
}

impl Issuer {
    pub(crate) fn load(config: &TokenServerConfig) -> Result<Issuer, IssuerError> {
        let cert_err = |reason: String| IssuerError::Certificate {
            path: config.certificate.display().to_string(),
            reason,
        };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(&config.certificate)
                .and_then(|it| it.collect())
                .map_err(|e| cert_err(e.to_string()))?;
        let leaf_der = chain
            .first()
            .ok_or_else(|| cert_err("no certificate".into()))?;
        let (_, leaf) = X509Certificate::from_der(leaf_der).map_err(|e| cert_err(e.to_string()))?;
        let spki = leaf.public_key();
        let key = TrustedKey::from_spki(spki).map_err(|e| cert_err(e.to_string()))?;
        let kid = libtrust_fingerprint(spki.raw);
        let pem = std::fs::read(&config.signing_key).map_err(|e| IssuerError::Key {
            path: config.signing_key.display().to_string(),
            reason: e.to_string(),
        })?;
        let (alg, encoding) = match key.family {
            KeyFamily::Rsa => (Algorithm::RS256, EncodingKey::from_rsa_pem(&pem)),
            KeyFamily::EcP256 => (Algorithm::ES256, EncodingKey::from_ec_pem(&pem)),
            KeyFamily::EcP384 => (Algorithm::ES384, EncodingKey::from_ec_pem(&pem)),
            KeyFamily::Ed25519 => (Algorithm::EdDSA, EncodingKey::from_ed_pem(&pem)),
        };
        let encoding = encoding.map_err(|e| IssuerError::Key {
            path: config.signing_key.display().to_string(),
            reason: format!("not a {:?} private key in PEM: {e}", key.family),
        })?;
        let issuer = Issuer {
            encoding,
            leaf: key,
            alg,
            x5c: chain
                .iter()
                .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
                .collect(),
            kid,
            issuer: config.issuer.clone(),
            service: config.service.clone(),
            lifetime: config.lifetime,
            refresh_lifetime: config.refresh_lifetime,
        };
        // A key that does not belong to the certificate would mint tokens nobody accepts.
        let probe = issuer.refresh_token("probe", &ClaimMap::new(), &RefreshBinding::default())?;
        issuer.open_refresh(&probe).map_err(|_| IssuerError::Key {
            path: config.signing_key.display().to_string(),
            reason: "does not match the public key of token_server.certificate".into(),
        })?;
        Ok(issuer)
    }

    pub(crate) fn service(&self) -> &str {
        &self.service
    }

    fn header(&self) -> Header {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        h.x5c = Some(self.x5c.clone());
        h
    }

    pub(crate) fn access_token(
        &self,
        account: &str,
        access: &[Scope],
    ) -> Result<Minted, IssuerError> {
        let now = SystemTime::now();
        let iat = unix(now);
        let claims = AccessClaims {
            iss: &self.issuer,
            sub: account,
            aud: &self.service,
            exp: iat + self.lifetime.as_secs(),
            nbf: iat,
            iat,
            jti: random_id(),
            access,
        };
        let token = jsonwebtoken::encode(&self.header(), &claims, &self.encoding)
            .map_err(|e| IssuerError::Sign(e.to_string()))?;
        Ok(Minted {
            token,
            expires_in: self.lifetime.as_secs(),
            issued_at: humantime::format_rfc3339_seconds(now).to_string(),
        })
    }

    fn refresh_audience(&self) -> String {
        // Never the service itself: a refresh token must not pass as an access token.
        format!("{}#refresh", self.service)
    }

    pub(crate) fn refresh_token(
        &self,
        account: &str,
        claims: &ClaimMap,
        binding: &RefreshBinding,
    ) -> Result<String, IssuerError> {
        let iat = unix(SystemTime::now());
        let lifetime_end = iat + self.refresh_lifetime.as_secs();
        let claims = RefreshClaims {
            iss: self.issuer.clone(),
            sub: account.to_string(),
            aud: self.refresh_audience(),
            exp: binding.until.map_or(lifetime_end, |u| u.min(lifetime_end)),
            iat,
            jti: random_id(),
            claims: claims.clone(),
            entry: binding.entry.clone(),
        };
        jsonwebtoken::encode(&self.header(), &claims, &self.encoding)
            .map_err(|e| IssuerError::Sign(e.to_string()))
    }

    /// The account, claims and password-entry fingerprint a refresh token we issued stands
    /// for.
    pub(crate) fn open_refresh(
        &self,
        token: &str,
    ) -> Result<(String, ClaimMap, Option<String>), String> {
        let mut validation = Validation::new(self.alg);
        validation.leeway = crate::auth::jwt::LEEWAY_SECS;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[self.refresh_audience()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<RefreshClaims>(token, &self.leaf.decoding, &validation)
            .map_err(|e| e.to_string())?;
        Ok((data.claims.sub, data.claims.claims, data.claims.entry))
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn random_id() -> String {
    let mut bytes = [0u8; 16];
    // The provider's CSPRNG; failure leaves zeros, which only makes jti less unique.
    let _ = rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes);
    hex::encode(bytes)
}

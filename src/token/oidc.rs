//! OIDC federation: a client logs in with `<provider>:<jwt>`; the JWT is verified against the
//! provider's discovery document and JWKS (cached, refreshed on an unknown `kid`), with
//! `iss`, `aud` and `exp` required. Its claims feed the ACL.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use http::{Method, Request};
use http_body_util::{BodyExt, Limited};
use jsonwebtoken::Validation;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::acl::ClaimMap;
use crate::auth::keys::KeyStore;
use crate::body;
use crate::config::{OidcProviderConfig, UpstreamConfig};
use crate::upstream::client::{self, HttpClient};

/// After a refresh that still did not know a `kid`, unknown kids wait this long before the
/// next one: random kids cannot make us hammer the provider, a real rotation is seen at once.
const FRUITLESS_BACKOFF: Duration = Duration::from_secs(10);
/// Keys are refetched at least this often.
const MAX_AGE: Duration = Duration::from_secs(3600);
const MAX_DOCUMENT: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("unknown identity provider")]
    UnknownProvider,
    #[error("identity token refused: {0}")]
    Refused(String),
    #[error("identity provider unreachable: {0}")]
    Unreachable(String),
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

struct Keys {
    store: KeyStore,
    fetched: Option<Instant>,
    fruitless: Option<Instant>,
}

struct Provider {
    config: OidcProviderConfig,
    keys: RwLock<Keys>,
    refreshing: Mutex<()>,
}

pub struct Oidc {
    client: HttpClient,
    providers: HashMap<String, Provider>,
}

impl Oidc {
    pub fn new(configs: &[OidcProviderConfig]) -> Result<Oidc, client::ClientBuildError> {
        let origin = configs
            .first()
            .map(|c| c.issuer.clone())
            .unwrap_or_else(|| url::Url::parse("https://localhost/").expect("static URL"));
        let client = client::build(&UpstreamConfig::new("oidc", origin))?;
        let providers = configs
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    Provider {
                        config: c.clone(),
                        keys: RwLock::new(Keys {
                            store: KeyStore::default(),
                            fetched: None,
                            fruitless: None,
                        }),
                        refreshing: Mutex::new(()),
                    },
                )
            })
            .collect();
        Ok(Oidc { client, providers })
    }

    pub fn has(&self, name: &str) -> bool {
        self.providers.contains_key(name)
    }

    /// Verifies `jwt` from `provider`; the account (`<provider>:<sub>`) and flattened claims.
    pub async fn verify(&self, provider: &str, jwt: &str) -> Result<(String, ClaimMap), OidcError> {
        let p = self
            .providers
            .get(provider)
            .ok_or(OidcError::UnknownProvider)?;
        let header =
            jsonwebtoken::decode_header(jwt).map_err(|e| OidcError::Refused(e.to_string()))?;
        let kid = header.kid.clone().unwrap_or_default();
        self.refresh_if_needed(p, &kid).await?;
        let key = p
            .keys
            .read()
            .ok()
            .and_then(|k| k.store.by_kid(&kid))
            .ok_or_else(|| OidcError::Refused(format!("no key with kid {kid:?}")))?;
        if !key.family.allows(header.alg) {
            return Err(OidcError::Refused(format!(
                "algorithm {:?} does not fit the key",
                header.alg
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = crate::auth::jwt::LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[
            p.config.issuer.as_str().trim_end_matches('/'),
            p.config.issuer.as_str(),
        ]);
        validation.set_audience(&[&p.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            jwt,
            &key.decoding,
            &validation,
        )
        .map_err(|e| OidcError::Refused(e.to_string()))?;
        let claims: ClaimMap = data
            .claims
            .iter()
            .filter_map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => return None,
                };
                Some((k.clone(), text))
            })
            .collect();
        let sub = claims
            .get("sub")
            .cloned()
            .ok_or_else(|| OidcError::Refused("no sub claim".into()))?;
        Ok((format!("{provider}:{sub}"), claims))
    }

    /// Fetches discovery and JWKS when the keys are missing, old, or lack `kid`, one request
    /// at a time, backing off after a refresh that did not help.
    async fn refresh_if_needed(&self, p: &Provider, kid: &str) -> Result<(), OidcError> {
        let needed = |k: &Keys| {
            let old = k.fetched.is_none_or(|t| t.elapsed() > MAX_AGE);
            let unknown = k.store.by_kid(kid).is_none()
                && k.fruitless.is_none_or(|t| t.elapsed() > FRUITLESS_BACKOFF);
            old || unknown
        };
        if !p.keys.read().map(|k| needed(&k)).unwrap_or(true) {
            return Ok(());
        }
        let _one_at_a_time = p.refreshing.lock().await;
        // Another request may have refreshed while this one waited.
        if !p.keys.read().map(|k| needed(&k)).unwrap_or(true) {
            return Ok(());
        }
        let issuer = p.config.issuer.as_str().trim_end_matches('/');
        let discovery: Discovery = serde_json::from_slice(
            &self
                .get(&format!("{issuer}/.well-known/openid-configuration"))
                .await?,
        )
        .map_err(|e| OidcError::Unreachable(format!("discovery document: {e}")))?;
        if discovery.issuer.trim_end_matches('/') != issuer {
            return Err(OidcError::Unreachable(format!(
                "discovery names issuer {:?}, configured {issuer:?}",
                discovery.issuer
            )));
        }
        let jwks = self.get(&discovery.jwks_uri).await?;
        let mut store = KeyStore::default();
        store
            .add_jwks(&jwks, &discovery.jwks_uri)
            .map_err(|e| OidcError::Unreachable(e.to_string()))?;
        let now = Instant::now();
        let fruitless = store.by_kid(kid).is_none().then_some(now);
        if let Ok(mut keys) = p.keys.write() {
            *keys = Keys {
                store,
                fetched: Some(now),
                fruitless,
            };
        }
        tracing::info!(provider = %p.config.name, "identity provider keys refreshed");
        Ok(())
    }

    async fn get(&self, url: &str) -> Result<bytes::Bytes, OidcError> {
        let unreachable = |e: String| OidcError::Unreachable(format!("{url}: {e}"));
        let request = Request::builder()
            .method(Method::GET)
            .uri(url)
            .header(http::header::ACCEPT, "application/json")
            .body(body::empty())
            .map_err(|e| unreachable(e.to_string()))?;
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(request))
            .await
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        if !response.status().is_success() {
            return Err(unreachable(format!("answered {}", response.status())));
        }
        Limited::new(response.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| unreachable(e.to_string()))
    }
}

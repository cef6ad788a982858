//! Signing keys published over HTTP: a JWKS URL, or an OIDC discovery document naming one.
//! Fetched lazily, cached for an hour, fetched again when a token names an unknown `kid`
//! (one fetch at a time; after a fetch that still lacks the `kid`, unknown kids wait a
//! while, so random kids cannot make us hammer the publisher, while a real key rotation is
//! picked up at once).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request};
use http_body_util::{BodyExt, Limited};
use parking_lot::RwLock;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::keys::KeyStore;
use crate::body;
use crate::upstream::client::HttpClient;

const FRUITLESS_BACKOFF: Duration = Duration::from_secs(10);
const MAX_AGE: Duration = Duration::from_secs(3600);
const MAX_DOCUMENT: usize = 1 << 20;
/// Discovery, JWKS, headers and bodies together.
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
#[error("{url}: {reason}")]
pub(crate) struct RemoteError {
    pub(crate) url: String,
    pub(crate) reason: String,
}

enum Source {
    Jwks(String),
    /// The issuer, whose discovery document must name itself and a `jwks_uri`.
    Discovery(String),
}

struct State {
    keys: Arc<KeyStore>,
    fetched: Option<Instant>,
    fruitless: Option<Instant>,
}

pub(crate) struct RemoteKeys {
    source: Source,
    client: HttpClient,
    state: RwLock<State>,
    refreshing: Mutex<()>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

impl RemoteKeys {
    pub(crate) fn jwks(url: &str, client: HttpClient) -> RemoteKeys {
        RemoteKeys::new(Source::Jwks(url.to_string()), client)
    }

    pub(crate) fn discovery(issuer: &str, client: HttpClient) -> RemoteKeys {
        RemoteKeys::new(
            Source::Discovery(issuer.trim_end_matches('/').to_string()),
            client,
        )
    }

    fn new(source: Source, client: HttpClient) -> RemoteKeys {
        RemoteKeys {
            source,
            client,
            state: RwLock::new(State {
                keys: Arc::new(KeyStore::default()),
                fetched: None,
                fruitless: None,
            }),
            refreshing: Mutex::new(()),
        }
    }

    /// The keys as last fetched.
    pub(crate) fn current(&self) -> Arc<KeyStore> {
        self.state.read().keys.clone()
    }

    /// Fetches again when the keys are missing, old, or lack `kid`.
    pub(crate) async fn refresh_if_needed(&self, kid: &str) -> Result<(), RemoteError> {
        let needed = |s: &State| {
            let backing_off = s.fruitless.is_some_and(|t| t.elapsed() < FRUITLESS_BACKOFF);
            let old = s.fetched.is_none_or(|t| t.elapsed() > MAX_AGE);
            let unknown = s.keys.by_kid(kid).is_none();
            !backing_off && (old || unknown)
        };
        if !needed(&self.state.read()) {
            return Ok(());
        }
        let _one_at_a_time = self.refreshing.lock().await;
        // Another request may have refreshed while this one waited.
        if !needed(&self.state.read()) {
            return Ok(());
        }
        let fetched = async {
            let (jwks_url, json) = self.fetch().await?;
            let mut keys = KeyStore::default();
            keys.add_jwks(&json, &jwks_url).map_err(|e| RemoteError {
                url: jwks_url.clone(),
                reason: e.to_string(),
            })?;
            Ok::<_, RemoteError>((jwks_url, keys))
        };
        let (jwks_url, keys) = match tokio::time::timeout(FETCH_TIMEOUT, fetched).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                self.note_failure();
                return Err(e);
            }
            Err(_) => {
                self.note_failure();
                return Err(RemoteError {
                    url: self.source_url(),
                    reason: format!("no answer within {FETCH_TIMEOUT:?}"),
                });
            }
        };
        let now = Instant::now();
        let fruitless = keys.by_kid(kid).is_none().then_some(now);
        *self.state.write() = State {
            keys: Arc::new(keys),
            fetched: Some(now),
            fruitless,
        };
        tracing::info!(url = %jwks_url, "signing keys fetched");
        Ok(())
    }

    /// A failed fetch backs off like a fruitless one: a publisher that is down is not asked
    /// again by every request.
    fn note_failure(&self) {
        self.state.write().fruitless = Some(Instant::now());
    }

    fn source_url(&self) -> String {
        match &self.source {
            Source::Jwks(url) => url.clone(),
            Source::Discovery(issuer) => format!("{issuer}/.well-known/openid-configuration"),
        }
    }

    async fn fetch(&self) -> Result<(String, bytes::Bytes), RemoteError> {
        match &self.source {
            Source::Jwks(url) => Ok((url.clone(), self.get(url).await?)),
            Source::Discovery(issuer) => {
                let url = format!("{issuer}/.well-known/openid-configuration");
                let doc: Discovery =
                    serde_json::from_slice(&self.get(&url).await?).map_err(|e| RemoteError {
                        url: url.clone(),
                        reason: format!("not a discovery document: {e}"),
                    })?;
                if doc.issuer.trim_end_matches('/') != issuer {
                    return Err(RemoteError {
                        url,
                        reason: format!("names issuer {:?}, configured {issuer:?}", doc.issuer),
                    });
                }
                let json = self.get(&doc.jwks_uri).await?;
                Ok((doc.jwks_uri, json))
            }
        }
    }

    async fn get(&self, url: &str) -> Result<bytes::Bytes, RemoteError> {
        let fail = |reason: String| RemoteError {
            url: url.to_string(),
            reason,
        };
        let request = Request::builder()
            .method(Method::GET)
            .uri(url)
            .header(http::header::ACCEPT, "application/json")
            .body(body::empty())
            .map_err(|e| fail(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !response.status().is_success() {
            return Err(fail(format!("answered {}", response.status())));
        }
        Limited::new(response.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| fail(e.to_string()))
    }
}

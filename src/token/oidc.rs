//! OIDC federation: a client logs in with `<provider>:<jwt>`; the JWT is verified against the
//! provider's discovery document and JWKS ([`RemoteKeys`]), with `iss`, `aud` and `exp`
//! required. Its claims feed the ACL.

use std::collections::HashMap;

use jsonwebtoken::Validation;

use super::acl::ClaimMap;
use crate::auth::remote::RemoteKeys;
use crate::config::{OidcProviderConfig, UpstreamConfig};
use crate::upstream::client::{self};

#[derive(Debug, thiserror::Error)]
pub(crate) enum OidcError {
    #[error("unknown identity provider")]
    UnknownProvider,
    #[error("identity token refused: {0}")]
    Refused(String),
    #[error("identity provider unreachable: {0}")]
    Unreachable(String),
}

struct Provider {
    config: OidcProviderConfig,
    keys: RemoteKeys,
}

pub(crate) struct Oidc {
    providers: HashMap<String, Provider>,
}

impl Oidc {
    pub(crate) fn new(configs: &[OidcProviderConfig]) -> Result<Oidc, client::ClientBuildError> {
        let mut providers = HashMap::new();
        for c in configs {
            let client = client::build(&UpstreamConfig::new(&c.name, c.issuer.clone()))?;
            providers.insert(
                c.name.clone(),
                Provider {
                    config: c.clone(),
                    keys: RemoteKeys::discovery(c.issuer.as_str(), client),
                },
            );
        }
        Ok(Oidc { providers })
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.providers.contains_key(name)
    }

    /// Whether the provider's logins may be refreshed past their identity token's `exp`.
    pub(crate) fn allows_refresh(&self, name: &str) -> bool {
        self.providers.get(name).is_some_and(|p| p.config.refresh)
    }

    /// Verifies `jwt` from `provider`; the account (`<provider>:<sub>`) and flattened claims.
    pub(crate) async fn verify(
        &self,
        provider: &str,
        jwt: &str,
    ) -> Result<(String, ClaimMap), OidcError> {
        let p = self
            .providers
            .get(provider)
            .ok_or(OidcError::UnknownProvider)?;
        let header =
            jsonwebtoken::decode_header(jwt).map_err(|e| OidcError::Refused(e.to_string()))?;
        let kid = header.kid.clone().unwrap_or_default();
        p.keys
            .refresh_if_needed(&kid)
            .await
            .map_err(|e| OidcError::Unreachable(e.to_string()))?;
        let key = p
            .keys
            .current()
            .by_kid(&kid)
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
}

//! The config file exactly as written: serde types with source spans, no meaning yet.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

type S = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) server: RawServer,
    #[serde(default)]
    pub(crate) upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    #[serde(default)]
    pub(crate) routes: Vec<Spanned<RawRoute>>,
    pub(crate) auth: Option<Spanned<RawAuth>>,
    pub(crate) token_server: Option<Spanned<RawTokenServer>>,
    pub(crate) relay: Option<Spanned<RawRelay>>,
    pub(crate) cache: Option<Spanned<RawCache>>,
    pub(crate) forward_proxy: Option<Spanned<RawForwardProxy>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawForwardProxy {
    pub(crate) listen: Option<Spanned<OneOrMany>>,
    pub(crate) ca: Spanned<RawCa>,
    #[serde(default)]
    pub(crate) tunnel: Vec<S>,
    pub(crate) users: Option<RawUsers>,
    pub(crate) allow_push: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCa {
    pub(crate) dir: Option<S>,
    pub(crate) cert: Option<S>,
    pub(crate) key: Option<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCache {
    pub(crate) dir: S,
    pub(crate) max_size: Option<S>,
    pub(crate) tag_ttl: Option<S>,
    pub(crate) evidence_ttl: Option<S>,
    pub(crate) serve_stale: Option<bool>,
    pub(crate) offline: Option<bool>,
    pub(crate) inactive: Option<S>,
    #[serde(default)]
    pub(crate) tag_ttls: Vec<Spanned<RawTagTtl>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTagTtl {
    pub(crate) tags: S,
    pub(crate) ttl: S,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRelay {
    pub(crate) secret_key: S,
    #[serde(default)]
    pub(crate) previous_keys: Vec<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTokenServer {
    pub(crate) path: Option<S>,
    pub(crate) issuer: S,
    pub(crate) service: Option<S>,
    pub(crate) signing_key: S,
    pub(crate) certificate: S,
    pub(crate) lifetime: Option<S>,
    pub(crate) refresh_lifetime: Option<S>,
    pub(crate) users: Option<RawUsers>,
    #[serde(default)]
    pub(crate) oidc: Vec<Spanned<RawOidc>>,
    #[serde(default)]
    pub(crate) acl: Vec<Spanned<RawAclRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUsers {
    pub(crate) htpasswd: Option<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOidc {
    pub(crate) name: S,
    pub(crate) issuer: S,
    pub(crate) audience: S,
    pub(crate) refresh: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAclRule {
    pub(crate) account: S,
    #[serde(rename = "type")]
    pub(crate) kind: Option<S>,
    pub(crate) repository: S,
    #[serde(default)]
    pub(crate) claims: BTreeMap<String, S>,
    pub(crate) actions: Vec<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAuth {
    pub(crate) token: Option<Spanned<RawTokenAuth>>,
    pub(crate) anonymous: Option<Vec<S>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTokenAuth {
    pub(crate) realm: Option<S>,
    pub(crate) service: S,
    pub(crate) issuer: S,
    pub(crate) rootcertbundle: Option<S>,
    pub(crate) jwks: Option<S>,
    pub(crate) signingalgorithms: Option<Vec<S>>,
    pub(crate) autoredirect: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub(crate) listen: Option<Spanned<OneOrMany>>,
    pub(crate) tls: Option<RawTls>,
    pub(crate) public_url: Option<S>,
    pub(crate) browser_redirects: Option<bool>,
    pub(crate) shutdown_grace: Option<S>,
    pub(crate) send_timeout: Option<S>,
    pub(crate) metrics: Option<RawMetrics>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetrics {
    pub(crate) listen: S,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(crate) fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub(crate) cert: S,
    pub(crate) key: S,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub(crate) url: S,
    pub(crate) credentials: Option<Spanned<RawCredentialsSetting>>,
    pub(crate) ca: Option<S>,
    pub(crate) insecure_skip_verify: Option<bool>,
    pub(crate) redirects: Option<S>,
    pub(crate) allowed_realms: Option<Vec<S>>,
    pub(crate) allowed_redirects: Option<Vec<S>>,
    pub(crate) connect_timeout: Option<S>,
    pub(crate) idle_timeout: Option<S>,
}

/// `credentials: auto`, or a map naming one provider.
#[derive(Debug)]
pub(crate) enum RawCredentialsSetting {
    Keyword(String),
    Map(Box<RawCredentials>),
}

/// By hand rather than `untagged`, so that a mistake inside the map keeps serde's precise
/// message (an unknown key, a wrong type) instead of "did not match any variant".
impl<'de> Deserialize<'de> for RawCredentialsSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawCredentialsSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`auto` or a map with one of basic, header, docker_config, ecr, gcp")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawCredentialsSetting::Keyword(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                RawCredentials::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|c| RawCredentialsSetting::Map(Box::new(c)))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCredentials {
    pub(crate) basic: Option<RawBasic>,
    pub(crate) header: Option<S>,
    pub(crate) docker_config: Option<Spanned<DockerConfigSetting>>,
    pub(crate) ecr: Option<Spanned<RawEcr>>,
    pub(crate) gcp: Option<Spanned<RawGcp>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEcr {
    pub(crate) region: Option<S>,
    pub(crate) profile: Option<S>,
    pub(crate) registry_ids: Option<Vec<S>>,
    pub(crate) refresh: Option<S>,
    #[serde(rename = "static")]
    pub(crate) static_token: Option<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGcp {
    pub(crate) key_file: Option<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBasic {
    pub(crate) username: S,
    pub(crate) password: S,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum DockerConfigSetting {
    Flag(bool),
    Path(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub(crate) host: Option<S>,
    pub(crate) prefix: Option<S>,
    pub(crate) upstream: S,
    pub(crate) remote: Option<S>,
    pub(crate) relay: Option<bool>,
    pub(crate) relay_actions: Option<Spanned<Vec<S>>>,
    pub(crate) cache: Option<bool>,
    pub(crate) name: Option<S>,
}

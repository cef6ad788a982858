//! The config file exactly as written: serde types with source spans, no meaning yet.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

type S = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
    pub auth: Option<Spanned<RawAuth>>,
    pub token_server: Option<Spanned<RawTokenServer>>,
    pub relay: Option<Spanned<RawRelay>>,
    pub cache: Option<Spanned<RawCache>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub dir: S,
    pub max_size: Option<S>,
    pub tag_ttl: Option<S>,
    pub evidence_ttl: Option<S>,
    pub serve_stale: Option<bool>,
    pub offline: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRelay {
    pub secret_key: S,
    #[serde(default)]
    pub previous_keys: Vec<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenServer {
    pub path: Option<S>,
    pub issuer: S,
    pub service: Option<S>,
    pub signing_key: S,
    pub certificate: S,
    pub lifetime: Option<S>,
    pub refresh_lifetime: Option<S>,
    pub users: Option<RawUsers>,
    #[serde(default)]
    pub oidc: Vec<Spanned<RawOidc>>,
    #[serde(default)]
    pub acl: Vec<Spanned<RawAclRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUsers {
    pub htpasswd: Option<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOidc {
    pub name: S,
    pub issuer: S,
    pub audience: S,
    pub refresh: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAclRule {
    pub account: S,
    #[serde(rename = "type")]
    pub kind: Option<S>,
    pub repository: S,
    #[serde(default)]
    pub claims: BTreeMap<String, S>,
    pub actions: Vec<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub token: Option<Spanned<RawTokenAuth>>,
    pub anonymous: Option<Vec<S>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenAuth {
    pub realm: Option<S>,
    pub service: S,
    pub issuer: S,
    pub rootcertbundle: Option<S>,
    pub jwks: Option<S>,
    pub signingalgorithms: Option<Vec<S>>,
    pub autoredirect: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Spanned<OneOrMany>>,
    pub tls: Option<RawTls>,
    pub public_url: Option<S>,
    pub browser_redirects: Option<bool>,
    pub shutdown_grace: Option<S>,
    pub send_timeout: Option<S>,
    pub metrics: Option<RawMetrics>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: S,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: S,
    pub key: S,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: S,
    pub credentials: Option<Spanned<RawCredentialsSetting>>,
    pub ca: Option<S>,
    pub insecure_skip_verify: Option<bool>,
    pub redirects: Option<S>,
    pub allowed_realms: Option<Vec<S>>,
    pub allowed_redirects: Option<Vec<S>>,
    pub connect_timeout: Option<S>,
    pub idle_timeout: Option<S>,
}

/// `credentials: auto`, or a map naming one provider.
#[derive(Debug)]
pub enum RawCredentialsSetting {
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
pub struct RawCredentials {
    pub basic: Option<RawBasic>,
    pub header: Option<S>,
    pub docker_config: Option<Spanned<DockerConfigSetting>>,
    pub ecr: Option<Spanned<RawEcr>>,
    pub gcp: Option<Spanned<RawGcp>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEcr {
    pub region: Option<S>,
    pub profile: Option<S>,
    pub registry_ids: Option<Vec<S>>,
    pub refresh: Option<S>,
    #[serde(rename = "static")]
    pub static_token: Option<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGcp {
    pub key_file: Option<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBasic {
    pub username: S,
    pub password: S,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum DockerConfigSetting {
    Flag(bool),
    Path(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub prefix: S,
    pub upstream: S,
    pub remote: Option<S>,
    pub relay: Option<bool>,
    pub relay_actions: Option<Spanned<Vec<S>>>,
    pub cache: Option<bool>,
    pub name: Option<S>,
}

//! Upstream credentials: what the proxy presents to an upstream and its token realm.
//!
//! One [`CredentialSource`] per upstream, built from its `credentials:` setting: static
//! `basic` or `header` values, a Docker config (with credential helpers), a Google
//! service-account key, or ECR tokens refreshed in the background; `auto` picks one by the
//! upstream's host name. Everything that can be read is read when the source is built, so a
//! broken provider fails at start (and in `check-config`), not on the first pull. Must never
//! log or return a secret in an error message.

mod docker;
mod ecr;
mod gcp;

use std::path::PathBuf;
#[cfg(feature = "ecr")]
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use http::HeaderValue;

use crate::config::{Credentials, EcrCredentials, UpstreamConfig};
use ecr::EcrHost;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("docker config {path}: {reason}")]
    DockerConfig { path: String, reason: String },
    #[error("credential helper docker-credential-{helper}: {reason}")]
    Helper { helper: String, reason: String },
    #[error("credentials.header is not a valid header value")]
    InvalidHeader,
    #[error("gcp key file {path}: {reason}")]
    Gcp { path: String, reason: String },
    #[error("credentials.gcp: no key_file given and GOOGLE_APPLICATION_CREDENTIALS is not set")]
    GcpNoKeyFile,
    #[error("ecr: {reason}")]
    Ecr { reason: String },
    #[cfg(not(feature = "ecr"))]
    #[error(
        "ECR credentials need the `ecr` feature, which this ocigate was built without (rebuild with default features)"
    )]
    EcrNotBuilt,
}

/// Credentials ready to use.
#[derive(Clone)]
pub(crate) enum Secret {
    Basic {
        username: String,
        password: String,
    },
    /// An OAuth2 refresh token (`identitytoken` in a docker config).
    IdentityToken(String),
    /// A verbatim `Authorization` value.
    Authorization(HeaderValue),
}

impl Secret {
    /// The value to send to a Basic challenge or to a token realm's GET endpoint.
    pub(crate) fn basic_header(&self) -> Option<HeaderValue> {
        match self {
            Secret::Basic { username, password } => {
                let encoded = B64.encode(format!("{username}:{password}"));
                let mut v = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
                v.set_sensitive(true);
                Some(v)
            }
            Secret::Authorization(v) => Some(v.clone()),
            Secret::IdentityToken(_) => None,
        }
    }

    /// A `Bearer` header value configured verbatim goes straight to the registry.
    pub(crate) fn static_bearer(&self) -> Option<HeaderValue> {
        match self {
            Secret::Authorization(v)
                if v.as_bytes().len() > 7 && v.as_bytes()[..7].eq_ignore_ascii_case(b"bearer ") =>
            {
                Some(v.clone())
            }
            _ => None,
        }
    }
}

pub(crate) struct CredentialSource {
    kind: Kind,
    /// For `check-config`: where the credentials come from, never what they are.
    summary: String,
}

enum Kind {
    Anonymous,
    Static(Secret),
    Helper(docker::Helper),
    #[cfg(feature = "ecr")]
    Ecr(Arc<ecr::EcrProvider>),
}

impl CredentialSource {
    /// Reads what can be read now (docker config, key files), so a broken one fails at start.
    pub(crate) fn new(config: &UpstreamConfig) -> Result<CredentialSource, CredentialError> {
        let env = |name: &str| std::env::var_os(name).map(PathBuf::from);
        match &config.credentials {
            None => Ok(source(Kind::Anonymous, "anonymous".into())),
            Some(credentials) => from_setting(config, credentials, &env),
        }
    }

    /// Starts what needs the network or another program: the first ECR token and its
    /// background refresh, a credential helper's first answer (then cached as usual).
    pub(crate) async fn start(&self) -> Result<(), CredentialError> {
        match &self.kind {
            #[cfg(feature = "ecr")]
            Kind::Ecr(p) => p.start().await,
            Kind::Helper(h) => h.resolve().await.map(|_| ()),
            Kind::Anonymous | Kind::Static(_) => Ok(()),
        }
    }

    pub(crate) fn summary(&self) -> &str {
        &self.summary
    }

    pub(crate) async fn resolve(&self) -> Result<Option<Secret>, CredentialError> {
        match &self.kind {
            Kind::Anonymous => Ok(None),
            Kind::Static(s) => Ok(Some(s.clone())),
            Kind::Helper(h) => h.resolve().await,
            #[cfg(feature = "ecr")]
            Kind::Ecr(p) => p.current().map(Some),
        }
    }
}

fn source(kind: Kind, summary: String) -> CredentialSource {
    CredentialSource { kind, summary }
}

/// `auto`, like a cloud keychain: an ECR host gets ECR; a Google registry gets the
/// service-account key named by `GOOGLE_APPLICATION_CREDENTIALS`; everything else (and a
/// Google registry without that variable) the Docker config, when there is one; `None`:
/// anonymous.
fn pick_auto(
    config: &UpstreamConfig,
    env: &dyn Fn(&str) -> Option<PathBuf>,
) -> Option<Credentials> {
    let host = config.url.host_str().unwrap_or_default();
    if EcrHost::parse(host).is_some() {
        return Some(Credentials::Ecr(EcrCredentials::new()));
    }
    if gcp::is_google_registry(host)
        && let Some(key_file) = env("GOOGLE_APPLICATION_CREDENTIALS")
    {
        return Some(Credentials::Gcp {
            key_file: Some(key_file),
        });
    }
    let docker_config = docker::default_docker_config(env);
    docker_config
        .exists()
        .then_some(Credentials::DockerConfig(Some(docker_config)))
}

fn from_setting(
    config: &UpstreamConfig,
    credentials: &Credentials,
    env: &dyn Fn(&str) -> Option<PathBuf>,
) -> Result<CredentialSource, CredentialError> {
    Ok(match credentials {
        // `pick_auto` never answers `Auto`, so this recursion ends.
        Credentials::Auto => match pick_auto(config, env) {
            Some(picked) => {
                let mut picked = from_setting(config, &picked, env)?;
                picked.summary = format!("auto: {}", picked.summary);
                picked
            }
            None => source(Kind::Anonymous, "auto: anonymous (no docker config)".into()),
        },
        Credentials::Basic { username, password } => source(
            Kind::Static(Secret::Basic {
                username: username.clone(),
                password: password.clone(),
            }),
            format!("basic (user {username})"),
        ),
        Credentials::Header(value) => {
            let mut v = HeaderValue::from_str(value).map_err(|_| CredentialError::InvalidHeader)?;
            v.set_sensitive(true);
            source(Kind::Static(Secret::Authorization(v)), "header".into())
        }
        Credentials::DockerConfig(path) => {
            let path = path
                .clone()
                .unwrap_or_else(|| docker::default_docker_config(env));
            let host = config.url.host_str().unwrap_or_default().to_string();
            let host = match config.url.port() {
                Some(p) => format!("{host}:{p}"),
                None => host,
            };
            let kind = docker::from_docker_config(&path, &host)?;
            let found = match &kind {
                Kind::Anonymous => "nothing for this host".to_string(),
                Kind::Helper(h) => format!("helper docker-credential-{}", h.name()),
                _ => "an auths entry".to_string(),
            };
            source(kind, format!("docker_config {} ({found})", path.display()))
        }
        Credentials::Gcp { key_file } => {
            let path = key_file
                .clone()
                .or_else(|| env("GOOGLE_APPLICATION_CREDENTIALS"))
                .ok_or(CredentialError::GcpNoKeyFile)?;
            let (secret, email) = gcp::service_account(&path)?;
            source(
                Kind::Static(secret),
                format!("gcp (service account {email}, {})", path.display()),
            )
        }
        Credentials::Ecr(settings) => ecr_source(config, settings)?,
    })
}

#[cfg(feature = "ecr")]
fn ecr_source(
    config: &UpstreamConfig,
    settings: &EcrCredentials,
) -> Result<CredentialSource, CredentialError> {
    let host = EcrHost::parse(config.url.host_str().unwrap_or_default());
    let provider = ecr::EcrProvider::new(&config.name, host.as_ref(), settings);
    let summary = provider.describe();
    Ok(source(Kind::Ecr(Arc::new(provider)), summary))
}

#[cfg(not(feature = "ecr"))]
fn ecr_source(
    _config: &UpstreamConfig,
    _settings: &EcrCredentials,
) -> Result<CredentialSource, CredentialError> {
    Err(CredentialError::EcrNotBuilt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str) -> UpstreamConfig {
        let mut u = UpstreamConfig::new("u", crate::config::parse_upstream_url(url).unwrap());
        u.credentials = Some(Credentials::Auto);
        u
    }

    #[test]
    fn auto_picks_by_host_form() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("sa.json");
        let docker_dir = dir.path().join("docker");
        fn with(vars: Vec<(&'static str, PathBuf)>) -> impl Fn(&str) -> Option<PathBuf> {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.clone())
            }
        }
        let google = with(vec![("GOOGLE_APPLICATION_CREDENTIALS", key.clone())]);
        let ecr_host = "https://111122223333.dkr.ecr.eu-west-1.amazonaws.com";
        assert_eq!(
            pick_auto(&upstream(ecr_host), &google),
            Some(Credentials::Ecr(EcrCredentials::new()))
        );
        for host in ["https://gcr.io", "https://us-central1-docker.pkg.dev"] {
            assert_eq!(
                pick_auto(&upstream(host), &google),
                Some(Credentials::Gcp {
                    key_file: Some(key.clone())
                }),
                "{host}"
            );
        }
        // No docker config anywhere: anonymous.
        let nothing = with(vec![("DOCKER_CONFIG", docker_dir.clone())]);
        for host in ["https://gcr.io", "https://registry.example.com"] {
            assert_eq!(pick_auto(&upstream(host), &nothing), None, "{host}");
        }
        // A docker config: used for any other host (and Google's without a key).
        std::fs::create_dir(&docker_dir).unwrap();
        std::fs::write(docker_dir.join("config.json"), "{}").unwrap();
        for (host, vars) in [
            ("https://registry.example.com", &google),
            ("https://public.ecr.aws", &google),
            ("https://gcr.io", &nothing),
        ] {
            let env = |n: &str| vars(n).or_else(|| nothing(n));
            assert_eq!(
                pick_auto(&upstream(host), &env),
                Some(Credentials::DockerConfig(Some(
                    docker_dir.join("config.json")
                ))),
                "{host}"
            );
        }
    }

    #[test]
    fn sources_summarise_without_secrets() {
        let mut u = upstream("https://registry.example.com");
        u.credentials = Some(Credentials::Basic {
            username: "me".into(),
            password: "hunter2".into(),
        });
        let s = CredentialSource::new(&u).unwrap();
        assert_eq!(s.summary(), "basic (user me)");
        u.credentials = Some(Credentials::Header("Bearer sekrit".into()));
        assert_eq!(CredentialSource::new(&u).unwrap().summary(), "header");
        u.credentials = Some(Credentials::Gcp { key_file: None });
        // Without GOOGLE_APPLICATION_CREDENTIALS (tests do not set it) the key is missing.
        if std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").is_none() {
            let e = CredentialSource::new(&u).err().unwrap().to_string();
            assert!(
                e.contains("GOOGLE_APPLICATION_CREDENTIALS is not set"),
                "{e}"
            );
        }
    }

    #[cfg(feature = "ecr")]
    #[test]
    fn ecr_settings_come_from_the_host_unless_configured() {
        let mut u = upstream("https://111122223333.dkr.ecr.eu-west-1.amazonaws.com");
        u.credentials = Some(Credentials::Ecr(EcrCredentials::new()));
        let s = CredentialSource::new(&u).unwrap();
        assert!(
            s.summary()
                .starts_with("ecr (region eu-west-1, registries 111122223333,"),
            "{}",
            s.summary()
        );
        let mut settings = EcrCredentials::new();
        settings.region = Some("us-east-2".into());
        settings.registry_ids = vec!["444455556666".into()];
        u.credentials = Some(Credentials::Ecr(settings));
        let s = CredentialSource::new(&u).unwrap();
        assert!(
            s.summary()
                .starts_with("ecr (region us-east-2, registries 444455556666,"),
            "{}",
            s.summary()
        );
    }

    #[cfg(not(feature = "ecr"))]
    #[test]
    fn auto_on_an_ecr_host_needs_the_feature() {
        let u = upstream("https://111122223333.dkr.ecr.eu-west-1.amazonaws.com");
        let e = CredentialSource::new(&u).err().unwrap().to_string();
        assert!(e.contains("without (rebuild with default features)"), "{e}");
    }

    #[test]
    fn basic_header_and_static_bearer() {
        let s = Secret::Basic {
            username: "u".into(),
            password: "p".into(),
        };
        assert_eq!(s.basic_header().unwrap(), "Basic dTpw");
        assert!(s.static_bearer().is_none());
        let b = Secret::Authorization(HeaderValue::from_static("Bearer xyz"));
        assert_eq!(b.static_bearer().unwrap(), "Bearer xyz");
    }
}

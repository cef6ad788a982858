//! Docker `config.json` credentials: `auths` entries, and `credHelpers`/`credsStore` by
//! running `docker-credential-<name> get`. Never logs or returns a secret in an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{CredentialError, Kind, Secret};
use crate::config::DOCKER_HUB_API_HOST;

/// How long a credential helper's answer is reused before it is asked again.
const HELPER_TTL: Duration = Duration::from_secs(300);

/// A credential helper for one registry, asked at most every [`HELPER_TTL`].
pub(crate) struct Helper {
    helper: String,
    server: String,
    cached: Mutex<Option<(Instant, Option<Secret>)>>,
}

impl Helper {
    pub(crate) fn name(&self) -> &str {
        &self.helper
    }

    pub(crate) async fn resolve(&self) -> Result<Option<Secret>, CredentialError> {
        let mut cached = self.cached.lock().await;
        if let Some((at, secret)) = cached.as_ref()
            && at.elapsed() < HELPER_TTL
        {
            return Ok(secret.clone());
        }
        let secret = run_helper(&self.helper, &self.server).await?;
        *cached = Some((Instant::now(), secret.clone()));
        Ok(secret)
    }
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub(crate) fn default_docker_config(env: &dyn Fn(&str) -> Option<PathBuf>) -> PathBuf {
    let dir = env("DOCKER_CONFIG")
        .or_else(|| env("HOME").map(|h| h.join(".docker")))
        .unwrap_or_else(|| PathBuf::from(".docker"));
    dir.join("config.json")
}

#[derive(Deserialize, Default)]
struct DockerConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// The host names a registry is filed under in a docker config.
fn aliases(host: &str) -> Vec<&str> {
    if host == DOCKER_HUB_API_HOST {
        vec![host, "index.docker.io", "docker.io"]
    } else {
        vec![host]
    }
}

/// `https://index.docker.io/v1/` → `index.docker.io`.
fn key_host(key: &str) -> &str {
    let k = key.split_once("://").map_or(key, |(_, rest)| rest);
    k.split('/').next().unwrap_or(k)
}

/// What a docker config holds for `host` (`host:port` when the port is not the default).
pub(crate) fn from_docker_config(path: &Path, host: &str) -> Result<Kind, CredentialError> {
    let err = |reason: String| CredentialError::DockerConfig {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let file: DockerConfigFile =
        serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let names = aliases(host);
    let server = if host == DOCKER_HUB_API_HOST {
        "https://index.docker.io/v1/".to_string()
    } else {
        host.to_string()
    };
    let helper = |name: &str| {
        Kind::Helper(Helper {
            helper: name.to_string(),
            server: server.clone(),
            cached: Mutex::new(None),
        })
    };
    if let Some(name) = file
        .cred_helpers
        .iter()
        .find(|(k, _)| names.contains(&key_host(k)))
        .map(|(_, v)| v)
    {
        return Ok(helper(name));
    }
    let entry = file
        .auths
        .iter()
        .find(|(k, _)| names.contains(&key_host(k)))
        .map(|(_, v)| v);
    if let Some(entry) = entry
        && let Some(secret) = entry_secret(entry).map_err(err)?
    {
        return Ok(Kind::Static(secret));
    }
    Ok(match &file.creds_store {
        Some(store) if !store.is_empty() => helper(store),
        _ => Kind::Anonymous,
    })
}

fn entry_secret(entry: &AuthEntry) -> Result<Option<Secret>, String> {
    if let Some(token) = entry.identitytoken.as_ref().filter(|t| !t.is_empty()) {
        return Ok(Some(Secret::IdentityToken(token.clone())));
    }
    if let Some(auth) = entry.auth.as_ref().filter(|a| !a.is_empty()) {
        let decoded = B64
            .decode(auth.trim())
            .map_err(|_| "an `auth` entry is not valid base64".to_string())?;
        let text =
            String::from_utf8(decoded).map_err(|_| "an `auth` entry is not UTF-8".to_string())?;
        let (username, password) = text
            .split_once(':')
            .ok_or_else(|| "an `auth` entry is not base64 of user:password".to_string())?;
        return Ok(Some(Secret::Basic {
            username: username.into(),
            password: password.into(),
        }));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) if !u.is_empty() => Ok(Some(Secret::Basic {
            username: u.clone(),
            password: p.clone(),
        })),
        _ => Ok(None),
    }
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

async fn run_helper(helper: &str, server: &str) -> Result<Option<Secret>, CredentialError> {
    let err = |reason: String| CredentialError::Helper {
        helper: helper.to_string(),
        reason,
    };
    let mut child = tokio::process::Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| err(format!("cannot run: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(server.as_bytes())
            .await
            .map_err(|e| err(format!("cannot write to it: {e}")))?;
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .map_err(|_| err("timed out after 30s".into()))?
        .map_err(|e| err(format!("failed: {e}")))?;
    if !out.status.success() {
        let stdout = String::from_utf8_lossy(&out.stdout);
        // The helper protocol's way of saying "nothing stored": go anonymous.
        if stdout.contains("credentials not found") {
            return Ok(None);
        }
        return Err(err(format!("exited with {}", out.status)));
    }
    let answer: HelperAnswer = serde_json::from_slice(&out.stdout)
        .map_err(|_| err("printed something that is not its JSON answer".into()))?;
    Ok(Some(if answer.username == "<token>" {
        Secret::IdentityToken(answer.secret)
    } else {
        Secret::Basic {
            username: answer.username,
            password: answer.secret,
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::super::CredentialSource;
    use super::*;
    use crate::config::{Credentials, UpstreamConfig};

    fn upstream(url: &str, creds: Credentials) -> UpstreamConfig {
        let mut u = UpstreamConfig::new("u", crate::config::parse_upstream_url(url).unwrap());
        u.credentials = Some(creds);
        u
    }

    fn write(dir: &tempfile::TempDir, json: &str) -> PathBuf {
        let p = dir.path().join("config.json");
        std::fs::write(&p, json).unwrap();
        p
    }

    async fn resolve(url: &str, path: PathBuf) -> Option<Secret> {
        CredentialSource::new(&upstream(url, Credentials::DockerConfig(Some(path))))
            .unwrap()
            .resolve()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn docker_config_auths_forms() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            r#"{"auths":{
                "https://index.docker.io/v1/":{"auth":"dTE6cDE="},
                "reg.example.com:5000":{"username":"u2","password":"p2"},
                "tok.example.com":{"identitytoken":"refresh-me"}}}"#,
        );
        match resolve("docker.io", p.clone()).await {
            Some(Secret::Basic { username, password }) => {
                assert_eq!((username.as_str(), password.as_str()), ("u1", "p1"))
            }
            _ => panic!("expected basic for docker hub"),
        }
        match resolve("https://reg.example.com:5000", p.clone()).await {
            Some(Secret::Basic { username, .. }) => assert_eq!(username, "u2"),
            _ => panic!("expected basic"),
        }
        assert!(matches!(
            resolve("tok.example.com", p.clone()).await,
            Some(Secret::IdentityToken(t)) if t == "refresh-me"
        ));
        assert!(resolve("other.example.com", p).await.is_none());
    }

    #[test]
    fn broken_docker_config_fails_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, r#"{"auths":{"x.io":{"auth":"%%%"}}}"#);
        let e = CredentialSource::new(&upstream("x.io", Credentials::DockerConfig(Some(p))))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not valid base64"), "{e}");
        let p = write(&dir, "{nope");
        let e = CredentialSource::new(&upstream("x.io", Credentials::DockerConfig(Some(p))))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not valid JSON"), "{e}");
    }
}

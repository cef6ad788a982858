//! Google service-account keys: gcr.io and Artifact Registry take the key file itself as
//! the password of the user `_json_key`. Reads the key once, at start; never logs it.

use std::path::Path;

use serde::Deserialize;

use super::{CredentialError, Secret};

/// The user name Google registries expect with a JSON key as the password.
const JSON_KEY_USER: &str = "_json_key";

#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    client_email: Option<String>,
    private_key: Option<String>,
}

/// The Basic credentials for a key file, and the service account's e-mail for summaries.
pub(crate) fn service_account(path: &Path) -> Result<(Secret, String), CredentialError> {
    let err = |reason: String| CredentialError::Gcp {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let key: KeyFile = serde_json::from_str(&text)
        .map_err(|e| err(format!("not a JSON key file (line {})", e.line())))?;
    match key.kind.as_deref() {
        Some("service_account") => {}
        Some(other) => {
            return Err(err(format!(
                "a {other:?} credential, not a service-account key; registries take only service-account keys as _json_key"
            )));
        }
        None => return Err(err("has no \"type\"; expected a service-account key".into())),
    }
    let email = key
        .client_email
        .filter(|e| !e.is_empty())
        .ok_or_else(|| err("has no client_email".into()))?;
    if key.private_key.is_none_or(|k| k.is_empty()) {
        return Err(err("has no private_key".into()));
    }
    // `docker login --password-stdin` drops the trailing newline too; the registry compares
    // the JSON text itself.
    let password = text.trim_end_matches(['\n', '\r']).to_string();
    Ok((
        Secret::Basic {
            username: JSON_KEY_USER.into(),
            password,
        },
        email,
    ))
}

/// Hosts of Google's registries: Container Registry and Artifact Registry.
pub(crate) fn is_google_registry(host: &str) -> bool {
    host == "gcr.io" || host.ends_with(".gcr.io") || host.ends_with(".pkg.dev")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = r#"{"type":"service_account","project_id":"p","private_key_id":"k1","private_key":"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n","client_email":"puller@p.iam.gserviceaccount.com"}"#;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn key_file_becomes_json_key_basic() {
        let f = write(&format!("{KEY}\n"));
        let (secret, email) = service_account(f.path()).unwrap();
        assert_eq!(email, "puller@p.iam.gserviceaccount.com");
        let Secret::Basic { username, password } = secret else {
            panic!("expected Basic credentials");
        };
        assert_eq!(username, "_json_key");
        assert_eq!(
            password, KEY,
            "the key text itself, without the final newline"
        );
    }

    #[test]
    fn wrong_key_files_are_refused_without_their_contents() {
        for (text, expected) in [
            ("{nope", "not a JSON key file"),
            (
                r#"{"type":"authorized_user","client_id":"c","refresh_token":"r"}"#,
                "\"authorized_user\" credential",
            ),
            (r#"{"private_key":"x"}"#, "has no \"type\""),
            (
                r#"{"type":"service_account","private_key":"x"}"#,
                "no client_email",
            ),
            (
                r#"{"type":"service_account","client_email":"a@b"}"#,
                "no private_key",
            ),
        ] {
            let f = write(text);
            let e = service_account(f.path()).err().unwrap().to_string();
            assert!(e.contains(expected), "{text}: {e}");
            assert!(!e.contains("refresh_token\":\"r"), "{e}");
        }
    }

    #[test]
    fn google_hosts() {
        for host in [
            "gcr.io",
            "eu.gcr.io",
            "us-central1-docker.pkg.dev",
            "europe-docker.pkg.dev",
        ] {
            assert!(is_google_registry(host), "{host}");
        }
        for host in ["registry.example.com", "notgcr.io", "pkg.dev.example.com"] {
            assert!(!is_google_registry(host), "{host}");
        }
    }
}

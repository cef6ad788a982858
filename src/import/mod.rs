//! `ocigate import …`: other tools' configs (and docker-registry-proxy's environment) as
//! the equivalent ocigate YAML, which `check-config` then validates like any other. Reads
//! and writes text only.

mod backplane;
mod docker_registry_proxy;
mod ociregistry;

pub use backplane::backplane;
pub use docker_registry_proxy::docker_registry_proxy;
pub use ociregistry::ociregistry;

#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ImportError {
    pub(crate) file: String,
    pub(crate) message: String,
}

/// A converted config, and what did not convert (reported, never dropped silently).
#[derive(Debug)]
pub struct Imported {
    pub yaml: String,
    pub warnings: Vec<String>,
}

/// Another tool's YAML, its errors with their line and column.
fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str, file: &str) -> Result<T, ImportError> {
    serde_saphyr::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!("{}:{}: ", l.line(), l.column()))
            .unwrap_or_default();
        ImportError {
            file: file.to_string(),
            message: format!("{at}{}", e.without_snippet()),
        }
    })
}

/// A literal YAML double-quoted scalar (JSON string syntax is valid YAML), with `$`
/// doubled so that `${…}` expansion leaves it as written.
fn quote(s: &str) -> String {
    serde_json::Value::String(s.replace('$', "$$")).to_string()
}

/// An upstream name made of a registry host or URL (`quay.io` → `quay-io`).
fn upstream_name(registry: &str) -> String {
    let host = registry
        .split_once("://")
        .map_or(registry, |(_, rest)| rest)
        .trim_end_matches('/');
    host.chars()
        .map(|c| match c.is_ascii_alphanumeric() {
            true => c.to_ascii_lowercase(),
            false => '-',
        })
        .collect()
}

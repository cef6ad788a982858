//! docker-registry-proxy's environment (`REGISTRIES`, `AUTH_REGISTRIES`, `CACHE_MAX_SIZE`, …)
//! as ocigate YAML: what `ocigate serve --forward-proxy` runs with no config file, and what
//! `ocigate import docker-registry-proxy` prints. Defaults are the seed's (cache in
//! `/docker_mirror_cache`, CA in `/ca`; `OCIGATE_CACHE_DIR`, `OCIGATE_CA_DIR` and
//! `OCIGATE_LISTEN` move them and the registry listener); Docker Hub is always
//! intercepted; credentials are keyed by the host that checks them.

use std::fmt::Write as _;

use super::{ImportError, Imported, quote, upstream_name};

const DEFAULT_REGISTRIES: &str = "registry.k8s.io gcr.io quay.io ghcr.io";
const DOCKER_HUB_REALM: &str = "auth.docker.io";
const DOCKER_HUB_HOSTS: [&str; 4] = [
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    DOCKER_HUB_REALM,
];
/// The seed's manifest cache tiers (`ENABLE_MANIFEST_CACHE=true`).
const PRIMARY_REGEX: &str = "(stable|nightly|production|test)";
const SECONDARY_REGEX: &str = r"(.*)(\d|\.)+(.*)(\d|\.)+(.*)(\d|\.)+";

/// The YAML for docker-registry-proxy's variables (read through `env`), its forward proxy
/// listening on `listen`.
pub fn docker_registry_proxy(
    env: &dyn Fn(&str) -> Option<String>,
    listen: &str,
) -> Result<Imported, ImportError> {
    let var = |name: &str, default: &str| env(name).unwrap_or_else(|| default.to_string());
    let err = |name: &str, message: String| ImportError {
        file: name.to_string(),
        message,
    };
    let mut warnings = Vec::new();
    let mut registries: Vec<String> = vec!["docker.io".into()];
    for r in var("REGISTRIES", DEFAULT_REGISTRIES).split_whitespace() {
        let r = r.trim_end_matches('/').to_ascii_lowercase();
        if !DOCKER_HUB_HOSTS.contains(&r.as_str()) && !registries.contains(&r) {
            registries.push(r);
        }
    }
    let upstream_of = |registry: &str| match registry {
        "docker.io" => "hub".to_string(),
        other => upstream_name(other),
    };

    // Credentials, by the host that checks them: the registry itself, Docker Hub's realm,
    // or a realm on the registry's domain (gitlab.com checks registry.gitlab.com's).
    let mut credentials: Vec<(String, String, String)> = Vec::new();
    let entries = var("AUTH_REGISTRIES", "");
    let between = var("AUTH_REGISTRIES_DELIMITER", " ");
    let within = var("AUTH_REGISTRY_DELIMITER", ":");
    for entry in entries
        .split(between.as_str())
        .filter(|e| !e.trim().is_empty())
    {
        let parts: Vec<&str> = entry.trim().splitn(3, within.as_str()).collect();
        let [host, user, password] = parts[..] else {
            return Err(err(
                "AUTH_REGISTRIES",
                format!(
                    "an entry is not host{within}user{within}password (AUTH_REGISTRY_DELIMITER is {within:?})"
                ),
            ));
        };
        let host = host.to_ascii_lowercase();
        let checked: Vec<&String> = if DOCKER_HUB_HOSTS.contains(&host.as_str()) {
            registries.iter().filter(|r| *r == "docker.io").collect()
        } else if registries.contains(&host) {
            registries.iter().filter(|r| **r == host).collect()
        } else {
            let domain = psl::domain_str(&host);
            registries
                .iter()
                .filter(|r| domain.is_some() && psl::domain_str(r) == domain)
                .collect()
        };
        if checked.is_empty() {
            warnings.push(format!(
                "AUTH_REGISTRIES: no registry in REGISTRIES is checked by {host}; its credentials are not used"
            ));
        }
        for registry in checked {
            credentials.push((
                upstream_of(registry),
                user.to_string(),
                password.to_string(),
            ));
        }
    }

    let max_size = nginx_size(&var("CACHE_MAX_SIZE", "32g")).ok_or_else(|| {
        err(
            "CACHE_MAX_SIZE",
            "not an nginx size (examples: 32g, 500m)".into(),
        )
    })?;
    let inactive = var("CACHE_INACTIVE", "60d");
    let duration = |name: &str, value: &str| match crate::config::parse_duration(value) {
        Some(_) => Ok(value.to_string()),
        None => Err(err(
            name,
            format!("{value:?} is not a duration (examples: 10m, 1h, 60d)"),
        )),
    };
    duration("CACHE_INACTIVE", &inactive)?;
    let manifest_cache = flag(&var("ENABLE_MANIFEST_CACHE", "false"));
    let allow_push = flag(&var("ALLOW_PUSH", "false"));
    let verify_ssl = flag(&var("VERIFY_SSL", "true"));

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# docker-registry-proxy's environment as ocigate YAML (`ocigate import docker-registry-proxy`)."
    );
    let _ = writeln!(out, "server:");
    let _ = writeln!(
        out,
        "  listen: {}",
        quote(&var("OCIGATE_LISTEN", "127.0.0.1:5000"))
    );
    let _ = writeln!(out, "cache:");
    let _ = writeln!(
        out,
        "  dir: {}",
        quote(&var("OCIGATE_CACHE_DIR", "/docker_mirror_cache"))
    );
    let _ = writeln!(out, "  max_size: {}", quote(&max_size));
    let _ = writeln!(out, "  inactive: {}", quote(&inactive));
    if manifest_cache {
        let _ = writeln!(
            out,
            "  tag_ttl: {}",
            quote(&duration(
                "MANIFEST_CACHE_DEFAULT_TIME",
                &var("MANIFEST_CACHE_DEFAULT_TIME", "1h")
            )?)
        );
        let _ = writeln!(out, "  tag_ttls:");
        for tier in ["PRIMARY", "SECONDARY"] {
            let (regex, time) = match tier {
                "PRIMARY" => (PRIMARY_REGEX, "10m"),
                _ => (SECONDARY_REGEX, "60d"),
            };
            let regex = var(&format!("MANIFEST_CACHE_{tier}_REGEX"), regex);
            let time_var = format!("MANIFEST_CACHE_{tier}_TIME");
            let time = duration(&time_var, &var(&time_var, time))?;
            let _ = writeln!(
                out,
                "    - {{ tags: {}, ttl: {} }}",
                quote(&regex),
                quote(&time)
            );
        }
    } else {
        // The seed caches no tags then; a HEAD (free on Docker Hub) revalidates each one.
        let _ = writeln!(out, "  tag_ttl: 0s");
    }
    let _ = writeln!(out, "upstreams:");
    for registry in &registries {
        let name = upstream_of(registry);
        let url = match registry.as_str() {
            "docker.io" => "https://registry-1.docker.io".to_string(),
            other => format!("https://{other}"),
        };
        let _ = writeln!(out, "  {name}:");
        let _ = writeln!(out, "    url: {}", quote(&url));
        if let Some((_, user, password)) = credentials.iter().find(|(n, _, _)| *n == name) {
            let _ = writeln!(
                out,
                "    credentials: {{ basic: {{ username: {}, password: {} }} }}",
                quote(user),
                quote(password)
            );
        }
        if !verify_ssl {
            let _ = writeln!(out, "    insecure_skip_verify: true");
        }
    }
    let _ = writeln!(out, "routes:");
    for registry in &registries {
        let _ = writeln!(
            out,
            "  - {{ host: {}, upstream: {}, cache: true }}",
            quote(registry),
            upstream_of(registry)
        );
    }
    let _ = writeln!(out, "forward_proxy:");
    let _ = writeln!(out, "  listen: {}", quote(listen));
    match (env("CA_CRT_FILE"), env("CA_KEY_FILE")) {
        (Some(cert), Some(key)) => {
            let _ = writeln!(
                out,
                "  ca: {{ cert: {}, key: {} }}",
                quote(&cert),
                quote(&key)
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "  ca: {{ dir: {} }}",
                quote(&var("OCIGATE_CA_DIR", "/ca"))
            );
        }
    }
    let _ = writeln!(
        out,
        "  tunnel: [\"*\"]   # as the seed: hosts it does not intercept pass untouched"
    );
    let _ = writeln!(out, "  allow_push: {allow_push}");
    Ok(Imported {
        yaml: out,
        warnings,
    })
}

fn flag(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "true" | "1" | "yes" | "on"
    )
}

/// An nginx size (`32g`, `500m`, `64k`, bytes) in ocigate's units.
fn nginx_size(text: &str) -> Option<String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], Some(c.to_ascii_lowercase())),
        _ => (text, None),
    };
    let n: u64 = digits.parse().ok()?;
    let unit = match unit {
        None => "B",
        Some('k') => "KiB",
        Some('m') => "MiB",
        Some('g') => "GiB",
        Some(_) => return None,
    };
    Some(format!("{n}{unit}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Credentials};
    use std::collections::HashMap;

    fn convert(vars: &[(&str, &str)]) -> (Config, Imported) {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let imported = docker_registry_proxy(&|k| map.get(k).cloned(), "0.0.0.0:3128").unwrap();
        let config = Config::parse(&imported.yaml, "drp.yaml", &|_| None)
            .unwrap_or_else(|e| panic!("{e}\n{}", imported.yaml));
        (config, imported)
    }

    #[test]
    fn the_seeds_defaults() {
        let (c, imported) = convert(&[]);
        let hosts: Vec<&str> = c
            .routes
            .iter()
            .filter_map(|r| r.host.as_ref().map(|h| h.as_str()))
            .collect();
        assert_eq!(
            hosts,
            [
                "docker.io",
                "registry.k8s.io",
                "gcr.io",
                "quay.io",
                "ghcr.io"
            ]
        );
        assert!(c.routes.iter().all(|r| r.cache));
        let cache = c.cache.unwrap();
        assert_eq!(cache.max_size, 32 << 30);
        assert_eq!(cache.tag_ttl, std::time::Duration::ZERO);
        assert_eq!(
            cache.inactive,
            Some(std::time::Duration::from_secs(60 * 86400))
        );
        let fp = c.forward_proxy.unwrap();
        assert!(!fp.allow_push);
        assert_eq!(fp.listen[0].port(), 3128);
        assert!(imported.warnings.is_empty());
    }

    #[test]
    fn credentials_go_to_the_registry_their_host_checks_gcr_style_delimiters_included() {
        let json_key = r#"{"type":"service_account","private_key":"a:b$c"}"#;
        let auth = format!(
            "auth.docker.io:::hubuser:::hub:pass;;;gcr.io:::_json_key:::{json_key};;;gitlab.com:::gl:::tok;;;nowhere.example:::u:::p"
        );
        let (c, imported) = convert(&[
            ("REGISTRIES", "gcr.io registry.gitlab.com"),
            ("AUTH_REGISTRIES", &auth),
            ("AUTH_REGISTRIES_DELIMITER", ";;;"),
            ("AUTH_REGISTRY_DELIMITER", ":::"),
            ("ENABLE_MANIFEST_CACHE", "true"),
            ("MANIFEST_CACHE_PRIMARY_TIME", "5m"),
            ("ALLOW_PUSH", "true"),
            ("VERIFY_SSL", "false"),
            ("CACHE_MAX_SIZE", "500m"),
        ]);
        let basic = |u: &str, p: &str| {
            Some(Credentials::Basic {
                username: u.into(),
                password: p.into(),
            })
        };
        assert_eq!(c.upstreams["hub"].credentials, basic("hubuser", "hub:pass"));
        assert_eq!(
            c.upstreams["gcr-io"].credentials,
            basic("_json_key", json_key)
        );
        assert_eq!(
            c.upstreams["registry-gitlab-com"].credentials,
            basic("gl", "tok")
        );
        assert!(c.upstreams.values().all(|u| u.insecure_skip_verify));
        assert_eq!(imported.warnings.len(), 1, "{:?}", imported.warnings);
        assert!(imported.warnings[0].contains("nowhere.example"));
        let cache = c.cache.unwrap();
        assert_eq!(cache.max_size, 500 << 20);
        // Tiers, anchored: `stable` is primary, `v1.2.3` secondary, `latest` the default.
        assert_eq!(
            cache.tag_ttl_for("stable"),
            std::time::Duration::from_secs(300)
        );
        assert_eq!(
            cache.tag_ttl_for("unstable"),
            std::time::Duration::from_secs(3600)
        );
        assert_eq!(
            cache.tag_ttl_for("v1.2.3"),
            std::time::Duration::from_secs(60 * 86400)
        );
        assert_eq!(
            cache.tag_ttl_for("latest"),
            std::time::Duration::from_secs(3600)
        );
        assert!(c.forward_proxy.unwrap().allow_push);
    }

    #[test]
    fn bad_values_name_their_variable() {
        let map = |k: &str| (k == "CACHE_MAX_SIZE").then(|| "lots".to_string());
        let e = docker_registry_proxy(&map, "0.0.0.0:3128")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("CACHE_MAX_SIZE: "), "{e}");
        let map = |k: &str| (k == "AUTH_REGISTRIES").then(|| "quay.io:onlyuser".to_string());
        let e = docker_registry_proxy(&map, "0.0.0.0:3128")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("AUTH_REGISTRIES: "), "{e}");
    }
}

//! `ocigate import backplane FILE`: a backplane/registryproxy config, printed as the
//! equivalent ocigate YAML (each proxy a relay route, its `auth` a verbatim header on an
//! upstream of its own).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Deserialize;

use super::{ImportError, parse_yaml, quote, upstream_name};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Backplane {
    listen_addr: Option<String>,
    #[serde(alias = "port")]
    listen_port: Option<u16>,
    proxy_fqdn: Option<String>,
    #[serde(alias = "secretkey")]
    secret_key: Option<String>,
    #[serde(default)]
    proxies: BTreeMap<String, Proxy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Proxy {
    registry: String,
    #[serde(default)]
    remote: String,
    auth: Option<String>,
}

/// Converts backplane YAML `text` (named `file` in errors) to ocigate YAML.
pub fn backplane(text: &str, file: &str) -> Result<String, ImportError> {
    let err = |message: String| ImportError {
        file: file.to_string(),
        message,
    };
    let b: Backplane = parse_yaml(text, file)?;
    if b.proxies.is_empty() {
        return Err(err("no `proxies`: nothing to convert".into()));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Converted from backplane/registryproxy config {file} by `ocigate import backplane`."
    );
    let _ = writeln!(
        out,
        "# Every proxy became a relay route: clients get sealed PASETOs, never the upstream's token."
    );
    let _ = writeln!(out, "server:");
    let addr = b.listen_addr.as_deref().unwrap_or("0.0.0.0");
    let _ = writeln!(
        out,
        "  listen: {}",
        quote(&format!("{addr}:{}", b.listen_port.unwrap_or(5000)))
    );
    if let Some(fqdn) = &b.proxy_fqdn {
        let url = if fqdn.contains("://") {
            fqdn.clone()
        } else {
            format!("https://{fqdn}")
        };
        let _ = writeln!(out, "  public_url: {}", quote(&url));
    }
    // One upstream per (registry, auth): backplane's credentials belong to each proxy entry.
    let mut upstreams: Vec<(String, String, Option<String>)> = Vec::new();
    let mut routes = String::new();
    for (prefix, p) in &b.proxies {
        let name = match upstreams
            .iter()
            .find(|(_, r, a)| *r == p.registry && *a == p.auth)
        {
            Some((n, _, _)) => n.clone(),
            None => {
                let base = upstream_name(&p.registry);
                let n = if upstreams.iter().any(|(n, _, _)| *n == base) {
                    format!("{base}-{}", upstreams.len() + 1)
                } else {
                    base
                };
                upstreams.push((n.clone(), p.registry.clone(), p.auth.clone()));
                n
            }
        };
        let namespace = prefix.ends_with('/');
        let remote = if namespace && !p.remote.is_empty() && !p.remote.ends_with('/') {
            format!("{}/", p.remote)
        } else {
            p.remote.clone()
        };
        let _ = writeln!(routes, "  - prefix: {}", quote(prefix));
        let _ = writeln!(routes, "    upstream: {}", quote(&name));
        let _ = writeln!(routes, "    remote: {}", quote(&remote));
        let _ = writeln!(routes, "    relay: true");
    }
    let _ = writeln!(out, "upstreams:");
    for (name, registry, auth) in &upstreams {
        let _ = writeln!(out, "  {name}:");
        let _ = writeln!(out, "    url: {}", quote(registry));
        if let Some(a) = auth {
            let _ = writeln!(out, "    credentials:");
            let _ = writeln!(out, "      header: {}", quote(a));
        }
    }
    let _ = writeln!(out, "routes:");
    out.push_str(&routes);
    let _ = writeln!(out, "relay:");
    match &b.secret_key {
        Some(k) => {
            let _ = writeln!(out, "  secret_key: {}", quote(k));
        }
        None => {
            let _ = writeln!(
                out,
                "  secret_key: \"${{OCIGATE_RELAY_KEY}}\"   # openssl rand -hex 32"
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
listen_addr: 0.0.0.0
port: 5000
secretkey: 796280902778385984e2acd2868447a0ee703a8fab0ed7e69103cd50b9e3cddd
proxies:
  "bp/":
    registry: index.docker.io
    remote: backplane
  "0ebb01be-0a22-4639-898c-bc8c2d20942d/nginx":
    registry: ghcr.io
    remote: modem7/docker-rickroll
    auth: "Basic cmljazpOZXZlckdvbm5hTGV0WW91RG93bjI="
"#;

    #[test]
    fn converts_the_seed_example_to_a_valid_config() {
        let yaml = backplane(SEED, "bp.yaml").unwrap();
        let config = crate::config::Config::parse(&yaml, "converted.yaml", &|_| None).unwrap();
        assert_eq!(config.server.listen[0].to_string(), "0.0.0.0:5000");
        let bp = config.routes.iter().find(|r| r.prefix == "bp/").unwrap();
        assert_eq!((bp.remote.as_str(), bp.relay), ("backplane/", true));
        assert!(config.upstreams[&bp.upstream].is_docker_hub());
        let cap = config.routes.iter().find(|r| !r.is_namespace()).unwrap();
        assert_eq!(cap.remote, "modem7/docker-rickroll");
        assert_eq!(
            config.upstreams[&cap.upstream].credentials,
            Some(crate::config::Credentials::Header(
                "Basic cmljazpOZXZlckdvbm5hTGV0WW91RG93bjI=".into()
            ))
        );
        assert_eq!(config.relay.unwrap().secret_key[0], 0x79);
    }

    #[test]
    fn the_issue_spelling_and_errors() {
        let yaml = backplane(
            "listen_addr: 127.0.0.1\nlisten_port: 6000\nproxy_fqdn: reg.example.com\nsecret_key: x\nproxies:\n  a/: {registry: quay.io, remote: org}\n",
            "bp.yaml",
        )
        .unwrap();
        assert!(yaml.contains("listen: \"127.0.0.1:6000\""));
        assert!(yaml.contains("public_url: \"https://reg.example.com\""));
        assert!(yaml.contains("remote: \"org/\""));
        let e = backplane("proxies: {}\n", "bp.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nothing to convert"), "{e}");
        let e = backplane("proxies:\n  a/: {registry: x, colour: red}\n", "bp.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("bp.yaml: 2:") && e.contains("colour"), "{e}");
    }
}

//! `ocigate import ociregistry FILE`: an Ociregistry config's `registries:` list (basic
//! auth, ECR tokens, TLS settings) as upstreams and host routes. Ociregistry clients pull
//! `host:port/<registry>/<name>` (in-path) or send `?ns=`: both reach host routes. What has
//! no equivalent is reported, never dropped silently.

use std::fmt::Write as _;

use serde_json::Value;

use super::{ImportError, Imported, parse_yaml, quote, upstream_name};

/// Ociregistry's listen port when its config names none.
const DEFAULT_PORT: u64 = 8080;

pub fn ociregistry(text: &str, file: &str) -> Result<Imported, ImportError> {
    let err = |message: String| ImportError {
        file: file.to_string(),
        message,
    };
    let doc: Value = parse_yaml(text, file)?;
    let top = doc
        .as_object()
        .ok_or_else(|| err("not a mapping of settings".into()))?;
    let mut warnings = Vec::new();
    let unknown = |warnings: &mut Vec<String>, at: &str, key: &str| {
        warnings.push(format!(
            "{file}: {at}{key}: no ocigate equivalent, not converted"
        ));
    };
    for key in top.keys() {
        if !matches!(
            key.as_str(),
            "registries" | "port" | "imagePath" | "airGapped"
        ) {
            unknown(&mut warnings, "", key);
        }
    }
    let registries = top
        .get("registries")
        .and_then(Value::as_array)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| err("no `registries` list: nothing to convert".into()))?;

    let mut upstreams = String::new();
    let mut routes = String::new();
    for (i, entry) in registries.iter().enumerate() {
        let at = format!("registries[{i}].");
        let Some(entry) = entry.as_object() else {
            return Err(err(format!("{at}: not a mapping")));
        };
        let name = entry
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| err(format!("{at}name: missing")))?;
        if crate::oci::host::RegistryHost::parse(name).is_none() {
            warnings.push(format!(
                "{file}: {at}name: {name:?} is no registry host name (an IP address?): clients cannot name it, not converted"
            ));
            continue;
        }
        for key in entry.keys() {
            if !matches!(
                key.as_str(),
                "name" | "description" | "scheme" | "auth" | "tls"
            ) {
                unknown(&mut warnings, &at, key);
            }
        }
        let upstream = upstream_name(name);
        let scheme = match entry.get("scheme").and_then(Value::as_str) {
            None | Some("https") => "https",
            Some("http") => "http",
            Some(other) => return Err(err(format!("{at}scheme: {other:?} is not http or https"))),
        };
        if let Some(d) = entry.get("description").and_then(Value::as_str) {
            let _ = writeln!(upstreams, "  # {}", d.replace('\n', " "));
        }
        let _ = writeln!(upstreams, "  {upstream}:");
        let _ = writeln!(
            upstreams,
            "    url: {}",
            quote(&format!("{scheme}://{name}"))
        );
        if let Some(auth) = entry.get("auth").and_then(Value::as_object) {
            credentials(
                &mut upstreams,
                auth,
                &format!("{at}auth."),
                &mut warnings,
                file,
            )
            .map_err(&err)?;
        }
        if let Some(tls) = entry.get("tls").and_then(Value::as_object) {
            for (key, value) in tls {
                match (key.as_str(), value) {
                    ("ca", Value::String(path)) => {
                        let _ = writeln!(upstreams, "    ca: {}", quote(path));
                    }
                    ("insecure_skip_verify", Value::Bool(b)) => {
                        let _ = writeln!(upstreams, "    insecure_skip_verify: {b}");
                    }
                    ("cert" | "key", _) => warnings.push(format!(
                        "{file}: {at}tls.{key}: client certificates are not supported, not converted"
                    )),
                    _ => unknown(&mut warnings, &format!("{at}tls."), key),
                }
            }
        }
        let _ = writeln!(
            routes,
            "  - {{ host: {}, upstream: {upstream}, cache: true }}",
            quote(name)
        );
    }
    let port = top
        .get("port")
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_PORT);
    let dir = top
        .get("imagePath")
        .and_then(Value::as_str)
        .unwrap_or("/var/lib/ocigate/images");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Converted from the Ociregistry config {file} by `ocigate import ociregistry`."
    );
    let _ = writeln!(
        out,
        "# Registries it does not list are not proxied here: ocigate dials only configured hosts."
    );
    let _ = writeln!(
        out,
        "server:\n  listen: {}",
        quote(&format!("0.0.0.0:{port}"))
    );
    let _ = writeln!(out, "cache:\n  dir: {}", quote(dir));
    if top.get("airGapped").and_then(Value::as_bool) == Some(true) {
        let _ = writeln!(out, "  offline: true");
    }
    let _ = writeln!(out, "upstreams:");
    out.push_str(&upstreams);
    let _ = writeln!(out, "routes:");
    out.push_str(&routes);
    Ok(Imported {
        yaml: out,
        warnings,
    })
}

/// `auth`: `user`/`password` (basic), or `token` (`provider: ecr` with `providerOpts`,
/// `expiry` and `static`).
fn credentials(
    out: &mut String,
    auth: &serde_json::Map<String, Value>,
    at: &str,
    warnings: &mut Vec<String>,
    file: &str,
) -> Result<(), String> {
    if let Some(token) = auth.get("token").and_then(Value::as_object) {
        let provider = token.get("provider").and_then(Value::as_str);
        if provider != Some("ecr") {
            return Err(format!(
                "{at}token.provider: {provider:?} is not supported (ecr is)"
            ));
        }
        let mut ecr: Vec<String> = Vec::new();
        let opts = token
            .get("providerOpts")
            .and_then(Value::as_str)
            .unwrap_or("");
        for pair in opts.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some((key @ ("region" | "profile"), value)) => {
                    ecr.push(format!("{key}: {}", quote(value)));
                }
                _ => warnings.push(format!(
                    "{file}: {at}token.providerOpts: {pair:?} is not region= or profile=, not converted"
                )),
            }
        }
        if let Some(expiry) = token.get("expiry").and_then(Value::as_str) {
            ecr.push(format!("refresh: {}", quote(expiry)));
        }
        if let Some(s) = token.get("static").and_then(Value::as_str) {
            ecr.push(format!("static: {}", quote(s)));
        }
        let _ = writeln!(out, "    credentials:\n      ecr: {{ {} }}", ecr.join(", "));
        for key in token.keys() {
            if !matches!(
                key.as_str(),
                "provider" | "providerOpts" | "expiry" | "static"
            ) {
                warnings.push(format!(
                    "{file}: {at}token.{key}: no ocigate equivalent, not converted"
                ));
            }
        }
    } else if let (Some(user), Some(password)) = (
        auth.get("user").and_then(Value::as_str),
        auth.get("password").and_then(Value::as_str),
    ) {
        let _ = writeln!(
            out,
            "    credentials: {{ basic: {{ username: {}, password: {} }} }}",
            quote(user),
            quote(password)
        );
    }
    for key in auth.keys() {
        if !matches!(key.as_str(), "user" | "password" | "token") {
            warnings.push(format!(
                "{file}: {at}{key}: no ocigate equivalent, not converted"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Credentials;

    /// The seed's ECR example, beside basic auth and TLS settings.
    const SEED: &str = r#"
port: 8888
imagePath: /var/lib/ociregistry
pullTimeout: 60000
registries:
  - name: 111122223333.dkr.ecr.us-south-1.amazonaws.com
    auth:
      token:
        provider: ecr
        providerOpts: profile=default,region=us-south-1
        expiry: 6h
  - name: my-registry.io:6443
    description: the private one
    auth: { user: me, password: "p$ss" }
    tls: { ca: /etc/ssl/certs/ca-certificates.crt, insecure_skip_verify: false, cert: /c, key: /k }
  - name: 10.0.0.5:5000
"#;

    #[test]
    fn converts_registries_and_reports_what_it_cannot() {
        let imported = ociregistry(SEED, "oci.yaml").unwrap();
        let y = &imported.yaml;
        assert!(y.contains("listen: \"0.0.0.0:8888\""), "{y}");
        assert!(
            y.contains("ecr: { profile: \"default\", region: \"us-south-1\", refresh: \"6h\" }"),
            "{y}"
        );
        assert!(y.contains("host: \"my-registry.io:6443\""), "{y}");
        let warned = imported.warnings.join("\n");
        for what in ["pullTimeout", "tls.cert", "tls.key", "10.0.0.5:5000"] {
            assert!(warned.contains(what), "{what} not reported: {warned}");
        }
        // The basic-auth entry converts to a config that parses (ECR needs the feature).
        let basic_only = SEED.replace(
            "        provider: ecr\n        providerOpts: profile=default,region=us-south-1\n        expiry: 6h\n",
            "        provider: ecr\n",
        );
        let imported = ociregistry(&basic_only, "oci.yaml").unwrap();
        let parsed = crate::config::Config::parse(&imported.yaml, "x.yaml", &|_| None);
        if cfg!(feature = "ecr") {
            let c = parsed.unwrap();
            let private = &c.upstreams["my-registry-io-6443"];
            assert_eq!(
                private.credentials,
                Some(Credentials::Basic {
                    username: "me".into(),
                    password: "p$ss".into()
                })
            );
        }
        let e = ociregistry("registries: []\n", "oci.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nothing to convert"), "{e}");
    }
}

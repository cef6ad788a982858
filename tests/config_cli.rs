//! The CLI contract: `check-config` accepts good files with a summary and rejects bad ones
//! with `file:line:column: what is wrong`; `--version` prints the version.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::Ocigate;

/// `ocigate import ARGS` with `env`, which must succeed: its YAML and its warnings.
fn import(args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let out = Command::new(Ocigate::bin())
        .arg("import")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "import {args:?}: {stderr}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

fn check(yaml: &str) -> (bool, String, String) {
    common::check_config(yaml, &[])
}

const UP: &str = "upstreams:\n  hub: {url: \"https://registry.example.com\"}\n";
const ROUTE: &str = "routes:\n  - {prefix: \"\", upstream: hub}\n";

#[test]
fn bad_configs_name_file_line_column_and_problem() {
    let cases: Vec<(String, &str, &str)> = vec![
        (
            format!("{UP}{ROUTE}colour: blue\n"),
            "bad.yaml:5:1: ",
            "unknown field `colour`",
        ),
        (
            "upstreams:\n  hub:\n    url: https://x.io\n    colour: blue\nroutes: []\n".into(),
            "bad.yaml:4:5: ",
            "unknown field `colour`",
        ),
        (
            format!("{UP}routes:\n  - prefix: \"\"\n    upstream: hb\n"),
            "bad.yaml:5:15: ",
            "routes.upstream: no upstream named \"hb\" (defined: hub)",
        ),
        (
            format!("{UP}routes:\n  - {{prefix: \"Team/\", upstream: hub}}\n"),
            "bad.yaml:4:14: ",
            "routes.prefix: \"Team/\" is not a repository name or namespace",
        ),
        (
            "upstreams:\n  hub:\n    url: https://x.io\n   bad: indent\nroutes: []\n".into(),
            "bad.yaml:4:",
            "did not find expected key",
        ),
        (
            format!("server:\n  listen: \"nope\"\n{UP}{ROUTE}"),
            "bad.yaml:2:11: ",
            "server.listen: \"nope\" is not an address:port",
        ),
        (
            format!("{UP}{ROUTE}").replace(
                "\"https://registry.example.com\"}",
                "\"https://registry.example.com\", credentials: {basic: {username: u, password: \"${NOT_SET_ANYWHERE}\"}}}",
            ),
            "bad.yaml:2:",
            "upstreams.hub.credentials.basic.password: environment variable NOT_SET_ANYWHERE is not set",
        ),
        (
            "upstreams:\n  hub:\n    url: https://x.io\n    credentials: {}\nroutes: []\n".into(),
            "bad.yaml:4:18: ",
            "give exactly one of basic, header, docker_config",
        ),
        (
            "upstreams:\n  hub:\n    url: https://x.io\n    redirects: maybe\n".into(),
            "bad.yaml:4:16: ",
            "upstreams.hub.redirects: \"maybe\" is neither \"pass\" nor \"follow\"",
        ),
        (
            format!("{UP}routes:\n  - {{prefix: \"a/\", upstream: hub}}\n  - {{prefix: \"a/\", upstream: hub}}\n"),
            "bad.yaml:5:5: ",
            "routes: prefix \"a/\" is already routed at line 4",
        ),
        (
            format!("{UP}routes:\n  - {{prefix: \"\", upstream: hub, remote: \"Bad\"}}\n"),
            "bad.yaml:4:",
            "routes.remote: \"Bad\" is not a valid repository name or namespace",
        ),
        (
            format!("server:\n  tls: {{cert: /nonexistent/cert.pem, key: /nonexistent/key.pem}}\n{UP}{ROUTE}"),
            "bad.yaml:2:15: ",
            "server.tls.cert: cannot read /nonexistent/cert.pem",
        ),
        (
            "upstreams:\n  hub:\n    url: https://x.io/v2/\nroutes: []\n".into(),
            "bad.yaml:3:10: ",
            "give only scheme, host and port",
        ),
        (
            format!("server:\n  shutdown_grace: soon\n{UP}{ROUTE}"),
            "bad.yaml:2:19: ",
            "server.shutdown_grace: \"soon\" is not a duration",
        ),
        (
            "upstreams:\n  hub:\n    url: [1, 2]\n".into(),
            "bad.yaml:3:10: ",
            "expected string",
        ),
        (UP.to_string(), "bad.yaml:1:1: ", "routes: at least one route is needed"),
        (String::new(), "bad.yaml:1:1: ", "the file is empty"),
        (
            "upstreams:\n  hub:\n    url: https://x.io\n    credentials:\n      docker_config: /nonexistent/config.json\n".into(),
            "bad.yaml:5:",
            "upstreams.hub.credentials.docker_config: cannot read /nonexistent/config.json",
        ),
        (
            format!("{UP}routes:\n  - {{prefix: \"p/\", upstream: hub, relay: true}}\n"),
            "bad.yaml:4:",
            "has `relay: true` but there is no `relay` section",
        ),
        (
            format!("{UP}{ROUTE}relay:\n  secret_key: \"abcd\"\n"),
            "bad.yaml:6:15: ",
            "relay.secret_key: must be 64 hex characters",
        ),
        (
            format!("{UP}{ROUTE}relay:\n  secret_key: \"{}\"\nauth:\n  token: {{realm: \"https://a/token\", service: s, issuer: i, jwks: \"https://a/jwks\"}}\n", "ab".repeat(32)),
            "bad.yaml:6:",
            "give both: the token server authenticates clients",
        ),
        (
            format!("{UP}routes:\n  - {{prefix: \"c/\", upstream: hub, cache: true}}\n"),
            "bad.yaml:4:",
            "routes: prefix \"c/\" has `cache: true` but there is no `cache` section with a dir",
        ),
        (
            format!("{UP}{ROUTE}cache:\n  dir: /tmp/x\n  max_size: lots\n"),
            "bad.yaml:7:13: ",
            "cache.max_size: \"lots\" is not a size (examples: 500MiB, 32GiB, 1TB)",
        ),
        (
            format!("{UP}{ROUTE}cache:\n  dir: /tmp/x\n  ttl: 5m\n"),
            "bad.yaml:7:3: ",
            "unknown field `ttl`",
        ),
        (
            "upstreams:\n  hub:\n    url: https://x.io\n    credentials: automatic\nroutes: []\n".into(),
            "bad.yaml:4:18: ",
            "upstreams.hub.credentials: \"automatic\" is not a credentials kind; give `auto` or a map",
        ),
        (
            "upstreams:\n  hub:\n    url: https://x.io\n    credentials:\n      gcp: {key_file: /nonexistent/sa.json}\n".into(),
            "bad.yaml:5:",
            "upstreams.hub.credentials.gcp.key_file: cannot read /nonexistent/sa.json",
        ),
        (
            "upstreams:\n  hub:\n    url: https://x.io\n    credentials:\n      gcp: {keyfile: /x}\n".into(),
            "bad.yaml:5:",
            "unknown field `keyfile`, expected one of key_file",
        ),
    ];
    let ecr = |body: &str| {
        format!(
            "upstreams:\n  hub:\n    url: https://x.io\n    credentials:\n      ecr: {{{body}}}\nroutes: []\n"
        )
    };
    let ecr_cases: Vec<(String, &str, &str)> = vec![
        (
            ecr("region: us_east"),
            "bad.yaml:5:",
            "upstreams.hub.credentials.ecr.region: \"us_east\" is not an AWS region name",
        ),
        (
            ecr("registry_ids: [\"1234\"]"),
            "bad.yaml:5:",
            "upstreams.hub.credentials.ecr.registry_ids: \"1234\" is not a 12-digit AWS account id",
        ),
        (
            ecr("refresh: 0s"),
            "bad.yaml:5:",
            "upstreams.hub.credentials.ecr.refresh: must be at least 1s",
        ),
        (
            ecr("refresh: often"),
            "bad.yaml:5:",
            "upstreams.hub.credentials.ecr.refresh: \"often\" is not a duration",
        ),
        (
            ecr("regions: [a]"),
            "bad.yaml:5:",
            "unknown field `regions`",
        ),
    ];
    // Without the feature every `ecr` section gets that one answer (tested elsewhere).
    let cases: Vec<_> = cases
        .into_iter()
        .chain(ecr_cases.into_iter().filter(|_| cfg!(feature = "ecr")))
        .collect();
    assert!(cases.len() >= 10);
    for (yaml, location, message) in &cases {
        let (ok, _, stderr) = check(yaml);
        assert!(!ok, "accepted:\n{yaml}");
        let line = stderr.lines().next().unwrap_or_default();
        let line = line.strip_prefix("ocigate: ").unwrap_or(line);
        assert!(
            line.starts_with(location),
            "want {location}… got {line:?} for\n{yaml}"
        );
        assert!(
            line.contains(message),
            "want {message:?} in {line:?} for\n{yaml}"
        );
    }
}

#[test]
fn a_good_config_gets_a_summary_without_secrets() {
    let yaml = "server:\n  listen: [\"127.0.0.1:5000\", \"[::1]:5000\"]\nupstreams:\n  hub:\n    url: docker.io\n    credentials:\n      basic: {username: me, password: \"hunter2-secret\"}\nroutes:\n  - {prefix: \"bp/\", upstream: hub, remote: backplane}\n  - {prefix: \"\", upstream: hub}\n";
    let (ok, stdout, stderr) = check(yaml);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("listen: http://127.0.0.1:5000"), "{stdout}");
    assert!(stdout.contains("listen: http://[::1]:5000"), "{stdout}");
    assert!(stdout.contains("https://registry-1.docker.io"), "{stdout}");
    assert!(
        stdout.contains("bp/") && stdout.contains("hub:backplane/"),
        "{stdout}"
    );
    assert!(stdout.contains("credentials=basic"), "{stdout}");
    assert!(!stdout.contains("hunter2"), "{stdout}");
}

#[test]
fn check_config_leaves_the_cache_directory_alone() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("not-yet");
    let yaml = format!(
        "{UP}routes:\n  - {{prefix: \"c/\", upstream: hub, cache: true}}\ncache:\n  dir: {}\n  max_size: 1GiB\n",
        cache.display()
    );
    let (ok, stdout, stderr) = check(&yaml);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("(namespace, cache)"), "{stdout}");
    assert!(
        stdout.contains(&format!("cache: {} (max 1073741824 bytes", cache.display())),
        "{stdout}"
    );
    assert!(!cache.exists(), "check-config created the cache directory");
}

#[test]
fn unreadable_file_and_version() {
    let out = Command::new(Ocigate::bin())
        .args(["check-config", "/nonexistent/ocigate.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/ocigate.yaml: cannot read"),
        "{err}"
    );
    let out = Command::new(Ocigate::bin())
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ocigate {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bundled_example_configs_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let docker_config = tempfile::tempdir().unwrap();
    std::fs::write(docker_config.path().join("config.json"), r#"{"auths":{}}"#).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertificateParams::new(vec!["token ca".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let ca_bundle = docker_config.path().join("token-ca.pem");
    std::fs::write(&ca_bundle, ca.pem()).unwrap();
    let signing_key = docker_config.path().join("token.key");
    std::fs::write(&signing_key, key.serialize_pem()).unwrap();
    let gcp_key = docker_config.path().join("sa.json");
    std::fs::write(
        &gcp_key,
        r#"{"type":"service_account","private_key":"k","client_email":"sa@p.iam.gserviceaccount.com"}"#,
    )
    .unwrap();
    let htpasswd = docker_config.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("alice:{}\n", bcrypt::hash("pw", 4).unwrap()),
    )
    .unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = Command::new(Ocigate::bin())
                .arg("check-config")
                .arg(&path)
                .env("HUB_PASSWORD", "x")
                .env("HUB_USER", "x")
                .env("GHCR_TOKEN", "x")
                .env("REGISTRY_AUTH_HEADER", "Basic eDp4")
                .env("DOCKER_CONFIG", docker_config.path())
                .env("TOKEN_CA_BUNDLE", &ca_bundle)
                .env("TOKEN_SIGNING_KEY", &signing_key)
                .env("TOKEN_CERTIFICATE", &ca_bundle)
                .env("TOKEN_HTPASSWD", &htpasswd)
                .env("OCIGATE_RELAY_KEY", "ab".repeat(32))
                .env("GCP_KEY_FILE", &gcp_key)
                .env("OCIGATE_CACHE_DIR", docker_config.path().join("cache"))
                .env("OCIGATE_CA_DIR", docker_config.path().join("ca"))
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !cfg!(feature = "ecr") && stderr.contains("built without the `ecr` feature") {
                checked += 1;
                continue;
            }
            assert!(out.status.success(), "{}: {stderr}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 5, "every use case has an example");
}

#[test]
fn import_backplane_prints_a_config_that_checks() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("backplane.yaml");
    std::fs::write(
        &seed,
        "listen_addr: 0.0.0.0\nport: 5000\nsecretkey: 796280902778385984e2acd2868447a0ee703a8fab0ed7e69103cd50b9e3cddd\nproxies:\n  \"bp/\":\n    registry: index.docker.io\n    remote: backplane\n  \"0ebb01be-0a22-4639-898c-bc8c2d20942d/nginx\":\n    registry: ghcr.io\n    remote: modem7/docker-rickroll\n    auth: \"Basic cmljazpOZXZlckdvbm5hTGV0WW91RG93bjI=\"\n",
    )
    .unwrap();
    let (yaml, _) = import(&["backplane", &seed.display().to_string()], &[]);
    let (ok, stdout, stderr) = check(&yaml);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("bp/") && stdout.contains("relay"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("cmljazpOZXZlckdvbm5hTGV0WW91RG93bjI="),
        "secrets stay out of the summary"
    );
}

#[test]
fn import_docker_registry_proxy_reads_its_environment_gcr_delimiters_included() {
    let json_key = r#"{"type":"service_account","private_key":"k:$x","client_email":"sa@p.iam.gserviceaccount.com"}"#;
    let auth = format!("gcr.io:::_json_key:::{json_key};;;auth.docker.io:::me:::hub;pw");
    let (yaml, _) = import(
        &["docker-registry-proxy"],
        &[
            ("REGISTRIES", "gcr.io quay.io"),
            ("AUTH_REGISTRIES", &auth),
            ("AUTH_REGISTRIES_DELIMITER", ";;;"),
            ("AUTH_REGISTRY_DELIMITER", ":::"),
            ("ENABLE_MANIFEST_CACHE", "true"),
            ("ALLOW_PUSH", "true"),
            ("CACHE_MAX_SIZE", "2g"),
        ],
    );
    // `$` in a secret is kept literally (doubled against `${…}` expansion).
    assert!(yaml.contains("k:$$x"), "{yaml}");
    let (ok, summary, stderr) = check(&yaml);
    assert!(ok, "{stderr}\n{yaml}");
    for want in [
        "docker.io/",
        "gcr.io/",
        "quay.io/",
        "forward_proxy: http://0.0.0.0:3128",
        "push: true",
    ] {
        assert!(summary.contains(want), "{want} in {summary}");
    }
    assert!(
        !summary.contains("hub;pw"),
        "secrets stay out of the summary"
    );
    // A file argument is a mistake for this kind, said so.
    let out = Command::new(Ocigate::bin())
        .args(["import", "docker-registry-proxy", "x.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("environment"));
}

#[test]
fn import_ociregistry_converts_the_seeds_ecr_example() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("ociregistry.yaml");
    std::fs::write(
        &seed,
        "registries:\n  - name: 111122223333.dkr.ecr.us-south-1.amazonaws.com\n    auth:\n      token:\n        provider: ecr\n        providerOpts: profile=default,region=us-south-1\n        expiry: 6h\n  - name: quay.io\n    colour: blue\n",
    )
    .unwrap();
    let (yaml, warnings) = import(&["ociregistry", &seed.display().to_string()], &[]);
    assert!(
        warnings.contains("registries[1].colour"),
        "unknown keys are reported: {warnings}"
    );
    let (ok, summary, stderr) =
        common::check_config(&yaml, &[("AWS_EC2_METADATA_DISABLED", "true")]);
    if cfg!(feature = "ecr") {
        assert!(ok, "{stderr}\n{yaml}");
        assert!(
            summary.contains("111122223333.dkr.ecr.us-south-1.amazonaws.com/"),
            "{summary}"
        );
        assert!(summary.contains("ecr"), "{summary}");
    } else {
        assert!(
            stderr.contains("built without the `ecr` feature"),
            "{stderr}"
        );
    }
}

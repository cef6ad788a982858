use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "HUB_PASSWORD" => Some("s3cret".into()),
        "PORT" => Some("5999".into()),
        _ => None,
    }
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "test.yaml", &env)
}

fn error(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

const FULL: &str = r#"
server:
  listen: ["127.0.0.1:${PORT}", "[::1]:5001"]
  public_url: https://r.example.com
  browser_redirects: false
  shutdown_grace: 1m30s
upstreams:
  hub:
    url: docker.io
    credentials:
      basic: { username: u, password: "${HUB_PASSWORD}" }
    redirects: follow
    allowed_realms: ["http://127.0.0.1:5001/token"]
  ghcr:
    url: https://ghcr.io
    credentials:
      header: "Bearer abc"
routes:
  - prefix: "mirror/"
    upstream: hub
    remote: "team"
  - prefix: "0ebb01be/nginx"
    upstream: ghcr
    remote: "modem7/docker-rickroll"
  - prefix: ""
    upstream: hub
"#;

#[test]
fn full_config_resolves() {
    let c = parse(FULL).unwrap();
    assert_eq!(c.server.listen.len(), 2);
    assert_eq!(c.server.listen[0].port(), 5999);
    assert!(!c.server.browser_redirects);
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(90));
    let hub = &c.upstreams["hub"];
    assert_eq!(hub.url.as_str(), "https://registry-1.docker.io/");
    assert!(hub.is_docker_hub());
    assert_eq!(
        hub.credentials,
        Some(Credentials::Basic {
            username: "u".into(),
            password: "s3cret".into()
        })
    );
    assert_eq!(hub.redirects, RedirectPolicy::Follow);
    assert_eq!(c.routes[0].remote, "team/");
    assert!(c.routes[0].is_namespace());
    assert!(!c.routes[1].is_namespace());
    assert!(c.routes[2].is_namespace());
    let summary = c.summary();
    assert!(summary.contains("mirror/"));
    assert!(!summary.contains("s3cret"));
    assert!(!format!("{c:?}").contains("s3cret"));
}

#[test]
fn embedded_default_mirrors_docker_hub() {
    let c = Config::default_config().unwrap();
    assert_eq!(c.upstreams["hub"].url.host_str(), Some(DOCKER_HUB_API_HOST));
    assert_eq!(
        c.routes[0].host.as_ref().map(RegistryHost::as_str),
        Some("docker.io")
    );
    assert_eq!(c.routes[1].prefix, "");
    assert!(c.routes.iter().all(|r| r.cache), "a caching mirror");
    let dir = c.cache.unwrap().dir;
    assert!(dir.ends_with("ocigate"), "{}", dir.display());
}

#[test]
fn errors_carry_file_line_and_column() {
    let e = error("upstreams:\n  hub:\n    url: https://x.io\n    colour: blue\nroutes: []\n");
    assert!(e.starts_with("test.yaml:4:5: "), "{e}");
    assert!(e.contains("colour"), "{e}");
    let e = error(
        "upstreams:\n  hub:\n    url: https://x.io\nroutes:\n  - prefix: \"\"\n    upstream: hb\n",
    );
    assert!(e.starts_with("test.yaml:6:15: "), "{e}");
    assert!(e.contains("no upstream named \"hb\""), "{e}");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
    assert_eq!(parse_duration("45"), Some(Duration::from_secs(45)));
    assert_eq!(parse_duration("5 m"), None);
    assert_eq!(parse_duration("m"), None);
    assert_eq!(parse_duration(""), None);
}

#[test]
fn upstream_urls() {
    assert_eq!(
        parse_upstream_url("index.docker.io").unwrap().as_str(),
        "https://registry-1.docker.io/"
    );
    assert_eq!(
        parse_upstream_url("http://127.0.0.1:5000")
            .unwrap()
            .as_str(),
        "http://127.0.0.1:5000/"
    );
    assert!(parse_upstream_url("https://x.io/v2").is_err());
    assert!(parse_upstream_url("ftp://x.io").is_err());
    assert!(parse_upstream_url("https://u:p@x.io").is_err());
}

#[test]
fn sizes() {
    assert_eq!(parse_size("512"), Some(512));
    assert_eq!(parse_size("500MB"), Some(500_000_000));
    assert_eq!(parse_size("32GiB"), Some(32 << 30));
    assert_eq!(parse_size("1.5 KiB"), Some(1536));
    assert_eq!(parse_size("2tb"), Some(2_000_000_000_000));
    assert_eq!(parse_size("lots"), None);
    assert_eq!(parse_size("5 parsecs"), None);
    assert_eq!(parse_size(""), None);
}

#[test]
fn aws_regions() {
    for r in ["us-east-1", "cn-north-1", "us-gov-west-1", "eu-central-2"] {
        assert!(is_aws_region(r), "{r}");
    }
    for r in ["us_east_1", "us-east", "US-EAST-1", "us--1", ""] {
        assert!(!is_aws_region(r), "{r}");
    }
}

#[test]
fn summaries_write_durations_as_configs_do() {
    let c = parse(
        "cache: { dir: /tmp/x, inactive: 60d, tag_ttls: [ { tags: \"v.*\", ttl: 90m } ] }\nupstreams: { r: { url: \"http://127.0.0.1:9\" } }\nroutes: [ { prefix: \"\", upstream: r, cache: true } ]\n",
    )
    .unwrap();
    let summary = c.summary();
    assert!(summary.contains("inactive 60d"), "{summary}");
    assert!(summary.contains("tags ^(?:v.*)$ trusted 90m"), "{summary}");
    assert_eq!(compact_duration(Duration::from_millis(1500)), "1500ms");
    assert_eq!(compact_duration(Duration::ZERO), "0ms");
}

#[test]
fn host_routes() {
    let c = parse(
        "upstreams: { hub: { url: docker.io }, quay: { url: \"https://quay.io\" } }\nroutes:\n  - { host: Quay.IO:443, upstream: quay, remote: \"mirror/\" }\n  - { host: index.docker.io, upstream: hub }\n  - { host: \"localhost:5000\", prefix: \"team/\", upstream: hub }\n  - { prefix: \"\", upstream: hub }\n",
    )
    .unwrap();
    let hosts: Vec<Option<&str>> = c
        .routes
        .iter()
        .map(|r| r.host.as_ref().map(RegistryHost::as_str))
        .collect();
    assert_eq!(
        hosts,
        [
            Some("quay.io"),
            Some("docker.io"),
            Some("localhost:5000"),
            None
        ]
    );
    assert_eq!(c.routes[0].prefix, "");
    assert_eq!(c.routes[0].remote, "mirror/");
    assert!(c.summary().contains("localhost:5000/team/"));

    let routes = |r: &str| format!("upstreams: {{ hub: {{ url: docker.io }} }}\nroutes:\n{r}");
    for (yaml, want) in [
        (
            routes("  - { host: 127.0.0.1, upstream: hub }\n"),
            "test.yaml:3:13: routes.host: \"127.0.0.1\" is not a registry host name",
        ),
        (
            routes("  - { host: quay, upstream: hub }\n"),
            "test.yaml:3:13: routes.host: \"quay\"",
        ),
        (
            routes("  - { host: \"quay.io/x\", upstream: hub }\n"),
            "test.yaml:3:13: routes.host: \"quay.io/x\"",
        ),
        (
            routes("  - { upstream: hub }\n"),
            "test.yaml:3:5: routes: a route needs `prefix`, `host` or both",
        ),
        (
            routes(
                "  - { host: docker.io, upstream: hub }\n  - { host: registry-1.docker.io, upstream: hub }\n",
            ),
            "test.yaml:4:5: routes: host docker.io is already routed at line 3",
        ),
        (
            routes(
                "  - { host: quay.io, prefix: \"\", upstream: hub }\n  - { host: quay.io, upstream: hub }\n",
            ),
            "test.yaml:4:5: routes: host quay.io is already routed at line 3",
        ),
        (
            routes(
                "  - { host: quay.io, upstream: hub, relay: true }\nrelay: { secret_key: \"796280902778385984e2acd2868447a0ee703a8fab0ed7e69103cd50b9e3cddd\" }\n",
            ),
            "test.yaml:3:",
        ),
    ] {
        let e = error(&yaml);
        assert!(e.starts_with(want), "want {want:?}, got {e:?}");
    }
}

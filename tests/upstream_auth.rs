//! End-to-end: upstream credentials and the token dance against the real registry with
//! token auth (realm served by the tests' token server) and with htpasswd (Basic).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::http::{self, head};
use common::image::OCI_MANIFEST;
use common::servers::TokenServer;
use common::{
    Ocigate, Registry, htpasswd_auth, simple_config, skopeo_digest, skopeo_ok, skopeo_pull_oci,
};

#[test]
fn token_auth_upstream_pull_and_push_with_configured_credentials() {
    let ts = TokenServer::start(Some(("puller", "pullpass")));
    let (reg, img) = Registry::seeded(|_| ts.registry_auth_yaml());
    assert_eq!(
        head(&format!("{}/v2/team/app/manifests/v1", reg.url()), &[]).status,
        401,
        "the upstream must really demand a token"
    );
    let creds = format!(
        "    credentials:\n      basic: {{username: puller, password: \"${{PULL_PASSWORD}}\"}}\n    allowed_realms: [\"{}\"]\n",
        ts.realm()
    );
    let gw = Ocigate::start_with(
        &simple_config(&reg.url(), "mirror/", "team/", &creds),
        &[("PULL_PASSWORD", "pullpass")],
    );

    assert_eq!(
        skopeo_digest(&format!("{}/mirror/app:v1", gw.host()), &[]),
        img.digest
    );

    // Push through the proxy: streamed bodies need the token before they are sent.
    let dir = skopeo_pull_oci(&format!("{}/mirror/app:v1", gw.host()), &[]);
    skopeo_ok(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:pulled", dir.path().join("out").display()),
        &format!("docker://{}/mirror/pushed:v2", gw.host()),
    ]);

    let requests = ts.requests();
    assert!(!requests.is_empty());
    let expected = "Basic cHVsbGVyOnB1bGxwYXNz";
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.as_deref() == Some(expected)),
        "every token request carries the configured credentials: {requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.query.contains("repository%3Ateam%2Fpushed%3Apull%2Cpush")),
        "push scopes use remote names: {requests:?}"
    );
    // Tokens are cached per scope: far fewer token fetches than requests.
    let metrics = http::get(&format!("{}/metrics", gw.url())).text();
    assert!(
        metrics.contains("ocigate_upstream_token_fetches_total{upstream=\"reg\",result=\"ok\"}"),
        "{metrics}"
    );
    let pushed = reg.count_requests("PUT", "/v2/team/pushed/manifests/v2");
    assert_eq!(
        pushed, 1,
        "the manifest was pushed upstream under team/pushed"
    );
    let logs = gw.logs();
    assert!(
        !logs.contains("pullpass") && !logs.contains("cHVsbGVyOnB1bGxwYXNz"),
        "secrets leaked into logs"
    );
}

#[test]
fn credentials_never_reach_a_realm_that_is_not_allowed() {
    let ts = TokenServer::start(Some(("puller", "pullpass")));
    let (reg, _img) = Registry::seeded(|_| ts.registry_auth_yaml());
    // No allowed_realms: the realm is an IP literal on another port, so it gets no credentials.
    let creds = "    credentials:\n      basic: {username: puller, password: pullpass}\n";
    let gw = Ocigate::start(&simple_config(&reg.url(), "mirror/", "team/", creds));
    let r = head(
        &format!("{}/v2/mirror/app/manifests/v1", gw.url()),
        &[("accept", OCI_MANIFEST)],
    );
    // The upstream's refusal is a plain 403: its challenge (naming its realm) never reaches
    // the client, which would send the credentials it holds for this host there.
    assert_eq!(r.status, 403);
    assert!(r.header("www-authenticate").is_none());
    let requests = ts.requests();
    assert!(!requests.is_empty(), "the realm was asked anonymously");
    assert!(
        requests.iter().all(|r| r.authorization.is_none()),
        "credentials were sent to a realm that is not allowed: {requests:?}"
    );
    assert!(gw.wait_for_log("not in allowed_realms"));
}

#[test]
fn basic_upstream_via_docker_config_credential_helper() {
    let (reg, img) = Registry::seeded(|r| htpasswd_auth(r.dir.path(), "helperuser", "helperpass"));
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let calls = dir.path().join("helper-calls");
    let helper = bin.join("docker-credential-fake");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread server\necho \"$server\" >> {}\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"helperuser\",\"Secret\":\"helperpass\"}}' \"$server\"\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let docker_config = dir.path().join("config.json");
    std::fs::write(
        &docker_config,
        format!(
            r#"{{"auths":{{}},"credHelpers":{{"{}":"fake"}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    let creds = format!(
        "    credentials:\n      docker_config: {}\n",
        docker_config.display()
    );
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let gw = Ocigate::start_with(
        &simple_config(&reg.url(), "mirror/", "team/", &creds),
        &[("PATH", &path)],
    );
    assert_eq!(
        skopeo_digest(&format!("{}/mirror/app:v1", gw.host()), &[]),
        img.digest
    );
    let called = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(called.lines().next(), Some(reg.host().as_str()));
    assert!(!gw.logs().contains("helperpass"));

    // The same helper as the default store (`credsStore`) for every registry.
    std::fs::write(&docker_config, r#"{"auths":{},"credsStore":"fake"}"#).unwrap();
    let gw = Ocigate::start_with(
        &simple_config(&reg.url(), "mirror/", "team/", &creds),
        &[("PATH", &path)],
    );
    assert_eq!(
        skopeo_digest(&format!("{}/mirror/app:v1", gw.host()), &[]),
        img.digest
    );
    assert_eq!(std::fs::read_to_string(&calls).unwrap().lines().count(), 2);
}

#[test]
fn docker_config_identity_token_uses_the_oauth2_refresh_grant() {
    // Basic access is locked to a user nobody has: only the refresh grant gets a token.
    let ts_locked = TokenServer::start_with(Some(("nobody", "x")), Some("refresh-me-123"));
    let (reg, img) = Registry::seeded(|_| ts_locked.registry_auth_yaml());
    let dir = tempfile::tempdir().unwrap();
    let docker_config = dir.path().join("config.json");
    std::fs::write(
        &docker_config,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"","identitytoken":"refresh-me-123"}}}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    let extra = format!(
        "    credentials:\n      docker_config: {}\n    allowed_realms: [\"{}\"]\n",
        docker_config.display(),
        ts_locked.realm()
    );
    let gw = Ocigate::start(&simple_config(&reg.url(), "mirror/", "team/", &extra));
    assert_eq!(
        skopeo_digest(&format!("{}/mirror/app:v1", gw.host()), &[]),
        img.digest
    );
    let posts: Vec<_> = ts_locked
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert!(!posts.is_empty(), "the identity token is exchanged by POST");
    assert!(
        posts
            .iter()
            .all(|r| r.query.contains("grant_type=refresh_token")
                && r.query.contains("refresh_token=refresh-me-123")
                && r.query.contains("service=test-registry"))
    );
    assert!(!gw.logs().contains("refresh-me-123"));
}

#[test]
fn verbatim_header_credentials_and_client_authorization_is_not_forwarded() {
    let (reg, img) = Registry::seeded(|r| htpasswd_auth(r.dir.path(), "hdr", "hdrpass"));
    let valid = "Basic aGRyOmhkcnBhc3M="; // hdr:hdrpass
    let with_header = Ocigate::start(&simple_config(
        &reg.url(),
        "",
        "team/",
        &format!("    credentials:\n      header: \"{valid}\"\n"),
    ));
    let r = head(
        &format!("{}/v2/app/manifests/v1", with_header.url()),
        &[("accept", OCI_MANIFEST)],
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-content-digest").as_deref(),
        Some(img.digest.as_str())
    );

    // Without configured credentials, a client's own (valid!) Authorization stays with us.
    let anonymous = Ocigate::start(&simple_config(&reg.url(), "", "team/", ""));
    let r = head(
        &format!("{}/v2/app/manifests/v1", anonymous.url()),
        &[("accept", OCI_MANIFEST), ("authorization", valid)],
    );
    assert_eq!(
        r.status, 403,
        "the client's Authorization must not be forwarded upstream"
    );
    assert!(
        r.header("www-authenticate").is_none(),
        "the upstream's Basic challenge must not invite the client's credentials"
    );
}

#[test]
fn with_client_auth_an_upstream_refusal_is_our_own_challenge() {
    // The upstream demands tokens the proxy cannot get (no credentials, realm refuses).
    let ts = TokenServer::start(Some(("puller", "pullpass")));
    let (reg, _img) = Registry::seeded(|_| ts.registry_auth_yaml());
    let pki = common::tokens::Pki::new();
    let config = simple_config(
        &reg.url(),
        "mirror/",
        "team/",
        &format!("    allowed_realms: [\"{}\"]\n", ts.realm()),
    ) + &format!(
        "auth:\n  token:\n    realm: https://ocigate.test/token\n    service: {}\n    issuer: {}\n    jwks: {}\n",
        common::tokens::SERVICE,
        common::tokens::ISSUER,
        pki.jwks.display()
    );
    let gw = Ocigate::start(&config);
    let key =
        jsonwebtoken::EncodingKey::from_ec_pem(pki.jwks_key.serialize_pem().as_bytes()).unwrap();
    let token = common::tokens::mint(
        &common::tokens::header_kid(common::tokens::JWKS_KID),
        &common::tokens::claims("mirror/app", &["pull"]),
        &key,
    );
    let r = http::bearer_get(&format!("{}/v2/mirror/app/manifests/v1", gw.url()), &token);
    assert_eq!(r.status, 401);
    assert_eq!(r.error_code(), "DENIED");
    let challenge = r.header("www-authenticate").unwrap();
    assert_eq!(
        challenge,
        "Bearer realm=\"https://ocigate.test/token\",service=\"ocigate.test\",scope=\"repository:mirror/app:pull\",error=\"insufficient_scope\""
    );
    assert!(!challenge.contains(&ts.realm()));
}

#[test]
fn concurrent_cold_requests_share_one_token_fetch() {
    let ts = TokenServer::start(Some(("puller", "pullpass")));
    let (reg, img) = Registry::seeded(|_| ts.registry_auth_yaml());
    let creds = format!(
        "    credentials:\n      basic: {{username: puller, password: pullpass}}\n    allowed_realms: [\"{}\"]\n",
        ts.realm()
    );
    let gw = Ocigate::start(&simple_config(&reg.url(), "mirror/", "team/", &creds));
    let url = format!("{}/v2/mirror/app/manifests/v1", gw.url());
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || head(&url, &[("accept", OCI_MANIFEST)]))
        })
        .collect();
    for c in clients {
        let r = c.join().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("docker-content-digest").as_deref(),
            Some(img.digest.as_str())
        );
    }
    let fetches = ts
        .requests()
        .iter()
        .filter(|r| r.query.contains("repository%3Ateam%2Fapp%3Apull"))
        .count();
    assert_eq!(fetches, 1, "16 concurrent cold requests, one token fetch");
}

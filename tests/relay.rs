//! The PASETO relay end to end: a private upstream (the real registry with token auth, its
//! realm demanding credentials) exposed through relay routes; anonymous real clients pull;
//! relay tokens are sealed, bound to their route, expire, and survive key rotation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::http::{Resp, bearer_get, get, get_with};
use common::image;
use common::servers::TokenServer;
use common::{Ocigate, Podman, Registry, run_ok, skopeo, skopeo_digest};
use ocigate::config::RelayConfig;
use ocigate::relay::{Relay, RelayClaims, unix_now};

const KEY: &str = "796280902778385984e2acd2868447a0ee703a8fab0ed7e69103cd50b9e3cddd";
const OLD_KEY: &str = "0000000000000000000000000000000000000000000000000000000000000001";
const CAPABILITY: &str = "0ebb01be-0a22-4639-898c-bc8c2d20942d/nginx";

struct Setup {
    _reg: Registry,
    ts: TokenServer,
    gw: Ocigate,
    img: image::Image,
}

fn setup() -> Setup {
    let mut reg = Registry::start("");
    let img = image::image(&[("hello", b"private, relayed\n")], "amd64");
    image::push_image(&reg.url(), "team/private", "v1", &img);
    let ts = TokenServer::start(Some(("robot", "s3cret")));
    reg.reconfigure(&ts.registry_auth_yaml());
    let config = format!(
        r#"server:
  listen: "127.0.0.1:0"
upstreams:
  reg:
    url: "{}"
    credentials: {{basic: {{username: robot, password: s3cret}}}}
    allowed_realms: ["{}"]
routes:
  - {{prefix: "priv/", upstream: reg, remote: "team/", relay: true}}
  - {{prefix: "{CAPABILITY}", upstream: reg, remote: "team/private", relay: true}}
relay:
  secret_key: "${{OCIGATE_RELAY_KEY}}"
  previous_keys: ["{OLD_KEY}"]
"#,
        reg.url(),
        ts.realm()
    );
    let gw = Ocigate::start_with(&config, &[("OCIGATE_RELAY_KEY", KEY)]);
    Setup {
        _reg: reg,
        ts,
        gw,
        img,
    }
}

fn relay_token(gw: &Ocigate, query: &str) -> String {
    let r = get(&format!("{}/token?{query}", gw.url()));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["token"], v["access_token"]);
    assert!(v["expires_in"].as_u64().unwrap() > 0);
    v["token"].as_str().unwrap().to_string()
}

fn assert_challenged(r: &Resp, gw: &Ocigate, error: &str, what: &str) {
    assert_challenged_for(r, gw, &gw.host(), error, what);
}

/// `service`: the host clients reach the proxy by, or the token server's service when there
/// is one (it refuses any other).
fn assert_challenged_for(r: &Resp, gw: &Ocigate, service: &str, error: &str, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.text());
    let challenge = r.header("www-authenticate").unwrap();
    assert!(
        challenge.contains(&format!("realm=\"{}/token\"", gw.url())),
        "{what}: {challenge}"
    );
    assert!(
        challenge.contains(&format!("service=\"{service}\"")),
        "{what}: {challenge}"
    );
    assert!(
        challenge.contains(&format!("error=\"{error}\"")),
        "{what}: {challenge}"
    );
}

#[test]
fn anonymous_clients_pull_private_images_through_relay_routes() {
    let s = setup();
    let host = s.gw.host();
    // skopeo: 401 → our realm → sealed token → pull. No credentials on the client.
    assert_eq!(
        skopeo_digest(&format!("{host}/priv/private:v1"), &[]),
        s.img.digest
    );
    assert_eq!(
        skopeo_digest(&format!("{host}/{CAPABILITY}:v1"), &[]),
        s.img.digest
    );
    let podman = Podman::new();
    run_ok(&mut podman.command(&[
        "pull",
        "--tls-verify=false",
        &format!("{host}/priv/private:v1"),
    ]));
    // Only the proxy ever spoke to the upstream realm, with its own credentials.
    assert!(
        s.ts.requests()
            .iter()
            .all(|r| r.authorization.as_deref() == Some("Basic cm9ib3Q6czNjcmV0"))
    );
    // The relay token is a v4.local PASETO; no upstream JWT travels in clear.
    let token = relay_token(&s.gw, "service=x&scope=repository:priv/private:pull");
    assert!(token.starts_with("v4.local."), "{token}");
    for jwt in s.ts.issued() {
        assert!(
            !token.contains(&jwt) && !token.contains(&jwt[..24]),
            "an upstream token leaked"
        );
    }
    assert!(!s.gw.logs().contains(&token), "relay tokens are not logged");
}

#[test]
fn relay_tokens_are_checked_and_refused_with_a_fresh_challenge() {
    let s = setup();
    let manifest = format!("{}/v2/priv/private/manifests/v1", s.gw.url());
    let good = relay_token(&s.gw, "scope=repository:priv/private:pull");
    assert_eq!(bearer_get(&manifest, &good).status, 200);

    // No token at all.
    let r = get_with(
        &manifest,
        &[("accept", "application/vnd.oci.image.manifest.v1+json")],
    );
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("scope=\"repository:priv/private:pull\"")
    );
    // Tampered: one character of the sealed payload changed.
    let mut tampered = good.clone();
    let i = good.len() - 10;
    let c = if &good[i..i + 1] == "A" { "B" } else { "A" };
    tampered.replace_range(i..i + 1, c);
    assert_challenged(
        &bearer_get(&manifest, &tampered),
        &s.gw,
        "invalid_token",
        "tampered",
    );
    // Minted for the capability route, used on priv/: it does not even decrypt there.
    let capability = relay_token(&s.gw, &format!("scope=repository:{CAPABILITY}:pull"));
    assert_eq!(
        bearer_get(
            &format!("{}/v2/{CAPABILITY}/manifests/v1", s.gw.url()),
            &capability
        )
        .status,
        200
    );
    assert_challenged(
        &bearer_get(&manifest, &capability),
        &s.gw,
        "invalid_token",
        "other route",
    );
    // Covers another repository only.
    let other = relay_token(&s.gw, "scope=repository:priv/other:pull");
    assert_challenged(
        &bearer_get(&manifest, &other),
        &s.gw,
        "insufficient_scope",
        "other repository",
    );
    // A raw upstream JWT is no relay token.
    let upstream_jwt = s.ts.issued().last().unwrap().clone();
    assert_challenged(
        &bearer_get(&manifest, &upstream_jwt),
        &s.gw,
        "invalid_token",
        "raw upstream JWT",
    );

    // Tokens sealed outside: expired, wrong key, and the previous (rotated) key, each around
    // a genuine upstream token for team/private.
    let upstream_token = get_with(
        &format!(
            "{}?service={}&scope=repository:team/private:pull",
            s.ts.realm(),
            s.ts.service
        ),
        &[("authorization", "Basic cm9ib3Q6czNjcmV0")],
    )
    .json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let claims = |exp: u64| RelayClaims {
        ut: upstream_token.clone(),
        up: "reg".into(),
        rt: "priv/".into(),
        sc: vec!["repository:priv/private:pull".into()],
        iat: unix_now(),
        exp,
    };
    let sealer = |key: &str| {
        Relay::new(
            &RelayConfig {
                secret_key: hex::decode(key).unwrap(),
                previous_keys: Vec::new(),
            },
            "/token",
        )
        .unwrap()
    };
    let expired = sealer(KEY).seal(&claims(unix_now() - 5)).unwrap();
    assert_challenged(
        &bearer_get(&manifest, &expired),
        &s.gw,
        "invalid_token",
        "expired",
    );
    let foreign = sealer(&"ab".repeat(32))
        .seal(&claims(unix_now() + 60))
        .unwrap();
    assert_challenged(
        &bearer_get(&manifest, &foreign),
        &s.gw,
        "invalid_token",
        "wrong key",
    );
    let rotated = sealer(OLD_KEY).seal(&claims(unix_now() + 60)).unwrap();
    assert_eq!(
        bearer_get(&manifest, &rotated).status,
        200,
        "previous keys still open tokens"
    );
    // Never a 5xx for a bad token.
    for junk in ["v4.local.", "v4.local.AAAA", "v2.local.xyz", "...."] {
        assert_eq!(bearer_get(&manifest, junk).status, 401, "{junk}");
    }
}

#[test]
fn token_endpoint_scopes_and_capability_urls() {
    let s = setup();
    // Several scopes of one route in one request; `docker login` with none.
    let several = relay_token(
        &s.gw,
        "scope=repository:priv/private:pull&scope=repository:priv/other:pull",
    );
    assert_eq!(
        bearer_get(
            &format!("{}/v2/priv/private/manifests/v1", s.gw.url()),
            &several
        )
        .status,
        200
    );
    let login = relay_token(&s.gw, "service=x");
    assert!(login.starts_with("v4.local."));
    let r = get(&format!(
        "{}/token?scope=repository:priv/a:pull&scope=repository:{CAPABILITY}:pull",
        s.gw.url()
    ));
    assert_eq!(r.status, 400, "one token belongs to one route");

    // The capability URL serves its one image and nothing else, and is no oracle: its
    // neighbours answer exactly like names that exist nowhere.
    let nowhere = get(&format!("{}/v2/nothing/here/manifests/v1", s.gw.url()));
    for path in [
        format!("{CAPABILITY}/x"),
        "0ebb01be-0a22-4639-898c-bc8c2d20942d/other".to_string(),
    ] {
        let r = get(&format!("{}/v2/{path}/manifests/v1", s.gw.url()));
        assert_eq!(
            (r.status, r.error_code()),
            (nowhere.status, nowhere.error_code()),
            "{path}"
        );
        assert_eq!(
            r.json()["errors"][0]["message"],
            nowhere.json()["errors"][0]["message"]
        );
    }
    let denied = skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{}/{CAPABILITY}/x:v1", s.gw.host()),
    ]);
    assert!(!denied.status.success());
    let catalog = get(&format!("{}/v2/_catalog", s.gw.url())).text();
    assert!(!catalog.contains("0ebb01be"), "{catalog}");
}

#[test]
fn with_client_auth_the_relay_seals_only_what_the_acl_grants() {
    let mut reg = Registry::start("");
    let img = image::image(&[("hello", b"private, relayed, guarded\n")], "amd64");
    image::push_image(&reg.url(), "team/private", "v1", &img);
    let ts = TokenServer::start(Some(("robot", "s3cret")));
    reg.reconfigure(&ts.registry_auth_yaml());
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["ocigate tokens".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.path().join("token.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("token.crt"), cert.pem()).unwrap();
    let users = format!(
        "alice:{}\nbob:{}\n",
        bcrypt::hash("wonderland", 4).unwrap(),
        bcrypt::hash("builder", 4).unwrap()
    );
    std::fs::write(dir.path().join("htpasswd"), users).unwrap();
    let config = format!(
        r#"server:
  listen: "127.0.0.1:0"
upstreams:
  reg:
    url: "{reg}"
    credentials: {{basic: {{username: robot, password: s3cret}}}}
    allowed_realms: ["{realm}"]
routes:
  - {{prefix: "priv/", upstream: reg, remote: "team/", relay: true}}
auth:
  token: {{service: ocigate.test, issuer: ocigate}}
token_server:
  issuer: ocigate
  signing_key: {dir}/token.key
  certificate: {dir}/token.crt
  users: {{htpasswd: {dir}/htpasswd}}
  acl:
    - {{account: alice, repository: "priv/*", actions: [pull]}}
relay:
  secret_key: "{KEY}"
"#,
        reg = reg.url(),
        realm = ts.realm(),
        dir = dir.path().display()
    );
    let gw = Ocigate::start(&config);
    let reference = format!("{}/priv/private:v1", gw.host());
    assert_eq!(
        skopeo_digest(
            &reference,
            &["--tls-verify=false", "--creds", "alice:wonderland"]
        ),
        img.digest
    );
    for creds in [Some("bob:builder"), Some("alice:wrong"), None] {
        let mut args = vec!["inspect", "--tls-verify=false"];
        if let Some(c) = creds {
            args.extend(["--creds", c]);
        }
        let target = format!("docker://{reference}");
        args.push(&target);
        assert!(
            !skopeo(&args).status.success(),
            "{creds:?} must not read priv/private"
        );
    }
    // alice asks for pull and push: the relay token seals only the pull the ACL grants.
    let r = get_with(
        &format!("{}/token?scope=repository:priv/private:pull,push", gw.url()),
        &[("authorization", "Basic YWxpY2U6d29uZGVybGFuZA==")],
    );
    let token = r.json()["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("v4.local."));
    let manifest = format!("{}/v2/priv/private/manifests/v1", gw.url());
    assert_eq!(bearer_get(&manifest, &token).status, 200);
    let push = common::http::request(
        "POST",
        &format!("{}/v2/priv/private/blobs/uploads/", gw.url()),
        &[("authorization", &format!("Bearer {token}"))],
        Vec::new(),
    );
    // With the token server, challenges name its service: a client that follows one gets a
    // token instead of `400 unknown service` (attack review).
    assert_challenged_for(
        &push,
        &gw,
        "ocigate.test",
        "insufficient_scope",
        "push beyond the ACL",
    );
    // bob's relay token covers nothing.
    let r = get_with(
        &format!("{}/token?scope=repository:priv/private:pull", gw.url()),
        &[("authorization", "Basic Ym9iOmJ1aWxkZXI=")],
    );
    let bobs = r.json()["token"].as_str().unwrap().to_string();
    assert_challenged_for(
        &bearer_get(&manifest, &bobs),
        &gw,
        "ocigate.test",
        "insufficient_scope",
        "bob",
    );
    let followed = get_with(
        &format!(
            "{}/token?service=ocigate.test&scope=repository:priv/private:pull",
            gw.url()
        ),
        &[("authorization", "Basic YWxpY2U6d29uZGVybGFuZA==")],
    );
    assert_eq!(followed.status, 200, "{}", followed.text());
}

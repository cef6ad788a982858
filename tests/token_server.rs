//! The built-in token server end to end: password and OIDC logins from real clients
//! (skopeo, podman), tokens accepted by ocigate itself and by the real `docker-registry`,
//! the OAuth2 and refresh-token protocol, and `ocigate token`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use base64::Engine as _;
use common::http::{Resp, bearer_get, get_with, request};
use common::image;
use common::servers::IdentityProvider;
use common::tokens::TokenServerFiles as Keys;
use common::{
    Ocigate, Podman, Registry, run_ok, skopeo, skopeo_digest, skopeo_ok, skopeo_pull_oci,
};
use serde_json::json;

const SERVICE: &str = "ocigate.test";
const ISSUER: &str = "https://ocigate.test";
const USERS: &[(&str, &str)] = &[("alice", "wonderland"), ("bob", "builder")];

fn config(upstream: &str, keys: &Keys, idp: Option<&IdentityProvider>) -> String {
    let oidc = idp
        .map(|i| {
            format!(
                "  oidc:\n    - {{name: ci, issuer: \"{}\", audience: {SERVICE}}}\n",
                i.issuer()
            )
        })
        .unwrap_or_default();
    format!(
        r#"server:
  listen: "127.0.0.1:0"
upstreams:
  reg: {{url: "{upstream}"}}
routes:
  - {{prefix: "", upstream: reg}}
auth:
  token:
    service: {SERVICE}
    issuer: {ISSUER}
token_server:
  path: /auth/token
  issuer: {ISSUER}
  signing_key: {key}
  certificate: {cert}
  lifetime: 5m
  users: {{htpasswd: {htpasswd}}}
{oidc}  acl:
    - {{account: alice, repository: "*", actions: [pull, push]}}
    - {{account: bob, repository: "public/*", actions: [pull]}}
    - {{account: anonymous, repository: "public/*", actions: [pull]}}
    - {{account: "ci:*", claims: {{repository_owner: myorg}}, repository: "myorg/${{claims.repository_name}}", actions: [pull, push]}}
"#,
        key = keys.path("token.key"),
        cert = keys.path("token.crt"),
        htpasswd = keys.path("htpasswd"),
    )
}

/// The `access` claim of a token (payload decoded without verification: tests only).
fn access_of(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["access"].clone()
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

fn token_get(gw: &Ocigate, query: &str, auth: Option<&str>) -> Resp {
    let mut headers = Vec::new();
    if let Some(a) = auth {
        headers.push(("authorization", a));
    }
    get_with(&format!("{}/auth/token?{query}", gw.url()), &headers)
}

fn token_post(gw: &Ocigate, form: &str) -> Resp {
    request(
        "POST",
        &format!("{}/auth/token", gw.url()),
        &[("content-type", "application/x-www-form-urlencoded")],
        form.to_string(),
    )
}

#[test]
fn password_logins_push_and_pull_through_the_proxy() {
    let reg = Registry::start("");
    let img = image::image(&[("hello", b"public bytes\n")], "amd64");
    image::push_image(&reg.url(), "public/app", "v1", &img);
    let keys = Keys::new(USERS);
    let gw = Ocigate::start(&config(&reg.url(), &keys, None));
    let host = gw.host();

    // alice pushes through the proxy (skopeo logs in at our /auth/token, found via the
    // challenge, which names token_server.path).
    let challenge = common::http::get(&format!("{}/v2/", gw.url()));
    assert_eq!(
        challenge.header("www-authenticate").unwrap(),
        format!(
            "Bearer realm=\"{}/auth/token\",service=\"{SERVICE}\"",
            gw.url()
        )
    );
    let layout = skopeo_pull_oci(&format!("{}/public/app:v1", reg.host()), &[]);
    skopeo_ok(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        "--dest-creds",
        "alice:wonderland",
        &format!("oci:{}:pulled", layout.path().join("out").display()),
        &format!("docker://{host}/alice/app:v1"),
    ]);
    assert_eq!(
        skopeo_digest(&format!("{}/alice/app:v1", reg.host()), &[]),
        img.digest
    );
    assert_eq!(
        skopeo_digest(
            &format!("{host}/alice/app:v1"),
            &["--tls-verify=false", "--creds", "alice:wonderland"]
        ),
        img.digest
    );
    // bob may only pull public/*; anonymous too; nobody else gets in.
    let bob_push = skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        "--dest-creds",
        "bob:builder",
        &format!("oci:{}:pulled", layout.path().join("out").display()),
        &format!("docker://{host}/bob/app:v1"),
    ]);
    assert!(!bob_push.status.success(), "bob has no push anywhere");
    assert_eq!(
        skopeo_digest(&format!("{host}/public/app:v1"), &["--tls-verify=false"]),
        img.digest
    );
    let private = skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{host}/alice/app:v1"),
    ]);
    assert!(
        !private.status.success(),
        "anonymous clients cannot read alice/app"
    );
    let wrong = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        "alice:queen",
        &format!("docker://{host}/public/app:v1"),
    ]);
    assert!(
        !wrong.status.success(),
        "a wrong password is refused even for public images"
    );

    // podman: login (a token request with no scope), then pull.
    let podman = Podman::new();
    run_ok(&mut podman.command(&[
        "login",
        "--tls-verify=false",
        "-u",
        "alice",
        "-p",
        "wonderland",
        &host,
    ]));
    run_ok(&mut podman.command(&[
        "pull",
        "--tls-verify=false",
        &format!("{host}/alice/app:v1"),
    ]));
    let out = run_ok(&mut podman.command(&[
        "image",
        "inspect",
        "--format",
        "{{.Digest}}",
        &format!("{host}/alice/app:v1"),
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), img.digest);
    assert!(gw.wait_for_log("\"account\":\"alice\""));
    let logs = gw.logs();
    assert!(!logs.contains("wonderland"));
}

#[test]
fn the_real_registry_accepts_our_tokens() {
    let keys = Keys::new(USERS);
    // ocigate is only the token server here; the registry behind the route is irrelevant.
    let other = Registry::start("");
    let gw = Ocigate::start(&config(&other.url(), &keys, None));
    let mut reg = Registry::start("");
    let img = image::image(&[("hello", b"guarded by ocigate tokens\n")], "amd64");
    image::push_image(&reg.url(), "alice/app", "v1", &img);
    reg.reconfigure(&format!(
        "auth:\n  token:\n    realm: {}/auth/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
        gw.url(),
        keys.path("token.crt")
    ));
    assert_eq!(
        skopeo_digest(
            &format!("{}/alice/app:v1", reg.host()),
            &["--tls-verify=false", "--creds", "alice:wonderland"]
        ),
        img.digest
    );
    let anonymous = skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{}/alice/app:v1", reg.host()),
    ]);
    assert!(!anonymous.status.success());
    // A token printed by `ocigate token` works on the registry too.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ocigate.yaml");
    std::fs::write(&cfg, config(&other.url(), &keys, None)).unwrap();
    let out = run_ok(Command::new(Ocigate::bin()).args([
        "token",
        "--config",
        &cfg.display().to_string(),
        "--account",
        "alice",
        "--scope",
        "repository:alice/app:pull",
    ]));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        access_of(&token),
        json!([{"type": "repository", "name": "alice/app", "actions": ["pull"]}])
    );
    let r = bearer_get(&format!("{}/v2/alice/app/manifests/v1", reg.url()), &token);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn token_endpoint_protocol() {
    let reg = Registry::start("");
    let keys = Keys::new(USERS);
    let gw = Ocigate::start(&config(&reg.url(), &keys, None));
    let alice = basic("alice", "wonderland");

    // `docker login`: no scope, valid credentials → a token with no access.
    let r = token_get(&gw, &format!("service={SERVICE}"), Some(&alice));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["token"], v["access_token"]);
    assert_eq!(v["expires_in"], 300);
    assert!(v["issued_at"].as_str().unwrap().ends_with('Z'));
    assert!(v.get("refresh_token").is_none());
    assert_eq!(access_of(v["token"].as_str().unwrap()), json!([]));

    // Grant = asked ∩ allowed, over several scopes.
    let r = token_get(
        &gw,
        &format!(
            "service={SERVICE}&scope=repository:team/app:pull,push,delete&scope=repository:public/x:pull"
        ),
        Some(&alice),
    );
    let access = access_of(r.json()["token"].as_str().unwrap());
    assert_eq!(
        access,
        json!([
            {"type": "repository", "name": "team/app", "actions": ["pull", "push"]},
            {"type": "repository", "name": "public/x", "actions": ["pull"]},
        ])
    );
    let r = token_get(
        &gw,
        "scope=repository:team/app:pull,push",
        Some(&basic("bob", "builder")),
    );
    assert_eq!(access_of(r.json()["token"].as_str().unwrap()), json!([]));
    let r = token_get(&gw, "scope=repository:public/x:pull,push", None);
    assert_eq!(
        access_of(r.json()["token"].as_str().unwrap()),
        json!([{"type": "repository", "name": "public/x", "actions": ["pull"]}])
    );

    // Wrong credentials: 401, a Basic challenge, and a body that says why.
    let r = token_get(
        &gw,
        "scope=repository:public/x:pull",
        Some(&basic("alice", "queen")),
    );
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Basic "));
    assert_eq!(r.error_code(), "UNAUTHORIZED");
    assert!(r.text().contains("invalid username or password"));
    assert_eq!(
        token_get(&gw, "service=elsewhere", Some(&alice)).status,
        400
    );

    // offline_token → refresh_token; the OAuth2 refresh grant trades it for a new token.
    let r = token_get(
        &gw,
        &format!("service={SERVICE}&offline_token=true&client_id=test"),
        Some(&alice),
    );
    let refresh = r.json()["refresh_token"].as_str().unwrap().to_string();
    let form = format!(
        "grant_type=refresh_token&refresh_token={refresh}&service={SERVICE}&client_id=test&scope=repository:team/app:pull"
    );
    let r = token_post(&gw, &form);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        access_of(r.json()["access_token"].as_str().unwrap()),
        json!([{"type": "repository", "name": "team/app", "actions": ["pull"]}])
    );
    assert_eq!(
        r.json()["refresh_token"].as_str(),
        Some(refresh.as_str()),
        "a refresh grant hands back the same refresh token: logins do not renew themselves"
    );
    // A refresh token is no access token.
    let r = request(
        "GET",
        &format!("{}/v2/", gw.url()),
        &[("authorization", &format!("Bearer {refresh}"))],
        Vec::new(),
    );
    assert_eq!(r.status, 401);
    let form = format!(
        "grant_type=refresh_token&refresh_token={}x&service={SERVICE}",
        &refresh[..refresh.len() - 1]
    );
    let r = token_post(&gw, &form);
    assert_eq!(r.status, 401);

    // The OAuth2 password grant (containerd's first try).
    let form = format!(
        "grant_type=password&username=alice&password=wonderland&service={SERVICE}&client_id=containerd&scope=repository:a/b:pull repository:c/d:push"
    );
    let r = token_post(&gw, &form);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(v["refresh_token"].is_string());
    assert_eq!(
        access_of(v["access_token"].as_str().unwrap()),
        json!([{"type": "repository", "name": "a/b", "actions": ["pull"]}, {"type": "repository", "name": "c/d", "actions": ["push"]}])
    );
    let metrics = common::http::get(&format!("{}/metrics", gw.url())).text();
    assert!(
        metrics.contains("ocigate_tokens_issued_total{result=\"refused\"}"),
        "{metrics}"
    );
}

#[test]
fn oidc_identities_from_ci_jobs() {
    let reg = Registry::start("");
    let img = image::image(&[("hello", b"built by CI\n")], "amd64");
    image::push_image(&reg.url(), "staging/tool", "v1", &img);
    let idp = IdentityProvider::start();
    let keys = Keys::new(USERS);
    let gw = Ocigate::start(&config(&reg.url(), &keys, Some(&idp)));
    let now = common::tokens::now();
    let ci_claims = |aud: &str, exp: i64, owner: &str| {
        json!({
            "iss": idp.issuer(), "aud": aud, "sub": "repo:myorg/tool:ref:refs/heads/main",
            "exp": exp, "iat": now, "nbf": now - 5,
            "repository_owner": owner, "repository_name": "tool", "run_id": 1234,
        })
    };
    let job = idp.mint(&ci_claims(SERVICE, now + 600, "myorg"));
    let creds = format!("ci:{job}");
    let layout = skopeo_pull_oci(&format!("{}/staging/tool:v1", reg.host()), &[]);
    let source = format!("oci:{}:pulled", layout.path().join("out").display());
    skopeo_ok(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        "--dest-creds",
        &creds,
        &source,
        &format!("docker://{}/myorg/tool:v1", gw.host()),
    ]);
    assert_eq!(
        skopeo_digest(&format!("{}/myorg/tool:v1", reg.host()), &[]),
        img.digest
    );
    assert!(gw.wait_for_log("\"account\":\"ci:repo:myorg/tool:ref:refs/heads/main\""));

    // Claims decide: another owner's job, or another repository, gets nothing.
    let foreign = idp.mint(&ci_claims(SERVICE, now + 600, "evil"));
    let r = token_get(
        &gw,
        "scope=repository:myorg/tool:pull,push",
        Some(&basic("ci", &foreign)),
    );
    assert_eq!(r.status, 200);
    assert_eq!(access_of(r.json()["token"].as_str().unwrap()), json!([]));
    let r = token_get(
        &gw,
        "scope=repository:myorg/other:pull,push",
        Some(&basic("ci", &job)),
    );
    assert_eq!(access_of(r.json()["token"].as_str().unwrap()), json!([]));

    // iss, aud and exp are required.
    for (name, bad) in [
        (
            "wrong audience",
            idp.mint(&ci_claims("someone-else", now + 600, "myorg")),
        ),
        (
            "expired",
            idp.mint(&ci_claims(SERVICE, now - 3600, "myorg")),
        ),
        (
            "no exp",
            idp.mint(&{
                let mut c = ci_claims(SERVICE, now + 600, "myorg");
                c.as_object_mut().unwrap().remove("exp");
                c
            }),
        ),
        (
            "wrong issuer",
            idp.mint(&{
                let mut c = ci_claims(SERVICE, now + 600, "myorg");
                c["iss"] = json!("https://evil.example");
                c
            }),
        ),
    ] {
        let r = token_get(
            &gw,
            "scope=repository:myorg/tool:pull",
            Some(&basic("ci", &bad)),
        );
        assert_eq!(r.status, 401, "{name}: {}", r.text());
        assert!(r.text().contains("invalid identity token"), "{name}");
    }
    let denied = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        &format!(
            "ci:{}",
            idp.mint(&ci_claims("someone-else", now + 600, "myorg"))
        ),
        &format!("docker://{}/myorg/tool:v1", gw.host()),
    ]);
    assert!(!denied.status.success());

    // A rotated key (unknown kid) makes ocigate refetch the JWKS.
    idp.rotate();
    let rotated = idp.mint(&ci_claims(SERVICE, now + 600, "myorg"));
    let r = token_get(
        &gw,
        "scope=repository:myorg/tool:pull",
        Some(&basic("ci", &rotated)),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        access_of(r.json()["token"].as_str().unwrap()),
        json!([{"type": "repository", "name": "myorg/tool", "actions": ["pull"]}])
    );
    assert!(!gw.logs().contains(&job));
}

/// The `exp` of a token (payload decoded without verification: tests only).
fn exp_of(token: &str) -> i64 {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["exp"]
        .as_i64()
        .unwrap()
}

/// A short-lived identity token never becomes a long login unless its provider says
/// `refresh: true`, and a password account's refresh token dies when the password is set
/// again.
#[test]
fn refresh_tokens_never_outlive_their_login() {
    let reg = Registry::start("");
    let idp = IdentityProvider::start();
    let keys = Keys::new(USERS);
    let yaml = config(&reg.url(), &keys, Some(&idp)).replace(
        "  oidc:\n",
        &format!(
            "  oidc:\n    - {{name: long, issuer: \"{}\", audience: {SERVICE}, refresh: true}}\n",
            idp.issuer()
        ),
    );
    let gw = Ocigate::start(&yaml);
    let now = common::tokens::now();
    let job = idp.mint(&json!({
        "iss": idp.issuer(), "aud": SERVICE, "sub": "job-1",
        "exp": now + 120, "iat": now, "repository_owner": "myorg",
    }));
    let offline = format!("service={SERVICE}&offline_token=true&client_id=ci");
    let refresh_of = |provider: &str| {
        let r = token_get(&gw, &offline, Some(&basic(provider, &job)));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["refresh_token"].as_str().unwrap().to_string()
    };
    let short = refresh_of("ci");
    assert!(
        exp_of(&short) <= now + 120,
        "no longer than the identity token"
    );
    let long = refresh_of("long");
    assert!(
        exp_of(&long) > now + 29 * 86400,
        "refresh: true keeps refresh_lifetime"
    );

    // alice logs in offline, then her password is set again (same password, new hash).
    let r = token_get(&gw, &offline, Some(&basic("alice", "wonderland")));
    let alices = r.json()["refresh_token"].as_str().unwrap().to_string();
    let refresh_grant = |gw: &Ocigate| {
        token_post(
            gw,
            &format!("grant_type=refresh_token&refresh_token={alices}&service={SERVICE}"),
        )
    };
    assert_eq!(refresh_grant(&gw).status, 200);
    drop(gw);
    let htpasswd = std::fs::read_to_string(keys.path("htpasswd")).unwrap();
    let rehashed: String = htpasswd
        .lines()
        .map(|l| match l.split_once(':') {
            Some(("alice", _)) => format!("alice:{}\n", bcrypt::hash("wonderland", 4).unwrap()),
            _ => format!("{l}\n"),
        })
        .collect();
    std::fs::write(keys.path("htpasswd"), rehashed).unwrap();
    let gw = Ocigate::start(&yaml);
    let r = refresh_grant(&gw);
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.text().contains("password changed"), "{}", r.text());
    let r = token_get(&gw, &offline, Some(&basic("alice", "wonderland")));
    assert_eq!(r.status, 200, "the new password logs in");
}

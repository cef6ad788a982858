//! Client authentication (distribution token auth) end to end, through the real binary in
//! front of the real registry: the accepted token forms, a table of hostile and broken
//! tokens each answered 401 with the right challenge, and a real client (skopeo) logging in
//! at a token realm.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::http::{Resp, bearer_get, request};
use common::image::{self, OCI_MANIFEST};
use common::servers::TokenServer;
use common::tokens::{
    self, ISSUER, JWKS_KID, Pki, SERVICE, claims, header_kid, header_x5c, mint, now, raw_token,
};
use common::{Ocigate, Registry, simple_config, skopeo, skopeo_digest};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const REALM: &str = "https://auth.test/token";

fn auth_yaml(pki: &Pki, extra: &str) -> String {
    format!(
        "auth:\n  token:\n    realm: {REALM}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n    jwks: {}\n{extra}",
        pki.bundle.display(),
        pki.jwks.display()
    )
}

struct Setup {
    _reg: Registry,
    gw: Ocigate,
    pki: Pki,
    img: image::Image,
}

fn setup(extra_auth: &str) -> Setup {
    let reg = Registry::start("");
    let img = image::image(&[("hello", b"guarded\n")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let pki = Pki::new();
    let config = simple_config(&reg.url(), "mirror/", "team/", "") + &auth_yaml(&pki, extra_auth);
    let gw = Ocigate::start(&config);
    Setup {
        _reg: reg,
        gw,
        pki,
        img,
    }
}

fn call(gw: &Ocigate, method: &str, path: &str, token: Option<&str>) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("accept", OCI_MANIFEST)];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    request(method, &format!("{}{path}", gw.url()), &headers, Vec::new())
}

const MANIFEST: &str = "/v2/mirror/app/manifests/v1";

/// A hostile case: name, method, path, token, expected `error` param, expected `scope` param.
type Case<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Option<String>,
    Option<&'a str>,
    &'a str,
);

#[test]
fn accepted_token_forms() {
    let s = setup("");
    let pki = &s.pki;
    let pull = claims("mirror/app", &["pull"]);
    let libtrust_kid = ocigate::auth::keys::libtrust_fingerprint(&pki.ca.spki_der());
    let jwk = serde_json::from_value::<jsonwebtoken::jwk::Jwk>(tokens::jwk_of(&pki.ca.key, None))
        .unwrap();
    let thumbprint = jwk
        .thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
        .unwrap();
    let mut jwk_header = Header::new(Algorithm::ES256);
    jwk_header.jwk = Some(jwk);
    let jwks_key = EncodingKey::from_ec_pem(pki.jwks_key.serialize_pem().as_bytes()).unwrap();
    let mut aud_list = pull.clone();
    aud_list["aud"] = json!(["other", SERVICE]);
    let mut no_nbf = pull.clone();
    no_nbf.as_object_mut().unwrap().remove("nbf");
    let cases = [
        (
            "x5c leaf + CA",
            mint(
                &header_x5c(&[&pki.leaf, &pki.ca]),
                &pull,
                &pki.leaf.encoding(),
            ),
        ),
        (
            "x5c leaf only",
            mint(&header_x5c(&[&pki.leaf]), &pull, &pki.leaf.encoding()),
        ),
        (
            // `openssl req -x509` style: a self-signed CA:TRUE certificate that is the bundle.
            "x5c of the bundle's own CA:TRUE certificate",
            mint(&header_x5c(&[&pki.ca]), &pull, &pki.ca.encoding()),
        ),
        (
            "kid = libtrust fingerprint",
            mint(&header_kid(&libtrust_kid), &pull, &pki.ca.encoding()),
        ),
        (
            "kid = RFC 7638 thumbprint",
            mint(&header_kid(&thumbprint), &pull, &pki.ca.encoding()),
        ),
        (
            "jwk header of a trusted key",
            mint(&jwk_header, &pull, &pki.ca.encoding()),
        ),
        (
            "JWKS key by kid",
            mint(&header_kid(JWKS_KID), &pull, &jwks_key),
        ),
        (
            "aud as a list",
            mint(&header_kid(JWKS_KID), &aud_list, &jwks_key),
        ),
        ("no nbf", mint(&header_kid(JWKS_KID), &no_nbf, &jwks_key)),
    ];
    for (name, token) in &cases {
        let r = call(&s.gw, "GET", MANIFEST, Some(token));
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_eq!(&r.body[..], &s.img.manifest[..], "{name}");
    }
    // The version check answers 200 to any valid token; push and catalog need their grants.
    let token = &cases[0].1;
    assert_eq!(call(&s.gw, "GET", "/v2/", Some(token)).status, 200);
    let push = mint(
        &header_kid(JWKS_KID),
        &claims("mirror/app", &["pull", "push"]),
        &jwks_key,
    );
    assert_eq!(
        call(&s.gw, "POST", "/v2/mirror/app/blobs/uploads/", Some(&push)).status,
        202
    );
    let mut catalog = claims("catalog", &["*"]);
    catalog["access"][0]["type"] = json!("registry");
    let catalog = mint(&header_kid(JWKS_KID), &catalog, &jwks_key);
    let r = call(&s.gw, "GET", "/v2/_catalog", Some(&catalog));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["repositories"], json!(["mirror/app"]));
    // The subject is logged, the token is not.
    assert!(s.gw.wait_for_log("\"subject\":\"tester\""));
    assert!(!s.gw.logs().contains(token.as_str()));
}

#[test]
fn hostile_and_broken_tokens_get_401_with_the_right_challenge() {
    let s = setup("");
    let pki = &s.pki;
    let jwks_key = EncodingKey::from_ec_pem(pki.jwks_key.serialize_pem().as_bytes()).unwrap();
    let good = |c: &serde_json::Value| mint(&header_kid(JWKS_KID), c, &jwks_key);
    let with = |k: &str, v: serde_json::Value| {
        let mut c = claims("mirror/app", &["pull"]);
        c[k] = v;
        c
    };
    let pull = claims("mirror/app", &["pull"]);
    let valid = good(&pull);
    let mut parts: Vec<&str> = valid.split('.').collect();
    let sig = parts[2].to_string();
    let truncated_sig = &sig[..sig.len() - 10];
    parts[2] = truncated_sig;
    let truncated = parts.join(".");
    let tampered = {
        let (_, rest) = valid.split_once('.').unwrap();
        let (_, signature) = rest.split_once('.').unwrap();
        let forged = raw_token(
            &json!({"alg": "ES256", "kid": JWKS_KID}),
            &claims("mirror/app", &["pull", "push", "delete"]),
            b"",
        );
        let mut p: Vec<&str> = forged.split('.').collect();
        p[2] = signature;
        p.join(".")
    };
    let mut forged_jwk = Header::new(Algorithm::ES256);
    forged_jwk.jwk = Some(serde_json::from_value(tokens::jwk_of(&pki.stranger.key, None)).unwrap());
    let public_pem = pki.jwks_key.public_key_pem();
    let hs256_confusion = mint(
        &{
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some(JWKS_KID.into());
            h
        },
        &pull,
        &EncodingKey::from_secret(public_pem.as_bytes()),
    );
    let mut rs256_claim = Header::new(Algorithm::RS256);
    rs256_claim.kid = Some(JWKS_KID.into());
    let wrong_alg_for_key = {
        // An RS256 header over an EC signature: the algorithm does not fit the key type.
        let t = good(&pull);
        let (_, rest) = t.split_once('.').unwrap();
        let h = serde_json::to_vec(&rs256_claim).unwrap();
        format!(
            "{}.{rest}",
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, h)
        )
    };
    let mut no_exp = pull.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut no_access = pull.clone();
    no_access.as_object_mut().unwrap().remove("access");
    let mut catalog_pull = pull.clone();
    catalog_pull["access"] =
        json!([{ "type": "registry", "name": "catalog", "actions": ["pull"] }]);

    let none = "invalid"; // shorthand for the error param expected
    let cases: Vec<Case> = vec![
        // (name, method, path, token, error param, scope param)
        (
            "no token",
            "GET",
            MANIFEST,
            None,
            None,
            "repository:mirror/app:pull",
        ),
        (
            "not a JWT",
            "GET",
            MANIFEST,
            Some("abc".into()),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "two parts",
            "GET",
            MANIFEST,
            Some("a.b".into()),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "alg none",
            "GET",
            MANIFEST,
            Some(raw_token(
                &json!({"alg": "none", "kid": JWKS_KID}),
                &pull,
                b"",
            )),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "HS256 keyed with the public key",
            "GET",
            MANIFEST,
            Some(hs256_confusion),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "unknown kid",
            "GET",
            MANIFEST,
            Some(mint(&header_kid("nobody"), &pull, &jwks_key)),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "trusted kid, other key's signature",
            "GET",
            MANIFEST,
            Some(mint(&header_kid(JWKS_KID), &pull, &pki.stranger.encoding())),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "x5c not chaining to the bundle",
            "GET",
            MANIFEST,
            Some(mint(
                &header_x5c(&[&pki.stranger]),
                &pull,
                &pki.stranger.encoding(),
            )),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "x5c of the CA, signed by another key",
            "GET",
            MANIFEST,
            Some(mint(
                &header_x5c(&[&pki.leaf, &pki.ca]),
                &pull,
                &pki.stranger.encoding(),
            )),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "forged jwk header",
            "GET",
            MANIFEST,
            Some(mint(&forged_jwk, &pull, &pki.stranger.encoding())),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "RS256 header on an EC key",
            "GET",
            MANIFEST,
            Some(wrong_alg_for_key),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "wrong iss",
            "GET",
            MANIFEST,
            Some(good(&with("iss", json!("https://evil.test")))),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "iss differs in case",
            "GET",
            MANIFEST,
            Some(good(&with("iss", json!(ISSUER.to_uppercase())))),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "wrong aud",
            "GET",
            MANIFEST,
            Some(good(&with("aud", json!("other.service")))),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "aud list without us",
            "GET",
            MANIFEST,
            Some(good(&with("aud", json!(["a", "b"])))),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "expired an hour ago",
            "GET",
            MANIFEST,
            Some(good(&with("exp", json!(now() - 3600)))),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "expired 61 s ago (past the leeway)",
            "GET",
            MANIFEST,
            Some(good(&with("exp", json!(now() - 61)))),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "nbf an hour ahead",
            "GET",
            MANIFEST,
            Some(good(&with("nbf", json!(now() + 3600)))),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "no exp",
            "GET",
            MANIFEST,
            Some(good(&no_exp)),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "truncated signature",
            "GET",
            MANIFEST,
            Some(truncated),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "claims changed after signing",
            "GET",
            MANIFEST,
            Some(tampered),
            Some(none),
            "repository:mirror/app:pull",
        ),
        (
            "missing access",
            "GET",
            MANIFEST,
            Some(good(&no_access)),
            Some("insufficient_scope"),
            "repository:mirror/app:pull",
        ),
        (
            "other repository",
            "GET",
            MANIFEST,
            Some(good(&claims("mirror/other", &["pull", "push"]))),
            Some("insufficient_scope"),
            "repository:mirror/app:pull",
        ),
        (
            "pull token used to push",
            "POST",
            "/v2/mirror/app/blobs/uploads/",
            Some(good(&pull)),
            Some("insufficient_scope"),
            "repository:mirror/app:pull,push",
        ),
        (
            "push token used to delete",
            "DELETE",
            MANIFEST,
            Some(good(&claims("mirror/app", &["pull", "push"]))),
            Some("insufficient_scope"),
            "repository:mirror/app:delete",
        ),
        (
            "mount without pull on from",
            "POST",
            "/v2/mirror/app/blobs/uploads/?mount=sha256:0000000000000000000000000000000000000000000000000000000000000000&from=mirror/secret",
            Some(good(&claims("mirror/app", &["pull", "push"]))),
            Some("insufficient_scope"),
            "repository:mirror/app:pull,push repository:mirror/secret:pull",
        ),
        (
            "catalog without registry:catalog:*",
            "GET",
            "/v2/_catalog",
            Some(good(&catalog_pull)),
            Some("insufficient_scope"),
            "registry:catalog:*",
        ),
    ];
    assert!(cases.len() >= 20);
    for (name, method, path, token, error, scope) in &cases {
        let r = call(&s.gw, method, path, token.as_deref());
        assert_eq!(r.status, 401, "{name}: {}", r.text());
        let challenge = r
            .header("www-authenticate")
            .unwrap_or_else(|| panic!("{name}: no challenge"));
        assert!(challenge.starts_with("Bearer "), "{name}: {challenge}");
        assert!(
            challenge.contains(&format!("realm=\"{REALM}\"")),
            "{name}: {challenge}"
        );
        assert!(
            challenge.contains(&format!("service=\"{SERVICE}\"")),
            "{name}: {challenge}"
        );
        assert!(
            challenge.contains(&format!("scope=\"{scope}\"")),
            "{name}: {challenge}"
        );
        match error {
            None => assert!(!challenge.contains("error="), "{name}: {challenge}"),
            Some("insufficient_scope") => {
                assert!(
                    challenge.contains("error=\"insufficient_scope\""),
                    "{name}: {challenge}"
                );
                assert_eq!(r.error_code(), "DENIED", "{name}");
            }
            Some(_) => {
                assert!(
                    challenge.contains("error=\"invalid_token\""),
                    "{name}: {challenge}"
                );
                assert_eq!(r.error_code(), "UNAUTHORIZED", "{name}");
            }
        }
    }
    // The leeway edge from the other side: 59 s past exp is still accepted.
    let r = call(
        &s.gw,
        "GET",
        MANIFEST,
        Some(&good(&with("exp", json!(now() - 59)))),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // `/v2/` without a token is a challenge with no scope, so clients find the realm.
    let r = call(&s.gw, "GET", "/v2/", None);
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate").unwrap(),
        format!("Bearer realm=\"{REALM}\",service=\"{SERVICE}\"")
    );
    // Nothing reached the upstream for a refused request: the manifest was never deleted.
    assert_eq!(call(&s.gw, "GET", MANIFEST, Some(&valid)).status, 200);
}

#[test]
fn algorithm_allowlist_and_anonymous_pull() {
    let s = setup("    signingalgorithms: [ES384]\n  anonymous: [pull]\n");
    let jwks_key = EncodingKey::from_ec_pem(s.pki.jwks_key.serialize_pem().as_bytes()).unwrap();
    // A perfectly good ES256 token is refused when only ES384 is allowed…
    let push = mint(
        &header_kid(JWKS_KID),
        &claims("mirror/app", &["pull", "push"]),
        &jwks_key,
    );
    let r = call(&s.gw, "POST", "/v2/mirror/app/blobs/uploads/", Some(&push));
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("error=\"invalid_token\"")
    );
    // …while pulls need no token at all, and pushes without one are challenged.
    assert_eq!(call(&s.gw, "GET", MANIFEST, None).status, 200);
    let r = call(&s.gw, "POST", "/v2/mirror/app/blobs/uploads/", None);
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("scope=\"repository:mirror/app:pull,push\"")
    );
}

#[test]
fn skopeo_logs_in_at_the_realm_and_pulls_through_the_guard() {
    let reg = Registry::start("");
    let img = image::image(&[("hello", b"for authenticated clients\n")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let ts = TokenServer::start(Some(("alice", "wonderland")));
    let config = simple_config(&reg.url(), "mirror/", "team/", "")
        + &format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            ts.realm(),
            ts.service,
            ts.issuer,
            ts.cert_path.display()
        );
    let gw = Ocigate::start(&config);
    let reference = format!("{}/mirror/app:v1", gw.host());
    assert_eq!(
        skopeo_digest(
            &reference,
            &["--tls-verify=false", "--creds", "alice:wonderland"]
        ),
        img.digest
    );
    let denied = skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]);
    assert!(
        !denied.status.success(),
        "anonymous clients must be refused"
    );
    let wrong = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        "alice:guess",
        &format!("docker://{reference}"),
    ]);
    assert!(!wrong.status.success());
    // The client asked the realm for the local name.
    assert!(
        ts.requests()
            .iter()
            .any(|r| r.query.contains("repository%3Amirror%2Fapp%3Apull"))
    );
}

#[test]
fn a_libtrust_kid_is_the_one_distribution_computes() {
    // The real registry, trusting the CA bundle, accepts a token that names its key only by
    // our libtrust fingerprint: proof the fingerprint matches distribution's.
    let pki = Pki::new();
    let mut reg = Registry::start("");
    let img = image::image(&[("f", b"kid")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    reg.reconfigure(&format!(
        "auth:\n  token:\n    realm: {REALM}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
        pki.bundle.display()
    ));
    let kid = ocigate::auth::keys::libtrust_fingerprint(&pki.ca.spki_der());
    let token = mint(
        &header_kid(&kid),
        &claims("team/app", &["pull"]),
        &pki.ca.encoding(),
    );
    let r = bearer_get(&format!("{}/v2/team/app/manifests/v1", reg.url()), &token);
    assert_eq!(r.status, 200, "{}", r.text());
    let wrong = mint(
        &header_kid("AAAA:BBBB:CCCC:DDDD:EEEE:FFFF:GGGG:HHHH:IIII:JJJJ:KKKK:LLLL"),
        &claims("team/app", &["pull"]),
        &pki.ca.encoding(),
    );
    let r = bearer_get(&format!("{}/v2/team/app/manifests/v1", reg.url()), &wrong);
    assert_eq!(r.status, 401, "the registry really checks the kid");
}

#[test]
fn jwks_from_a_url_is_fetched_and_refreshed_on_key_rotation() {
    let reg = Registry::start("");
    let img = image::image(&[("hello", b"jwks url\n")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let idp = common::servers::IdentityProvider::start();
    let config = simple_config(&reg.url(), "mirror/", "team/", "")
        + &format!(
            "auth:\n  token:\n    realm: {REALM}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    jwks: \"{}/jwks\"\n",
            idp.issuer()
        );
    let gw = Ocigate::start(&config);
    let token = idp.mint(&claims("mirror/app", &["pull"]));
    let r = call(&gw, "GET", MANIFEST, Some(&token));
    assert_eq!(r.status, 200, "{}", r.text());
    // The publisher rotates its key: the new kid is unknown, so the JWKS is fetched again.
    idp.rotate();
    let rotated = idp.mint(&claims("mirror/app", &["pull"]));
    assert_eq!(call(&gw, "GET", MANIFEST, Some(&rotated)).status, 200);
    // A kid the publisher does not have stays refused.
    let pki = Pki::new();
    let stranger = mint(
        &header_kid("idp-key-99"),
        &claims("mirror/app", &["pull"]),
        &pki.stranger.encoding(),
    );
    let r = call(&gw, "GET", MANIFEST, Some(&stranger));
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("error=\"invalid_token\"")
    );
    assert!(gw.wait_for_log("signing keys fetched"));
}

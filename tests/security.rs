//! End-to-end regressions of the attack review (issue 11), each against the real
//! `docker-registry`: cache evidence forged from manifest bodies, mounts smuggled past the
//! auth stage, a write-capable relay, capability URLs in `/metrics` and browser redirects.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::http::{self, Resp};
use common::image::{self, OCI_MANIFEST};
use common::tokens::TokenServerFiles;
use common::{Ocigate, Registry, skopeo_digest, skopeo_pull_oci};
use serde_json::json;

/// The token server's part of a config: users from `files`, and `acl` rules (YAML flow items).
fn token_server_yaml(files: &TokenServerFiles, acl: &[&str]) -> String {
    let rules: String = acl.iter().map(|r| format!("    - {r}\n")).collect();
    format!(
        "auth:\n  token: {{service: s.test, issuer: https://s.test}}\ntoken_server:\n  issuer: https://s.test\n  signing_key: {}\n  certificate: {}\n  users: {{htpasswd: {}}}\n  acl:\n{rules}",
        files.path("token.key"),
        files.path("token.crt"),
        files.path("htpasswd"),
    )
}

/// A token from the gateway's token server, as `basic` (`user:password`) or anonymously.
fn token(gw: &Ocigate, basic: Option<&str>, scope: &str) -> String {
    use base64::Engine as _;
    let url = format!("{}/token?service=s.test&scope={scope}", gw.url());
    let auth = basic.map(|b| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(b)
        )
    });
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    let r = http::get_with(&url, &headers);
    assert_eq!(r.status, 200, "token for {scope}: {}", r.text());
    r.json()["token"].as_str().unwrap().to_string()
}

/// An OCI image manifest of `img` that also names `extra` fields, which registries store
/// unchecked.
fn manifest_with(img: &image::Image, extra: serde_json::Value) -> Vec<u8> {
    let mut m: serde_json::Value = serde_json::from_slice(&img.manifest).unwrap();
    for (k, v) in extra.as_object().unwrap() {
        m[k] = v.clone();
    }
    serde_json::to_vec(&m).unwrap()
}

/// Pushes `img`'s blobs to `repo` and a manifest naming `extra` fields under `tag`.
fn push_bait(base: &str, repo: &str, tag: &str, img: &image::Image, extra: serde_json::Value) {
    image::push_blob(base, repo, &img.config);
    for l in &img.layers {
        image::push_blob(base, repo, l);
    }
    image::push_manifest(base, repo, tag, OCI_MANIFEST, &manifest_with(img, extra));
}

fn assert_not_served(r: &Resp, secret: &[u8], what: &str) {
    assert_ne!(r.status, 200, "{what}: served {:?}", r.text());
    assert_ne!(&r.body[..], secret, "{what}");
    assert!(
        matches!(r.status, 404 | 401),
        "{what}: {} {}",
        r.status,
        r.text()
    );
}

/// Item 1: digests named in a manifest's `blobs`, `fsLayers` or other fields the registry
/// never checked unlock nothing in the cache, neither on the same upstream nor on another
/// one where anyone may push; evidence the registry did check still lets a second user's
/// pull hit.
#[test]
fn unchecked_manifest_fields_are_no_cache_evidence() {
    // Layers with external URLs allowed, as registries serving Windows images configure.
    let private =
        Registry::start("validation:\n  manifests:\n    urls:\n      allow: ['^https?://']\n");
    let public = Registry::start("");
    let bob = image::image(&[("secret", b"only bob may pull this\n")], "amd64");
    image::push_image(&private.url(), "team/bob/app", "v1", &bob);
    let shared = image::image(&[("shared", b"everyone on the team\n")], "amd64");
    image::push_image(&private.url(), "team/shared/app", "v1", &shared);
    let files = TokenServerFiles::new(&[("alice", "wonderland"), ("bob", "builder")]);
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:0\"\ncache:\n  dir: {}\nupstreams:\n  priv: {{url: \"{}\"}}\n  pub: {{url: \"{}\"}}\nroutes:\n  - {{prefix: \"c/\", upstream: priv, remote: \"team/\", cache: true}}\n  - {{prefix: \"pub/\", upstream: pub, cache: true}}\n{}",
        dir.path().display(),
        private.url(),
        public.url(),
        token_server_yaml(
            &files,
            &[
                "{account: bob, repository: \"c/bob/*\", actions: [pull]}",
                "{account: alice, repository: \"c/alice/*\", actions: [pull, push]}",
                "{account: \"*\", repository: \"c/shared/*\", actions: [pull]}",
                "{account: anonymous, repository: \"pub/*\", actions: [pull, push]}",
            ]
        ),
    );
    let gw = Ocigate::start(&yaml);
    // bob pulls his image: its layer and manifest are now cached.
    let _ = skopeo_pull_oci(
        &format!("{}/c/bob/app:v1", gw.host()),
        &["--src-creds", "bob:builder"],
    );
    let layer = bob.layers[0].clone();
    let names_bob = json!({
        "blobs": [{"mediaType": "application/octet-stream", "digest": bob.layer_digest, "size": layer.len()}],
        "fsLayers": [{"blobSum": bob.digest}],
        "extra": {"digest": bob.layer_digest},
    });

    // Across upstreams: anyone may push to the public registry.
    let evil = image::image(&[("x", b"evil\n")], "amd64");
    push_bait(&public.url(), "evil/bait", "v1", &evil, names_bob.clone());
    let anon = token(&gw, None, "repository:pub/evil/bait:pull");
    let base = format!("{}/v2/pub/evil/bait", gw.url());
    assert_eq!(
        http::bearer_get(&format!("{base}/manifests/v1"), &anon).status,
        200
    );
    let r = http::bearer_get(&format!("{base}/blobs/{}", bob.layer_digest), &anon);
    assert_not_served(&r, &layer, "bob's layer through another upstream");
    let r = http::bearer_get(&format!("{base}/manifests/{}", bob.digest), &anon);
    assert_not_served(&r, &bob.manifest, "bob's manifest through another upstream");

    // Within one upstream: alice may push to her own repositories only.
    let alices = image::image(&[("x", b"alice\n")], "amd64");
    push_bait(&private.url(), "team/alice/bait", "v1", &alices, names_bob);
    let alice = token(
        &gw,
        Some("alice:wonderland"),
        "repository:c/alice/bait:pull",
    );
    let base = format!("{}/v2/c/alice/bait", gw.url());
    assert_eq!(
        http::bearer_get(&format!("{base}/manifests/v1"), &alice).status,
        200
    );
    let r = http::bearer_get(&format!("{base}/blobs/{}", bob.layer_digest), &alice);
    assert_not_served(&r, &layer, "bob's layer through alice's bait");
    let r = http::bearer_get(&format!("{base}/manifests/{}", bob.digest), &alice);
    assert_not_served(&r, &bob.manifest, "bob's manifest through fsLayers");
    // Go registries match keys case-insensitively, the last one winning: the registry checks
    // `Layers` (alice's), while an exact-key reader would see `layers` (bob's).
    let own: serde_json::Value = serde_json::from_slice(&alices.manifest).unwrap();
    let bobs: serde_json::Value = serde_json::from_slice(&bob.manifest).unwrap();
    let two_cases = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{},"layers":{},"Layers":{}}}"#,
        own["config"], bobs["layers"], own["layers"]
    );
    image::push_manifest(
        &private.url(),
        "team/alice/bait",
        "cases",
        OCI_MANIFEST,
        two_cases.as_bytes(),
    );
    assert_eq!(
        http::bearer_get(&format!("{base}/manifests/cases"), &alice).status,
        200
    );
    let r = http::bearer_get(&format!("{base}/blobs/{}", bob.layer_digest), &alice);
    assert_not_served(&r, &layer, "bob's layer through a key of another case");
    // A repeated key: Go merges the two `layers` arrays into one layer with `urls`, which
    // it does not check; the last array alone names bob's layer as a plain one.
    let bob_layer = &bobs["layers"][0];
    let mut external = bob_layer.clone();
    external["urls"] = json!(["https://elsewhere.example/layer"]);
    let repeated = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{},"layers":[{external}],"layers":[{bob_layer}]}}"#,
        own["config"]
    );
    image::push_manifest(
        &private.url(),
        "team/alice/bait",
        "repeated",
        OCI_MANIFEST,
        repeated.as_bytes(),
    );
    assert_eq!(
        http::bearer_get(&format!("{base}/manifests/repeated"), &alice).status,
        200
    );
    let r = http::bearer_get(&format!("{base}/blobs/{}", bob.layer_digest), &alice);
    assert_not_served(&r, &layer, "bob's layer through a repeated key");
    assert_eq!(
        private.count_requests(
            "GET",
            &format!("/v2/team/bob/app/blobs/{}", bob.layer_digest)
        ),
        1,
        "bob's layer was fetched once, for bob"
    );

    // What the registry did check is evidence: a second user's pull is served from the
    // cache, its layer fetched once.
    let by_tag = format!("{}/c/shared/app:v1", gw.host());
    let _ = skopeo_pull_oci(&by_tag, &["--src-creds", "bob:builder"]);
    let _ = skopeo_pull_oci(&by_tag, &["--src-creds", "alice:wonderland"]);
    let layer_path = format!("/v2/team/shared/app/blobs/{}", shared.layer_digest);
    assert_eq!(private.count_requests("GET", &layer_path), 1);
    assert_eq!(
        private.count_requests("HEAD", &layer_path),
        0,
        "no proof was needed"
    );
}

/// A registry whose `team/secret/app` holds a layer, and a gateway where eve may push only
/// to `c/eve/*`, with the proxy's access to the whole registry.
struct MountSetup {
    reg: Registry,
    gw: Ocigate,
    secret: String,
    eve: String,
    _files: TokenServerFiles,
}

fn mount_setup() -> MountSetup {
    let reg = Registry::start("");
    let secret = image::push_blob(&reg.url(), "team/secret/app", b"not eve's\n");
    let files = TokenServerFiles::new(&[("eve", "hunter2")]);
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:0\"\nupstreams:\n  reg: {{url: \"{}\"}}\nroutes:\n  - {{prefix: \"c/\", upstream: reg, remote: \"team/\"}}\n{}",
        reg.url(),
        token_server_yaml(
            &files,
            &["{account: eve, repository: \"c/eve/*\", actions: [pull, push]}"]
        ),
    );
    let gw = Ocigate::start(&yaml);
    let eve = token(&gw, Some("eve:hunter2"), "repository:c/eve/x:pull,push");
    MountSetup {
        reg,
        gw,
        secret,
        eve,
        _files: files,
    }
}

impl MountSetup {
    fn post(&self, path_and_query: &str, content_type: Option<&str>, body: &str) -> Resp {
        let auth = format!("Bearer {}", self.eve);
        let mut headers = vec![("authorization", auth.as_str())];
        if let Some(t) = content_type {
            headers.push(("content-type", t));
        }
        http::request(
            "POST",
            &format!("{}{path_and_query}", self.gw.url()),
            &headers,
            Bytes::from(body.to_string()),
        )
    }

    /// Whether the secret layer landed in eve's repository upstream.
    fn leaked(&self) -> bool {
        let url = format!("{}/v2/team/eve/x/blobs/{}", self.reg.url(), self.secret);
        http::head(&url, &[]).status == 200
    }
}

/// Item 2: a mount that the auth stage did not check never reaches the registry: not in a
/// form body, not behind a dot-segment upload id, not on a POST to an upload id.
#[test]
fn mounts_cannot_be_smuggled_past_the_auth_stage() {
    let s = mount_setup();
    let form = format!("mount={}&from=team/secret/app", s.secret);
    for content_type in [
        "application/x-www-form-urlencoded",
        "Application/X-WWW-Form-Urlencoded; charset=utf-8",
    ] {
        let r = s.post("/v2/c/eve/x/blobs/uploads/", Some(content_type), &form);
        assert_eq!(r.status, 415, "{content_type}: {}", r.text());
        assert_eq!(r.error_code(), "UNSUPPORTED");
    }
    let multipart = format!(
        "--b\r\nContent-Disposition: form-data; name=\"mount\"\r\n\r\n{}\r\n--b\r\nContent-Disposition: form-data; name=\"from\"\r\n\r\nteam/secret/app\r\n--b--\r\n",
        s.secret
    );
    let r = s.post(
        "/v2/c/eve/x/blobs/uploads/",
        Some("multipart/form-data; boundary=b"),
        &multipart,
    );
    assert_eq!(r.status, 415, "multipart: {}", r.text());
    for dots in [".", ".."] {
        let r = s.post(
            &format!(
                "/v2/c/eve/x/blobs/uploads/{dots}?mount={}&from=team/secret/app",
                s.secret
            ),
            None,
            "",
        );
        assert_eq!(r.status, 404, "upload id {dots:?}: {}", r.text());
        assert_eq!(r.error_code(), "BLOB_UPLOAD_UNKNOWN");
    }
    // A POST on an upload id is checked as an upload start: pull on `from` is needed.
    let r = s.post(
        &format!(
            "/v2/c/eve/x/blobs/uploads/abc?mount={}&from=c/secret/app",
            s.secret
        ),
        None,
        "",
    );
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("repository:c/secret/app:pull")
    );
    // A mount in the query of any other request is dropped before the upstream sees it.
    let r = http::request(
        "PUT",
        &format!(
            "{}/v2/c/eve/x/blobs/uploads/abc?m%6Funt={}&from=team/secret/app",
            s.gw.url(),
            s.secret
        ),
        &[("authorization", &format!("Bearer {}", s.eve))],
        Bytes::new(),
    );
    assert_ne!(r.status, 201);
    assert!(!s.reg.log().contains("from=team%2Fsecret%2Fapp"));
    assert!(!s.reg.log().contains("from=team/secret/app"));
    assert!(
        !s.leaked(),
        "the secret layer was mounted into eve's repository"
    );
    // A mount eve may make still works.
    let own = image::push_blob(&s.reg.url(), "team/eve/y", b"eve's own\n");
    let both = token(
        &s.gw,
        Some("eve:hunter2"),
        "repository:c/eve/x:pull,push&scope=repository:c/eve/y:pull",
    );
    let s = MountSetup { eve: both, ..s };
    let r = s.post(
        &format!("/v2/c/eve/x/blobs/uploads/?mount={own}&from=c/eve/y"),
        None,
        "",
    );
    assert_eq!(r.status, 201, "{}", r.text());
}

/// Item 3: relay routes relay `pull` only unless `relay_actions` says more: a capability
/// handed out for pulls cannot overwrite tags or delete manifests with the operator's
/// credentials.
#[test]
fn relay_routes_grant_pull_only_unless_configured() {
    use common::servers::TokenServer;
    let mut reg = Registry::start("");
    let img = image::image(&[("r", b"relayed\n")], "amd64");
    image::push_image(&reg.url(), "team/private", "v1", &img);
    let realm = TokenServer::start(Some(("robot", "s3cret")));
    reg.reconfigure(&realm.registry_auth_yaml());
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:0\"\nupstreams:\n  reg:\n    url: \"{}\"\n    credentials: {{basic: {{username: robot, password: s3cret}}}}\n    allowed_realms: [\"{}\"]\nroutes:\n  - {{prefix: \"ro/\", upstream: reg, remote: \"team/\", relay: true}}\n  - {{prefix: \"rw/\", upstream: reg, remote: \"team/\", relay: true, relay_actions: [pull, push]}}\nrelay:\n  secret_key: \"796280902778385984e2acd2868447a0ee703a8fab0ed7e69103cd50b9e3cddd\"\n",
        reg.url(),
        realm.realm()
    );
    let (ok, out, err) = common::check_config(&yaml, &[]);
    assert!(ok, "{err}");
    assert!(out.contains("relay [pull])"), "{out}");
    assert!(out.contains("relay [pull, push])"), "{out}");
    let gw = Ocigate::start(&yaml);
    let relay_token = |scope: &str| {
        let r = http::get(&format!("{}/token?scope={scope}", gw.url()));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["token"].as_str().unwrap().to_string()
    };
    let put_manifest = |repo: &str, tag: &str, token: &str| {
        http::request(
            "PUT",
            &format!("{}/v2/{repo}/manifests/{tag}", gw.url()),
            &[
                ("authorization", &format!("Bearer {token}")),
                ("content-type", OCI_MANIFEST),
            ],
            Bytes::from(img.manifest.clone()),
        )
    };
    let everything = relay_token("repository:ro/private:pull,push,delete");
    let r = put_manifest("ro/private", "pwned", &everything);
    assert_eq!(
        r.status,
        401,
        "push on a pull-only relay route: {}",
        r.text()
    );
    let r = http::request(
        "DELETE",
        &format!("{}/v2/ro/private/manifests/{}", gw.url(), img.digest),
        &[("authorization", &format!("Bearer {everything}"))],
        Bytes::new(),
    );
    assert_eq!(
        r.status,
        401,
        "delete on a pull-only relay route: {}",
        r.text()
    );
    let star = relay_token("repository:ro/private:*");
    assert_eq!(put_manifest("ro/private", "pwned", &star).status, 401);
    assert_eq!(reg.count_requests("PUT", "/manifests/pwned"), 0);
    assert_eq!(reg.count_requests("DELETE", "/manifests/"), 0);
    // Pulls still work there, and the route that allows pushes takes them.
    assert_eq!(
        skopeo_digest(&format!("{}/ro/private:v1", gw.host()), &[]),
        img.digest
    );
    let push = relay_token("repository:rw/private:pull,push,delete");
    let r = put_manifest("rw/private", "pushed", &push);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        reg.count_requests("PUT", "/v2/team/private/manifests/pushed"),
        1
    );

    // Item 12: the answer for a relay route's name and for a name on no relay route look
    // alike: same length, same expires_in.
    let answer = |scope: &str| http::get(&format!("{}/token?scope={scope}", gw.url())).json();
    let routed = answer("repository:ro/private:pull");
    let elsewhere = answer("repository:nowhere/private:pull");
    assert_eq!(routed["expires_in"], elsewhere["expires_in"]);
    assert_eq!(
        routed["token"].as_str().unwrap().len(),
        elsewhere["token"].as_str().unwrap().len()
    );
}

/// The address of the metrics listener, from the log.
fn metrics_addr(gw: &Ocigate) -> String {
    assert!(gw.wait_for_log("metrics listening"));
    gw.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "metrics listening")
        .and_then(|v| v["addr"].as_str().map(str::to_string))
        .unwrap()
}

/// Item 4: an exact route's prefix (a capability URL) is never a metric label; with
/// `server.metrics.listen`, `/metrics` leaves the public listeners.
#[test]
fn metrics_never_name_capability_urls() {
    const SECRET: &str = "8c6f0f2a3b9d4e51a7c2d0e4f6b8a1c3/app";
    const NAMED: &str = "f1e2d3c4b5a69788796a5b4c3d2e1f00/app";
    let reg = Registry::start("");
    let img = image::image(&[("m", b"metrics\n")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let routes = format!(
        "upstreams:\n  reg: {{url: \"{}\"}}\nroutes:\n  - {{prefix: \"{SECRET}\", upstream: reg, remote: team/app}}\n  - {{prefix: \"{NAMED}\", upstream: reg, remote: team/app, name: app-capability}}\n  - {{prefix: \"ns/\", upstream: reg, remote: \"team/\"}}\n",
        reg.url()
    );
    let visit = |gw: &Ocigate| {
        for prefix in [SECRET, NAMED, "ns/app"] {
            let r = http::get_with(
                &format!("{}/v2/{prefix}/manifests/v1", gw.url()),
                &[("accept", OCI_MANIFEST)],
            );
            assert_eq!(r.status, 200, "{prefix}: {}", r.text());
            let r = http::get(&format!("{}/v2/{prefix}/manifests/nope", gw.url()));
            assert_eq!(r.status, 404);
        }
    };
    let public = Ocigate::start(&format!("server:\n  listen: \"127.0.0.1:0\"\n{routes}"));
    visit(&public);
    let text = http::get(&format!("{}/metrics", public.url())).text();
    assert!(text.contains("ocigate_requests_total"), "{text}");
    assert!(text.contains("route=\"app-capability\""), "{text}");
    assert!(text.contains("route=\"ns/\""), "{text}");
    assert!(text.contains("route=\"repository-"), "{text}");
    for secret in [SECRET, NAMED, "8c6f0f2a", "f1e2d3c4"] {
        assert!(!text.contains(secret), "{secret} in /metrics:\n{text}");
    }

    let private = Ocigate::start(&format!(
        "server:\n  listen: \"127.0.0.1:0\"\n  metrics: {{listen: \"127.0.0.1:0\"}}\n{routes}"
    ));
    visit(&private);
    assert_eq!(http::get(&format!("{}/metrics", private.url())).status, 404);
    let text = http::get(&format!("http://{}/metrics", metrics_addr(&private))).text();
    assert!(text.contains("route=\"app-capability\""), "{text}");
    assert!(!text.contains(SECRET), "{text}");
    let health = http::get(&format!("http://{}/healthz", metrics_addr(&private)));
    assert_eq!(health.status, 200);
}

/// Item 11: browser redirects never reveal what an exact route opens, and are off by
/// default when `auth` or `relay` is configured.
#[test]
fn browser_redirects_reveal_no_capability_url() {
    let browser = [("accept", "text/html,application/xhtml+xml")];
    let upstreams = "upstreams:\n  gh: {url: \"https://ghcr.io\"}\n";
    let open = Ocigate::start(&format!(
        "server:\n  listen: \"127.0.0.1:0\"\n{upstreams}routes:\n  - {{prefix: \"4d1c0a9e7b3f/tool\", upstream: gh, remote: myorg/private-tool}}\n  - {{prefix: \"gh/\", upstream: gh, remote: \"myorg/\"}}\n"
    ));
    let r = http::get_with(&format!("{}/4d1c0a9e7b3f/tool", open.url()), &browser);
    assert_eq!(r.status, 404, "{:?}", r.header("location"));
    assert!(!r.text().contains("private-tool"));
    let r = http::get_with(&format!("{}/gh/tool", open.url()), &browser);
    assert_eq!(r.status, 302, "namespace routes still redirect");

    let files = TokenServerFiles::new(&[("alice", "wonderland")]);
    let guarded = Ocigate::start(&format!(
        "server:\n  listen: \"127.0.0.1:0\"\n{upstreams}routes:\n  - {{prefix: \"gh/\", upstream: gh, remote: \"myorg/\"}}\n{}",
        token_server_yaml(
            &files,
            &["{account: alice, repository: \"*\", actions: [pull]}"]
        )
    ));
    let r = http::get_with(&format!("{}/gh/tool", guarded.url()), &browser);
    assert_eq!(
        r.status,
        404,
        "off by default with auth: {:?}",
        r.header("location")
    );
}

/// Item 6: failed logins are limited per username (and per address), and a flood of
/// password checks gets `429`s instead of queueing without bound.
#[test]
fn logins_are_throttled_and_the_password_queue_is_bounded() {
    let reg = Registry::start("");
    let files = TokenServerFiles::new(&[("alice", "wonderland"), ("bob", "builder")]);
    // A slow hash, as `htpasswd -B -C 10` writes: checks of it pile up.
    let slow = bcrypt::hash("patience", 10).unwrap();
    let htpasswd = std::fs::read_to_string(files.path("htpasswd")).unwrap();
    std::fs::write(files.path("htpasswd"), format!("{htpasswd}carol:{slow}\n")).unwrap();
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:0\"\nupstreams:\n  reg: {{url: \"{}\"}}\nroutes:\n  - {{prefix: \"\", upstream: reg}}\n{}",
        reg.url(),
        token_server_yaml(
            &files,
            &["{account: \"*\", repository: \"*\", actions: [pull]}"]
        )
    );
    let gw = Ocigate::start(&yaml);
    let login = |user_password: &str| {
        use base64::Engine as _;
        let basic = base64::engine::general_purpose::STANDARD.encode(user_password);
        http::get_with(
            &format!("{}/token?service=s.test", gw.url()),
            &[("authorization", &format!("Basic {basic}"))],
        )
    };
    for _ in 0..10 {
        assert_eq!(login("alice:guess").status, 401);
    }
    let r = login("alice:wonderland");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.error_code(), "TOOMANYREQUESTS");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(login("bob:builder").status, 200, "other users still log in");

    let statuses: Vec<u16> = std::thread::scope(|s| {
        let running: Vec<_> = (0..64)
            .map(|_| s.spawn(|| login("carol:patience").status))
            .collect();
        running.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let busy = statuses.iter().filter(|s| **s == 429).count();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(busy + ok, 64, "{statuses:?}");
    assert!(busy > 0 && ok > 0, "{statuses:?}");
}

/// Item 12: what an exact route opens is never listed in `_catalog`, even when a namespace
/// route on the same upstream covers it, and `check-config` warns about that and about
/// capability prefixes that are easy to guess.
#[test]
fn capability_targets_stay_unlisted_and_weak_ones_are_warned_about() {
    let reg = Registry::start("");
    for repo in ["team/app", "team/other", "team/listed"] {
        let img = image::image(&[("c", repo.as_bytes())], "amd64");
        image::push_image(&reg.url(), repo, "v1", &img);
    }
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:0\"\nupstreams:\n  reg: {{url: \"{}\"}}\nroutes:\n  - {{prefix: \"ns/\", upstream: reg, remote: \"team/\"}}\n  - {{prefix: \"8c6f0f2a3b9d4e51a7c2d0e4f6b8a1c3/app\", upstream: reg, remote: team/app}}\n  - {{prefix: \"guessable/app\", upstream: reg, remote: team/other}}\n",
        reg.url()
    );
    let gw = Ocigate::start(&yaml);
    let catalog = http::get(&format!("{}/v2/_catalog", gw.url())).json();
    assert_eq!(catalog["repositories"], json!(["ns/listed"]), "{catalog}");
    let (ok, _, err) = common::check_config(&yaml, &[]);
    assert!(ok, "{err}");
    assert!(
        err.contains("warning: route \"guessable/app\"") && err.contains("bits of randomness"),
        "{err}"
    );
    assert!(
        err.contains("reg:team/app, which is also reachable as \"ns/app\""),
        "{err}"
    );
    assert!(
        !err.contains("8c6f0f2a3b9d4e51a7c2d0e4f6b8a1c3/app\" ("),
        "{err}"
    );
}

/// Item 8: a `DELETE` through the proxy drops the cache's evidence and tags; content deleted
/// behind the proxy's back stops being served once its evidence is older than
/// `evidence_ttl` (here 0s: always proven again), and the upstream's `404` is remembered.
#[test]
fn deleted_content_is_not_served_from_the_cache() {
    let reg = Registry::start("");
    let img = image::image(&[("d", b"to be deleted\n")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let other = image::image(&[("d", b"deleted behind the proxy's back\n")], "amd64");
    image::push_image(&reg.url(), "team/two", "v1", &other);
    let dir = tempfile::tempdir().unwrap();
    let cache = |extra: &str| {
        format!(
            "server:\n  listen: \"127.0.0.1:0\"\ncache:\n  dir: {}\n{extra}upstreams:\n  reg: {{url: \"{}\"}}\nroutes:\n  - {{prefix: \"c/\", upstream: reg, remote: \"team/\", cache: true}}\n",
            dir.path().display(),
            reg.url()
        )
    };
    let gw = Ocigate::start(&cache(""));
    let _ = skopeo_pull_oci(&format!("{}/c/app:v1", gw.host()), &[]);
    let accept = [("accept", OCI_MANIFEST)];
    let get = |path: &str| http::get_with(&format!("{}/v2/c/{path}", gw.url()), &accept);
    assert_eq!(get("app/manifests/v1").status, 200);
    let delete = |path: &str| {
        http::request(
            "DELETE",
            &format!("{}/v2/c/{path}", gw.url()),
            &[],
            Bytes::new(),
        )
    };
    assert_eq!(delete(&format!("app/manifests/{}", img.digest)).status, 202);
    assert_eq!(get(&format!("app/manifests/{}", img.digest)).status, 404);
    assert_eq!(
        get("app/manifests/v1").status,
        404,
        "the cached tag went with it"
    );
    assert_eq!(get(&format!("app/blobs/{}", img.layer_digest)).status, 200);
    assert_eq!(
        delete(&format!("app/blobs/{}", img.layer_digest)).status,
        202
    );
    assert_eq!(get(&format!("app/blobs/{}", img.layer_digest)).status, 404);
    drop(gw);

    let gw = Ocigate::start(&cache("  evidence_ttl: 0s\n"));
    let _ = skopeo_pull_oci(&format!("{}/c/two:v1", gw.host()), &[]);
    let blob = format!("{}/v2/c/two/blobs/{}", gw.url(), other.layer_digest);
    let r = http::get(&blob);
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], &other.layers[0][..]);
    let upstream_blob = format!("/v2/team/two/blobs/{}", other.layer_digest);
    assert_eq!(
        reg.count_requests("GET", &upstream_blob),
        1,
        "served from the cache"
    );
    assert!(
        reg.count_requests("HEAD", &upstream_blob) >= 1,
        "after a proof"
    );
    let direct = http::request(
        "DELETE",
        &format!("{}{upstream_blob}", reg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!(direct.status, 202);
    assert_eq!(http::get(&blob).status, 404);
    let journal = std::fs::read_to_string(dir.path().join("journal.jsonl")).unwrap();
    assert!(
        journal
            .lines()
            .any(|l| l.contains("\"forget\"") && l.contains(&other.layer_digest)),
        "{journal}"
    );
}

/// Sends a GET on `s` and reads its answer's head (a 200), nothing of its body.
fn stalled_get(mut s: std::net::TcpStream, path: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// Waits for `done`, for at most a minute and a half.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: never happened"
        );
        std::thread::yield_now();
    }
}

/// The resident memory of a process, from `/proc`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// Item 7: a tags list is renamed as it streams, so clients that stop reading hold no copy
/// of it; pages the proxy cuts itself are small, whatever `n` asks.
#[test]
fn tags_lists_stream_and_slow_readers_hold_no_copies() {
    let root = tempfile::tempdir().unwrap();
    // As long as a tags list the proxy accepts to rewrite may be: 16 MiB.
    let tags: Vec<String> = (0..1_480_000).map(|i| format!("v{i:07}")).collect();
    let list = serde_json::to_vec(&json!({"name": "team/app", "tags": tags})).unwrap();
    assert!(list.len() > 15 << 20 && list.len() < 16 << 20);
    let path = root.path().join("v2/team/app/tags");
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join("list"), &list).unwrap();
    let upstream = common::servers::StaticServer::start(root.path().to_path_buf());
    let gw = Ocigate::start(&common::simple_config(
        upstream.url().trim_end_matches('/'),
        "m/",
        "team/",
        "",
    ));
    // 60 clients ask for the whole list and read nothing past the headers.
    let baseline = rss_bytes(gw.pid());
    let sockets: Vec<std::net::TcpStream> = (0..60)
        .map(|_| {
            let s = std::net::TcpStream::connect(gw.addr).unwrap();
            stalled_get(s, "/v2/m/app/tags/list")
        })
        .collect();
    let held = rss_bytes(gw.pid());
    assert!(
        held < 100 << 20,
        "ocigate holds {} MiB for 60 stalled tags lists (from {} MiB)",
        held >> 20,
        baseline >> 20
    );
    drop(sockets);
    let r = http::get(&format!("{}/v2/m/app/tags/list", gw.url()));
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["name"], "m/app");
    assert_eq!(v["tags"].as_array().unwrap().len(), tags.len());
    let r = http::get(&format!(
        "{}/v2/m/app/tags/list?n=100000&last=v0000009",
        gw.url()
    ));
    let v = r.json();
    assert_eq!(
        v["tags"].as_array().unwrap().len(),
        1000,
        "pages are capped"
    );
    assert_eq!(v["tags"][0], "v0000010");
    assert!(r.header("link").unwrap().contains("last=v0001009&n=1000"));
}

/// Bytes on disk under `dir` (by inode), counting files `pid` holds open there after they
/// were unlinked: their blocks stay allocated until closed.
fn disk_use(dir: &std::path::Path, pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut inodes = std::collections::HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                inodes.insert(meta.ino(), meta.len());
            }
        }
    }
    let root = dir.display().to_string();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        let target = target.display().to_string();
        if target.starts_with(&root)
            && target.ends_with(" (deleted)")
            && let Ok(meta) = std::fs::metadata(fd.path())
        {
            inodes.insert(meta.ino(), meta.len());
        }
    }
    inodes.values().sum()
}

/// Item 5: clients that stop reading cannot make the cache use more disk than `max_size`
/// (objects they read are pinned, what does not fit is passed through), and a response
/// whose client accepts no bytes for `server.send_timeout` is closed.
#[test]
fn stalled_readers_keep_the_cache_within_max_size() {
    use std::io::Read;
    let reg = Registry::start("");
    let layers: Vec<(String, u64)> = (0..6)
        .map(|i| {
            let layer = common::image::BigLayer::new(12 << 20, 100 + i);
            layer.push_image(&reg.url(), &format!("team/app{i}"), "v1");
            (layer.digest, layer.size)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let max_size: u64 = 32 << 20;
    let gw = Ocigate::start(&format!(
        "server:\n  listen: \"127.0.0.1:0\"\n  send_timeout: 15s\ncache:\n  dir: {}\n  max_size: 32MiB\nupstreams:\n  reg: {{url: \"{}\"}}\nroutes:\n  - {{prefix: \"c/\", upstream: reg, remote: \"team/\", cache: true}}\n",
        dir.path().display(),
        reg.url()
    ));
    let mut stalled: Vec<std::net::TcpStream> = layers
        .iter()
        .enumerate()
        .map(|(i, (digest, _))| {
            // A small receive window: the server's writes stall after a few hundred KiB.
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket.set_recv_buffer_size(64 << 10).unwrap();
            socket.connect(&gw.addr.into()).unwrap();
            stalled_get(socket.into(), &format!("/v2/c/app{i}/blobs/{digest}"))
        })
        .collect();
    // Once no fill is in progress, everything the cache keeps is on disk or held open.
    wait_until("fills ending", || {
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count() == 0
    });
    let used = disk_use(dir.path(), gw.pid());
    assert!(
        used <= max_size,
        "{} MiB on disk with max_size 32 MiB",
        used >> 20
    );
    // The server gives up on clients that accept nothing: their transfers end short.
    wait_until("every stalled response closed", || {
        gw.logs().matches("\"outcome\":\"aborted\"").count() >= stalled.len()
    });
    for (s, (_, size)) in stalled.iter_mut().zip(&layers) {
        let mut received = Vec::new();
        let _ = s.read_to_end(&mut received);
        assert!(
            (received.len() as u64) < *size,
            "the whole blob arrived: {} of {size}",
            received.len()
        );
    }
}

/// A mount never copies from a relay route: its repository opens only to relay tokens, and
/// `auth.anonymous` must not stand in for one.
#[test]
fn mounts_from_relay_routes_are_dropped() {
    let reg = Registry::start("");
    let secret = image::push_blob(&reg.url(), "team/capsecret", b"behind a capability\n");
    let files = TokenServerFiles::new(&[("eve", "hunter2")]);
    const CAPABILITY: &str = "8c6f0f2a3b9d4e51a7c2d0e4f6b8a1c3/app";
    let auth = token_server_yaml(
        &files,
        &["{account: eve, repository: \"c/eve/*\", actions: [pull, push]}"],
    )
    .replacen(
        "issuer: https://s.test}\n",
        "issuer: https://s.test}\n  anonymous: [pull]\n",
        1,
    );
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:0\"\nupstreams:\n  reg: {{url: \"{}\"}}\nroutes:\n  - {{prefix: \"c/\", upstream: reg, remote: \"team/\"}}\n  - {{prefix: \"{CAPABILITY}\", upstream: reg, remote: team/capsecret, relay: true}}\nrelay:\n  secret_key: \"796280902778385984e2acd2868447a0ee703a8fab0ed7e69103cd50b9e3cddd\"\n{auth}",
        reg.url(),
    );
    let gw = Ocigate::start(&yaml);
    let eve = token(&gw, Some("eve:hunter2"), "repository:c/eve/x:pull,push");
    let r = http::request(
        "POST",
        &format!(
            "{}/v2/c/eve/x/blobs/uploads/?mount={secret}&from={CAPABILITY}",
            gw.url()
        ),
        &[("authorization", &format!("Bearer {eve}"))],
        Bytes::new(),
    );
    assert_eq!(
        r.status,
        202,
        "a plain upload session, no mount: {}",
        r.text()
    );
    let mounted = format!("{}/v2/team/eve/x/blobs/{secret}", reg.url());
    assert_eq!(http::head(&mounted, &[]).status, 404);
    // Attack review: a mount naming no `from` could be taken from any repository (OCI 1.1
    // allows registries to); it never reaches the upstream either.
    let r = http::request(
        "POST",
        &format!("{}/v2/c/eve/x/blobs/uploads/?mount={secret}", gw.url()),
        &[("authorization", &format!("Bearer {eve}"))],
        Bytes::new(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(
        reg.count_requests("POST", "/v2/team/eve/x/blobs/uploads/"),
        2
    );
    assert_eq!(reg.count_requests("POST", "mount="), 0, "{}", reg.log());
}

/// Attack review: without client auth `_catalog` is open, so it must not list what only
/// relay tokens open, read with the proxy's own credentials.
#[test]
fn the_catalog_lists_no_relay_route() {
    let reg = Registry::start("");
    for repo in ["team/app", "private/payroll"] {
        let img = image::image(&[("c", repo.as_bytes())], "amd64");
        image::push_image(&reg.url(), repo, "v1", &img);
    }
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:0\"\nupstreams:\n  reg: {{url: \"{}\"}}\nroutes:\n  - {{prefix: \"open/\", upstream: reg, remote: \"team/\"}}\n  - {{prefix: \"priv/\", upstream: reg, remote: \"private/\", relay: true}}\nrelay:\n  secret_key: \"796280902778385984e2acd2868447a0ee703a8fab0ed7e69103cd50b9e3cddd\"\n",
        reg.url()
    );
    let gw = Ocigate::start(&yaml);
    let catalog = http::get(&format!("{}/v2/_catalog", gw.url()));
    assert_eq!(catalog.status, 200);
    assert_eq!(catalog.json()["repositories"], json!(["open/app"]));
    // The relay route itself still challenges.
    let r = http::get(&format!("{}/v2/priv/payroll/manifests/v1", gw.url()));
    assert_eq!(r.status, 401);
}

/// Review finding: an HTTP/2 client that grants no flow-control window never makes a write
/// stall, so only watching whether responses are asked for bytes finds it. The connection is
/// closed after `send_timeout`, which lets the cached object it held go.
#[test]
fn http2_clients_granting_no_window_are_dropped() {
    let reg = Registry::start("");
    let img = image::image(&[("w", &[7u8; 300_000])], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let dir = tempfile::tempdir().unwrap();
    let gw = Ocigate::start(&format!(
        "server:\n  listen: \"127.0.0.1:0\"\n  send_timeout: 2s\ncache:\n  dir: {}\nupstreams:\n  reg: {{url: \"{}\"}}\nroutes:\n  - {{prefix: \"c/\", upstream: reg, remote: \"team/\", cache: true}}\n",
        dir.path().display(),
        reg.url()
    ));
    let blob = format!("/v2/c/app/blobs/{}", img.layer_digest);
    assert_eq!(
        http::get(&format!("{}{blob}", gw.url())).status,
        200,
        "cached"
    );
    let addr = gw.addr;
    let closed = common::http::rt().block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .initial_stream_window_size(0)
                .adaptive_window(false)
                .handshake::<_, http_body_util::Empty<Bytes>>(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        let connection = tokio::spawn(conn);
        let request = ::http::Request::get(format!("http://{addr}{blob}"))
            .body(http_body_util::Empty::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        // The body is never read, and no window is ever granted.
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(60), connection).await;
        drop(response);
        outcome.is_ok()
    });
    assert!(closed, "the stalled HTTP/2 connection was never closed");
}

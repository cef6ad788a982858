//! The request path in-process: a gateway whose upstreams are an in-process registry (a
//! [`Transport`] that records what it is sent), driven through [`Gateway::handle`]. No
//! sockets, no external binaries.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;

use super::Gateway;
use crate::body::{self, Body};
use crate::cache::Ownership;
use crate::config::Config;
use crate::oci::Scope;
use crate::relay::{RelayClaims, unix_now};
use crate::server::ConnInfo;
use crate::upstream::client::{Responding, Transport};

/// What the in-process upstream was sent.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
}

impl Seen {
    fn authorization(&self) -> Option<&str> {
        self.headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
    }
}

type Answer = dyn Fn(&Seen) -> Response<Body> + Send + Sync;

/// An upstream registry (and its token realm) in-process.
struct FakeUpstream {
    seen: Mutex<Vec<Seen>>,
    answer: Box<Answer>,
}

impl FakeUpstream {
    fn new(answer: impl Fn(&Seen) -> Response<Body> + Send + Sync + 'static) -> Arc<FakeUpstream> {
        Arc::new(FakeUpstream {
            seen: Mutex::new(Vec::new()),
            answer: Box::new(answer),
        })
    }

    /// Everything it was sent since the last call.
    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Transport for FakeUpstream {
    fn send(&self, request: Request<Body>) -> Responding {
        let seen = Seen {
            method: request.method().clone(),
            path_and_query: request
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            headers: request.headers().clone(),
        };
        let response = (self.answer)(&seen);
        self.seen.lock().unwrap().push(seen);
        Box::pin(async move { Ok(response) })
    }
}

fn answer(status: StatusCode, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Response<Body> {
    let body = body.into();
    let mut response = Response::new(body::full(body.clone()));
    *response.status_mut() = status;
    for (k, v) in headers {
        response.headers_mut().append(
            header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    response
}

const UPSTREAM: &str = "http://reg.test";

fn gateway(yaml: &str, upstream: &Arc<FakeUpstream>) -> Gateway {
    let config = Config::parse(yaml, "test.yaml", &|_| None).unwrap();
    let transport: Arc<dyn Transport> = upstream.clone();
    Gateway::assemble(config, Ownership::Owner, Some(transport)).unwrap()
}

struct Answered {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answered {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn error_code(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        v["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

async fn call(gw: &Gateway, method: Method, uri: &str, headers: &[(&str, &str)]) -> Answered {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "gw.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let conn = ConnInfo {
        peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
        tls: false,
        via: crate::server::Via::Direct,
    };
    let response = gw.handle(req.body(body::empty()).unwrap(), conn).await;
    let (parts, body) = response.into_parts();
    Answered {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn get<'a>(gw: &'a Gateway, uri: &'a str) -> impl Future<Output = Answered> + 'a {
    call(gw, Method::GET, uri, &[])
}

/// A registry whose realm hands out `t1`, `t2`, … and which takes only the token numbered
/// `valid` (0: none at all).
struct TokenRegistry {
    issued: AtomicUsize,
    valid: AtomicUsize,
}

fn token_registry() -> (Arc<TokenRegistry>, Arc<FakeUpstream>) {
    let state = Arc::new(TokenRegistry {
        issued: AtomicUsize::new(0),
        valid: AtomicUsize::new(1),
    });
    let s = state.clone();
    let upstream = FakeUpstream::new(move |seen| {
        if seen.path_and_query.starts_with("/token") {
            let n = s.issued.fetch_add(1, Ordering::SeqCst) + 1;
            return answer(StatusCode::OK, &[], format!(r#"{{"token":"t{n}"}}"#));
        }
        let valid = format!("Bearer t{}", s.valid.load(Ordering::SeqCst));
        if seen.authorization() == Some(valid.as_str()) {
            return answer(
                StatusCode::OK,
                &[("content-type", "application/json")],
                "{}",
            );
        }
        answer(
            StatusCode::UNAUTHORIZED,
            &[(
                "www-authenticate",
                r#"Bearer realm="http://reg.test/token",service="reg.test",scope="repository:evil:push""#,
            )],
            r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
        )
    });
    (state, upstream)
}

const PLAIN: &str = "upstreams: { reg: { url: \"http://reg.test\" } }\nroutes: [ { prefix: \"m/\", upstream: reg, remote: \"team/\" } ]\n";

#[tokio::test]
async fn an_upstream_401_is_retried_once_with_a_fresh_token_and_a_refused_token_dropped() {
    let (state, upstream) = token_registry();
    let gw = gateway(PLAIN, &upstream);
    let url = "/v2/m/app/manifests/v1";
    let paths = |seen: &[Seen]| -> Vec<(String, Option<String>)> {
        seen.iter()
            .map(|s| {
                (
                    s.path_and_query.clone(),
                    s.authorization().map(str::to_string),
                )
            })
            .collect()
    };
    let manifest = "/v2/team/app/manifests/v1".to_string();
    assert_eq!(get(&gw, url).await.status, StatusCode::OK);
    let seen = upstream.take();
    assert_eq!(
        paths(&seen),
        [
            (manifest.clone(), None),
            (
                "/token?service=reg.test&scope=repository%3Ateam%2Fapp%3Apull".into(),
                None
            ),
            (manifest.clone(), Some("Bearer t1".into())),
        ],
        "the token asked for is the request's own scope, not the challenge's"
    );
    // The token is reused.
    assert_eq!(get(&gw, url).await.status, StatusCode::OK);
    assert_eq!(
        paths(&upstream.take()),
        [(manifest.clone(), Some("Bearer t1".into()))]
    );
    // The upstream stops taking it: it is dropped, and one fresh token is fetched.
    state.valid.store(2, Ordering::SeqCst);
    assert_eq!(get(&gw, url).await.status, StatusCode::OK);
    let seen = paths(&upstream.take());
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[0], (manifest.clone(), Some("Bearer t1".into())));
    assert!(seen[1].0.starts_with("/token"));
    assert_eq!(seen[2], (manifest.clone(), Some("Bearer t2".into())));
    assert_eq!(get(&gw, url).await.status, StatusCode::OK);
    assert_eq!(
        paths(&upstream.take()),
        [(manifest.clone(), Some("Bearer t2".into()))]
    );
    // Refused even with a fresh token: retried once only, and the upstream's challenge is
    // never passed on (without client auth, a plain 403).
    state.valid.store(0, Ordering::SeqCst);
    let refused = get(&gw, url).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.error_code(), "DENIED");
    assert!(refused.header("www-authenticate").is_none());
    assert_eq!(upstream.take().len(), 3, "one retry, with one fresh token");
}

/// Key material for the token server, and a gateway config with client auth, a relay route
/// and a plain one.
struct AuthSetup {
    _dir: tempfile::TempDir,
    yaml: String,
}

fn auth_setup() -> AuthSetup {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["signer".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.path().join("token.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("token.crt"), cert.pem()).unwrap();
    let d = dir.path().display();
    let yaml = format!(
        r#"upstreams: {{ reg: {{ url: "{UPSTREAM}" }} }}
routes:
  - {{ prefix: "open/", upstream: reg, remote: "team/" }}
  - {{ prefix: "priv/", upstream: reg, remote: "private/", relay: true }}
auth:
  token: {{ service: registry.example, issuer: gw }}
  anonymous: [pull]
token_server:
  issuer: gw
  signing_key: {d}/token.key
  certificate: {d}/token.crt
  acl:
    - {{ account: alice, repository: "*", actions: [pull, push] }}
    - {{ account: alice, type: registry, repository: catalog, actions: ["*"] }}
relay:
  secret_key: "796280902778385984e2acd2868447a0ee703a8fab0ed7e69103cd50b9e3cddd"
"#
    );
    AuthSetup { _dir: dir, yaml }
}

fn client_token(gw: &Gateway, scopes: &[Scope]) -> String {
    let token = gw
        .token_server
        .as_ref()
        .unwrap()
        .token_for("alice", scopes)
        .unwrap();
    format!("Bearer {token}")
}

fn relay_token(gw: &Gateway, upstream_token: &str, scope: &str) -> String {
    let now = unix_now();
    let claims = RelayClaims {
        ut: upstream_token.into(),
        up: "reg".into(),
        rt: "priv/".into(),
        sc: vec![scope.into()],
        iat: now,
        exp: now + 60,
    };
    format!(
        "Bearer {}",
        gw.relay.as_ref().unwrap().seal(&claims).unwrap()
    )
}

fn challenge_param(a: &Answered, key: &str) -> Option<String> {
    let c = crate::oci::Challenge::parse(a.header("www-authenticate")?)?;
    c.param(key).map(str::to_string)
}

/// An upstream that takes anything and answers 200, or 401 when `refuse` is set.
fn open_registry(refuse: Arc<AtomicUsize>) -> Arc<FakeUpstream> {
    FakeUpstream::new(move |_| match refuse.load(Ordering::SeqCst) {
        0 => answer(
            StatusCode::OK,
            &[("content-type", "application/json")],
            "{}",
        ),
        _ => answer(StatusCode::UNAUTHORIZED, &[], ""),
    })
}

#[tokio::test]
async fn admission_on_each_kind_of_route() {
    let setup = auth_setup();
    let refuse = Arc::new(AtomicUsize::new(0));
    let upstream = open_registry(refuse.clone());
    let gw = gateway(&setup.yaml, &upstream);
    let client = client_token(&gw, &[Scope::repository("open/app", &["pull", "push"])]);
    let relayed = relay_token(&gw, "upstream-token", "repository:priv/app:pull");

    // `/v2/`: challenged without a token; a client token or a relay token opens it.
    let base = get(&gw, "/v2/").await;
    assert_eq!(base.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenge_param(&base, "realm").as_deref(),
        Some("http://gw.test/token")
    );
    for token in [&client, &relayed] {
        let r = call(&gw, Method::GET, "/v2/", &[("authorization", token)]).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = call(
        &gw,
        Method::GET,
        "/v2/",
        &[("authorization", "Bearer nonsense")],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenge_param(&r, "error").as_deref(),
        Some("invalid_token")
    );

    // A plain route: anonymous pulls as `auth.anonymous` says, pushes need a token.
    assert_eq!(
        get(&gw, "/v2/open/app/manifests/v1").await.status,
        StatusCode::OK
    );
    let push = call(&gw, Method::PUT, "/v2/open/app/manifests/v1", &[]).await;
    assert_eq!(push.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenge_param(&push, "scope").as_deref(),
        Some("repository:open/app:pull,push")
    );
    let with_token = call(
        &gw,
        Method::GET,
        "/v2/open/app/manifests/v1",
        &[("authorization", &client)],
    )
    .await;
    assert_eq!(with_token.status, StatusCode::OK);
    // A relay token is not a client token.
    let r = call(
        &gw,
        Method::GET,
        "/v2/open/app/manifests/v1",
        &[("authorization", &relayed)],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    for seen in upstream.take() {
        assert_eq!(
            seen.authorization(),
            None,
            "a client's token never goes upstream"
        );
    }

    // A relay route: only a relay token for it opens it, and the upstream sees the token it
    // sealed.
    let url = "/v2/priv/app/manifests/v1";
    let r = call(&gw, Method::GET, url, &[("authorization", &client)]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenge_param(&r, "error").as_deref(),
        Some("invalid_token")
    );
    assert_eq!(
        get(&gw, url).await.status,
        StatusCode::UNAUTHORIZED,
        "no anonymous relay"
    );
    let r = call(&gw, Method::GET, url, &[("authorization", &relayed)]).await;
    assert_eq!(r.status, StatusCode::OK);
    let push = call(&gw, Method::PUT, url, &[("authorization", &relayed)]).await;
    assert_eq!(push.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenge_param(&push, "error").as_deref(),
        Some("insufficient_scope")
    );
    let seen = upstream.take();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].authorization(), Some("Bearer upstream-token"));
    assert_eq!(seen[0].path_and_query, "/v2/private/app/manifests/v1");

    // Names no route covers: challenged like any other before admission, unknown after.
    let r = get(&gw, "/v2/nowhere/app/manifests/v1").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );
    let covered = client_token(&gw, &[Scope::repository("nowhere/app", &["pull", "push"])]);
    let r = call(&gw, Method::PUT, "/v2/nowhere/app/manifests/v1", &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = call(
        &gw,
        Method::PUT,
        "/v2/nowhere/app/manifests/v1",
        &[("authorization", &covered)],
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );

    // The upstream refuses what it was sent: each admission gets its own answer.
    refuse.store(1, Ordering::SeqCst);
    let r = call(&gw, Method::GET, url, &[("authorization", &relayed)]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenge_param(&r, "error").as_deref(),
        Some("invalid_token")
    );
    assert_eq!(
        challenge_param(&r, "realm").as_deref(),
        Some("http://gw.test/token")
    );
    let r = call(
        &gw,
        Method::GET,
        "/v2/open/app/manifests/v1",
        &[("authorization", &client)],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenge_param(&r, "error").as_deref(),
        Some("insufficient_scope")
    );
    let r = get(&gw, "/v2/open/app/manifests/v1").await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "anonymous: our challenge, so it can log in"
    );
    assert_eq!(
        challenge_param(&r, "error").as_deref(),
        Some("insufficient_scope")
    );
}

#[tokio::test]
async fn hop_by_hop_and_forwarding_headers_stay_on_their_hop() {
    let upstream = FakeUpstream::new(|_| {
        answer(
            StatusCode::OK,
            &[
                ("connection", "close, x-upstream-hop"),
                ("x-upstream-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("docker-content-digest", "sha256:x"),
            ],
            "{}",
        )
    });
    let gw = gateway(PLAIN, &upstream);
    let r = call(
        &gw,
        Method::GET,
        "/v2/m/app/manifests/v1",
        &[
            ("authorization", "Bearer for-the-proxy"),
            ("connection", "x-client-hop"),
            ("x-client-hop", "1"),
            ("x-forwarded-host", "public.example"),
            ("forwarded", "host=public.example"),
            ("cookie", "session=1"),
            ("accept", "application/vnd.oci.image.manifest.v1+json"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    for dropped in ["connection", "x-upstream-hop", "keep-alive"] {
        assert!(
            r.headers.get(dropped).is_none(),
            "{dropped} reached the client"
        );
    }
    assert_eq!(r.header("docker-content-digest"), Some("sha256:x"));
    let seen = upstream.take();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, Method::GET);
    for dropped in [
        "authorization",
        "connection",
        "x-client-hop",
        "x-forwarded-host",
        "forwarded",
        "cookie",
    ] {
        assert!(
            seen[0].headers.get(dropped).is_none(),
            "{dropped} went upstream"
        );
    }
    assert_eq!(
        seen[0].headers.get("accept").unwrap(),
        "application/vnd.oci.image.manifest.v1+json"
    );
}

#[tokio::test]
async fn locations_links_and_tags_answers_are_renamed() {
    let upstream = FakeUpstream::new(|seen| match seen.path_and_query.as_str() {
        "/v2/team/app/tags/list?n=1" => answer(
            StatusCode::OK,
            &[],
            r#"{"name":"team/app","tags":["b","a"]}"#,
        ),
        _ => answer(
            StatusCode::ACCEPTED,
            &[("location", "/v2/team/app/blobs/uploads/u1?_state=s")],
            "",
        ),
    });
    let gw = gateway(PLAIN, &upstream);
    let r = call(&gw, Method::POST, "/v2/m/app/blobs/uploads/", &[]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        r.header("location"),
        Some("http://gw.test/v2/m/app/blobs/uploads/u1?_state=s")
    );
    let r = get(&gw, "/v2/m/app/tags/list?n=1").await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v, serde_json::json!({"name": "m/app", "tags": ["a"]}));
    assert_eq!(
        r.header("link"),
        Some(r#"</v2/m/app/tags/list?last=a&n=1>; rel="next""#)
    );
}

#[tokio::test]
async fn cached_blob_ranges_past_the_end_are_the_rest_of_the_blob() {
    let blob: &'static [u8] = b"0123456789 the cached blob";
    let digest = crate::oci::Digest::sha256_of(blob);
    let upstream = FakeUpstream::new(move |_| answer(StatusCode::OK, &[], blob));
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "upstreams: {{ reg: {{ url: \"{UPSTREAM}\" }} }}\nroutes: [ {{ prefix: \"m/\", upstream: reg, remote: \"team/\", cache: true }} ]\ncache: {{ dir: \"{}\" }}\n",
        dir.path().display()
    );
    let gw = gateway(&yaml, &upstream);
    let url = format!("/v2/m/app/blobs/{digest}");
    let filled = get(&gw, &url).await;
    assert_eq!((filled.status, &filled.body[..]), (StatusCode::OK, blob));
    assert_eq!(upstream.take().len(), 1);
    let range = async |r: &str| call(&gw, Method::GET, &url, &[("range", r)]).await;
    let r = range("bytes=3-18446744073709551615").await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.body[..], &blob[3..]);
    assert_eq!(
        r.header("content-range").map(str::to_string),
        Some(format!("bytes 3-{}/{}", blob.len() - 1, blob.len()))
    );
    let r = range("bytes=-5").await;
    assert_eq!(&r.body[..], &blob[blob.len() - 5..]);
    let r = range(&format!("bytes={}-", blob.len())).await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        r.header("content-range").map(str::to_string),
        Some(format!("bytes */{}", blob.len()))
    );
    // Several ranges are not handled here: the whole blob, as RFC 9110 allows.
    let r = range("bytes=0-1,4-5").await;
    assert_eq!((r.status, &r.body[..]), (StatusCode::OK, blob));
    assert!(
        upstream.take().is_empty(),
        "every range served from the cache"
    );
}

/// An upstream that lists `repositories` in its catalog and answers anything else 200.
fn listing_registry(repositories: &'static str) -> Arc<FakeUpstream> {
    FakeUpstream::new(
        move |seen| match seen.path_and_query.starts_with("/v2/_catalog") {
            true => answer(
                StatusCode::OK,
                &[],
                format!(r#"{{"repositories":{repositories}}}"#),
            ),
            false => answer(StatusCode::OK, &[], "{}"),
        },
    )
}

#[tokio::test]
async fn the_catalog_never_lists_relay_routes() {
    let upstream = listing_registry(r#"["team/app","private/payroll"]"#);
    // Without client auth the catalog is open: it must not list what only relay tokens open.
    let yaml = format!(
        r#"upstreams: {{ reg: {{ url: "{UPSTREAM}" }} }}
routes:
  - {{ prefix: "open/", upstream: reg, remote: "team/" }}
  - {{ prefix: "priv/", upstream: reg, remote: "private/", relay: true }}
relay:
  secret_key: "796280902778385984e2acd2868447a0ee703a8fab0ed7e69103cd50b9e3cddd"
"#
    );
    let gw = gateway(&yaml, &upstream);
    let r = get(&gw, "/v2/_catalog").await;
    assert_eq!(r.status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["open/app"]));
    // With client auth, a token that may list the catalog does not list them either.
    let setup = auth_setup();
    let gw = gateway(&setup.yaml, &upstream);
    let token = client_token(&gw, &[Scope::catalog()]);
    let r = call(
        &gw,
        Method::GET,
        "/v2/_catalog",
        &[("authorization", &token)],
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["open/app"]));
}

#[tokio::test]
async fn relay_challenges_name_the_service_the_token_server_answers_for() {
    let setup = auth_setup();
    let upstream = open_registry(Arc::new(AtomicUsize::new(0)));
    let gw = gateway(&setup.yaml, &upstream);
    let challenged = get(&gw, "/v2/priv/app/manifests/v1").await;
    assert_eq!(challenged.status, StatusCode::UNAUTHORIZED);
    let service = challenge_param(&challenged, "service").unwrap();
    assert_eq!(
        service, "registry.example",
        "the token server's service, not the host"
    );
    // What the challenge says is what the token server takes: a relay token comes back.
    let scope = challenge_param(&challenged, "scope").unwrap();
    let realm = challenge_param(&challenged, "realm").unwrap();
    let path = realm.strip_prefix("http://gw.test").unwrap();
    let login = get(&gw, &format!("{path}?service={service}&scope={scope}")).await;
    assert_eq!(login.status, StatusCode::OK, "{:?}", login.body);
    let v: serde_json::Value = serde_json::from_slice(&login.body).unwrap();
    assert!(v["token"].as_str().unwrap().starts_with("v4.local."));
}

#[tokio::test]
async fn a_mount_without_from_never_reaches_the_upstream() {
    let upstream = FakeUpstream::new(|_| answer(StatusCode::ACCEPTED, &[], ""));
    let gw = gateway(PLAIN, &upstream);
    let d = format!("sha256:{}", "a".repeat(64));
    let r = call(
        &gw,
        Method::POST,
        &format!("/v2/m/app/blobs/uploads/?mount={d}"),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let seen = upstream.take();
    assert_eq!(seen[0].path_and_query, "/v2/team/app/blobs/uploads/");
}

/// An upstream whose blobs live in object storage: blob reads are redirected there, and the
/// storage answers only requests that carry no `Authorization`.
fn redirecting_registry(blob: &'static [u8]) -> Arc<FakeUpstream> {
    FakeUpstream::new(move |seen| {
        let length = blob.len().to_string();
        match seen.path_and_query.as_str() {
            p if p.starts_with("/storage/") && seen.authorization().is_none() => {
                answer(StatusCode::OK, &[], blob).map(|b| match seen.method {
                    Method::HEAD => body::empty(),
                    _ => b,
                })
            }
            p if p.starts_with("/storage/") => answer(StatusCode::FORBIDDEN, &[], ""),
            p if p.contains("/blobs/") => answer(
                StatusCode::TEMPORARY_REDIRECT,
                &[("location", "/storage/object?sig=1"), ("x-length", &length)],
                "",
            ),
            _ => answer(StatusCode::OK, &[], "{}"),
        }
    })
}

#[tokio::test]
async fn blob_redirects_are_followed_here_when_the_upstream_says_so_on_every_kind_of_route() {
    let blob: &'static [u8] = b"bytes kept in object storage";
    let digest = crate::oci::Digest::sha256_of(blob);
    let yaml = |redirects: &str, dir: &tempfile::TempDir| {
        format!(
            "upstreams: {{ reg: {{ url: \"{UPSTREAM}\", redirects: {redirects}, credentials: {{ basic: {{ username: u, password: p }} }} }} }}\nroutes:\n  - {{ prefix: \"c/\", upstream: reg, remote: \"team/\", cache: true }}\n  - {{ prefix: \"m/\", upstream: reg, remote: \"team/\" }}\ncache: {{ dir: \"{}\" }}\n",
            dir.path().display()
        )
    };
    for prefix in ["c", "m"] {
        let dir = tempfile::tempdir().unwrap();
        let upstream = redirecting_registry(blob);
        let gw = gateway(&yaml("follow", &dir), &upstream);
        let url = format!("/v2/{prefix}/app/blobs/{digest}");
        let head = call(&gw, Method::HEAD, &url, &[]).await;
        assert_eq!(head.status, StatusCode::OK, "{prefix}: HEAD followed here");
        assert!(head.header("location").is_none());
        let got = get(&gw, &url).await;
        assert_eq!(
            (got.status, &got.body[..]),
            (StatusCode::OK, blob),
            "{prefix}"
        );
        for seen in upstream.take() {
            if seen.path_and_query.starts_with("/storage/") {
                assert_eq!(seen.authorization(), None, "no credentials to the storage");
            }
        }
        // Passed on (the default), the client is redirected, to the upstream's storage URL.
        let dir = tempfile::tempdir().unwrap();
        let upstream = redirecting_registry(blob);
        let gw = gateway(&yaml("pass", &dir), &upstream);
        let head = call(&gw, Method::HEAD, &url, &[]).await;
        assert_eq!(head.status, StatusCode::TEMPORARY_REDIRECT, "{prefix}");
        assert_eq!(
            head.header("location"),
            Some("http://reg.test/storage/object?sig=1")
        );
    }
}

/// Two hosts and a prefix route on one registry, told apart by their remote namespaces.
const HOSTS: &str = r#"upstreams: { reg: { url: "http://reg.test" } }
routes:
  - { prefix: "m/", upstream: reg, remote: "team/" }
  - { host: quay.test, upstream: reg, remote: "q/" }
  - { host: "registry.test:5000", prefix: "lib/", upstream: reg, remote: "r/" }
"#;

#[tokio::test]
async fn a_named_host_picks_its_routes_and_unknown_hosts_are_never_asked() {
    let upstream = listing_registry("[]");
    let gw = gateway(HOSTS, &upstream);
    let asked = async |uri: &str| {
        let r = get(&gw, uri).await;
        let seen = upstream.take();
        (r, seen.first().map(|s| s.path_and_query.clone()))
    };
    // `ns` (containerd's mirrors), an in-path host, and no host at all.
    for (uri, upstream_path) in [
        (
            "/v2/app/manifests/v1?ns=quay.test",
            "/v2/q/app/manifests/v1",
        ),
        (
            "/v2/app/manifests/v1?ns=QUAY.test:443",
            "/v2/q/app/manifests/v1",
        ),
        ("/v2/quay.test/app/manifests/v1", "/v2/q/app/manifests/v1"),
        (
            "/v2/quay.test/app/manifests/v1?ns=x.test",
            "/v2/q/app/manifests/v1",
        ),
        // Cut after the segment as spelled, not after the canonical host's length.
        (
            "/v2/QUAY.test:443/app/manifests/v1",
            "/v2/q/app/manifests/v1",
        ),
        (
            "/v2/lib/app/tags/list?ns=registry.test:5000&n=2",
            "/v2/r/app/tags/list?n=2",
        ),
        (
            "/v2/registry.test:5000/lib/app/blobs/uploads/u?_state=s",
            "/v2/r/app/blobs/uploads/u?_state=s",
        ),
        ("/v2/m/app/manifests/v1", "/v2/team/app/manifests/v1"),
    ] {
        let (r, seen) = asked(uri).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}");
        assert_eq!(seen.as_deref(), Some(upstream_path), "{uri}");
    }
    // A host's routes do not open names without it, nor other hosts' names.
    for uri in [
        "/v2/app/manifests/v1",
        "/v2/lib/app/manifests/v1",
        "/v2/app/manifests/v1?ns=registry.test:5000",
        "/v2/registry.test/lib/app/manifests/v1",
    ] {
        let (r, seen) = asked(uri).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
            "{uri}"
        );
        assert_eq!(seen, None, "{uri}");
    }
    // An `ns` no route serves, or that is no host name, is a 404 at once, naming it.
    for ns in [
        "unknown.test",
        "127.0.0.1",
        "[::1]",
        "quay.test:0",
        "quay.test%2F..",
        "a..b",
        "",
        "quay.test@evil.test",
    ] {
        let (r, seen) = asked(&format!("/v2/app/manifests/v1?ns={ns}")).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{ns}");
        assert_eq!(r.error_code(), "NAME_UNKNOWN", "{ns}");
        assert_eq!(seen, None, "{ns}");
    }
    let (r, _) = asked("/v2/app/manifests/v1?ns=unknown.test").await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["errors"][0]["detail"]["ns"], "unknown.test");
    // The catalog is the prefix routes'; a host has none here.
    let (r, seen) = asked("/v2/_catalog?ns=quay.test").await;
    assert_eq!((r.status, seen), (StatusCode::NOT_FOUND, None));
}

#[tokio::test]
async fn urls_handed_back_name_the_host_the_way_the_request_did() {
    let upstream = FakeUpstream::new(|seen| match seen.path_and_query.as_str() {
        p if p.starts_with("/v2/q/app/tags/list") => {
            answer(StatusCode::OK, &[], r#"{"name":"q/app","tags":["b","a"]}"#)
        }
        _ => answer(
            StatusCode::ACCEPTED,
            &[("location", "/v2/q/app/blobs/uploads/u1?_state=s")],
            "",
        ),
    });
    let gw = gateway(HOSTS, &upstream);
    let post = async |uri: &str| call(&gw, Method::POST, uri, &[]).await;
    let r = post("/v2/app/blobs/uploads/?ns=quay.test").await;
    assert_eq!(
        r.header("location"),
        Some("http://gw.test/v2/app/blobs/uploads/u1?_state=s&ns=quay.test")
    );
    let r = post("/v2/quay.test/app/blobs/uploads/").await;
    assert_eq!(
        r.header("location"),
        Some("http://gw.test/v2/quay.test/app/blobs/uploads/u1?_state=s")
    );
    // Tags lists carry the name as the client knows it, and the next page keeps the host.
    let r = get(&gw, "/v2/quay.test/app/tags/list?n=1").await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"name": "quay.test/app", "tags": ["a"]})
    );
    assert_eq!(
        r.header("link"),
        Some(r#"</v2/quay.test/app/tags/list?last=a&n=1>; rel="next""#)
    );
    let r = get(&gw, "/v2/app/tags/list?ns=quay.test&n=1").await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["name"], "app");
    assert_eq!(
        r.header("link"),
        Some(r#"</v2/app/tags/list?last=a&n=1&ns=quay.test>; rel="next""#)
    );
    // A mount's `from` is a name inside the same host; one from elsewhere is dropped.
    upstream.take();
    let d = format!("sha256:{}", "a".repeat(64));
    post(&format!(
        "/v2/quay.test/app/blobs/uploads/?mount={d}&from=quay.test/base"
    ))
    .await;
    post(&format!(
        "/v2/app/blobs/uploads/?ns=quay.test&mount={d}&from=base"
    ))
    .await;
    post(&format!(
        "/v2/quay.test/app/blobs/uploads/?mount={d}&from=m/base"
    ))
    .await;
    let seen: Vec<String> = upstream
        .take()
        .into_iter()
        .map(|s| s.path_and_query)
        .collect();
    let mounted = format!(
        "/v2/q/app/blobs/uploads/?mount=sha256%3A{}&from=q%2Fbase",
        "a".repeat(64)
    );
    assert_eq!(
        seen,
        [
            mounted.as_str(),
            mounted.as_str(),
            "/v2/q/app/blobs/uploads/"
        ]
    );
}

#[tokio::test]
async fn authorisation_sees_names_qualified_with_their_host() {
    let setup = auth_setup();
    let yaml = setup.yaml.replace(
        "routes:\n",
        "routes:\n  - { host: quay.test, upstream: reg, remote: \"q/\" }\n",
    );
    let upstream = open_registry(Arc::new(AtomicUsize::new(0)));
    let gw = gateway(&yaml, &upstream);
    let push = async |uri: &str, token: Option<&str>| {
        let auth: Vec<(&str, &str)> = token.map(|t| ("authorization", t)).into_iter().collect();
        call(&gw, Method::POST, uri, &auth).await
    };
    for uri in [
        "/v2/app/blobs/uploads/?ns=quay.test",
        "/v2/quay.test/app/blobs/uploads/",
    ] {
        let r = push(uri, None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{uri}");
        assert_eq!(
            challenge_param(&r, "scope").as_deref(),
            Some("repository:quay.test/app:pull,push"),
            "{uri}"
        );
        // A token for the bare name is for a prefix route's repository, not this host's.
        let bare = client_token(&gw, &[Scope::repository("app", &["pull", "push"])]);
        assert_eq!(
            push(uri, Some(&bare)).await.status,
            StatusCode::UNAUTHORIZED
        );
        let qualified = client_token(
            &gw,
            &[Scope::repository("quay.test/app", &["pull", "push"])],
        );
        assert_eq!(
            push(uri, Some(&qualified)).await.status,
            StatusCode::OK,
            "{uri}"
        );
    }
    assert_eq!(
        upstream.take().len(),
        2,
        "only the admitted pushes went upstream"
    );
    // The token server takes scopes of hosts with a port, as their challenges name them.
    let login = get(
        &gw,
        "/token?service=registry.example&scope=repository:registry.test:5000/lib/app:pull",
    )
    .await;
    assert_eq!(login.status, StatusCode::OK, "{:?}", login.body);
}

//! Small servers of the tests' own: a distribution-style token realm (ES256 JWTs with an
//! `x5c` chain, which the real `docker-registry` verifies), and a static file server standing
//! in for object storage behind blob redirects.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use super::http::{Body, full, rt};

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

/// Serves `handler` on a fresh 127.0.0.1 port until the process ends.
fn serve(handler: Handler) -> SocketAddr {
    let listener = rt()
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt().spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let h = handler.clone();
                    async move { Ok::<_, Infallible>(h(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body.into()));
    *r.status_mut() = status;
    r
}

/// What the token realm was asked.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub method: String,
    pub authorization: Option<String>,
    /// The query of a GET, or the form body of a POST.
    pub query: String,
}

pub struct TokenServer {
    pub addr: SocketAddr,
    pub cert_path: PathBuf,
    pub issuer: String,
    pub service: String,
    requests: Arc<Mutex<Vec<TokenRequest>>>,
    issued: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl TokenServer {
    /// A realm that grants every requested scope, to anyone when `creds` is `None`, else only
    /// to that Basic user.
    pub fn start(creds: Option<(&str, &str)>) -> TokenServer {
        TokenServer::start_with(creds, None)
    }

    /// Like [`TokenServer::start`], and also grants OAuth2 POSTs presenting `refresh_token`.
    pub fn start_with(creds: Option<(&str, &str)>, refresh_token: Option<&str>) -> TokenServer {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["token-signer".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_path = dir.path().join("token-signer.pem");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        let x5c = base64::engine::general_purpose::STANDARD.encode(cert.der());
        let encoding = Arc::new(
            jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
        );
        let issuer = "test-issuer".to_string();
        let service = "test-registry".to_string();
        let expected = creds.map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let (iss, svc) = (issuer.clone(), service.clone());
        let refresh_token = refresh_token.map(str::to_string);
        let issued = Arc::new(Mutex::new(Vec::new()));
        let issued_log = issued.clone();
        let handler: Handler = Arc::new(move |req: Request<Incoming>| {
            let seen = seen.clone();
            let issued_log = issued_log.clone();
            let expected = expected.clone();
            let refresh_token = refresh_token.clone();
            let (iss, svc, x5c, encoding) =
                (iss.clone(), svc.clone(), x5c.clone(), encoding.clone());
            Box::pin(async move {
                let method = req.method().to_string();
                let authorization = req
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap_or_default().to_string());
                let query = if req.method() == http::Method::POST {
                    use http_body_util::BodyExt;
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    String::from_utf8_lossy(&body).into_owned()
                } else {
                    req.uri().query().unwrap_or_default().to_string()
                };
                seen.lock().unwrap().push(TokenRequest {
                    method: method.clone(),
                    authorization: authorization.clone(),
                    query: query.clone(),
                });
                let form = |key: &str| {
                    url::form_urlencoded::parse(query.as_bytes())
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| v.into_owned())
                };
                let allowed = if method == "POST" {
                    form("grant_type").as_deref() == Some("refresh_token")
                        && refresh_token.is_some()
                        && form("refresh_token") == refresh_token
                } else {
                    expected.is_none() || authorization == expected
                };
                if allowed {
                    let scopes: Vec<serde_json::Value> =
                        url::form_urlencoded::parse(query.as_bytes())
                            .filter(|(k, _)| k == "scope")
                            .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
                            .filter_map(|v| {
                                let (kind, rest) = v.split_once(':')?;
                                let (name, actions) = rest.rsplit_once(':')?;
                                Some(serde_json::json!({
                                    "type": kind, "name": name,
                                    "actions": actions.split(',').collect::<Vec<_>>(),
                                }))
                            })
                            .collect();
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs();
                    let claims = serde_json::json!({
                        "iss": iss, "sub": "tester", "aud": svc,
                        "exp": now + 300, "nbf": now - 10, "iat": now,
                        "jti": format!("{now}-{}", scopes.len()),
                        "access": scopes,
                    });
                    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
                    header.x5c = Some(vec![x5c.clone()]);
                    let token = jsonwebtoken::encode(&header, &claims, &encoding).unwrap();
                    issued_log.lock().unwrap().push(token.clone());
                    respond(
                    StatusCode::OK,
                    serde_json::json!({"token": token, "access_token": token, "expires_in": 300})
                        .to_string(),
                )
                } else {
                    respond(StatusCode::UNAUTHORIZED, r#"{"details":"bad credentials"}"#)
                }
            })
        });
        let addr = serve(handler);
        TokenServer {
            addr,
            cert_path,
            issuer,
            service,
            requests,
            issued,
            _dir: dir,
        }
    }

    /// Every token this realm handed out.
    pub fn issued(&self) -> Vec<String> {
        self.issued.lock().unwrap().clone()
    }

    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// The `auth:` section for a `docker-registry` that trusts this realm.
    pub fn registry_auth_yaml(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            self.realm(),
            self.service,
            self.issuer,
            self.cert_path.display()
        )
    }
}

/// A path that was requested, and the `Authorization` it carried.
pub type SeenRequest = (String, Option<String>);

/// Serves files under `root` (object storage behind blob redirects) and remembers whether
/// any request carried credentials.
pub struct StaticServer {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<SeenRequest>>>,
}

impl StaticServer {
    pub fn start(root: PathBuf) -> StaticServer {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        // Files are immutable here (blobs, fixtures): each is read once and shared by every
        // response, so many concurrent downloads cost one copy.
        let files: Arc<Mutex<std::collections::HashMap<PathBuf, Bytes>>> = Arc::default();
        let handler: Handler = Arc::new(move |req: Request<Incoming>| {
            let auth = req
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap_or_default().to_string());
            let path = req.uri().path().to_string();
            seen.lock().unwrap().push((path.clone(), auth));
            let file = root.join(path.trim_start_matches('/'));
            let cached = files.lock().unwrap().get(&file).cloned();
            let read = cached.map(Ok).unwrap_or_else(|| {
                let data = Bytes::from(std::fs::read(&file)?);
                files.lock().unwrap().insert(file.clone(), data.clone());
                Ok::<_, std::io::Error>(data)
            });
            let result = match read {
                Ok(data) if !path.contains("..") => {
                    let len = data.len();
                    let mut r = respond(StatusCode::OK, data);
                    r.headers_mut().insert("content-length", len.into());
                    if req.method() == http::Method::HEAD {
                        *r.body_mut() = full(Bytes::new());
                    }
                    r
                }
                _ => respond(StatusCode::NOT_FOUND, "no such object"),
            };
            Box::pin(async move { result })
        });
        StaticServer {
            addr: serve(handler),
            requests,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Paths requested, and the Authorization each carried.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.requests.lock().unwrap().clone()
    }
}

/// An OIDC identity provider: discovery document, JWKS, and JWTs minted with its current
/// key (ES256). Keys can be rotated to exercise JWKS refresh.
pub struct IdentityProvider {
    pub addr: SocketAddr,
    keys: Arc<Mutex<Vec<(String, rcgen::KeyPair)>>>,
}

impl IdentityProvider {
    pub fn start() -> IdentityProvider {
        let keys = Arc::new(Mutex::new(vec![(
            "idp-key-1".to_string(),
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        )]));
        let published = keys.clone();
        let issuer_cell: Arc<Mutex<String>> = Arc::new(Mutex::new(String::new()));
        let issuer_for_handler = issuer_cell.clone();
        let handler: Handler = Arc::new(move |req: Request<Incoming>| {
            let issuer = issuer_for_handler.lock().unwrap().clone();
            let result = match req.uri().path() {
                "/.well-known/openid-configuration" => respond(
                    StatusCode::OK,
                    serde_json::json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks")})
                        .to_string(),
                ),
                "/jwks" => {
                    let keys: Vec<serde_json::Value> = published
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|(kid, k)| super::tokens::jwk_of(k, Some(kid)))
                        .collect();
                    respond(
                        StatusCode::OK,
                        serde_json::json!({ "keys": keys }).to_string(),
                    )
                }
                _ => respond(StatusCode::NOT_FOUND, "not found"),
            };
            Box::pin(async move { result })
        });
        let addr = serve(handler);
        *issuer_cell.lock().unwrap() = format!("http://{addr}");
        IdentityProvider { addr, keys }
    }

    pub fn issuer(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a new signing key and makes it the current one.
    pub fn rotate(&self) {
        let mut keys = self.keys.lock().unwrap();
        let kid = format!("idp-key-{}", keys.len() + 1);
        keys.push((
            kid,
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        ));
    }

    /// A JWT with these claims, signed with the current key.
    pub fn mint(&self, claims: &serde_json::Value) -> String {
        let keys = self.keys.lock().unwrap();
        let (kid, key) = keys.last().unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.clone());
        let encoding =
            jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&header, claims, &encoding).unwrap()
    }
}

/// A registry that lies: every blob and manifest it serves is `bad`, whatever digest was
/// asked for. Remembers the paths it was asked.
pub struct LyingRegistry {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

impl LyingRegistry {
    pub fn start(bad: &'static [u8]) -> LyingRegistry {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let handler: Handler = Arc::new(move |req: Request<Incoming>| {
            let path = req.uri().path().to_string();
            seen.lock()
                .unwrap()
                .push(format!("{} {path}", req.method()));
            let mut r = if path == "/v2/" {
                respond(StatusCode::OK, "{}")
            } else if path.contains("/blobs/") || path.contains("/manifests/") {
                let mut r = respond(StatusCode::OK, bad);
                r.headers_mut().insert("content-length", bad.len().into());
                let kind = if path.contains("/manifests/") {
                    "application/vnd.oci.image.manifest.v1+json"
                } else {
                    "application/octet-stream"
                };
                r.headers_mut()
                    .insert("content-type", kind.parse().unwrap());
                r
            } else {
                respond(StatusCode::NOT_FOUND, "{}")
            };
            if req.method() == http::Method::HEAD {
                *r.body_mut() = full(Bytes::new());
            }
            Box::pin(async move { r })
        });
        LyingRegistry {
            addr: serve(handler),
            requests,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `METHOD /path` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// A TCP relay to 127.0.0.1:`target` whose connections can be cut off silently: after
/// [`FreezableRelay::freeze`], nothing moves on the connections open then, while their sockets
/// stay open (a peer behind a dead path or a dropped NAT entry). Later connections work.
pub struct FreezableRelay {
    pub port: u16,
    generation: Arc<AtomicU64>,
}

impl FreezableRelay {
    pub fn start(target: u16) -> FreezableRelay {
        let listener = rt()
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let generation = Arc::new(AtomicU64::new(0));
        let current = generation.clone();
        rt().spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let born = current.load(Ordering::SeqCst);
                let current = current.clone();
                tokio::spawn(async move {
                    let Ok(upstream) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let frozen = move || current.load(Ordering::SeqCst) != born;
                    let (client_read, client_write) = client.into_split();
                    let (upstream_read, upstream_write) = upstream.into_split();
                    tokio::join!(
                        relay(client_read, upstream_write, frozen.clone()),
                        relay(upstream_read, client_write, frozen)
                    );
                });
            }
        });
        FreezableRelay { port, generation }
    }

    pub fn freeze(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: impl Fn() -> bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen() {
            // Both sockets stay open and nothing moves, ever.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

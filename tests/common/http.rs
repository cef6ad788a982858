//! A small blocking HTTP client for tests, on a process-wide tokio runtime that also runs
//! the in-process fixture servers.

use std::sync::OnceLock;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use sha2::Digest;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or_default().to_string())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first OCI error code of the body.
    pub fn error_code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

pub fn request(method: &str, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Resp {
    request_body(method, url, headers, full(body.into()))
}

pub fn request_body(method: &str, url: &str, headers: &[(&str, &str)], body: Body) -> Resp {
    let mut b = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(body).unwrap();
    rt().block_on(async {
        let resp = client()
            .request(req)
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e:?}"));
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    })
}

pub fn get(url: &str) -> Resp {
    request("GET", url, &[], Bytes::new())
}

pub fn get_with(url: &str, headers: &[(&str, &str)]) -> Resp {
    request("GET", url, headers, Bytes::new())
}

/// GET with `Authorization: Bearer <token>`, accepting OCI manifests.
pub fn bearer_get(url: &str, token: &str) -> Resp {
    let auth = format!("Bearer {token}");
    get_with(
        url,
        &[
            ("accept", "application/vnd.oci.image.manifest.v1+json"),
            ("authorization", &auth),
        ],
    )
}

pub fn head(url: &str, headers: &[(&str, &str)]) -> Resp {
    request("HEAD", url, headers, Bytes::new())
}

/// Starts a GET and hands back its body unread, to be streamed (or deliberately stalled).
pub fn start_get(url: &str) -> hyper::body::Incoming {
    let req = Request::get(url).body(full(Bytes::new())).unwrap();
    rt().block_on(async { client().request(req).await.unwrap().into_body() })
}

/// GETs `url` and hashes the body as it streams (never holding it); returns status,
/// headers, byte count and `sha256:` digest.
pub fn get_streamed_digest(url: &str) -> (u16, HeaderMap, u64, String) {
    let (status, headers, n, digest) = get_streamed(url, &[]);
    (status, headers, n, digest.unwrap())
}

/// Like [`get_streamed_digest`], but a transfer that breaks off is an `Err` (with the bytes
/// counted so far; status 0 if not even the head arrived), not a panic.
pub fn get_streamed(
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, HeaderMap, u64, Result<String, String>) {
    rt().block_on(async {
        let mut req = Request::get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(full(Bytes::new())).unwrap();
        // A transfer can break off before the response head is complete: status 0.
        let resp = match client().request(req).await {
            Ok(r) => r,
            Err(e) => return (0, HeaderMap::new(), 0, Err(e.to_string())),
        };
        let (parts, mut body) = resp.into_parts();
        let mut hasher = sha2::Sha256::new();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        n += data.len() as u64;
                        hasher.update(&data);
                    }
                }
                Err(e) => return (parts.status.as_u16(), parts.headers, n, Err(e.to_string())),
            }
        }
        (
            parts.status.as_u16(),
            parts.headers,
            n,
            Ok(format!("sha256:{}", hex::encode(hasher.finalize()))),
        )
    })
}

//! Header hygiene at the proxy's two edges, and the public URL clients reach it by.
//!
//! What a client sent becomes what an upstream may see ([`forward_headers`]); what an
//! upstream answered loses its hop-by-hop headers ([`strip_hop_by_hop`]); upload bodies must
//! be blob bytes ([`refuse_form_body`]). Knows nothing of routes, names or auth.

use http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use url::Url;

use crate::oci::{ErrorCode, OciError};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the ones a proxy must not pass on.
fn is_hop_by_hop(name: &header::HeaderName, connection_listed: &[String]) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    ) || connection_listed.iter().any(|c| c == name.as_str())
}

fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect()
}

/// The client's headers as the upstream may see them: never the client's `Authorization`
/// (its token is for us, not for the upstream), never `Host` or hop-by-hop headers, and no
/// forwarding headers: they describe the client's hop to us, and a registry that trusted
/// them would build its `Location`s on our public host with its own names.
pub(crate) fn forward_headers(headers: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(headers);
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let dropped = is_hop_by_hop(name, &listed)
            || name == header::HOST
            || name == header::AUTHORIZATION
            || name == header::EXPECT
            || name == header::COOKIE
            || name == header::FORWARDED
            || name.as_str().starts_with("x-forwarded-");
        if !dropped {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// An upstream's answer loses the headers that were about its hop to us.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed = connection_listed(headers);
    let names: Vec<header::HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n, &listed))
        .cloned()
        .collect();
    for n in names {
        headers.remove(n);
    }
}

/// `scheme://host` for absolute URLs handed to clients: `server.public_url`, else the
/// forwarded or direct `Host` with the forwarded or actual scheme.
pub(crate) fn public_base<B>(public_url: Option<&Url>, req: &Request<B>, tls: bool) -> String {
    if let Some(url) = public_url {
        return url.as_str().trim_end_matches('/').to_string();
    }
    let first = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let scheme = first("x-forwarded-proto")
        .filter(|p| p == "http" || p == "https")
        .unwrap_or_else(|| if tls { "https" } else { "http" }.to_string());
    let host = first("x-forwarded-host")
        .or_else(|| first("host"))
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'@')
        })
        .unwrap_or_else(|| "localhost".to_string());
    format!("{scheme}://{host}")
}

/// Registries read upload parameters (`mount`, `from`, `digest`) from form bodies as well as
/// from the query, so a form body could carry a mount past admission: upload endpoints
/// take none. A `Content-Type` that cannot be read is refused too.
pub(crate) fn refuse_form_body(headers: &HeaderMap) -> Result<(), OciError> {
    let is_form = |v: &HeaderValue| {
        v.to_str().map_or(true, |t| {
            let essence = crate::oci::manifest::essence(t);
            essence == "application/x-www-form-urlencoded" || essence.starts_with("multipart/")
        })
    };
    if headers.get_all(header::CONTENT_TYPE).iter().any(is_form) {
        return Err(OciError::new(
            ErrorCode::Unsupported,
            "upload bodies are blob bytes: form bodies are not accepted",
        )
        .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_headers_drop_credentials_and_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client"),
        );
        h.insert(header::HOST, HeaderValue::from_static("proxy"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
        h.append(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
        );
        h.insert(header::RANGE, HeaderValue::from_static("bytes=0-9"));
        h.insert(
            "x-forwarded-host",
            HeaderValue::from_static("public.example.com"),
        );
        h.insert(
            header::FORWARDED,
            HeaderValue::from_static("host=public.example.com"),
        );
        h.insert(header::COOKIE, HeaderValue::from_static("session=1"));
        h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        h.insert(
            "proxy-authorization",
            HeaderValue::from_static("Basic eA=="),
        );
        let out = forward_headers(&h);
        for dropped in [
            "x-forwarded-host",
            "forwarded",
            "authorization",
            "host",
            "x-private",
            "transfer-encoding",
            "connection",
            "cookie",
            "expect",
            "proxy-authorization",
        ] {
            assert!(out.get(dropped).is_none(), "{dropped} was forwarded");
        }
        assert_eq!(out.get_all(header::ACCEPT).iter().count(), 2);
        assert_eq!(out.get(header::RANGE).unwrap(), "bytes=0-9");
    }

    #[test]
    fn answers_lose_hop_by_hop_headers_and_those_connection_lists() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("X-Upstream-Hop"),
        );
        h.insert("x-upstream-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            "docker-content-digest",
            HeaderValue::from_static("sha256:x"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("docker-content-digest"));
    }

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/v2/");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn public_base_prefers_config_then_forwarded_then_host() {
        let url = Url::parse("https://registry.example.com/").unwrap();
        let req = request(&[
            ("host", "internal:5000"),
            ("x-forwarded-host", "edge.example"),
        ]);
        assert_eq!(
            public_base(Some(&url), &req, false),
            "https://registry.example.com"
        );
        assert_eq!(public_base(None, &req, false), "http://edge.example");
        let req = request(&[
            ("host", "internal:5000"),
            ("x-forwarded-proto", "https, http"),
        ]);
        assert_eq!(public_base(None, &req, false), "https://internal:5000");
        assert_eq!(
            public_base(None, &request(&[("host", "h:1")]), true),
            "https://h:1"
        );
        // A forwarded scheme other than http(s) is ignored; a host that would make the URL
        // point elsewhere is not used.
        let req = request(&[("host", "h"), ("x-forwarded-proto", "javascript")]);
        assert_eq!(public_base(None, &req, false), "http://h");
        let req = request(&[("host", "evil.example/@x")]);
        assert_eq!(public_base(None, &req, false), "http://localhost");
    }

    #[test]
    fn upload_bodies_must_not_be_forms() {
        let with = |t: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(t));
            h
        };
        assert!(refuse_form_body(&HeaderMap::new()).is_ok());
        assert!(refuse_form_body(&with("application/octet-stream")).is_ok());
        for form in [
            "application/x-www-form-urlencoded",
            "Application/X-WWW-Form-Urlencoded; charset=utf-8",
            "multipart/form-data; boundary=x",
        ] {
            let e = refuse_form_body(&with(form)).unwrap_err();
            assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{form}");
        }
    }
}

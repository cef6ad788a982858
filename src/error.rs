//! Every way a request can fail, and the one place failures become HTTP answers.

use http::{HeaderValue, Response, StatusCode, header};

use crate::auth::Denied;
use crate::body::{self, Body};
use crate::oci::{API_VERSION, ErrorCode, OciError};
use crate::upstream::UpstreamError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A protocol-level refusal: bad name, unknown route, …
    #[error("{0}")]
    Oci(OciError),
    /// The client's token is missing, invalid or too weak: a 401 with a challenge.
    #[error("{}", .0.error)]
    Denied(Denied),
    /// A token-server login failed: a 401 asking for Basic credentials.
    #[error("{0}")]
    Login(OciError),
    /// Rate-limited: a 429 with `Retry-After`.
    #[error("{error}")]
    TooMany {
        error: OciError,
        retry_after: std::time::Duration,
    },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// An upstream answer we must rewrite was not what the protocol promises.
    #[error("upstream {upstream} sent an unusable {what}: {reason}")]
    BadUpstreamAnswer {
        upstream: String,
        what: &'static str,
        reason: String,
    },
}

impl From<OciError> for GatewayError {
    fn from(e: OciError) -> Self {
        GatewayError::Oci(e)
    }
}

impl GatewayError {
    fn to_oci(&self) -> OciError {
        match self {
            GatewayError::Oci(e) => e.clone(),
            GatewayError::Denied(d) => d.error.clone(),
            GatewayError::Login(e) => e.clone().with_status(StatusCode::UNAUTHORIZED),
            GatewayError::TooMany { error, .. } => error.clone(),
            GatewayError::Upstream(UpstreamError::TokenRefused { upstream }) => {
                OciError::new(ErrorCode::Denied, "the upstream registry refused access")
                    .with_detail(serde_json::json!({ "upstream": upstream }))
            }
            GatewayError::Upstream(UpstreamError::Offline { .. }) => {
                OciError::new(ErrorCode::Unavailable, self.to_string())
                    .with_status(StatusCode::SERVICE_UNAVAILABLE)
            }
            GatewayError::Upstream(UpstreamError::Timeout { .. }) => {
                OciError::new(ErrorCode::Unavailable, self.to_string())
                    .with_status(StatusCode::GATEWAY_TIMEOUT)
            }
            GatewayError::Upstream(_) | GatewayError::BadUpstreamAnswer { .. } => {
                OciError::new(ErrorCode::Unavailable, self.to_string())
            }
        }
    }

    pub(crate) fn into_response(self) -> Response<Body> {
        let mut response = oci_response(&self.to_oci());
        let challenge = match &self {
            GatewayError::Denied(d) => HeaderValue::from_str(&d.challenge.to_string()).ok(),
            GatewayError::Login(_) => Some(crate::token::login_challenge()),
            _ => None,
        };
        if let Some(v) = challenge {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        if let GatewayError::TooMany { retry_after, .. } = &self {
            // Whole seconds, rounded up: `Retry-After: 0` would invite an instant retry.
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

/// An OCI error as an HTTP answer.
pub(crate) fn oci_response(e: &OciError) -> Response<Body> {
    registry_json(e.status, e.body())
}

/// A JSON answer of the registry API, with its version header.
pub(crate) fn registry_json(status: StatusCode, json: String) -> Response<Body> {
    let mut response = Response::new(body::full(json));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static(API_VERSION),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{Challenge, Scope};
    use std::time::Duration;

    fn upstream(e: UpstreamError) -> GatewayError {
        GatewayError::Upstream(e)
    }

    #[test]
    fn every_error_has_its_status_code_and_headers() {
        let name = || "reg".to_string();
        let denied = crate::auth::Denied::bearer(
            "https://r.test/token",
            "r.test",
            &[Scope::repository("a", &["pull"])],
            None,
            OciError::new(ErrorCode::Unauthorized, "authentication required"),
        );
        let table: Vec<(GatewayError, StatusCode, &str, Option<&str>)> = vec![
            (
                OciError::new(ErrorCode::NameUnknown, "x").into(),
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                None,
            ),
            (
                OciError::new(ErrorCode::ManifestUnknown, "x").into(),
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                None,
            ),
            (
                OciError::new(ErrorCode::NameInvalid, "x").into(),
                StatusCode::BAD_REQUEST,
                "NAME_INVALID",
                None,
            ),
            (
                OciError::new(ErrorCode::Denied, "x").into(),
                StatusCode::FORBIDDEN,
                "DENIED",
                None,
            ),
            (
                GatewayError::Denied(denied),
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                Some(
                    r#"Bearer realm="https://r.test/token",service="r.test",scope="repository:a:pull""#,
                ),
            ),
            (
                GatewayError::Login(OciError::new(ErrorCode::Unauthorized, "bad password")),
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                Some("Basic realm=\"ocigate token server\""),
            ),
            (
                GatewayError::TooMany {
                    error: OciError::new(ErrorCode::TooManyRequests, "slow down"),
                    retry_after: Duration::from_millis(1500),
                },
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                None,
            ),
            (
                upstream(UpstreamError::Unreachable {
                    upstream: name(),
                    reason: "refused".into(),
                }),
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                None,
            ),
            (
                upstream(UpstreamError::Timeout { upstream: name() }),
                StatusCode::GATEWAY_TIMEOUT,
                "UNAVAILABLE",
                None,
            ),
            (
                upstream(UpstreamError::Offline { upstream: name() }),
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                None,
            ),
            (
                upstream(UpstreamError::TokenRefused { upstream: name() }),
                StatusCode::FORBIDDEN,
                "DENIED",
                None,
            ),
            (
                upstream(UpstreamError::Redirect {
                    upstream: name(),
                    reason: "loop".into(),
                }),
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                None,
            ),
            (
                GatewayError::BadUpstreamAnswer {
                    upstream: name(),
                    what: "tags list",
                    reason: "not JSON".into(),
                },
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                None,
            ),
        ];
        let refused = crate::auth::Denied::bearer(
            "https://r.test/token",
            "r.test",
            &[],
            Some(crate::oci::challenge::BearerError::InsufficientScope),
            OciError::new(ErrorCode::Denied, "no"),
        );
        let response = GatewayError::Denied(refused).into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let c = Challenge::parse(
            response.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(c.param("error"), Some("insufficient_scope"));
        assert_eq!(c.param("scope"), None, "no scope asked, none named");
        for (error, status, code, challenge) in table {
            let what = error.to_string();
            let retry = matches!(error, GatewayError::TooMany { .. });
            let response = error.into_response();
            assert_eq!(response.status(), status, "{what}");
            let h = response.headers();
            assert_eq!(h["content-type"], "application/json", "{what}");
            assert_eq!(h["docker-distribution-api-version"], API_VERSION);
            assert_eq!(
                h.get(header::WWW_AUTHENTICATE).map(|v| v.to_str().unwrap()),
                challenge,
                "{what}"
            );
            // Retry-After in whole seconds, rounded up.
            assert_eq!(
                h.get(header::RETRY_AFTER).is_some_and(|v| v == "2"),
                retry,
                "{what}"
            );
            let body = body_bytes(response);
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["errors"][0]["code"], code, "{what}");
        }
    }

    fn body_bytes(response: Response<Body>) -> Vec<u8> {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(response.into_body().collect())
            .unwrap()
            .to_bytes()
            .to_vec()
    }
}

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
    pub fn to_oci(&self) -> OciError {
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

    pub fn into_response(self) -> Response<Body> {
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
pub fn oci_response(e: &OciError) -> Response<Body> {
    registry_json(e.status, e.body())
}

/// A JSON answer of the registry API, with its version header.
pub fn registry_json(status: StatusCode, json: String) -> Response<Body> {
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

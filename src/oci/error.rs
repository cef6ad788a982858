//! The OCI error vocabulary and its JSON body: `{"errors":[{"code","message","detail"}]}`.

use http::StatusCode;
use serde::Serialize;

/// Error codes from the distribution spec, plus the gateway's own for upstream trouble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorCode {
    BlobUnknown,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    /// A `Range` outside the object (416).
    RangeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    /// The upstream could not be reached or answered nonsense.
    Unavailable,
    Unknown,
}

impl ErrorCode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }

    /// The status the spec pairs with the code.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameUnknown => StatusCode::NOT_FOUND,
            ErrorCode::DigestInvalid | ErrorCode::NameInvalid => StatusCode::BAD_REQUEST,
            ErrorCode::RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Denied => StatusCode::FORBIDDEN,
            ErrorCode::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::BAD_GATEWAY,
            ErrorCode::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// One protocol error, ready to become an HTTP answer.
#[derive(Debug, Clone)]
pub struct OciError {
    pub(crate) code: ErrorCode,
    pub(crate) status: StatusCode,
    pub message: String,
    pub(crate) detail: Option<serde_json::Value>,
}

impl OciError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        OciError {
            code,
            status: code.status(),
            message: message.into(),
            detail: None,
        }
    }

    pub(crate) fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub(crate) fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    /// The spec's JSON body.
    pub(crate) fn body(&self) -> String {
        #[derive(Serialize)]
        struct Entry<'a> {
            code: &'a str,
            message: &'a str,
            detail: &'a serde_json::Value,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            errors: [Entry<'a>; 1],
        }
        let null = serde_json::Value::Null;
        let body = Body {
            errors: [Entry {
                code: self.code.as_str(),
                message: &self.message,
                detail: self.detail.as_ref().unwrap_or(&null),
            }],
        };
        serde_json::to_string(&body).unwrap_or_else(|_| String::from("{\"errors\":[]}"))
    }
}

impl std::fmt::Display for OciError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_spec_shaped() {
        let e = OciError::new(ErrorCode::NameUnknown, "no route")
            .with_detail(serde_json::json!({"name": "x"}));
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "NAME_UNKNOWN");
        assert_eq!(v["errors"][0]["message"], "no route");
        assert_eq!(v["errors"][0]["detail"]["name"], "x");
        assert_eq!(e.status, StatusCode::NOT_FOUND);
    }
}

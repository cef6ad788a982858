//! `/v2/` request paths, parsed from the right so that repository names may have any number of
//! components, including ones literally called `blobs` or `manifests`.

use std::fmt;

use super::error::{ErrorCode, OciError};

/// A content digest, validated: `sha256:` + 64 or `sha512:` + 128 lower-case hex characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(digest: &str) -> Result<Digest, OciError> {
        validate_digest(digest)?;
        Ok(Digest(digest.to_string()))
    }

    /// The SHA-256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest(format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(bytes))
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_sha256(&self) -> bool {
        self.0.starts_with("sha256:")
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<&str> for Digest {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// What a `/v2/…` path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/v2/<name>/tags/list`.
    Tags,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest(Reference),
    /// `/v2/<name>/blobs/<digest>`.
    Blob(Digest),
    /// `/v2/<name>/blobs/uploads/`: start an upload (or mount, or monolithic POST).
    UploadStart,
    /// `/v2/<name>/blobs/uploads/<id>`: PATCH, PUT, GET status, DELETE cancel.
    Upload(String),
    /// `/v2/<name>/referrers/<digest>`.
    Referrers(Digest),
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Reference::Tag(s) => s,
            Reference::Digest(d) => d.as_str(),
        }
    }

    /// A tag or a digest (what has a `:` must be a digest), validated.
    pub(crate) fn parse(reference: &str) -> Result<Reference, OciError> {
        if reference.contains(':') {
            return Digest::parse(reference).map(Reference::Digest);
        }
        validate_tag(reference)?;
        Ok(Reference::Tag(reference.to_string()))
    }
}

/// A parsed `/v2/` path: the endpoint and, for repository endpoints, the repository name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiPath {
    pub(crate) name: Option<String>,
    pub(crate) endpoint: Endpoint,
}

impl ApiPath {
    /// The path after the name (`manifests/latest`, `blobs/uploads/`, …), to be appended to a
    /// rewritten name.
    pub(crate) fn suffix(&self) -> String {
        match &self.endpoint {
            Endpoint::Base | Endpoint::Catalog => String::new(),
            Endpoint::Tags => "tags/list".into(),
            Endpoint::Manifest(r) => format!("manifests/{}", r.as_str()),
            Endpoint::Blob(d) => format!("blobs/{d}"),
            Endpoint::UploadStart => "blobs/uploads/".into(),
            Endpoint::Upload(id) => format!("blobs/uploads/{id}"),
            Endpoint::Referrers(d) => format!("referrers/{d}"),
        }
    }

    /// Parses a request path. `None` for paths outside `/v2`; an `OciError` for `/v2` paths
    /// that name no endpoint or carry an invalid name, tag or digest. A manifest read
    /// (`GET`/`HEAD`) by an invalid reference is `404 MANIFEST_UNKNOWN`, as the registry
    /// answers: no manifest has that name. A write by one stays a `400`.
    pub(crate) fn parse(path: &str, method: &http::Method) -> Option<Result<ApiPath, OciError>> {
        let rest = match path.strip_prefix("/v2") {
            Some("") | Some("/") => {
                return Some(Ok(ApiPath {
                    name: None,
                    endpoint: Endpoint::Base,
                }));
            }
            Some(rest) => rest.strip_prefix('/')?,
            None => return None,
        };
        let read = method == http::Method::GET || method == http::Method::HEAD;
        Some(parse_rest(rest, read))
    }
}

fn parse_rest(rest: &str, read: bool) -> Result<ApiPath, OciError> {
    if rest == "_catalog" {
        return Ok(ApiPath {
            name: None,
            endpoint: Endpoint::Catalog,
        });
    }
    let (name, segment) = split_endpoint(rest).ok_or_else(|| {
        OciError::new(ErrorCode::NameUnknown, "no such endpoint")
            .with_detail(serde_json::json!({ "path": format!("/v2/{rest}") }))
    })?;
    validate_name(name)?;
    let endpoint = match segment {
        Segment::Tags => Endpoint::Tags,
        Segment::UploadStart => Endpoint::UploadStart,
        Segment::Manifest(reference) => {
            Endpoint::Manifest(Reference::parse(reference).map_err(|e| {
                match read {
                    true => OciError::new(ErrorCode::ManifestUnknown, "manifest unknown")
                        .with_detail(serde_json::json!({ "reference": reference })),
                    false => e,
                }
            })?)
        }
        Segment::Blob(d) => Endpoint::Blob(Digest::parse(d)?),
        Segment::Referrers(d) => Endpoint::Referrers(Digest::parse(d)?),
        Segment::Upload(id) => {
            validate_upload_id(id)?;
            Endpoint::Upload(id.to_string())
        }
    };
    Ok(ApiPath {
        name: Some(name.to_string()),
        endpoint,
    })
}

/// The endpoint part of a repository path, not yet validated.
enum Segment<'a> {
    Tags,
    UploadStart,
    Upload(&'a str),
    Manifest(&'a str),
    Blob(&'a str),
    Referrers(&'a str),
}

fn split_endpoint(rest: &str) -> Option<(&str, Segment<'_>)> {
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some((name, Segment::Tags));
    }
    if let Some(name) = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"))
    {
        return Some((name, Segment::UploadStart));
    }
    let (head, last) = rest.rsplit_once('/')?;
    let (name, kind) = head.rsplit_once('/')?;
    let segment = match kind {
        "manifests" => Segment::Manifest(last),
        "blobs" => Segment::Blob(last),
        "referrers" => Segment::Referrers(last),
        "uploads" => {
            let name = name.strip_suffix("/blobs")?;
            return Some((name, Segment::Upload(last)));
        }
        _ => return None,
    };
    Some((name, segment))
}

fn invalid_name(name: &str, why: &str) -> OciError {
    OciError::new(
        ErrorCode::NameInvalid,
        format!("invalid repository name: {why}"),
    )
    .with_detail(serde_json::json!({ "name": name }))
}

/// Checks a repository name against the distribution reference grammar: `/`-separated
/// components of `[a-z0-9]` joined by `.`, `_`, `__` or runs of `-`; at most 255 bytes.
pub fn validate_name(name: &str) -> Result<(), OciError> {
    if name.is_empty() {
        return Err(invalid_name(name, "empty"));
    }
    if name.len() > 255 {
        return Err(invalid_name(name, "longer than 255 characters"));
    }
    for component in name.split('/') {
        if !valid_component(component) {
            return Err(invalid_name(
                name,
                &format!(
                    "component {component:?} is not lower-case alphanumerics joined by '.', '_', '__' or '-'"
                ),
            ));
        }
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Tags: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub(crate) fn validate_tag(tag: &str) -> Result<(), OciError> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(OciError::new(ErrorCode::NameInvalid, "invalid tag")
            .with_detail(serde_json::json!({ "tag": tag })))
    }
}

/// Digests: `sha256:` + 64 or `sha512:` + 128 lower-case hex characters.
pub(crate) fn validate_digest(digest: &str) -> Result<(), OciError> {
    let ok = match digest.split_once(':') {
        Some(("sha256", hex)) => is_lower_hex(hex, 64),
        Some(("sha512", hex)) => is_lower_hex(hex, 128),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(
            OciError::new(ErrorCode::DigestInvalid, "invalid or unsupported digest")
                .with_detail(serde_json::json!({ "digest": digest })),
        )
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Upload ids are opaque, but must stay one path segment of URL-safe characters, and never a
/// dot segment: a URL parser would remove `.` or `..` and turn the request into another one
/// (`uploads/.` into an upload start).
fn validate_upload_id(id: &str) -> Result<(), OciError> {
    let ok = !id.is_empty()
        && !id.bytes().all(|b| b == b'.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'=' | b'~'));
    if ok {
        Ok(())
    } else {
        Err(OciError::new(
            ErrorCode::BlobUploadUnknown,
            "invalid upload id",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(p: &str) -> ApiPath {
        ApiPath::parse(p, &http::Method::GET).unwrap().unwrap()
    }

    fn parse_err(p: &str) -> OciError {
        ApiPath::parse(p, &http::Method::PUT).unwrap().unwrap_err()
    }

    #[test]
    fn base_and_catalog() {
        assert_eq!(parse("/v2/").endpoint, Endpoint::Base);
        assert_eq!(parse("/v2").endpoint, Endpoint::Base);
        assert_eq!(parse("/v2/_catalog").endpoint, Endpoint::Catalog);
        assert!(ApiPath::parse("/healthz", &http::Method::GET).is_none());
        assert!(ApiPath::parse("/v2x/foo", &http::Method::GET).is_none());
    }

    #[test]
    fn names_with_many_components_and_keyword_components() {
        let p = parse("/v2/group/sub/blobs/manifests/app/manifests/v1.0");
        assert_eq!(p.name.as_deref(), Some("group/sub/blobs/manifests/app"));
        assert_eq!(
            p.endpoint,
            Endpoint::Manifest(Reference::Tag("v1.0".into()))
        );
        let p = parse(&format!("/v2/a/blobs/blobs/{D}"));
        assert_eq!(p.name.as_deref(), Some("a/blobs"));
        assert_eq!(p.endpoint, Endpoint::Blob(Digest::parse(D).unwrap()));
        let p = parse("/v2/a/b/tags/list");
        assert_eq!(
            (p.name.as_deref(), p.endpoint),
            (Some("a/b"), Endpoint::Tags)
        );
    }

    #[test]
    fn uploads() {
        assert_eq!(
            parse("/v2/a/blobs/uploads/").endpoint,
            Endpoint::UploadStart
        );
        assert_eq!(parse("/v2/a/blobs/uploads").endpoint, Endpoint::UploadStart);
        let p = parse("/v2/x/y/blobs/uploads/5f1c-aa_b");
        assert_eq!(p.name.as_deref(), Some("x/y"));
        assert_eq!(p.endpoint, Endpoint::Upload("5f1c-aa_b".into()));
        assert_eq!(p.suffix(), "blobs/uploads/5f1c-aa_b");
        for dots in [".", "..", "..."] {
            let e = parse_err(&format!("/v2/a/blobs/uploads/{dots}"));
            assert_eq!(e.code, ErrorCode::BlobUploadUnknown, "{dots}");
        }
        assert_eq!(
            parse("/v2/a/blobs/uploads/a.b").endpoint,
            Endpoint::Upload("a.b".into())
        );
    }

    #[test]
    fn manifests_by_digest_and_referrers() {
        let p = parse(&format!("/v2/a/manifests/{D}"));
        assert_eq!(
            p.endpoint,
            Endpoint::Manifest(Reference::Digest(Digest::parse(D).unwrap()))
        );
        let p = parse(&format!("/v2/a/referrers/{D}"));
        assert_eq!(p.endpoint, Endpoint::Referrers(Digest::parse(D).unwrap()));
        assert_eq!(p.suffix(), format!("referrers/{D}"));
    }

    #[test]
    fn invalid_names_are_rejected() {
        for bad in [
            "/v2/A/manifests/x",
            "/v2/a//b/manifests/x",
            "/v2/../manifests/x",
            "/v2/a/../b/manifests/x",
            "/v2/-a/manifests/x",
            "/v2/a-/manifests/x",
            "/v2/a..b/manifests/x",
            "/v2/a___b/manifests/x",
            "/v2/a%2fb/manifests/x",
        ] {
            assert_eq!(parse_err(bad).code, ErrorCode::NameInvalid, "{bad}");
        }
        for good in ["a__b", "a_b", "a.b", "a---b", "0", "a/b/c/d"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        assert!(validate_name(&"a".repeat(256)).is_err());
    }

    #[test]
    fn invalid_references_are_rejected() {
        assert_eq!(parse_err("/v2/a/manifests/-x").code, ErrorCode::NameInvalid);
        assert_eq!(
            parse_err("/v2/a/manifests/sha256:abc").code,
            ErrorCode::DigestInvalid
        );
        assert_eq!(
            parse_err("/v2/a/blobs/latest").code,
            ErrorCode::DigestInvalid
        );
        let upper = D.to_uppercase().replace("SHA256", "sha256");
        assert_eq!(
            parse_err(&format!("/v2/a/blobs/{upper}")).code,
            ErrorCode::DigestInvalid
        );
        assert!(validate_digest(&format!("sha512:{}", "a".repeat(128))).is_ok());
        assert!(validate_tag("Latest_1.0-rc").is_ok());
        assert!(validate_tag(&"t".repeat(129)).is_err());
    }

    #[test]
    fn manifest_reads_by_invalid_references_are_unknown_manifests() {
        use http::Method;
        let code =
            |method: &Method, path: &str| ApiPath::parse(path, method).unwrap().unwrap_err().code;
        for reference in [".INVALID_MANIFEST_NAME", "sha256:abc"] {
            let path = format!("/v2/a/manifests/{reference}");
            for read in [Method::GET, Method::HEAD] {
                assert_eq!(code(&read, &path), ErrorCode::ManifestUnknown, "{path}");
            }
            assert_ne!(code(&Method::PUT, &path), ErrorCode::ManifestUnknown);
            assert_eq!(
                code(&Method::PUT, &path).status(),
                http::StatusCode::BAD_REQUEST
            );
        }
        // A bad repository name is still a bad name, whatever the method.
        assert_eq!(
            code(&Method::GET, "/v2/A/manifests/v1"),
            ErrorCode::NameInvalid
        );
        assert_eq!(
            code(&Method::GET, "/v2/a/blobs/latest"),
            ErrorCode::DigestInvalid
        );
    }

    #[test]
    fn unknown_endpoints() {
        assert_eq!(parse_err("/v2/a").code, ErrorCode::NameUnknown);
        assert_eq!(parse_err("/v2/a/b/c").code, ErrorCode::NameUnknown);
    }
}

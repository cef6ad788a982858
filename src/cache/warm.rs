//! `ocigate cache warm`: an image fetched into the cache before anyone pulls it, every
//! platform of an index and every blob, through the same fills as pulls.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, header};

use super::{Cache, Fetch, ManifestAnswer, Read};
use crate::error::GatewayError;
use crate::oci::{Digest, ErrorCode, OciError, Reference, Scope, manifest, path};
use crate::rewrite::{LocalName, RouteTable};
use crate::upstream::{Authorization, Redirects, Upstream};

/// What a warm fetched (or found cached).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Warmed {
    pub manifests: usize,
    pub blobs: usize,
}

/// Fetches `image` (`name[:tag|@digest]`, a local name) into the cache.
pub async fn image(
    cache: &Cache,
    routes: &RouteTable,
    upstreams: &HashMap<String, Arc<Upstream>>,
    image: &str,
) -> Result<Warmed, GatewayError> {
    let unknown = |message: &str| {
        GatewayError::Oci(
            OciError::new(ErrorCode::NameUnknown, message)
                .with_detail(serde_json::json!({ "image": image })),
        )
    };
    let (name, reference) = split_image(image)?;
    let mapped = routes
        .resolve(&name)
        .filter(|m| m.route.config.cache)
        .ok_or_else(|| unknown("no cache route for this name"))?;
    let upstream = upstreams
        .get(&mapped.route.config.upstream)
        .ok_or_else(|| unknown("route has no upstream"))?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::ACCEPT,
        HeaderValue::from_static(manifest::ACCEPT_ALL_MANIFESTS),
    );
    let scopes = [Scope::repository(mapped.remote.as_str(), &["pull"])];
    let fetch = Fetch {
        upstream,
        remote: &mapped.remote,
        scopes: &scopes,
        authorization: Authorization::Proxy,
        headers: &headers,
        passed_on: Redirects::PassOn,
    };
    let accept = manifest::accept_key(&headers);
    let mut pending = vec![reference];
    let mut warmed = Warmed {
        manifests: 0,
        blobs: 0,
    };
    while let Some(reference) = pending.pop() {
        let m = match cache
            .manifest(&reference, &accept, Read::Get, &fetch)
            .await?
        {
            ManifestAnswer::Cached(m) => m,
            ManifestAnswer::Upstream(r) => {
                return Err(unknown(&format!(
                    "the upstream answered {} for {}",
                    r.status(),
                    reference.as_str()
                )));
            }
            ManifestAnswer::NotCached => return Err(unknown("not cached (offline)")),
        };
        warmed.manifests += 1;
        pending.extend(
            manifest::child_manifests(&m.bytes)
                .into_iter()
                .map(Reference::Digest),
        );
        for digest in manifest::blob_digests(&m.bytes) {
            if !cache.warm_blob(&digest, &fetch).await? {
                return Err(unknown(&format!("could not fetch blob {digest}")));
            }
            warmed.blobs += 1;
        }
    }
    Ok(warmed)
}

/// `name:tag`, `name@digest` or `name` (`latest`), validated.
fn split_image(image: &str) -> Result<(LocalName, Reference), OciError> {
    let (name, reference) = match image.split_once('@') {
        Some((name, digest)) => (name, Reference::Digest(Digest::parse(digest)?)),
        None => match image.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
            Some((name, tag)) => {
                path::validate_tag(tag)?;
                (name, Reference::Tag(tag.to_string()))
            }
            None => (image, Reference::Tag("latest".into())),
        },
    };
    path::validate_name(name)?;
    Ok((LocalName::new(name), reference))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        let d = format!("sha256:{}", "a".repeat(64));
        let split = |s: &str| split_image(s).map(|(n, r)| (n.to_string(), r));
        assert_eq!(
            split("m/app").unwrap(),
            ("m/app".into(), Reference::Tag("latest".into()))
        );
        assert_eq!(
            split("m/app:v1").unwrap(),
            ("m/app".into(), Reference::Tag("v1".into()))
        );
        assert_eq!(
            split(&format!("m/app@{d}")).unwrap(),
            (
                "m/app".into(),
                Reference::Digest(Digest::parse(&d).unwrap())
            )
        );
        assert!(split("m/App:v1").is_err());
        assert!(split("m/app:-v1").is_err());
        assert!(split("m/app@sha256:short").is_err());
    }
}

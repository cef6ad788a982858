//! Rewriting an upstream's answer for the client: `Location` and `Link` URLs of this
//! request's names point back at the proxy under local names, and a `tags/list` carries the
//! local name (renamed as it streams, or cut into the page the client asked for when the
//! upstream ignored `n`/`last`). Everything else streams through untouched.

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt;
use url::Url;

use super::{NameMap, TagsNameRewrite, query_param};
use crate::body::{self, Body};
use crate::error::GatewayError;
use crate::oci::host::RegistryHost;

/// Largest upstream JSON answer the gateway reads whole in order to rewrite it.
pub(crate) const MAX_REWRITTEN_BODY: usize = 16 << 20;

/// Tags lists cut into pages here at once: each holds a whole upstream list in memory.
static PAGING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Tags in one page cut here, at most: a page a client reads slowly stays small.
const MAX_TAGS_PAGE: usize = 1000;

/// What rewriting an answer needs to know of its request.
pub(crate) struct Answering<'a> {
    /// `scheme://host` clients reach us by.
    pub(crate) public_base: &'a str,
    /// This request's remote names, with their local names.
    pub(crate) names: &'a NameMap,
    /// The upstream URL that was asked: relative URLs in the answer are relative to it.
    pub(crate) asked: &'a Url,
    /// The upstream's name, for errors.
    pub(crate) upstream: &'a str,
    /// Set for a `GET …/tags/list`.
    pub(crate) tags: Option<TagsQuery<'a>>,
    /// The host the request named with `?ns=`: our URLs handed back carry it too.
    pub(crate) ns: Option<&'a RegistryHost>,
}

impl Answering<'_> {
    /// An upstream `/v2/` path of this request's names as the client must ask for it.
    fn local_path(&self, upstream_path: &str) -> Option<String> {
        self.names.path(upstream_path).map(|p| self.with_ns(p))
    }

    fn with_ns(&self, mut path: String) -> String {
        if let Some(host) = self.ns {
            path.push(if path.contains('?') { '&' } else { '?' });
            path.push_str(super::host::NS);
            path.push('=');
            path.push_str(host.as_str());
        }
        path
    }
}

/// A tags-list request: the local repository name and the client's query.
pub(crate) struct TagsQuery<'a> {
    pub(crate) local: &'a str,
    pub(crate) query: &'a str,
}

/// The upstream's answer as the client must see it.
pub(crate) async fn rewrite(
    request: &Answering<'_>,
    response: Response<Body>,
) -> Result<Response<Body>, GatewayError> {
    let (mut parts, upstream_body) = response.into_parts();
    crate::headers::strip_hop_by_hop(&mut parts.headers);
    if let Some(loc) = parts.headers.get(header::LOCATION).cloned()
        && let Some(new) = loc.to_str().ok().and_then(|l| rewrite_url(request, l))
        && let Ok(v) = HeaderValue::from_str(&new)
    {
        parts.headers.insert(header::LOCATION, v);
    }
    rewrite_links(request, &mut parts.headers);
    let tags = request
        .tags
        .as_ref()
        .filter(|_| parts.status == StatusCode::OK);
    let Some(tags) = tags else {
        return Ok(Response::from_parts(parts, upstream_body));
    };
    let client_pages = ["n", "last"]
        .iter()
        .any(|k| query_param(tags.query, k).is_some());
    let body = if client_pages && !parts.headers.contains_key(header::LINK) {
        // The client asked for a page the upstream did not cut: the whole list is read (a
        // few at a time) and one page of it kept.
        let bad = |reason: String| GatewayError::BadUpstreamAnswer {
            upstream: request.upstream.to_string(),
            what: "tags list",
            reason,
        };
        let _turn = PAGING.acquire().await;
        let bytes = body::read_to_limit(upstream_body, MAX_REWRITTEN_BODY)
            .await
            .map_err(bad)?;
        let page = tags_page(&bytes, tags.local, tags.query).map_err(bad)?;
        let link = page
            .link
            .map(|next| format!("<{}>; rel=\"next\"", request.with_ns(next)));
        if let Some(link) = link.and_then(|l| HeaderValue::from_str(&l).ok()) {
            parts.headers.insert(header::LINK, link);
        }
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(page.body.len()));
        body::full(page.body)
    } else {
        // Renamed as it streams: a list of any size costs a frame of memory.
        let mut rename = TagsNameRewrite::new(tags.local);
        parts.headers.remove(header::CONTENT_LENGTH);
        body::boxed(upstream_body.map_frame(move |frame| frame.map_data(|d| rename.feed(d))))
    };
    Ok(Response::from_parts(parts, body))
}

struct TagsPage {
    body: Vec<u8>,
    /// The next page's path.
    link: Option<String>,
}

#[derive(serde::Deserialize)]
struct UpstreamTags<'a> {
    #[serde(borrow, default)]
    tags: Option<Vec<std::borrow::Cow<'a, str>>>,
}

/// The page of a tags list that the client asked for (`n`, `last`) when the upstream ignored
/// it (distribution 2.x does): in lexical order, at most [`MAX_TAGS_PAGE`] tags, with a `Link`
/// to the next page; named locally.
fn tags_page(bytes: &[u8], local: &str, query: &str) -> Result<TagsPage, String> {
    let list: UpstreamTags = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let asked = query_param(query, "n").and_then(|n| n.parse::<usize>().ok());
    let n = asked.unwrap_or(MAX_TAGS_PAGE).min(MAX_TAGS_PAGE);
    let last = query_param(query, "last");
    let mut names: Vec<&str> = list
        .tags
        .iter()
        .flatten()
        .map(|t| t.as_ref())
        .filter(|t| last.as_deref().is_none_or(|l| *t > l))
        .collect();
    names.sort_unstable();
    let mut link = None;
    if names.len() > n {
        names.truncate(n);
        if let Some(last_tag) = names.last() {
            link = Some(format!("/v2/{local}/tags/list?last={last_tag}&n={n}"));
        }
    }
    let body = serde_json::to_vec(&serde_json::json!({ "name": local, "tags": names }))
        .map_err(|e| e.to_string())?;
    Ok(TagsPage { body, link })
}

/// A URL the upstream handed out, as the client must see it. Upstream `/v2/` URLs of this
/// request's names point back at us; anything else (object storage, other hosts) is made
/// absolute against the upstream and otherwise left alone.
fn rewrite_url(request: &Answering<'_>, value: &str) -> Option<String> {
    let absolute = request.asked.join(value).ok()?;
    if absolute.origin() == request.asked.origin() {
        let mut path = absolute.path().to_string();
        if let Some(q) = absolute.query() {
            path.push('?');
            path.push_str(q);
        }
        if let Some(local) = request.local_path(&path) {
            return Some(format!("{}{local}", request.public_base));
        }
    }
    Some(absolute.to_string())
}

fn rewrite_links(request: &Answering<'_>, headers: &mut HeaderMap) {
    let values: Vec<String> = headers
        .get_all(header::LINK)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    if values.is_empty() {
        return;
    }
    headers.remove(header::LINK);
    for v in values {
        let new = super::link_header(&v, |u| {
            if u.starts_with('/') {
                // Keep relative links relative: clients resolve them against us.
                request.local_path(u)
            } else {
                rewrite_url(request, u)
            }
        });
        if let Ok(hv) = HeaderValue::from_str(&new) {
            headers.append(header::LINK, hv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::{LocalName, RemoteName};

    fn names(pairs: &[(&str, &str)]) -> NameMap {
        let mut names = NameMap::default();
        for (remote, local) in pairs {
            names.add(&RemoteName::new(*remote), &LocalName::new(*local));
        }
        names
    }

    fn answering<'a>(
        names: &'a NameMap,
        asked: &'a Url,
        tags: Option<TagsQuery<'a>>,
    ) -> Answering<'a> {
        Answering {
            public_base: "https://r.example.com",
            names,
            asked,
            upstream: "up",
            tags,
            ns: None,
        }
    }

    #[test]
    fn upstream_urls_become_local_and_relative_redirects_absolute() {
        let names = names(&[("team/app", "mirror/app")]);
        let asked = Url::parse("https://up.example.com/v2/team/app/blobs/uploads/").unwrap();
        let request = answering(&names, &asked, None);
        let rewrite = |v: &str| rewrite_url(&request, v).unwrap();
        // Upload sessions, relative or absolute, point back at the proxy under the local name.
        assert_eq!(
            rewrite("/v2/team/app/blobs/uploads/u1?_state=x%2By"),
            "https://r.example.com/v2/mirror/app/blobs/uploads/u1?_state=x%2By"
        );
        assert_eq!(
            rewrite("https://up.example.com/v2/team/app/blobs/uploads/u1"),
            "https://r.example.com/v2/mirror/app/blobs/uploads/u1"
        );
        // A relative blob redirect (Artifact Registry's style) is resolved against the upstream.
        assert_eq!(
            rewrite("/artifacts-downloads/namespaces/p/blobs/abc?sig=1"),
            "https://up.example.com/artifacts-downloads/namespaces/p/blobs/abc?sig=1"
        );
        // Object storage elsewhere is left alone.
        assert_eq!(
            rewrite("https://bucket.s3.example.net/data?X-Amz-Signature=z"),
            "https://bucket.s3.example.net/data?X-Amz-Signature=z"
        );
        // Another host's /v2/ path is not ours to rewrite.
        assert_eq!(
            rewrite("https://other.example.com/v2/team/app/blobs/uploads/u1"),
            "https://other.example.com/v2/team/app/blobs/uploads/u1"
        );
        // A request that named its host with `ns` gets URLs that name it too.
        let host = RegistryHost::parse("quay.test").unwrap();
        let request = Answering {
            ns: Some(&host),
            ..answering(&names, &asked, None)
        };
        assert_eq!(
            rewrite_url(&request, "/v2/team/app/blobs/uploads/u1?_state=s").unwrap(),
            "https://r.example.com/v2/mirror/app/blobs/uploads/u1?_state=s&ns=quay.test"
        );
        assert_eq!(
            rewrite_url(&request, "/v2/team/app/blobs/uploads/u1").unwrap(),
            "https://r.example.com/v2/mirror/app/blobs/uploads/u1?ns=quay.test"
        );
    }

    #[test]
    fn tags_list_name_is_local() {
        let page = tags_page(
            br#"{"name":"team/app","tags":["b","a"]}"#,
            "mirror/app",
            "n=5",
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&page.body).unwrap();
        assert_eq!(v["name"], "mirror/app");
        assert_eq!(v["tags"], serde_json::json!(["a", "b"]));
        assert!(page.link.is_none());
        assert!(tags_page(b"[1]", "x", "n=1").is_err());
    }

    #[test]
    fn tags_list_is_paged_when_the_upstream_does_not() {
        let body = br#"{"name":"team/app","tags":["t3","t1","t4","t2"]}"#;
        let page = tags_page(body, "m/app", "n=2").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&page.body).unwrap();
        assert_eq!(v["tags"], serde_json::json!(["t1", "t2"]));
        assert_eq!(
            page.link.as_deref(),
            Some("/v2/m/app/tags/list?last=t2&n=2")
        );
        let page = tags_page(body, "m/app", "n=2&last=t2").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&page.body).unwrap();
        assert_eq!(v["tags"], serde_json::json!(["t3", "t4"]));
        assert!(page.link.is_none());
        // A page is never larger than MAX_TAGS_PAGE, whatever `n` says.
        let many: Vec<String> = (0..MAX_TAGS_PAGE + 5).map(|i| format!("t{i:05}")).collect();
        let body = serde_json::to_vec(&serde_json::json!({"name": "x", "tags": many})).unwrap();
        let page = tags_page(&body, "m/app", "n=100000").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&page.body).unwrap();
        assert_eq!(v["tags"].as_array().unwrap().len(), MAX_TAGS_PAGE);
        assert!(page.link.unwrap().contains(&format!("n={MAX_TAGS_PAGE}")));
    }

    async fn rewritten(
        request: &Answering<'_>,
        response: Response<Body>,
    ) -> (http::response::Parts, Vec<u8>) {
        let (parts, body) = rewrite(request, response).await.unwrap().into_parts();
        (parts, body.collect().await.unwrap().to_bytes().to_vec())
    }

    #[tokio::test]
    async fn tags_answers_are_renamed_streamed_or_paged() {
        let names = names(&[("team/app", "mirror/app")]);
        let asked = Url::parse("https://up.example.com/v2/team/app/tags/list").unwrap();
        let list = r#"{"name":"team/app","tags":["b","c","a"]}"#;
        let answer = || {
            let mut r = Response::new(body::full(list));
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(list.len()));
            r
        };
        // No paging asked: renamed as it streams, the length no longer known.
        let tags = TagsQuery {
            local: "mirror/app",
            query: "",
        };
        let (parts, bytes) = rewritten(&answering(&names, &asked, Some(tags)), answer()).await;
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["name"], "mirror/app");
        assert_eq!(v["tags"], serde_json::json!(["b", "c", "a"]));
        assert!(parts.headers.get(header::CONTENT_LENGTH).is_none());
        // A page the upstream ignored is cut here, with a local next link.
        let tags = TagsQuery {
            local: "mirror/app",
            query: "n=2",
        };
        let (parts, bytes) = rewritten(&answering(&names, &asked, Some(tags)), answer()).await;
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["tags"], serde_json::json!(["a", "b"]));
        assert_eq!(
            parts.headers[header::LINK],
            r#"</v2/mirror/app/tags/list?last=b&n=2>; rel="next""#
        );
        assert_eq!(
            parts.headers[header::CONTENT_LENGTH],
            bytes.len().to_string().as_str()
        );
        // A page the upstream cut keeps its cut; its link is made local.
        let mut paged = answer();
        paged.headers_mut().insert(
            header::LINK,
            HeaderValue::from_static(r#"</v2/team/app/tags/list?last=b&n=2>; rel="next""#),
        );
        let tags = TagsQuery {
            local: "mirror/app",
            query: "n=2",
        };
        let (parts, bytes) = rewritten(&answering(&names, &asked, Some(tags)), paged).await;
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["tags"], serde_json::json!(["b", "c", "a"]));
        assert_eq!(
            parts.headers[header::LINK],
            r#"</v2/mirror/app/tags/list?last=b&n=2>; rel="next""#
        );
        // Garbage where a list must be read whole is the upstream's fault, not a 500.
        let mut garbage = Response::new(body::full("<html>"));
        garbage
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(6));
        let tags = TagsQuery {
            local: "mirror/app",
            query: "n=1",
        };
        let e = rewrite(&answering(&names, &asked, Some(tags)), garbage)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                GatewayError::BadUpstreamAnswer {
                    what: "tags list",
                    ..
                }
            ),
            "{e}"
        );
        // Not a 200: nothing to rename.
        let mut missing = Response::new(body::full("{}"));
        *missing.status_mut() = StatusCode::NOT_FOUND;
        let tags = TagsQuery {
            local: "mirror/app",
            query: "n=1",
        };
        let (parts, bytes) = rewritten(&answering(&names, &asked, Some(tags)), missing).await;
        assert_eq!(
            (parts.status, bytes.as_slice()),
            (StatusCode::NOT_FOUND, &b"{}"[..])
        );
    }
}

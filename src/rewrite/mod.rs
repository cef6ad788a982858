//! Names, both ways: local repository names (as clients use them) ↔ remote names (as an
//! upstream knows them).
//!
//! Owns the route table (longest prefix wins), the name newtypes, every rewrite of names in
//! requests (`from=` on mounts, [`UploadQuery`]) and, in [`response`], in answers
//! (`Location`, `Link`, the `name` of `tags/list`). Must not talk to upstreams or decide
//! about auth.

pub(crate) mod host;
pub(crate) mod response;

use std::fmt;

pub(crate) use host::{NamedHost, Naming};

use crate::config::RouteConfig;
use crate::oci::host::RegistryHost;
use crate::oci::{ErrorCode, OciError};

/// Newtypes for the two sides of a route, so that one cannot be passed for the other.
macro_rules! repository_name {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub(crate) struct $name(String);

        impl $name {
            pub(crate) fn new(name: impl Into<String>) -> $name {
                $name(name.into())
            }

            pub(crate) fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

repository_name!(
    /// A repository name as clients use it: what routes are chosen by.
    LocalName
);
repository_name!(
    /// A repository name as an upstream knows it: what is sent, cached and logged upstream.
    RemoteName
);

impl RemoteName {
    /// `/v2/<name>/<suffix>` on the upstream.
    pub(crate) fn api_path(&self, suffix: &str) -> String {
        format!("/v2/{}/{suffix}", self.0)
    }
}

/// A route with the facts needed to map names through it.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) config: RouteConfig,
    /// Docker Hub keeps one-component names under `library/`.
    pub(crate) docker_hub: bool,
    label: String,
}

impl Route {
    /// `position`: where the route is in the config (1-based), for its label.
    pub(crate) fn new(config: RouteConfig, docker_hub: bool, position: usize) -> Route {
        let label = route_label(&config, position);
        Route {
            config,
            docker_hub,
            label,
        }
    }

    /// The route's name in metrics and logs. An exact route's prefix may be a secret (a
    /// capability URL), so it is never its label: its `name`, else a hash of it.
    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    /// Maps a local name through this route, if the route covers it.
    fn to_remote(&self, local: &LocalName) -> Option<RemoteName> {
        let local = local.as_str();
        let c = &self.config;
        let remote = if c.is_namespace() {
            let rest = local.strip_prefix(c.prefix.as_str())?;
            if rest.is_empty() {
                return None;
            }
            format!("{}{rest}", c.remote)
        } else if local == c.prefix {
            c.remote.clone()
        } else {
            return None;
        };
        if self.docker_hub && !remote.contains('/') {
            return Some(RemoteName(format!("library/{remote}")));
        }
        Some(RemoteName(remote))
    }

    /// The local name a remote name has on this (namespace) route, if any.
    fn to_local(&self, remote: &RemoteName) -> Option<LocalName> {
        let c = &self.config;
        if !c.is_namespace() {
            return None;
        }
        let mut rest = remote.as_str().strip_prefix(c.remote.as_str())?;
        if self.docker_hub && c.remote.is_empty() {
            // Prefer the short name clients use for official images.
            if let Some(official) = rest.strip_prefix("library/").filter(|r| !r.contains('/')) {
                rest = official;
            }
        }
        Some(LocalName(format!("{}{rest}", c.prefix)))
    }
}

/// The name a request was made with, and where it goes.
#[derive(Debug, Clone)]
pub(crate) struct Mapped<'a> {
    pub(crate) route: &'a Route,
    pub(crate) remote: RemoteName,
}

#[derive(Debug, Clone)]
pub struct RouteTable {
    /// Longest prefix first.
    routes: Vec<Route>,
}

impl RouteTable {
    /// The config's routes, each labelled by its place in the file.
    pub(crate) fn from_config(config: &crate::config::Config) -> RouteTable {
        let routes = config.routes.iter().enumerate().map(|(i, r)| {
            let docker_hub = config
                .upstreams
                .get(&r.upstream)
                .is_some_and(|u| u.is_docker_hub());
            Route::new(r.clone(), docker_hub, i + 1)
        });
        RouteTable::new(routes.collect())
    }

    pub(crate) fn new(routes: Vec<Route>) -> RouteTable {
        let mut routes = routes;
        routes.sort_by_key(|r| std::cmp::Reverse(r.config.prefix.len()));
        RouteTable { routes }
    }

    pub(crate) fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The prefix route for a local name: longest matching prefix wins.
    pub(crate) fn resolve(&self, local: &LocalName) -> Option<Mapped<'_>> {
        self.resolve_in(None, local)
    }

    /// The route for a name inside `host` (`None`: a request that named no host, routed by
    /// prefix alone).
    pub(crate) fn resolve_in(
        &self,
        host: Option<&RegistryHost>,
        local: &LocalName,
    ) -> Option<Mapped<'_>> {
        self.routes
            .iter()
            .filter(|route| route.config.host.as_ref() == host)
            .find_map(|route| {
                route
                    .to_remote(local)
                    .map(|remote| Mapped { route, remote })
            })
    }

    /// Whether some route serves `host`: the only hosts a request may name.
    pub(crate) fn serves_host(&self, host: &RegistryHost) -> bool {
        self.routes
            .iter()
            .any(|r| r.config.host.as_ref() == Some(host))
    }

    /// Whether `remote` on `upstream` is what an exact route (a capability URL) opens: such a
    /// name is never listed in `_catalog`.
    pub(crate) fn is_exact_target(&self, upstream: &str, remote: &RemoteName) -> bool {
        self.exact_routes()
            .any(|(r, target)| r.config.upstream == upstream && target == *remote)
    }

    fn exact_routes(&self) -> impl Iterator<Item = (&Route, RemoteName)> {
        self.routes
            .iter()
            .filter(|r| !r.config.is_namespace())
            .filter_map(|r| Some((r, r.to_remote(&LocalName::new(r.config.prefix.as_str()))?)))
    }

    /// What `check-config` warns about: capability prefixes that are easy to guess, and
    /// exact routes whose repository a namespace route opens too.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (route, target) in self.exact_routes() {
            let bits = guessing_bits(&route.config.prefix);
            if bits < CAPABILITY_BITS {
                out.push(format!(
                    "route {:?} ({}): an exact route's prefix is a capability URL, but this one has about {bits} bits of randomness (use at least {CAPABILITY_BITS}, e.g. 32 random hex characters)",
                    route.config.prefix,
                    route.label()
                ));
            }
            if let Some(local) = self.to_local(&route.config.upstream, &target) {
                out.push(format!(
                    "route {} opens {}:{target}, which is also reachable as {:?} through a namespace route",
                    route.label(),
                    route.config.upstream,
                    local.as_str()
                ));
            }
        }
        out
    }

    /// The local name under which `remote` (on `upstream`) is reachable through a namespace
    /// route, if any; a name shadowed by a longer route is not reachable and gives `None`.
    pub(crate) fn to_local(&self, upstream: &str, remote: &RemoteName) -> Option<LocalName> {
        self.routes
            .iter()
            .filter(|r| r.config.upstream == upstream && r.config.host.is_none())
            .filter_map(|r| r.to_local(remote))
            .find(|local| {
                crate::oci::path::validate_name(local.as_str()).is_ok()
                    && self
                        .resolve(local)
                        .is_some_and(|m| m.route.config.upstream == upstream && m.remote == *remote)
            })
    }

    /// Maps `from=` of a cross-repository mount to its remote name, returned (and added to
    /// `names`). A `from` that is not routed to the same upstream, or is on a relay route,
    /// cannot be mounted there: the mount is dropped and the registry answers with a plain
    /// upload session, as the spec allows. Never from a relay route: its repositories are
    /// opened only by relay tokens, which client auth does not check (`auth.anonymous`
    /// could cover the `from` there). A `mount` without `from` is dropped too: OCI 1.1 lets
    /// a registry take it from any repository the proxy's credentials can read.
    ///
    /// `host`: the host the request named; `from` is then a name inside it.
    pub(crate) fn map_mount(
        &self,
        query: &mut UploadQuery,
        upstream: &str,
        host: Option<&NamedHost>,
        names: &mut NameMap,
    ) -> Option<RemoteName> {
        let Some(from) = query.from().map(LocalName::new) else {
            query.set_from(None);
            return None;
        };
        match self.resolve_in(host.map(|h| &h.host), &from) {
            Some(m) if m.route.config.upstream == upstream && !m.route.config.relay => {
                let client = host.map_or_else(|| from.clone(), |h| h.client_name(&from));
                names.add(&m.remote, &client);
                query.set_from(Some(m.remote.as_str()));
                Some(m.remote)
            }
            _ => {
                query.set_from(None);
                None
            }
        }
    }
}

/// The remote ↔ local name pairs of one request (its name, and `from` of a mount), used to
/// rewrite what the upstream says back.
#[derive(Debug, Clone, Default)]
pub(crate) struct NameMap {
    pairs: Vec<(RemoteName, LocalName)>,
}

impl NameMap {
    pub(crate) fn add(&mut self, remote: &RemoteName, local: &LocalName) {
        if !self.pairs.iter().any(|(r, _)| r == remote) {
            self.pairs.push((remote.clone(), local.clone()));
            // Longest remote first, so `/v2/a/b/` is not mistaken for `/v2/a/`.
            self.pairs
                .sort_by_key(|p| std::cmp::Reverse(p.0.as_str().len()));
        }
    }

    /// Rewrites an upstream `/v2/<remote>/…` path (with any query) to `/v2/<local>/…`.
    pub(crate) fn path(&self, path: &str) -> Option<String> {
        let rest = path.strip_prefix("/v2/")?;
        self.pairs.iter().find_map(|(remote, local)| {
            let tail = rest.strip_prefix(remote.as_str())?;
            tail.starts_with('/').then(|| format!("/v2/{local}{tail}"))
        })
    }
}

/// Rewrites the URL inside each `<…>` of a `Link` header with `rewrite_url`.
pub(crate) fn link_header(value: &str, rewrite_url: impl Fn(&str) -> Option<String>) -> String {
    value
        .split(',')
        .map(|part| {
            let trimmed = part.trim();
            match (trimmed.find('<'), trimmed.find('>')) {
                (Some(open), Some(close)) if open < close => {
                    let url = &trimmed[open + 1..close];
                    let new = rewrite_url(url).unwrap_or_else(|| url.to_string());
                    format!("{}<{new}>{}", &trimmed[..open], &trimmed[close + 1..])
                }
                _ => trimmed.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The query of `POST …/blobs/uploads/`, decoded once, so that admission checks and the
/// upstream receives the very same `mount`, `from` and `digest` (a percent-encoded key such
/// as `fr%6Fm` cannot slip past one and reach the other).
#[derive(Debug, Clone, Default)]
pub(crate) struct UploadQuery {
    pairs: Vec<(String, String)>,
}

impl UploadQuery {
    pub(crate) fn parse(query: &str) -> Result<UploadQuery, OciError> {
        let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
            .filter(|(k, _)| k != host::NS)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        for key in ["mount", "from", "digest"] {
            if pairs.iter().filter(|(k, _)| k == key).count() > 1 {
                return Err(
                    OciError::new(ErrorCode::Unsupported, format!("`{key}` given twice"))
                        .with_status(http::StatusCode::BAD_REQUEST),
                );
            }
        }
        let q = UploadQuery { pairs };
        if let Some(from) = q.from() {
            crate::oci::path::validate_name(from)?;
        }
        if let Some(d) = q.get("mount").or_else(|| q.get("digest")) {
            crate::oci::path::validate_digest(d)?;
        }
        Ok(q)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The repository a cross-repository mount copies from.
    pub(crate) fn from(&self) -> Option<&str> {
        self.get("from")
    }

    /// Points the mount at `remote`, or drops the mount (`None`): the registry then opens a
    /// plain upload session, as the spec allows.
    pub(crate) fn set_from(&mut self, remote: Option<&str>) {
        match remote {
            Some(r) => {
                for (k, v) in &mut self.pairs {
                    if k == "from" {
                        *v = r.to_string();
                    }
                }
            }
            None => self.pairs.retain(|(k, _)| k != "from" && k != "mount"),
        }
    }

    pub(crate) fn encode(&self) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&self.pairs)
            .finish()
    }
}

/// The randomness a capability prefix should have at least.
const CAPABILITY_BITS: u32 = 100;

/// A generous estimate of how hard a prefix is to guess: its letters and digits, each worth
/// the size of the character classes the prefix uses. Words count as random, so this only
/// catches the short and the obvious.
fn guessing_bits(prefix: &str) -> u32 {
    let chars: Vec<u8> = prefix.bytes().filter(u8::is_ascii_alphanumeric).collect();
    let digits = chars.iter().any(u8::is_ascii_digit);
    let hex_only = chars.iter().all(|c| c.is_ascii_hexdigit());
    let alphabet: f64 = match (hex_only, digits) {
        (true, _) => 16.0,
        (false, true) => 36.0,
        (false, false) => 26.0,
    };
    (chars.len() as f64 * alphabet.log2()) as u32
}

/// `position`: the route's place in the config (1-based). An exact route without a name is
/// labelled by it: a hash of the prefix would let anyone who reads the metrics test guesses
/// of a weak capability offline.
fn route_label(config: &RouteConfig, position: usize) -> String {
    match (&config.name, &config.host) {
        (Some(name), _) => name.clone(),
        (None, _) if !config.is_namespace() => format!("repository-{position}"),
        (None, Some(host)) if config.prefix.is_empty() => host.to_string(),
        (None, Some(host)) => format!("{host}/{}", config.prefix),
        (None, None) if config.prefix.is_empty() => "(default)".into(),
        (None, None) => config.prefix.clone(),
    }
}

/// Renames a tags list as it streams: the top-level `"name"` string is replaced and every
/// other byte passes through as it came, so a list of any length costs no more memory than
/// the frame in flight. Scans only until the name is replaced (names come first in
/// practice), tracking strings and nesting so that a `"name"` inside another value is left
/// alone.
pub(crate) struct TagsNameRewrite {
    local: Vec<u8>,
    done: bool,
    depth: u32,
    in_string: bool,
    escaped: bool,
    expect_key: bool,
    awaiting_value: bool,
    /// The top-level key being read, while it is short enough to be `name`.
    key: Option<Vec<u8>>,
    key_is_name: bool,
    replacing: bool,
}

impl TagsNameRewrite {
    pub(crate) fn new(local: &str) -> TagsNameRewrite {
        TagsNameRewrite {
            local: serde_json::to_vec(local).unwrap_or_else(|_| b"\"\"".to_vec()),
            done: false,
            depth: 0,
            in_string: false,
            escaped: false,
            expect_key: false,
            awaiting_value: false,
            key: None,
            key_is_name: false,
            replacing: false,
        }
    }

    /// The next chunk of the rewritten body.
    pub(crate) fn feed(&mut self, chunk: bytes::Bytes) -> bytes::Bytes {
        if self.done {
            return chunk;
        }
        let mut out = Vec::with_capacity(chunk.len() + self.local.len());
        for (i, &b) in chunk.iter().enumerate() {
            if self.done {
                out.extend_from_slice(&chunk[i..]);
                break;
            }
            self.step(b, &mut out);
        }
        out.into()
    }

    /// Advances over one byte, writing what replaces it.
    fn step(&mut self, b: u8, out: &mut Vec<u8>) {
        if self.in_string {
            self.string_byte(b, out);
            return;
        }
        let top = self.depth == 1;
        match b {
            b'"' if top && self.expect_key => {
                self.expect_key = false;
                self.key = Some(Vec::new());
                self.key_is_name = false;
            }
            b'"' if top && self.awaiting_value && self.key_is_name => {
                // The original value is dropped up to its closing quote; ours goes out now.
                self.awaiting_value = false;
                self.replacing = true;
                self.in_string = true;
                out.extend_from_slice(&self.local);
                return;
            }
            b'"' => self.awaiting_value = false,
            b'{' | b'[' => {
                self.not_a_name_value(top);
                self.depth += 1;
                if self.depth == 1 && b == b'{' {
                    self.expect_key = true;
                }
            }
            b'}' | b']' => self.depth = self.depth.saturating_sub(1),
            b':' if top => self.awaiting_value = true,
            b',' if top => {
                self.expect_key = true;
                self.awaiting_value = false;
                self.key_is_name = false;
            }
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ => self.not_a_name_value(top),
        }
        if b == b'"' {
            self.in_string = true;
        }
        out.push(b);
    }

    fn string_byte(&mut self, b: u8, out: &mut Vec<u8>) {
        let closing = !self.escaped && b == b'"';
        self.escaped = !self.escaped && b == b'\\';
        if closing {
            self.in_string = false;
            if let Some(key) = self.key.take() {
                self.key_is_name = key == b"name";
            }
            if self.replacing {
                self.replacing = false;
                self.done = true;
                return;
            }
        } else if let Some(key) = &mut self.key {
            key.push(b);
            if key.len() > 4 {
                // Longer than `name`: not it.
                self.key = None;
            }
        }
        if !self.replacing {
            out.push(b);
        }
    }

    /// A top-level value that is no string: a `name` that is not a string is left alone.
    fn not_a_name_value(&mut self, top: bool) {
        if top && self.awaiting_value {
            self.awaiting_value = false;
            if self.key_is_name {
                self.done = true;
            }
        }
    }
}

/// A query of a request that is no upload start as the upstream gets it: without `mount` and
/// `from` (compared decoded, as registries read them), since only [`UploadQuery`] passes a
/// mount on, after admission checked it; and without `ns`, which named the host to us.
/// Left byte for byte as it is when there is nothing to drop.
pub(crate) fn forwarded_query(query: &str) -> String {
    let is_mount = |k: &str| k == "mount" || k == "from" || k == host::NS;
    if !url::form_urlencoded::parse(query.as_bytes()).any(|(k, _)| is_mount(&k)) {
        return query.to_string();
    }
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(url::form_urlencoded::parse(query.as_bytes()).filter(|(k, _)| !is_mount(k)))
        .finish()
}

/// The first value of `key` in a query string, percent-decoded.
pub(crate) fn query_param(query: &str, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, upstream: &str, remote: &str, hub: bool) -> Route {
        Route::new(RouteConfig::new(prefix, upstream, remote), hub, 1)
    }

    fn renamed(input: &str, chunk: usize) -> String {
        let mut r = TagsNameRewrite::new("mirror/app");
        let mut out = Vec::new();
        for piece in input.as_bytes().chunks(chunk) {
            out.extend_from_slice(&r.feed(bytes::Bytes::copy_from_slice(piece)));
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn tags_lists_are_renamed_as_they_stream() {
        for chunk in [1, 2, 3, 7, 1000] {
            assert_eq!(
                renamed(r#"{"name":"team/app","tags":["a","b"]}"#, chunk),
                r#"{"name":"mirror/app","tags":["a","b"]}"#
            );
            assert_eq!(
                renamed(
                    "{ \"tags\" : [\"name\", \"x\\\"y\"], \"other\": {\"name\": \"keep\"},\n \"name\" : \"te\\\"am\" }",
                    chunk
                ),
                "{ \"tags\" : [\"name\", \"x\\\"y\"], \"other\": {\"name\": \"keep\"},\n \"name\" : \"mirror/app\" }",
                "only the top-level name, wherever it is"
            );
            assert_eq!(
                renamed(r#"{"named":"x","name":null}"#, chunk),
                r#"{"named":"x","name":null}"#
            );
            assert_eq!(renamed(r#"{"tags":[]}"#, chunk), r#"{"tags":[]}"#);
        }
        let big = format!(
            r#"{{"name":"team/app","tags":[{}]}}"#,
            (0..10_000)
                .map(|i| format!("\"t{i}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        let out = renamed(&big, 65536);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["name"], "mirror/app");
        assert_eq!(v["tags"].as_array().unwrap().len(), 10_000);
    }

    #[test]
    fn weak_and_shadowed_capabilities_are_warned_about() {
        let t = RouteTable::new(vec![
            route("team/", "hub", "team/", false),
            route("0ebb01be/app", "hub", "team/app", false),
            route(
                "8c6f0f2a3b9d4e51a7c2d0e4f6b8a1c3/app",
                "hub",
                "other/app",
                false,
            ),
        ]);
        let w = t.warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("\"0ebb01be/app\"") && w[0].contains("bits"),
            "{w:?}"
        );
        assert!(
            w[1].contains("hub:team/app") && w[1].contains("\"team/app\""),
            "{w:?}"
        );
        assert!(t.is_exact_target("hub", &RemoteName::new("team/app")));
        assert!(t.is_exact_target("hub", &RemoteName::new("other/app")));
        assert!(!t.is_exact_target("hub", &RemoteName::new("team/other")));
        assert!(guessing_bits("8c6f0f2a3b9d4e51a7c2d0e4f6b8a1c3/app") >= 100);
        assert!(guessing_bits("myapp") < 100);
    }

    #[test]
    fn exact_routes_are_labelled_without_their_prefix() {
        let secret = route("0ebb01be9f/app", "hub", "team/app", false);
        assert_eq!(secret.label(), "repository-1");
        assert!(!secret.label().contains("0ebb01be9f"));
        assert_eq!(route("ns/", "hub", "team/", false).label(), "ns/");
        assert_eq!(route("", "hub", "", false).label(), "(default)");
        let mut named = RouteConfig::new("0ebb01be9f/app", "hub", "team/app");
        named.name = Some("app".into());
        assert_eq!(Route::new(named, false, 1).label(), "app");
    }

    fn table() -> RouteTable {
        RouteTable::new(vec![
            route("", "hub", "", true),
            route("mirror/", "reg", "team/", false),
            route("mirror/special", "reg", "other/thing", false),
            route("bp/", "hub", "backplane/", true),
        ])
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table();
        let m = t.resolve(&LocalName::new("mirror/app")).unwrap();
        assert_eq!(
            (m.route.config.upstream.as_str(), m.remote.as_str()),
            ("reg", "team/app")
        );
        let m = t.resolve(&LocalName::new("mirror/special")).unwrap();
        assert_eq!(m.remote, "other/thing");
        let m = t.resolve(&LocalName::new("mirror/special/x")).unwrap();
        assert_eq!(m.remote, "team/special/x");
        let m = t.resolve(&LocalName::new("bp/true")).unwrap();
        assert_eq!(m.remote, "backplane/true");
    }

    #[test]
    fn docker_hub_library() {
        let t = table();
        assert_eq!(
            t.resolve(&LocalName::new("alpine")).unwrap().remote,
            "library/alpine"
        );
        assert_eq!(
            t.resolve(&LocalName::new("grafana/grafana"))
                .unwrap()
                .remote,
            "grafana/grafana"
        );
        assert_eq!(
            t.to_local("hub", &RemoteName::new("library/alpine"))
                .as_ref()
                .map(LocalName::as_str),
            Some("alpine")
        );
        assert_eq!(
            t.to_local("hub", &RemoteName::new("backplane/true"))
                .as_ref()
                .map(LocalName::as_str),
            Some("bp/true")
        );
    }

    #[test]
    fn unrouted_and_shadowed_names() {
        let t = RouteTable::new(vec![route("mirror/", "reg", "team/", false)]);
        assert!(t.resolve(&LocalName::new("other/app")).is_none());
        assert!(t.resolve(&LocalName::new("mirror/")).is_none());
        assert!(t.resolve(&LocalName::new("mirror")).is_none());
        assert_eq!(
            t.to_local("reg", &RemoteName::new("team/app"))
                .as_ref()
                .map(LocalName::as_str),
            Some("mirror/app")
        );
        assert_eq!(t.to_local("reg", &RemoteName::new("elsewhere/app")), None);
        assert_eq!(t.to_local("hub", &RemoteName::new("team/app")), None);
        // Exact routes are never listed.
        let t = table();
        assert_eq!(t.to_local("reg", &RemoteName::new("other/thing")), None);
        // team/special is shadowed by the exact route mirror/special.
        assert_eq!(t.to_local("reg", &RemoteName::new("team/special")), None);
    }

    #[test]
    fn name_map_rewrites_paths_and_scopes() {
        let mut n = NameMap::default();
        n.add(&RemoteName::new("team/app"), &LocalName::new("mirror/app"));
        n.add(
            &RemoteName::new("team/app/sub"),
            &LocalName::new("mirror/app/sub"),
        );
        assert_eq!(
            n.path("/v2/team/app/blobs/uploads/u1?_state=a%2Bb")
                .as_deref(),
            Some("/v2/mirror/app/blobs/uploads/u1?_state=a%2Bb")
        );
        assert_eq!(
            n.path("/v2/team/app/sub/tags/list").as_deref(),
            Some("/v2/mirror/app/sub/tags/list")
        );
        assert_eq!(n.path("/v2/team/application/tags/list"), None);
    }

    #[test]
    fn links_and_queries() {
        let link = link_header(r#"</v2/team/app/tags/list?last=b&n=2>; rel="next""#, |u| {
            Some(u.replace("team/", "mirror/"))
        });
        assert_eq!(link, r#"</v2/mirror/app/tags/list?last=b&n=2>; rel="next""#);
        let d = format!("sha256:{}", "a".repeat(64));
        let mut q = UploadQuery::parse(&format!("mount={d}&from=mirror%2Fx")).unwrap();
        assert_eq!(q.from(), Some("mirror/x"));
        q.set_from(Some("team/x"));
        assert_eq!(
            q.encode(),
            format!("mount=sha256%3A{}&from=team%2Fx", "a".repeat(64))
        );
        q.set_from(None);
        assert_eq!(q.encode(), "");
        // Keys are compared decoded: an encoded `from` is still `from`, and must be valid.
        let q = UploadQuery::parse(&format!("m%6Funt={d}&fr%6Fm=secret%2Frepo")).unwrap();
        assert_eq!(q.from(), Some("secret/repo"));
        assert!(UploadQuery::parse("from=a&fr%6Fm=b").is_err());
        assert!(UploadQuery::parse(&format!("from={}", "a/".repeat(200))).is_err());
        assert!(UploadQuery::parse("mount=nope&from=a").is_err());
    }

    #[test]
    fn mounts_are_kept_only_from_a_routed_repository_of_the_same_upstream() {
        let t = RouteTable::new(vec![
            route("m/", "reg", "team/", false),
            route("o/", "other", "team/", false),
            Route::new(
                RouteConfig {
                    relay: true,
                    ..RouteConfig::new("r/", "reg", "private/")
                },
                false,
                3,
            ),
        ]);
        let d = format!("sha256:{}", "a".repeat(64));
        let mounted = |query: &str| {
            let mut q = UploadQuery::parse(query).unwrap();
            let mut names = NameMap::default();
            let from = t.map_mount(&mut q, "reg", None, &mut names);
            (from.map(|f| f.to_string()), q.encode())
        };
        assert_eq!(
            mounted(&format!("mount={d}&from=m%2Fbase")),
            (
                Some("team/base".into()),
                format!("mount=sha256%3A{}&from=team%2Fbase", "a".repeat(64))
            )
        );
        // From another upstream, from a relay route, from nowhere, or from no one named:
        // a plain upload session.
        for query in [
            format!("mount={d}&from=o%2Fbase"),
            format!("mount={d}&from=r%2Fbase"),
            format!("mount={d}&from=elsewhere%2Fbase"),
            format!("mount={d}"),
        ] {
            assert_eq!(mounted(&query), (None, String::new()), "{query}");
        }
        assert_eq!(
            mounted(&format!("digest={d}")),
            (None, format!("digest=sha256%3A{}", "a".repeat(64)))
        );
        assert_eq!(
            forwarded_query("digest=sha256%3Aab&_state=x%3D"),
            "digest=sha256%3Aab&_state=x%3D"
        );
        assert_eq!(
            forwarded_query(&format!("m%6Funt={d}&_state=a%2Bb&from=x")),
            "_state=a%2Bb"
        );
        assert_eq!(
            query_param("a=1&from=mirror%2Fx", "from").as_deref(),
            Some("mirror/x")
        );
    }
}

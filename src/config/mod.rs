//! The one YAML file: its schema, `${VAR}` expansion and validation into the resolved
//! [`Config`] that the rest of the program runs on.
//!
//! Owns every config key and every config error message (`file:line:column: what is wrong`).
//! Must not open sockets or touch upstreams: checks here are about the file's own meaning.

mod env;
mod raw;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_saphyr::{Location, Spanned};
use url::Url;

use crate::oci::host::RegistryHost;

pub(crate) use env::expand;

/// The config ocigate runs with when given neither `--config` nor `OCIGATE_CONFIG`.
pub(crate) const DEFAULT_CONFIG: &str = include_str!("../../config/default.yaml");
pub(crate) const DEFAULT_CONFIG_NAME: &str = "<embedded default config>";

/// A config file that could not be read or does not make sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {error}")]
    Read { file: String, error: std::io::Error },
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        file: String,
        line: u64,
        column: u64,
        message: String,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config came from, for messages.
    pub source: String,
    pub server: ServerConfig,
    /// Upstreams by name, in name order.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    /// Client authentication (distribution token auth); `None` lets every client through.
    pub auth: Option<AuthConfig>,
    /// The built-in token server, issuing tokens at `path` on every listener.
    pub token_server: Option<TokenServerConfig>,
    /// Keys of the PASETO relay, for routes with `relay: true`.
    pub relay: Option<RelayConfig>,
    /// The pull-through cache, for routes with `cache: true`.
    pub cache: Option<CacheConfig>,
    /// The `HTTPS_PROXY` listener that intercepts the hosts of host routes.
    pub forward_proxy: Option<ForwardProxyConfig>,
}

#[derive(Debug, Clone)]
pub struct ForwardProxyConfig {
    pub listen: Vec<SocketAddr>,
    pub(crate) ca: CaSource,
    /// Host globs CONNECTed to untouched when no host route serves them.
    pub(crate) tunnel: Vec<String>,
    /// Proxy users (`Proxy-Authorization: Basic`); `None` admits every client.
    pub(crate) htpasswd: Option<PathBuf>,
    /// Whether intercepted hosts take pushes and deletes (else `405`).
    pub(crate) allow_push: bool,
}

/// Where the interception CA comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CaSource {
    /// Generated on first start (`ca.crt`, `ca.key`), then reused.
    Dir(PathBuf),
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
}

/// The forward proxy's listen address when none is given (docker-registry-proxy's port).
pub const DEFAULT_FORWARD_PROXY_LISTEN: &str = "0.0.0.0:3128";

/// A tag pattern (a regex matching the whole tag) and how long such tags are trusted.
#[derive(Debug, Clone)]
pub(crate) struct TagTtl {
    pub(crate) tags: regex::Regex,
    pub(crate) ttl: Duration,
}

impl CacheConfig {
    /// How long `tag`'s digest is trusted before a HEAD revalidates it.
    pub(crate) fn tag_ttl_for(&self, tag: &str) -> Duration {
        self.tag_ttls
            .iter()
            .find(|t| t.tags.is_match(tag))
            .map_or(self.tag_ttl, |t| t.ttl)
    }
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub(crate) dir: PathBuf,
    /// Bytes of cached objects kept at most; the least recently used go first.
    pub(crate) max_size: u64,
    /// How long a tag's digest is trusted before a HEAD revalidates it.
    pub(crate) tag_ttl: Duration,
    /// How long the upstream's word that a repository has an object is trusted before a
    /// HEAD proves it again (content deleted upstream stops being served).
    pub(crate) evidence_ttl: Duration,
    /// Answer from the cache when the upstream fails, times out, 429s or 5xxs.
    pub(crate) serve_stale: bool,
    /// Never contact upstreams; serve what is cached.
    pub(crate) offline: bool,
    /// Objects nobody used for this long are deleted (checked in the background).
    pub(crate) inactive: Option<Duration>,
    /// Per-tag trust periods, first match wins (else `tag_ttl`).
    pub(crate) tag_ttls: Vec<TagTtl>,
}

pub(crate) const DEFAULT_CACHE_MAX_SIZE: u64 = 10 << 30;
pub(crate) const DEFAULT_TAG_TTL: Duration = Duration::from_secs(300);
pub(crate) const DEFAULT_EVIDENCE_TTL: Duration = Duration::from_secs(86400);

#[derive(Clone)]
pub struct RelayConfig {
    /// 32 bytes: seals new relay tokens.
    pub secret_key: Vec<u8>,
    /// Still accepted for opening (key rotation).
    pub previous_keys: Vec<Vec<u8>>,
}

/// Never prints the keys.
impl std::fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RelayConfig(*** + {} previous)",
            self.previous_keys.len()
        )
    }
}

#[derive(Debug, Clone)]
pub struct TokenServerConfig {
    pub(crate) path: String,
    pub(crate) issuer: String,
    pub(crate) service: String,
    pub(crate) signing_key: PathBuf,
    pub(crate) certificate: PathBuf,
    pub(crate) lifetime: Duration,
    pub(crate) refresh_lifetime: Duration,
    pub(crate) htpasswd: Option<PathBuf>,
    pub(crate) oidc: Vec<OidcProviderConfig>,
    pub(crate) acl: Vec<AclRuleConfig>,
}

#[derive(Debug, Clone)]
pub(crate) struct OidcProviderConfig {
    /// The username clients log in with; accounts are `<name>:<sub>`.
    pub(crate) name: String,
    pub(crate) issuer: Url,
    pub(crate) audience: String,
    /// Refresh tokens of its logins may outlive the identity token (`refresh_lifetime`);
    /// off by default, so a short-lived CI token never becomes a month-long login.
    pub(crate) refresh: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct AclRuleConfig {
    /// Glob over the account name.
    pub(crate) account: String,
    /// Resource type the rule covers: `repository` (default) or `registry`.
    pub(crate) kind: String,
    /// Glob over the resource name; `${account}` and `${claims.<name>}` expand literally.
    pub(crate) repository: String,
    /// Claims that must all equal these values.
    pub(crate) claims: BTreeMap<String, String>,
    pub(crate) actions: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub token: TokenAuthConfig,
    /// Actions allowed without a token (`pull`, `push`, `delete`, `*`).
    pub anonymous: Vec<String>,
}

/// The distribution registry's `token` auth options, under the same names.
#[derive(Debug, Clone)]
pub struct TokenAuthConfig {
    pub realm: Option<Url>,
    pub service: String,
    pub issuer: String,
    /// PEM bundles whose certificates are roots for `x5c` and whose keys are trusted by `kid`:
    /// `rootcertbundle`, and the built-in token server's certificate.
    pub rootcertbundles: Vec<PathBuf>,
    pub jwks: Option<JwksSource>,
    pub signing_algorithms: Vec<jsonwebtoken::Algorithm>,
    /// Challenge with our own token path on the request's forwarded host instead of `realm`.
    pub autoredirect: bool,
    /// That path: `token_server.path`, else `/token`.
    pub realm_path: String,
}

/// Where a JWKS comes from: a file read at start, or a URL fetched (and refreshed) on demand.
#[derive(Debug, Clone)]
pub enum JwksSource {
    File(PathBuf),
    Url(Url),
}

/// Every asymmetric algorithm distribution accepts; HMAC never (a public key is no secret).
pub const DEFAULT_SIGNING_ALGORITHMS: [jsonwebtoken::Algorithm; 9] = [
    jsonwebtoken::Algorithm::RS256,
    jsonwebtoken::Algorithm::RS384,
    jsonwebtoken::Algorithm::RS512,
    jsonwebtoken::Algorithm::PS256,
    jsonwebtoken::Algorithm::PS384,
    jsonwebtoken::Algorithm::PS512,
    jsonwebtoken::Algorithm::ES256,
    jsonwebtoken::Algorithm::ES384,
    jsonwebtoken::Algorithm::EdDSA,
];

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    pub tls: Option<TlsConfig>,
    pub(crate) public_url: Option<Url>,
    /// Default: on unless `auth` or `relay` is configured (a page names what a route hides).
    pub browser_redirects: bool,
    pub shutdown_grace: Duration,
    /// A connection with a response its client takes no bytes of for this long is closed
    /// (HTTP/1.1 and HTTP/2: see [`crate::stall`]).
    pub send_timeout: Duration,
    /// `server.metrics.listen`: `/metrics` on a listener of its own instead of the public ones.
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub(crate) name: String,
    /// Scheme and authority only; Docker Hub's aliases already resolved to its API host.
    pub(crate) url: Url,
    pub credentials: Option<Credentials>,
    pub(crate) ca: Option<PathBuf>,
    pub(crate) insecure_skip_verify: bool,
    pub(crate) redirects: RedirectPolicy,
    /// Token realms outside the upstream's registrable domain that may receive credentials.
    pub(crate) allowed_realms: Vec<Url>,
    /// Redirect and realm targets that may be dialled although they resolve to a loopback,
    /// link-local, private or multicast address the upstream is not on.
    pub(crate) allowed_redirects: Vec<Url>,
    pub(crate) connect_timeout: Duration,
    pub(crate) idle_timeout: Duration,
}

impl UpstreamConfig {
    /// An upstream with defaults for everything but its URL.
    pub fn new(name: &str, url: Url) -> UpstreamConfig {
        UpstreamConfig {
            name: name.to_string(),
            url,
            credentials: None,
            ca: None,
            insecure_skip_verify: false,
            redirects: RedirectPolicy::Pass,
            allowed_realms: Vec::new(),
            allowed_redirects: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
        }
    }

    /// Whether this upstream is Docker Hub, whose one-component names live under `library/`.
    pub(crate) fn is_docker_hub(&self) -> bool {
        self.url.host_str() == Some(DOCKER_HUB_API_HOST)
    }
}

#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    Basic {
        username: String,
        password: String,
    },
    /// A verbatim `Authorization` value.
    Header(String),
    /// A Docker `config.json`; `None` means `$DOCKER_CONFIG` or `~/.docker`.
    DockerConfig(Option<PathBuf>),
    /// Amazon ECR: `GetAuthorizationToken` through the AWS SDK, refreshed in the background.
    Ecr(EcrCredentials),
    /// A Google service-account key, sent as `_json_key` Basic credentials.
    Gcp {
        /// `None`: `$GOOGLE_APPLICATION_CREDENTIALS`, read at start.
        key_file: Option<PathBuf>,
    },
    /// Chosen by the upstream's host name at start, like a cloud keychain.
    Auto,
}

impl Credentials {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Credentials::Basic { .. } => "basic",
            Credentials::Header(_) => "header",
            Credentials::DockerConfig(_) => "docker_config",
            Credentials::Ecr(_) => "ecr",
            Credentials::Gcp { .. } => "gcp",
            Credentials::Auto => "auto",
        }
    }
}

/// How often ECR credentials are refreshed at most, when the config says nothing.
pub(crate) const DEFAULT_ECR_REFRESH: Duration = Duration::from_secs(6 * 3600);

#[derive(Clone, PartialEq, Eq)]
pub struct EcrCredentials {
    /// `None`: from the host name, else from the AWS config.
    pub(crate) region: Option<String>,
    pub(crate) profile: Option<String>,
    /// Empty: from the host name, else the account's default registry.
    pub(crate) registry_ids: Vec<String>,
    /// Upper bound between refreshes.
    pub(crate) refresh: Duration,
    /// A fall-back token used until the SDK first succeeds.
    pub(crate) static_token: Option<String>,
}

impl EcrCredentials {
    pub(crate) fn new() -> EcrCredentials {
        EcrCredentials {
            region: None,
            profile: None,
            registry_ids: Vec::new(),
            refresh: DEFAULT_ECR_REFRESH,
            static_token: None,
        }
    }
}

impl Default for EcrCredentials {
    fn default() -> Self {
        EcrCredentials::new()
    }
}

/// Never prints secrets, so configs can be logged.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Credentials::Header(_) => f.write_str("Header(***)"),
            Credentials::DockerConfig(p) => write!(f, "DockerConfig({p:?})"),
            Credentials::Ecr(e) => write!(
                f,
                "Ecr(region {:?}, profile {:?}, registries {:?}, refresh {:?}, static {})",
                e.region,
                e.profile,
                e.registry_ids,
                e.refresh,
                if e.static_token.is_some() {
                    "***"
                } else {
                    "none"
                }
            ),
            Credentials::Gcp { key_file } => write!(f, "Gcp({key_file:?})"),
            Credentials::Auto => f.write_str("Auto"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RedirectPolicy {
    /// Hand blob redirects to the client.
    Pass,
    /// Stream the redirect target through the proxy, without `Authorization`.
    Follow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// `host:`, the registry host clients believe they talk to: the route serves only
    /// requests for that host (`?ns=`, in-path, intercepted), and its prefix applies to names
    /// inside it. `None`: a prefix route, for requests that name no host.
    pub(crate) host: Option<RegistryHost>,
    /// Local name prefix: `""` (everything), `"ns/"` (a namespace) or `"exact/name"`.
    pub(crate) prefix: String,
    pub(crate) upstream: String,
    /// What replaces `prefix` upstream: `""`, `"team/"` for namespaces; a full name for exact routes.
    pub(crate) remote: String,
    /// Relay upstream tokens to clients sealed in PASETOs (needs the `relay` section).
    pub(crate) relay: bool,
    /// What a relay route's tokens may grant (`pull`, `push`, `delete`); `pull` by default,
    /// since whoever holds the route's URL acts with the route's upstream credentials.
    pub(crate) relay_actions: Vec<String>,
    /// Pull through the cache (needs the `cache` section).
    pub(crate) cache: bool,
    /// `name:`, the route's label in metrics and logs instead of its prefix.
    pub(crate) name: Option<String>,
}

impl RouteConfig {
    /// A plain route: no relay, no cache, no name.
    pub fn new(prefix: &str, upstream: &str, remote: &str) -> RouteConfig {
        RouteConfig {
            host: None,
            prefix: prefix.into(),
            upstream: upstream.into(),
            remote: remote.into(),
            relay: false,
            relay_actions: vec!["pull".into()],
            cache: false,
            name: None,
        }
    }

    /// Namespace routes end in `/` (or are the default `""`); others name one repository.
    pub(crate) fn is_namespace(&self) -> bool {
        self.prefix.is_empty() || self.prefix.ends_with('/')
    }

    /// How messages name the route: `prefix "bp/"`, `host quay.io`, `host quay.io prefix "t/"`.
    pub(crate) fn describe(&self) -> String {
        match (&self.host, self.prefix.as_str()) {
            (None, prefix) => format!("prefix {prefix:?}"),
            (Some(host), "") => format!("host {host}"),
            (Some(host), prefix) => format!("host {host} prefix {prefix:?}"),
        }
    }
}

pub(crate) const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";

/// A duration as config files write it (`60d`, `10m`, `1500ms`), in its largest whole unit.
fn compact_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, per) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms > 0 && ms.is_multiple_of(per) {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

/// The embedded config's cache: the XDG cache directory, as desktop tools keep theirs.
fn default_cache_dir() -> String {
    let xdg = std::env::var("XDG_CACHE_HOME")
        .ok()
        .filter(|d| !d.is_empty());
    let home = std::env::var("HOME").ok().filter(|d| !d.is_empty());
    match (xdg, home) {
        (Some(xdg), _) => format!("{xdg}/ocigate"),
        (None, Some(home)) => format!("{home}/.cache/ocigate"),
        (None, None) => "/var/cache/ocigate".to_string(),
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            file: file.clone(),
            error,
        })?;
        Config::parse(&text, &file, &|k| std::env::var(k).ok())
    }

    /// The embedded default config.
    pub fn default_config() -> Result<Config, ConfigError> {
        Config::parse(DEFAULT_CONFIG, DEFAULT_CONFIG_NAME, &|k| {
            std::env::var(k).ok().or_else(|| match k {
                "OCIGATE_CACHE_DIR" => Some(default_cache_dir()),
                _ => None,
            })
        })
    }

    /// Parses generated YAML (literals only: no variable is set for it).
    pub fn parse_text(text: &str, file: &str) -> Result<Config, ConfigError> {
        Config::parse(text, file, &|_| None)
    }

    /// Parses and validates YAML text; `file` names it in errors, `env` resolves `${VAR}`.
    pub(crate) fn parse(
        text: &str,
        file: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = if text.trim().is_empty() {
            return Err(ConfigError::Invalid {
                file: file.into(),
                line: 1,
                column: 1,
                message: "the file is empty: at least `upstreams` and `routes` are needed".into(),
            });
        } else {
            serde_saphyr::from_str(text).map_err(|e| yaml_error(file, &e))?
        };
        Resolver { file, env }.config(raw)
    }

    /// The one-screen summary `check-config` prints. Never includes secrets.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let scheme = if self.server.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let _ = writeln!(s, "config: {}", self.source);
        for addr in &self.server.listen {
            let _ = writeln!(s, "listen: {scheme}://{addr}");
        }
        if let Some(url) = &self.server.public_url {
            let _ = writeln!(s, "public_url: {url}");
        }
        if let Some(a) = &self.auth {
            let realm = match (&a.token.realm, a.token.autoredirect) {
                (_, true) => "<this server>/token".to_string(),
                (Some(r), false) => r.to_string(),
                (None, false) => "-".to_string(),
            };
            let anonymous = if a.anonymous.is_empty() {
                "none".to_string()
            } else {
                a.anonymous.join(",")
            };
            let _ = writeln!(
                s,
                "auth: token (realm {realm}, service {}, issuer {}); anonymous: {anonymous}",
                a.token.service, a.token.issuer
            );
        }
        if let Some(c) = &self.cache {
            let _ = writeln!(
                s,
                "cache: {} (max {} bytes, tag_ttl {}, serve_stale {}{})",
                c.dir.display(),
                c.max_size,
                humantime::format_duration(c.tag_ttl),
                c.serve_stale,
                if c.offline { ", offline" } else { "" }
            );
        }
        if let Some(c) = &self.cache {
            if let Some(inactive) = c.inactive {
                let _ = writeln!(s, "  inactive {}", compact_duration(inactive));
            }
            for t in &c.tag_ttls {
                let _ = writeln!(
                    s,
                    "  tags {} trusted {}",
                    t.tags.as_str(),
                    compact_duration(t.ttl)
                );
            }
        }
        if let Some(f) = &self.forward_proxy {
            let ca = match &f.ca {
                CaSource::Dir(d) => format!("{} (generated there if missing)", d.display()),
                CaSource::Files { cert, .. } => cert.display().to_string(),
            };
            for addr in &f.listen {
                let _ = writeln!(s, "forward_proxy: http://{addr}");
            }
            let tunnel = match f.tunnel.is_empty() {
                true => "none".to_string(),
                false => f.tunnel.join(" "),
            };
            let _ = writeln!(
                s,
                "  ca {ca}; tunnel: {tunnel}; users: {}; push: {}",
                if f.htpasswd.is_some() {
                    "htpasswd"
                } else {
                    "anyone"
                },
                f.allow_push
            );
        }
        let _ = writeln!(s, "upstreams:");
        for u in self.upstreams.values() {
            let creds = u
                .credentials
                .as_ref()
                .map_or("anonymous", Credentials::kind);
            let redirects = match u.redirects {
                RedirectPolicy::Pass => "pass",
                RedirectPolicy::Follow => "follow",
            };
            let _ = writeln!(
                s,
                "  {:<12} {}  credentials={creds} redirects={redirects}",
                u.name,
                u.url.as_str().trim_end_matches('/')
            );
        }
        let _ = writeln!(s, "routes:");
        for r in &self.routes {
            let local = match (&r.host, r.prefix.as_str()) {
                (None, "") => "(default)".to_string(),
                (None, prefix) => prefix.to_string(),
                (Some(host), prefix) => format!("{host}/{prefix}"),
            };
            let mut kind = if r.is_namespace() {
                "namespace".to_string()
            } else {
                "repository".to_string()
            };
            if r.relay {
                let _ = write!(kind, ", relay [{}]", r.relay_actions.join(", "));
            }
            if r.cache {
                kind.push_str(", cache");
            }
            let _ = writeln!(
                s,
                "  {local:<24} -> {}:{}  ({kind})",
                r.upstream,
                if r.remote.is_empty() {
                    "(same name)"
                } else {
                    &r.remote
                }
            );
        }
        s
    }
}

fn yaml_error(file: &str, e: &serde_saphyr::Error) -> ConfigError {
    let loc = e.location().unwrap_or(Location::UNKNOWN);
    let options = serde_saphyr::render_options! {
        snippets: serde_saphyr::SnippetMode::Off,
    };
    let rendered = e.without_snippet().render_with_options(options);
    // The renderer appends its own " at line L column C"; the prefix carries that already.
    let message = match rendered.rfind(" at line ") {
        Some(i) => rendered[..i].to_string(),
        None => rendered,
    };
    ConfigError::Invalid {
        file: file.into(),
        line: loc.line().max(1),
        column: loc.column().max(1),
        message,
    }
}

/// Turns the raw, spanned schema into a [`Config`], expanding `${VAR}` and checking meaning.
struct Resolver<'a> {
    file: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
}

type S = Spanned<String>;

impl Resolver<'_> {
    fn err(&self, at: Location, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.into(),
            line: at.line().max(1),
            column: at.column().max(1),
            message: message.into(),
        }
    }

    fn string(&self, key: &str, v: &S) -> Result<String, ConfigError> {
        expand(&v.value, self.env).map_err(|m| self.err(v.referenced, format!("{key}: {m}")))
    }

    fn path(&self, key: &str, v: &S) -> Result<PathBuf, ConfigError> {
        let p = self.string(key, v)?;
        if p.is_empty() {
            return Err(self.err(v.referenced, format!("{key}: empty path")));
        }
        Ok(PathBuf::from(p))
    }

    /// A file that must exist and be readable now, so a typo fails at start, not mid-request.
    fn existing_file(&self, key: &str, v: &S) -> Result<PathBuf, ConfigError> {
        let p = self.path(key, v)?;
        std::fs::File::open(&p).map_err(|e| {
            self.err(
                v.referenced,
                format!("{key}: cannot read {}: {e}", p.display()),
            )
        })?;
        Ok(p)
    }

    /// An absolute `http://` or `https://` URL with a host.
    fn http_url(&self, key: &str, v: &S) -> Result<Url, ConfigError> {
        let text = self.string(key, v)?;
        Url::parse(&text)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| {
                self.err(
                    v.referenced,
                    format!("{key}: {text:?} is not an http(s) URL"),
                )
            })
    }

    /// A registry action: `pull`, `push`, `delete` or `*`.
    fn action(&self, key: &str, v: &S) -> Result<String, ConfigError> {
        let action = self.string(key, v)?;
        if matches!(action.as_str(), "pull" | "push" | "delete" | "*") {
            Ok(action)
        } else {
            Err(self.err(
                v.referenced,
                format!("{key}: {action:?} is not an action (pull, push, delete, *)"),
            ))
        }
    }

    fn address(&self, key: &str, v: &S) -> Result<SocketAddr, ConfigError> {
        let text = self.string(key, v)?;
        text.parse::<SocketAddr>().map_err(|_| {
            self.err(
                v.referenced,
                format!(
                    "{key}: {text:?} is not an address:port (e.g. \"127.0.0.1:5000\" or \"[::]:5000\")"
                ),
            )
        })
    }

    fn duration(&self, key: &str, v: &S) -> Result<Duration, ConfigError> {
        let s = self.string(key, v)?;
        parse_duration(&s).ok_or_else(|| {
            self.err(
                v.referenced,
                format!("{key}: {s:?} is not a duration (examples: 500ms, 30s, 5m, 1h30m)"),
            )
        })
    }

    fn config(&self, raw: raw::RawConfig) -> Result<Config, ConfigError> {
        let protected = raw.auth.is_some() || raw.relay.is_some();
        let server = self.server(raw.server, protected)?;
        let mut upstreams = BTreeMap::new();
        for (name, u) in raw.upstreams {
            let upstream = self.upstream(&name, u)?;
            upstreams.insert(name, upstream);
        }
        let mut routes: Vec<RouteConfig> = Vec::new();
        let mut route_locations = Vec::new();
        let mut seen: BTreeMap<String, Location> = BTreeMap::new();
        for r in raw.routes {
            let at = r.referenced;
            route_locations.push(at);
            let route = self.route(r.value, at, &upstreams)?;
            if let Some(first) = seen.insert(route.describe(), at) {
                return Err(self.err(
                    at,
                    format!(
                        "routes: {} is already routed at line {}",
                        route.describe(),
                        first.line()
                    ),
                ));
            }
            routes.push(route);
        }
        if upstreams.is_empty() {
            return Err(self.err(
                Location::UNKNOWN,
                "upstreams: at least one upstream is needed",
            ));
        }
        if routes.is_empty() {
            return Err(self.err(
                Location::UNKNOWN,
                "routes: at least one route is needed (prefix \"\" routes every name)",
            ));
        }
        let token_server = match raw.token_server {
            Some(t) => Some(self.token_server(t, raw.auth.as_ref())?),
            None => None,
        };
        let relay = match &raw.relay {
            Some(r) => Some(self.relay(r)?),
            None => None,
        };
        // With client auth, the relay seals only what the token server's ACL grants: the two
        // come together or not at all.
        if relay.is_some() && (raw.auth.is_some() != token_server.is_some()) {
            let at = raw
                .relay
                .as_ref()
                .map_or(Location::UNKNOWN, |r| r.referenced);
            return Err(self.err(
                at,
                "relay: with `auth` or `token_server`, give both: the token server authenticates clients before their relay tokens are sealed",
            ));
        }
        if let Some((route, at)) = routes.iter().zip(&route_locations).find(|(r, _)| r.relay)
            && relay.is_none()
        {
            return Err(self.err(
                *at,
                format!(
                    "routes: {} has `relay: true` but there is no `relay` section with a secret_key",
                    route.describe()
                ),
            ));
        }
        let cache = match &raw.cache {
            Some(c) => Some(self.cache(c)?),
            None => None,
        };
        if let Some((route, at)) = routes.iter().zip(&route_locations).find(|(r, _)| r.cache)
            && cache.is_none()
        {
            return Err(self.err(
                *at,
                format!(
                    "routes: {} has `cache: true` but there is no `cache` section with a dir",
                    route.describe()
                ),
            ));
        }
        let auth = match raw.auth {
            Some(a) => Some(self.auth(a, token_server.as_ref())?),
            None => None,
        };
        let forward_proxy = match &raw.forward_proxy {
            Some(f) => Some(self.forward_proxy(f)?),
            None => None,
        };
        Ok(Config {
            source: self.file.to_string(),
            server,
            upstreams,
            routes,
            auth,
            token_server,
            relay,
            cache,
            forward_proxy,
        })
    }

    fn forward_proxy(
        &self,
        raw: &Spanned<raw::RawForwardProxy>,
    ) -> Result<ForwardProxyConfig, ConfigError> {
        let f = &raw.value;
        let listen = match &f.listen {
            None => vec![self.address(
                "forward_proxy.listen",
                &Spanned::new(
                    DEFAULT_FORWARD_PROXY_LISTEN.to_string(),
                    raw.referenced,
                    raw.defined,
                ),
            )?],
            Some(l) => {
                let mut out = Vec::new();
                for item in l.value.items() {
                    let spanned = Spanned::new(item.to_string(), l.referenced, l.defined);
                    out.push(self.address("forward_proxy.listen", &spanned)?);
                }
                if out.is_empty() {
                    return Err(self.err(l.referenced, "forward_proxy.listen: no address given"));
                }
                out
            }
        };
        let ca = match (&f.ca.value.dir, &f.ca.value.cert, &f.ca.value.key) {
            (Some(dir), None, None) => CaSource::Dir(self.path("forward_proxy.ca.dir", dir)?),
            (None, Some(cert), Some(key)) => CaSource::Files {
                cert: self.existing_file("forward_proxy.ca.cert", cert)?,
                key: self.existing_file("forward_proxy.ca.key", key)?,
            },
            _ => {
                return Err(self.err(
                    f.ca.referenced,
                    "forward_proxy.ca: give exactly one of `dir` (generated and kept there) or `cert` and `key`",
                ));
            }
        };
        let mut tunnel = Vec::new();
        for glob in &f.tunnel {
            let text = self
                .string("forward_proxy.tunnel", glob)?
                .to_ascii_lowercase();
            let ok = !text.is_empty()
                && text
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '*' | '?'));
            if !ok {
                return Err(self.err(
                    glob.referenced,
                    format!(
                        "forward_proxy.tunnel: {text:?} is not a host name glob (examples: \"*.cloudfront.net\", \"*\")"
                    ),
                ));
            }
            tunnel.push(text);
        }
        let htpasswd = match f.users.as_ref().and_then(|u| u.htpasswd.as_ref()) {
            Some(p) => Some(self.existing_file("forward_proxy.users.htpasswd", p)?),
            None => None,
        };
        Ok(ForwardProxyConfig {
            listen,
            ca,
            tunnel,
            htpasswd,
            allow_push: f.allow_push.unwrap_or(true),
        })
    }

    fn cache(&self, raw: &Spanned<raw::RawCache>) -> Result<CacheConfig, ConfigError> {
        let c = &raw.value;
        let max_size = match &c.max_size {
            None => DEFAULT_CACHE_MAX_SIZE,
            Some(v) => {
                let text = self.string("cache.max_size", v)?;
                parse_size(&text).filter(|n| *n > 0).ok_or_else(|| {
                    self.err(
                        v.referenced,
                        format!(
                            "cache.max_size: {text:?} is not a size (examples: 500MiB, 32GiB, 1TB)"
                        ),
                    )
                })?
            }
        };
        Ok(CacheConfig {
            dir: self.path("cache.dir", &c.dir)?,
            max_size,
            tag_ttl: match &c.tag_ttl {
                None => DEFAULT_TAG_TTL,
                Some(v) => self.duration("cache.tag_ttl", v)?,
            },
            evidence_ttl: match &c.evidence_ttl {
                None => DEFAULT_EVIDENCE_TTL,
                Some(v) => self.duration("cache.evidence_ttl", v)?,
            },
            serve_stale: c.serve_stale.unwrap_or(true),
            offline: c.offline.unwrap_or(false),
            inactive: match &c.inactive {
                None => None,
                Some(v) => Some(self.duration("cache.inactive", v)?).filter(|d| !d.is_zero()),
            },
            tag_ttls: c
                .tag_ttls
                .iter()
                .map(|t| self.tag_ttl_rule(&t.value))
                .collect::<Result<_, _>>()?,
        })
    }

    fn tag_ttl_rule(&self, raw: &raw::RawTagTtl) -> Result<TagTtl, ConfigError> {
        let pattern = self.string("cache.tag_ttls.tags", &raw.tags)?;
        // Anchored: a tier for `stable` must not also take `unstable-2`.
        let tags = regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
            self.err(
                raw.tags.referenced,
                format!("cache.tag_ttls.tags: {pattern:?} is not a regular expression: {e}"),
            )
        })?;
        Ok(TagTtl {
            tags,
            ttl: self.duration("cache.tag_ttls.ttl", &raw.ttl)?,
        })
    }

    fn relay(&self, raw: &Spanned<raw::RawRelay>) -> Result<RelayConfig, ConfigError> {
        let key = |v: &S, name: &str| -> Result<Vec<u8>, ConfigError> {
            let text = self.string(name, v)?;
            hex::decode(text.trim())
                .ok()
                .filter(|k| k.len() == 32)
                .ok_or_else(|| {
                    self.err(
                        v.referenced,
                        format!(
                            "{name}: must be 64 hex characters (32 bytes; `openssl rand -hex 32`)"
                        ),
                    )
                })
        };
        Ok(RelayConfig {
            secret_key: key(&raw.value.secret_key, "relay.secret_key")?,
            previous_keys: raw
                .value
                .previous_keys
                .iter()
                .map(|k| key(k, "relay.previous_keys"))
                .collect::<Result<_, _>>()?,
        })
    }

    fn token_server(
        &self,
        raw: Spanned<raw::RawTokenServer>,
        auth: Option<&Spanned<raw::RawAuth>>,
    ) -> Result<TokenServerConfig, ConfigError> {
        let at = raw.referenced;
        let t = raw.value;
        let path = match &t.path {
            Some(p) => self.string("token_server.path", p)?,
            None => "/token".to_string(),
        };
        if !path.starts_with('/')
            || path.starts_with("/v2")
            || path == "/healthz"
            || path == "/metrics"
        {
            let loc = t.path.as_ref().map_or(at, |p| p.referenced);
            return Err(self.err(
                loc,
                format!("token_server.path: {path:?} must start with / and not clash with /v2, /healthz or /metrics"),
            ));
        }
        let service = match (&t.service, auth.and_then(|a| a.value.token.as_ref())) {
            (Some(s), _) => self.string("token_server.service", s)?,
            (None, Some(token)) => self.string("auth.token.service", &token.value.service)?,
            (None, None) => {
                return Err(self.err(
                    at,
                    "token_server: give `service` (or configure auth.token.service)",
                ));
            }
        };
        let lifetime = match &t.lifetime {
            Some(l) => self.duration("token_server.lifetime", l)?,
            None => Duration::from_secs(300),
        };
        if lifetime < Duration::from_secs(60) {
            let loc = t.lifetime.as_ref().map_or(at, |l| l.referenced);
            return Err(self.err(
                loc,
                "token_server.lifetime: at least 60s (clients expect it)",
            ));
        }
        let refresh_lifetime = match &t.refresh_lifetime {
            Some(l) => self.duration("token_server.refresh_lifetime", l)?,
            None => Duration::from_secs(30 * 86400),
        };
        let htpasswd = match t.users.as_ref().and_then(|u| u.htpasswd.as_ref()) {
            Some(p) => Some(self.existing_file("token_server.users.htpasswd", p)?),
            None => None,
        };
        let mut oidc = Vec::new();
        for p in &t.oidc {
            let name = self.string("token_server.oidc.name", &p.value.name)?;
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !valid || oidc.iter().any(|o: &OidcProviderConfig| o.name == name) {
                return Err(self.err(
                    p.value.name.referenced,
                    format!("token_server.oidc.name: {name:?} must be unique and made of letters, digits, '-', '_' or '.'"),
                ));
            }
            let issuer = self.http_url("token_server.oidc.issuer", &p.value.issuer)?;
            let audience = self.string("token_server.oidc.audience", &p.value.audience)?;
            if audience.is_empty() {
                return Err(self.err(
                    p.value.audience.referenced,
                    "token_server.oidc.audience: required",
                ));
            }
            oidc.push(OidcProviderConfig {
                name,
                issuer,
                audience,
                refresh: p.value.refresh.unwrap_or(false),
            });
        }
        let mut acl = Vec::new();
        for r in &t.acl {
            let rule = &r.value;
            let kind = match &rule.kind {
                Some(k) => self.string("token_server.acl.type", k)?,
                None => "repository".to_string(),
            };
            if kind != "repository" && kind != "registry" {
                let loc = rule.kind.as_ref().map_or(r.referenced, |k| k.referenced);
                return Err(self.err(
                    loc,
                    format!("token_server.acl.type: {kind:?} is neither repository nor registry"),
                ));
            }
            let repository = rule.repository.value.clone();
            if let Err(m) = crate::token::acl::check_template(&repository) {
                return Err(self.err(
                    rule.repository.referenced,
                    format!("token_server.acl.repository: {m}"),
                ));
            }
            let actions = rule
                .actions
                .iter()
                .map(|a| self.action("token_server.acl.actions", a))
                .collect::<Result<Vec<_>, _>>()?;
            let mut claims = BTreeMap::new();
            for (k, v) in &rule.claims {
                claims.insert(k.clone(), self.string("token_server.acl.claims", v)?);
            }
            acl.push(AclRuleConfig {
                account: self.string("token_server.acl.account", &rule.account)?,
                kind,
                repository,
                claims,
                actions,
            });
        }
        Ok(TokenServerConfig {
            path,
            issuer: self.string("token_server.issuer", &t.issuer)?,
            service,
            signing_key: self.existing_file("token_server.signing_key", &t.signing_key)?,
            certificate: self.existing_file("token_server.certificate", &t.certificate)?,
            lifetime,
            refresh_lifetime,
            htpasswd,
            oidc,
            acl,
        })
    }

    fn auth(
        &self,
        raw: Spanned<raw::RawAuth>,
        token_server: Option<&TokenServerConfig>,
    ) -> Result<AuthConfig, ConfigError> {
        let at = raw.referenced;
        let a = raw.value;
        let Some(t) = a.token else {
            return Err(self.err(
                at,
                "auth: `token` is required (realm, service, issuer, keys)",
            ));
        };
        let anonymous = a
            .anonymous
            .iter()
            .flatten()
            .map(|v| self.action("auth.anonymous", v))
            .collect::<Result<Vec<_>, _>>()?;
        let token_at = t.referenced;
        let t = t.value;
        let realm = match &t.realm {
            None => None,
            Some(r) => Some(self.http_url("auth.token.realm", r)?),
        };
        // With the built-in token server and no realm, clients are sent to it.
        let autoredirect =
            t.autoredirect.unwrap_or(false) || (realm.is_none() && token_server.is_some());
        if realm.is_none() && !autoredirect {
            return Err(self.err(
                token_at,
                "auth.token: give `realm`, or `autoredirect: true` to use this server's /token",
            ));
        }
        let rootcertbundle = match &t.rootcertbundle {
            Some(p) => Some(self.existing_file("auth.token.rootcertbundle", p)?),
            None => None,
        };
        let jwks = match &t.jwks {
            Some(p) => {
                let text = self.string("auth.token.jwks", p)?;
                if text.starts_with("https://") || text.starts_with("http://") {
                    Some(JwksSource::Url(self.http_url("auth.token.jwks", p)?))
                } else {
                    Some(JwksSource::File(self.existing_file("auth.token.jwks", p)?))
                }
            }
            None => None,
        };
        // The built-in token server's certificate is trusted without being named again.
        let rootcertbundles: Vec<PathBuf> = rootcertbundle
            .into_iter()
            .chain(token_server.map(|t| t.certificate.clone()))
            .collect();
        if rootcertbundles.is_empty() && jwks.is_none() {
            return Err(self.err(
                token_at,
                "auth.token: give `rootcertbundle` and/or `jwks`: the keys tokens are signed with",
            ));
        }
        let signing_algorithms = match &t.signingalgorithms {
            None => DEFAULT_SIGNING_ALGORITHMS.to_vec(),
            Some(list) => {
                let mut algs = Vec::new();
                for item in list {
                    let name = self.string("auth.token.signingalgorithms", item)?;
                    let alg = name
                        .parse::<jsonwebtoken::Algorithm>()
                        .ok()
                        .filter(|a| DEFAULT_SIGNING_ALGORITHMS.contains(a))
                        .ok_or_else(|| {
                            self.err(
                                item.referenced,
                                format!(
                                    "auth.token.signingalgorithms: {name:?} is not one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"
                                ),
                            )
                        })?;
                    algs.push(alg);
                }
                algs
            }
        };
        Ok(AuthConfig {
            token: TokenAuthConfig {
                realm,
                service: self.string("auth.token.service", &t.service)?,
                issuer: self.string("auth.token.issuer", &t.issuer)?,
                rootcertbundles,
                jwks,
                signing_algorithms,
                autoredirect,
                realm_path: token_server.map_or_else(|| "/token".to_string(), |t| t.path.clone()),
            },
            anonymous,
        })
    }

    /// `protected`: `auth` or `relay` is configured.
    fn server(&self, raw: raw::RawServer, protected: bool) -> Result<ServerConfig, ConfigError> {
        let mut listen = Vec::new();
        match &raw.listen {
            None => listen.push(SocketAddr::from(([127, 0, 0, 1], 5000))),
            Some(l) => {
                for item in l.value.items() {
                    let spanned = Spanned::new(item.to_string(), l.referenced, l.defined);
                    listen.push(self.address("server.listen", &spanned)?);
                }
                if listen.is_empty() {
                    return Err(self.err(l.referenced, "server.listen: no address given"));
                }
            }
        }
        let tls = match raw.tls {
            None => None,
            Some(t) => Some(TlsConfig {
                cert: self.existing_file("server.tls.cert", &t.cert)?,
                key: self.existing_file("server.tls.key", &t.key)?,
            }),
        };
        let public_url = match &raw.public_url {
            None => None,
            Some(v) => {
                let url = self.http_url("server.public_url", v)?;
                if url.path() != "/" || url.query().is_some() {
                    return Err(self.err(
                        v.referenced,
                        "server.public_url: must not have a path or query (the API lives at /v2/)",
                    ));
                }
                Some(url)
            }
        };
        let metrics_listen = match &raw.metrics {
            None => None,
            Some(m) => Some(self.address("server.metrics.listen", &m.listen)?),
        };
        let send_timeout = match &raw.send_timeout {
            None => Duration::from_secs(60),
            Some(v) => self.duration("server.send_timeout", v)?,
        };
        if send_timeout.is_zero() {
            return Err(self.err(
                raw.send_timeout
                    .as_ref()
                    .map_or(Location::UNKNOWN, |v| v.referenced),
                "server.send_timeout: must be more than 0s",
            ));
        }
        let shutdown_grace = match &raw.shutdown_grace {
            None => Duration::from_secs(30),
            Some(v) => self.duration("server.shutdown_grace", v)?,
        };
        Ok(ServerConfig {
            listen,
            tls,
            public_url,
            // Browser redirects name the upstream and remote repository before any auth.
            browser_redirects: raw.browser_redirects.unwrap_or(!protected),
            shutdown_grace,
            send_timeout,
            metrics_listen,
        })
    }

    fn upstream(
        &self,
        name: &str,
        raw: Spanned<raw::RawUpstream>,
    ) -> Result<UpstreamConfig, ConfigError> {
        let key = |k: &str| format!("upstreams.{name}.{k}");
        let u = raw.value;
        let url_text = self.string(&key("url"), &u.url)?;
        let url = parse_upstream_url(&url_text)
            .map_err(|m| self.err(u.url.referenced, format!("{}: {m}", key("url"))))?;
        let mut upstream = UpstreamConfig::new(name, url);
        if let Some(c) = u.credentials {
            upstream.credentials = Some(self.credentials(name, c)?);
        }
        if let Some(ca) = &u.ca {
            upstream.ca = Some(self.existing_file(&key("ca"), ca)?);
        }
        upstream.insecure_skip_verify = u.insecure_skip_verify.unwrap_or(false);
        if let Some(r) = &u.redirects {
            upstream.redirects = match self.string(&key("redirects"), r)?.as_str() {
                "pass" => RedirectPolicy::Pass,
                "follow" => RedirectPolicy::Follow,
                other => {
                    return Err(self.err(
                        r.referenced,
                        format!(
                            "{}: {other:?} is neither \"pass\" nor \"follow\"",
                            key("redirects")
                        ),
                    ));
                }
            };
        }
        for realm in u.allowed_realms.iter().flatten() {
            upstream
                .allowed_realms
                .push(self.http_url(&key("allowed_realms"), realm)?);
        }
        for target in u.allowed_redirects.iter().flatten() {
            upstream
                .allowed_redirects
                .push(self.http_url(&key("allowed_redirects"), target)?);
        }
        if let Some(t) = &u.connect_timeout {
            upstream.connect_timeout = self.duration(&key("connect_timeout"), t)?;
        }
        if let Some(t) = &u.idle_timeout {
            upstream.idle_timeout = self.duration(&key("idle_timeout"), t)?;
        }
        Ok(upstream)
    }

    fn credentials(
        &self,
        name: &str,
        raw: Spanned<raw::RawCredentialsSetting>,
    ) -> Result<Credentials, ConfigError> {
        let key = format!("upstreams.{name}.credentials");
        let c = match raw.value {
            raw::RawCredentialsSetting::Keyword(k) if k == "auto" => return Ok(Credentials::Auto),
            raw::RawCredentialsSetting::Keyword(k) => {
                return Err(self.err(
                    raw.referenced,
                    format!("{key}: {k:?} is not a credentials kind; give `auto` or a map with one of basic, header, docker_config, ecr, gcp"),
                ));
            }
            raw::RawCredentialsSetting::Map(c) => *c,
        };
        let given = [
            c.basic.is_some(),
            c.header.is_some(),
            c.docker_config.is_some(),
            c.ecr.is_some(),
            c.gcp.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(self.err(
                raw.referenced,
                format!("{key}: give exactly one of basic, header, docker_config, ecr, gcp"),
            ));
        }
        if let Some(b) = c.basic {
            let username = self.string(&format!("{key}.basic.username"), &b.username)?;
            if username.is_empty() || username.contains(':') {
                return Err(self.err(
                    b.username.referenced,
                    format!("{key}.basic.username: must be non-empty and contain no ':'"),
                ));
            }
            let password = self.string(&format!("{key}.basic.password"), &b.password)?;
            return Ok(Credentials::Basic { username, password });
        }
        if let Some(h) = &c.header {
            let value = self.string(&format!("{key}.header"), h)?;
            let valid = value
                .split_once(' ')
                .is_some_and(|(s, rest)| !s.is_empty() && !rest.trim().is_empty())
                && http::HeaderValue::from_str(&value).is_ok();
            if !valid {
                return Err(self.err(
                    h.referenced,
                    format!("{key}.header: must be a full Authorization value such as \"Basic dXNlcjpwYXNz\""),
                ));
            }
            return Ok(Credentials::Header(value));
        }
        if let Some(e) = c.ecr {
            return self.ecr(&format!("{key}.ecr"), e);
        }
        if let Some(g) = c.gcp {
            let key_file = match &g.value.key_file {
                Some(f) => Some(self.existing_file(&format!("{key}.gcp.key_file"), f)?),
                None => None,
            };
            return Ok(Credentials::Gcp { key_file });
        }
        let Some(d) = c.docker_config else {
            return Err(self.err(raw.referenced, format!("{key}: no credentials given")));
        };
        match d.value {
            raw::DockerConfigSetting::Flag(true) => Ok(Credentials::DockerConfig(None)),
            raw::DockerConfigSetting::Flag(false) => Err(self.err(
                d.referenced,
                format!("{key}.docker_config: false is not allowed; remove the key instead"),
            )),
            raw::DockerConfigSetting::Path(p) => {
                let spanned = Spanned::new(p, d.referenced, d.defined);
                let path = self.existing_file(&format!("{key}.docker_config"), &spanned)?;
                Ok(Credentials::DockerConfig(Some(path)))
            }
        }
    }

    fn ecr(&self, key: &str, raw: Spanned<raw::RawEcr>) -> Result<Credentials, ConfigError> {
        if !cfg!(feature = "ecr") {
            return Err(self.err(
                raw.referenced,
                format!("{key}: this ocigate was built without the `ecr` feature (rebuild with default features)"),
            ));
        }
        let e = raw.value;
        let mut ecr = EcrCredentials::new();
        if let Some(r) = &e.region {
            let region = self.string(&format!("{key}.region"), r)?;
            if !is_aws_region(&region) {
                return Err(self.err(
                    r.referenced,
                    format!(
                        "{key}.region: {region:?} is not an AWS region name (such as us-east-1)"
                    ),
                ));
            }
            ecr.region = Some(region);
        }
        if let Some(p) = &e.profile {
            ecr.profile = Some(self.string(&format!("{key}.profile"), p)?);
        }
        for id in e.registry_ids.iter().flatten() {
            let text = self.string(&format!("{key}.registry_ids"), id)?;
            if text.len() != 12 || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(self.err(
                    id.referenced,
                    format!("{key}.registry_ids: {text:?} is not a 12-digit AWS account id"),
                ));
            }
            ecr.registry_ids.push(text);
        }
        if let Some(r) = &e.refresh {
            ecr.refresh = self.duration(&format!("{key}.refresh"), r)?;
            if ecr.refresh < Duration::from_secs(1) {
                return Err(self.err(r.referenced, format!("{key}.refresh: must be at least 1s")));
            }
        }
        if let Some(t) = &e.static_token {
            let token = self.string(&format!("{key}.static"), t)?;
            // An unset `${ECR_TOKEN:-}` means no fall-back, not an empty password.
            ecr.static_token = Some(token).filter(|t| !t.is_empty());
        }
        Ok(Credentials::Ecr(ecr))
    }

    fn route(
        &self,
        r: raw::RawRoute,
        at: Location,
        upstreams: &BTreeMap<String, UpstreamConfig>,
    ) -> Result<RouteConfig, ConfigError> {
        let host = match &r.host {
            None => None,
            Some(v) => {
                let text = self.string("routes.host", v)?;
                let host = RegistryHost::parse(&text).ok_or_else(|| {
                    self.err(
                        v.referenced,
                        format!(
                            "routes.host: {text:?} is not a registry host name (examples: quay.io, registry.test:5000; not an IP address)"
                        ),
                    )
                })?;
                Some(host)
            }
        };
        let prefix = match &r.prefix {
            Some(p) => self.string("routes.prefix", p)?,
            None if host.is_some() => String::new(),
            None => {
                return Err(self.err(
                    at,
                    "routes: a route needs `prefix`, `host` or both (prefix \"\" routes every name)",
                ));
            }
        };
        let prefix_at = r.prefix.as_ref().map_or(at, |p| p.referenced);
        let upstream = self.string("routes.upstream", &r.upstream)?;
        if !upstreams.contains_key(&upstream) {
            let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
            return Err(self.err(
                r.upstream.referenced,
                format!(
                    "routes.upstream: no upstream named {upstream:?} (defined: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        let namespace = prefix.is_empty() || prefix.ends_with('/');
        let stem = prefix.trim_end_matches('/');
        if !prefix.is_empty() && crate::oci::path::validate_name(stem).is_err() {
            return Err(self.err(
                prefix_at,
                format!(
                    "routes.prefix: {prefix:?} is not a repository name or namespace (lower-case components separated by '/')"
                ),
            ));
        }
        let written = match &r.remote {
            Some(v) => self.string("routes.remote", v)?,
            None if namespace => String::new(),
            None => prefix.clone(),
        };
        let remote_stem = written.trim_end_matches('/');
        if (!written.is_empty() || !namespace)
            && crate::oci::path::validate_name(remote_stem).is_err()
        {
            let at = r.remote.as_ref().map_or(prefix_at, |v| v.referenced);
            return Err(self.err(
                at,
                format!("routes.remote: {written:?} is not a valid repository name or namespace"),
            ));
        }
        let remote = if namespace && !remote_stem.is_empty() {
            format!("{remote_stem}/")
        } else {
            written
        };
        let relay = r.relay.unwrap_or(false);
        if relay && host.is_some() {
            return Err(self.err(
                at,
                "routes: a host route cannot relay (`relay: true` is for prefix routes, whose URL is the capability)",
            ));
        }
        let relay_actions = match &r.relay_actions {
            None => vec!["pull".to_string()],
            Some(_) if !relay => {
                return Err(self.err(
                    prefix_at,
                    "routes.relay_actions: only for routes with `relay: true`",
                ));
            }
            Some(list) => {
                let mut actions = Vec::new();
                for v in &list.value {
                    let action = self.string("routes.relay_actions", v)?;
                    if !matches!(action.as_str(), "pull" | "push" | "delete") {
                        return Err(self.err(
                            v.referenced,
                            format!(
                                "routes.relay_actions: {action:?} is not one of pull, push, delete"
                            ),
                        ));
                    }
                    if !actions.contains(&action) {
                        actions.push(action);
                    }
                }
                actions
            }
        };
        let name = match &r.name {
            None => None,
            Some(v) => {
                let name = self.string("routes.name", v)?;
                let ok = !name.is_empty()
                    && name.len() <= 64
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
                if !ok {
                    return Err(self.err(
                        v.referenced,
                        format!(
                            "routes.name: {name:?} must be 1-64 letters, digits, '-', '_' or '.'"
                        ),
                    ));
                }
                Some(name)
            }
        };
        Ok(RouteConfig {
            host,
            prefix,
            upstream,
            remote,
            relay,
            relay_actions,
            cache: r.cache.unwrap_or(false),
            name,
        })
    }
}

/// `512`, `500MB`, `32GiB`, `1.5TiB`: decimal (k, MB, GB, TB) and binary (KiB, MiB, GiB,
/// TiB) units; a bare number is bytes.
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = number * factor;
    (bytes.is_finite() && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// `us-east-1`, `cn-north-1`, `us-gov-west-1`: lowercase words joined by hyphens, the last
/// a number. Loose on purpose: AWS adds regions, and the SDK is the judge of which exist.
pub(crate) fn is_aws_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        && parts
            .last()
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

/// Accepts `https://host[:port]`, `http://…` and bare hosts (taken as https); resolves Docker
/// Hub's aliases to its API host.
pub fn parse_upstream_url(text: &str) -> Result<Url, String> {
    let with_scheme = if text.contains("://") {
        text.to_string()
    } else {
        format!("https://{text}")
    };
    let mut url = Url::parse(&with_scheme).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{text:?}: only http:// and https:// upstreams are supported"
        ));
    }
    if url.host_str().is_none() {
        return Err(format!("{text:?} has no host"));
    }
    if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
        return Err(format!(
            "{text:?}: give only scheme, host and port (no path, query or user; use credentials for auth)"
        ));
    }
    if matches!(url.host_str(), Some("docker.io" | "index.docker.io")) {
        url.set_host(Some(DOCKER_HUB_API_HOST))
            .map_err(|e| e.to_string())?;
    }
    Ok(url)
}

/// `500ms`, `30s`, `5m`, `1h30m`, `2d`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            "d" => Duration::from_secs(n.checked_mul(86400)?),
            _ => return None,
        };
        total = total.checked_add(unit)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

#[cfg(test)]
mod tests;

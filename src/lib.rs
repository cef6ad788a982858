//! ocigate: one binary in front of container registries.
//!
//! The life of a request: [`server`] accepts it (TLS, HTTP/1.1 + HTTP/2) and hands it to
//! [`pipeline::Gateway::handle`], which runs these phases over one
//! [`pipeline::RequestContext`]. This list is the order; each phase is a method of the
//! gateway (`observe` one of the context), and only `parse`, `route` and `admit` write the
//! context.
//!
//! ```text
//! (before)  forward::ForwardProxy                 through the forward proxy: the host an
//!                                                 intercepted connection is for, token
//!                                                 realms, the proxy listener's own pages
//! token     token::TokenServer, relay::endpoint   the token path: logins, relay tokens
//! parse     oci::ApiPath, rewrite::UploadQuery    /v2/<name>/<endpoint>, an upload's query,
//!                                                 the scopes it needs (local names)
//!           local (non-API)                       /healthz, /metrics, browser redirects
//! route     rewrite::RouteTable                   the one place an upstream is chosen:
//!                                                 route, remote name, mount `from`, URL
//! admit     auth::ClientAuth, relay::Relay        auth::Admission, decided once: open,
//!                                                 anonymous, client token, relay token
//! local     local, catalog                        /v2/ and _catalog, once admitted
//! cache     cache::Cache                          cache routes: reads from disk, fills
//! send      upstream::Upstream::send              the one road upstream: credentials or
//!                                                 relayed token, token dance, redirects
//! learn     cache::Cache::deleted                 a DELETE's success forgets evidence
//! respond   pipeline, rewrite::response           an upstream 401 → our challenge, by the
//!                                                 admission; Location, Link, tags/list
//!                                                 become local
//! observe   pipeline::context                     access log + metrics when the body ends
//! ```
//! Errors become answers in one place: [`error::GatewayError::into_response`].
//!
//! Modules:
//! - [`config`]: the YAML schema, `${VAR}` expansion, `file:line:column` errors.
//! - [`oci`]: protocol grammar without I/O (paths, names, errors, challenges, scopes and
//!   grants, manifests, Accept, Range).
//! - [`auth`]: client admission (distribution token auth: JWT, x5c, JWKS).
//! - [`token`]: the built-in token server (htpasswd, OIDC federation, ACL).
//! - [`relay`]: the PASETO relay of upstream tokens (relay routes, its token endpoint).
//! - [`rewrite`]: routes and name mapping both ways, in requests and in answers.
//! - [`upstream`]: everything that talks to registries.
//! - [`cache`]: the pull-through cache (content-addressed store, single-flight fills, warm).
//! - [`pipeline`]: the driver and its request context; [`catalog`], [`local`]: local answers.
//! - [`headers`]: header hygiene at both edges, and the public URL.
//! - [`import`]: converting other tools' configs (`ocigate import backplane|ociregistry|
//!   docker-registry-proxy`).
//! - [`forward`]: the forward proxy (`HTTPS_PROXY`): CONNECT interception, tunnels, the
//!   interception CA, proxy users; intercepted requests then run the phases above.
//! - [`server`]: sockets, TLS and graceful shutdown; [`stall`]: closing stalled responses.
//! - [`body`], [`flight`], [`metrics`], [`error`]: shared plumbing.

pub mod auth;
pub mod body;
pub mod cache;
pub mod catalog;
pub mod config;
pub mod error;
pub mod flight;
pub mod forward;
pub mod headers;
pub mod import;
pub mod local;
pub mod metrics;
pub mod oci;
pub mod pipeline;
pub mod relay;
pub mod rewrite;
pub mod server;
pub mod stall;
pub mod token;
pub mod upstream;

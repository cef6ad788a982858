//! ocigate: one binary in front of container registries.
//!
//! The life of a request:
//!
//! ```text
//! server (accept, TLS, HTTP/1.1 + HTTP/2)
//!   → pipeline::Gateway::handle
//!       token      token::TokenServer       `token_server.path`: logins, tokens
//!       parse      oci::ApiPath             /v2/<name>/<endpoint>, validated
//!       auth       auth::ClientAuth         the client's bearer token covers the request
//!       local      local, catalog           /v2/, /healthz, /metrics, browser redirects, _catalog
//!       rewrite    rewrite::RouteTable      local name → route → remote name (+ mount `from`)
//!       cache      cache::Cache             cache routes: blobs and manifests from disk, fills
//!       upstream   upstream::Upstream       credentials, token dance, pooled client, redirects
//!       response   pipeline (rewrite_*)     Location, Link, tags/list name; upstream 401 → ours
//!       observe    body::Observed           access log + metrics when the body ends
//!   ← error::GatewayError::into_response    the one place errors become answers
//! ```
//!
//! Modules:
//! - [`config`]: the YAML schema, `${VAR}` expansion, `file:line:column` errors.
//! - [`oci`]: protocol grammar without I/O (paths, names, errors, challenges, scopes).
//! - [`auth`]: client authentication (distribution token auth: JWT, x5c, JWKS).
//! - [`token`]: the built-in token server (htpasswd, OIDC federation, ACL).
//! - [`rewrite`]: routes and name mapping both ways.
//! - [`upstream`]: everything that talks to registries.
//! - [`cache`]: the pull-through cache (content-addressed store, single-flight fills).
//! - [`pipeline`], [`catalog`], [`local`]: the request driver and its local answers.
//! - [`relay`]: the PASETO relay of upstream tokens (relay routes, its token endpoint).
//! - [`import`]: converting other tools' configs (`ocigate import backplane`).
//! - [`server`]: sockets, TLS and graceful shutdown; [`stall`]: closing stalled responses.
//! - [`body`], [`flight`], [`metrics`], [`error`]: shared plumbing.

pub mod auth;
pub mod body;
pub mod cache;
pub mod catalog;
pub mod config;
pub mod error;
pub mod flight;
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

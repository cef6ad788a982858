//! Distribution-API knowledge with no I/O: request paths and repository names, OCI error
//! bodies, `WWW-Authenticate` challenges, token scopes and manifest references.
//!
//! Owns the grammar of the protocol. Must not know about routes, upstreams or config.

pub(crate) mod challenge;
pub(crate) mod error;
pub(crate) mod host;
pub(crate) mod manifest;
pub mod path;
pub(crate) mod range;

pub use challenge::{Challenge, Scope};
pub(crate) use error::{ErrorCode, OciError};
pub use path::Digest;
pub(crate) use path::{ApiPath, Endpoint, Reference};

/// `Docker-Distribution-Api-Version` value every `/v2/` answer carries.
pub(crate) const API_VERSION: &str = "registry/2.0";

/// The repository actions a request method needs: pull to read, pull and push to write,
/// delete to delete.
pub(crate) fn required_actions(method: &http::Method) -> &'static [&'static str] {
    match *method {
        http::Method::GET | http::Method::HEAD => &["pull"],
        http::Method::DELETE => &["delete"],
        _ => &["pull", "push"],
    }
}

//! The relay's token endpoint: maps each requested scope local → remote, gets the upstream's
//! token for them with the route's upstream credentials (or anonymously), and answers with a
//! sealed relay token. A request with no scope (`docker login`) gets a valid, empty token.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response, StatusCode};
use serde_json::json;

use super::{MAX_LIFETIME_SECS, Relay, RelayClaims, unix_now};

/// What every relay-token answer says of its lifetime, whatever it seals: the tokens live
/// longer (up to [`MAX_LIFETIME_SECS`], as long as the upstream token inside), and an
/// answer for a name on no relay route must not differ from one for a route's.
pub(crate) const ANNOUNCED_LIFETIME_SECS: u64 = 60;
use crate::body::Body;
use crate::error::{GatewayError, registry_json};
use crate::oci::{ErrorCode, OciError, Scope};
use crate::rewrite::{LocalName, RouteTable};
use crate::upstream::Upstream;

/// Where relay routes send clients for tokens (on every listener).
pub(crate) const PATH: &str = "/token";

fn bad_request(why: &str) -> GatewayError {
    GatewayError::Oci(
        OciError::new(ErrorCode::Unsupported, why).with_status(StatusCode::BAD_REQUEST),
    )
}

/// The actions of a granted scope that the route's `relay_actions` allow: whoever holds a
/// relay token acts with the route's upstream credentials, so a route relays only what its
/// config says (`pull` by default), whatever was asked or the ACL allows. `*` is every
/// allowed action.
fn relay_grant<'a>(asked: &'a [String], allowed: &'a [String]) -> Vec<&'a str> {
    let wildcard = asked.iter().any(|a| a == "*");
    allowed
        .iter()
        .filter(|a| wildcard || asked.contains(a))
        .map(String::as_str)
        .collect()
}

/// The scopes an anonymous relay-token request asks for.
pub(crate) async fn requested_scopes(req: Request<Body>) -> Result<Vec<Scope>, GatewayError> {
    let (_, params) = crate::token::read_request(req).await?;
    params.valid_scopes()
}

/// A relay token for the route that `requested` names, sealing `granted`: the scopes as
/// asked (anonymous relay), or as the token server's ACL cut them down.
pub(crate) async fn issue(
    relay: &Relay,
    routes: &RouteTable,
    upstreams: &HashMap<String, Arc<Upstream>>,
    requested: &[Scope],
    granted: &[Scope],
) -> Result<Response<Body>, GatewayError> {
    let now = unix_now();
    // Scopes of names on no relay route are simply not granted, as for names that exist
    // nowhere: the endpoint is no oracle for what is routed.
    let mut route: Option<(String, String)> = None;
    for scope in requested {
        let local = LocalName::new(scope.name.as_str());
        let Some(m) = routes.resolve(&local).filter(|m| m.route.config.relay) else {
            continue;
        };
        let this = (
            m.route.config.prefix.clone(),
            m.route.config.upstream.clone(),
        );
        match &route {
            Some(r) if *r != this => {
                return Err(bad_request(
                    "the scopes name repositories on different routes",
                ));
            }
            _ => route = Some(this),
        }
    }
    let mut local = Vec::new();
    let mut remote = Vec::new();
    for scope in granted {
        let Some(m) = routes.resolve(&LocalName::new(scope.name.as_str())) else {
            continue;
        };
        let same_route = route
            .as_ref()
            .is_some_and(|(prefix, _)| *prefix == m.route.config.prefix);
        let actions = relay_grant(&scope.actions, &m.route.config.relay_actions);
        if !same_route || actions.is_empty() {
            continue;
        }
        remote.push(Scope::repository(m.remote.as_str(), &actions));
        local.push(Scope::repository(&scope.name, &actions).to_string());
    }
    let mut claims = RelayClaims {
        ut: String::new(),
        up: String::new(),
        rt: String::new(),
        sc: local,
        iat: now,
        exp: now + MAX_LIFETIME_SECS,
    };
    if let Some((prefix, upstream_name)) = route {
        let upstream = upstreams
            .get(&upstream_name)
            .ok_or_else(|| bad_request("route without upstream"))?;
        let upstream_token = if remote.is_empty() {
            None
        } else {
            // At least the announced lifetime left, so no client holds an expired token.
            let min_left = std::time::Duration::from_secs(ANNOUNCED_LIFETIME_SECS);
            upstream.bearer_for(&remote, min_left).await?
        };
        if let Some(token) = upstream_token {
            let left = token
                .valid_until
                .saturating_duration_since(Instant::now())
                .as_secs();
            claims.exp = now + left.min(MAX_LIFETIME_SECS);
            claims.ut = token
                .header
                .to_str()
                .ok()
                .and_then(|h| h.strip_prefix("Bearer "))
                .unwrap_or_default()
                .to_string();
        }
        claims.rt = prefix;
        claims.up = upstream_name;
    }
    let sealed = relay
        .seal(&claims)
        .map_err(|e| GatewayError::Oci(OciError::new(ErrorCode::Unknown, e.to_string())))?;
    let answer = json!({
        "token": sealed,
        "access_token": sealed,
        "expires_in": ANNOUNCED_LIFETIME_SECS,
        "issued_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    });
    tracing::info!(route = %claims.rt, scopes = %claims.sc.join(" "), "relay token issued");
    Ok(registry_json(StatusCode::OK, answer.to_string()))
}

#[cfg(test)]
mod tests {
    use super::relay_grant;

    #[test]
    fn relay_routes_grant_only_their_actions() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let pull = v(&["pull"]);
        assert_eq!(relay_grant(&v(&["pull", "push"]), &pull), ["pull"]);
        assert_eq!(relay_grant(&v(&["*"]), &pull), ["pull"]);
        assert!(relay_grant(&v(&["delete"]), &pull).is_empty());
        let all = v(&["pull", "push", "delete"]);
        assert_eq!(relay_grant(&v(&["*"]), &all), ["pull", "push", "delete"]);
        assert_eq!(relay_grant(&v(&["push", "pull"]), &all), ["pull", "push"]);
    }
}

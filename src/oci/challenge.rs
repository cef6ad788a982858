//! `WWW-Authenticate` challenges and token scopes (`type[(class)]:name:actions`).

use std::fmt;

/// One parsed challenge: the scheme (`Bearer`, `Basic`) and its auth-params.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub(crate) scheme: String,
    pub(crate) params: Vec<(String, String)>,
}

impl Challenge {
    pub(crate) fn bearer(realm: &str, service: &str, scopes: &[Scope]) -> Challenge {
        let mut params = vec![
            ("realm".to_string(), realm.to_string()),
            ("service".to_string(), service.to_string()),
        ];
        if !scopes.is_empty() {
            params.push(("scope".into(), join_scopes(scopes)));
        }
        Challenge {
            scheme: "Bearer".into(),
            params,
        }
    }

    /// The same challenge saying why the token shown was refused.
    pub(crate) fn with_error(mut self, error: BearerError) -> Challenge {
        self.set_param("error", error.as_str().to_string());
        self
    }

    pub(crate) fn is_bearer(&self) -> bool {
        self.scheme.eq_ignore_ascii_case("bearer")
    }

    pub(crate) fn is_basic(&self) -> bool {
        self.scheme.eq_ignore_ascii_case("basic")
    }

    pub(crate) fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn set_param(&mut self, key: &str, value: String) {
        match self
            .params
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
        {
            Some(slot) => slot.1 = value,
            None => self.params.push((key.to_string(), value)),
        }
    }

    /// Parses the first challenge of a header value. Tolerates odd spacing and unquoted values.
    pub(crate) fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, rest) = match header.find(char::is_whitespace) {
            Some(i) => (&header[..i], header[i..].trim_start()),
            None => (header, ""),
        };
        if scheme.is_empty() || !scheme.bytes().all(is_token_byte) {
            return None;
        }
        Some(Challenge {
            scheme: scheme.to_string(),
            params: parse_params(rest),
        })
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn parse_params(mut s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        let Some(eq) = s.find('=') else { break };
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].trim_start();
        let value;
        if let Some(quoted) = s.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, esc)) = chars.next() {
                            v.push(esc);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            value = v;
            s = &quoted[end.min(quoted.len())..];
        } else {
            let end = s.find(',').unwrap_or(s.len());
            value = s[..end].trim().to_string();
            s = &s[end..];
        }
        if key.is_empty() || !key.bytes().all(is_token_byte) {
            break;
        }
        out.push((key, value));
    }
    out
}

impl fmt::Display for Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.scheme)?;
        for (i, (k, v)) in self.params.iter().enumerate() {
            let sep = if i == 0 { " " } else { "," };
            let escaped = v.replace('\\', "\\\\").replace('"', "\\\"");
            write!(f, "{sep}{k}=\"{escaped}\"")?;
        }
        Ok(())
    }
}

/// Why a Bearer challenge refuses the token that was shown (RFC 6750 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BearerError {
    InvalidToken,
    InsufficientScope,
}

impl BearerError {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BearerError::InvalidToken => "invalid_token",
            BearerError::InsufficientScope => "insufficient_scope",
        }
    }
}

/// A token scope, or a grant: `repository:team/app:pull,push`, `registry:catalog:*`. As
/// JSON it is an entry of a token's `access` claim: `{"type", "name", "actions"}`.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Scope {
    /// The resource type with its optional class, e.g. `repository` or `repository(plugin)`.
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) actions: Vec<String>,
}

/// Whether `granted` allows `action` on `kind:name` (a granted `*` allows every action).
pub(crate) fn allows(granted: &[Scope], kind: &str, name: &str, action: &str) -> bool {
    granted.iter().any(|g| {
        g.kind == kind && g.name == name && g.actions.iter().any(|a| a == action || a == "*")
    })
}

/// Whether `granted` allows every action of every scope in `required`.
pub(crate) fn covers(granted: &[Scope], required: &[Scope]) -> bool {
    required.iter().all(|r| {
        r.actions
            .iter()
            .all(|a| allows(granted, &r.kind, &r.name, a))
    })
}

impl Scope {
    pub(crate) fn repository(name: &str, actions: &[&str]) -> Scope {
        Scope {
            kind: "repository".into(),
            name: name.into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// `registry:catalog:*`: what listing `_catalog` needs.
    pub(crate) fn catalog() -> Scope {
        Scope {
            kind: "registry".into(),
            name: "catalog".into(),
            actions: vec!["*".into()],
        }
    }

    /// Splits the type at the first `:` and the actions at the last, because names may carry
    /// `host:port`.
    pub fn parse(s: &str) -> Option<Scope> {
        let (kind, rest) = s.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        if kind.is_empty() || name.is_empty() {
            return None;
        }
        Some(Scope {
            kind: kind.into(),
            name: name.into(),
            actions: actions
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }

    pub(crate) fn is_repository(&self) -> bool {
        self.kind == "repository" || self.kind.starts_with("repository(")
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.kind, self.name, self.actions.join(","))
    }
}

pub(crate) fn join_scopes(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(Scope::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        )
        .unwrap();
        assert!(c.is_bearer());
        assert_eq!(c.param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c.param("service"), Some("registry.docker.io"));
        assert_eq!(
            c.param("scope").and_then(Scope::parse),
            Some(Scope::repository("library/alpine", &["pull"]))
        );
    }

    #[test]
    fn parses_unquoted_spaced_and_escaped_values() {
        let c = Challenge::parse(r#"basic   realm=Registry Realm , charset="UTF\"8""#).unwrap();
        assert!(c.is_basic());
        assert_eq!(c.param("realm"), Some("Registry Realm"));
        assert_eq!(c.param("charset"), Some("UTF\"8"));
        assert!(Challenge::parse("").is_none());
        assert!(Challenge::parse("Bea rer").unwrap().params.is_empty());
    }

    #[test]
    fn round_trips_with_several_scopes_and_errors() {
        let mut c = Challenge::bearer(
            "http://127.0.0.1:1/token",
            "svc",
            &[
                Scope::repository("a/b", &["pull", "push"]),
                Scope::repository("c", &["pull"]),
            ],
        );
        c.set_param("error", "insufficient_scope".into());
        let text = c.to_string();
        assert_eq!(
            text,
            r#"Bearer realm="http://127.0.0.1:1/token",service="svc",scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope""#
        );
        assert_eq!(Challenge::parse(&text).unwrap(), c);
    }

    #[test]
    fn scope_names_may_hold_ports_and_classes() {
        let s = Scope::parse("repository(plugin):localhost:5000/x/y:pull,push").unwrap();
        assert_eq!(s.kind, "repository(plugin)");
        assert_eq!(s.name, "localhost:5000/x/y");
        assert_eq!(s.actions, vec!["pull", "push"]);
        assert!(s.is_repository());
        assert_eq!(
            s.to_string(),
            "repository(plugin):localhost:5000/x/y:pull,push"
        );
        let c = Scope::parse("registry:catalog:*").unwrap();
        assert_eq!((c.kind.as_str(), c.name.as_str()), ("registry", "catalog"));
        assert!(!c.is_repository());
        assert!(Scope::parse("repository:x").is_none());
        assert!(Scope::parse(":x:pull").is_none());
    }
}

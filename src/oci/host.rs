//! Registry hosts, the first part of a reference (`quay.io/team/app`): the host a client
//! believes it talks to, in one canonical spelling. Parsing only: what a host routes to is
//! the route table's business.

use std::fmt;

/// Docker Hub's canonical host.
pub(crate) const DOCKER_HUB: &str = "docker.io";
/// Docker Hub's API and index hosts, which clients and containerd treat as `docker.io`.
const DOCKER_HUB_ALIASES: [&str; 2] = ["index.docker.io", "registry-1.docker.io"];

/// A registry host in canonical form: lower case, `:443` dropped, Docker Hub's aliases as
/// `docker.io`. Only DNS names (or `localhost`), with an optional port: IP literals and
/// single-label names are not registry hosts here.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RegistryHost(String);

impl RegistryHost {
    pub(crate) fn parse(text: &str) -> Option<RegistryHost> {
        let text = text.to_ascii_lowercase();
        let (name, port) = match text.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (text.as_str(), None),
        };
        let port_ok = port.is_none_or(|p| {
            !p.is_empty()
                && p.len() <= 5
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u16>().is_ok_and(|n| n > 0)
        });
        if !port_ok || !is_dns_name(name) {
            return None;
        }
        if name != "localhost" && !name.contains('.') {
            return None;
        }
        let name = if DOCKER_HUB_ALIASES.contains(&name) {
            DOCKER_HUB
        } else {
            name
        };
        Some(RegistryHost(match port {
            Some("443") | None => name.to_string(),
            Some(p) => format!("{name}:{p}"),
        }))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether the first segment of a repository path names a host rather than a namespace (the
/// rule docker uses for references): it has a `.` or a `:`, or is `localhost`.
pub(crate) fn looks_like_host(segment: &str) -> bool {
    segment.contains('.') || segment.contains(':') || segment == "localhost"
}

/// Letters, digits and `-` in labels of 1-63 characters, not starting or ending with `-`;
/// the last label is not numeric (that would be an IP address).
fn is_dns_name(name: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    // A numeric last label (`10.0.0.1`, or the hex `10.0x0.0x0.0x1` that resolvers take for
    // an address) is an IP address in disguise, not a name.
    let numeric = |l: &str| match l.strip_prefix("0x") {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => l.bytes().all(|b| b.is_ascii_digit()),
    };
    name.len() <= 253
        && name.split('.').all(label_ok)
        && name.rsplit('.').next().is_some_and(|last| !numeric(last))
}

/// Whether a repository name authorisation may see: a name, or a registry host and a name
/// inside it (`quay.io/team/app`, `registry.test:5000/app`).
pub(crate) fn valid_qualified_name(name: &str) -> bool {
    let inside_host = name
        .split_once('/')
        .filter(|(first, _)| first.contains(':'))
        .filter(|(first, _)| RegistryHost::parse(first).is_some());
    match inside_host {
        Some((_, rest)) => crate::oci::path::validate_name(rest).is_ok(),
        None => crate::oci::path::validate_name(name).is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(text: &str) -> Option<String> {
        RegistryHost::parse(text).map(|h| h.0)
    }

    #[test]
    fn hosts_are_canonical() {
        assert_eq!(canonical("Quay.IO").as_deref(), Some("quay.io"));
        assert_eq!(canonical("quay.io:443").as_deref(), Some("quay.io"));
        assert_eq!(
            canonical("myreg.test:5000").as_deref(),
            Some("myreg.test:5000")
        );
        assert_eq!(
            canonical("localhost:5000").as_deref(),
            Some("localhost:5000")
        );
        for hub in ["docker.io", "index.docker.io", "registry-1.docker.io:443"] {
            assert_eq!(canonical(hub).as_deref(), Some("docker.io"), "{hub}");
        }
    }

    #[test]
    fn qualified_names() {
        assert!(valid_qualified_name("registry.test:5000/team/app"));
        assert!(valid_qualified_name("quay.io/team/app"));
        assert!(valid_qualified_name("team/app"));
        assert!(!valid_qualified_name("registry.test:0/app"));
        assert!(!valid_qualified_name("x:1/app"));
        assert!(!valid_qualified_name("registry.test:5000/Team"));
    }

    #[test]
    fn odd_hosts_are_not_hosts() {
        for bad in [
            "",
            "registry",
            "127.0.0.1",
            "10.0.0.5:5000",
            "10.0x0.0x0.0x1",
            "192.168.0.0x1:443",
            "0xa.0x0.0x0.0x1",
            "[::1]:443",
            "a..b",
            "-a.io",
            "a-.io",
            "a.io:",
            "a.io:0",
            "a.io:65536",
            "a.io:+1",
            "a_b.io",
            "a.io/x",
            "a.io%00",
            "a.io:443:443",
            "ü.io",
        ] {
            assert_eq!(canonical(bad), None, "{bad:?}");
        }
        assert_eq!(canonical(&format!("{}.io", "a".repeat(64))), None);
    }

    #[test]
    fn host_segments() {
        assert!(looks_like_host("quay.test") && looks_like_host("localhost"));
        assert!(looks_like_host("r:5000") && !looks_like_host("library"));
    }
}

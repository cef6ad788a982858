//! Names inside a registry host: how a request that named its host (`?ns=`, in-path, an
//! intercepted connection) maps the names it uses to names inside the host's routes.

use super::LocalName;
use crate::oci::host::RegistryHost;

/// The query parameter containerd names a mirrored request's registry host with.
pub(crate) const NS: &str = "ns";

/// The registry host a request named, and how it named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NamedHost {
    pub(crate) host: RegistryHost,
    pub(crate) naming: Naming,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Naming {
    /// `/v2/<host>/<name>/…`: the host is part of every name the client sees.
    InPath,
    /// `?ns=<host>` (containerd mirrors): URLs handed back keep it, so that follow-ups reach
    /// the same host.
    Query,
    /// The connection is for the host (intercepted by the forward proxy).
    Connection,
}

impl NamedHost {
    /// The name the client uses for `local` (a name inside the host).
    pub(crate) fn client_name(&self, local: &LocalName) -> LocalName {
        match self.naming {
            Naming::InPath => LocalName::new(format!("{}/{local}", self.host)),
            Naming::Query | Naming::Connection => local.clone(),
        }
    }

    /// The `ns` that URLs handed back to the client must carry.
    pub(crate) fn ns(&self) -> Option<&RegistryHost> {
        (self.naming == Naming::Query).then_some(&self.host)
    }

    /// A name the client sent (a mount's `from`) as a name inside the host; `None` when it
    /// names another host.
    pub(crate) fn localize(&self, client: &str) -> Option<LocalName> {
        match self.naming {
            Naming::InPath => client
                .strip_prefix(self.host.as_str())
                .and_then(|rest| rest.strip_prefix('/'))
                .map(LocalName::new),
            Naming::Query | Naming::Connection => Some(LocalName::new(client)),
        }
    }

    /// The fully qualified name that authorisation sees (`quay.io/team/app`), so that an ACL
    /// tells the same repository name on two hosts apart.
    pub(crate) fn qualified(&self, local: &str) -> String {
        format!("{}/{local}", self.host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_inside_a_host() {
        let host = RegistryHost::parse("quay.test").unwrap();
        let in_path = NamedHost {
            host: host.clone(),
            naming: Naming::InPath,
        };
        let beside = NamedHost {
            host,
            naming: Naming::Query,
        };
        let local = LocalName::new("team/app");
        assert_eq!(in_path.client_name(&local), "quay.test/team/app");
        assert_eq!(beside.client_name(&local), "team/app");
        assert_eq!(in_path.localize("quay.test/team/app"), Some(local.clone()));
        assert_eq!(in_path.localize("other.test/team/app"), None);
        assert_eq!(in_path.localize("quay.testx/app"), None);
        assert_eq!(beside.localize("team/app"), Some(local));
        assert_eq!(beside.qualified("team/app"), "quay.test/team/app");
        assert_eq!(in_path.ns(), None);
        assert_eq!(beside.ns().map(RegistryHost::as_str), Some("quay.test"));
    }
}

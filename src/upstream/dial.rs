//! Which addresses an upstream's client may dial. The upstream chooses redirect targets and
//! token realms, so a hostile or compromised one could point the proxy at its own network
//! (`169.254.169.254`, `localhost:admin`, a private subnet) and have the answer streamed
//! back. A host other than the upstream's own and the ones its config names
//! (`allowed_redirects`, `allowed_realms`) is dialled only at public addresses, or at
//! addresses of the kinds the upstream itself is on (an upstream on a private network may
//! redirect within it). Checked after DNS resolution, on the addresses actually dialled.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;
use url::Url;

/// What kind of network an address is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reach {
    Public,
    Loopback,
    LinkLocal,
    /// RFC 1918, carrier-grade NAT (100.64/10), IPv6 unique-local.
    Private,
    /// Multicast, broadcast, unspecified (`0.0.0.0` dials the local host): never dialled
    /// unless named.
    Never,
}

pub(crate) fn reach(ip: IpAddr) -> Reach {
    let ip = match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_loopback() {
                Reach::Loopback
            } else if v4.is_link_local() {
                Reach::LinkLocal
            } else if v4.is_private() || (a == 100 && (64..128).contains(&b)) {
                Reach::Private
            } else if v4.is_multicast() || v4.is_broadcast() || a == 0 {
                Reach::Never
            } else {
                Reach::Public
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Reach::Loopback
            } else if v6.is_unicast_link_local() {
                Reach::LinkLocal
            } else if v6.is_unique_local() || (v6.segments()[0] & 0xffc0) == 0xfec0 {
                // Unique-local, and the deprecated site-local fec0::/10.
                Reach::Private
            } else if v6.is_multicast() || v6.is_unspecified() {
                Reach::Never
            } else {
                Reach::Public
            }
        }
    }
}

/// The IPv4 address an IPv6 one stands for, where it carries one that routers or the host
/// translate to: mapped (`::ffff:a.b.c.d`), compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`)
/// and 6to4 (`2002:AABB:CCDD::/48`).
fn embedded_v4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let s = v6.segments();
    let tail = || std::net::Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    match s {
        // `::` and `::1` are IPv6's own unspecified and loopback addresses.
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
        [0, 0, 0, 0, 0, 0, _, _] | [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail()),
        [0x2002, hi, lo, ..] => Some(std::net::Ipv4Addr::from(((hi as u32) << 16) | lo as u32)),
        _ => None,
    }
}

/// The dialling rule of one upstream's client.
#[derive(Debug)]
pub(crate) struct DialPolicy {
    upstream: String,
    named: Vec<String>,
}

impl DialPolicy {
    /// An upstream's rule: its own host, and the hosts of `allowed_redirects` and
    /// `allowed_realms`, are named by the config.
    pub(crate) fn for_upstream(config: &crate::config::UpstreamConfig) -> DialPolicy {
        let named: Vec<&Url> = config
            .allowed_redirects
            .iter()
            .chain(&config.allowed_realms)
            .collect();
        DialPolicy::new(&config.url, &named)
    }

    /// `named`: URLs the config lists (their hosts may be dialled whatever they resolve to).
    pub(crate) fn new(upstream: &Url, named: &[&Url]) -> DialPolicy {
        let host = |u: &Url| {
            u.host_str()
                .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
        };
        DialPolicy {
            upstream: host(upstream).unwrap_or_default(),
            named: named.iter().filter_map(|u| host(u)).collect(),
        }
    }

    fn is_named(&self, host: &str) -> bool {
        let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
        host == self.upstream || self.named.contains(&host)
    }

    /// The kinds of network the upstream itself is on.
    async fn upstream_reach(&self) -> Vec<Reach> {
        match resolve(&self.upstream).await {
            Ok(addrs) => addrs.iter().map(|a| reach(a.ip())).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The addresses of `host` that may be dialled; an error when none is left.
    async fn admit(&self, host: &str, addrs: Vec<SocketAddr>) -> io::Result<Vec<SocketAddr>> {
        if self.is_named(host) {
            return Ok(addrs);
        }
        let own = self.upstream_reach().await;
        let allowed = |a: &SocketAddr| match reach(a.ip()) {
            Reach::Public => true,
            Reach::Never => false,
            kind => own.contains(&kind),
        };
        let kept: Vec<SocketAddr> = addrs.into_iter().filter(allowed).collect();
        if kept.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{host} is on a network the upstream is not on (loopback, link-local, private or multicast): not dialled; list it in allowed_redirects if it is meant"
                ),
            ));
        }
        Ok(kept)
    }

    /// Checks a URL the upstream handed us (redirect target, token realm) before it is
    /// fetched. Host names are checked again on the addresses they resolve to when dialled;
    /// IP literals are never resolved, so they are checked here.
    pub(crate) async fn check(&self, url: &Url) -> Result<(), String> {
        let Some(host) = url.host_str() else {
            return Err(format!("{url} has no host"));
        };
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            self.admit(host, vec![SocketAddr::new(ip, 0)])
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

async fn resolve(host: &str) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, 0)]);
    }
    Ok(tokio::net::lookup_host((host, 0)).await?.collect())
}

/// The upstream client's DNS resolver: the system's, then [`DialPolicy`].
#[derive(Debug, Clone)]
pub(crate) struct GuardedResolver {
    policy: Arc<DialPolicy>,
}

impl GuardedResolver {
    pub(crate) fn new(policy: Arc<DialPolicy>) -> GuardedResolver {
        GuardedResolver { policy }
    }
}

type Resolving = Pin<Box<dyn Future<Output = io::Result<std::vec::IntoIter<SocketAddr>>> + Send>>;

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs = resolve(&host).await?;
            Ok(policy.admit(&host, addrs).await?.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn address_kinds() {
        assert_eq!(reach(ip("127.0.0.1")), Reach::Loopback);
        assert_eq!(reach(ip("::1")), Reach::Loopback);
        assert_eq!(reach(ip("::ffff:127.0.0.1")), Reach::Loopback);
        assert_eq!(reach(ip("169.254.169.254")), Reach::LinkLocal);
        assert_eq!(reach(ip("fe80::1")), Reach::LinkLocal);
        for private in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "fd00::1",
        ] {
            assert_eq!(reach(ip(private)), Reach::Private, "{private}");
        }
        for never in [
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "ff02::1",
        ] {
            assert_eq!(reach(ip(never)), Reach::Never, "{never}");
        }
        assert_eq!(reach(ip("::127.0.0.1")), Reach::Loopback);
        assert_eq!(reach(ip("64:ff9b::a9fe:a9fe")), Reach::LinkLocal);
        assert_eq!(reach(ip("2002:0a00:0001::1")), Reach::Private);
        assert_eq!(reach(ip("fec0::1")), Reach::Private);
        assert_eq!(reach(ip("8.8.8.8")), Reach::Public);
        assert_eq!(reach(ip("2001:4860::8888")), Reach::Public);
    }

    #[tokio::test]
    async fn targets_on_other_networks_than_the_upstream_are_refused() {
        let url = |s: &str| Url::parse(s).unwrap();
        let on_loopback = DialPolicy::new(&url("http://127.0.0.1:5000"), &[]);
        assert!(on_loopback.check(&url("http://127.0.0.2/x")).await.is_ok());
        assert!(
            on_loopback
                .check(&url("http://169.254.169.254/"))
                .await
                .is_err()
        );
        assert!(
            on_loopback
                .check(&url("http://0.0.0.0:8080/"))
                .await
                .is_err()
        );
        assert!(on_loopback.check(&url("http://[fe80::1]/")).await.is_err());
        assert!(on_loopback.check(&url("https://8.8.8.8/")).await.is_ok());
        let public = DialPolicy::new(&url("https://8.8.4.4"), &[&url("http://10.0.0.9:9000")]);
        assert!(public.check(&url("http://127.0.0.1/")).await.is_err());
        assert!(public.check(&url("http://10.0.0.8/")).await.is_err());
        assert!(
            public
                .check(&url("http://10.0.0.9:9000/bucket"))
                .await
                .is_ok(),
            "named"
        );
        let resolved = public.admit("storage.example", vec!["10.0.0.1:443".parse().unwrap()]);
        assert!(
            resolved.await.is_err(),
            "names are checked on what they resolve to"
        );
    }
}

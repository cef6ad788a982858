//! Node set-up answers on the forward-proxy listener: `/setup/systemd` (a script pointing
//! dockerd's and containerd's units at the proxy and installing its CA, as
//! docker-registry-proxy's does) and `/setup/containerd` (a `hosts.toml` per host route,
//! making containerd use the registry listener as a mirror: a tarball, or one with
//! `?host=`). Text generation only.

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{self, Body};
use crate::oci::host::{DOCKER_HUB, RegistryHost};

/// Docker Hub's API host, where containerd falls back to for `docker.io`.
const DOCKER_HUB_SERVER: &str = "https://registry-1.docker.io";

/// The `/setup/systemd` script. `proxy`: the proxy's `host:port` as the node reached it;
/// `users`: whether it must send credentials (read from the environment when it runs, never
/// written into the answer).
pub(crate) fn systemd_script(proxy: &str, ca_pem: &str, users: bool) -> Response<Body> {
    let credentials = match users {
        true => {
            ": \"${OCIGATE_PROXY_USER:?set OCIGATE_PROXY_USER and OCIGATE_PROXY_PASSWORD: this proxy needs a login}\"\n\
             : \"${OCIGATE_PROXY_PASSWORD:?set OCIGATE_PROXY_PASSWORD}\"\n\
             PROXY=\"http://${OCIGATE_PROXY_USER}:${OCIGATE_PROXY_PASSWORD}@$HOSTPORT\"\n"
        }
        false => "PROXY=\"http://$HOSTPORT\"\n",
    };
    let script = format!(
        r#"#!/bin/sh
# Points dockerd and containerd at the ocigate forward proxy and makes this node trust its
# interception CA. Run as root: curl -fsS http://{proxy}/setup/systemd | sh
# ROOT=<dir> writes the files under <dir> and restarts nothing (to look first).
set -eu
ROOT="${{ROOT:-}}"
HOSTPORT="{proxy}"
{credentials}for unit in docker containerd; do
  mkdir -p "$ROOT/etc/systemd/system/$unit.service.d"
  umask 077
  cat > "$ROOT/etc/systemd/system/$unit.service.d/ocigate-proxy.conf" <<EOF
[Service]
Environment="HTTP_PROXY=$PROXY"
Environment="HTTPS_PROXY=$PROXY"
Environment="NO_PROXY=localhost,127.0.0.1,::1"
EOF
  umask 022
done
mkdir -p "$ROOT/usr/local/share/ca-certificates"
cat > "$ROOT/usr/local/share/ca-certificates/ocigate-proxy.crt" <<'EOF'
{ca}EOF
[ -n "$ROOT" ] && exit 0
if command -v update-ca-certificates >/dev/null; then update-ca-certificates; fi
systemctl daemon-reload
for unit in containerd docker; do
  if systemctl cat "$unit.service" >/dev/null 2>&1; then systemctl restart "$unit"; fi
done
echo "docker and containerd now pull through $HOSTPORT"
"#,
        ca = ca_pem,
    );
    answer("text/x-shellscript; charset=utf-8", script.into_bytes())
}

/// The `hosts.toml` making containerd pull `host`'s images through the mirror at
/// `mirror` (falling back to the registry itself when the mirror fails).
pub(crate) fn hosts_toml(host: &RegistryHost, mirror: &str) -> String {
    let server = match host.as_str() {
        DOCKER_HUB => DOCKER_HUB_SERVER.to_string(),
        other => format!("https://{other}"),
    };
    format!(
        "# containerd: /etc/containerd/certs.d/{host}/hosts.toml (config_path = \"/etc/containerd/certs.d\")\nserver = \"{server}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

/// `/setup/containerd`: one `hosts.toml` (`?host=`), or a tarball of one per host route, to
/// unpack in containerd's `config_path`.
pub(crate) fn containerd(hosts: &[&RegistryHost], mirror: &str, query: &str) -> Response<Body> {
    if let Some(wanted) = crate::rewrite::query_param(query, "host") {
        return match hosts
            .iter()
            .find(|h| RegistryHost::parse(&wanted).as_ref() == Some(**h))
        {
            Some(h) => answer("application/toml", hosts_toml(h, mirror).into_bytes()),
            None => {
                let mut r = answer(
                    "text/plain; charset=utf-8",
                    b"no host route serves this host\n".to_vec(),
                );
                *r.status_mut() = StatusCode::NOT_FOUND;
                r
            }
        };
    }
    let mut archive = tar::Builder::new(Vec::new());
    for host in hosts {
        let text = hosts_toml(host, mirror);
        let mut header = tar::Header::new_gnu();
        header.set_size(text.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        let path = format!("{host}/hosts.toml");
        // Host names are validated DNS names: no path can come out of them but `<host>/…`.
        if archive
            .append_data(&mut header, &path, text.as_bytes())
            .is_err()
        {
            return failed();
        }
    }
    match archive.into_inner() {
        Ok(bytes) => answer("application/x-tar", bytes),
        Err(_) => failed(),
    }
}

fn failed() -> Response<Body> {
    let mut r = answer("text/plain", b"cannot build the archive\n".to_vec());
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r
}

fn answer(content_type: &'static str, bytes: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(body::full(bytes));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_toml_falls_back_to_the_registry_itself() {
        let hub = RegistryHost::parse("index.docker.io").unwrap();
        let text = hosts_toml(&hub, "http://mirror:5000");
        assert!(text.contains("server = \"https://registry-1.docker.io\""));
        assert!(text.contains("[host.\"http://mirror:5000\"]"));
        let quay = RegistryHost::parse("registry.test:5000").unwrap();
        assert!(hosts_toml(&quay, "m").contains("server = \"https://registry.test:5000\""));
    }
}

//! Mirror modes end to end: containerd (`ctr`, a private daemon) pulling through ocigate as a
//! `hosts.toml` mirror for two registries at once (routed by `?ns=`) and with
//! `override_path` and an in-path host; each fake registry host (`quay.test`,
//! `registry.test`) is a real `docker-registry` on 127.0.0.1, reached only through routes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::containerd::{Containerd, hosts_dir};
use common::{Ocigate, Registry, image};

/// Two registries behind host routes (`quay.test` cached, `registry.test` under
/// `mirror/`), Docker Hub's host routed to the second, and a prefix route for names without
/// a host; `tail` is appended to the config (it may use `{dir}`, a temp dir of the test's).
struct Mirrors {
    quay: Registry,
    other: Registry,
    gw: Ocigate,
    dir: tempfile::TempDir,
}

fn gateway_with(tail: &str) -> Mirrors {
    let quay = Registry::start("");
    let other = Registry::start("");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let config = format!(
        r#"server: {{ listen: "127.0.0.1:0" }}
upstreams:
  quay: {{ url: "{}" }}
  other: {{ url: "{}" }}
routes:
  - {{ host: quay.test, upstream: quay, cache: true }}
  - {{ host: registry.test, upstream: other, remote: "mirror/" }}
  - {{ host: docker.io, upstream: other, remote: "hub/" }}
  - {{ prefix: "", upstream: other }}
cache: {{ dir: "{d}/cache" }}
{}"#,
        quay.url(),
        other.url(),
        tail.replace("{dir}", &d)
    );
    let gw = Ocigate::start(&config);
    Mirrors {
        quay,
        other,
        gw,
        dir,
    }
}

fn mirrors() -> Mirrors {
    gateway_with("")
}

/// curl through the forward proxy at `proxy`, trusting only `ca`.
fn curl_via(proxy: &str, ca: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("curl")
        .args(["-sS", "--proxy", &format!("http://{proxy}"), "--cacert"])
        .arg(ca)
        .args(args)
        .output()
        .unwrap()
}

/// The status curl got through the forward proxy.
fn status_via(proxy: &str, ca: &std::path::Path, args: &[&str]) -> String {
    let args: Vec<&str> = ["-o", "/dev/null", "-w", "%{http_code}"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    String::from_utf8_lossy(&curl_via(proxy, ca, &args).stdout).into_owned()
}

fn mirror_hosts(gw: &Ocigate) -> String {
    format!(
        "[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        gw.url()
    )
}

#[test]
fn containerd_mirrors_route_by_ns_and_by_in_path_host() {
    let Some(containerd) = Containerd::start() else {
        return;
    };
    let m = mirrors();
    let amd = image::image(&[("hello", b"quay amd64\n")], "amd64");
    let arm = image::image(&[("hello", b"quay arm64\n")], "arm64");
    let index = image::push_index(
        &m.quay.url(),
        "team/app",
        "v1",
        &[(&amd, "amd64"), (&arm, "arm64")],
    );
    let tool = image::image(&[("tool", b"other registry\n")], "amd64");
    image::push_image(&m.other.url(), "mirror/lib/tool", "v2", &tool);

    // One `_default` mirror for every registry: containerd names each with `?ns=`.
    let default = hosts_dir(&[("_default", mirror_hosts(&m.gw))]);
    assert_eq!(
        containerd.pull(default.path(), "quay.test/team/app:v1"),
        index
    );
    assert_eq!(
        containerd.pull(default.path(), "registry.test/lib/tool:v2"),
        tool.digest
    );
    for route in [r#""route":"quay.test""#, r#""route":"registry.test""#] {
        assert!(m.gw.wait_for_log(route), "{route} in {}", m.gw.logs());
    }
    // The cached host: a second pull takes no blob from the registry.
    let blob_gets = m.quay.count_requests("GET", "/blobs/");
    assert!(
        blob_gets >= 2,
        "the first pull fetched config and layer upstream"
    );
    containerd.forget("quay.test/team/app:v1");
    assert_eq!(
        containerd.pull(default.path(), "quay.test/team/app:v1"),
        index
    );
    assert_eq!(m.quay.count_requests("GET", "/blobs/"), blob_gets);

    // A registry no route serves: ocigate answers 404 at once and containerd falls back to
    // the registry itself (which does not resolve), so the pull fails without reaching any
    // upstream with that name.
    let before = (m.quay.log().len(), m.other.log().len());
    let out = containerd
        .command(&[
            "images",
            "pull",
            "--snapshotter",
            "native",
            "--hosts-dir",
            &default.path().display().to_string(),
            "unknown.test/team/app:v1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!((m.quay.log().len(), m.other.log().len()), before);

    // `override_path` with the host in the path, as Ociregistry-style mirrors are addressed.
    let in_path = hosts_dir(&[(
        "quay.test",
        format!(
            "server = \"https://quay.test\"\n[host.\"{}/v2/quay.test\"]\n  capabilities = [\"pull\", \"resolve\"]\n  override_path = true\n",
            m.gw.url()
        ),
    )]);
    containerd.forget("quay.test/team/app:v1");
    assert_eq!(
        containerd.pull(in_path.path(), "quay.test/team/app:v1"),
        index
    );
    assert!(m.gw.wait_for_log("/v2/quay.test/team/app/manifests/"));
}

// ---- The forward proxy: HTTPS_PROXY clients, their CONNECTs intercepted ----

/// [`gateway_with`] and a forward proxy with its CA generated in a temp dir;
/// `forward_extra` is appended to the `forward_proxy` section, `top_extra` after it.
struct Proxied {
    quay: Registry,
    other: Registry,
    gw: Ocigate,
    proxy: String,
    ca: std::path::PathBuf,
    /// An empty directory for `SSL_CERT_DIR`: the machine's bundle must not be what
    /// makes the CA trusted.
    no_certs: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

fn proxied(forward_extra: &str, top_extra: &str) -> Proxied {
    let m = gateway_with(&format!(
        "forward_proxy:\n  listen: \"127.0.0.1:0\"\n  ca: {{ dir: \"{{dir}}/ca\" }}\n{forward_extra}{top_extra}"
    ));
    let proxy = m.gw.forward_proxy();
    Proxied {
        ca: m.dir.path().join("ca/ca.crt"),
        quay: m.quay,
        other: m.other,
        gw: m.gw,
        proxy,
        no_certs: tempfile::tempdir().unwrap(),
        _dir: m.dir,
    }
}

impl Proxied {
    /// What a Go client needs to go through the proxy and trust only its CA.
    fn env(&self, user: Option<(&str, &str)>) -> Vec<(&'static str, String)> {
        let creds = user.map(|(u, p)| format!("{u}:{p}@")).unwrap_or_default();
        vec![
            ("HTTPS_PROXY", format!("http://{creds}{}", self.proxy)),
            ("SSL_CERT_FILE", self.ca.display().to_string()),
            ("SSL_CERT_DIR", self.no_certs.path().display().to_string()),
            ("NO_PROXY", String::new()),
        ]
    }

    fn skopeo(&self, user: Option<(&str, &str)>, args: &[&str]) -> std::process::Output {
        std::process::Command::new("skopeo")
            .env("REGISTRY_AUTH_FILE", "/nonexistent/ocigate-tests/auth.json")
            .env_remove("https_proxy")
            .env_remove("no_proxy")
            .envs(self.env(user))
            .arg("--insecure-policy")
            .args(args)
            .output()
            .unwrap()
    }

    fn skopeo_ok(&self, user: Option<(&str, &str)>, args: &[&str]) -> String {
        let out = self.skopeo(user, args);
        assert!(
            out.status.success(),
            "skopeo {args:?}: {}\nocigate: {}",
            String::from_utf8_lossy(&out.stderr),
            self.gw.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The digest of the manifest (or index) skopeo reads for `reference`, from its bytes.
    fn raw_digest(&self, user: Option<(&str, &str)>, reference: &str) -> String {
        let raw = self.skopeo_ok(
            user,
            &["inspect", "--raw", &format!("docker://{reference}")],
        );
        image::digest(raw.as_bytes())
    }

    /// A raw request to the proxy listener: its status line and headers.
    fn ask(&self, request: &str) -> (u16, String) {
        Proxied::ask_at(&self.proxy, request)
    }

    fn ask_raw(proxy: &str, request: &str) -> u16 {
        Proxied::ask_at(proxy, request).0
    }

    fn ask_at(proxy: &str, request: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(proxy).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, head)
    }

    fn connect(&self, authority: &str, extra_headers: &str) -> (u16, String) {
        self.ask(&format!(
            "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra_headers}\r\n"
        ))
    }
}

#[test]
fn skopeo_and_podman_pull_and_push_through_the_forward_proxy() {
    let p = proxied("", "");
    let amd = image::image(&[("hello", b"proxied amd64\n")], "amd64");
    let arm = image::image(&[("hello", b"proxied arm64\n")], "arm64");
    let index = image::push_index(
        &p.quay.url(),
        "team/app",
        "v1",
        &[(&amd, "amd64"), (&arm, "arm64")],
    );
    let tool = image::image(&[("tool", b"through the proxy\n")], "amd64");
    image::push_image(&p.other.url(), "mirror/lib/tool", "v2", &tool);

    // Single- and multi-arch, from two intercepted hosts: the digests are the upstream's.
    assert_eq!(p.raw_digest(None, "quay.test/team/app:v1"), index);
    assert_eq!(p.raw_digest(None, "registry.test/lib/tool:v2"), tool.digest);
    let out = tempfile::tempdir().unwrap();
    let layout = |name: &str| format!("oci:{}:{name}", out.path().join("layout").display());
    p.skopeo_ok(
        None,
        &[
            "copy",
            "--all",
            "docker://quay.test/team/app:v1",
            &layout("app"),
        ],
    );
    let blob_gets = p.quay.count_requests("GET", "/blobs/");
    assert!(
        blob_gets >= 4,
        "both platforms' config and layer came from upstream"
    );
    // The second pull is the cache's: no blob GET reaches the registry.
    p.skopeo_ok(
        None,
        &[
            "copy",
            "--all",
            "docker://quay.test/team/app:v1",
            &layout("again"),
        ],
    );
    assert_eq!(p.quay.count_requests("GET", "/blobs/"), blob_gets);

    // podman, with its own storage, through the same proxy.
    let podman = common::Podman::new();
    let mut pull = podman.command(&["pull", "-q", "registry.test/lib/tool:v2"]);
    pull.env_remove("https_proxy").envs(p.env(None));
    common::run_ok(&mut pull);
    let inspect = common::run_ok(&mut podman.command(&[
        "image",
        "inspect",
        "--format",
        "{{.Digest}}",
        "registry.test/lib/tool:v2",
    ]));
    assert_eq!(String::from_utf8_lossy(&inspect.stdout).trim(), tool.digest);

    // Push through the proxy (the seed cannot): it lands upstream under the route's remote.
    p.skopeo_ok(
        None,
        &[
            "copy",
            &layout("app"),
            "docker://registry.test/lib/pushed:v1",
        ],
    );
    let pushed = common::http::get_with(
        &format!("{}/v2/mirror/lib/pushed/manifests/v1", p.other.url()),
        &[(
            "accept",
            "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json",
        )],
    );
    assert_eq!(pushed.status, 200, "{}", pushed.text());

    // The CA is served on both listeners, and is the one clients were told to trust.
    let ca = std::fs::read_to_string(&p.ca).unwrap();
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
    // The fingerprint logged at start is the one openssl computes of the file.
    let openssl = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&p.ca)
        .output()
        .unwrap();
    let fingerprint = String::from_utf8_lossy(&openssl.stdout);
    let fingerprint = fingerprint.trim().rsplit('=').next().unwrap().to_string();
    assert!(p.gw.logs().contains(&fingerprint), "{fingerprint}");
    assert_eq!(
        common::http::get(&format!("{}/ca.crt", p.gw.url())).text(),
        ca
    );
    assert_eq!(
        common::http::get(&format!("http://{}/ca.crt", p.proxy)).text(),
        ca
    );
}

#[test]
fn containerd_pulls_through_the_forward_proxy() {
    let Some(containerd) = Containerd::start() else {
        return;
    };
    let p = proxied("", "");
    let img = image::image(&[("hello", b"ctr via HTTPS_PROXY\n")], "amd64");
    image::push_image(&p.quay.url(), "team/ctr", "v1", &img);
    let digest = containerd.pull_with_env(&p.env(None), "quay.test/team/ctr:v1");
    assert_eq!(digest, img.digest);
    assert!(p.gw.wait_for_log(r#""route":"quay.test""#));
}

#[test]
fn the_forward_proxy_refuses_what_no_route_or_tunnel_names() {
    let p = proxied("  tunnel: [\"*.nowhere.invalid\", \"localhost\"]\n", "");
    for (authority, status) in [
        ("unknown.test:443", 403),
        ("127.0.0.1:443", 403),
        ("[::1]:443", 403),
        ("169.254.169.254:80", 403),
        ("quay.test:8443", 403),
        ("quay.test", 400),
        ("qu%61y.test:443", 400),
        ("bad_name!.test:443", 400),
        // Addresses spelled as resolvers read them, and user info, are no host names.
        ("10.0x0.0x0.0x1:443", 400),
        ("0x7f.1:443", 400),
        ("alice@quay.test:443", 400),
        ("quay.test:99999", 400),
        ("quay.test:+443", 400),
        // Named by `tunnel`, but loopback once resolved; or not resolvable at all.
        ("localhost:443", 403),
        ("x.nowhere.invalid:443", 502),
    ] {
        let (got, head) = p.connect(authority, "");
        assert_eq!(got, status, "CONNECT {authority}: {head}");
    }
    // Absolute-form requests only for routed hosts; the proxy's own listener is no registry.
    let (got, _) = p.ask("GET http://unknown.test/v2/ HTTP/1.1\r\nHost: unknown.test\r\n\r\n");
    assert_eq!(got, 403);
    let (got, _) = p.ask("GET http://quay.test/v2/ HTTP/1.1\r\nHost: quay.test\r\n\r\n");
    assert_eq!(got, 200);
    for target in [
        "http://quay.test:99999/v2/",
        "ftp://quay.test/v2/",
        "http://a:b@quay.test/v2/",
    ] {
        let (got, _) = p.ask(&format!("GET {target} HTTP/1.1\r\nHost: quay.test\r\n\r\n"));
        assert_eq!(got, 400, "{target}");
    }
    let (got, _) = p.ask("GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(got, 404);
    // Docker Hub is routed, so its token realm is intercepted: a client that still asks it
    // gets a token and goes on (nothing checks it, nothing forwards it).
    let out = curl_via(
        &p.proxy,
        &p.ca,
        &[
            "--fail",
            "https://auth.docker.io/token?service=registry.docker.io&scope=repository:library/x:pull",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        token["token"].as_str().is_some_and(|t| !t.is_empty()),
        "{token}"
    );
    // An intercepted host answers the registry API only, none of the gateway's own pages.
    assert_eq!(
        status_via(&p.proxy, &p.ca, &["https://quay.test/metrics"]),
        "404"
    );
    // A named host on the registry listener is never dialled: `ns` is a key.
    let r = common::http::get(&format!("{}/v2/x/manifests/v1?ns=unknown.test", p.gw.url()));
    assert_eq!((r.status, r.error_code().as_str()), (404, "NAME_UNKNOWN"));
}

#[test]
fn a_ca_key_others_can_read_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    // A first start generates the CA with a private key and a private directory.
    let config = format!(
        "server: {{ listen: \"127.0.0.1:0\" }}\nupstreams: {{ quay: {{ url: \"http://127.0.0.1:9\" }} }}\nroutes: [ {{ host: quay.test, upstream: quay }} ]\nforward_proxy: {{ listen: \"127.0.0.1:0\", ca: {{ dir: \"{}\" }} }}\n",
        ca.display()
    );
    let gw = Ocigate::start(&config);
    gw.forward_proxy();
    drop(gw);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    assert_eq!(mode(&ca), 0o700);
    std::fs::set_permissions(ca.join("ca.key"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let (status, log) = Ocigate::start_fails(&config, &[]);
    assert!(!status.success());
    assert!(log.contains("ca.key") && log.contains("chmod 600"), "{log}");
}

#[test]
fn proxy_users_get_what_the_acl_grants_cache_hits_included() {
    let files =
        common::tokens::TokenServerFiles::new(&[("alice", "wonderland"), ("bob", "builder")]);
    let users = format!("  users: {{ htpasswd: {} }}\n", files.path("htpasswd"));
    let acl = format!(
        "token_server:\n  issuer: gw\n  service: gw\n  signing_key: {}\n  certificate: {}\n  acl:\n    - {{ account: alice, repository: \"quay.test/team/*\", actions: [pull] }}\n    - {{ account: bob, repository: \"quay.test/public/*\", actions: [pull] }}\n",
        files.path("token.key"),
        files.path("token.crt")
    );
    let p = proxied(&users, &acl);
    let img = image::image(&[("hello", b"private\n")], "amd64");
    image::push_image(&p.quay.url(), "team/app", "v1", &img);

    // No or wrong proxy credentials: 407 with a Basic challenge, before anything else.
    let (status, head) = p.connect("quay.test:443", "");
    assert_eq!(status, 407, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("proxy-authenticate: basic"),
        "{head}"
    );
    let wrong = format!(
        "Proxy-Authorization: Basic {}\r\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "alice:nope")
    );
    assert_eq!(p.connect("quay.test:443", &wrong).0, 407);
    assert_eq!(
        p.connect("unknown.test:443", "").0,
        407,
        "strangers learn nothing"
    );

    // alice may pull team/*: the pull fills the cache.
    let alice = Some(("alice", "wonderland"));
    assert_eq!(p.raw_digest(alice, "quay.test/team/app:v1"), img.digest);
    let out = tempfile::tempdir().unwrap();
    let dest = format!("oci:{}:x", out.path().join("l").display());
    p.skopeo_ok(alice, &["copy", "docker://quay.test/team/app:v1", &dest]);
    // bob may not, though every byte of it is cached now.
    let bob = p.skopeo(
        Some(("bob", "builder")),
        &["copy", "docker://quay.test/team/app:v1", &dest],
    );
    assert!(!bob.status.success());
    let err = String::from_utf8_lossy(&bob.stderr);
    assert!(err.contains("denied") || err.contains("403"), "{err}");
    let manifest = format!("docker://quay.test/team/app@{}", img.digest);
    assert!(
        !p.skopeo(Some(("bob", "builder")), &["inspect", "--raw", &manifest])
            .status
            .success()
    );
    // Nor may alice push: the ACL gives her pull only.
    let push = p.skopeo(alice, &["copy", &dest, "docker://quay.test/team/app:v2"]);
    assert!(!push.status.success());
    assert!(
        p.gw.wait_for_log(r#""subject":"alice""#),
        "the proxy user is logged"
    );
    // The proxy listener is no token endpoint and shows no metrics (regressions of the
    // attack review); what it tells about routes is for users only.
    let proxy = format!("http://{}", p.proxy);
    assert_eq!(
        common::http::get(&format!("{proxy}/token?service=gw")).status,
        404
    );
    assert_eq!(common::http::get(&format!("{proxy}/metrics")).status, 404);
    let setup = format!("{proxy}/setup/containerd");
    let anonymous = common::http::get(&setup);
    assert_eq!(anonymous.status, 401);
    assert!(
        anonymous
            .header("www-authenticate")
            .is_some_and(|c| c.starts_with("Basic"))
    );
    let login = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "alice:wonderland"
        )
    );
    assert_eq!(
        common::http::get_with(&setup, &[("authorization", &login)]).status,
        200
    );
    assert_eq!(
        common::http::get(&format!("{proxy}/ca.crt")).status,
        200,
        "the CA is public"
    );
}

#[test]
fn allow_push_false_refuses_writes_with_a_clear_message() {
    let p = proxied("  allow_push: false\n", "");
    let img = image::image(&[("hello", b"read only\n")], "amd64");
    image::push_image(&p.quay.url(), "team/app", "v1", &img);
    let seeded = p.quay.count_requests("POST", "/blobs/uploads/");
    assert_eq!(p.raw_digest(None, "quay.test/team/app:v1"), img.digest);
    let out = tempfile::tempdir().unwrap();
    let dest = format!("oci:{}:x", out.path().join("l").display());
    p.skopeo_ok(None, &["copy", "docker://quay.test/team/app:v1", &dest]);
    let push = p.skopeo(None, &["copy", &dest, "docker://quay.test/team/app:v2"]);
    assert!(!push.status.success());
    let err = String::from_utf8_lossy(&push.stderr);
    assert!(err.contains("allow_push"), "{err}");
    assert_eq!(p.quay.count_requests("POST", "/blobs/uploads/"), seeded);
}

#[test]
fn setup_pages_point_nodes_at_the_proxy_and_the_mirror() {
    let p = proxied("", "");
    let proxy = format!("http://{}", p.proxy);
    // /setup/systemd: drop-ins for dockerd and containerd, and the CA, as the script writes
    // them (under ROOT, so that this machine is left alone).
    let script = common::http::get(&format!("{proxy}/setup/systemd"));
    assert_eq!(script.status, 200);
    let root = tempfile::tempdir().unwrap();
    let ran = std::process::Command::new("sh")
        .arg("-c")
        .arg(script.text())
        .env("ROOT", root.path())
        .output()
        .unwrap();
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    for unit in ["docker", "containerd"] {
        let dropin = std::fs::read_to_string(root.path().join(format!(
            "etc/systemd/system/{unit}.service.d/ocigate-proxy.conf"
        )))
        .unwrap();
        assert!(
            dropin.contains(&format!("Environment=\"HTTPS_PROXY={proxy}\"")),
            "{dropin}"
        );
    }
    let installed = std::fs::read_to_string(
        root.path()
            .join("usr/local/share/ca-certificates/ocigate-proxy.crt"),
    )
    .unwrap();
    assert_eq!(installed, std::fs::read_to_string(&p.ca).unwrap());

    // What goes into the script is a plain host[:port]; the pages are read, not written.
    let injected = common::http::get_with(
        &format!("{proxy}/setup/systemd"),
        &[("host", "evil.example\"; rm -rf /;#")],
    );
    assert_eq!(injected.status, 400);
    let post = common::http::request("POST", &format!("{proxy}/ca.crt"), &[], "x");
    assert_eq!(post.status, 405);
    // /setup/containerd: one hosts.toml per host route, pointing at the registry listener.
    let one = common::http::get(&format!("{proxy}/setup/containerd?host=quay.test"));
    assert_eq!(one.status, 200);
    assert!(
        one.text().contains(&format!("[host.\"{}\"]", p.gw.url())),
        "{}",
        one.text()
    );
    assert_eq!(
        common::http::get(&format!("{proxy}/setup/containerd?host=x.test")).status,
        404
    );
    let tarball = common::http::get(&format!("{proxy}/setup/containerd"));
    assert_eq!(
        tarball.header("content-type").as_deref(),
        Some("application/x-tar")
    );
    let hosts = tempfile::tempdir().unwrap();
    tar::Archive::new(&tarball.body[..])
        .unpack(hosts.path())
        .unwrap();
    for host in ["quay.test", "registry.test", "docker.io"] {
        assert!(
            hosts.path().join(host).join("hosts.toml").exists(),
            "{host}"
        );
    }
    // What it says works: containerd pulls through the mirror it names.
    let Some(containerd) = Containerd::start() else {
        return;
    };
    let img = image::image(&[("hello", b"set up by /setup/containerd\n")], "amd64");
    image::push_image(&p.quay.url(), "team/setup", "v1", &img);
    assert_eq!(
        containerd.pull(hosts.path(), "quay.test/team/setup:v1"),
        img.digest
    );
}

#[test]
fn the_setup_script_asks_for_proxy_credentials_when_users_are_configured() {
    let files = common::tokens::TokenServerFiles::new(&[("alice", "wonderland")]);
    let p = proxied(
        &format!("  users: {{ htpasswd: {} }}\n", files.path("htpasswd")),
        "",
    );
    let script = common::http::get(&format!("http://{}/setup/systemd", p.proxy)).text();
    assert!(!script.contains("wonderland"));
    let root = tempfile::tempdir().unwrap();
    let run = |env: &[(&str, &str)]| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env("ROOT", root.path())
            .env_remove("OCIGATE_PROXY_USER")
            .env_remove("OCIGATE_PROXY_PASSWORD")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let refused = run(&[]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("OCIGATE_PROXY_USER"));
    assert!(
        run(&[
            ("OCIGATE_PROXY_USER", "alice"),
            ("OCIGATE_PROXY_PASSWORD", "wonderland")
        ])
        .status
        .success()
    );
    let dropin = root
        .path()
        .join("etc/systemd/system/docker.service.d/ocigate-proxy.conf");
    let text = std::fs::read_to_string(&dropin).unwrap();
    assert!(
        text.contains(&format!("HTTPS_PROXY=http://alice:wonderland@{}", p.proxy)),
        "{text}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dropin).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a drop-in holding a password is private");
}

#[test]
fn serve_forward_proxy_runs_docker_registry_proxys_environment() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let ca_dir = dir.path().join("ca");
    let gw = Ocigate::start_args(
        &["--forward-proxy", "127.0.0.1:0"],
        &[
            ("REGISTRIES", "quay.test registry.test"),
            ("OCIGATE_LISTEN", "127.0.0.1:0"),
            ("OCIGATE_CACHE_DIR", &cache.display().to_string()),
            ("OCIGATE_CA_DIR", &ca_dir.display().to_string()),
        ],
    );
    let proxy = gw.forward_proxy();
    // The seed's CA layout, generated; its cache directory, opened.
    let ca = std::fs::read_to_string(ca_dir.join("ca.crt")).unwrap();
    assert!(ca_dir.join("ca.key").exists() && cache.join("objects").exists());
    assert_eq!(
        common::http::get(&format!("http://{proxy}/ca.crt")).text(),
        ca
    );
    let curl = |args: &[&str]| status_via(&proxy, &ca_dir.join("ca.crt"), args);
    // Intercepted hosts: REGISTRIES and Docker Hub (never asked for credentials)...
    for host in ["quay.test", "registry.test", "registry-1.docker.io"] {
        assert_eq!(curl(&[&format!("https://{host}/v2/")]), "200", "{host}");
    }
    // ... and ALLOW_PUSH's default refuses writes there.
    assert_eq!(
        curl(&["-X", "POST", "https://quay.test/v2/team/app/blobs/uploads/"]),
        "405"
    );
    // Everything else is tunnelled (the seed's behaviour): a name that does not resolve
    // is a 502 from the proxy, not a refusal.
    let p = Proxied::ask_raw(
        &proxy,
        "CONNECT nowhere.invalid:443 HTTP/1.1\r\nHost: nowhere.invalid\r\n\r\n",
    );
    assert_eq!(p, 502);
}

#[test]
fn a_docker_engine_pulls_through_the_forward_proxy() {
    let p = proxied("", "");
    let Some(engine) = common::dockerd::Dockerd::start(&p.env(None)) else {
        return;
    };
    let amd = image::image(&[("hello", b"pulled by dockerd\n")], "amd64");
    let arm = image::image(&[("hello", b"not this one\n")], "arm64");
    let index = image::push_index(
        &p.quay.url(),
        "team/app",
        "v1",
        &[(&amd, "amd64"), (&arm, "arm64")],
    );
    let pulled = engine
        .docker(&["pull", "quay.test/team/app:v1"])
        .output()
        .unwrap();
    assert!(
        pulled.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&pulled.stderr),
        engine.log(),
        p.gw.logs()
    );
    let digests = engine
        .docker(&[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            "quay.test/team/app:v1",
        ])
        .output()
        .unwrap();
    let digests = String::from_utf8_lossy(&digests.stdout);
    assert!(
        digests.contains(&format!("quay.test/team/app@{index}")),
        "{digests}"
    );
    // dockerd asked the intercepted host for the amd64 layer, through the cache.
    assert!(p.gw.wait_for_log(&format!("/v2/team/app/blobs/{}", amd.layer_digest)));
}

#[test]
fn a_cri_pull_goes_through_the_containerd_mirror() {
    let python_grpc = std::process::Command::new("python3")
        .args(["-c", "import grpc"])
        .status()
        .is_ok_and(|s| s.success());
    if !python_grpc {
        eprintln!("skipped: the CRI client needs python3 with grpcio (pip install grpcio)");
        return;
    }
    let m = mirrors();
    let hosts = hosts_dir(&[("_default", mirror_hosts(&m.gw))]);
    let Some(containerd) = Containerd::start_with(Some(hosts.path())) else {
        return;
    };
    let img = image::image(&[("hello", b"pulled for kubelet\n")], "amd64");
    image::push_image(&m.quay.url(), "team/cri", "v1", &img);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cri_pull.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(containerd.socket())
        .arg("quay.test/team/cri:v1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        containerd.log()
    );
    // The CRI answers with the image's id: its config's digest.
    let image_ref = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(image_ref, image::digest(&img.config));
    assert!(m.gw.wait_for_log("/v2/team/cri/manifests/v1"));
    assert!(m.gw.wait_for_log(r#""route":"quay.test""#));
}

/// A tunnel needs a target that is not loopback: the test makes a network namespace of its
/// own (root only), with `cdn.tunnel.test` at 10.201.0.1 on its loopback device (a private
/// address) in a private `/etc/hosts`, a web server there, and ocigate and curl inside it.
#[test]
fn tunnels_reach_what_tunnel_names_untouched() {
    if !common::have("unshare") || !common::have("ip") || !common::have("curl") {
        eprintln!("skipped: needs unshare, ip and curl");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("www")).unwrap();
    std::fs::write(d.join("www/blob.txt"), "bytes from behind a tunnel\n").unwrap();
    std::fs::write(
        d.join("hosts"),
        "127.0.0.1 localhost\n10.201.0.1 cdn.tunnel.test other.test\n",
    )
    .unwrap();
    std::fs::write(
        d.join("gw.yaml"),
        format!(
            "server: {{ listen: \"127.0.0.1:5000\" }}\nupstreams: {{ quay: {{ url: \"http://127.0.0.1:9\" }} }}\nroutes: [ {{ host: quay.test, upstream: quay }} ]\nforward_proxy: {{ listen: \"127.0.0.1:3128\", ca: {{ dir: \"{}/ca\" }}, tunnel: [\"*.tunnel.test\"] }}\n",
            d.display()
        ),
    )
    .unwrap();
    let script = format!(
        r#"set -e
ip link set lo up
ip addr add 10.201.0.1/32 dev lo
mount --bind {d}/hosts /etc/hosts
python3 -m http.server 443 --bind 10.201.0.1 --directory {d}/www >{d}/www.log 2>&1 &
WWW=$!
{bin} serve --config {d}/gw.yaml >{d}/gw.log 2>&1 &
GW=$!
trap 'kill $WWW $GW 2>/dev/null || true' EXIT
for i in $(seq 200); do
  curl -s -o /dev/null http://127.0.0.1:3128/healthz && curl -s -o /dev/null http://10.201.0.1:443/ && break
  sleep 0.05
done
echo "tunnelled: $(curl -sS -p --proxy http://127.0.0.1:3128 http://cdn.tunnel.test:443/blob.txt)"
echo "refused: $(curl -s -o /dev/null -w '%{{http_connect}}' -p --proxy http://127.0.0.1:3128 http://other.test:443/blob.txt)"
"#,
        d = d.display(),
        bin = Ocigate::bin()
    );
    let out = std::process::Command::new("unshare")
        .args([
            "--net",
            "--mount",
            "--fork",
            "--kill-child",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("Operation not permitted") {
        eprintln!("skipped: cannot make a network namespace here: {stderr}");
        return;
    }
    let log = std::fs::read_to_string(d.join("gw.log")).unwrap_or_default();
    assert!(out.status.success(), "{stderr}\n{log}");
    assert!(
        stdout.contains("tunnelled: bytes from behind a tunnel"),
        "{stdout}\n{stderr}\n{log}"
    );
    // Resolving to the same private address does not make a name tunnelled: `tunnel` does.
    assert!(stdout.contains("refused: 403"), "{stdout}");
}

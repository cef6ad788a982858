//! End-to-end operations: local endpoints, errors, logs and metrics, browser redirects,
//! TLS with HTTP/2, quick mode, graceful shutdown with a transfer in flight.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::http::{self, get, get_with, head};
use common::image::{self, BigLayer, OCI_MANIFEST};
use common::{Ocigate, Registry, simple_config, skopeo_digest};
use http_body_util::BodyExt;
use sha2::Digest;

#[test]
fn local_endpoints_and_protocol_errors() {
    let reg = Registry::start("");
    let gw = Ocigate::start(&simple_config(&reg.url(), "mirror/", "team/", ""));
    let base = get(&format!("{}/v2/", gw.url()));
    assert_eq!(base.status, 200);
    assert_eq!(
        base.header("docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
    assert_eq!(get(&format!("{}/healthz", gw.url())).status, 200);

    let unrouted = get(&format!("{}/v2/elsewhere/app/manifests/v1", gw.url()));
    assert_eq!(unrouted.status, 404);
    assert_eq!(unrouted.error_code(), "NAME_UNKNOWN");
    assert_eq!(
        unrouted.header("content-type").as_deref(),
        Some("application/json")
    );
    let invalid = get(&format!("{}/v2/mirror/Bad/manifests/v1", gw.url()));
    assert_eq!(invalid.status, 400);
    assert_eq!(invalid.error_code(), "NAME_INVALID");
    // No manifest has an invalid name: reads are 404s, as the registry answers; writes 400s.
    let bad_reference = format!(
        "{}/v2/mirror/app/manifests/.INVALID_MANIFEST_NAME",
        gw.url()
    );
    let read = get(&bad_reference);
    assert_eq!(
        (read.status, read.error_code().as_str()),
        (404, "MANIFEST_UNKNOWN")
    );
    assert_eq!(head(&bad_reference, &[]).status, 404);
    let write = http::request("PUT", &bad_reference, &[], "{}");
    assert_eq!(
        (write.status, write.error_code().as_str()),
        (400, "NAME_INVALID")
    );
    let digest = get(&format!("{}/v2/mirror/app/blobs/sha256:xyz", gw.url()));
    assert_eq!(
        (digest.status, digest.error_code().as_str()),
        (400, "DIGEST_INVALID")
    );
    // Upstream errors pass through untouched.
    let missing = get(&format!("{}/v2/mirror/app/manifests/nope", gw.url()));
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error_code(), "MANIFEST_UNKNOWN");

    // An unreachable upstream is a 502 with an OCI body, not a hang or a reset.
    let dead = Ocigate::start(&simple_config("http://127.0.0.1:9", "", "", ""));
    let r = get(&format!("{}/v2/x/manifests/v1", dead.url()));
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "UNAVAILABLE");
}

#[test]
fn catalog_lists_only_routed_names_under_local_names() {
    let reg = Registry::start("");
    let img = image::image(&[("f", b"c")], "amd64");
    for repo in ["team/a", "team/b", "team/c/deep", "other/x", "team/special"] {
        image::push_image(&reg.url(), repo, "v1", &img);
    }
    let config = format!(
        "server:\n  listen: \"127.0.0.1:0\"\nupstreams:\n  reg: {{url: \"{}\"}}\nroutes:\n  - {{prefix: \"mirror/\", upstream: reg, remote: \"team/\"}}\n  - {{prefix: \"secret-capability/img\", upstream: reg, remote: \"team/special\"}}\n",
        reg.url()
    );
    let gw = Ocigate::start(&config);
    let all = get(&format!("{}/v2/_catalog", gw.url())).json();
    assert_eq!(
        all["repositories"],
        serde_json::json!(["mirror/a", "mirror/b", "mirror/c/deep"]),
        "team/special is what the capability route opens: never listed"
    );
    let page = get(&format!("{}/v2/_catalog?n=2", gw.url()));
    assert_eq!(
        page.json()["repositories"],
        serde_json::json!(["mirror/a", "mirror/b"])
    );
    let link = page.header("link").unwrap();
    assert_eq!(link, "</v2/_catalog?last=mirror%2Fb&n=2>; rel=\"next\"");
    let next = get(&format!("{}/v2/_catalog?last=mirror%2Fb&n=2", gw.url()));
    assert_eq!(
        next.json()["repositories"],
        serde_json::json!(["mirror/c/deep"])
    );
    assert!(!next.text().contains("secret-capability"));
    assert_eq!(
        reg.count_requests("GET", "/v2/_catalog"),
        1,
        "the upstream's listing is reused while clients page"
    );
}

#[test]
fn access_log_metrics_and_no_secrets() {
    let reg = Registry::start("");
    let img = image::image(&[("f", b"logged")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let gw = Ocigate::start(&simple_config(
        &reg.url(),
        "mirror/",
        "team/",
        "    credentials:\n      basic: {username: someone, password: \"very-secret-password\"}\n",
    ));
    let r = get_with(
        &format!("{}/v2/mirror/app/manifests/v1", gw.url()),
        &[
            ("accept", OCI_MANIFEST),
            ("authorization", "Bearer client-secret-token"),
        ],
    );
    assert_eq!(r.status, 200);
    let unknown = head(&format!("{}/v2/mirror/app/manifests/nope", gw.url()), &[]);
    assert_eq!(unknown.status, 404);
    let layer = image::digest(&img.layers[0]);
    assert_eq!(
        get(&format!("{}/v2/mirror/app/blobs/{layer}", gw.url())).status,
        200
    );

    let metrics = get(&format!("{}/metrics", gw.url())).text();
    assert!(
        metrics
            .contains("ocigate_requests_total{route=\"mirror/\",method=\"GET\",status=\"200\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ocigate_upstream_request_duration_seconds_bucket{upstream=\"reg\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("ocigate_bytes_streamed_total{direction=\"download\"}"),
        "{metrics}"
    );

    // The blob's access line is written last; once it is in, so is the manifest's.
    assert!(gw.wait_for_log(&format!("\"path\":\"/v2/mirror/app/blobs/{layer}\"")));
    let logs = gw.logs();
    let access: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "ocigate::access")
        .collect();
    let manifest_line = access
        .iter()
        .find(|v| v["path"] == "/v2/mirror/app/manifests/v1")
        .expect("one access line for the manifest GET");
    assert_eq!(manifest_line["status"], 200);
    assert_eq!(manifest_line["bytes"], img.manifest.len());
    assert_eq!(manifest_line["outcome"], "complete");
    assert_eq!(manifest_line["upstream"], "reg");
    // A HEAD is answered once its headers are out, error answers too.
    let head_line = access
        .iter()
        .find(|v| v["path"] == "/v2/mirror/app/manifests/nope" && v["method"] == "HEAD")
        .expect("an access line for the HEAD");
    assert_eq!(head_line["status"], 404);
    assert_eq!(head_line["outcome"], "complete");
    assert_eq!(head_line["bytes"], 0);
    for line in logs
        .lines()
        .filter(|l| l.contains("\"target\":\"ocigate::access\""))
    {
        let ms = line
            .split("\"duration_ms\":")
            .nth(1)
            .and_then(|rest| rest.split([',', '}']).next())
            .expect("duration_ms in every access line");
        let decimals = ms.split_once('.').map_or(0, |(_, d)| d.len());
        assert!(
            decimals <= 3,
            "duration_ms {ms} is not rounded to microseconds"
        );
    }
    assert_eq!(
        access
            .iter()
            .filter(|v| v["path"] == "/v2/mirror/app/manifests/v1")
            .count(),
        1,
        "exactly one line per request"
    );
    for secret in [
        "very-secret-password",
        "client-secret-token",
        "c29tZW9uZTp2ZXJ5",
    ] {
        assert!(!logs.contains(secret), "{secret} appeared in the logs");
    }
}

#[test]
fn browser_visits_redirect_to_the_upstream_page() {
    let gw = Ocigate::start(
        "server:\n  listen: \"127.0.0.1:0\"\nupstreams:\n  hub: {url: docker.io}\n  ghcr: {url: \"https://ghcr.io\"}\nroutes:\n  - {prefix: \"\", upstream: hub}\n  - {prefix: \"bp/\", upstream: hub, remote: backplane}\n  - {prefix: \"gh/\", upstream: ghcr, remote: \"myorg/\"}\n",
    );
    let browser = [("accept", "text/html,application/xhtml+xml")];
    let cases = [
        ("/alpine", "https://hub.docker.com/_/alpine"),
        ("/bp/true", "https://hub.docker.com/r/backplane/true"),
        ("/gh/tool", "https://ghcr.io/myorg/tool"),
        ("/", "https://hub.docker.com/"),
    ];
    for (path, target) in cases {
        let r = get_with(&format!("{}{path}", gw.url()), &browser);
        assert_eq!(r.status, 302, "{path}");
        assert_eq!(r.header("location").as_deref(), Some(target), "{path}");
    }
    // Registry clients are not browsers.
    assert_eq!(get(&format!("{}/alpine", gw.url())).status, 404);

    let off = Ocigate::start(
        "server:\n  listen: \"127.0.0.1:0\"\n  browser_redirects: false\nupstreams:\n  hub: {url: docker.io}\nroutes:\n  - {prefix: \"\", upstream: hub}\n",
    );
    assert_eq!(
        get_with(&format!("{}/alpine", off.url()), &browser).status,
        404
    );
}

#[test]
fn quick_mode_maps_every_name_under_the_prefix() {
    let reg = Registry::start("");
    let img = image::image(&[("f", b"quick")], "amd64");
    image::push_image(&reg.url(), "ahmet/example", "v1", &img);
    let flags = Ocigate::start_args(
        &[
            "--upstream",
            &reg.url(),
            "--repo-prefix",
            "ahmet",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let env = Ocigate::start_args(
        &["--listen", "127.0.0.1:0"],
        &[
            ("REGISTRY_HOST", reg.url().as_str()),
            ("REPO_PREFIX", "ahmet"),
        ],
    );
    for gw in [&flags, &env] {
        let r = head(
            &format!("{}/v2/example/manifests/v1", gw.url()),
            &[("accept", OCI_MANIFEST)],
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("docker-content-digest").as_deref(),
            Some(img.digest.as_str())
        );
    }
}

/// A mirror of `reg` on a TLS listener with `cert`.
fn tls_mirror(reg: &Registry, cert: &common::TestCert) -> Ocigate {
    let config = simple_config(&reg.url(), "mirror/", "team/", "").replace(
        "  listen: \"127.0.0.1:0\"\n",
        &format!(
            "  listen: \"127.0.0.1:0\"\n  tls: {{cert: {}, key: {}}}\n",
            cert.cert_path.display(),
            cert.key_path.display()
        ),
    );
    Ocigate::start(&config)
}

/// An HTTPS client trusting `cert`, speaking only HTTP/2 or only HTTP/1.1.
fn tls_client(
    cert: &common::TestCert,
    h2: bool,
) -> hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http::Body,
> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if h2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(h2)
        .build(connector)
}

#[test]
fn tls_listener_speaks_http2_and_http1() {
    let reg = Registry::start("");
    let img = image::image(&[("f", b"over tls")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let cert = common::TestCert::new();
    let gw = tls_mirror(&reg, &cert);
    let url = format!("https://{}/v2/mirror/app/manifests/v1", gw.host());
    for (h2, want) in [
        (true, ::http::Version::HTTP_2),
        (false, ::http::Version::HTTP_11),
    ] {
        let client = tls_client(&cert, h2);
        let req = ::http::Request::get(&url)
            .header("accept", OCI_MANIFEST)
            .body(http::full(bytes::Bytes::new()))
            .unwrap();
        let (version, status, body) = http::rt().block_on(async {
            let resp = client.request(req).await.unwrap();
            let (v, s) = (resp.version(), resp.status());
            (v, s, resp.into_body().collect().await.unwrap().to_bytes())
        });
        assert_eq!((version, status.as_u16()), (want, 200));
        assert_eq!(&body[..], &img.manifest[..]);
    }
    // A real client over TLS, trusting the certificate from a cert dir.
    let certs = tempfile::tempdir().unwrap();
    std::fs::write(certs.path().join("ca.crt"), cert.cert.pem()).unwrap();
    let cert_dir = certs.path().display().to_string();
    assert_eq!(
        skopeo_digest(
            &format!("{}/mirror/app:v1", gw.host()),
            &["--cert-dir", &cert_dir]
        ),
        img.digest
    );
}

#[test]
fn an_http2_client_gone_silent_is_found_by_pings() {
    let reg = Registry::start("");
    let big = BigLayer::new(64 << 20, 8);
    big.push_image(&reg.url(), "team/big", "v1");
    let cert = common::TestCert::new();
    let gw = tls_mirror(&reg, &cert);
    let relay = common::servers::FreezableRelay::start(gw.addr.port());
    let url = format!(
        "https://127.0.0.1:{}/v2/mirror/big/blobs/{}",
        relay.port, big.digest
    );
    let client = tls_client(&cert, true);
    let _body = http::rt().block_on(async {
        let req = ::http::Request::get(&url)
            .body(http::full(bytes::Bytes::new()))
            .unwrap();
        let mut body = client.request(req).await.unwrap().into_body();
        assert!(body.frame().await.unwrap().is_ok());
        body
    });
    // The client's path dies mid-blob without a word; it still holds the stream open.
    relay.freeze();
    // Unanswered pings close the connection after 20 s + 10 s, and the transfer is logged as
    // aborted; without them the stream would wait for the client's window forever.
    let line = format!("\"path\":\"/v2/mirror/big/blobs/{}\"", big.digest);
    assert!(
        (0..12).any(|_| gw.wait_for_log(&line)),
        "no access line: the stream to the silent client never ended"
    );
    let logged: serde_json::Value = gw
        .logs()
        .lines()
        .find(|l| l.contains(&line))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap();
    assert_eq!(logged["outcome"], "aborted");
    assert!(logged["bytes"].as_u64().unwrap() < big.size);
}

#[test]
fn sigterm_lets_an_inflight_transfer_finish() {
    let reg = Registry::start("");
    let big = BigLayer::new(64 << 20, 7);
    big.push_image(&reg.url(), "team/big", "v1");
    let mut gw = Ocigate::start(&simple_config(&reg.url(), "mirror/", "team/", ""));
    let url = format!("{}/v2/mirror/big/blobs/{}", gw.url(), big.digest);
    let mut body = http::start_get(&url);
    let mut hasher = sha2::Sha256::new();
    let mut n = 0u64;
    // Take the first bytes, so the transfer is certainly in flight…
    let first = http::rt()
        .block_on(body.frame())
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    n += first.len() as u64;
    hasher.update(&first);
    // …then ask ocigate to stop, and read the rest.
    let pid = gw.pid();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    http::rt().block_on(async {
        while let Some(frame) = body.frame().await {
            let data = frame
                .expect("the transfer must not be cut")
                .into_data()
                .unwrap_or_default();
            n += data.len() as u64;
            hasher.update(&data);
        }
    });
    assert_eq!(n, big.size);
    assert_eq!(
        format!("sha256:{}", hex::encode(hasher.finalize())),
        big.digest
    );
    let status = gw.terminate();
    assert!(
        status.success(),
        "ocigate exits cleanly after SIGTERM: {status:?}"
    );
    assert!(gw.wait_for_log("shutting down"));
    // No new connections after shutdown.
    assert!(std::net::TcpStream::connect(gw.addr).is_err());
}

#[test]
fn shutdown_grace_bounds_how_long_a_stalled_transfer_is_waited_for() {
    let reg = Registry::start("");
    let big = BigLayer::new(64 << 20, 9);
    big.push_image(&reg.url(), "team/big", "v1");
    let config = simple_config(&reg.url(), "mirror/", "team/", "").replace(
        "  listen: \"127.0.0.1:0\"\n",
        "  listen: \"127.0.0.1:0\"\n  shutdown_grace: 1s\n",
    );
    let mut gw = Ocigate::start(&config);
    let url = format!("{}/v2/mirror/big/blobs/{}", gw.url(), big.digest);
    // Start the download and then stop reading: the transfer stalls on backpressure.
    let mut body = http::start_get(&url);
    let first = http::rt().block_on(body.frame()).unwrap().unwrap();
    assert!(first.is_data());
    let started = std::time::Instant::now();
    let status = gw.terminate();
    // The stalled client is not waited for beyond the grace period (plus slack for a busy CI).
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(gw.wait_for_log("grace period over"), "{}", gw.logs());
    drop(body);
}

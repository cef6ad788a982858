//! End-to-end: real `docker-registry`, real `ocigate`, real clients (skopeo, podman, docker).
//! Pull and push through a rewritten prefix, uploads, mounts, tags paging, a 200 MiB layer,
//! an HTTPS upstream (HTTP/2, private CA).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::http::{self, get, head, request};
use common::image::{self, BigLayer, OCI_INDEX, OCI_MANIFEST};
use common::{
    Ocigate, Podman, Registry, run_ok, simple_config, skopeo_digest, skopeo_ok, skopeo_pull_oci,
};

const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

fn mirror(reg: &Registry) -> Ocigate {
    Ocigate::start(&simple_config(&reg.url(), "mirror/", "team/", ""))
}

#[test]
fn single_arch_pull_through_prefix_keeps_digests() {
    let reg = Registry::start("");
    let img = image::image(&[("hello", b"hello from the registry\n")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let gw = mirror(&reg);

    // HEAD and GET by tag: same digest and bytes as the upstream, the client's Accept honoured.
    let h = head(
        &format!("{}/v2/mirror/app/manifests/v1", gw.url()),
        &[("accept", ACCEPT_ALL)],
    );
    assert_eq!(h.status, 200);
    assert_eq!(
        h.header("docker-content-digest").as_deref(),
        Some(img.digest.as_str())
    );
    assert_eq!(
        h.header("content-length"),
        Some(img.manifest.len().to_string())
    );
    let g = http::get_with(
        &format!("{}/v2/mirror/app/manifests/v1", gw.url()),
        &[("accept", OCI_MANIFEST)],
    );
    assert_eq!(
        &g.body[..],
        &img.manifest[..],
        "manifest bytes must be untouched"
    );
    assert_eq!(g.header("content-type").as_deref(), Some(OCI_MANIFEST));

    // skopeo sees the upstream's digest through the proxy, and copies the image out.
    assert_eq!(
        skopeo_digest(&format!("{}/mirror/app:v1", gw.host()), &[]),
        img.digest
    );
    let dir = skopeo_pull_oci(&format!("{}/mirror/app:v1", gw.host()), &[]);
    let layer_digest = image::digest(&img.layers[0]);
    let hex = layer_digest.trim_start_matches("sha256:");
    let copied = std::fs::read(dir.path().join("out/blobs/sha256").join(hex)).unwrap();
    assert_eq!(copied, img.layers[0]);

    // A Range request gets 206 with the right slice.
    let r = http::get_with(
        &format!("{}/v2/mirror/app/blobs/{layer_digest}", gw.url()),
        &[("range", "bytes=0-9")],
    );
    assert_eq!(r.status, 206);
    assert_eq!(&r.body[..], &img.layers[0][..10]);
    assert!(r.header("content-range").unwrap().starts_with("bytes 0-9/"));
}

#[test]
fn multi_arch_pull_with_skopeo_all_and_podman() {
    let reg = Registry::start("");
    let amd = image::image(&[("hello", b"amd64 payload\n")], "amd64");
    let arm = image::image(&[("hello", b"arm64 payload\n")], "arm64");
    let index_digest = image::push_index(
        &reg.url(),
        "team/multi",
        "1.0",
        &[(&amd, "amd64"), (&arm, "arm64")],
    );
    let gw = mirror(&reg);

    let h = head(
        &format!("{}/v2/mirror/multi/manifests/1.0", gw.url()),
        &[("accept", OCI_INDEX)],
    );
    assert_eq!(
        h.header("docker-content-digest").as_deref(),
        Some(index_digest.as_str())
    );
    let by_digest = head(
        &format!("{}/v2/mirror/multi/manifests/{}", gw.url(), arm.digest),
        &[("accept", OCI_MANIFEST)],
    );
    assert_eq!(by_digest.status, 200);

    let dir = skopeo_pull_oci(&format!("{}/mirror/multi:1.0", gw.host()), &["--all"]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], index_digest.as_str());

    if !common::have("podman") {
        eprintln!("SKIP podman part: podman not installed");
        return;
    }
    let podman = Podman::new();
    run_ok(&mut podman.command(&[
        "pull",
        "--tls-verify=false",
        "--arch",
        "amd64",
        &format!("{}/mirror/multi:1.0", gw.host()),
    ]));
    let out = run_ok(&mut podman.command(&[
        "image",
        "inspect",
        "--format",
        "{{.Digest}}",
        &format!("{}/mirror/multi:1.0", gw.host()),
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), index_digest);
}

#[test]
fn docker_engine_pulls_through_the_proxy() {
    if !common::docker_engine() {
        eprintln!("SKIP: no Docker Engine answers here");
        return;
    }
    let reg = Registry::start("");
    let img = image::image(&[("hello", b"docker engine payload\n")], "amd64");
    image::push_image(&reg.url(), "team/engine", "v1", &img);
    let gw = mirror(&reg);
    let reference = format!("{}/mirror/engine:v1", gw.host());
    let out = run_ok(std::process::Command::new("docker").args(["pull", &reference]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&img.digest), "docker pull output: {text}");
    let _ = std::process::Command::new("docker")
        .args(["rmi", "-f", &reference])
        .output();
}

#[test]
fn push_lands_under_the_remote_name() {
    let reg = Registry::start("");
    let gw = mirror(&reg);
    // A real client pushes through the proxy (POST, PATCH streamed, PUT).
    let src = Registry::start("");
    let img = image::image(&[("hello", b"pushed through ocigate\n")], "amd64");
    image::push_image(&src.url(), "src/app", "v1", &img);
    skopeo_ok(&[
        "copy",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{}/src/app:v1", src.host()),
        &format!("docker://{}/mirror/pushed:v1", gw.host()),
    ]);
    let direct = head(
        &format!("{}/v2/team/pushed/manifests/v1", reg.url()),
        &[("accept", OCI_MANIFEST)],
    );
    assert_eq!(
        direct.status, 200,
        "the image must exist upstream under team/pushed"
    );
    assert_eq!(
        direct.header("docker-content-digest").as_deref(),
        Some(img.digest.as_str())
    );
    assert_eq!(
        get(&format!("{}/v2/mirror/pushed/tags/list", reg.url())).status,
        404
    );
}

/// POST …/blobs/uploads/ on `mirror/up`, expecting a session.
fn start_upload(base: &str) -> http::Resp {
    let start = request(
        "POST",
        &format!("{base}/v2/mirror/up/blobs/uploads/"),
        &[],
        Vec::new(),
    );
    assert_eq!(start.status, 202, "{}", start.text());
    start
}

#[test]
fn monolithic_and_chunked_uploads_with_rewritten_locations() {
    let reg = Registry::start("");
    let gw = mirror(&reg);
    let base = gw.url();

    // Monolithic: POST for a session, then one PUT ?digest= carrying the whole blob.
    let data = b"monolithic blob".to_vec();
    let d = image::digest(&data);
    let session = start_upload(&base).header("location").unwrap();
    let sep = if session.contains('?') { '&' } else { '?' };
    let r = request(
        "PUT",
        &format!("{session}{sep}digest={d}"),
        &[("content-type", "application/octet-stream")],
        data.clone(),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        get(&format!("{}/v2/team/up/blobs/{d}", reg.url())).body,
        data
    );
    let loc = r.header("location").unwrap();
    assert!(
        loc.starts_with(&format!("{base}/v2/mirror/up/blobs/")),
        "{loc}"
    );
    assert_eq!(
        r.header("docker-content-digest").as_deref(),
        Some(d.as_str())
    );

    // Chunked: POST, PATCH × 2 with Content-Range, PUT ?digest=.
    let start = start_upload(&base);
    let mut loc = start.header("location").unwrap();
    assert!(
        loc.starts_with(&format!("{base}/v2/mirror/up/blobs/uploads/")),
        "{loc}"
    );
    assert!(start.header("docker-upload-uuid").is_some());
    let chunks: [&[u8]; 2] = [b"first chunk|", b"second chunk"];
    let mut offset = 0;
    for c in chunks {
        let range = format!("{}-{}", offset, offset + c.len() - 1);
        let r = request(
            "PATCH",
            &loc,
            &[
                ("content-type", "application/octet-stream"),
                ("content-range", &range),
            ],
            c.to_vec(),
        );
        assert_eq!(r.status, 202, "{}", r.text());
        loc = r.header("location").unwrap();
        assert!(loc.starts_with(&format!("{base}/v2/mirror/up/")), "{loc}");
        offset += c.len();
    }
    // Upload status through the proxy.
    let status = get(&loc);
    assert_eq!(status.status, 204);
    assert_eq!(
        status.header("range").as_deref(),
        Some(format!("0-{}", offset - 1).as_str())
    );
    let all = [chunks[0], chunks[1]].concat();
    let d2 = image::digest(&all);
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = request("PUT", &format!("{loc}{sep}digest={d2}"), &[], Vec::new());
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        get(&format!("{}/v2/team/up/blobs/{d2}", reg.url())).body,
        all
    );

    // Cancel: DELETE on an upload session.
    let loc = start_upload(&base).header("location").unwrap();
    assert_eq!(request("DELETE", &loc, &[], Vec::new()).status, 204);
    assert_eq!(get(&loc).status, 404);
}

#[test]
fn cross_repository_mount_rewrites_from() {
    let reg = Registry::start("");
    let data = b"shared layer".to_vec();
    let d = image::push_blob(&reg.url(), "team/source", &data);
    let gw = mirror(&reg);
    let r = request(
        "POST",
        &format!(
            "{}/v2/mirror/target/blobs/uploads/?mount={d}&from=mirror/source",
            gw.url()
        ),
        &[],
        Vec::new(),
    );
    assert_eq!(r.status, 201, "mount must succeed: {}", r.text());
    assert_eq!(
        r.header("location").unwrap(),
        format!("{}/v2/mirror/target/blobs/{d}", gw.url())
    );
    assert_eq!(
        get(&format!("{}/v2/team/target/blobs/{d}", reg.url())).body,
        data
    );
    // A `from` outside every route cannot be mounted: a plain upload session starts instead.
    let r = request(
        "POST",
        &format!(
            "{}/v2/mirror/target2/blobs/uploads/?mount={d}&from=elsewhere/x",
            gw.url()
        ),
        &[],
        Vec::new(),
    );
    assert_eq!(r.status, 202);
    // Percent-encoded keys are the same keys: `fr%6Fm` is `from`, mapped (or dropped) like it.
    let r = request(
        "POST",
        &format!(
            "{}/v2/mirror/target3/blobs/uploads/?m%6Funt={d}&fr%6Fm=mirror%2Fsource",
            gw.url()
        ),
        &[],
        Vec::new(),
    );
    assert_eq!(
        r.status,
        201,
        "an encoded from is still mapped: {}",
        r.text()
    );
    let r = request(
        "POST",
        &format!(
            "{}/v2/mirror/target4/blobs/uploads/?m%6Funt={d}&fr%6Fm=team%2Fsource",
            gw.url()
        ),
        &[],
        Vec::new(),
    );
    assert_eq!(
        r.status, 202,
        "an unrouted encoded from must not reach the upstream"
    );
    assert_eq!(
        get(&format!("{}/v2/team/target4/blobs/{d}", reg.url())).status,
        404
    );
    let target4: Vec<String> = reg
        .log()
        .lines()
        .filter(|l| l.contains("/v2/team/target4/"))
        .map(str::to_string)
        .collect();
    assert!(!target4.is_empty());
    assert!(
        target4
            .iter()
            .all(|l| !l.contains("from") && !l.contains("fr%6Fm")),
        "{target4:?}"
    );
    // Duplicates are refused rather than guessed at.
    let r = request(
        "POST",
        &format!(
            "{}/v2/mirror/target5/blobs/uploads/?mount={d}&from=mirror/source&from=mirror/other",
            gw.url()
        ),
        &[],
        Vec::new(),
    );
    assert_eq!(r.status, 400);
}

#[test]
fn tags_pagination_uses_local_names() {
    let reg = Registry::start("");
    let img = image::image(&[("f", b"x")], "amd64");
    image::push_image(&reg.url(), "team/paged", "t1", &img);
    for t in ["t2", "t3", "t4", "t5"] {
        image::push_manifest(&reg.url(), "team/paged", t, OCI_MANIFEST, &img.manifest);
    }
    let gw = mirror(&reg);
    let mut url = format!("{}/v2/mirror/paged/tags/list?n=2", gw.url());
    let mut tags = Vec::new();
    for _ in 0..5 {
        let r = get(&url);
        assert_eq!(r.status, 200);
        let v = r.json();
        assert_eq!(v["name"], "mirror/paged");
        tags.extend(
            v["tags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string()),
        );
        match r.header("link") {
            Some(link) => {
                assert!(link.starts_with("</v2/mirror/paged/tags/list?"), "{link}");
                let path = &link[1..link.find('>').unwrap()];
                url = format!("{}{path}", gw.url());
            }
            None => break,
        }
    }
    assert_eq!(tags, ["t1", "t2", "t3", "t4", "t5"]);
}

#[test]
fn a_200_mib_layer_streams_through_intact() {
    let reg = Registry::start("");
    let big = BigLayer::new(200 << 20, 42);
    let img = big.push_image(&reg.url(), "team/big", "v1");
    let gw = mirror(&reg);
    let (status, headers, n, digest) =
        http::get_streamed_digest(&format!("{}/v2/mirror/big/blobs/{}", gw.url(), big.digest));
    assert_eq!(status, 200);
    assert_eq!(n, big.size);
    assert_eq!(digest, big.digest);
    assert_eq!(headers["content-length"], big.size.to_string().as_str());
    // And a real client copies the whole image through the proxy, verifying digests.
    let dir = skopeo_pull_oci(&format!("{}/mirror/big:v1", gw.host()), &[]);
    let hex = big.digest.trim_start_matches("sha256:");
    assert_eq!(
        common::sha256_file(&dir.path().join("out/blobs/sha256").join(hex)),
        big.digest
    );
    let h = head(
        &format!("{}/v2/mirror/big/manifests/v1", gw.url()),
        &[("accept", OCI_MANIFEST)],
    );
    assert_eq!(
        h.header("docker-content-digest").as_deref(),
        Some(img.digest.as_str())
    );
}

#[test]
fn locations_follow_public_url_or_forwarded_headers() {
    let reg = Registry::start("");
    let behind_lb = Ocigate::start(&simple_config(&reg.url(), "mirror/", "team/", "").replace(
        "  listen: \"127.0.0.1:0\"\n",
        "  listen: \"127.0.0.1:0\"\n  public_url: https://r.example.com\n",
    ));
    let r = request(
        "POST",
        &format!("{}/v2/mirror/up/blobs/uploads/", behind_lb.url()),
        &[],
        Vec::new(),
    );
    let loc = r.header("location").unwrap();
    assert!(
        loc.starts_with("https://r.example.com/v2/mirror/up/blobs/uploads/"),
        "{loc}"
    );

    let gw = mirror(&reg);
    let r = request(
        "POST",
        &format!("{}/v2/mirror/up/blobs/uploads/", gw.url()),
        &[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "cdn.example.org"),
        ],
        Vec::new(),
    );
    let loc = r.header("location").unwrap();
    assert!(
        loc.starts_with("https://cdn.example.org/v2/mirror/up/blobs/uploads/"),
        "{loc}"
    );
}

#[test]
fn delete_and_referrers_reach_the_remote_name() {
    let reg = Registry::start("");
    let img = image::image(&[("f", b"to delete")], "amd64");
    image::push_image(&reg.url(), "team/gone", "v1", &img);
    let gw = mirror(&reg);
    let referrers = get(&format!(
        "{}/v2/mirror/gone/referrers/{}",
        gw.url(),
        img.digest
    ));
    let direct = get(&format!(
        "{}/v2/team/gone/referrers/{}",
        reg.url(),
        img.digest
    ));
    assert_eq!(
        referrers.status, direct.status,
        "the upstream's answer passes through"
    );
    assert_eq!(
        reg.count_requests("GET", &format!("/v2/team/gone/referrers/{}", img.digest)),
        2
    );

    let manifest = format!("{}/v2/mirror/gone/manifests/{}", gw.url(), img.digest);
    assert_eq!(request("DELETE", &manifest, &[], Vec::new()).status, 202);
    assert_eq!(head(&manifest, &[("accept", OCI_MANIFEST)]).status, 404);
    assert_eq!(
        head(
            &format!("{}/v2/team/gone/manifests/{}", reg.url(), img.digest),
            &[("accept", OCI_MANIFEST)]
        )
        .status,
        404,
        "deleted upstream, under the remote name"
    );
}

/// Restarts `reg` on TLS with `cert`, on the same storage.
fn serve_tls(reg: &mut Registry, cert: &common::TestCert) {
    reg.reconfigure(&format!(
        "  tls:\n    certificate: {}\n    key: {}\n",
        cert.cert_path.display(),
        cert.key_path.display()
    ));
}

/// A mirror of the HTTPS upstream on 127.0.0.1:`port`, trusting `cert`.
fn https_mirror(port: u16, cert: &common::TestCert) -> Ocigate {
    let upstream = format!("https://127.0.0.1:{port}");
    let extra = format!("    ca: {}\n", cert.cert_path.display());
    Ocigate::start(&simple_config(&upstream, "mirror/", "team/", &extra))
}

#[test]
fn an_https_upstream_with_a_private_ca_is_pulled_over_http2() {
    let cert = common::TestCert::new();
    let mut reg = Registry::start("");
    let img = image::image(&[("f", b"over https")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let big = BigLayer::new(8 << 20, 5);
    big.push_image(&reg.url(), "team/big", "v1");
    serve_tls(&mut reg, &cert);
    let gw = https_mirror(reg.port, &cert);

    assert_eq!(
        skopeo_digest(&format!("{}/mirror/app:v1", gw.host()), &[]),
        img.digest
    );
    // Concurrent blob GETs, multiplexed upstream over HTTP/2.
    let url = format!("{}/v2/mirror/big/blobs/{}", gw.url(), big.digest);
    let downloads: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || http::get_streamed_digest(&url))
        })
        .collect();
    for d in downloads {
        let (status, _, n, digest) = d.join().unwrap();
        assert_eq!(
            (status, n, digest.as_str()),
            (200, big.size, big.digest.as_str())
        );
    }
    let blob_gets: Vec<String> = reg
        .log()
        .lines()
        .filter(|l| l.contains(&format!("\"GET /v2/team/big/blobs/{}", big.digest)))
        .map(str::to_string)
        .collect();
    assert_eq!(blob_gets.len(), 4, "{blob_gets:?}");
    assert!(
        blob_gets.iter().all(|l| l.contains("HTTP/2.0\"")),
        "{blob_gets:?}"
    );
}

#[test]
fn an_upstream_connection_gone_silent_is_found_by_pings_and_replaced() {
    let cert = common::TestCert::new();
    let mut reg = Registry::start("");
    let big = BigLayer::new(64 << 20, 6);
    big.push_image(&reg.url(), "team/big", "v1");
    serve_tls(&mut reg, &cert);
    let relay = common::servers::FreezableRelay::start(reg.port);
    let gw = https_mirror(relay.port, &cert);
    let url = format!("{}/v2/mirror/big/blobs/{}", gw.url(), big.digest);

    let mut body = http::start_get(&url);
    http::rt().block_on(async {
        use http_body_util::BodyExt;
        assert!(body.frame().await.unwrap().is_ok());
    });
    // The path to the upstream dies mid-blob, with no FIN or RST to say so.
    relay.freeze();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rest = http::rt().block_on(async {
            use http_body_util::BodyExt;
            while let Some(frame) = body.frame().await {
                frame?;
            }
            Ok::<_, hyper::Error>(())
        });
        let _ = tx.send(rest.is_ok());
    });
    // Unanswered pings end the stream after 20 s + 10 s; without them it would wait forever.
    let completed = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the transfer over a dead upstream connection never ended");
    assert!(
        !completed,
        "the blob cannot have arrived whole through a frozen path"
    );
    // The dead connection left the pool: the next GET goes over a new one, intact.
    let (status, _, n, digest) = http::get_streamed_digest(&url);
    assert_eq!((status, n, digest), (200, big.size, big.digest.clone()));
}

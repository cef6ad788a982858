//! End-to-end: the pull-through cache in front of the real `docker-registry`, with skopeo and
//! podman as clients. Upstream requests are counted from the registry's own access log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::http::{self, get_streamed, head};
use common::image::{self, BigLayer, OCI_MANIFEST};
use common::servers::LyingRegistry;
use common::{Ocigate, Podman, Registry, run_ok, skopeo_digest, skopeo_pull_oci};

/// A config with one cache route `c/` → `team/` on `upstream`.
fn config(upstream: &str, dir: &Path, cache_extra: &str) -> String {
    format!(
        "server:\n  listen: \"127.0.0.1:0\"\ncache:\n  dir: {}\n{cache_extra}upstreams:\n  reg:\n    url: {upstream}\nroutes:\n  - prefix: \"c/\"\n    upstream: reg\n    remote: \"team/\"\n    cache: true\n",
        dir.display()
    )
}

fn metric(gw: &Ocigate, series: &str) -> u64 {
    let text = http::get(&format!("{}/metrics", gw.url())).text();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn cache_cli(config_yaml: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ocigate.yaml");
    std::fs::write(&path, config_yaml).unwrap();
    let out = run_ok(
        Command::new(Ocigate::bin())
            .arg("cache")
            .arg("--config")
            .arg(&path)
            .args(args),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn object_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join("objects")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn cold_then_warm_pull_with_the_upstream_stopped_and_a_restart() {
    let mut reg = Registry::start("");
    let img = image::image(&[("hello", b"cached bytes\n")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let dir = tempfile::tempdir().unwrap();
    // tag_ttl 0s: every tag request revalidates, so a stopped upstream means a stale answer.
    let yaml = config(&reg.url(), dir.path(), "  tag_ttl: 0s\n");
    let gw = Ocigate::start(&yaml);
    let by_tag = format!("{}/c/app:v1", gw.host());
    assert_eq!(skopeo_digest(&by_tag, &[]), img.digest);
    let cold = skopeo_pull_oci(&by_tag, &[]);
    assert_eq!(
        reg.count_requests("GET", &format!("/v2/team/app/blobs/{}", img.layer_digest)),
        1,
        "the layer was fetched once"
    );
    // A second pull: blobs from the cache, the tag revalidated with a HEAD, not a GET.
    let gets_before = reg.count_requests("GET", "/v2/team/app/manifests/v1");
    let _warm = skopeo_pull_oci(&by_tag, &[]);
    assert_eq!(
        reg.count_requests("GET", &format!("/v2/team/app/blobs/{}", img.layer_digest)),
        1
    );
    assert_eq!(
        reg.count_requests("GET", "/v2/team/app/manifests/v1"),
        gets_before
    );
    assert!(reg.count_requests("HEAD", "/v2/team/app/manifests/v1") >= 1);
    assert!(
        metric(
            &gw,
            "ocigate_cache_requests_total{kind=\"blob\",result=\"hit\"}"
        ) >= 1
    );

    // The upstream goes away, and ocigate restarts on the same directory.
    reg.stop();
    drop(gw);
    let gw = Ocigate::start(&yaml);
    let by_tag = format!("{}/c/app:v1", gw.host());
    let dest = tempfile::tempdir().unwrap();
    skopeo_ok_copy(&by_tag, dest.path());
    assert_eq!(
        common::sha256_file(&blob_path(dest.path(), &img.layer_digest)),
        img.layer_digest
    );
    let by_digest = format!("{}/c/app@{}", gw.host(), img.digest);
    assert_eq!(
        skopeo_digest(&by_digest, &["--no-tags", "--tls-verify=false"]),
        img.digest
    );
    assert!(
        metric(
            &gw,
            "ocigate_cache_requests_total{kind=\"manifest\",result=\"stale\"}"
        ) >= 1
    );
    // Podman, too.
    let podman = Podman::new();
    run_ok(&mut podman.command(&["pull", "--tls-verify=false", &by_tag]));
    drop(cold);

    // `ocigate cache ls` and `du` see what was cached, without a server.
    let ls = cache_cli(&yaml, &["ls"]);
    assert!(
        ls.contains(&img.layer_digest) && ls.contains(&img.digest),
        "{ls}"
    );
    assert!(ls.contains("tag reg/team/app:v1 -> "), "{ls}");
    let du = cache_cli(&yaml, &["du"]);
    assert!(du.starts_with("3 objects, "), "{du}");
}

/// `skopeo copy` into a fresh OCI layout at `dest`.
fn skopeo_ok_copy(reference: &str, dest: &Path) {
    common::skopeo_ok(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-oci-accept-uncompressed-layers",
        &format!("docker://{reference}"),
        &format!("oci:{}:pulled", dest.join("out").display()),
    ]);
}

fn blob_path(layout: &Path, digest: &str) -> std::path::PathBuf {
    let (alg, hex) = digest.split_once(':').unwrap();
    layout.join("out/blobs").join(alg).join(hex)
}

#[test]
fn sixteen_cold_pulls_of_a_200_mib_layer_make_one_upstream_get() {
    let reg = Registry::start("");
    let big = BigLayer::new(200 << 20, 7);
    big.push_image(&reg.url(), "team/big", "v1");
    let dir = tempfile::tempdir().unwrap();
    let gw = Ocigate::start(&config(&reg.url(), dir.path(), ""));
    let url = format!("{}/v2/c/big/blobs/{}", gw.url(), big.digest);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| s.spawn(|| get_streamed(&url, &[])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (status, headers, n, digest) in &results {
        assert_eq!(*status, 200);
        assert_eq!(*n, big.size);
        assert_eq!(digest.as_deref(), Ok(big.digest.as_str()));
        assert_eq!(headers["docker-content-digest"], big.digest.as_str());
    }
    assert_eq!(
        reg.count_requests("GET", &format!("/v2/team/big/blobs/{}", big.digest)),
        1,
        "16 concurrent cold pulls, one upstream GET"
    );
    assert!(metric(&gw, "ocigate_cache_coalesced_total") >= 1);
    // Ranges are served from the cache as well.
    let r = http::get_with(&url, &[("range", "bytes=512-1023")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body.len(), 512);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes 512-1023/{}", big.size)
    );
    // A last byte past the end is the rest of the blob (RFC 9110 §14.1.2), however large.
    let (status, headers, n, _) =
        get_streamed(&url, &[("range", "bytes=1000-18446744073709551615")]);
    assert_eq!(status, 206);
    assert_eq!(n, big.size - 1000);
    assert_eq!(
        headers["content-range"],
        format!("bytes 1000-{}/{}", big.size - 1, big.size).as_str()
    );
    assert_eq!(
        reg.count_requests("GET", &format!("/v2/team/big/blobs/{}", big.digest)),
        1
    );
}

#[test]
fn wrong_bytes_from_the_upstream_leave_nothing_in_the_cache() {
    const BAD: &[u8] = b"{\"schemaVersion\":2,\"these are not the bytes\":true}";
    let liar = LyingRegistry::start(BAD);
    let good = b"the real blob, whose digest was asked for";
    let digest = image::digest(good);
    let dir = tempfile::tempdir().unwrap();
    let yaml = config(&liar.url(), dir.path(), "");
    let gw = Ocigate::start(&yaml);
    let url = format!("{}/v2/c/x/blobs/{digest}", gw.url());
    for attempt in 1..=2 {
        let (status, _, n, result) = get_streamed(&url, &[]);
        assert_eq!(status, 200);
        assert!(
            result.is_err(),
            "the client's transfer must break off: got {result:?}"
        );
        assert!(
            n < BAD.len() as u64,
            "the last bytes are held back until verified"
        );
        let asked = liar
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET ") && r.contains("/blobs/"))
            .count();
        assert_eq!(
            asked, attempt,
            "nothing was cached, so each request asks again"
        );
    }
    assert_eq!(
        metric(
            &gw,
            "ocigate_cache_rejected_total{reason=\"digest_mismatch\"}"
        ),
        2
    );
    // A manifest by digest whose bytes do not hash to it is refused, not stored.
    let r = http::get(&format!("{}/v2/c/x/manifests/{digest}", gw.url()));
    assert_eq!(r.status, 502);
    assert!(r.text().contains("nothing cached"), "{}", r.text());
    assert!(
        object_files(dir.path()).is_empty(),
        "{:?}",
        object_files(dir.path())
    );
    assert!(cache_cli(&yaml, &["du"]).starts_with("0 objects, 0 bytes"));
}

#[test]
fn max_size_is_respected_over_several_images() {
    let reg = Registry::start("");
    let layers: Vec<BigLayer> = (0..4)
        .map(|i| BigLayer::new(1 << 20, 100 + 2 * i))
        .collect();
    for (i, l) in layers.iter().enumerate() {
        l.push_image(&reg.url(), &format!("team/img{i}"), "v1");
    }
    let dir = tempfile::tempdir().unwrap();
    let max = 3 << 20;
    let yaml = config(&reg.url(), dir.path(), &format!("  max_size: {max}\n"));
    let gw = Ocigate::start(&yaml);
    for i in 0..4 {
        let _ = skopeo_pull_oci(&format!("{}/c/img{i}:v1", gw.host()), &[]);
        let total: u64 = object_files(dir.path())
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        assert!(total <= max, "{total} bytes on disk after image {i}");
    }
    assert!(
        metric(&gw, "ocigate_cache_evictions_total") >= 1,
        "{}",
        http::get(&format!("{}/metrics", gw.url())).text()
    );
    // The most recent image is still whole; the first one's layer was evicted.
    let files: Vec<String> = object_files(dir.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let hex = |d: &str| d.split_once(':').unwrap().1.to_string();
    assert!(files.contains(&hex(&layers[3].digest)), "{files:?}");
    assert!(!files.contains(&hex(&layers[0].digest)), "{files:?}");
}

#[test]
fn a_corrupted_or_truncated_file_is_detected_dropped_and_fetched_again() {
    let reg = Registry::start("");
    let layer = BigLayer::new(1 << 20, 5);
    layer.push_image(&reg.url(), "team/app", "v1");
    let dir = tempfile::tempdir().unwrap();
    let yaml = config(&reg.url(), dir.path(), "");
    let gw = Ocigate::start(&yaml);
    let url = |gw: &Ocigate| format!("{}/v2/c/app/blobs/{}", gw.url(), layer.digest);
    assert_eq!(
        get_streamed(&url(&gw), &[]).3.as_deref(),
        Ok(layer.digest.as_str())
    );
    drop(gw);
    // Flip bytes in the middle of the stored file (same size: only the digest can tell).
    let (_, hex) = layer.digest.split_once(':').unwrap();
    let file = dir.path().join("objects/sha256").join(&hex[..2]).join(hex);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();

    let gw = Ocigate::start(&yaml);
    let (_, _, _, first) = get_streamed(&url(&gw), &[]);
    assert!(
        first.is_err(),
        "a corrupt file must not reach a client whole: {first:?}"
    );
    assert_eq!(
        metric(&gw, "ocigate_cache_rejected_total{reason=\"corrupt\"}"),
        1
    );
    let (_, _, _, again) = get_streamed(&url(&gw), &[]);
    assert_eq!(again.as_deref(), Ok(layer.digest.as_str()));
    assert_eq!(
        reg.count_requests("GET", &format!("/v2/team/app/blobs/{}", layer.digest)),
        2,
        "fetched again after the corrupt copy was dropped"
    );

    // A truncated file (a disk that lost its tail) is caught the same way.
    drop(gw);
    let full = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(full / 2)
        .unwrap();
    let gw = Ocigate::start(&yaml);
    assert!(get_streamed(&url(&gw), &[]).3.is_err());
    let (_, _, n, again) = get_streamed(&url(&gw), &[]);
    assert_eq!((n, again.as_deref()), (full, Ok(layer.digest.as_str())));
    assert_eq!(
        reg.count_requests("GET", &format!("/v2/team/app/blobs/{}", layer.digest)),
        3
    );
}

#[test]
fn cached_objects_are_served_only_to_repositories_that_have_them() {
    let reg = Registry::start("");
    let img = image::image(&[("a", b"only in team/app\n")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let dir = tempfile::tempdir().unwrap();
    let gw = Ocigate::start(&config(&reg.url(), dir.path(), ""));
    let _ = skopeo_pull_oci(&format!("{}/c/app:v1", gw.host()), &[]);
    // The same digest in a repository that does not have it: the upstream says 404, and so
    // do we, although the bytes are on disk.
    let other = format!("{}/v2/c/other/blobs/{}", gw.url(), img.layer_digest);
    assert_eq!(http::get(&other).status, 404);
    assert_eq!(head(&other, &[]).status, 404);
    let other_manifest = format!("{}/v2/c/other/manifests/{}", gw.url(), img.digest);
    assert_eq!(http::get(&other_manifest).status, 404);
    assert!(
        reg.count_requests(
            "HEAD",
            &format!("/v2/team/other/blobs/{}", img.layer_digest)
        ) >= 1
    );
}

#[test]
fn warm_then_offline_serves_only_what_is_cached() {
    let mut reg = Registry::start("");
    let amd = image::image(&[("arch", b"amd64\n")], "amd64");
    let arm = image::image(&[("arch", b"arm64\n")], "arm64");
    let index = image::push_index(
        &reg.url(),
        "team/multi",
        "v1",
        &[(&amd, "amd64"), (&arm, "arm64")],
    );
    let dir = tempfile::tempdir().unwrap();
    let yaml = config(&reg.url(), dir.path(), "");
    let out = cache_cli(&yaml, &["warm", "c/multi:v1"]);
    assert!(
        out.contains("c/multi:v1: 3 manifests, 4 blobs cached"),
        "{out}"
    );
    for d in [&amd.layer_digest, &arm.layer_digest, &index] {
        assert!(cache_cli(&yaml, &["ls"]).contains(d.as_str()));
    }
    reg.stop();
    let offline = config(&reg.url(), dir.path(), "  offline: true\n");
    let gw = Ocigate::start(&offline);
    for arch in ["amd64", "arm64"] {
        let _ = skopeo_pull_oci(
            &format!("{}/c/multi:v1", gw.host()),
            &["--override-arch", arch],
        );
    }
    let r = http::get(&format!("{}/v2/c/multi/manifests/v2", gw.url()));
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");
    let r = http::get(&format!("{}/v2/c/multi/tags/list", gw.url()));
    assert_eq!(r.status, 503, "offline: nothing goes upstream");

    // prune: --older-than keeps what was just used; without it everything goes.
    drop(gw);
    assert!(cache_cli(&yaml, &["prune", "--older-than", "1h"]).starts_with("pruned 0 objects"));
    let pruned = cache_cli(&yaml, &["prune"]);
    assert!(pruned.starts_with("pruned 7 objects"), "{pruned}");
    assert!(object_files(dir.path()).is_empty());
}

#[test]
fn cache_routes_still_push_through() {
    let reg = Registry::start("");
    let dir = tempfile::tempdir().unwrap();
    let gw = Ocigate::start(&config(&reg.url(), dir.path(), ""));
    let img = image::image(&[("p", b"pushed\n")], "amd64");
    image::push_image(&gw.url(), "c/pushed", "v1", &img);
    let r = head(
        &format!("{}/v2/team/pushed/manifests/v1", reg.url()),
        &[("accept", OCI_MANIFEST)],
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        skopeo_digest(&format!("{}/c/pushed:v1", gw.host()), &[]),
        img.digest
    );
}

/// Client auth runs before the cache: what alice pulled into it is still refused to a client
/// without a token, and to bob, whose token does not cover the repository.
#[test]
fn the_cache_never_bypasses_client_auth() {
    let reg = Registry::start("");
    let img = image::image(&[("secret", b"alice's layer\n")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let keys =
        common::tokens::TokenServerFiles::new(&[("alice", "wonderland"), ("bob", "builder")]);
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "{}auth:\n  token: {{service: s.test, issuer: https://s.test}}\ntoken_server:\n  issuer: https://s.test\n  signing_key: {}\n  certificate: {}\n  users: {{htpasswd: {}}}\n  acl:\n    - {{account: alice, repository: \"*\", actions: [pull]}}\n    - {{account: bob, repository: \"public/*\", actions: [pull]}}\n",
        config(&reg.url(), dir.path(), ""),
        keys.path("token.key"),
        keys.path("token.crt"),
        keys.path("htpasswd"),
    );
    let gw = Ocigate::start(&yaml);
    let by_tag = format!("{}/c/app:v1", gw.host());
    assert_eq!(
        skopeo_digest(
            &by_tag,
            &["--tls-verify=false", "--creds", "alice:wonderland"]
        ),
        img.digest
    );
    let _ = skopeo_pull_oci(&by_tag, &["--src-creds", "alice:wonderland"]);
    assert!(cache_cli(&yaml, &["ls"]).contains(&img.layer_digest));

    let blob = format!("{}/v2/c/app/blobs/{}", gw.url(), img.layer_digest);
    let anonymous = http::get(&blob);
    assert_eq!(anonymous.status, 401);
    assert!(
        anonymous
            .header("www-authenticate")
            .unwrap()
            .starts_with("Bearer realm=")
    );
    let token_url = format!(
        "{}/token?service=s.test&scope=repository:c/app:pull",
        gw.url()
    );
    let bob = http::get_with(&token_url, &[("authorization", "Basic Ym9iOmJ1aWxkZXI=")]);
    assert_eq!(bob.status, 200, "{}", bob.text());
    let token = bob.json()["token"].as_str().unwrap().to_string();
    let refused = http::bearer_get(&blob, &token);
    assert_eq!(refused.status, 401, "bob's token does not cover c/app");
    assert_eq!(
        reg.count_requests("GET", &format!("/v2/team/app/blobs/{}", img.layer_digest)),
        1,
        "the refusals never reached the cache's fill either"
    );
}

/// A HEAD that misses stays a HEAD upstream (Docker Hub counts GETs), for manifests and blobs.
#[test]
fn head_misses_stay_heads() {
    let reg = Registry::start("");
    let img = image::image(&[("h", b"heads\n")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let dir = tempfile::tempdir().unwrap();
    let gw = Ocigate::start(&config(&reg.url(), dir.path(), ""));
    let manifest = format!("{}/v2/c/app/manifests/v1", gw.url());
    let r = head(&manifest, &[("accept", OCI_MANIFEST)]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("docker-content-digest").unwrap(), img.digest);
    let r = head(
        &format!("{}/v2/c/app/blobs/{}", gw.url(), img.layer_digest),
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        reg.count_requests("GET", "/v2/team/app/"),
        0,
        "{}",
        reg.log()
    );
    assert!(reg.count_requests("HEAD", "/v2/team/app/manifests/v1") >= 1);
    assert!(object_files(dir.path()).is_empty());
}

/// The docker CLI pulls through the cache, then again from it alone with the upstream gone.
#[test]
fn docker_pulls_cold_and_then_from_the_cache_alone() {
    if !common::docker_engine() {
        eprintln!("SKIP: no Docker Engine answers here");
        return;
    }
    let mut reg = Registry::start("");
    let img = image::image(&[("hello", b"docker through the cache\n")], "amd64");
    image::push_image(&reg.url(), "team/engine", "v1", &img);
    let dir = tempfile::tempdir().unwrap();
    let gw = Ocigate::start(&config(&reg.url(), dir.path(), ""));
    let reference = format!("{}/c/engine:v1", gw.host());
    let docker = |args: &[&str]| {
        let out = Command::new("docker").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "docker {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            gw.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(docker(&["pull", &reference]).contains(&img.digest));
    let _ = Command::new("docker")
        .args(["rmi", "-f", &reference])
        .output();
    reg.stop();
    assert!(docker(&["pull", &reference]).contains(&img.digest));
    let _ = Command::new("docker")
        .args(["rmi", "-f", &reference])
        .output();
}

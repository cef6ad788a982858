//! Mirror modes end to end: containerd (`ctr`, a private daemon) pulling through ocigate as a
//! `hosts.toml` mirror for two registries at once (routed by `?ns=`) and with
//! `override_path` and an in-path host; each fake registry host (`quay.test`,
//! `registry.test`) is a real `docker-registry` on 127.0.0.1, reached only through routes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::containerd::{Containerd, hosts_dir};
use common::{Ocigate, Registry, image};

/// Two registries behind host routes (the first cached), and a prefix route beside them.
struct Mirrors {
    quay: Registry,
    other: Registry,
    gw: Ocigate,
    _cache: tempfile::TempDir,
}

fn mirrors() -> Mirrors {
    let quay = Registry::start("");
    let other = Registry::start("");
    let cache = tempfile::tempdir().unwrap();
    let config = format!(
        r#"server: {{ listen: "127.0.0.1:0" }}
upstreams:
  quay: {{ url: "{}" }}
  other: {{ url: "{}" }}
routes:
  - {{ host: quay.test, upstream: quay, cache: true }}
  - {{ host: registry.test, upstream: other, remote: "mirror/" }}
  - {{ prefix: "", upstream: other }}
cache: {{ dir: "{}" }}
"#,
        quay.url(),
        other.url(),
        cache.path().display()
    );
    let gw = Ocigate::start(&config);
    Mirrors {
        quay,
        other,
        gw,
        _cache: cache,
    }
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

//! End-to-end: an upstream whose blobs redirect to object storage (distribution's `redirect`
//! storage middleware, storage served by the tests' static server), with `pass` and `follow`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::http::{get, head};
use common::image;
use common::servers::{StaticServer, TokenServer};
use common::{Ocigate, Registry, simple_config, skopeo_pull_oci};

struct Setup {
    reg: Registry,
    storage: StaticServer,
    ts: TokenServer,
    img: image::Image,
}

/// A token-auth registry whose blob reads redirect to a storage server.
fn setup() -> Setup {
    let mut reg = Registry::start("");
    let img = image::image(&[("hello", b"redirected bytes\n")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let storage = StaticServer::start(reg.storage());
    let ts = TokenServer::start(Some(("u", "p")));
    reg.reconfigure(&format!(
        "{}middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: {}\n",
        ts.registry_auth_yaml(),
        storage.url()
    ));
    Setup {
        reg,
        storage,
        ts,
        img,
    }
}

fn gateway(s: &Setup, policy: &str) -> Ocigate {
    let extra = format!(
        "    redirects: {policy}\n    credentials:\n      basic: {{username: u, password: p}}\n    allowed_realms: [\"{}\"]\n",
        s.ts.realm()
    );
    Ocigate::start(&simple_config(&s.reg.url(), "mirror/", "team/", &extra))
}

#[test]
fn pass_hands_the_redirect_to_the_client() {
    let s = setup();
    let gw = gateway(&s, "pass");
    let layer = image::digest(&s.img.layers[0]);
    let r = get(&format!("{}/v2/mirror/app/blobs/{layer}", gw.url()));
    assert_eq!(r.status, 307);
    let location = r.header("location").unwrap();
    assert!(location.starts_with(&s.storage.url()), "{location}");
    assert!(
        s.storage.requests().is_empty(),
        "the proxy itself must not fetch the blob"
    );
    // A real client follows it to storage and gets verified bytes.
    skopeo_pull_oci(&format!("{}/mirror/app:v1", gw.host()), &[]);
    assert!(!s.storage.requests().is_empty());
}

#[test]
fn follow_streams_storage_through_the_proxy_without_credentials() {
    let s = setup();
    let gw = gateway(&s, "follow");
    let layer = image::digest(&s.img.layers[0]);
    let r = get(&format!("{}/v2/mirror/app/blobs/{layer}", gw.url()));
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], &s.img.layers[0][..]);
    let h = head(&format!("{}/v2/mirror/app/blobs/{layer}", gw.url()), &[]);
    assert_eq!(h.status, 200);
    assert_eq!(
        h.header("content-length"),
        Some(s.img.layers[0].len().to_string())
    );
    skopeo_pull_oci(&format!("{}/mirror/app:v1", gw.host()), &[]);
    let requests = s.storage.requests();
    assert!(
        requests.len() >= 3,
        "blob reads went to storage via the proxy: {requests:?}"
    );
    assert!(
        requests.iter().all(|(_, auth)| auth.is_none()),
        "Authorization must be dropped when following redirects: {requests:?}"
    );
    // The upstream did see authorised requests (its realm demands credentials).
    assert!(s.ts.requests().iter().all(|r| r.authorization.is_some()));
}

/// Redirects and token realms that lead off the upstream's own network are not followed:
/// `0.0.0.0` dials the local host from anywhere, as `169.254.169.254` or a private address
/// would reach the proxy's own network. Unless `allowed_redirects` names them.
#[test]
fn redirects_and_realms_off_the_upstreams_network_are_refused() {
    let mut reg = Registry::start("");
    let img = image::image(&[("x", b"not for the metadata service\n")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let storage = StaticServer::start(reg.storage());
    let sneaky = storage.url().replace("127.0.0.1", "0.0.0.0");
    reg.reconfigure(&format!(
        "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: {sneaky}\n"
    ));
    let layer = image::digest(&img.layers[0]);
    let refused = Ocigate::start(&simple_config(
        &reg.url(),
        "mirror/",
        "team/",
        "    redirects: follow\n",
    ));
    let r = get(&format!("{}/v2/mirror/app/blobs/{layer}", refused.url()));
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("allowed_redirects"), "{}", r.text());
    assert!(
        storage.requests().is_empty(),
        "nothing was fetched from 0.0.0.0"
    );

    let allowed = Ocigate::start(&simple_config(
        &reg.url(),
        "mirror/",
        "team/",
        &format!("    redirects: follow\n    allowed_redirects: [\"{sneaky}\"]\n"),
    ));
    let r = get(&format!("{}/v2/mirror/app/blobs/{layer}", allowed.url()));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(&r.body[..], &img.layers[0][..]);

    // A realm there is not asked either.
    let ts = TokenServer::start(None);
    reg.reconfigure(&ts.registry_auth_yaml().replace("127.0.0.1", "0.0.0.0"));
    let gw = Ocigate::start(&simple_config(&reg.url(), "mirror/", "team/", ""));
    let r = get(&format!("{}/v2/mirror/app/manifests/v1", gw.url()));
    assert!(r.status >= 400, "{}", r.status);
    assert!(ts.requests().is_empty(), "the realm on 0.0.0.0 was asked");
    assert!(gw.wait_for_log("token realm not asked"));
}

/// Review finding: a blob HEAD that a cache route passes upstream (nothing cached yet)
/// follows the redirect as the upstream's `redirects: follow` says, like any other route.
#[test]
fn follow_holds_on_cache_routes_too() {
    let s = setup();
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:0\"\ncache:\n  dir: {}\nupstreams:\n  reg:\n    url: \"{}\"\n    redirects: follow\n    credentials:\n      basic: {{username: u, password: p}}\n    allowed_realms: [\"{}\"]\nroutes:\n  - {{prefix: \"c/\", upstream: reg, remote: \"team/\", cache: true}}\n",
        dir.path().display(),
        s.reg.url(),
        s.ts.realm()
    );
    let gw = Ocigate::start(&yaml);
    let layer = image::digest(&s.img.layers[0]);
    let h = head(&format!("{}/v2/c/app/blobs/{layer}", gw.url()), &[]);
    assert_eq!(h.status, 200, "{:?}", h.header("location"));
    assert!(h.header("location").is_none());
    assert!(
        s.storage.requests().iter().all(|(_, auth)| auth.is_none()),
        "no credentials to storage"
    );
    skopeo_pull_oci(&format!("{}/c/app:v1", gw.host()), &[]);
}

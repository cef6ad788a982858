//! End-to-end: blob bodies spliced between plain sockets (real `docker-registry`, real
//! `ocigate`). Every byte is checked against the registry's own answer, and
//! `ocigate_spliced_bytes_total` tells whether the bytes really bypassed user space.

mod common;

use common::http::{self, get_streamed_by};
use common::image::BigLayer;
use common::{Ocigate, Registry, simple_config};

fn spliced_bytes(gw: &Ocigate) -> u64 {
    http::get(&format!("{}/metrics", gw.url()))
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("ocigate_spliced_bytes_total "))
        .map_or(0, |v| v.trim().parse().unwrap())
}

struct Setup {
    reg: Registry,
    gw: Ocigate,
    big: BigLayer,
}

impl Setup {
    fn new(size: u64) -> Setup {
        let reg = Registry::start("");
        let big = BigLayer::new(size, 3);
        big.push_image(&reg.url(), "team/big", "v1");
        let gw = Ocigate::start(&simple_config(&reg.url(), "mirror/", "team/", ""));
        Setup { reg, gw, big }
    }

    fn proxied(&self) -> String {
        format!("{}/v2/mirror/big/blobs/{}", self.gw.url(), self.big.digest)
    }

    fn direct(&self) -> String {
        format!("{}/v2/team/big/blobs/{}", self.reg.url(), self.big.digest)
    }
}

#[test]
fn large_blobs_are_spliced_intact_on_one_connection() {
    let s = Setup::new(48 << 20);
    let client = http::client();
    for round in 1..=2u64 {
        // Twice over one keep-alive connection: the pipe is reused, and empty between bodies.
        let (status, headers, n, digest) = get_streamed_by(&client, &s.proxied(), &[]);
        assert_eq!((status, n), (200, s.big.size), "round {round}");
        assert_eq!(digest.unwrap(), s.big.digest, "round {round}");
        assert_eq!(headers["content-length"], s.big.size.to_string().as_str());
        // All but what arrived with the upstream's response head went through the pipe.
        let spliced = spliced_bytes(&s.gw);
        assert!(
            spliced <= round * s.big.size && spliced + (64 << 10) >= round * s.big.size,
            "round {round}: {spliced} of {} bytes spliced",
            round * s.big.size
        );
    }
}

#[test]
fn ranges_are_spliced_as_the_registry_serves_them() {
    let s = Setup::new(8 << 20);
    let range = [("range", "bytes=1000-5000999")];
    let direct = get_streamed_by(&http::client(), &s.direct(), &range);
    let before = spliced_bytes(&s.gw);
    let proxied = get_streamed_by(&http::client(), &s.proxied(), &range);
    assert_eq!((direct.0, direct.2), (206, 5_000_000));
    assert_eq!((proxied.0, proxied.2), (206, 5_000_000));
    assert_eq!(proxied.3.unwrap(), direct.3.unwrap());
    assert_eq!(proxied.1["content-range"], direct.1["content-range"]);
    assert!(spliced_bytes(&s.gw) - before > 4 << 20);
}

#[test]
fn small_blobs_and_http2_are_copied() {
    let s = Setup::new(8 << 20);
    // HTTP/2 frames its bodies: nothing can be spliced into those.
    let (status, _, n, digest) = get_streamed_by(&http::h2c_client(), &s.proxied(), &[]);
    assert_eq!((status, n), (200, s.big.size));
    assert_eq!(digest.unwrap(), s.big.digest);
    assert_eq!(spliced_bytes(&s.gw), 0);
    // A config blob of a few hundred bytes is copied too.
    let manifest = http::get_with(
        &format!("{}/v2/mirror/big/manifests/v1", s.gw.url()),
        &[("accept", common::image::OCI_MANIFEST)],
    )
    .json();
    let config = manifest["config"]["digest"].as_str().unwrap().to_string();
    let url = format!("{}/v2/mirror/big/blobs/{config}", s.gw.url());
    let (status, _, _, digest) = get_streamed_by(&http::client(), &url, &[]);
    assert_eq!((status, digest.unwrap()), (200, config));
    assert_eq!(spliced_bytes(&s.gw), 0);
}

#[test]
fn a_client_hanging_up_mid_blob_leaves_the_gateway_serving() {
    let s = Setup::new(64 << 20);
    http::rt().block_on(async {
        use http_body_util::BodyExt;
        let client = http::client();
        let req = ::http::Request::get(s.proxied())
            .body(http::full(bytes::Bytes::new()))
            .unwrap();
        let mut body = client.request(req).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
        // Gone after the first frame, with most of the blob still in flight.
    });
    // The half-read upstream connection must not go back to the pool: the next blob GET
    // would read the rest of the first one.
    let (status, _, n, digest) = get_streamed_by(&http::client(), &s.proxied(), &[]);
    assert_eq!((status, n), (200, s.big.size));
    assert_eq!(digest.unwrap(), s.big.digest);
}

//! End-to-end: the Dockerfile's runtime stage as a real container on the local Docker
//! Engine: `FROM scratch`, static binary, non-root, serving pulls, stopping cleanly.
//!
//! The engine here cannot pull the Rust build image, so the test builds the static musl
//! binary itself and feeds the Dockerfile's own runtime stage from a local directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::http::get;
use common::image::{self, OCI_MANIFEST};
use common::{Registry, free_port, run_ok, skopeo_digest, skopeo_pull_oci};

const MUSL: &str = "x86_64-unknown-linux-musl";

fn musl_ready() -> bool {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(MUSL));
    installed && common::have("x86_64-linux-musl-gcc")
}

/// The runtime stage of the real Dockerfile, reading `out/` from the build context.
fn runtime_stage(dockerfile: &str) -> String {
    let start = dockerfile
        .find("FROM scratch AS runtime")
        .expect("the Dockerfile has a `FROM scratch AS runtime` stage");
    let stage = &dockerfile[start..];
    assert!(stage.contains("COPY --from=build /out/ /"));
    stage.replace("--from=build ", "").replace(" /out", " out")
}

#[test]
fn the_image_runs_as_non_root_serves_pulls_and_stops_cleanly() {
    if !common::docker_engine() {
        eprintln!("SKIP: no Docker Engine answers here");
        return;
    }
    if !musl_ready() {
        eprintln!("SKIP: needs `rustup target add {MUSL}` and musl-tools");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    run_ok(
        Command::new(env!("CARGO"))
            .current_dir(root)
            .args(["build", "--quiet", "--bin", "ocigate", "--target", MUSL]),
    );
    let binary = root.join("target").join(MUSL).join("debug/ocigate");

    let ctx = tempfile::tempdir().unwrap();
    let out = ctx.path().join("out");
    std::fs::create_dir_all(out.join("etc/ssl/certs")).unwrap();
    std::fs::copy(&binary, out.join("ocigate")).unwrap();
    let _ = std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        out.join("etc/ssl/certs/ca-certificates.crt"),
    );
    std::fs::write(
        out.join("etc/passwd"),
        "ocigate:x:65532:65532:ocigate:/:/nonexistent\n",
    )
    .unwrap();
    std::fs::write(out.join("etc/group"), "ocigate:x:65532:\n").unwrap();
    std::fs::create_dir_all(ctx.path().join("out-cache")).unwrap();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), runtime_stage(&dockerfile)).unwrap();
    let tag = format!("ocigate-test:{}", std::process::id());
    run_ok(
        Command::new("docker")
            .args(["build", "-q", "-t", &tag])
            .arg(ctx.path()),
    );

    let reg = Registry::start("");
    let img = image::image(&[("hello", b"served from a container\n")], "amd64");
    image::push_image(&reg.url(), "team/app", "v1", &img);
    let port = free_port();
    let config = ctx.path().join("ocigate.yaml");
    std::fs::write(
        &config,
        format!(
            "server:\n  listen: \"127.0.0.1:{port}\"\ncache: {{dir: /var/cache/ocigate}}\nupstreams:\n  reg: {{url: \"{}\"}}\nroutes:\n  - {{prefix: \"mirror/\", upstream: reg, remote: \"team/\", cache: true}}\n",
            reg.url()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let name = format!("ocigate-test-{}", std::process::id());
    let started = run_ok(Command::new("docker").args([
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "host",
        "-v",
        &format!("{}:/etc/ocigate.yaml:ro", config.display()),
        "-e",
        "OCIGATE_CONFIG=/etc/ocigate.yaml",
        &tag,
    ]));
    assert!(!started.stdout.is_empty());
    let cleanup = || {
        let _ = Command::new("docker").args(["rm", "-f", &name]).output();
        let _ = Command::new("docker").args(["rmi", "-f", &tag]).output();
    };

    let addr = format!("127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..200 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            ready = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if !ready {
        let logs = Command::new("docker")
            .args(["logs", &name])
            .output()
            .unwrap();
        cleanup();
        panic!(
            "container did not listen: {}",
            String::from_utf8_lossy(&logs.stderr)
        );
    }
    assert_eq!(get(&format!("http://{addr}/healthz")).status, 200);
    assert_eq!(
        skopeo_digest(&format!("{addr}/mirror/app:v1"), &[]),
        img.digest
    );
    let h = common::http::head(
        &format!("http://{addr}/v2/mirror/app/manifests/v1"),
        &[("accept", OCI_MANIFEST)],
    );
    assert_eq!(h.status, 200);

    let user =
        run_ok(Command::new("docker").args(["inspect", "--format", "{{.Config.User}}", &name]));
    assert_eq!(String::from_utf8_lossy(&user.stdout).trim(), "65532:65532");
    // The cache is the image's volume, writable by that user: a second pull takes no blob
    // from the registry.
    skopeo_pull_oci(&format!("{addr}/mirror/app:v1"), &[]);
    let blob_gets = reg.count_requests("GET", "/blobs/");
    assert!(blob_gets >= 2, "config and layer filled the cache");
    skopeo_pull_oci(&format!("{addr}/mirror/app:v1"), &[]);
    assert_eq!(reg.count_requests("GET", "/blobs/"), blob_gets);
    let volumes = run_ok(Command::new("docker").args([
        "inspect",
        "--format",
        "{{json .Config.Volumes}}",
        &name,
    ]));
    assert!(String::from_utf8_lossy(&volumes.stdout).contains("/var/cache/ocigate"));
    run_ok(Command::new("docker").args(["stop", "-t", "20", &name]));
    let exit =
        run_ok(Command::new("docker").args(["inspect", "--format", "{{.State.ExitCode}}", &name]));
    let logs = Command::new("docker")
        .args(["logs", &name])
        .output()
        .unwrap();
    cleanup();
    assert_eq!(
        String::from_utf8_lossy(&exit.stdout).trim(),
        "0",
        "SIGTERM must end ocigate cleanly"
    );
    let logs = String::from_utf8_lossy(&logs.stderr);
    assert!(logs.contains("\"message\":\"shutting down"), "{logs}");
    assert!(
        logs.contains("\"target\":\"ocigate::access\""),
        "JSON access log expected: {logs}"
    );
}

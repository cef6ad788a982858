//! End-to-end: cloud credential providers behind `credentials:`. ECR through the AWS SDK
//! against moto's ECR emulator, with the real `docker-registry` demanding the password the
//! emulator hands out; Google service-account keys sent as `_json_key` to a token realm;
//! `auto` choosing by host name; and a build without the `ecr` feature refusing ECR configs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine as _;
use common::servers::TokenServer;
use common::{Ocigate, Registry, check_config, htpasswd_auth, simple_config, skopeo_digest};

/// What moto hands out for registry 111122223333.
#[cfg(feature = "ecr")]
const ECR_PASSWORD: &str = "111122223333-auth-token";

const SA_KEY: &str = r#"{"type":"service_account","project_id":"proj","private_key_id":"k1","private_key":"-----BEGIN PRIVATE KEY-----\nMIIEfake\n-----END PRIVATE KEY-----\n","client_email":"puller@proj.iam.gserviceaccount.com"}"#;

/// The count of one `ocigate_credential_refreshes_total` series, 0 when absent.
#[cfg(feature = "ecr")]
fn refreshes(gw: &Ocigate, result: &str) -> u64 {
    let metrics = common::http::get(&format!("{}/metrics", gw.url())).text();
    let series = format!(
        "ocigate_credential_refreshes_total{{provider=\"ecr\",upstream=\"reg\",result=\"{result}\"}} "
    );
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Polls `/metrics` until `done` holds, for at most `secs` seconds.
#[cfg(feature = "ecr")]
fn wait_for_refreshes(gw: &Ocigate, secs: u64, done: impl Fn(&Ocigate) -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if done(gw) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    done(gw)
}

#[cfg(feature = "ecr")]
fn ecr_upstream(extra: &str) -> String {
    format!(
        "    credentials:\n      ecr:\n        region: us-east-1\n        registry_ids: [\"111122223333\"]\n{extra}"
    )
}

#[cfg(feature = "ecr")]
#[test]
fn ecr_tokens_from_the_sdk_pull_refresh_and_survive_an_outage() {
    let mut emulator = common::EcrEmulator::start();
    let (reg, img) = Registry::seeded(|r| htpasswd_auth(r.dir.path(), "AWS", ECR_PASSWORD));
    let reference = format!("{}/v2/team/app/manifests/v1", reg.url());
    assert_eq!(
        common::http::head(&reference, &[]).status,
        401,
        "the upstream must really demand the ECR password"
    );
    let env = emulator.sdk_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // The default refresh (6h): one token at start, and moto's 2015 `expiresAt` must not
    // turn into a refresh loop.
    let config = simple_config(&reg.url(), "ecr/", "team/", &ecr_upstream(""));
    let gw = Ocigate::start_with(&config, &env);
    assert_eq!(
        skopeo_digest(&format!("{}/ecr/app:v1", gw.host()), &[]),
        img.digest
    );
    assert_eq!(refreshes(&gw, "ok"), 1, "{}", gw.logs());
    assert!(
        gw.wait_for_log("expiresAt is already past"),
        "{}",
        gw.logs()
    );
    let logs = gw.logs();
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("AWS:{ECR_PASSWORD}"));
    assert!(
        !logs.contains(ECR_PASSWORD) && !logs.contains(&encoded),
        "the token was logged: {logs}"
    );
    assert!(logs.contains("upstream credentials refreshed"), "{logs}");
    drop(gw);

    // A short refresh: refreshes keep coming, each counted.
    let config = simple_config(
        &reg.url(),
        "ecr/",
        "team/",
        &ecr_upstream("        refresh: 1s\n"),
    );
    let gw = Ocigate::start_with(&config, &env);
    assert!(
        wait_for_refreshes(&gw, 30, |gw| refreshes(gw, "ok") >= 3),
        "refreshes: {}",
        refreshes(&gw, "ok")
    );

    // The emulator goes away: refreshes fail, pulls go on with the cached token.
    emulator.stop();
    assert!(
        wait_for_refreshes(&gw, 60, |gw| refreshes(gw, "error") >= 1),
        "{}",
        gw.logs()
    );
    assert!(gw.wait_for_log("upstream credential refresh failed"));
    assert_eq!(
        skopeo_digest(&format!("{}/ecr/app:v1", gw.host()), &[]),
        img.digest
    );

    // No emulator at start and no fall-back: ocigate refuses to start, and says why.
    let (status, log) = Ocigate::start_fails(&config, &env);
    assert!(!status.success());
    assert!(
        log.contains("upstream reg: ecr: GetAuthorizationToken"),
        "{log}"
    );
    assert!(!log.contains("listening"), "{log}");

    // With a `static` token it starts on that, and pulls work.
    let fallback = format!("        static: \"{encoded}\"\n");
    let config = simple_config(&reg.url(), "ecr/", "team/", &ecr_upstream(&fallback));
    let gw = Ocigate::start_with(&config, &env);
    assert!(gw.wait_for_log("using the static token"), "{}", gw.logs());
    assert_eq!(
        skopeo_digest(&format!("{}/ecr/app:v1", gw.host()), &[]),
        img.digest
    );
}

#[test]
fn gcp_service_account_key_is_sent_as_json_key_to_the_realm() {
    let ts = TokenServer::start(Some(("_json_key", SA_KEY)));
    let (reg, img) = Registry::seeded(|_| ts.registry_auth_yaml());
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("sa.json");
    std::fs::write(&key, format!("{SA_KEY}\n")).unwrap();
    let creds = format!(
        "    credentials:\n      gcp: {{}}\n    allowed_realms: [\"{}\"]\n",
        ts.realm()
    );
    let gw = Ocigate::start_with(
        &simple_config(&reg.url(), "gar/", "team/", &creds),
        &[("GOOGLE_APPLICATION_CREDENTIALS", key.to_str().unwrap())],
    );
    assert_eq!(
        skopeo_digest(&format!("{}/gar/app:v1", gw.host()), &[]),
        img.digest
    );
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("_json_key:{SA_KEY}"))
    );
    let requests = ts.requests();
    assert!(!requests.is_empty());
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.as_deref() == Some(expected.as_str())),
        "{requests:?}"
    );
    assert!(!gw.logs().contains("MIIEfake"), "the key was logged");
}

#[test]
fn auto_uses_the_docker_config_for_a_plain_registry() {
    let (reg, img) = Registry::seeded(|r| htpasswd_auth(r.dir.path(), "puller", "pullpass"));
    let docker = tempfile::tempdir().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode("puller:pullpass");
    std::fs::write(
        docker.path().join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.host()),
    )
    .unwrap();
    let config = simple_config(&reg.url(), "m/", "team/", "    credentials: auto\n");
    let gw = Ocigate::start_with(
        &config,
        &[("DOCKER_CONFIG", docker.path().to_str().unwrap())],
    );
    assert_eq!(
        skopeo_digest(&format!("{}/m/app:v1", gw.host()), &[]),
        img.digest
    );
    // Without a docker config, `auto` is anonymous and the registry refuses.
    let empty = tempfile::tempdir().unwrap();
    let gw = Ocigate::start_with(
        &config,
        &[("DOCKER_CONFIG", empty.path().to_str().unwrap())],
    );
    let r = common::http::head(&format!("{}/v2/m/app/manifests/v1", gw.url()), &[]);
    assert!(matches!(r.status, 401 | 403), "{}", r.status);
}

/// `check-config` says what `auto` picked for each host form, without secrets.
#[test]
fn check_config_reports_what_auto_picks() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("sa.json");
    std::fs::write(&key, SA_KEY).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"auths":{"registry.example.com":{"auth":"dTpzZWtyaXQ="}}}"#,
    )
    .unwrap();
    let yaml = "upstreams:\n  aws:\n    url: https://111122223333.dkr.ecr.eu-west-1.amazonaws.com\n    credentials: auto\n  gar:\n    url: https://europe-docker.pkg.dev\n    credentials: auto\n  other:\n    url: https://registry.example.com\n    credentials: auto\nroutes:\n  - {prefix: \"a/\", upstream: aws}\n  - {prefix: \"g/\", upstream: gar}\n  - {prefix: \"\", upstream: other}\n";
    let (ok, stdout, stderr) = check_config(
        yaml,
        &[
            ("GOOGLE_APPLICATION_CREDENTIALS", key.to_str().unwrap()),
            ("DOCKER_CONFIG", dir.path().to_str().unwrap()),
        ],
    );
    if cfg!(feature = "ecr") {
        assert!(ok, "{stderr}");
        for expected in [
            "aws          auto: ecr (region eu-west-1, registries 111122223333,",
            "gar          auto: gcp (service account puller@proj.iam.gserviceaccount.com,",
            "other        auto: docker_config",
            "(an auths entry)",
        ] {
            assert!(stdout.contains(expected), "{expected:?} in {stdout}");
        }
        assert!(
            !stdout.contains("sekrit") && !stdout.contains("MIIEfake"),
            "{stdout}"
        );
    } else {
        assert!(!ok);
        assert!(
            stderr.contains("upstream aws: ECR credentials need the `ecr` feature"),
            "{stderr}"
        );
    }
}

/// A config naming `ecr` fails `check-config` with a line number in a build without the
/// feature, and is accepted (and summarised) in one with it.
#[test]
fn ecr_config_needs_the_feature() {
    let (ok, stdout, stderr) = check_config(
        "upstreams:\n  ecr:\n    url: https://111122223333.dkr.ecr.us-east-1.amazonaws.com\n    credentials:\n      ecr:\n        refresh: 30m\nroutes:\n  - {prefix: \"\", upstream: ecr}\n",
        &[],
    );
    if cfg!(feature = "ecr") {
        assert!(ok, "{stderr}");
        assert!(
            stdout.contains("ecr (region us-east-1, registries 111122223333, profile default chain, refresh every 30m)"),
            "{stdout}"
        );
    } else {
        assert!(!ok);
        assert!(
            stderr.contains("bad.yaml:6:9: upstreams.ecr.credentials.ecr: this ocigate was built without the `ecr` feature"),
            "{stderr}"
        );
    }
}

/// A provider that cannot deliver is reported before ocigate takes traffic: a credential
/// helper that does not run stops `serve`; a key file that is not there fails `check-config`.
#[test]
fn broken_providers_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let docker_config = dir.path().join("config.json");
    std::fs::write(
        &docker_config,
        r#"{"credHelpers":{"127.0.0.1:1":"ocigate-test-missing"}}"#,
    )
    .unwrap();
    let creds = format!(
        "    credentials:\n      docker_config: {}\n",
        docker_config.display()
    );
    let (status, log) =
        Ocigate::start_fails(&simple_config("http://127.0.0.1:1", "m/", "", &creds), &[]);
    assert!(!status.success());
    assert!(
        log.contains("credential helper docker-credential-ocigate-test-missing: cannot run"),
        "{log}"
    );
    assert!(!log.contains("listening"), "{log}");

    let missing = dir.path().join("missing.json");
    let (ok, _, stderr) = check_config(
        &simple_config(
            "https://gcr.io",
            "g/",
            "",
            "    credentials:\n      gcp: {}\n",
        ),
        &[("GOOGLE_APPLICATION_CREDENTIALS", missing.to_str().unwrap())],
    );
    assert!(!ok);
    assert!(
        stderr.contains("upstream reg: gcp key file")
            && stderr.contains("missing.json: cannot read"),
        "{stderr}"
    );
}

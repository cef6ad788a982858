//! Shared end-to-end fixtures: the real CNCF registry (`docker-registry`), the real
//! `ocigate` binary, real clients (skopeo, podman, docker), an HTTP client, image builders,
//! and small servers of the tests' own (token realm, object storage). All on 127.0.0.1
//! with ports chosen at run time.
#![allow(dead_code)]

pub mod containerd;
pub mod dockerd;
pub mod http;
pub mod image;
pub mod servers;
pub mod tokens;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// A port free right now on 127.0.0.1 (for programs that cannot report the port they bound).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Panics with the tool's output unless it succeeded.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// skopeo with no stored credentials: the machine-wide auth file (where `podman login`
/// writes) would otherwise leak logins from earlier runs on a reused port.
fn skopeo_command(args: &[&str]) -> Command {
    let mut c = Command::new("skopeo");
    c.env("REGISTRY_AUTH_FILE", "/nonexistent/ocigate-tests/auth.json")
        .args(["--insecure-policy"])
        .args(args);
    c
}

pub fn skopeo(args: &[&str]) -> Output {
    skopeo_command(args).output().expect("skopeo runs")
}

pub fn skopeo_ok(args: &[&str]) -> Output {
    run_ok(&mut skopeo_command(args))
}

/// The digest skopeo reports for `docker://reference` (plain HTTP unless `extra` says
/// otherwise, e.g. `--cert-dir`).
pub fn skopeo_digest(reference: &str, extra: &[&str]) -> String {
    let target = format!("docker://{reference}");
    let mut args = vec!["inspect", "--format", "{{.Digest}}"];
    if extra.is_empty() {
        args.push("--tls-verify=false");
    }
    args.extend_from_slice(extra);
    args.push(&target);
    String::from_utf8_lossy(&skopeo_ok(&args).stdout)
        .trim()
        .to_string()
}

/// Copies `docker://reference` into a fresh OCI layout at `<dir>/out`, layers kept as they
/// are, so blob files can be compared with what was pushed.
pub fn skopeo_pull_oci(reference: &str, extra: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let source = format!("docker://{reference}");
    let dest = format!("oci:{}:pulled", dir.path().join("out").display());
    let mut args = vec![
        "copy",
        "--src-tls-verify=false",
        "--dest-oci-accept-uncompressed-layers",
    ];
    args.extend_from_slice(extra);
    args.push(&source);
    args.push(&dest);
    skopeo_ok(&args);
    dir
}

/// A podman with its own storage (vfs) under a temporary directory.
pub struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    pub fn new() -> Podman {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("auth.json"), r#"{"auths":{}}"#).unwrap();
        Podman { dir }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let root = self.dir.path().join("root");
        let runroot = self.dir.path().join("runroot");
        let mut c = Command::new("podman");
        // Logins stay with this podman, not in the machine-wide auth file.
        c.env("REGISTRY_AUTH_FILE", self.dir.path().join("auth.json"))
            .arg("--storage-driver")
            .arg("vfs")
            .arg("--root")
            .arg(root)
            .arg("--runroot")
            .arg(runroot)
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "none"])
            .args(args);
        c
    }
}

/// The Docker Engine's CLI, if an engine answers.
pub fn docker_engine() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A self-signed certificate for `localhost` and 127.0.0.1, written as `tls.crt` and `tls.key`
/// into its own directory.
pub struct TestCert {
    pub cert: rcgen::Certificate,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCert {
    pub fn new() -> TestCert {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        TestCert {
            cert,
            cert_path,
            key_path,
            _dir: dir,
        }
    }
}

/// A `docker-registry` (CNCF distribution) process with its own storage.
pub struct Registry {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    log: PathBuf,
}

impl Registry {
    /// Starts a registry; `extra` is YAML appended to its config (auth, middleware, …).
    pub fn start(extra: &str) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let (child, port) = Registry::spawn(&dir, None, extra);
        let log = dir.path().join("registry.log");
        Registry {
            child,
            port,
            dir,
            log,
        }
    }

    /// A registry holding `team/app:v1` (one small layer), then locked behind `auth`.
    pub fn seeded(auth: impl FnOnce(&Registry) -> String) -> (Registry, image::Image) {
        let mut reg = Registry::start("");
        let img = image::image(&[("hello", b"private bytes\n")], "amd64");
        image::push_image(&reg.url(), "team/app", "v1", &img);
        let extra = auth(&reg);
        reg.reconfigure(&extra);
        (reg, img)
    }

    /// Restarts on the same storage (and port, if still free) with another config tail:
    /// tests seed content into an open registry, then lock it with auth or add redirects.
    pub fn reconfigure(&mut self, extra: &str) {
        self.stop();
        let (child, port) = Registry::spawn(&self.dir, Some(self.port), extra);
        self.child = child;
        self.port = port;
    }

    /// Starts `docker-registry` and waits until *it* says it listens. A port found free can
    /// be handed to a parallel test's process before the registry binds it: then the registry
    /// exits and is started again on another port.
    fn spawn(dir: &tempfile::TempDir, port: Option<u16>, extra: &str) -> (Child, u16) {
        let log = dir.path().join("registry.log");
        let mut port = port.unwrap_or_else(free_port);
        for _ in 0..5 {
            let storage = dir.path().join("storage");
            let config = format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}",
                storage.display()
            );
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config).unwrap();
            let log_file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap();
            let logged_before = log_file.metadata().unwrap().len() as usize;
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .expect("docker-registry runs (apt-get install docker-registry)");
            let ready = format!("listening on 127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text
                    .get(logged_before..)
                    .is_some_and(|new| new.contains(&ready))
                {
                    return (child, port);
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "docker-registry did not start: {text}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            port = free_port();
        }
        panic!(
            "docker-registry could not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines of the access log that match method and path fragment.
    pub fn count_requests(&self, method: &str, path_part: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains(&format!("\"{method} ")) && l.contains(path_part))
            .count()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `ocigate` binary under test, running with a config file of the test's.
pub struct Ocigate {
    child: Child,
    pub addr: SocketAddr,
    logs: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Ocigate {
    pub fn bin() -> &'static str {
        env!("CARGO_BIN_EXE_ocigate")
    }

    /// Starts `ocigate serve --config` with this YAML; the YAML should listen on
    /// `127.0.0.1:0` so the port is chosen at run time and read back from the log.
    pub fn start(config: &str) -> Ocigate {
        Ocigate::start_with(config, &[])
    }

    pub fn start_with(config: &str, env: &[(&str, &str)]) -> Ocigate {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ocigate.yaml");
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new(Ocigate::bin());
        cmd.arg("serve").arg("--config").arg(&path);
        Ocigate::spawn(cmd, env, dir)
    }

    /// Starts `ocigate serve` with arbitrary arguments (quick mode).
    pub fn start_args(args: &[&str], env: &[(&str, &str)]) -> Ocigate {
        let mut cmd = Command::new(Ocigate::bin());
        cmd.arg("serve").args(args);
        Ocigate::spawn(cmd, env, tempfile::tempdir().unwrap())
    }

    fn spawn(mut cmd: Command, env: &[(&str, &str)], dir: tempfile::TempDir) -> Ocigate {
        cmd.arg("--log-format")
            .arg("json")
            .env_remove("OCIGATE_CONFIG")
            .env_remove("REGISTRY_HOST")
            .env_remove("REPO_PREFIX")
            .env("OCIGATE_LOG", "debug,hyper=info,h2=info,rustls=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("ocigate runs");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["message"] == "listening"
                    && let Some(a) = v["addr"].as_str()
                {
                    let _ = tx.send(a.parse::<SocketAddr>().unwrap());
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("ocigate did not start: {}", logs.lock().unwrap());
            }
        };
        Ocigate {
            child,
            addr,
            logs,
            _dir: dir,
        }
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// The forward proxy's `host:port` (its listener logs it before `ready`).
    pub fn forward_proxy(&self) -> String {
        assert!(
            self.wait_for_log("ready"),
            "ocigate not ready: {}",
            self.logs()
        );
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "forward proxy listening")
            .and_then(|v| v["addr"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("no forward proxy listening: {}", self.logs()))
    }

    /// Whether a log line containing `needle` arrives within 10 s. Lines reach the test
    /// through a reader thread, so a line written just before a response may lag behind it.
    pub fn wait_for_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.logs().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Ocigate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ocigate {
    /// Runs `ocigate serve --config` with a config that must not start: waits (20 s at most)
    /// for it to exit and returns its status and log.
    pub fn start_fails(config: &str, env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ocigate.yaml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(Ocigate::bin())
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ocigate runs");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ocigate kept running with a config that must not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut log = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
        (status, log)
    }
}

/// moto's server standing in for Amazon ECR: `GetAuthorizationToken` hands out
/// `AWS:<registry id>-auth-token` (with an `expiresAt` in 2015).
pub struct EcrEmulator {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl EcrEmulator {
    pub fn start() -> EcrEmulator {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        for _ in 0..5 {
            let port = free_port();
            let out = std::fs::File::create(&log).unwrap();
            let mut child = Command::new("python3")
                .args([
                    "-m",
                    "moto.server",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                ])
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .expect("python3 runs (and has `pip install 'moto[server]'`)");
            let ready = format!("Running on http://127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains(&ready) {
                    return EcrEmulator {
                        child,
                        port,
                        _dir: dir,
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "moto_server did not start: {text}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!(
            "moto_server could not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment that points the AWS SDK at the emulator and nowhere else.
    pub fn sdk_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.url()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            (
                "AWS_CONFIG_FILE",
                "/nonexistent/ocigate-tests/aws-config".into(),
            ),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/ocigate-tests/aws-credentials".into(),
            ),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EcrEmulator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `ocigate check-config` on `yaml` (written to a file named `bad.yaml`, which is also
/// how the file is named in the returned stderr) with extra environment variables: whether
/// it passed, stdout and stderr.
pub fn check_config(yaml: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(Ocigate::bin())
        .arg("check-config")
        .arg(&path)
        .env_remove("NOT_SET_ANYWHERE")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr =
        String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "bad.yaml");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

/// An htpasswd file (bcrypt) for one user, and the registry `auth:` section using it.
pub fn htpasswd_auth(dir: &Path, user: &str, password: &str) -> String {
    let hash = bcrypt::hash(password, 4).unwrap();
    let path = dir.join("htpasswd");
    std::fs::write(&path, format!("{user}:{hash}\n")).unwrap();
    format!(
        "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
        path.display()
    )
}

/// A config for one plain upstream mapped at `prefix` → `remote`.
pub fn simple_config(
    upstream_url: &str,
    prefix: &str,
    remote: &str,
    upstream_extra: &str,
) -> String {
    format!(
        "server:\n  listen: \"127.0.0.1:0\"\nupstreams:\n  reg:\n    url: {upstream_url}\n{upstream_extra}routes:\n  - prefix: \"{prefix}\"\n    upstream: reg\n    remote: \"{remote}\"\n"
    )
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

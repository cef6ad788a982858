//! A private containerd daemon (its own root, state and socket under a temp dir, the CRI
//! plugin off) and `ctr` against it, as the recipe in `mirror-modes.md` runs them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    /// `None` (the test then skips, saying why) where containerd is missing or cannot run.
    pub fn start() -> Option<Containerd> {
        Containerd::start_with(None)
    }

    /// With `cri_hosts`: the CRI plugin on (what kubelet talks to), its registry
    /// `config_path` that directory of `hosts.toml` files.
    pub fn start_with(cri_hosts: Option<&Path>) -> Option<Containerd> {
        if !super::have("containerd") || !super::have("ctr") {
            eprintln!("skipped: containerd and ctr are not installed (apt-get install containerd)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let cri = match cri_hosts {
            None => "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]".to_string(),
            Some(hosts) => format!(
                r#"[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{}""#,
                hosts.display()
            ),
        };
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
{cri}
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
"#
        );
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut c = Containerd { child, dir };
        // Ready when it answers on its socket.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if c.ctr(&["version"]).status.success() {
                return Some(c);
            }
            if let Ok(Some(status)) = c.child.try_wait() {
                eprintln!("skipped: containerd exited ({status}): {}", c.log());
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr` in namespace `test` against this daemon.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.socket())
            .args(["-n", "test"])
            .args(args)
            .stdin(Stdio::null());
        c
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Pulls `reference` through the mirrors configured in `hosts_dir`, without unpacking
    /// (the native snapshotter needs no kernel support), and returns the digest containerd
    /// recorded for it.
    pub fn pull(&self, hosts_dir: &Path, reference: &str) -> String {
        let hosts = hosts_dir.display().to_string();
        super::run_ok(&mut self.command(&[
            "images",
            "pull",
            "--snapshotter",
            "native",
            "--hosts-dir",
            &hosts,
            reference,
        ]));
        self.digest(reference)
    }

    /// Pulls `reference` with `env` on the ctr command (where ctr resolves and fetches:
    /// `HTTPS_PROXY`, `SSL_CERT_FILE`), and returns its digest.
    pub fn pull_with_env(&self, env: &[(&str, String)], reference: &str) -> String {
        let mut cmd = self.command(&["images", "pull", "--snapshotter", "native", reference]);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        super::run_ok(&mut cmd);
        self.digest(reference)
    }

    /// The digest of an image containerd holds (`ctr images ls`).
    pub fn digest(&self, reference: &str) -> String {
        let out = super::run_ok(&mut self.command(&["images", "ls"]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| {
                let mut cols = line.split_whitespace();
                (cols.next() == Some(reference))
                    .then(|| cols.find(|c| c.starts_with("sha256:")))
                    .flatten()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| panic!("{reference} not in `ctr images ls`"))
    }

    /// Forgets every image and its content, so that the next pull fetches it all again.
    pub fn forget(&self, reference: &str) {
        super::run_ok(&mut self.command(&["images", "rm", "--sync", reference]));
    }
}

/// A `hosts.toml` directory: `dirs` maps a registry host directory name (`_default`,
/// `quay.test`) to the hosts.toml text.
pub fn hosts_dir(dirs: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in dirs {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("hosts.toml"), text).unwrap();
    }
    dir
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

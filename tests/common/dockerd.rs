//! A private Docker Engine (its own data root, exec root and socket, no bridge, no iptables,
//! the vfs storage driver), started with the environment a test gives it, as a node
//! configured for a forward proxy would run it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Dockerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Dockerd {
    /// `None` (the test then skips, saying why) where dockerd is missing or cannot start.
    pub fn start(env: &[(&str, String)]) -> Option<Dockerd> {
        if !super::have("dockerd") || !super::have("docker") {
            eprintln!("skipped: dockerd and the docker CLI are not installed");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("daemon.json"), "{}").unwrap();
        let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("-H")
            .arg(format!("unix://{}", d.join("docker.sock").display()))
            .args(["--bridge", "none", "--iptables=false", "--ip6tables=false"])
            .args(["--ip-masq=false", "--storage-driver", "vfs"])
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut engine = Dockerd { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if engine
                .docker(&["version"])
                .status()
                .is_ok_and(|s| s.success())
            {
                return Some(engine);
            }
            if let Ok(Some(status)) = engine.child.try_wait() {
                eprintln!(
                    "skipped: a second dockerd could not start ({status}): {}",
                    engine.log()
                );
                return None;
            }
            if Instant::now() > deadline {
                eprintln!(
                    "skipped: a second dockerd did not answer in 30 s: {}",
                    engine.log()
                );
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// The docker CLI against this engine.
    pub fn docker(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker");
        c.arg("-H")
            .arg(format!(
                "unix://{}",
                self.dir.path().join("docker.sock").display()
            ))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM: the engine stops its containerd and cleans its exec root.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! A container registry in the loop: Debian's `docker-registry` (the CNCF distribution)
//! serving plain HTTP on the loopback of the sandbox's node namespace, its storage in the
//! run's scratch directory. Images get there with skopeo ([`crate::image::push`]), as
//! `cargo xtask image --push` sends them to a user's registry.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::sandbox::Sandbox;

/// The registry's program (Debian package docker-registry).
const REGISTRY: &str = "/usr/bin/docker-registry";

/// A running registry; stopped on drop.
pub struct Registry {
    child: Child,
    dir: PathBuf,
    /// `127.0.0.1:<port>`: how the node namespace reaches it.
    pub host: String,
}

impl Registry {
    /// Starts a registry on `127.0.0.1:port` of `sb`'s node namespace; waits until `/v2/`
    /// answers.
    pub fn start(sb: &Sandbox, port: u16) -> Result<Self> {
        anyhow::ensure!(
            Path::new(REGISTRY).exists(),
            "{REGISTRY} is missing: `cargo xtask setup` installs Debian's docker-registry"
        );
        let dir = sb.dir().join("registry");
        std::fs::create_dir_all(dir.join("storage"))?;
        let host = format!("127.0.0.1:{port}");
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {host}\n",
                dir.join("storage").display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("registry.log"))?;
        let child = sb
            .node_command(REGISTRY, None)?
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry")?;
        let registry = Self { child, dir, host };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let up = sb
                .node_command("curl", None)?
                .args(["-sf", "-o", "/dev/null", "--max-time", "2"])
                .arg(format!("http://{}/v2/", registry.host))
                .status()?
                .success();
            if up {
                return Ok(registry);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the registry did not answer within 15 s: {}",
                registry.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pushes the OCI archive `tar` as `name` (`repository:tag`) from the node namespace;
    /// the full reference.
    pub fn push(&self, sb: &Sandbox, tar: &Path, name: &str) -> Result<String> {
        let reference = format!("{}/{name}", self.host);
        crate::image::push(sb.node_command("skopeo", None)?, tar, &reference, true)?;
        Ok(reference)
    }

    /// What the registry logged (the requests it served).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

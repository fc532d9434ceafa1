//! The real agent binary, run inside the sandbox's node namespace.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::fake_eks::{FakeEksAuth, REGION};
use crate::sandbox::Sandbox;

/// The cluster name the sandbox agent serves.
pub const CLUSTER: &str = "sandbox-cluster";
/// The line an agent logs once it serves.
pub const STARTED: &str = "eks-pod-identity-agent started";
/// The probe port used in the sandbox.
pub const PROBE_PORT: u16 = 2703;

/// The sandbox's AWS environment for the agent: region, the node's credentials, and the fake
/// EKS Auth's endpoint.
pub fn aws_env(fake: &FakeEksAuth) -> [(&'static str, String); 5] {
    [
        ("AWS_REGION", REGION.to_owned()),
        ("AWS_ACCESS_KEY_ID", "AKIDSANDBOXNODE".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "sandbox-node-secret".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ("AWS_ENDPOINT_URL_EKS_AUTH", fake.endpoint()),
    ]
}

/// The agent binary: `$AGENT_BIN`, else the workspace's release build.
pub fn agent_bin() -> Result<PathBuf> {
    built(
        "AGENT_BIN",
        "release",
        "`cargo xtask build` (or `cargo xtask test`)",
    )
}

/// The arm64 release binary (`AGENT_BIN_ARM64`, else where `cargo xtask image` builds it).
pub fn agent_bin_arm64() -> Result<PathBuf> {
    built(
        "AGENT_BIN_ARM64",
        "aarch64-unknown-linux-gnu/release",
        "`cargo xtask image` (or `cargo xtask test`)",
    )
}

/// The agent binary `var` names, else the one in `target/<dir>`; an error naming `how` to
/// build it when missing.
fn built(var: &str, dir: &str, how: &str) -> Result<PathBuf> {
    let path = match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target")
            .join(dir)
            .join("eks-pod-identity-agent"),
    };
    if !path.is_file() {
        bail!("agent binary {} is missing: run {how}", path.display());
    }
    Ok(path)
}

/// Settings a slow machine passes to every agent it starts (the kernel matrix's VMs run
/// under TCG, many times slower: a first request may outlast the default response deadline):
/// `POD_IDENTITY_RESPONSE_DEADLINE` from the test's own environment. A test's own settings
/// still win.
fn slow_machine_env() -> impl Iterator<Item = (&'static str, String)> {
    ["POD_IDENTITY_RESPONSE_DEADLINE"]
        .into_iter()
        .filter_map(|k| Some((k, std::env::var(k).ok()?)))
}

/// A running agent; killed on drop.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    /// Starts the agent in the node namespace with the sandbox's pods cgroup as
    /// `--cgroup-root`, EKS Auth pointed at `fake`, and `extra` arguments; waits until
    /// `/readyz` answers 200.
    pub fn start(sandbox: &Sandbox, fake: &FakeEksAuth, extra: &[&str]) -> Result<Self> {
        let mut agent = Self::launch_server(sandbox, fake, extra)?;
        agent.wait_ready(sandbox, Duration::from_secs(20))?;
        Ok(agent)
    }

    /// Starts a second agent as [`Agent::start`] does while another serves (an upgrade):
    /// `/readyz` would be answered by either, so this waits for the new agent's own start
    /// line instead.
    pub fn start_beside(sandbox: &Sandbox, fake: &FakeEksAuth, extra: &[&str]) -> Result<Self> {
        let mut agent = Self::launch_server(sandbox, fake, extra)?;
        agent.wait_log(STARTED, Duration::from_secs(20))?;
        Ok(agent)
    }

    /// Spawns `server` with the sandbox's cluster, pods cgroup and debug logs, plus `extra`;
    /// does not wait.
    pub fn launch_server(sandbox: &Sandbox, fake: &FakeEksAuth, extra: &[&str]) -> Result<Self> {
        let root = sandbox.cgroups().pods_root().display().to_string();
        let mut args = vec![
            "server",
            "--cluster-name",
            CLUSTER,
            "-v",
            "debug",
            "--cgroup-root",
            &root,
        ];
        args.extend_from_slice(extra);
        Self::launch(sandbox, fake, &args, &[])
    }

    /// Spawns the agent in the node namespace with exactly `args`, the sandbox's AWS
    /// environment (region, node credentials, EKS Auth endpoint) plus `env`; does not wait.
    pub fn launch(
        sandbox: &Sandbox,
        fake: &FakeEksAuth,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::launch_wrapped(sandbox, fake, &[], args, env)
    }

    /// Like [`Agent::launch`], with the agent run by `wrapper` (e.g. `setpriv ... --`), whose
    /// last argument is followed by the agent binary.
    pub fn launch_wrapped(
        sandbox: &Sandbox,
        fake: &FakeEksAuth,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let log = sandbox
            .dir()
            .join(format!("agent-{}.log", crate::names::unique()));
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = sandbox.node_command(program, None)?;
                c.args(rest).arg(agent_bin()?);
                c
            }
            None => sandbox.node_command(agent_bin()?, None)?,
        };
        cmd.args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(aws_env(fake))
            .env("POD_IDENTITY_BPFFS_DIR", sandbox.bpf_dir())
            .env("POD_IDENTITY_HANDOVER_SOCKET", sandbox.handover_socket())
            .envs(slow_machine_env())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = cmd.spawn().context("spawning the agent")?;
        Ok(Self {
            child: Some(child),
            log,
        })
    }

    /// Waits (at most `limit`) for the agent to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("agent still running after {limit:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `/readyz` answers 200, failing if the agent exits first.
    /// `limit` is stretched on slow machines ([`crate::slow::scaled`]).
    pub fn wait_ready(&mut self, sandbox: &Sandbox, limit: Duration) -> Result<()> {
        let limit = crate::slow::scaled(limit);
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.as_mut().expect("running").try_wait()? {
                bail!(
                    "agent exited during start-up ({status}):\n{}",
                    self.log_text()
                );
            }
            if probe(sandbox, "/readyz")?.0 == 200 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("agent not ready after {limit:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the agent's log holds `text`, failing if it exits first or `limit` passes.
    /// `limit` is stretched on slow machines ([`crate::slow::scaled`]).
    pub fn wait_log(&mut self, text: &str, limit: Duration) -> Result<()> {
        let limit = crate::slow::scaled(limit);
        let deadline = Instant::now() + limit;
        loop {
            if self.log_text().contains(text) {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().expect("running").try_wait()? {
                bail!(
                    "agent exited ({status}) before logging {text:?}:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent did not log {text:?} within {limit:?}:\n{}",
                    self.log_text()
                );
            }
            // Fine-grained: an upgrade test times a kill from a log line.
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends `signal` to the agent (it stays this handle's to stop or drop).
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Everything the agent logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON log lines, parsed.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// CPU time the agent has used so far (user + system), from /proc.
    pub fn cpu_time(&self) -> Result<Duration> {
        let stat = procfs::process::Process::new(self.pid() as i32)?.stat()?;
        let ticks = stat.utime + stat.stime;
        Ok(Duration::from_secs_f64(
            ticks as f64 / procfs::ticks_per_second() as f64,
        ))
    }

    /// Resident set size in KiB (VmRSS), 0 if unknown.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM, then wait (at most 10 s) for the exit status.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.terminate()
    }

    /// As [`Agent::stop`], keeping the handle (and its log) for a look afterwards.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("the agent was stopped already")?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("agent did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// GETs a probe path on the node's loopback; (status, body). Status 0 when nothing answers.
pub fn probe(sandbox: &Sandbox, path: &str) -> Result<(u16, String)> {
    node_get(sandbox, PROBE_PORT, path)
}

/// The agent's Prometheus exposition (metrics port 2705 on the node's loopback).
pub fn scrape(sandbox: &Sandbox) -> Result<String> {
    let (status, body) = node_get(sandbox, 2705, "/metrics")?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    Ok(body)
}

/// GETs `path` from `127.0.0.1:port` inside the node namespace.
pub fn node_get(sandbox: &Sandbox, port: u16, path: &str) -> Result<(u16, String)> {
    let path = path.to_owned();
    sandbox.node().run_in(move || {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return (0, String::new());
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    })
}

//! A real Prometheus in the loop: Debian's `prometheus` serving on the loopback of the
//! sandbox's node namespace, its storage in the run's scratch directory, scraping what the
//! test names and evaluating the chart's alert rules; asked through its own HTTP API.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::sandbox::Sandbox;

/// The server's program (Debian package prometheus).
const PROMETHEUS: &str = "/usr/bin/prometheus";

/// The scrape job the alert rules expect the agents under (`PodIdentityAgentDown`).
pub const JOB: &str = "eks-pod-identity-agent";

/// What to scrape: an address in the node namespace and the metrics path.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port`.
    pub address: String,
    /// e.g. `/metrics`.
    pub path: String,
}

/// One alert as `/api/v1/alerts` reports it.
#[derive(Debug, Clone)]
pub struct Alert {
    /// `alertname`.
    pub name: String,
    /// `pending` or `firing`.
    pub state: String,
    /// Every label, the alert's name included.
    pub labels: Value,
}

/// A running Prometheus; stopped on drop.
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    /// `127.0.0.1:<port>` in the node namespace.
    pub address: String,
}

impl Prometheus {
    /// Starts Prometheus on `127.0.0.1:port` of `sb`'s node namespace, scraping `target`
    /// every second as job [`JOB`] and evaluating `rules` every second; waits until it is
    /// ready.
    pub fn start(sb: &Sandbox, port: u16, target: &Target, rules: &Path) -> Result<Self> {
        anyhow::ensure!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} is missing: `cargo xtask setup` installs Debian's prometheus"
        );
        let dir = sb.dir().join("prometheus");
        std::fs::create_dir_all(dir.join("data"))?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: {JOB}\n    metrics_path: {path}\n    static_configs:\n      - targets: ['{address}']\n",
                rules = rules.display(),
                path = target.path,
                address = target.address,
            ),
        )?;
        let address = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = sb
            .node_command(PROMETHEUS, None)?
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        let prometheus = Self {
            child,
            dir,
            address,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while prometheus.get(sb, "/-/ready", &[]).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "prometheus was not ready within 30 s: {}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(prometheus)
    }

    /// GETs `path` from the server's API in the node namespace, with `query` parameters
    /// URL-encoded by curl.
    fn get(&self, sb: &Sandbox, path: &str, query: &[(&str, &str)]) -> Result<String> {
        let mut cmd = sb.node_command("curl", None)?;
        cmd.args(["-sf", "--max-time", "5", "-G"]);
        for (k, v) in query {
            cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        let out = cmd.arg(format!("http://{}{path}", self.address)).output()?;
        anyhow::ensure!(out.status.success(), "GET {path}: {:?}", out.status);
        Ok(String::from_utf8(out.stdout)?)
    }

    /// The `data` of an API answer, after checking its status.
    fn api(&self, sb: &Sandbox, path: &str, query: &[(&str, &str)]) -> Result<Value> {
        let v: Value = serde_json::from_str(&self.get(sb, path, query)?)?;
        anyhow::ensure!(v["status"] == "success", "{path}: {v}");
        Ok(v["data"].clone())
    }

    /// The health of each active scrape target (`up`, `down`, `unknown`) and its last error.
    pub fn targets(&self, sb: &Sandbox) -> Result<Vec<(String, String)>> {
        let data = self.api(sb, "/api/v1/targets", &[("state", "active")])?;
        Ok(data["activeTargets"]
            .as_array()
            .context("activeTargets")?
            .iter()
            .map(|t| {
                (
                    t["health"].as_str().unwrap_or_default().to_owned(),
                    t["lastError"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect())
    }

    /// The value of an instant query's first sample, if it has one.
    pub fn query(&self, sb: &Sandbox, promql: &str) -> Result<Option<f64>> {
        let data = self.api(sb, "/api/v1/query", &[("query", promql)])?;
        Ok(data["result"]
            .as_array()
            .and_then(|r| r.first())
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse().ok()))
    }

    /// Every pending or firing alert.
    pub fn alerts(&self, sb: &Sandbox) -> Result<Vec<Alert>> {
        let data = self.api(sb, "/api/v1/alerts", &[])?;
        Ok(data["alerts"]
            .as_array()
            .context("alerts")?
            .iter()
            .map(|a| Alert {
                name: a["labels"]["alertname"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                state: a["state"].as_str().unwrap_or_default().to_owned(),
                labels: a["labels"].clone(),
            })
            .collect())
    }

    /// Waits up to `timeout` for alert `name` in one of `states`; the alert.
    pub fn wait_for_alert(
        &self,
        sb: &Sandbox,
        name: &str,
        states: &[&str],
        timeout: Duration,
    ) -> Result<Alert> {
        let deadline = Instant::now() + timeout;
        loop {
            let alerts = self.alerts(sb)?;
            if let Some(a) = alerts
                .iter()
                .find(|a| a.name == name && states.contains(&a.state.as_str()))
            {
                return Ok(a.clone());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{name} not {states:?} within {timeout:?}; active: {alerts:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

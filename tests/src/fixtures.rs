//! Helpers the suites share: a standard node, reading metrics, and the kernel's view of
//! what is attached to a cgroup.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::agent::{Agent, CLUSTER};
use crate::cgroups::Driver;
use crate::fake_eks::FakeEksAuth;
use crate::sandbox::Sandbox;

/// Agent flags lifting the per-pod request and connect budgets, for suites that load one pod on purpose.
pub const UNLIMITED: &[&str] = &["--pod-request-rate", "0", "--pod-connect-rate", "0"];

/// A sandbox whose fake EKS Auth knows `app/reader` (role ReaderRole) but not `app/stranger`.
pub fn node(driver: Driver) -> Result<(Sandbox, FakeEksAuth)> {
    let sb = Sandbox::new(driver)?;
    let fake = FakeEksAuth::start(sb.node(), CLUSTER, sb.issuer().decoding_key())?;
    fake.associate("app", "reader", "ReaderRole");
    Ok((sb, fake))
}

/// The value of the sample `name` (with its labels) in a Prometheus exposition; an error
/// when the agent does not export it, so an assertion of 0 cannot pass on a renamed series.
pub fn metric(text: &str, name: &str) -> Result<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .with_context(|| format!("no sample {name} in the exposition"))
}

/// `pod_identity_attribution_total{listener, outcome}`.
pub fn attribution(text: &str, listener: &str, outcome: &str) -> Result<u64> {
    metric(
        text,
        &format!("pod_identity_attribution_total{{listener=\"{listener}\",outcome=\"{outcome}\"}}"),
    )
}

/// The agent's per-request log lines.
pub fn served_lines(agent: &Agent) -> Vec<serde_json::Value> {
    agent
        .log_lines()
        .into_iter()
        .filter(|l| l["message"] == "request served")
        .collect()
}

/// (program ids, link ids) of the links attached directly to `cgroup` (bpftool; the agent
/// attaches only through links). From `bpftool link show`, not `cgroup show`: bookworm's
/// bpftool 7.1 fails `cgroup show` on 5.10 kernels (docs/kernel-notes.md).
pub fn attachment(cgroup: &Path) -> Result<(Vec<u64>, Vec<u64>)> {
    let cgroup_id = std::fs::metadata(cgroup)
        .with_context(|| format!("{}", cgroup.display()))?
        .ino();
    let out = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "bpftool link show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let links: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("bpftool link show printed no JSON")?;
    let mut attached: Vec<(u64, u64)> = links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["cgroup_id"].as_u64() == Some(cgroup_id))
        .filter_map(|l| Some((l["prog_id"].as_u64()?, l["id"].as_u64()?)))
        .collect();
    attached.sort_unstable_by_key(|&(_, link)| link);
    Ok(attached.into_iter().unzip())
}

/// How many programs are attached directly to `cgroup`.
pub fn attached(cgroup: &Path) -> Result<usize> {
    Ok(attachment(cgroup)?.0.len())
}

/// The sum of the samples of metric `base` (its `_total` samples for a counter) whose labels
/// contain every one of `labels` (e.g. `purpose="prewarm"`). An error when the agent does not
/// export `base` at all, so an assertion of 0 cannot pass on a renamed metric.
pub fn metric_sum(text: &str, base: &str, labels: &[&str]) -> Result<u64> {
    anyhow::ensure!(
        text.lines()
            .any(|l| l.strip_prefix("# TYPE ").and_then(|r| r.split(' ').next()) == Some(base)),
        "metric {base} is not exported"
    );
    Ok(text
        .lines()
        .filter(|l| {
            let name = l.split(['{', ' ']).next().unwrap_or_default();
            (name == base || name == format!("{base}_total"))
                && labels.iter().all(|f| l.contains(f))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

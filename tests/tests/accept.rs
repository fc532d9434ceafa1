//! The accept path keeps up with connect bursts: every listener queues up to
//! `net.core.somaxconn` (or `--listen-backlog`), and a burst of connects from a pod is
//! accepted with no listen overflow and no SYN retransmit.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use tests::agent::Agent;
use tests::cgroups::Driver;
use tests::clients::{credentials_url, curl, helper_bin};
use tests::fixtures::node;
use tests::netns::run;
use tests::sandbox::{PodSpec, Sandbox};

/// The agent's ports in the sandbox: credentials, probes, metrics.
const PORTS: [u16; 3] = [80, 2703, 2705];

/// Listening sockets in the node namespace: (local address, accept queue length).
fn backlogs(sb: &Sandbox) -> Result<Vec<(String, u32)>> {
    let out = sb.node().command("ss")?.args(["-ltnH"]).output()?;
    anyhow::ensure!(out.status.success(), "ss failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            // State Recv-Q Send-Q Local Peer: Send-Q of a listener is its backlog.
            let f: Vec<&str> = l.split_whitespace().collect();
            Ok((
                f.get(3).context("local address")?.to_string(),
                f.get(2).context("Send-Q")?.parse()?,
            ))
        })
        .collect()
}

fn agent_backlogs(sb: &Sandbox) -> Result<Vec<(String, u32)>> {
    let all = backlogs(sb)?;
    let ours: Vec<_> = all
        .into_iter()
        .filter(|(addr, _)| {
            PORTS
                .iter()
                .any(|p| addr.rsplit(':').next() == Some(&p.to_string()))
        })
        .collect();
    // Credentials on both addresses, probes, metrics.
    anyhow::ensure!(ours.len() == 4, "agent listeners: {ours:?}");
    Ok(ours)
}

#[test]
fn every_listener_queues_up_to_somaxconn_or_the_flag() -> Result<()> {
    let (sb, fake) = node(Driver::Cgroupfs)?;
    // Not the default (4096), so a constant cannot pass.
    run(sb
        .node()
        .command("sysctl")?
        .args(["-qw", "net.core.somaxconn=5000"]))?;
    let agent = Agent::start(&sb, &fake, &[])?;
    for (addr, backlog) in agent_backlogs(&sb)? {
        assert_eq!(backlog, 5000, "{addr}");
    }
    agent.stop()?;
    let agent = Agent::start(&sb, &fake, &["--listen-backlog", "300"])?;
    for (addr, backlog) in agent_backlogs(&sb)? {
        assert_eq!(backlog, 300, "{addr}");
    }
    agent.stop()?;
    Ok(())
}

/// A burst of connects while the agent's accept loop is stalled (stopped, as a busy CPU or a
/// restart stalls it): the kernel must queue the whole burst and the agent serve it after.
/// With the old 128-deep queue, 1,000 connects here overflowed it by about 870 and each
/// dropped SYN cost its client a 1 s retransmit.
#[test]
fn a_connect_burst_during_an_accept_stall_is_queued_without_overflow_or_retransmit() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let pod = sb.add_pod(PodSpec::new("app", "reader"))?;
    // One pod makes all 1,000 connects: no kernel connect budget.
    let agent = Agent::start(&sb, &fake, &["-v", "info", "--pod-connect-rate", "0"])?;
    let pod_ns = sb.pods()[pod].netns.as_ref().context("pod netns")?;
    let (node_before, pod_before) = (sb.node().counters()?, pod_ns.counters()?);
    let signal = |sig| agent.signal(sig);
    signal(libc::SIGSTOP);
    let burst = sb
        .pod_command(pod, 0, helper_bin("connect-bench")?)?
        .args(["169.254.170.23:80", "1000", "100"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1500));
    signal(libc::SIGCONT);
    let out = burst.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "connect-bench failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let after = curl(&sb, pod, 0, credentials_url(false), &[])?;
    let (node_after, pod_after) = (sb.node().counters()?, pod_ns.counters()?);
    let delta =
        |after: &HashMap<String, u64>, before: &HashMap<String, u64>, k: &str| after[k] - before[k];
    assert_eq!(v["connects"], 1000, "{v}");
    assert_eq!(
        delta(&node_after, &node_before, "TcpExt:ListenOverflows"),
        0,
        "accept queue overflowed: {v}"
    );
    assert_eq!(
        delta(&pod_after, &pod_before, "TcpExt:TCPSynRetrans"),
        0,
        "SYNs retransmitted: {v}"
    );
    assert_eq!(v["slow"], 0, "connects over 900 ms: {v}");
    assert_eq!(after.status, 200, "served after the stall: {}", after.body);
    Ok(())
}

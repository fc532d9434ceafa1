//! The real node: containerd (CRI) and runc make the pods, with the kubelet's cgroup parents,
//! CNI networking and the webhook's environment; the clients run inside those containers
//! (CRI `ExecSync`) exactly as an application would.

use std::time::Duration;

use anyhow::{Context, Result};
use tests::agent::{scrape, Agent};
use tests::cgroups::Driver;
use tests::fake_eks::FakeEksAuth;
use tests::fixtures::{attribution, metric};
use tests::realnode::{RealNode, TOKEN_MOUNT};
use tests::sandbox::TOKEN_FILE_NAME;

const TIMEOUT: Duration = Duration::from_secs(20);

/// A sandbox with a private containerd in its node namespace, and the fake EKS Auth.
fn real_node() -> Result<(RealNode, FakeEksAuth)> {
    let (sb, fake) = tests::fixtures::node(Driver::Cgroupfs)?;
    let node = RealNode::start(sb).map_err(|b| b.0)?;
    Ok((node, fake))
}

/// The workspace path of a harness binary (mounted into app containers at the same path).
fn bin(name: &str) -> Result<String> {
    Ok(tests::clients::helper_bin(name)?.display().to_string())
}

/// The credentials JSON `client` got in container `c` of pod `i`, or what it reported.
fn fetch(
    node: &RealNode,
    i: usize,
    c: usize,
    client: &str,
    ipv6: bool,
) -> Result<Result<serde_json::Value, String>> {
    let url = tests::clients::credentials_url(ipv6);
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/pyenv/bin/python");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/botocore_client.py");
    let sdk = bin("sdk-client")?;
    let env_url = format!("AWS_CONTAINER_CREDENTIALS_FULL_URI={url}");
    let cmd: Vec<&str> = match client {
        // The pod's own environment (the webhook's variables), only the URL per family.
        "rust" => vec!["env", &env_url, &sdk],
        "botocore" => vec!["env", &env_url, python, script],
        "curl" => vec![
            "sh",
            "-c",
            r#"curl -s -H "Authorization: $(cat $AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)" "$0""#,
            url,
        ],
        other => anyhow::bail!("no client {other}"),
    };
    let out = node.exec(i, c, &cmd, TIMEOUT)?;
    if out.code != 0 {
        return Ok(Err(format!(
            "exit {}: {}{}",
            out.code, out.stdout, out.stderr
        )));
    }
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("{client} output: {out:?}"))?;
    Ok(Ok(if client == "curl" {
        match v.get("AccessKeyId") {
            Some(key) => serde_json::json!({"access_key_id": key}),
            None => return Ok(Err(v.to_string())),
        }
    } else {
        v
    }))
}

#[test]
fn sdks_and_curl_in_containerd_pods_get_credentials_through_the_kernel_path() -> Result<()> {
    let (mut node, fake) = real_node()?;
    let pod = node.run_pod("app", "reader", 1, false)?;
    let _agent = Agent::start(&node, &fake, &[])?;
    // The container sees the token where the webhook mounts it, and the webhook's variables.
    let env = node.exec(pod, 0, &["env"], TIMEOUT)?;
    assert!(
        env.stdout.contains(&format!(
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE={TOKEN_MOUNT}/{TOKEN_FILE_NAME}"
        )),
        "{env:?}"
    );
    // runc put the container in the kubelet's cgroup for its pod.
    let cgroup = node.exec(pod, 0, &["cat", "/proc/self/cgroup"], TIMEOUT)?;
    let uid = &node.pods()[pod].uid;
    assert!(
        cgroup.stdout.lines().any(|l| l.starts_with("0::") && l.contains(&format!("/kubepods/besteffort/pod{uid}/"))),
        "{cgroup:?}"
    );
    let mut keys = Vec::new();
    for client in ["rust", "botocore", "curl"] {
        for ipv6 in [false, true] {
            let got = fetch(&node, pod, 0, client, ipv6)?
                .map_err(|e| anyhow::anyhow!("{client} ipv6={ipv6}: {e}"))?;
            keys.push(got["access_key_id"].clone());
        }
    }
    keys.dedup();
    assert_eq!(
        keys.len(),
        1,
        "one identity, one set of credentials: {keys:?}"
    );
    assert_eq!(
        fake.calls(),
        1,
        "the first client's call served the other five"
    );
    let text = scrape(&node)?;
    assert_eq!(attribution(&text, "attributed", "attributed")?, 6, "{text}");
    assert_eq!(
        metric(
            &text,
            "pod_identity_ebpf_events{event=\"attribution_miss\"}"
        )?,
        0
    );
    Ok(())
}

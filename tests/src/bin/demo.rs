//! `cargo xtask demo`: on a real node (a private containerd making the pods and running the
//! agent from its image as the DaemonSet says), an app without a pod identity association is
//! refused, the association is created, and the same pod gets credentials through the eBPF
//! path. Without the runtime, the node sandbox with the agent as a process, saying why.
//! Everything is torn down at exit.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use tests::agent::Agent;
use tests::cgroups::Driver;
use tests::clients::{credentials_url, curl, sdk_client};
use tests::fake_eks::FakeEksAuth;
use tests::realnode::RealNode;
use tests::sandbox::{PodSpec, Sandbox};

fn main() -> Result<()> {
    let sb = Sandbox::new(Driver::Cgroupfs)?;
    let fake = FakeEksAuth::start(sb.node(), tests::agent::CLUSTER, sb.issuer().decoding_key())?;
    match RealNode::start(sb) {
        Ok(node) => real_node_story(node, &fake),
        Err(not_started) => {
            let (why, sb) = *not_started;
            println!("{why:#}: showing the node sandbox instead (agent as a process, pods made by hand)\n");
            sandbox_story(sb, &fake)
        }
    }
}

/// The seeds' story on a real node: containerd makes the pods and runs the agent from its
/// image as the DaemonSet says; an app without a pod identity association is refused, the
/// association is created, and the same pod, unchanged, gets credentials.
fn real_node_story(mut node: RealNode, fake: &FakeEksAuth) -> Result<()> {
    println!(
        "real node {}: a private containerd in the node's network namespace ({})",
        node.name(),
        node.socket().display()
    );
    node.import_agent_image(&tests::agent::agent_bin()?)?;
    let env: Vec<(&str, String)> = tests::agent::aws_env(fake)
        .into_iter()
        .chain([("CLUSTER_NAME", tests::agent::CLUSTER.to_owned())])
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let agent = node.run_agent(&tests::daemonset::manifest()?, &env)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !tests::agent::probe(&node, "/readyz").is_ok_and(|(s, _)| s == 200) {
        ensure!(
            Instant::now() < deadline,
            "the agent container never became ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "agent pod (deploy/daemonset.yaml): init container exited {}, agent container {} ready, eBPF attached to {}",
        agent.init_exit_code,
        &agent.container_id[..12],
        node.cgroups().pods_root().display()
    );
    let app = node.run_pod("shop", "checkout", 1, false)?;
    println!(
        "app pod shop/checkout: container {} in cgroup {}",
        &node.pods()[app].containers[0][..12],
        node.container_cgroup(app, 0).display()
    );
    let sdk = tests::clients::helper_bin("sdk-client")?
        .display()
        .to_string();
    let ask = |node: &RealNode| node.exec(app, 0, &[&sdk], Duration::from_secs(20));

    println!("\n1. the app's Rust SDK asks for credentials; shop/checkout has no pod identity association:");
    let refused = ask(&node)?;
    ensure!(
        refused.code != 0,
        "served without an association: {}",
        refused.stdout
    );
    for line in refused
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(3)
    {
        println!("   {line}");
    }
    println!("\n2. aws eks create-pod-identity-association --namespace shop --service-account checkout --role-arn …/CheckoutRole");
    fake.associate("shop", "checkout", "CheckoutRole");
    // The agent remembers "no association" for --negative-cache-ttl (10 s by default).
    println!("   (the agent remembers the refusal for --negative-cache-ttl, 10 s)");
    std::thread::sleep(Duration::from_secs(10));
    println!("\n3. the same pod, unchanged, asks again:");
    let got = ask(&node)?;
    ensure!(got.code == 0, "still refused: {}{}", got.stdout, got.stderr);
    show_credentials(got.stdout.as_bytes(), "   ")?;
    let text = tests::agent::scrape(&node)?;
    println!(
        "\nthe kernel attributed {} requests to their pod; fake EKS Auth calls: {}",
        tests::fixtures::attribution(&text, "attributed", "attributed")?,
        fake.calls()
    );
    drop(node);
    println!("containers, sandboxes, containerd and the node removed");
    Ok(())
}

/// The same agent as a plain process on the hand-made node sandbox.
fn sandbox_story(mut sb: Sandbox, fake: &FakeEksAuth) -> Result<()> {
    fake.associate("shop", "checkout", "CheckoutRole");
    fake.associate("shop", "billing", "BillingRole");
    let checkout = sb.add_pod(PodSpec::new("shop", "checkout"))?;
    let billing = sb.add_pod(PodSpec::new("shop", "billing"))?;
    println!(
        "node sandbox {}: 2 pods, cgroup tree {}",
        sb.name(),
        sb.cgroups().pods_root().display()
    );

    let agent = Agent::start(&sb, fake, &[])?;
    println!(
        "agent running (pid {}), eBPF attached to {}",
        agent.pid(),
        sb.cgroups().pods_root().display()
    );

    let out = sdk_client(&sb, checkout, credentials_url(false))?;
    ensure!(
        out.status.success(),
        "the SDK in pod checkout failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "\npod shop/checkout, Rust SDK container provider, http://169.254.170.23/v1/credentials:"
    );
    show_credentials(&out.stdout, "  ")?;

    let v6 = curl(&sb, billing, 0, credentials_url(true), &[])?;
    ensure!(
        v6.status == 200,
        "curl in pod billing got {}: {}",
        v6.status,
        v6.body
    );
    println!("\npod shop/billing, curl, http://[fd00:ec2::23]/v1/credentials:");
    println!(
        "  HTTP {} AccessKeyId {}",
        v6.status,
        v6.json()?["AccessKeyId"].as_str().unwrap_or("?")
    );

    let stolen = format!(
        "Authorization: {}",
        std::fs::read_to_string(&sb.pods()[checkout].token_file)?
    );
    let replay = curl(&sb, billing, 0, credentials_url(false), &["-H", &stolen])?;
    ensure!(
        replay.status == 403,
        "a replayed token was served: {}",
        replay.body
    );
    println!("\npod shop/billing replaying shop/checkout's token:");
    println!(
        "  HTTP {} {}",
        replay.status,
        replay.json()?["message"].as_str().unwrap_or("?")
    );

    println!("\nwhat the kernel attributed (agent log):");
    for line in agent.log_lines() {
        if line["message"] == "request served" {
            println!(
                "  listener={} cgroup_id={} pod_uid={} cgroup={}",
                line["listener"].as_str().unwrap_or("?"),
                line["cgroup_id"],
                line["pod_uid"].as_str().unwrap_or("-"),
                line["cgroup_path"].as_str().unwrap_or("-"),
            );
        }
    }
    println!(
        "\nfake EKS Auth calls: {} (none for the replayed token)",
        fake.calls()
    );
    let status = agent.stop()?;
    ensure!(status.success(), "agent exited with {status}");
    println!("agent stopped cleanly; sandbox removed");
    Ok(())
}

/// Prints what `sdk-client` printed, the secret redacted.
fn show_credentials(out: &[u8], indent: &str) -> Result<()> {
    let creds: serde_json::Value =
        serde_json::from_slice(out.trim_ascii()).context("sdk-client output")?;
    let field = |k: &str| creds[k].as_str().unwrap_or("?").to_owned();
    println!("{indent}AccessKeyId     {}", field("access_key_id"));
    println!("{indent}SecretAccessKey ** redacted **");
    println!("{indent}AccountId       {}", field("account_id"));
    Ok(())
}

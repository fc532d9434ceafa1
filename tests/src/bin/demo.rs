//! `cargo xtask demo`: a node sandbox with two pods, the fake EKS Auth and the real agent;
//! a pod's Rust SDK gets credentials through the eBPF path. Everything is torn down at exit.

use anyhow::{ensure, Context, Result};
use tests::agent::Agent;
use tests::cgroups::Driver;
use tests::clients::{credentials_url, curl, sdk_client};
use tests::fake_eks::FakeEksAuth;
use tests::sandbox::{PodSpec, Sandbox};

fn main() -> Result<()> {
    let mut sb = Sandbox::new(Driver::Systemd)?;
    let fake = FakeEksAuth::start(sb.node(), tests::agent::CLUSTER, sb.issuer().decoding_key())?;
    fake.associate("shop", "checkout", "CheckoutRole");
    fake.associate("shop", "billing", "BillingRole");
    let checkout = sb.add_pod(PodSpec::new("shop", "checkout"))?;
    let billing = sb.add_pod(PodSpec::new("shop", "billing"))?;
    println!(
        "node sandbox {}: 2 pods, cgroup tree {}",
        sb.name(),
        sb.cgroups().pods_root().display()
    );

    let agent = Agent::start(&sb, &fake, &[])?;
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
    let creds: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("sdk-client output")?;
    println!(
        "\npod shop/checkout, Rust SDK container provider, http://169.254.170.23/v1/credentials:"
    );
    println!(
        "  AccessKeyId     {}",
        creds["access_key_id"].as_str().unwrap_or("?")
    );
    println!("  SecretAccessKey ** redacted **");
    println!(
        "  AccountId       {}",
        creds["account_id"].as_str().unwrap_or("?")
    );

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

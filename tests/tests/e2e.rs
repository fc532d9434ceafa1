//! End to end in the node sandbox: real agent binary, real kernel programs, real clients in
//! pod namespaces. Needs root, BPF and network namespaces (run by `cargo xtask test`).

use std::os::unix::fs::MetadataExt;

use anyhow::Result;
use tests::agent::{probe, scrape, Agent};
use tests::cgroups::Driver;
use tests::clients::{credentials_url, curl, curl_in, sdk_client};
use tests::fake_eks::ACCOUNT;
use tests::fixtures::{attached, attachment, attribution, metric, node, served_lines};
use tests::sandbox::PodSpec;

#[test]
fn curl_in_a_pod_gets_the_credentials_eks_auth_issued_over_ipv4_and_ipv6() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let pod = sb.add_pod(PodSpec::new("app", "reader"))?;
    let _agent = Agent::start(&sb, &fake, &[])?;
    for ipv6 in [false, true] {
        let got = curl(&sb, pod, 0, credentials_url(ipv6), &[])?;
        assert_eq!(got.status, 200, "ipv6={ipv6}: {}", got.body);
        let issued = fake.issued();
        // The IPv6 request is a cache hit for the same pod: one EKS Auth call in all.
        assert_eq!(issued.len(), 1, "ipv6={ipv6}");
        let want = &issued[0];
        let body = got.json()?;
        assert_eq!(body["AccessKeyId"], want.access_key_id.as_str());
        assert_eq!(body["SecretAccessKey"], want.secret_access_key.as_str());
        assert_eq!(body["Token"], want.session_token.as_str());
        assert_eq!(body["AccountId"], ACCOUNT);
        let exp = body["Expiration"].as_str().unwrap();
        assert!(
            exp.ends_with('Z') && exp.len() == 20,
            "Expiration {exp:?} is not UTC RFC 3339"
        );
        assert_eq!(
            body.as_object().unwrap().len(),
            5,
            "exactly the five SDK keys: {body}"
        );
    }
    Ok(())
}

#[test]
fn the_rust_sdk_container_provider_resolves_credentials_over_ipv4_and_ipv6() -> Result<()> {
    let (mut sb, fake) = node(Driver::Systemd)?;
    let pod = sb.add_pod(PodSpec::new("app", "reader"))?;
    let _agent = Agent::start(&sb, &fake, &[])?;
    for ipv6 in [false, true] {
        let out = sdk_client(&sb, pod, credentials_url(ipv6))?;
        assert!(
            out.status.success(),
            "ipv6={ipv6}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let want = fake.issued().last().cloned().unwrap();
        assert_eq!(got["access_key_id"], want.access_key_id.as_str());
        assert_eq!(got["secret_access_key"], want.secret_access_key.as_str());
        assert_eq!(got["session_token"], want.session_token.as_str());
        assert_eq!(got["account_id"], ACCOUNT);
        assert_eq!(got["expiry"], want.expiration);
    }
    Ok(())
}

#[test]
fn the_kernel_attributes_each_connection_to_the_callers_pod_on_port_80() -> Result<()> {
    for driver in [Driver::Cgroupfs, Driver::Systemd] {
        let (mut sb, fake) = node(driver)?;
        let mut spec = PodSpec::new("app", "reader");
        spec.containers = 2;
        let a = sb.add_pod(spec.clone())?;
        let b = sb.add_pod(spec)?;
        let agent = Agent::start(&sb, &fake, &[])?;
        let mut expected = Vec::new();
        for (pod, container, ipv6) in [(a, 0, false), (a, 1, true), (b, 1, false), (b, 0, true)] {
            let got = curl(&sb, pod, container, credentials_url(ipv6), &[])?;
            assert_eq!(
                got.status, 200,
                "{driver:?} pod {pod} container {container}: {}",
                got.body
            );
            assert_eq!(got.peer_port, 80, "nothing on the wire changes");
            // Whichever container calls, the kernel records its pod's cgroup.
            let dir = sb.pods()[pod].containers[container]
                .parent()
                .unwrap()
                .to_path_buf();
            expected.push((
                std::fs::metadata(&dir)?.ino(),
                dir,
                sb.pods()[pod].uid.clone(),
            ));
        }
        let lines = served_lines(&agent);
        assert_eq!(lines.len(), expected.len(), "{lines:?}");
        for (line, (ino, dir, uid)) in lines.iter().zip(&expected) {
            assert_eq!(line["listener"], "attributed", "{line}");
            assert_eq!(line["cgroup_id"], *ino, "{driver:?}: {line}");
            assert_eq!(line["cgroup_path"], dir.display().to_string());
            assert_eq!(line["pod_uid"], uid.as_str());
        }
        // Each record was taken at accept (in one syscall where the kernel can, 5.14+).
        let metrics = scrape(&sb)?;
        assert_eq!(metric(&metrics, "pod_identity_ebpf_tuples")?, 0);
        assert_eq!(
            metric(
                &metrics,
                "pod_identity_ebpf_feature{feature=\"lookup_and_delete\"}"
            )?,
            u64::from(kernel_at_least(5, 14)?),
            "{metrics}"
        );
    }
    Ok(())
}

/// Whether the running kernel is `major.minor` or newer.
fn kernel_at_least(major: u32, minor: u32) -> Result<bool> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut parts = release.trim().split(['.', '-']).map(str::parse::<u32>);
    let (Some(Ok(ma)), Some(Ok(mi))) = (parts.next(), parts.next()) else {
        anyhow::bail!("unreadable kernel release {release:?}");
    };
    Ok((ma, mi) >= (major, minor))
}

#[test]
fn a_pod_without_an_association_gets_a_404_its_sdk_reports_with_the_reason() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let pod = sb.add_pod(PodSpec::new("app", "stranger"))?;
    let _agent = Agent::start(&sb, &fake, &[])?;
    let got = curl(&sb, pod, 0, credentials_url(false), &[])?;
    assert_eq!(got.status, 404, "{}", got.body);
    let body = got.json()?;
    assert_eq!(body["code"], "ResourceNotFoundException");
    assert_eq!(body["Code"], "ResourceNotFoundException");
    assert!(
        body["message"].as_str().unwrap().contains("app/stranger"),
        "{body}"
    );
    let out = sdk_client(&sb, pod, credentials_url(true))?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // The Rust SDK reports the status and drops the body (docs/protocol.md §1); the reason is in
    // the body, which curl shows above.
    assert!(
        err.contains("StatusCode(404)"),
        "SDK error lacks the status: {err}"
    );
    Ok(())
}

#[test]
fn a_pod_address_without_a_kernel_record_is_refused_never_guessed() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let pod = sb.add_pod(PodSpec::new("app", "reader"))?;
    let agent = Agent::start(&sb, &fake, &[])?;
    // The pod's network namespace, but a cgroup no hook runs in: its connect reaches port 80
    // from the pod's address with no record. Not a node address, so it came around the hook.
    let outside = sb.cgroups().outside_pods("no-hook")?;
    let token = std::fs::read_to_string(&sb.pods()[pod].token_file)?;
    for ipv6 in [false, true] {
        let cmd = sb.pod_netns_command(pod, &outside, "curl")?;
        let got = curl_in(cmd, &token, credentials_url(ipv6), &[])?;
        assert_eq!(got.status, 403, "{}", got.body);
        assert_eq!(got.json()?["code"], "AttributionBypassed");
    }
    assert_eq!(
        fake.calls(),
        0,
        "EKS Auth must not be called for an unattributed caller"
    );
    let text = scrape(&sb)?;
    assert_eq!(attribution(&text, "plain", "bypassed")?, 2, "{text}");
    drop(agent);
    Ok(())
}

#[test]
fn without_ebpf_the_plain_listener_serves() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let pod = sb.add_pod(PodSpec::new("app", "reader"))?;
    // An earlier run left its programs pinned; switching eBPF off removes them.
    assert!(Agent::start(&sb, &fake, &[])?.stop()?.success());
    let agent = Agent::start(&sb, &fake, &["--no-ebpf"])?;
    assert_eq!(
        attached(sb.cgroups().pods_root())?,
        0,
        "stale programs still attached"
    );
    let (status, body) = probe(&sb, "/readyz")?;
    assert_eq!(status, 200);
    assert!(body.contains("\"fallback\""), "{body}");
    for ipv6 in [false, true] {
        let got = curl(&sb, pod, 0, credentials_url(ipv6), &[])?;
        assert_eq!(got.status, 200, "{}", got.body);
    }
    let lines = served_lines(&agent);
    assert_eq!(lines.len(), 2);
    assert!(
        lines
            .iter()
            .all(|l| l["listener"] == "plain" && l["cgroup_id"].is_null()),
        "{lines:?}"
    );
    Ok(())
}

#[test]
fn sigterm_exits_zero_and_unpinned_programs_detach() -> Result<()> {
    let (mut sb, fake) = node(Driver::Systemd)?;
    let pod = sb.add_pod(PodSpec::new("app", "reader"))?;
    let agent = Agent::start(&sb, &fake, &["--no-pin"])?;
    let (status, body) = probe(&sb, "/readyz")?;
    assert_eq!((status, body.contains("\"ebpf\"")), (200, true), "{body}");
    let root = sb.cgroups().pods_root().to_path_buf();
    assert_eq!(attached(&root)?, 3, "connect4/6 and sock_ops attached");
    assert_eq!(curl(&sb, pod, 0, credentials_url(false), &[])?.status, 200);
    let status = agent.stop()?;
    assert!(status.success(), "exit status {status}");
    assert_eq!(attached(&root)?, 0, "programs still attached after SIGTERM");
    // With nothing listening, the pod's connect is refused.
    assert_eq!(curl(&sb, pod, 0, credentials_url(false), &[])?.status, 0);
    Ok(())
}

#[test]
fn pinned_programs_outlive_the_agent_until_uninstall() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let pod = sb.add_pod(PodSpec::new("app", "reader"))?;
    let agent = Agent::start(&sb, &fake, &[])?;
    let root = sb.cgroups().pods_root().to_path_buf();
    let (progs_before, links_before) = attachment(&root)?;
    assert!(agent.stop()?.success());
    assert_eq!(
        attached(&root)?,
        3,
        "pinned programs must stay attached across a restart"
    );
    // Nothing listens while the agent is down.
    let peer = curl(&sb, pod, 0, credentials_url(false), &[])?;
    assert_eq!(peer.status, 0);
    // The next agent takes the pinned links over: the same links, its programs inside them,
    // and the pod attributed through them on both families.
    let agent = Agent::start(&sb, &fake, &[])?;
    let (progs_after, links_after) = attachment(&root)?;
    assert_eq!(links_after, links_before, "links were re-created");
    assert!(
        progs_after.iter().all(|p| !progs_before.contains(p)),
        "programs were not replaced: {progs_before:?} -> {progs_after:?}"
    );
    for ipv6 in [false, true] {
        let got = curl(&sb, pod, 0, credentials_url(ipv6), &[])?;
        assert_eq!(got.status, 200, "ipv6={ipv6}: {}", got.body);
    }
    let lines = served_lines(&agent);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines.iter().all(|l| l["listener"] == "attributed"),
        "{lines:?}"
    );
    assert!(agent.stop()?.success());
    let out = std::process::Command::new(tests::agent::agent_bin()?)
        .arg("uninstall")
        .arg("--bpffs-dir")
        .arg(sb.bpf_dir())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(attached(&root)?, 0, "uninstall left programs attached");
    assert!(!sb.bpf_dir().exists(), "uninstall left pins");
    Ok(())
}

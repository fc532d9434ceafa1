//! Kernel attribution and the token cross-check: the agent knows which pod is calling and
//! refuses a token that belongs to another pod.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use anyhow::Result;
use tests::agent::{scrape, Agent, CLUSTER};
use tests::cgroups::Driver;
use tests::clients::{credentials_url, curl, load_result, spawn_load};
use tests::fixtures::{attribution, metric, node};
use tests::sandbox::PodSpec;

#[test]
fn a_token_replayed_from_another_pod_is_refused_and_eks_auth_is_not_called() -> Result<()> {
    for driver in [Driver::Cgroupfs, Driver::Systemd] {
        let (mut sb, fake) = node(driver)?;
        let mut spec = PodSpec::new("app", "reader");
        spec.containers = 2;
        let a = sb.add_pod(spec.clone())?;
        let b = sb.add_pod(spec)?;
        let _agent = Agent::start(&sb, &fake, &[])?;
        let token_of = |pod: usize| std::fs::read_to_string(&sb.pods()[pod].token_file);
        for (caller, owner) in [(a, b), (b, a)] {
            for container in [0, 1] {
                for ipv6 in [false, true] {
                    let case = format!("{driver:?} pod {caller} container {container} ipv6={ipv6}");
                    let calls = fake.calls();
                    let stolen = format!("Authorization: {}", token_of(owner)?);
                    let got = curl(
                        &sb,
                        caller,
                        container,
                        credentials_url(ipv6),
                        &["-H", &stolen],
                    )?;
                    assert_eq!(got.status, 403, "{case}: {}", got.body);
                    let body = got.json()?;
                    assert_eq!(body["code"], "TokenPodMismatch", "{case}");
                    assert!(
                        !body.to_string().contains(&token_of(owner)?),
                        "{case}: token echoed"
                    );
                    assert_eq!(
                        fake.calls(),
                        calls,
                        "{case}: EKS Auth was called for a replayed token"
                    );
                    let own = curl(&sb, caller, container, credentials_url(ipv6), &[])?;
                    assert_eq!(own.status, 200, "{case}: {}", own.body);
                }
            }
        }
        let text = scrape(&sb)?;
        assert_eq!(attribution(&text, "attributed", "mismatch")?, 8, "{text}");
        assert_eq!(attribution(&text, "attributed", "attributed")?, 8, "{text}");
    }
    Ok(())
}

#[test]
fn a_host_network_pod_is_steered_attributed_and_served() -> Result<()> {
    let (mut sb, fake) = node(Driver::Systemd)?;
    let mut spec = PodSpec::new("app", "reader");
    spec.host_network = true;
    let pod = sb.add_pod(spec)?;
    let agent = Agent::start(&sb, &fake, &[])?;
    for ipv6 in [false, true] {
        let got = curl(&sb, pod, 0, credentials_url(ipv6), &[])?;
        assert_eq!(got.status, 200, "ipv6={ipv6}: {}", got.body);
        assert_eq!(got.peer_port, 80, "nothing on the wire changes");
    }
    let pod_dir = sb.pods()[pod].containers[0].parent().unwrap().to_path_buf();
    let ino = std::fs::metadata(&pod_dir)?.ino();
    let served: Vec<_> = agent
        .log_lines()
        .into_iter()
        .filter(|l| l["message"] == "request served")
        .collect();
    assert_eq!(served.len(), 2);
    for line in served {
        assert_eq!(line["listener"], "attributed", "{line}");
        assert_eq!(line["cgroup_id"], ino, "{line}");
        assert_eq!(line["pod_uid"], sb.pods()[pod].uid.as_str());
    }
    Ok(())
}

#[test]
fn callers_in_no_pod_on_a_node_address_are_served_under_the_unattributed_policy() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let pod = sb.add_pod(PodSpec::new("app", "reader"))?;
    let token = std::fs::read_to_string(&sb.pods()[pod].token_file)?;
    // A node daemon: node network namespace, a cgroup outside the pods cgroup (no hook).
    let daemon_cgroup = sb.cgroups().outside_pods("system.slice")?;
    // A process in the pods cgroup but in no pod (the QoS level itself): the hook runs, finds
    // no pod and records nothing; from the node's address it is a node caller too.
    let qos_cgroup = sb.cgroups().pods_root().join("besteffort");
    let ask = |cgroup: &std::path::Path| -> Result<(u16, String)> {
        let out = sb
            .node_command("curl", Some(cgroup))?
            .args(["-sS", "-w", "\n%{http_code}", "-H"])
            .arg(format!("Authorization: {token}"))
            .arg(credentials_url(false))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
        Ok((status.parse().unwrap_or(0), body.to_owned()))
    };
    for (policy, plain_status) in [("allow", 200), ("deny", 403)] {
        let agent = Agent::start(&sb, &fake, &["--unattributed", policy])?;
        let (status, body) = ask(&daemon_cgroup)?;
        assert_eq!(status, plain_status, "{policy}: {body}");
        let (status, body) = ask(&qos_cgroup)?;
        assert_eq!(status, plain_status, "{policy}: {body}");
        let text = scrape(&sb)?;
        assert_eq!(attribution(&text, "plain", "unattributed")?, 2, "{text}");
        assert_eq!(attribution(&text, "plain", "bypassed")?, 0, "{text}");
        agent.stop()?;
    }
    Ok(())
}

#[test]
fn thousands_of_connections_are_all_attributed_and_none_to_the_wrong_pod() -> Result<()> {
    let (mut sb, fake) = node(Driver::Systemd)?;
    let a = sb.add_pod(PodSpec::new("app", "reader"))?;
    let b = sb.add_pod(PodSpec::new("app", "reader"))?;
    let _agent = Agent::start(&sb, &fake, tests::fixtures::UNLIMITED)?;
    // Pod A sequentially, pod B 50 at a time, both at once, each with its own token: a
    // connection attributed to the wrong pod would fail the cross-check with 403.
    let seq = spawn_load(&sb, a, 0, "169.254.170.23:80", "/v1/credentials", 2000, 1)?;
    let conc = spawn_load(&sb, b, 0, "[fd00:ec2::23]:80", "/v1/credentials", 2000, 50)?;
    let (seq, conc) = (load_result(seq)?, load_result(conc)?);
    assert_eq!(
        (seq.count(200), seq.errors),
        (2000, 0),
        "sequential: {seq:?}"
    );
    assert_eq!(
        (conc.count(200), conc.errors),
        (2000, 0),
        "concurrent: {conc:?}"
    );
    let text = scrape(&sb)?;
    assert_eq!(
        attribution(&text, "attributed", "attributed")?,
        4000,
        "{text}"
    );
    assert_eq!(attribution(&text, "attributed", "mismatch")?, 0);
    assert_eq!(attribution(&text, "plain", "bypassed")?, 0);
    assert_eq!(
        metric(
            &text,
            "pod_identity_ebpf_events{event=\"attribution_miss\"}"
        )?,
        0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "pod_identity_ebpf_events{event=\"tuple_insert_failed\"}"
        )?,
        0
    );
    Ok(())
}

#[test]
fn the_attribution_map_does_not_grow_with_closed_connections() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let pod = sb.add_pod(PodSpec::new("app", "reader"))?;
    let _agent = Agent::start(&sb, &fake, tests::fixtures::UNLIMITED)?;
    // 10,000 short connections (answered 404 without an EKS Auth call, still recorded).
    let load = load_result(spawn_load(
        &sb,
        pod,
        0,
        "169.254.170.23:80",
        "/nothing",
        10_000,
        20,
    )?)?;
    assert_eq!((load.count(404), load.errors), (10_000, 0), "{load:?}");
    // The server takes each tuple at accept; a socket closing first deletes its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(&sb)?;
        let live = metric(&text, "pod_identity_ebpf_tuples")?;
        let recorded = metric(&text, "pod_identity_ebpf_events{event=\"tuple_recorded\"}")?;
        let deleted = metric(&text, "pod_identity_ebpf_events{event=\"tuple_deleted\"}")?;
        if live == 0 {
            assert!(recorded >= 10_000, "{text}");
            assert!(deleted < recorded, "the server took none: {text}");
            return Ok(());
        }
        assert!(
            Instant::now() < deadline,
            "{live} tuples still live:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn without_bpf_privileges_the_agent_falls_back_and_says_so() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let pod = sb.add_pod(PodSpec::new("app", "reader"))?;
    let root = sb.cgroups().pods_root().display().to_string();
    // Root without CAP_BPF, CAP_SYS_ADMIN and CAP_PERFMON: loading programs fails.
    let mut agent = Agent::launch_wrapped(
        &sb,
        &fake,
        &[
            "setpriv",
            "--bounding-set",
            "-bpf,-sys_admin,-perfmon",
            "--",
        ],
        &[
            "server",
            "-c",
            CLUSTER,
            "-v",
            "debug",
            "--cgroup-root",
            &root,
        ],
        &[],
    )?;
    agent.wait_ready(&sb, Duration::from_secs(20))?;
    let (status, body) = tests::agent::probe(&sb, "/readyz")?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"fallback\""), "{body}");
    assert!(
        agent.log_text().contains("eBPF unavailable"),
        "{}",
        agent.log_text()
    );
    let got = curl(&sb, pod, 0, credentials_url(false), &[])?;
    assert_eq!(got.status, 200, "{}", got.body);
    let text = scrape(&sb)?;
    assert!(
        text.contains("pod_identity_agent_mode{mode=\"fallback\"} 1\n"),
        "{text}"
    );
    assert_eq!(attribution(&text, "plain", "unattributed")?, 1, "{text}");
    Ok(())
}

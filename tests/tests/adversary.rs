//! The attacks an ordinary pod holding another pod's token (from a log, a volume, a debug
//! dump) can try, run as written in the node sandbox. Each one got the victim's credentials,
//! pushed it out of the cache, or broke a policy-protected cluster before the agent found
//! pods by position and stopped rewriting connects (docs/operator-guide.md, "Threat model").

use std::time::{Duration, Instant};

use anyhow::Result;
use tests::agent::{scrape, Agent};
use tests::cgroups::Driver;
use tests::clients::{
    credentials_url, curl, curl_in, helper_bin, load_result, spawn_load_with, Helper,
};
use tests::fixtures::{attribution, metric, node};
use tests::issuer::TokenSubject;
use tests::netns::run;
use tests::sandbox::{PodSpec, Sandbox};

fn token_of(sb: &Sandbox, pod: usize) -> Result<String> {
    Ok(std::fs::read_to_string(&sb.pods()[pod].token_file)?)
}

/// The cgroup name the kubelet gives pod `uid` under `driver`.
fn pod_cgroup_name(driver: Driver, uid: &str) -> String {
    match driver {
        Driver::Cgroupfs => format!("pod{uid}"),
        Driver::Systemd => format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_")),
    }
}

#[test]
fn a_cgroup_a_container_nests_and_names_after_another_pod_proves_nothing() -> Result<()> {
    for driver in [Driver::Cgroupfs, Driver::Systemd] {
        for host_network in [false, true] {
            let case = format!("{driver:?} hostNetwork={host_network}");
            let (mut sb, fake) = node(driver)?;
            let victim = sb.add_pod(PodSpec::new("app", "reader"))?;
            let mut spec = PodSpec::new("app", "reader");
            spec.host_network = host_network;
            let attacker = sb.add_pod(spec)?;
            let _agent = Agent::start(&sb, &fake, &[])?;
            // What `unshare -UrmC; mount -t cgroup2` lets a root container do: a child of its
            // own cgroup, named as the kubelet names the victim's pod, with itself inside.
            let name = pod_cgroup_name(driver, &sb.pods()[victim].uid);
            let nested = sb.pods()[attacker].containers[0].join(name).join("deeper");
            std::fs::create_dir_all(&nested)?;
            let stolen = token_of(&sb, victim)?;
            let own = token_of(&sb, attacker)?;
            let calls = fake.calls();
            for ipv6 in [false, true] {
                let cmd = sb.pod_netns_command(attacker, &nested, "curl")?;
                let got = curl_in(cmd, &stolen, credentials_url(ipv6), &[])?;
                assert_eq!(got.status, 403, "{case} ipv6={ipv6}: {}", got.body);
                assert_eq!(got.json()?["code"], "TokenPodMismatch", "{case}");
                // The same nested cgroup asking with its own pod's token is that pod.
                let cmd = sb.pod_netns_command(attacker, &nested, "curl")?;
                let got = curl_in(cmd, &own, credentials_url(ipv6), &[])?;
                assert_eq!(got.status, 200, "{case} ipv6={ipv6}: {}", got.body);
            }
            assert_eq!(
                fake.calls(),
                calls + 1,
                "{case}: one call, for the attacker's own credentials"
            );
            let text = scrape(&sb)?;
            assert_eq!(attribution(&text, "attributed", "mismatch")?, 2, "{text}");
        }
    }
    Ok(())
}

#[test]
fn a_service_dnat_to_the_credential_address_is_refused_whatever_the_policy() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let victim = sb.add_pod(PodSpec::new("app", "reader"))?;
    let attacker = sb.add_pod(PodSpec::new("app", "reader"))?;
    // What kube-proxy makes of a selector-less Service whose endpoints are the credential
    // addresses: a DNAT in the node, which the pod's connect hook never sees.
    for (tool, service, to) in [
        ("iptables", "10.96.0.10", "169.254.170.23:80"),
        ("ip6tables", "fd96::10", "[fd00:ec2::23]:80"),
    ] {
        run(sb.node().command(tool)?.args([
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            service,
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            to,
        ]))?;
    }
    let stolen = format!("Authorization: {}", token_of(&sb, victim)?);
    for policy in ["allow", "deny"] {
        let agent = Agent::start(&sb, &fake, &["--unattributed", policy])?;
        for (url, host) in [
            ("http://10.96.0.10/v1/credentials", "Host: 169.254.170.23"),
            ("http://[fd96::10]/v1/credentials", "Host: [fd00:ec2::23]"),
        ] {
            let got = curl(&sb, attacker, 0, url, &["-H", &stolen, "-H", host])?;
            assert_eq!(got.status, 403, "{policy} {url}: {}", got.body);
            assert_eq!(got.json()?["code"], "AttributionBypassed", "{policy} {url}");
        }
        let text = scrape(&sb)?;
        assert_eq!(attribution(&text, "plain", "bypassed")?, 2, "{text}");
        agent.stop()?;
    }
    assert_eq!(fake.calls(), 0, "EKS Auth was called around the hook");
    Ok(())
}

#[test]
fn tokens_naming_made_up_service_accounts_cannot_grow_the_cache_or_push_a_pod_out() -> Result<()> {
    let (mut sb, fake) = node(Driver::Systemd)?;
    let victim = sb.add_pod(PodSpec::new("app", "reader"))?;
    let attacker = sb.add_pod(PodSpec::new("app", "reader"))?;
    let _agent = Agent::start(
        &sb,
        &fake,
        &["--max-cache-size", "300", "--pod-connect-rate", "0"],
    )?;
    assert_eq!(
        curl(&sb, victim, 0, credentials_url(false), &[])?.status,
        200
    );
    let before = fake.calls();
    // 400 tokens naming the attacker's own pod (the kernel proves that much) with made-up
    // namespaces and service accounts.
    let pod = &sb.pods()[attacker];
    let tokens: String = (0..400)
        .map(|n| {
            let who = TokenSubject::new(&format!("ns{n}"), &format!("sa{n}"), &pod.name, &pod.uid);
            sb.issuer().mint(&who, Duration::from_secs(3600)) + "\n"
        })
        .collect();
    let file = sb.dir().join("forged-tokens");
    std::fs::write(&file, tokens)?;
    let started = Instant::now();
    let load = load_result(spawn_load_with(
        &sb,
        attacker,
        0,
        "169.254.170.23:80",
        "/v1/credentials",
        400,
        4,
        &[("LOAD_TOKENS", &file.display().to_string())],
    )?)?;
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(load.count(200), 0, "{load:?}");
    assert_eq!(load.errors, 0, "{load:?}");
    // A pod's request-path EKS Auth calls have a budget: 5 at once, one per 5 s after.
    let calls = fake.calls() - before;
    assert!(
        (1..=5 + (elapsed / 5.0).ceil() as usize).contains(&calls),
        "{calls} EKS Auth calls in {elapsed:.1} s: {load:?}"
    );
    let text = scrape(&sb)?;
    assert_eq!(metric(&text, "pod_identity_cache_entries")?, 2, "{text}");
    // The victim is still a hit: no call, same credentials.
    assert_eq!(
        curl(&sb, victim, 0, credentials_url(true), &[])?.status,
        200
    );
    assert_eq!(
        fake.calls() - before,
        calls,
        "the victim's entry was pushed out"
    );
    Ok(())
}

/// Drops what a pod sends to a credential address on any port but 80, on the pod veths (an
/// egress NetworkPolicy allowing TCP 80 to the agent, enforced on the wire).
fn egress_policy(sb: &Sandbox) -> Result<()> {
    for (tool, addr) in [
        ("iptables", "169.254.170.23"),
        ("ip6tables", "fd00:ec2::23"),
    ] {
        run(sb.node().command(tool)?.args([
            "-I", "INPUT", "-i", "vp+", "-d", addr, "-p", "tcp", "!", "--dport", "80", "-j", "DROP",
        ]))?;
    }
    Ok(())
}

#[test]
fn an_egress_policy_allowing_port_80_and_an_in_pod_mesh_proxy_keep_working() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let mut spec = PodSpec::new("app", "reader");
    spec.containers = 2;
    let pod = sb.add_pod(spec)?;
    egress_policy(&sb)?;
    let _agent = Agent::start(&sb, &fake, &[])?;
    for ipv6 in [false, true] {
        let got = curl(&sb, pod, 0, credentials_url(ipv6), &["--max-time", "3"])?;
        assert_eq!(got.status, 200, "policy, ipv6={ipv6}: {}", got.body);
    }
    // An Istio-style sidecar: the pod's outbound TCP is REDIRECTed (in its own namespace) to a
    // proxy in its second container, running as 1337, which dials the original destination.
    let ns = sb.pods()[pod].netns.as_ref().expect("own netns");
    let mut proxies = Vec::new();
    for (tool, port, listen) in [
        ("iptables", "15001", "0.0.0.0:15001"),
        ("ip6tables", "15002", "[::]:15002"),
    ] {
        run(ns.command(tool)?.args([
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-m",
            "owner",
            "!",
            "--uid-owner",
            "1337",
            "-j",
            "REDIRECT",
            "--to-ports",
            port,
        ]))?;
        let relay = helper_bin("relay")?;
        let mut cmd = sb.pod_command(pod, 1, "setpriv")?;
        cmd.args(["--reuid", "1337", "--regid", "1337", "--clear-groups", "--"])
            .arg(relay)
            .args([listen, "--original-dst"]);
        proxies.push(listening(&mut cmd)?);
    }
    for ipv6 in [false, true] {
        let got = curl(&sb, pod, 0, credentials_url(ipv6), &["--max-time", "3"])?;
        assert_eq!(got.status, 200, "sidecar, ipv6={ipv6}: {}", got.body);
    }
    let text = scrape(&sb)?;
    assert_eq!(attribution(&text, "attributed", "attributed")?, 4, "{text}");
    Ok(())
}

#[test]
fn a_proxy_in_another_pod_relaying_a_request_is_a_replay() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let client = sb.add_pod(PodSpec::new("app", "reader"))?;
    let proxy_pod = sb.add_pod(PodSpec::new("infra", "proxy"))?;
    let _agent = Agent::start(&sb, &fake, &[])?;
    // Pod to pod goes through the node.
    run(sb
        .node()
        .command("sysctl")?
        .args(["-qw", "net.ipv4.ip_forward=1"]))?;
    // An in-cluster HTTP proxy the client uses without NO_PROXY for the credential address.
    let listen = format!("{}:3128", sb.pods()[proxy_pod].ipv4);
    let mut cmd = sb.pod_command(proxy_pod, 0, helper_bin("relay")?)?;
    let _proxy = listening(cmd.args([listen.as_str(), "169.254.170.23:80"]))?;
    let via = format!("http://{listen}");
    let got = curl(&sb, client, 0, credentials_url(false), &["-x", &via])?;
    assert_eq!(got.status, 403, "{}", got.body);
    assert_eq!(got.json()?["code"], "TokenPodMismatch");
    // With NO_PROXY set for the credential address, the same client is served.
    let got = curl(
        &sb,
        client,
        0,
        credentials_url(false),
        &["-x", &via, "--noproxy", "169.254.170.23"],
    )?;
    assert_eq!(got.status, 200, "{}", got.body);
    Ok(())
}

#[test]
fn a_pod_holding_tens_of_thousands_of_connections_does_not_starve_another() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let flooder = sb.add_pod(PodSpec::new("app", "reader"))?;
    let quiet = sb.add_pod(PodSpec::new("app", "reader"))?;
    let ns = sb.pods()[flooder].netns.as_ref().expect("own netns");
    // Enough ports for 35,000 connections per address.
    run(ns
        .command("sysctl")?
        .args(["-qw", "net.ipv4.ip_local_port_range=1024 65535"]))?;
    let _agent = Agent::start(&sb, &fake, &["--pod-connect-rate", "0"])?;
    let mut floods = Vec::new();
    for addr in ["169.254.170.23:80", "[fd00:ec2::23]:80"] {
        let mut cmd = sb.pod_command(flooder, 0, helper_bin("conn-flood")?)?;
        cmd.args([addr, "35000", "20"]);
        floods.push(Helper::spawn(&mut cmd)?);
    }
    let opened: u64 = floods
        .iter()
        .map(|f| {
            serde_json::from_str::<serde_json::Value>(&f.line)
                .map(|v| v["opened"].as_u64().unwrap_or(0))
        })
        .sum::<Result<u64, _>>()?;
    // The kernel caps the pod at --pod-max-connections (1024), give or take a connect per
    // CPU racing the count.
    assert!((1024..=1024 + 64).contains(&opened), "opened {opened}");
    for ipv6 in [false, true] {
        let got = curl(&sb, quiet, 0, credentials_url(ipv6), &["--max-time", "2"])?;
        assert_eq!(got.status, 200, "ipv6={ipv6}: {}", got.body);
    }
    let text = scrape(&sb)?;
    let capped = metric(
        &text,
        "pod_identity_ebpf_events{event=\"connection_capped\"}",
    )?;
    assert!(capped >= 70_000 - opened - 100, "{capped} capped:\n{text}");
    assert!(metric(&text, "pod_identity_ebpf_tuples")? < 2048, "{text}");
    assert_eq!(
        metric(
            &text,
            "pod_identity_ebpf_events{event=\"tuple_insert_failed\"}"
        )?,
        0,
        "{text}"
    );
    Ok(())
}

/// A relay started with `cmd`, once it says it is listening.
fn listening(cmd: &mut std::process::Command) -> Result<Helper> {
    let relay = Helper::spawn(cmd)?;
    anyhow::ensure!(
        relay.line.contains("listening"),
        "relay said {:?}",
        relay.line
    );
    Ok(relay)
}

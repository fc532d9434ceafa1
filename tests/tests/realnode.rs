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

/// One real node at a time: two private containerds, their pods and agents under load on
/// this 2-CPU machine broke a CRI connection mid-test twice in three parallel runs (a broken
/// pipe on containerd's socket during the surge test; the test passes alone).
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|p| p.into_inner())
}

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
    let _one = one_at_a_time();
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

/// `curl` in container `c` of pod `i` with `token` (the pod's own when `None`): (status, body).
fn curl_in(node: &RealNode, i: usize, c: usize, token: Option<&str>) -> Result<(u16, String)> {
    let header = match token {
        Some(t) => format!("Authorization: {t}"),
        None => format!(
            "Authorization: {}",
            std::fs::read_to_string(&node.pods()[i].token_file)?
        ),
    };
    let out = node.exec(
        i,
        c,
        &[
            "curl",
            "-s",
            "-w",
            "\n%{http_code}",
            "-H",
            &header,
            tests::clients::credentials_url(false),
        ],
        TIMEOUT,
    )?;
    let (body, status) = out
        .stdout
        .rsplit_once('\n')
        .with_context(|| format!("curl: {out:?}"))?;
    Ok((status.parse()?, body.to_owned()))
}

#[test]
fn a_replayed_token_is_refused_and_a_host_network_pod_is_attributed() -> Result<()> {
    let _one = one_at_a_time();
    let (mut node, fake) = real_node()?;
    let a = node.run_pod("app", "reader", 1, false)?;
    let b = node.run_pod("app", "reader", 1, false)?;
    let host = node.run_pod("app", "reader", 1, true)?;
    let _agent = Agent::start(&node, &fake, &[])?;
    // Pod b presents pod a's token: the kernel says b, the token says a.
    let stolen = std::fs::read_to_string(&node.pods()[a].token_file)?;
    let (status, body) = curl_in(&node, b, 0, Some(&stolen))?;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("TokenPodMismatch"), "{body}");
    assert_eq!(fake.calls(), 0, "nothing was sent to EKS Auth");
    // Each pod with its own token is served; the hostNetwork pod shares the node's network
    // namespace, and the kernel still names its pod.
    for pod in [a, b, host] {
        let (status, body) = curl_in(&node, pod, 0, None)?;
        assert_eq!(status, 200, "pod {pod}: {body}");
    }
    let text = scrape(&node)?;
    assert_eq!(attribution(&text, "attributed", "attributed")?, 3, "{text}");
    assert_eq!(attribution(&text, "attributed", "mismatch")?, 1, "{text}");
    assert_eq!(attribution(&text, "plain", "unattributed")?, 0, "{text}");
    Ok(())
}

#[test]
fn a_restarted_container_is_served_from_the_cache_and_a_removed_pod_is_evicted() -> Result<()> {
    let _one = one_at_a_time();
    let (mut node, fake) = real_node()?;
    let kept = node.run_pod("app", "reader", 1, false)?;
    let removed = node.run_pod("app", "reader", 1, false)?;
    let _agent = Agent::start(&node, &fake, &["--cache-sweep-interval", "1s"])?;
    for pod in [kept, removed] {
        assert_eq!(curl_in(&node, pod, 0, None)?.0, 200);
    }
    assert_eq!(fake.calls(), 2);
    // The kubelet restarts the container after a crash: a new container, a new cgroup, the
    // same pod.
    let before = node.container_cgroup(kept, 0);
    node.restart_container(kept, 0)?;
    let after = node.container_cgroup(kept, 0);
    assert_ne!(before, after);
    assert!(
        !before.exists() && after.exists(),
        "{} -> {}",
        before.display(),
        after.display()
    );
    let (status, body) = curl_in(&node, kept, 0, None)?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.calls(), 2, "the same pod, served from the cache");
    // The pod is deleted: containerd removes its cgroups; the agent's sweep evicts its entry.
    node.remove_pod(removed)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(&node)?;
        // Absent until the first eviction.
        let evicted = metric(
            &text,
            "pod_identity_cache_evictions_total{reason=\"pod_gone\"}",
        )
        .unwrap_or(0);
        if evicted == 1 {
            assert_eq!(metric(&text, "pod_identity_cache_entries")?, 1, "{text}");
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "not evicted: {text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(node
        .sandboxes()?
        .iter()
        .all(|s| s.id != node.pods()[removed].sandbox_id));
    Ok(())
}

/// The environment the DaemonSet's pods get here: the sandbox's AWS settings and the cluster.
fn daemonset_env(fake: &FakeEksAuth) -> Vec<(&'static str, String)> {
    tests::agent::aws_env(fake)
        .into_iter()
        .chain([("CLUSTER_NAME", tests::agent::CLUSTER.to_owned())])
        .collect()
}

/// Waits (like the kubelet's readiness probe) until the agent answers `/readyz` with 200.
fn wait_ready(node: &RealNode, agent: &tests::daemonset::AgentPod) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if tests::agent::probe(node, "/readyz").is_ok_and(|(s, _)| s == 200) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let status = node.container_status(&agent.container_id)?;
            anyhow::bail!(
                "the agent container never became ready (state {}, exit {}): {}",
                status.state,
                status.exit_code,
                node.pod_logs(&agent.uid)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A capability set as /proc shows it (hex), from capability numbers.
fn cap_mask(caps: &[u32]) -> String {
    format!("{:016x}", caps.iter().fold(0u64, |m, c| m | 1 << c))
}

#[test]
fn the_agent_runs_from_its_image_as_the_daemonset_says_and_survives_a_restart() -> Result<()> {
    let _one = one_at_a_time();
    use tests::daemonset::manifest;
    let (mut node, fake) = real_node()?;
    let pod = node.run_pod("app", "reader", 1, false)?;
    // A pod whose containers run as a non-root user: the kubelet gives it the token (0600).
    let private = node.run_pod("app", "reader", 1, false)?;
    let token = &node.pods()[private].token_file;
    std::os::unix::fs::chown(token, Some(1000), Some(1000))?;
    std::fs::set_permissions(token, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    node.import_agent_image(&tests::agent::agent_bin()?)?;
    let env = daemonset_env(&fake);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut agent = node.run_agent(&manifest()?, &env)?;
    assert_eq!(agent.init_exit_code, 0);
    wait_ready(&node, &agent)?;
    // The init container made the credential link in the node's namespace.
    node.node().ip(&["addr", "show", "dev", "pod-id-link0"])?;
    let text = scrape(&node)?;
    assert_eq!(
        metric(&text, "pod_identity_agent_mode{mode=\"ebpf\"}")?,
        1,
        "{text}"
    );
    // The runtime applied the manifest's security context: exactly BPF, NET_ADMIN and
    // NET_BIND_SERVICE, no privilege escalation, the runtime's seccomp filter.
    let pid = node.container_pid(&agent.container_id)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    let granted = cap_mask(&[39, 12, 10]); // CAP_BPF, CAP_NET_ADMIN, CAP_NET_BIND_SERVICE
    assert_eq!(field("CapEff:"), granted, "{status}");
    assert_eq!(field("CapBnd:"), granted, "{status}");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2", "RuntimeDefault is a seccomp filter");
    // What it was not granted fails inside it: without CAP_DAC_READ_SEARCH it cannot read the
    // non-root pod's token (pre-warm skips it), only the other one's.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(&scrape(&node)?, "pod_identity_prewarm_entries_total")? < 1 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "nothing pre-warmed");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        metric(&scrape(&node)?, "pod_identity_prewarm_entries_total")?,
        1
    );
    assert_eq!(fake.calls(), 1, "only the readable token was exchanged");
    // Both pods are served through the kernel path (the private one on its request).
    for p in [pod, private] {
        let (status, body) = curl_in(&node, p, 0, None)?;
        assert_eq!(status, 200, "pod {p}: {body}");
    }
    let text = scrape(&node)?;
    assert_eq!(attribution(&text, "attributed", "attributed")?, 2, "{text}");
    // Killed (SIGKILL) and started again by the runtime: the pinned programs kept the pods
    // steered, the new container serves them again.
    let pods_root = node.cgroups().pods_root().to_path_buf();
    let (_, links_before) = tests::fixtures::attachment(&pods_root)?;
    node.restart_agent(&mut agent, true)?;
    wait_ready(&node, &agent)?;
    let (_, links_after) = tests::fixtures::attachment(&pods_root)?;
    assert_eq!(
        links_after, links_before,
        "the same links, updated in place"
    );
    let (status, body) = curl_in(&node, pod, 0, None)?;
    assert_eq!(status, 200, "{body}");
    let text = scrape(&node)?;
    assert_eq!(attribution(&text, "attributed", "attributed")?, 1, "{text}");
    Ok(())
}

#[test]
fn a_missing_failing_or_silent_runtime_is_one_clear_error_and_the_sandbox_goes_on() -> Result<()> {
    let _one = one_at_a_time();
    let (sb, fake) = tests::fixtures::node(Driver::Cgroupfs)?;
    let silent = sb.dir().join("silent-containerd");
    std::fs::write(&silent, "#!/bin/sh\nexec sleep 600\n")?;
    std::fs::set_permissions(&silent, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut sb = sb;
    for (binary, says) in [
        ("/nonexistent/containerd", "is missing"),
        ("/bin/false", "containerd exited"),
        (silent.to_str().unwrap(), "did not answer CRI within 2s"),
    ] {
        let started = std::time::Instant::now();
        let Err(not_started) =
            RealNode::start_with(sb, std::path::Path::new(binary), Duration::from_secs(2))
        else {
            anyhow::bail!("{binary} started a real node");
        };
        let (why, back) = *not_started;
        let line = format!("{why:#}");
        assert!(line.starts_with("real node unavailable: "), "{line}");
        assert!(line.contains(says), "{binary}: {line}");
        assert!(!line.contains('\n'), "one line: {line}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{binary}: no hang"
        );
        sb = back;
    }
    // Nothing of the attempts is left running, and the sandbox still serves a pod.
    assert!(
        !tests::teardown::processes(&tests::names::run_prefix())
            .iter()
            .any(|(_, cmd)| cmd.contains("silent-containerd") || cmd.contains("sleep 600")),
        "a runtime process survived"
    );
    let pod = sb.add_pod(tests::sandbox::PodSpec::new("app", "reader"))?;
    let _agent = Agent::start(&sb, &fake, &[])?;
    let got = tests::clients::curl(&sb, pod, 0, tests::clients::credentials_url(false), &[])?;
    assert_eq!(got.status, 200, "{}", got.body);
    Ok(())
}

/// The nested-cgroup attack as a root container can run it (seccomp Unconfined, Kubernetes'
/// default): `unshare -UrmC`, mount cgroup2, make a cgroup named after pod `named_after` below
/// its own, move itself there, and ask with `token`. Returns (status, body) and what the
/// process's cgroup was, as the host sees it.
fn nested_cgroup_request(
    node: &RealNode,
    attacker: usize,
    named_after: usize,
    token: &str,
) -> Result<(u16, String, String)> {
    let name = format!("pod{}", node.pods()[named_after].uid);
    let script = r#"set -e
mount -t cgroup2 none /sys/fs/cgroup
mkdir -p "/sys/fs/cgroup/$0"
echo $$ > "/sys/fs/cgroup/$0/cgroup.procs"
grep "^0::" /proc/self/cgroup
exec curl -s -w "\n%{http_code}" -H "Authorization: $1" http://169.254.170.23/v1/credentials"#;
    let out = node.exec(
        attacker,
        0,
        &["unshare", "-UrmC", "sh", "-c", script, &name, token],
        TIMEOUT,
    )?;
    anyhow::ensure!(out.code == 0, "the recipe failed: {out:?}");
    let (head, status) = out
        .stdout
        .rsplit_once('\n')
        .with_context(|| format!("{out:?}"))?;
    let (cgroup, body) = head.split_once('\n').unwrap_or(("", head));
    // The cgroup as the host names it: the process's, read from outside its namespace.
    Ok((status.parse()?, body.to_owned(), cgroup.to_owned()))
}

#[test]
fn a_root_container_nesting_a_cgroup_named_after_another_pod_is_still_its_own_pod() -> Result<()> {
    let _one = one_at_a_time();
    let (mut node, fake) = real_node()?;
    let victim = node.run_pod("app", "reader", 1, false)?;
    let attacker = node.run_pod("app", "reader", 1, false)?;
    let _agent = Agent::start(&node, &fake, &[])?;
    let stolen = std::fs::read_to_string(&node.pods()[victim].token_file)?;
    let own = std::fs::read_to_string(&node.pods()[attacker].token_file)?;
    let (status, body, cgroup) = nested_cgroup_request(&node, attacker, victim, &stolen)?;
    // Inside its cgroup namespace the process sits in /pod<victim uid>: the recipe worked.
    assert_eq!(
        cgroup,
        format!("0::/pod{}", node.pods()[victim].uid),
        "{body}"
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("TokenPodMismatch"), "{body}");
    assert_eq!(fake.calls(), 0, "nothing was sent to EKS Auth");
    // A legitimate nested cgroup (systemd or a runtime inside a container) is its pod.
    let (status, body, _) = nested_cgroup_request(&node, attacker, victim, &own)?;
    assert_eq!(status, 200, "{body}");
    let text = scrape(&node)?;
    assert_eq!(attribution(&text, "attributed", "mismatch")?, 1, "{text}");
    assert_eq!(attribution(&text, "attributed", "attributed")?, 1, "{text}");
    // Under the runtime's default seccomp profile (RuntimeDefault, which the pod security
    // standards' "restricted" level asks for) the recipe stops at its first step.
    node.app_seccomp = Some(tests::realnode::cri::SecurityProfile {
        profile_type: tests::realnode::cri::security_profile::ProfileType::RuntimeDefault as i32,
        ..Default::default()
    });
    let confined = node.run_pod("app", "reader", 1, false)?;
    let out = node.exec(confined, 0, &["unshare", "-UrmC", "true"], TIMEOUT)?;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("Operation not permitted"), "{out:?}");
    Ok(())
}

#[test]
fn a_surge_rollout_hands_over_under_load_and_the_old_pod_leaves_clean() -> Result<()> {
    let _one = one_at_a_time();
    use tests::daemonset::manifest;
    let (mut node, fake) = real_node()?;
    let pod = node.run_pod("app", "reader", 1, false)?;
    node.import_agent_image(&tests::agent::agent_bin()?)?;
    let env = daemonset_env(&fake);
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // The load below opens ~700 connections a second, over the default connect budget: lift
    // the budgets, so that a refusal can only come from the rollout.
    env.extend([
        ("POD_IDENTITY_POD_CONNECT_RATE", "0"),
        ("POD_IDENTITY_POD_REQUEST_RATE", "0"),
    ]);
    let ds = manifest()?;
    let old = node.run_agent(&ds, &env)?;
    wait_ready(&node, &old)?;
    let (status, body) = curl_in(&node, pod, 0, None)?;
    assert_eq!(status, 200, "{body}");
    let calls = fake.calls();
    let pods_root = node.cgroups().pods_root().to_path_buf();
    let (_, links_before) = tests::fixtures::attachment(&pods_root)?;

    // The app's own load client in its container, a new connection per request, paced to
    // span the rollout; a 200 without the pod's name in the session token is a wrong answer.
    let expect = format!("LOAD_EXPECT=.{}.", node.pods()[pod].name);
    let token = format!("{TOKEN_MOUNT}/{TOKEN_FILE_NAME}");
    let load_bin = bin("load")?;
    let load_cmd = [
        "env",
        "LOAD_INTERVAL_MS=4",
        &expect,
        &load_bin,
        "169.254.170.23:80",
        "169.254.170.23",
        &token,
        "3000",
        "4",
    ];
    let node_ref = &node;
    let (load, new, rollout) = std::thread::scope(|s| -> Result<_> {
        let load = s.spawn(|| node_ref.exec(pod, 0, &load_cmd, Duration::from_secs(120)));
        std::thread::sleep(Duration::from_millis(300));
        let began = std::time::Instant::now();
        // As the DaemonSet controller and the kubelet do with maxSurge 1: the new pod
        // starts beside the old; once it is ready, the old pod is deleted.
        let new = node_ref.surge_agent(&ds, &env, &old)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !node_ref
            .pod_logs(&new.uid)
            .contains("took over the listeners and the cache")
        {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the new agent did not take over: {}",
                node_ref.pod_logs(&new.uid)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        wait_ready(node_ref, &new)?;
        anyhow::ensure!(!load.is_finished(), "the load ended before the rollout did");
        let old_uid = old.uid.clone();
        let stopping = std::time::Instant::now();
        let code = node_ref.delete_agent(old, 30)?;
        anyhow::ensure!(
            code == 0,
            "the old agent exited {code} after {:?}: {}",
            stopping.elapsed(),
            node_ref.pod_logs(&old_uid)
        );
        let rollout = began.elapsed();
        let load = load.join().expect("load thread")?;
        Ok((load, new, rollout))
    })?;
    anyhow::ensure!(load.code == 0, "load: {load:?}");
    let load: tests::clients::LoadResult = serde_json::from_str(load.stdout.trim())?;
    eprintln!("surge rollout (new pod started → old pod removed) {rollout:?}; load {load:?}");
    assert!(
        load.all_answered(3000),
        "{load:?}\nnew agent: {}",
        node.pod_logs(&new.uid)
    );
    assert_eq!(
        fake.calls(),
        calls,
        "the cache came along: no EKS Auth call"
    );
    let (_, links_after) = tests::fixtures::attachment(&pods_root)?;
    assert_eq!(
        links_after, links_before,
        "the same links, updated in place"
    );
    let text = scrape(&node)?;
    assert_eq!(
        metric(
            &text,
            "pod_identity_handovers_total{direction=\"taken\",outcome=\"ok\"}"
        )?,
        1,
        "{text}"
    );
    let (status, body) = curl_in(&node, pod, 0, None)?;
    assert_eq!(status, 200, "{body}");
    drop(new);
    Ok(())
}

/// How users install: a values file written for upstream's chart, rendered by helm with the
/// image pointed at a registry (pushed there as `cargo xtask image --push` does); the runtime
/// pulls it over CRI as the kubelet does, and the pod runs as the render says.
#[test]
fn a_render_of_upstreams_values_runs_from_an_image_the_runtime_pulls_from_a_registry() -> Result<()>
{
    let _one = one_at_a_time();
    use tests::image::Arch;
    let (mut node, fake) = real_node()?;
    let pod = node.run_pod("app", "reader", 1, false)?;
    let registry = tests::registry::Registry::start(&node, 5000)?;
    // The image as `cargo xtask image` makes it: an index of amd64 and arm64; the runtime
    // picks its platform's.
    let (amd64, arm64) = (tests::agent::agent_bin()?, tests::agent::agent_bin_arm64()?);
    let tar = tests::image::agent_image_for(
        &[(Arch::Amd64, &amd64), (Arch::Arm64, &arm64)],
        &node.scratch("pushed-image"),
        env!("CARGO_PKG_VERSION"),
    )?;
    let reference = registry.push(
        &node,
        &tar,
        &format!("eks-pod-identity-agent:{}", env!("CARGO_PKG_VERSION")),
    )?;
    node.trust_plain_http(&registry.host)?;
    let objects = tests::chart::helm_template(
        &["ci/upstream-values.yaml"],
        &[&format!("image.override={reference}")],
    )?;
    let ds = tests::chart::of_kind(&objects, "DaemonSet")[0].clone();
    assert_eq!(
        ds["spec"]["template"]["spec"]["containers"][0]["image"],
        reference.as_str()
    );
    let env = daemonset_env(&fake);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let agent = node.run_agent(&ds, &env)?;
    wait_ready(&node, &agent)?;
    // Pulled, not imported: the runtime resolved the tag at the registry and fetched the
    // image's blobs (config and layer) from it.
    let log = registry.log();
    let by_runtime: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"containerd/") && !l.starts_with("time="))
        .collect();
    let resolved = format!(
        "/v2/eks-pod-identity-agent/manifests/{} HTTP/1.1\" 200",
        env!("CARGO_PKG_VERSION")
    );
    assert!(by_runtime.iter().any(|l| l.contains(&resolved)), "{log}");
    let blobs = by_runtime
        .iter()
        .filter(|l| {
            l.contains("\"GET /v2/eks-pod-identity-agent/blobs/sha256:") && l.contains("\" 200 ")
        })
        .count();
    assert!(blobs >= 2, "config and layer: {log}");
    let (status, body) = curl_in(&node, pod, 0, None)?;
    assert_eq!(status, 200, "{body}");
    let text = scrape(&node)?;
    assert_eq!(attribution(&text, "attributed", "attributed")?, 1, "{text}");
    assert_eq!(fake.calls(), 1);
    Ok(())
}

/// The operator's view: a Prometheus in the node's namespace scrapes the agent (run from the
/// chart's default render) where the chart's pod annotations say, evaluates the chart's alert
/// rules, and reports through its own API what a pod's replayed token and an EKS Auth outage
/// look like.
#[test]
fn a_prometheus_scraping_the_agent_as_the_chart_says_sees_a_replay_and_an_eks_auth_outage(
) -> Result<()> {
    let _one = one_at_a_time();
    use tests::fake_eks::Fault;
    use tests::prometheus::{Prometheus, Target};
    let (mut node, fake) = real_node()?;
    let a = node.run_pod("app", "reader", 1, false)?;
    let b = node.run_pod("app", "reader", 1, false)?;
    node.import_agent_image(&tests::agent::agent_bin()?)?;
    let objects = tests::chart::helm_template(&[], &[])?;
    let ds = tests::chart::of_kind(&objects, "DaemonSet")[0].clone();
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    let target = Target {
        address: format!(
            "127.0.0.1:{}",
            annotations["prometheus.io/port"]
                .as_str()
                .context("prometheus.io/port")?
        ),
        path: annotations["prometheus.io/path"]
            .as_str()
            .context("prometheus.io/path")?
            .to_owned(),
    };
    let env = daemonset_env(&fake);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let agent = node.run_agent(&ds, &env)?;
    wait_ready(&node, &agent)?;
    let rules = tests::chart::repo("deploy/chart/files/alerts.yaml");
    let prom = Prometheus::start(&node, 9090, &target, &rules)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while prom.query(&node, "pod_identity_ready")? != Some(1.0) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no ready agent in Prometheus: targets {:?}; {}",
            prom.targets(&node)?,
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(prom.targets(&node)?, vec![("up".into(), String::new())]);
    assert_eq!(
        prom.query(&node, "pod_identity_agent_mode{mode=\"ebpf\"}")?,
        Some(1.0)
    );
    // Serving normally: a few evaluations later, nothing pending or firing.
    for pod in [a, b] {
        assert_eq!(curl_in(&node, pod, 0, None)?.0, 200);
    }
    std::thread::sleep(Duration::from_secs(3));
    let quiet = prom.alerts(&node)?;
    assert!(
        quiet.is_empty(),
        "alerts while all is well: {quiet:?}\n{}",
        node.pod_logs(&agent.uid)
    );
    // Pod b presents pod a's token: refused, and the replay alert fires at once (no `for`).
    let stolen = std::fs::read_to_string(&node.pods()[a].token_file)?;
    let (status, body) = curl_in(&node, b, 0, Some(&stolen))?;
    assert_eq!(status, 403, "{body}");
    let started = std::time::Instant::now();
    let replay = prom.wait_for_alert(
        &node,
        "PodIdentityAgentReplayedToken",
        &["firing"],
        Duration::from_secs(20),
    )?;
    println!(
        "PIA-NOTE alerts: PodIdentityAgentReplayedToken firing {:.1} s after the replay: {}",
        started.elapsed().as_secs_f64(),
        replay.labels
    );
    assert_eq!(replay.labels["outcome"], "mismatch");
    assert_eq!(replay.labels["job"], tests::prometheus::JOB);
    // What the runbook tells the operator to look for: both pods, by UID, and never the token.
    let log = node.pod_logs(&agent.uid);
    let line = log
        .lines()
        .find(|l| l.contains("TokenPodMismatch"))
        .with_context(|| format!("no TokenPodMismatch line: {log}"))?;
    assert!(line.contains("\"WARN\""), "{line}");
    assert!(line.contains(&node.pods()[b].uid), "{line}");
    assert!(line.contains(&node.pods()[a].uid), "{line}");
    assert!(!log.contains(stolen.trim()), "the token was logged");
    // EKS Auth goes down: a new pod identity's calls fail; the alert is pending (it fires
    // after 10 minutes of it, which promtool's unit test covers).
    fake.set_fault(Fault::Status(503));
    let c = node.run_pod("app", "reader", 1, false)?;
    let (status, body) = curl_in(&node, c, 0, None)?;
    assert_eq!(status, 503, "{body}");
    let started = std::time::Instant::now();
    let outage = prom.wait_for_alert(
        &node,
        "PodIdentityAgentEksAuthUnavailable",
        &["pending", "firing"],
        Duration::from_secs(30),
    )?;
    println!(
        "PIA-NOTE alerts: PodIdentityAgentEksAuthUnavailable {} {:.1} s after the outage began",
        outage.state,
        started.elapsed().as_secs_f64()
    );
    // Pods already served keep their credentials meanwhile.
    assert_eq!(curl_in(&node, a, 0, None)?.0, 200);
    let active: Vec<String> = prom
        .alerts(&node)?
        .into_iter()
        .map(|a| format!("{} {}", a.name, a.state))
        .collect();
    println!("PIA-NOTE alerts: active at the end: {active:?}");
    for name in [
        "PodIdentityAgentDown",
        "PodIdentityAgentNotReady",
        "PodIdentityAgentEbpfFallback",
        "PodIdentityAgentHookBypassed",
        "PodIdentityAgentCredentialsNearExpiry",
    ] {
        assert!(
            !active.iter().any(|a| a.starts_with(&format!("{name} "))),
            "{name} went off: {active:?}"
        );
    }
    Ok(())
}

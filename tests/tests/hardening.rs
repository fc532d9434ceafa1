//! Hardening: a corpus of bad and hostile requests, upstream faults, and a crash under load.
//! Each bad input gets its exact status (or a clean close) and a metric; nothing panics; a
//! healthy pod keeps being served throughout.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use base64::Engine as _;
use tests::agent::{scrape, Agent};
use tests::cgroups::Driver;
use tests::clients::{credentials_url, curl, load_result, raw_http, spawn_load, spawn_load_with};
use tests::fake_eks::Fault;
use tests::fixtures::{metric, node};
use tests::sandbox::PodSpec;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

/// An unsigned JWT with `payload` as claims.
fn jwt(payload: &str) -> String {
    format!(
        "{}.{}.c2ln",
        b64(r#"{"alg":"RS256","kid":"x"}"#),
        b64(payload)
    )
}

/// A request from the bad pod: method, target, headers after Host and Authorization.
fn request(
    method: &str,
    target: &str,
    host: Option<&str>,
    token: Option<&str>,
    extra: &str,
) -> Vec<u8> {
    let mut r = format!("{method} {target} HTTP/1.1\r\n");
    if let Some(h) = host {
        r.push_str(&format!("Host: {h}\r\n"));
    }
    if let Some(t) = token {
        r.push_str(&format!("Authorization: {t}\r\n"));
    }
    r.push_str(extra);
    r.push_str("Connection: close\r\n\r\n");
    r.into_bytes()
}

#[test]
fn a_corpus_of_bad_requests_gets_exact_answers_while_a_healthy_pod_is_served() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let bad = sb.add_pod(PodSpec::new("app", "reader"))?;
    let good = sb.add_pod(PodSpec::new("app", "reader"))?;
    let agent = Agent::start(&sb, &fake, &[])?;
    let own = std::fs::read_to_string(&sb.pods()[bad].token_file)?;
    let other = std::fs::read_to_string(&sb.pods()[good].token_file)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let subject = sb.pods()[bad].subject();
    let expired = sb.issuer().mint_window(&subject, now - 7200, now - 3600);
    let early = sb.issuer().mint_window(&subject, now + 3600, now + 7200);
    let h = Some("169.254.170.23");
    let t = Some(own.as_str());
    let path = "/v1/credentials";
    let huge_token = "a".repeat(20 * 1024);
    let claims_uid = jwt(&format!(
        r#"{{"exp":{},"kubernetes.io":{{"pod":{{"uid":"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"}}}}}}"#,
        now + 3600
    ));
    // (name, request bytes, expected status; 0 = the connection is closed without an answer)
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("absent token", request("GET", path, h, None, ""), 400),
        ("empty token", request("GET", path, h, Some(""), ""), 400),
        ("blank token", request("GET", path, h, Some("   "), ""), 400),
        (
            "huge token",
            request("GET", path, h, Some(&huge_token), ""),
            400,
        ),
        ("not a JWT", request("GET", path, h, Some("hello"), ""), 400),
        (
            "two segments",
            request("GET", path, h, Some("a.b"), ""),
            400,
        ),
        (
            "four segments",
            request("GET", path, h, Some("a.b.c.d"), ""),
            400,
        ),
        (
            "bad base64 header",
            request("GET", path, h, Some("!!!.e30.c2ln"), ""),
            400,
        ),
        (
            "bad base64 payload",
            request("GET", path, h, Some(&format!("{}.!!!.c2ln", b64("{}"))), ""),
            400,
        ),
        (
            "payload not JSON",
            request(
                "GET",
                path,
                h,
                Some(&format!("{}.{}.c2ln", b64("{}"), b64("nope"))),
                "",
            ),
            400,
        ),
        (
            "payload an array",
            request("GET", path, h, Some(&jwt("[1,2]")), ""),
            400,
        ),
        (
            "exp a string",
            request("GET", path, h, Some(&jwt(r#"{"exp":"soon"}"#)), ""),
            400,
        ),
        (
            "no pod claim",
            request(
                "GET",
                path,
                h,
                Some(&jwt(&format!(r#"{{"exp":{}}}"#, now + 3600))),
                "",
            ),
            403,
        ),
        (
            "another pod's uid claim",
            request("GET", path, h, Some(&claims_uid), ""),
            403,
        ),
        ("expired", request("GET", path, h, Some(&expired), ""), 400),
        (
            "not valid yet",
            request("GET", path, h, Some(&early), ""),
            400,
        ),
        (
            "another pod's token",
            request("GET", path, h, Some(&other), ""),
            403,
        ),
        (
            "wrong Host",
            request("GET", path, Some("evil.example"), t, ""),
            403,
        ),
        ("no Host", request("GET", path, None, t, ""), 400),
        (
            "Host with port",
            request("GET", path, Some("169.254.170.23:80"), t, ""),
            200,
        ),
        (
            "absolute form",
            request("GET", "http://169.254.170.23/v1/credentials", h, t, ""),
            200,
        ),
        (
            "absolute form, other host",
            request(
                "GET",
                "http://evil.example/v1/credentials",
                Some("evil.example"),
                t,
                "",
            ),
            403,
        ),
        (
            "CONNECT",
            request("CONNECT", "169.254.170.23:80", h, t, ""),
            405,
        ),
        (
            "POST",
            request("POST", path, h, t, "Content-Length: 0\r\n"),
            405,
        ),
        ("DELETE", request("DELETE", path, h, t, ""), 405),
        (
            "unknown path",
            request("GET", "/latest/meta-data/", h, t, ""),
            404,
        ),
        (
            "path prefix",
            request("GET", "/v1/credentials/extra", h, t, ""),
            404,
        ),
        (
            "query ignored",
            request("GET", "/v1/credentials?role=admin", h, t, ""),
            200,
        ),
        (
            "HTTP/1.0",
            format!("GET {path} HTTP/1.0\r\nHost: 169.254.170.23\r\nAuthorization: {own}\r\n\r\n")
                .into_bytes(),
            200,
        ),
        (
            "CR in a header",
            format!(
                "GET {path} HTTP/1.1\r\nHost: 169.254.170.23\r\nAuthorization: {own}\rX\r\n\r\n"
            )
            .into_bytes(),
            400,
        ),
        (
            "NUL in a header",
            format!("GET {path} HTTP/1.1\r\nHost: 169.254.170.23\r\nX-Nul: a\0b\r\n\r\n")
                .into_bytes(),
            400,
        ),
        (
            "huge header",
            request(
                "GET",
                path,
                h,
                t,
                &format!("X-Big: {}\r\n", "b".repeat(40 * 1024)),
            ),
            431,
        ),
        (
            "many headers",
            request("GET", path, h, t, &"X-A: b\r\n".repeat(200)),
            431,
        ),
        (
            "garbage",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n".to_vec(),
            400,
        ),
        (
            "early close mid-request",
            b"GET /v1/credentials HTTP/1.1\r\nHost: 169.2".to_vec(),
            0,
        ),
    ];
    assert!(cases.len() >= 30);
    let calls_before = fake.calls();
    for (name, bytes, want) in &cases {
        let r = raw_http(&sb, bad, "169.254.170.23:80", bytes, &[])?;
        assert_eq!(r.status, *want, "{name}: {}", r.response);
        // The healthy pod is served between every two bad requests.
        assert_eq!(
            curl(&sb, good, 0, credentials_url(false), &[])?.status,
            200,
            "after {name}"
        );
    }
    // Early close mid-request: the client stops sending halfway through the head.
    let early = raw_http(
        &sb,
        bad,
        "169.254.170.23:80",
        b"GET /v1/credentials HTTP/1.1\r\nHost: 169.2",
        &["--half-close"],
    )?;
    assert_eq!(early.status, 0, "{early:?}");
    assert!(early.closed_after_ms < 2_000, "{early:?}");
    // Pipelined requests on one connection: both answered, in order.
    let mut two = request("GET", path, h, t, "");
    two.truncate(two.len() - "Connection: close\r\n\r\n".len());
    two.extend_from_slice(b"\r\n");
    two.extend(request("GET", "/nope", h, t, ""));
    let r = raw_http(&sb, bad, "169.254.170.23:80", &two, &[])?;
    let statuses: Vec<&str> = r
        .response
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &r.response[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "404"], "{}", r.response);
    // Slowloris and a half-open connection (head sent, never finished): both cut off.
    let slow = raw_http(
        &sb,
        bad,
        "169.254.170.23:80",
        b"GET /v1/credentials HTTP/1.1\r\nHost: 169.254.170.23\r\nX: aaaaaaaa",
        &["--drip", "1"],
    )?;
    assert!(
        slow.closed_after_ms < 9_000 && slow.status != 200,
        "{slow:?}"
    );
    // Nothing bad reached EKS Auth beyond the one good identity per pod.
    assert!(
        fake.calls() - calls_before <= 2,
        "{} EKS Auth calls",
        fake.calls() - calls_before
    );
    let text = scrape(&sb)?;
    // 400s and 431s the HTTP parser gives are counted as connection errors (below).
    for code in ["400", "403", "404", "405"] {
        let n = metric(
            &text,
            &format!("pod_identity_http_response{{code=\"{code}\"}}"),
        )?;
        assert!(n > 0, "no metric for {code}:\n{text}");
    }
    assert!(
        metric(
            &text,
            "pod_identity_connection_errors_total{kind=\"parse\"}"
        )? > 0,
        "{text}"
    );
    // The slow head was ended by the agent's head timeout, and counted as one.
    assert!(
        metric(
            &text,
            "pod_identity_connection_errors_total{kind=\"timeout\"}"
        )? > 0,
        "{text}"
    );
    assert!(!agent.log_text().contains("panicked"), "the agent panicked");
    Ok(())
}

#[test]
fn upstream_faults_are_each_a_503_with_a_message_and_counted() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    for _ in 0..5 {
        sb.add_pod(PodSpec::new("app", "reader"))?;
    }
    let agent = Agent::start(
        &sb,
        &fake,
        &["--upstream-timeout", "1s", "--upstream-retry-window", "0s"],
    )?;
    // One pod per fault, so none is answered from the cache.
    for (pod, (fault, code)) in [
        (Fault::Latency(Duration::from_secs(3)), "CredentialsPending"),
        (Fault::Garbage, "InvalidResponse"),
        (Fault::NoCredentials, "IncompleteResponse"),
        (Fault::Truncated, "RequestFailed"),
        (Fault::Reset, "RequestFailed"),
    ]
    .into_iter()
    .enumerate()
    {
        fake.set_fault(fault.clone());
        let got = curl(&sb, pod, 0, credentials_url(false), &[])?;
        assert_eq!(got.status, 503, "{fault:?}: {}", got.body);
        let body = got.json()?;
        assert_eq!(body["code"], code, "{fault:?}: {body}");
        assert!(
            !body["message"].as_str().unwrap_or("").is_empty(),
            "{fault:?}"
        );
    }
    let text = scrape(&sb)?;
    assert_eq!(
        metric(&text, "pod_identity_http_response{code=\"503\"}")?,
        5,
        "{text}"
    );
    assert!(!agent.log_text().contains("panicked"));
    Ok(())
}

#[test]
fn an_unreachable_or_tls_broken_eks_auth_is_a_503_too() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let pod = sb.add_pod(PodSpec::new("app", "reader"))?;
    // Nothing listens on port 9 of the node's loopback: connection refused. And TLS spoken to
    // the fake's plain-HTTP port: the handshake fails.
    let tls = fake.endpoint().replace("http://", "https://");
    for endpoint in ["http://127.0.0.1:9", tls.as_str()] {
        let agent = Agent::start(
            &sb,
            &fake,
            &["--endpoint", endpoint, "--upstream-retry-window", "0s"],
        )?;
        let got = curl(&sb, pod, 0, credentials_url(false), &[])?;
        assert_eq!(got.status, 503, "{endpoint}: {}", got.body);
        let body = got.json()?;
        assert_eq!(body["code"], "RequestFailed", "{endpoint}: {body}");
        assert!(!body["message"].as_str().unwrap_or("").is_empty());
        drop(agent);
    }
    Ok(())
}

#[test]
fn kill_9_under_load_recovers_fast_and_never_serves_a_wrong_identity() -> Result<()> {
    let (mut sb, fake) = node(Driver::Systemd)?;
    let a = sb.add_pod(PodSpec::new("app", "reader"))?;
    let b = sb.add_pod(PodSpec::new("app", "reader"))?;
    let first = Agent::start(&sb, &fake, tests::fixtures::UNLIMITED)?;
    // Each pod's own credentials, to recognise a wrong answer.
    let key_a = curl(&sb, a, 0, credentials_url(false), &[])?.json()?["AccessKeyId"].clone();
    let key_b = curl(&sb, b, 0, credentials_url(false), &[])?.json()?["AccessKeyId"].clone();
    assert_ne!(key_a, key_b);
    // A 200 without pod B's name in the session token (the fake puts it there) would count as
    // a wrong identity (status 299). New credentials after the restart are fine.
    let marker = format!(".{}.", sb.pods()[b].name);
    // Bounded: 20,000 cache hits take a few seconds; the kill lands in the middle.
    let load = spawn_load_with(
        &sb,
        b,
        0,
        "169.254.170.23:80",
        "/v1/credentials",
        20_000,
        4,
        &[("LOAD_EXPECT", marker.as_str())],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    first.signal(libc::SIGKILL);
    drop(first);
    let down = Instant::now();
    let second = Agent::start(&sb, &fake, tests::fixtures::UNLIMITED)?;
    let ready_after = down.elapsed();
    let load = load_result(load)?;
    eprintln!("ready {ready_after:?} after kill -9; load {load:?}");
    assert!(
        ready_after < Duration::from_secs(2),
        "ready after {ready_after:?}"
    );
    // Answers during and after the crash: all 200, no broken connection but the killed ones.
    let answered: u64 = load.statuses.values().sum();
    assert_eq!(load.count(200), answered, "{load:?}");
    // Connections the kill cut off (in flight, or queued on the dead listener): a handful.
    assert!(load.broken <= 16, "{load:?}");
    // And every 200 carried the right pod's identity.
    for (pod, key) in [(a, &key_a), (b, &key_b)] {
        for ipv6 in [false, true] {
            let got = curl(&sb, pod, 0, credentials_url(ipv6), &[])?;
            assert_eq!(got.status, 200);
            let served = got.json()?["AccessKeyId"].clone();
            let other = if pod == a { &key_b } else { &key_a };
            assert_ne!(&served, other, "pod {pod} got the other pod's credentials");
            let _ = key;
        }
    }
    drop(second);
    Ok(())
}

#[test]
fn one_pod_flooding_the_agent_is_held_to_its_budget_and_others_are_served() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let flooder = sb.add_pod(PodSpec::new("app", "reader"))?;
    let quiet = sb.add_pod(PodSpec::new("app", "reader"))?;
    // The quiet pod asks at most ~600/s (sequential cache hits), under its 1,000/s budget.
    // The flood reuses its 16 connections (keep-alive): the kernel's connect budget never
    // sees it, so the user-space request budget is what holds it.
    let _agent = Agent::start(
        &sb,
        &fake,
        &[
            "--pod-request-rate",
            "1000",
            "--pod-request-burst",
            "1000",
            // The quiet pod opens ~600 connections/s itself; the kernel budget has its own test.
            "--pod-connect-rate",
            "0",
        ],
    )?;
    // The quiet pod alone: its unloaded latency.
    let alone = load_result(spawn_load(
        &sb,
        quiet,
        0,
        "169.254.170.23:80",
        "/v1/credentials",
        300,
        1,
    )?)?;
    // Its bucket refills; then the flood (bounded: 20,000 requests, 16 at a time) with the
    // quiet pod asking beside it.
    std::thread::sleep(Duration::from_secs(1));
    let flood = spawn_load_with(
        &sb,
        flooder,
        0,
        "169.254.170.23:80",
        "/v1/credentials",
        20_000,
        16,
        &[("LOAD_KEEPALIVE", "1")],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let beside = load_result(spawn_load(
        &sb,
        quiet,
        0,
        "169.254.170.23:80",
        "/v1/credentials",
        150,
        1,
    )?)?;
    let flood = load_result(flood)?;
    eprintln!(
        "quiet pod p50/p99 alone {}/{} µs, beside the flood {}/{} µs; flood: {:?} in {} ms",
        alone.p50_us, alone.p99_us, beside.p50_us, beside.p99_us, flood.statuses, flood.elapsed_ms
    );
    // Budgets per pod: the quiet pod (well under its rate) is never refused.
    assert_eq!(beside.count(200), 150, "{beside:?}");
    assert!(
        flood.count(503) > 0,
        "the flooding pod was never held back: {flood:?}"
    );
    let allowed = 1000.0 + 1000.0 * flood.elapsed_ms as f64 / 1000.0;
    assert!(
        flood.count(200) as f64 <= allowed * 1.05,
        "{} admitted, budget {allowed:.0}",
        flood.count(200)
    );
    let text = scrape(&sb)?;
    assert_eq!(
        metric(
            &text,
            "pod_identity_admission_rejected_total{listener=\"attributed\"}"
        )?,
        flood.count(503),
        "{text}"
    );
    Ok(())
}

#[test]
fn a_pod_over_its_connect_budget_is_refused_in_the_kernel_and_the_others_are_not() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    // Two containers: the budget is the pod's, not each container's.
    let flooder = sb.add_pod(PodSpec {
        containers: 2,
        ..PodSpec::new("app", "reader")
    })?;
    let quiet = sb.add_pod(PodSpec::new("app", "reader"))?;
    // 5 connects/s, 10 at once: small enough to cross in a test, with no request budget.
    let agent = Agent::start(
        &sb,
        &fake,
        &[
            "--pod-request-rate",
            "0",
            "--pod-connect-rate",
            "5",
            "--pod-connect-burst",
            "10",
            "--cache-sweep-interval",
            "1s",
        ],
    )?;
    // The quiet pod's first connect is admitted and gives it a budget of its own.
    assert_eq!(
        curl(&sb, quiet, 0, credentials_url(false), &[])?.status,
        200
    );
    // How the kernel refuses depends on it: with `bpf_set_retval` (5.18+) as a closed port
    // does, ECONNREFUSED; before, the connect fails with EPERM (docs/kernels.md).
    let set_retval = metric(
        &scrape(&sb)?,
        "pod_identity_ebpf_feature{feature=\"set_retval\"}",
    )?;
    let refusal = if set_retval == 1 {
        "ConnectionRefused"
    } else {
        "PermissionDenied"
    };
    // 60 connects, 30 over IPv4 from one container, then 30 over IPv6 from the other (one
    // at a time: concurrent charges of one pod may each be admitted, see the operator's
    // guide; this checks the arithmetic). A refused connect backs off 10 ms.
    let started = Instant::now();
    let mut admitted = 0;
    let mut refused = 0;
    for (c, addr) in [(0, "169.254.170.23:80"), (1, "[fd00:ec2::23]:80")] {
        let r = load_result(spawn_load(&sb, flooder, c, addr, "/v1/credentials", 30, 1)?)?;
        // Refused in the kernel, one way only.
        assert_eq!(
            r.refused,
            r.connect_errors.get(refusal).copied().unwrap_or(0),
            "{r:?}"
        );
        assert_eq!(r.broken, 0, "{r:?}");
        admitted += r.count(200);
        refused += r.refused;
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    // Each of the 60 attempts was answered or refused at connect (load does not retry).
    assert_eq!(admitted + refused, 60);
    // At least the burst, at most the burst plus what 5/s refilled meanwhile.
    let budget = 10.0 + 5.0 * elapsed_ms as f64 / 1000.0;
    assert!(
        (10..=(budget + 1.0) as u64).contains(&admitted),
        "{admitted} connects admitted in {elapsed_ms} ms, budget {budget:.0}"
    );
    assert!(refused > 0, "the flooding pod was never refused");
    // The quiet pod, beside it, is not.
    for ipv6 in [false, true] {
        assert_eq!(curl(&sb, quiet, 0, credentials_url(ipv6), &[])?.status, 200);
    }
    // The agent never saw the refused connects; the kernel counted them, per pod.
    let text = scrape(&sb)?;
    let events = |event: &str| {
        metric(
            &text,
            &format!("pod_identity_ebpf_events{{event=\"{event}\"}}"),
        )
    };
    assert_eq!(events("budget_refused")?, refused, "{text}");
    assert_eq!(events("budget_untracked")?, 0, "{text}");
    assert_eq!(
        events("marked4")? + events("marked6")?,
        admitted + 3,
        "{text}"
    );
    let per_pod = |i: usize| {
        metric(
            &text,
            &format!(
                "pod_identity_pod_connects_refused{{pod=\"{}\"}}",
                sb.pods()[i].uid
            ),
        )
    };
    assert_eq!(per_pod(flooder)?, refused, "{text}");
    assert!(
        per_pod(quiet).is_err(),
        "the quiet pod has no refusals: {text}"
    );
    assert_eq!(metric(&text, "pod_identity_ebpf_pod_budgets")?, 2, "{text}");
    // Fail-open: a process in the QoS cgroup itself is in no pod, so it has no budget: its
    // connects proceed (the agent then refuses it, 403 NotAPod) and are counted untracked.
    let qos = sb.cgroups().pods_root().join("besteffort");
    for _ in 0..15 {
        let out = sb
            .pod_netns_command(quiet, &qos, "curl")?
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["-H", "Authorization: x.y.z", credentials_url(false)])
            .output()?;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "403", "{out:?}");
    }
    let text = scrape(&sb)?;
    assert_eq!(
        metric(
            &text,
            "pod_identity_ebpf_events{event=\"budget_untracked\"}"
        )?,
        15,
        "{text}"
    );
    // The budget refills: two seconds idle buy 10 connects again.
    std::thread::sleep(Duration::from_secs(2));
    let again = load_result(spawn_load(
        &sb,
        flooder,
        0,
        "169.254.170.23:80",
        "/v1/credentials",
        10,
        1,
    )?)?;
    assert_eq!((again.count(200), again.refused), (10, 0), "{again:?}");
    // The pod is deleted: its budget goes with its cgroup at the next sweep.
    let containers = &sb.pods()[flooder].containers;
    for dir in containers {
        std::fs::remove_dir(dir)?;
    }
    std::fs::remove_dir(containers[0].parent().context("pod cgroup")?)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(&sb)?;
        if metric(&text, "pod_identity_ebpf_pod_budgets")? == 1 {
            assert!(
                !text.contains(&sb.pods()[flooder].uid),
                "the deleted pod is still reported: {text}"
            );
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the deleted pod's budget stayed: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(agent);
    Ok(())
}

/// Starts `conn-flood` from pod `pod` and waits until it holds its connections.
fn flood(
    sb: &tests::sandbox::Sandbox,
    pod: usize,
    addr: &str,
    count: usize,
) -> Result<tests::clients::Helper> {
    let helper = tests::clients::Helper::spawn(
        sb.pod_command(pod, 0, tests::clients::helper_bin("conn-flood")?)?
            .args([addr, &count.to_string(), "30"]),
    )?;
    anyhow::ensure!(
        helper.line.contains("opened"),
        "conn-flood: {:?}",
        helper.line
    );
    Ok(helper)
}

#[test]
fn a_descriptor_flood_on_any_port_cannot_starve_another_pods_credentials() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let flooder = sb.add_pod(PodSpec::new("app", "reader"))?;
    let quiet = sb.add_pod(PodSpec::new("app", "reader"))?;
    // A container-sized descriptor limit, so the flood below would exhaust it.
    let root = sb.cgroups().pods_root().display().to_string();
    let mut agent = Agent::launch_wrapped(
        &sb,
        &fake,
        &["prlimit", "--nofile=4096:4096", "--"],
        &[
            "server",
            "-c",
            tests::agent::CLUSTER,
            "--cgroup-root",
            &root,
            // The agent's own per-connection caps under test, not the kernel's connect budget
            // and connection cap (which refuse this flood of the credential port after 200
            // connects, and beyond 1,024 open ones: tests/tests/adversary.rs).
            "--pod-connect-rate",
            "0",
            "--pod-max-connections",
            "0",
        ],
        &[],
    )?;
    agent.wait_ready(&sb, Duration::from_secs(20))?;
    // The metrics port (on every address of the node) and the credential port itself.
    for (target, listener) in [
        ("10.200.1.1:2705", "admin"),
        ("169.254.170.23:80", "attributed"),
    ] {
        let floods = [
            flood(&sb, flooder, target, 3000)?,
            flood(&sb, flooder, target, 3000)?,
        ];
        // Served at once and right: an SDK gives up after about a second. (Without the caps,
        // the agent ran out of descriptors here and answered 403 NotAPod: it could not open
        // the cgroup tree to resolve the caller.)
        let got = curl(&sb, quiet, 0, credentials_url(false), &["--max-time", "2"])?;
        assert_eq!(
            got.status, 200,
            "quiet pod during a flood of {target}: {}",
            got.body
        );
        let text = scrape(&sb)?;
        let refused = metric(
            &text,
            &format!("pod_identity_connections_refused_total{{listener=\"{listener}\",reason=\"peer_full\"}}"),
        )?;
        assert!(refused > 1000, "{target}: {refused} refused\n{text}");
        drop(floods);
    }
    Ok(())
}

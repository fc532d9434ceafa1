//! The credential cache end to end, with short-lived credentials and fault injection in the
//! fake EKS Auth: cold bursts, token rotation, outages, throttling storms, pod deletion and
//! negative caching.

use std::time::{Duration, Instant};

use anyhow::Result;
use tests::agent::{scrape, Agent, CLUSTER};
use tests::cgroups::Driver;
use tests::clients::{credentials_url, curl, load_result, spawn_cold_burst, spawn_load};
use tests::fake_eks::{FakeEksAuth, Fault};
use tests::fixtures::metric;
use tests::sandbox::{PodSpec, Sandbox};

/// Credentials live 30 s; the agent refreshes them when 28 s or less are left (so about 2 s
/// after fetching), serves them until 5 s are left, sweeps every second.
const SHORT: &[&str] = &[
    "--refresh-before-expiry",
    "28s",
    "--min-credential-lifetime",
    "5s",
    "--cache-sweep-interval",
    "1s",
    "--refresh-retry-backoff",
    "1s",
    "--negative-cache-ttl",
    "2s",
];

fn node(pods: usize) -> Result<(Sandbox, FakeEksAuth)> {
    let mut sb = Sandbox::new(Driver::Systemd)?;
    let fake = FakeEksAuth::start(sb.node(), CLUSTER, sb.issuer().decoding_key())?;
    fake.associate("app", "reader", "ReaderRole");
    for _ in 0..pods {
        sb.add_pod(PodSpec::new("app", "reader"))?;
    }
    Ok((sb, fake))
}

fn key_of(sb: &Sandbox, pod: usize) -> Result<String> {
    let got = curl(sb, pod, 0, credentials_url(false), &[])?;
    anyhow::ensure!(got.status == 200, "pod {pod}: {} {}", got.status, got.body);
    Ok(got.json()?["AccessKeyId"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

#[test]
fn a_cold_burst_of_100_pods_times_10_requests_makes_100_upstream_calls() -> Result<()> {
    let (sb, fake) = node(100)?;
    // 100 client processes x 10 threads on this 2-CPU machine starve everything for seconds:
    // a longer deadline keeps the assertion on what the cache did (100 calls), not on CPU.
    let agent = Agent::start(&sb, &fake, &["--response-deadline", "10s"])?;
    let idle_rss = agent.rss_kib();
    let started = Instant::now();
    let loads: Vec<_> = (0..100)
        .map(|pod| spawn_load(&sb, pod, 0, "169.254.170.23:80", "/v1/credentials", 10, 10))
        .collect::<Result<_>>()?;
    let mut ok = 0;
    for (pod, load) in loads.into_iter().enumerate() {
        let r = load_result(load)?;
        assert_eq!((r.count(200), r.errors), (10, 0), "pod {pod}: {r:?}");
        ok += r.count(200);
    }
    eprintln!(
        "1000 cold requests served in {:?}; agent RSS {idle_rss} KiB idle, {} KiB with 100 identities cached",
        started.elapsed(),
        agent.rss_kib()
    );
    assert_eq!(ok, 1000);
    assert_eq!(fake.calls(), 100, "exactly one EKS Auth call per pod");
    // The default kernel connect budget (100/s, 200 at once per pod) never met the cold start.
    let text = scrape(&sb)?;
    let events = |e: &str| metric(&text, &format!("pod_identity_ebpf_events{{event=\"{e}\"}}"));
    assert_eq!(events("budget_refused")?, 0, "{text}");
    assert_eq!(events("budget_untracked")?, 0, "{text}");
    assert_eq!(
        metric(&text, "pod_identity_ebpf_pod_budgets")?,
        100,
        "{text}"
    );
    Ok(())
}

#[test]
fn throttling_is_absorbed_not_amplified() -> Result<()> {
    // The bench's cold burst as a test: 100 pods x 10 requests while EKS Auth admits 20 calls a
    // second. Before one retry policy and the adaptive rate: 498-572 attempts for 100 calls.
    let (sb, fake) = node(100)?;
    let _agent = Agent::start(&sb, &fake, &[])?;
    fake.set_fault(Fault::RateLimit(20));
    // Patient clients (8 retries): this test counts EKS Auth attempts, and beside the other
    // suites' load the last pods are served after the SDKs' usual 3 retries.
    let loads = spawn_cold_burst(&sb, 100, 8)?;
    for (pod, load) in loads.into_iter().enumerate() {
        let r = load_result(load)?;
        assert_eq!(r.count(200), 10, "pod {pod}: {r:?}");
    }
    assert_eq!(fake.issued().len(), 100, "one successful call per pod");
    let attempts = fake.calls();
    eprintln!("100 pods served under throttling with {attempts} EKS Auth attempts");
    assert!(
        // The bench holds the target (<= 150 measured alone: 124-130); beside the other
        // suites this has been 110-155. The old main's 498-572 fails either way.
        attempts <= 200,
        "{attempts} attempts for 100 successful calls"
    );
    Ok(())
}

#[test]
fn a_rotated_token_is_served_from_the_cache_without_an_upstream_call() -> Result<()> {
    let (sb, fake) = node(1)?;
    let _agent = Agent::start(&sb, &fake, &[])?;
    let before = key_of(&sb, 0)?;
    sb.rotate_token(0, Duration::from_secs(24 * 3600))?;
    std::thread::sleep(Duration::from_millis(1100)); // a new token has a new iat/exp
    sb.rotate_token(0, Duration::from_secs(24 * 3600))?;
    assert_eq!(key_of(&sb, 0)?, before);
    assert_eq!(fake.calls(), 1);
    Ok(())
}

#[test]
fn through_an_eks_auth_outage_cached_pods_see_no_failure_and_recover() -> Result<()> {
    let (sb, fake) = node(3)?;
    fake.set_lifetime(Duration::from_secs(30));
    let agent = Agent::start(&sb, &fake, SHORT)?;
    let first: Vec<String> = (0..3).map(|p| key_of(&sb, p)).collect::<Result<_>>()?;
    // 12 s of 500s and resets, longer than the ~2 s refresh interval.
    let outage = Instant::now();
    let mut failures = Vec::new();
    let mut rotated = false;
    while outage.elapsed() < Duration::from_secs(12) {
        let second = outage.elapsed().as_secs();
        fake.set_fault(if second % 4 < 2 {
            Fault::Status(500)
        } else {
            Fault::Reset
        });
        if !rotated && second >= 6 {
            sb.rotate_token(0, Duration::from_secs(24 * 3600))?; // kubelet rotates mid-outage
            rotated = true;
        }
        for pod in 0..3 {
            let got = curl(&sb, pod, 0, credentials_url(pod == 1), &[])?;
            if got.status != 200 {
                failures.push(format!(
                    "t={second}s pod {pod}: {} {}",
                    got.status, got.body
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(failures.is_empty(), "pod-visible failures: {failures:?}");
    let during = fake.calls() - 3;
    assert!(
        during >= 3,
        "refreshes were attempted during the outage: {during}"
    );
    // Recovery: every entry is refreshed with new credentials, by the background refresh.
    fake.set_fault(Fault::None);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut pending: Vec<usize> = (0..3).collect();
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "pods {pending:?} still on pre-outage credentials\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
        let mut still = Vec::new();
        for pod in pending {
            if key_of(&sb, pod)? == first[pod] {
                still.push(pod);
            }
        }
        pending = still;
    }
    Ok(())
}

#[test]
fn a_throttling_storm_is_invisible_to_pods_and_refreshes_keep_to_the_budget() -> Result<()> {
    let (sb, fake) = node(5)?;
    fake.set_lifetime(Duration::from_secs(30));
    let mut flags = SHORT.to_vec();
    flags.extend(["--max-service-qps", "1"]);
    let _agent = Agent::start(&sb, &fake, &flags)?;
    for pod in 0..5 {
        key_of(&sb, pod)?;
    }
    fake.set_fault(Fault::Status(429));
    let storm = Instant::now();
    let calls_before = fake.calls();
    while storm.elapsed() < Duration::from_secs(10) {
        for pod in 0..5 {
            let got = curl(&sb, pod, 0, credentials_url(false), &[])?;
            assert_eq!(
                got.status,
                200,
                "t={:?} pod {pod}: {}",
                storm.elapsed(),
                got.body
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let secs = storm.elapsed().as_secs_f64();
    let calls = fake.calls() - calls_before;
    // Each refresh attempt may retry once inside the SDK: at most 2 calls per token of budget.
    let budget = 2.0 * (secs * 1.0 + 1.0);
    eprintln!("{calls} EKS Auth calls in a {secs:.1} s storm (budget {budget:.0})");
    assert!(calls > 0, "no refresh was attempted");
    assert!(
        (calls as f64) <= budget,
        "{calls} calls in {secs:.1} s at 1 refresh/s"
    );
    fake.set_fault(Fault::None);
    Ok(())
}

#[test]
fn a_deleted_pod_is_evicted_and_never_renewed() -> Result<()> {
    let (sb, fake) = node(2)?;
    fake.set_lifetime(Duration::from_secs(30));
    let _agent = Agent::start(&sb, &fake, SHORT)?;
    key_of(&sb, 0)?;
    key_of(&sb, 1)?;
    // Pod 1 is deleted: kubelet removes its cgroups.
    for dir in &sb.pods()[1].containers {
        std::fs::remove_dir(dir)?;
        std::fs::remove_dir(dir.parent().unwrap())?;
    }
    let calls = fake.calls();
    std::thread::sleep(Duration::from_secs(6)); // several refresh intervals
    let text = scrape(&sb)?;
    assert_eq!(
        metric(
            &text,
            "pod_identity_cache_evictions_total{reason=\"pod_gone\"}"
        )?,
        1,
        "{text}"
    );
    assert_eq!(metric(&text, "pod_identity_cache_entries")?, 1, "{text}");
    let after: Vec<_> = fake.issued().into_iter().skip(calls).collect();
    assert!(
        after.iter().any(|i| i.pod_name == sb.pods()[0].name),
        "the live pod was renewed"
    );
    assert!(
        after.iter().all(|i| i.pod_name != sb.pods()[1].name),
        "the deleted pod was renewed: {after:?}"
    );
    Ok(())
}

#[test]
fn a_pod_without_an_association_hammering_the_agent_is_bounded_by_the_negative_ttl() -> Result<()> {
    let mut sb = Sandbox::new(Driver::Cgroupfs)?;
    let fake = FakeEksAuth::start(sb.node(), CLUSTER, sb.issuer().decoding_key())?;
    let pod = sb.add_pod(PodSpec::new("app", "stranger"))?;
    let _agent = Agent::start(&sb, &fake, &[SHORT, tests::fixtures::UNLIMITED].concat())?;
    let started = Instant::now();
    let load = load_result(spawn_load(
        &sb,
        pod,
        0,
        "169.254.170.23:80",
        "/v1/credentials",
        3000,
        1,
    )?)?;
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(load.count(404), 3000, "{load:?}");
    let calls = fake.calls();
    eprintln!("{calls} EKS Auth calls for 3000 requests in {secs:.1} s (negative TTL 2 s)");
    assert!(
        (calls as f64) <= secs / 2.0 + 2.0,
        "{calls} calls in {secs:.1} s"
    );
    Ok(())
}

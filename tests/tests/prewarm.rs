//! `--prewarm`: a pod's credentials are fetched before it asks (its cgroup appears, the
//! kubelet writes its token), so its first request is a hit; an agent restart re-warms every
//! pod within `--max-service-qps`; EKS Auth trouble during pre-warm changes nothing for
//! requests; a pod without an association costs one call.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use tests::agent::{scrape, Agent};
use tests::cgroups::Driver;
use tests::clients::{credentials_url, curl};
use tests::fake_eks::Fault;
use tests::fixtures::{metric_sum, node, UNLIMITED};
use tests::sandbox::{PodSpec, Sandbox};

fn prewarm_args(sb: &Sandbox) -> Vec<String> {
    vec!["--prewarm".into(), sb.kubelet_root().display().to_string()]
}

fn start(sb: &Sandbox, fake: &tests::fake_eks::FakeEksAuth, extra: &[&str]) -> Result<Agent> {
    let mut args: Vec<String> = prewarm_args(sb);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start(sb, fake, &args)
}

/// EKS Auth calls the agent made for `purpose` (request, refresh, prewarm), any outcome; an
/// error until the agent made its first call (the family is exported from its first sample).
fn calls(sb: &Sandbox, purpose: &str) -> Result<u64> {
    metric_sum(
        &scrape(sb)?,
        "pod_identity_upstream_calls",
        &[&format!("purpose=\"{purpose}\"")],
    )
}

/// Pre-warm calls so far (0 before the agent's first EKS Auth call).
fn prewarm_calls_so_far(sb: &Sandbox) -> Result<u64> {
    Ok(calls(sb, "prewarm").unwrap_or(0))
}

/// Waits (at most `limit`) until `f` holds.
fn wait_for(limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !f()? {
        ensure!(Instant::now() < deadline, "not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[test]
fn a_new_pods_first_request_is_a_hit_and_costs_one_call() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let _agent = start(&sb, &fake, &[])?;
    // The container starts a moment after the kubelet made the pod and wrote its token.
    let pod = sb.add_pod(PodSpec::new("app", "reader"))?;
    wait_for(Duration::from_secs(10), || {
        Ok(prewarm_calls_so_far(&sb)? == 1)
    })?;
    let r = curl(&sb, pod, 0, credentials_url(false), &[])?;
    assert_eq!(r.status, 200, "{}", r.body);
    let m = scrape(&sb)?;
    assert_eq!(metric_sum(&m, "pod_identity_prewarm_first_hits", &[])?, 1);
    assert_eq!(metric_sum(&m, "pod_identity_prewarm_entries", &[])?, 1);
    // Every EKS Auth call was the pre-warm: none on the request path.
    assert_eq!(fake.calls(), 1);
    // A pod whose SDK asks at once, racing its pre-warm: still one call (it joins, or the
    // pre-warm finds the request's call in flight).
    let racer = sb.add_pod(PodSpec::new("app", "reader"))?;
    let r = curl(&sb, racer, 0, credentials_url(true), &[])?;
    assert_eq!(r.status, 200, "{}", r.body);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fake.calls(), 2, "one EKS Auth call per pod");
    Ok(())
}

#[test]
fn after_a_restart_every_pod_is_warmed_within_the_qps_and_its_next_request_hits() -> Result<()> {
    let (mut sb, fake) = node(Driver::Systemd)?;
    for _ in 0..100 {
        sb.add_pod(PodSpec::new("app", "reader"))?;
    }
    let first = Agent::start(&sb, &fake, UNLIMITED)?;
    for pod in [0, 99] {
        assert_eq!(curl(&sb, pod, 0, credentials_url(false), &[])?.status, 200);
    }
    first.stop()?;
    let before = fake.calls();
    let started = Instant::now();
    let mut extra = vec!["--max-service-qps", "50"];
    extra.extend_from_slice(UNLIMITED);
    let _agent = start(&sb, &fake, &extra)?;
    wait_for(Duration::from_secs(30), || {
        Ok(metric_sum(&scrape(&sb)?, "pod_identity_prewarm_entries", &[])? == 100)
    })?;
    let took = started.elapsed();
    assert_eq!(fake.calls() - before, 100, "one pre-warm call per pod");
    // 50 at once (the bucket's burst), then 50 a second: never faster than the budget.
    assert!(took >= Duration::from_millis(900), "100 calls in {took:?}");
    for pod in 0..100 {
        let r = curl(&sb, pod, 0, credentials_url(pod % 2 == 1), &[])?;
        assert_eq!(r.status, 200, "pod {pod}: {}", r.body);
    }
    let m = scrape(&sb)?;
    assert_eq!(metric_sum(&m, "pod_identity_prewarm_first_hits", &[])?, 100);
    assert_eq!(calls(&sb, "prewarm")?, 100);
    // All of this agent's EKS Auth calls were its pre-warms: none on the request path.
    assert_eq!(fake.calls() - before, 100, "request-path calls made");
    println!("100 pods pre-warmed in {took:?} at --max-service-qps 50");
    Ok(())
}

#[test]
fn eks_auth_down_during_prewarm_leaves_requests_as_without_it() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let _agent = start(&sb, &fake, &[])?;
    fake.set_fault(Fault::Status(500));
    let pod = sb.add_pod(PodSpec::new("app", "reader"))?;
    wait_for(Duration::from_secs(10), || {
        Ok(prewarm_calls_so_far(&sb)? >= 1)
    })?;
    // As without pre-warm: the request's own call keeps retrying, the caller gets a 503.
    let down = curl(&sb, pod, 0, credentials_url(false), &[])?;
    assert_eq!(down.status, 503, "{}", down.body);
    fake.set_fault(Fault::None);
    // The SDK retries (1 s apart): served as soon as EKS Auth is back, nothing remembered.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = curl(&sb, pod, 0, credentials_url(false), &[])?;
        statuses.push(r.status);
        if r.status == 200 {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}");
    assert_eq!(
        calls(&sb, "prewarm")?,
        1,
        "a failed pre-warm is not retried"
    );
    Ok(())
}

#[test]
fn a_pod_without_an_association_costs_one_call_in_all() -> Result<()> {
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let _agent = start(&sb, &fake, &[])?;
    let pod = sb.add_pod(PodSpec::new("app", "stranger"))?;
    wait_for(Duration::from_secs(10), || {
        Ok(prewarm_calls_so_far(&sb)? == 1)
    })?;
    for _ in 0..5 {
        let r = curl(&sb, pod, 0, credentials_url(false), &[])?;
        assert_eq!(r.status, 404, "{}", r.body);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fake.calls(), 1, "the pre-warm's call, remembered");
    assert_eq!(calls(&sb, "prewarm")?, 1);
    Ok(())
}

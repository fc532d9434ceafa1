//! Cache behaviour on tokio's paused clock.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::*;

/// What the fake EKS Auth does on each call.
#[derive(Clone)]
enum Behaviour {
    /// Credentials valid for this long.
    Issue(Duration),
    /// This error.
    Fail(UpstreamError),
    /// InvalidTokenException for this token, credentials (1 h) for any other.
    Refuse(String),
}

struct FakeUpstream {
    calls: AtomicUsize,
    delay: Mutex<Duration>,
    behaviour: Mutex<Behaviour>,
    tokens: Mutex<Vec<String>>,
    base_epoch: f64,
    start: Instant,
}

impl FakeUpstream {
    fn new(behaviour: Behaviour) -> Arc<Self> {
        Arc::new(Self {
            calls: AtomicUsize::new(0),
            delay: Mutex::new(Duration::from_millis(50)),
            behaviour: Mutex::new(behaviour),
            tokens: Mutex::new(Vec::new()),
            base_epoch: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs_f64(),
            start: Instant::now(),
        })
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }
}

impl Fetcher for FakeUpstream {
    fn fetch(
        &self,
        token: String,
    ) -> Pin<Box<dyn Future<Output = Result<Credentials, UpstreamError>> + Send>> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        self.tokens.lock().unwrap().push(token.clone());
        let delay = *self.delay.lock().unwrap();
        let behaviour = self.behaviour.lock().unwrap().clone();
        let now_epoch = self.base_epoch + self.start.elapsed().as_secs_f64();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            match behaviour {
                Behaviour::Issue(life) => Ok(Credentials::new(
                    format!("ASIA{n}"),
                    "s".into(),
                    format!("t-{token}"),
                    "123456789012".into(),
                    (now_epoch + life.as_secs_f64()) as u64,
                )),
                Behaviour::Fail(e) => Err(e),
                Behaviour::Refuse(bad) if bad == token => Err(UpstreamError::Rejected {
                    code: "InvalidTokenException".into(),
                    message: "bad token".into(),
                }),
                Behaviour::Refuse(_) => Ok(Credentials::new(
                    format!("ASIA{n}"),
                    "s".into(),
                    format!("t-{token}"),
                    "123456789012".into(),
                    (now_epoch + 3600.0) as u64,
                )),
            }
        })
    }
}

fn unavailable() -> UpstreamError {
    UpstreamError::Unavailable {
        code: "ThrottlingException".into(),
        message: "slow down".into(),
    }
}

fn not_found() -> UpstreamError {
    UpstreamError::NotFound {
        code: "ResourceNotFoundException".into(),
        message: "no association".into(),
    }
}

fn pod(uid: &str) -> Key {
    Key::for_pod(uid)
}

fn lookup(key: Key, token: &str) -> Lookup {
    Lookup {
        key: Arc::new(key),
        token: Arc::from(token),
        token_exp: Some(i64::MAX / 2),
        cgroup: None,
        subject: None,
        facts: None,
    }
}

fn cache(up: &Arc<FakeUpstream>, config: CacheConfig) -> Arc<Cache> {
    Cache::new(up.clone(), config, Arc::new(Metrics::default()))
}

/// A cache of at most `max_entries` over an EKS Auth that issues one-hour credentials.
fn bounded(max_entries: usize) -> (Arc<FakeUpstream>, Arc<Cache>) {
    let up = FakeUpstream::new(Behaviour::Issue(HOUR));
    let c = cache(
        &up,
        CacheConfig {
            max_entries,
            ..CacheConfig::default()
        },
    );
    (up, c)
}

const HOUR: Duration = Duration::from_secs(3600);
const MIN: Duration = Duration::from_secs(60);

#[tokio::test(start_paused = true)]
async fn a_thousand_concurrent_callers_make_one_upstream_call_and_share_its_result() {
    for behaviour in [Behaviour::Issue(HOUR), Behaviour::Fail(unavailable())] {
        let up = FakeUpstream::new(behaviour.clone());
        *up.delay.lock().unwrap() = Duration::from_millis(300);
        let c = cache(
            &up,
            CacheConfig {
                request_retry_window: Duration::ZERO,
                ..CacheConfig::default()
            },
        );
        let waiters: Vec<_> = (0..1000)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.get(lookup(pod("a"), "tok")).await })
            })
            .collect();
        let mut results = Vec::new();
        for w in waiters {
            results.push(w.await.unwrap());
        }
        assert_eq!(up.calls(), 1);
        assert!(
            results.windows(2).all(|w| w[0] == w[1]),
            "all callers share one result"
        );
        match behaviour {
            Behaviour::Issue(_) => {
                assert_eq!(results[0].as_ref().unwrap().fields().access_key_id, "ASIA0")
            }
            Behaviour::Fail(e) => assert_eq!(results[0], Err(CacheError::Upstream(e))),
            Behaviour::Refuse(_) => unreachable!(),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_gives_up_does_not_cancel_the_fetch() {
    let up = FakeUpstream::new(Behaviour::Issue(HOUR));
    *up.delay.lock().unwrap() = Duration::from_secs(2);
    let c = cache(&up, CacheConfig::default());
    // The SDK gives up after 100 ms and drops its request.
    let gave_up =
        tokio::time::timeout(Duration::from_millis(100), c.get(lookup(pod("a"), "tok"))).await;
    assert!(gave_up.is_err());
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Its retry is a hit: the detached call finished and filled the cache.
    assert!(c.get(lookup(pod("a"), "tok")).await.is_ok());
    assert_eq!(up.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_slow_upstream_gets_a_bounded_answer_and_fills_the_cache_anyway() {
    let up = FakeUpstream::new(Behaviour::Issue(HOUR));
    *up.delay.lock().unwrap() = Duration::from_secs(3);
    let c = cache(&up, CacheConfig::default());
    let started = Instant::now();
    assert_eq!(
        c.get(lookup(pod("a"), "tok")).await,
        Err(CacheError::Pending)
    );
    assert_eq!(started.elapsed(), Duration::from_millis(900));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(c.get(lookup(pod("a"), "tok")).await.is_ok());
    assert_eq!(up.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn refreshes_run_ahead_of_expiry_and_within_the_retention_bound() {
    // 1 h credentials, refresh 30 min before expiry (minus up to 10% jitter): between 27 and 30 min.
    let up = FakeUpstream::new(Behaviour::Issue(HOUR));
    let c = cache(&up, CacheConfig::default());
    let first = c.get(lookup(pod("a"), "tok")).await.unwrap();
    tokio::time::sleep(26 * MIN).await;
    assert_eq!(up.calls(), 1);
    tokio::time::sleep(5 * MIN).await;
    assert_eq!(up.calls(), 2, "refreshed ahead of expiry");
    let second = c.get(lookup(pod("a"), "tok")).await.unwrap();
    assert_ne!(first, second, "the refreshed credentials are served");
    assert_eq!(up.calls(), 2, "and serving them is a hit");

    // 6 h credentials, 1 h retention: renewed within the hour, not 30 min before expiry.
    let up = FakeUpstream::new(Behaviour::Issue(6 * HOUR));
    let c = cache(
        &up,
        CacheConfig {
            max_retention: HOUR,
            ..CacheConfig::default()
        },
    );
    c.get(lookup(pod("a"), "tok")).await.unwrap();
    tokio::time::sleep(HOUR + MIN).await;
    assert_eq!(up.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn through_an_outage_cached_credentials_are_served_until_the_safety_margin() {
    let up = FakeUpstream::new(Behaviour::Issue(HOUR));
    let c = cache(
        &up,
        CacheConfig {
            request_retry_window: Duration::ZERO,
            ..CacheConfig::default()
        },
    );
    let creds = c.get(lookup(pod("a"), "tok")).await.unwrap();
    up.set(Behaviour::Fail(unavailable()));
    // Refreshes fail from ~27 min on; every request still gets the cached credentials.
    for _ in 0..27 {
        tokio::time::sleep(2 * MIN).await; // up to 54 min
        assert_eq!(c.get(lookup(pod("a"), "tok")).await, Ok(creds.clone()));
    }
    let calls_during_outage = up.calls() - 1;
    assert!(
        calls_during_outage >= 3,
        "retried with backoff: {calls_during_outage}"
    );
    assert!(
        calls_during_outage < 40,
        "backoff bounds the retries: {calls_during_outage}"
    );
    // Under 5 minutes left: no longer served.
    tokio::time::sleep(2 * MIN).await; // 56 min
    assert_eq!(
        c.get(lookup(pod("a"), "tok")).await,
        Err(CacheError::Upstream(unavailable()))
    );
    // Recovery.
    up.set(Behaviour::Issue(HOUR));
    let fresh = c.get(lookup(pod("a"), "tok")).await.unwrap();
    assert_ne!(fresh, creds);
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_are_remembered_for_the_negative_ttl() {
    let up = FakeUpstream::new(Behaviour::Fail(not_found()));
    let c = cache(&up, CacheConfig::default());
    for _ in 0..50 {
        assert_eq!(
            c.get(lookup(pod("a"), "tok")).await,
            Err(CacheError::Upstream(not_found()))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 5 s of a tight loop: one call.
    assert_eq!(up.calls(), 1);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let _ = c.get(lookup(pod("a"), "tok")).await;
    assert_eq!(up.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_rotated_token_is_a_hit_and_becomes_the_refresh_token() {
    let up = FakeUpstream::new(Behaviour::Issue(HOUR));
    let c = cache(&up, CacheConfig::default());
    let first = c.get(lookup(pod("a"), "old")).await.unwrap();
    let mut rotated = lookup(pod("a"), "new");
    rotated.token_exp = Some(i64::MAX / 2 + 1);
    assert_eq!(c.get(rotated).await.unwrap(), first);
    assert_eq!(up.calls(), 1);
    tokio::time::sleep(31 * MIN).await;
    assert_eq!(
        *up.tokens.lock().unwrap(),
        ["old", "new"],
        "refreshed with the newest token"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_new_token_falls_back_to_the_last_accepted_one() {
    let up = FakeUpstream::new(Behaviour::Issue(HOUR));
    let c = cache(&up, CacheConfig::default());
    c.get(lookup(pod("a"), "good")).await.unwrap();
    let mut newer = lookup(pod("a"), "bad");
    newer.token_exp = Some(i64::MAX / 2 + 1);
    c.get(newer).await.unwrap();
    // The refresh with "bad" is refused; "good" is tried next and works.
    up.set(Behaviour::Refuse("bad".into()));
    tokio::time::sleep(31 * MIN).await;
    assert_eq!(*up.tokens.lock().unwrap(), ["good", "bad", "good"]);
    let creds = c.get(lookup(pod("a"), "good")).await.unwrap();
    assert_eq!(
        creds.fields().session_token,
        "t-good",
        "served what the accepted token fetched"
    );
    assert_eq!(up.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn the_cache_keeps_its_bound_by_evicting_the_least_recently_used() {
    let (_up, c) = bounded(3);
    for uid in ["a", "b", "c"] {
        c.get(lookup(pod(uid), uid)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.get(lookup(pod("a"), "a")).await.unwrap(); // a is now the most recent
    tokio::time::sleep(Duration::from_millis(10)).await;
    c.get(lookup(pod("d"), "d")).await.unwrap();
    assert_eq!(c.len(), 3);
    assert!(c.entries.contains_key(&pod("a")));
    assert!(
        !c.entries.contains_key(&pod("b")),
        "b was least recently used"
    );
}

#[tokio::test(start_paused = true)]
async fn a_deleted_pods_entry_is_evicted_and_never_refreshed() {
    let dir = std::env::temp_dir().join(format!("cache-pod-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let up = FakeUpstream::new(Behaviour::Issue(HOUR));
    let c = cache(&up, CacheConfig::default());
    let mut l = lookup(pod("a"), "tok");
    l.cgroup = Some(std::sync::Arc::from(dir.as_path()));
    c.get(l).await.unwrap();
    std::fs::remove_dir(&dir).unwrap();
    tokio::time::sleep(Duration::from_secs(11)).await; // one sweep
    assert!(c.is_empty());
    tokio::time::sleep(HOUR).await;
    assert_eq!(up.calls(), 1, "no renewal for a pod that is gone");
}

#[tokio::test(start_paused = true)]
async fn fallback_keys_are_token_hashes_and_die_with_the_token() {
    assert_ne!(Key::for_token("a"), Key::for_token("b"));
    let up = FakeUpstream::new(Behaviour::Issue(HOUR));
    let c = cache(&up, CacheConfig::default());
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 20;
    let mut l = lookup(Key::for_token("tok"), "tok");
    l.token_exp = Some(exp);
    c.get(l).await.unwrap();
    tokio::time::sleep(Duration::from_secs(31)).await; // token expired, swept
    assert!(c.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_throttled_request_call_keeps_trying_and_sdk_retries_join_it() {
    let up = FakeUpstream::new(Behaviour::Fail(unavailable()));
    let c = cache(&up, CacheConfig::default());
    // The first request waits its deadline and gets "retry".
    assert_eq!(
        c.get(lookup(pod("a"), "tok")).await,
        Err(CacheError::Pending)
    );
    let calls = up.calls();
    assert!(calls >= 2, "the call kept trying: {calls}");
    // EKS Auth recovers; the SDK's retry a second later joins the same call and gets credentials.
    up.set(Behaviour::Issue(HOUR));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = c.get(lookup(pod("a"), "tok")).await;
    assert!(got.is_ok(), "{got:?}");
}

use crate::token::test_token as jwt;

#[tokio::test(start_paused = true)]
async fn a_prewarmed_entry_answers_the_first_request_and_is_counted() {
    let up = FakeUpstream::new(Behaviour::Issue(HOUR));
    let c = cache(&up, CacheConfig::default());
    let file: Arc<Path> = Arc::from(Path::new("/nonexistent/eks-pod-identity-token"));
    let budget = c.prewarm_budget().await;
    let warmed = c
        .prewarm(lookup(pod("a"), "tok"), file.clone(), budget)
        .await;
    assert!(matches!(warmed, Some(Ok(_))));
    assert!(!c.needs_call(&pod("a")));
    // Fresh now: a second pre-warm does nothing.
    let budget = c.prewarm_budget().await;
    assert!(c
        .prewarm(lookup(pod("a"), "tok"), file, budget)
        .await
        .is_none());
    for _ in 0..3 {
        c.get(lookup(pod("a"), "tok")).await.unwrap();
    }
    assert_eq!(up.calls(), 1);
    assert_eq!(c.metrics.prewarmed.get(), 1);
    assert_eq!(
        c.metrics.prewarm_first_hits.get(),
        1,
        "only the first request"
    );
}

#[tokio::test(start_paused = true)]
async fn a_prewarm_never_starts_a_second_call_beside_a_requests() {
    let up = FakeUpstream::new(Behaviour::Issue(HOUR));
    *up.delay.lock().unwrap() = Duration::from_millis(500);
    let c = cache(&up, CacheConfig::default());
    let request = tokio::spawn({
        let c = c.clone();
        async move { c.get(lookup(pod("a"), "tok")).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!c.needs_call(&pod("a")), "the request's call is in flight");
    let budget = c.prewarm_budget().await;
    let file: Arc<Path> = Arc::from(Path::new("/nonexistent/eks-pod-identity-token"));
    assert!(c
        .prewarm(lookup(pod("a"), "tok"), file, budget)
        .await
        .is_none());
    request.await.unwrap().unwrap();
    assert_eq!(up.calls(), 1);
    assert_eq!(c.metrics.prewarmed.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn refreshes_of_a_prewarmed_entry_use_the_newest_token_on_disk() {
    let up = FakeUpstream::new(Behaviour::Issue(40 * MIN));
    let c = cache(&up, CacheConfig::default());
    let dir = std::env::temp_dir().join(format!("prewarm-refresh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("eks-pod-identity-token");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (old, new) = (jwt("a", now + 3600), jwt("a", now + 7200));
    let foreign = jwt("b", now + 9000);
    std::fs::write(&path, &old).unwrap();
    let file: Arc<Path> = Arc::from(path.as_path());
    let mut l = lookup(pod("a"), &old);
    l.token_exp = Some(now + 3600);
    let budget = c.prewarm_budget().await;
    c.prewarm(l, file, budget).await.unwrap().unwrap();
    // The kubelet rotates the token; the pod never calls. The refresh (due 10 min before the
    // 30-minute window, jittered) must present the new token.
    std::fs::write(&path, &new).unwrap();
    tokio::time::sleep(11 * MIN).await;
    assert_eq!(up.calls(), 2);
    assert_eq!(up.tokens.lock().unwrap().last().unwrap(), &new);
    // A file naming another pod is never adopted.
    std::fs::write(&path, &foreign).unwrap();
    tokio::time::sleep(40 * MIN).await;
    assert!(up.tokens.lock().unwrap().iter().all(|t| *t != foreign));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn with_subject(key: Key, token: &str, sa: &str) -> Lookup {
    Lookup {
        subject: Some(Arc::new(Subject {
            namespace: "ns".into(),
            service_account: sa.into(),
        })),
        ..lookup(key, token)
    }
}

#[tokio::test(start_paused = true)]
async fn a_pods_entry_keeps_its_service_account_and_only_an_error_is_replaced() {
    let up = FakeUpstream::new(Behaviour::Fail(not_found()));
    let c = cache(&up, CacheConfig::default());
    // A forged subject first: EKS Auth refuses it; the entry holds only that error.
    assert_eq!(
        c.get(with_subject(pod("a"), "forged", "admin")).await,
        Err(CacheError::Upstream(not_found()))
    );
    // The pod's real token replaces the error at once (no negative-cache wait).
    up.set(Behaviour::Issue(HOUR));
    let creds = c
        .get(with_subject(pod("a"), "real", "reader"))
        .await
        .unwrap();
    assert_eq!(up.calls(), 2);
    // Now the entry is defended: another subject is refused without a call, however often.
    for sa in ["admin", "x", "y"] {
        let got = c.get(with_subject(pod("a"), sa, sa)).await;
        assert!(
            matches!(got, Err(CacheError::SubjectChanged { .. })),
            "{sa}: {got:?}"
        );
    }
    assert_eq!(up.calls(), 2);
    assert_eq!(c.len(), 1, "one entry per pod, whatever the tokens claim");
    let again = c.get(with_subject(pod("a"), "real", "reader")).await;
    assert_eq!(again.unwrap(), creds);
}

#[tokio::test(start_paused = true)]
async fn errors_never_push_credentials_out() {
    let (up, c) = bounded(3);
    for uid in ["a", "b"] {
        c.get(lookup(pod(uid), uid)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A stream of entries that only ever hold errors (node callers' bad tokens, say).
    up.set(Behaviour::Fail(not_found()));
    for n in 0..50 {
        let _ = c.get(lookup(Key::for_token(&format!("bad{n}")), "x")).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(c.entries.contains_key(&pod("a")) && c.entries.contains_key(&pod("b")));
    assert!(c.len() <= 3, "{}", c.len());
    up.set(Behaviour::Issue(HOUR));
    let calls = up.calls();
    c.get(lookup(pod("a"), "a")).await.unwrap();
    assert_eq!(up.calls(), calls, "a's credentials are still a hit");
}

#[tokio::test(start_paused = true)]
async fn a_pod_can_start_only_its_budget_of_eks_auth_calls() {
    let up = FakeUpstream::new(Behaviour::Fail(not_found()));
    let c = cache(&up, CacheConfig::default());
    let (_, burst) = CacheConfig::default().entry_call_rate.unwrap();
    // Alternating subjects replaces the error entry each time: each would be a call.
    let mut budget_refusals = 0;
    for n in 0..40 {
        match c.get(with_subject(pod("a"), "t", &format!("sa{n}"))).await {
            Err(CacheError::CallBudget(_)) => budget_refusals += 1,
            Err(CacheError::Upstream(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(up.calls(), burst as usize);
    assert_eq!(budget_refusals, 40 - burst as usize);
    // Another pod is not affected.
    let _ = c.get(with_subject(pod("b"), "t", "sa")).await;
    assert_eq!(up.calls(), burst as usize + 1);
    // The budget refills at its rate.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let _ = c.get(with_subject(pod("a"), "t", "again")).await;
    assert_eq!(up.calls(), burst as usize + 2);
}

#[tokio::test(start_paused = true)]
async fn a_handed_over_cache_serves_holds_and_renews_as_the_old_one_would() {
    let (old_up, old) = bounded(10);
    let held = |ns: &str| Lookup {
        subject: Some(Arc::new(Subject {
            namespace: ns.into(),
            service_account: "reader".into(),
        })),
        ..lookup(pod("a"), "tok-a")
    };
    let a = old.get(held("app")).await.unwrap();
    let b = old
        .get(lookup(Key::for_token("node"), "node"))
        .await
        .unwrap();
    old_up.set(Behaviour::Fail(not_found()));
    assert!(old.get(lookup(pod("c"), "tok-c")).await.is_err());
    assert_eq!(old_up.calls(), 3);
    tokio::time::sleep(10 * MIN).await;

    let snapshot = old.export();
    assert_eq!(
        snapshot.len(),
        2,
        "an error is not handed over: {snapshot:?}"
    );
    assert!(
        !format!("{snapshot:?}").contains("tok-a"),
        "Debug shows no token"
    );
    let (new_up, new) = bounded(10);
    assert_eq!(new.import(snapshot.clone()), 2);
    assert_eq!(new.import(snapshot), 0, "entries it has are not replaced");
    // Served from memory, to the same pod only, by key.
    assert_eq!(new.get(held("app")).await.unwrap(), a);
    assert!(matches!(
        new.get(held("other")).await,
        Err(CacheError::SubjectChanged { .. })
    ));
    assert_eq!(
        new.get(lookup(Key::for_token("node"), "node"))
            .await
            .unwrap(),
        b
    );
    assert_eq!(new_up.calls(), 0);
    // Renewed ahead of expiry, with the handed token. (The paused clock moves the new
    // cache's instants, not the wall clock that dates expirations: expiry looks 60 min away,
    // less the wall time the test took, rounded to whole seconds. Fetched 10 min ago, due 30
    // min before expiry, less up to 10% of those 40 min: 26 to 30 min from now, so 26 min
    // was a boundary a second's rounding crossed once in a few hundred runs.)
    tokio::time::sleep(25 * MIN).await;
    assert_eq!(new_up.calls(), 0);
    tokio::time::sleep(6 * MIN).await;
    assert_eq!(new_up.calls(), 2);
    assert!(new_up.tokens.lock().unwrap().contains(&"tok-a".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn an_import_keeps_the_bound_and_skips_what_cannot_be_served() {
    let (_, old) = bounded(10);
    for uid in ["a", "b", "c"] {
        old.get(lookup(pod(uid), uid)).await.unwrap();
    }
    let mut snapshot = old.export();
    // Credentials too close to expiry are not served, so not adopted.
    snapshot[0].creds.expiration_epoch_secs = crate::token::epoch_secs() as u64 + 60;
    let (_, small) = bounded(1);
    assert_eq!(small.import(snapshot), 1);
    assert_eq!(small.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_soonest_expiry_is_the_oldest_credentials_and_falls_through_an_outage() {
    let (up, c) = bounded(10);
    assert_eq!(c.soonest_expiry(), None, "nothing cached yet");
    assert_eq!(c.capacity(), 10);
    c.get(lookup(pod("a"), "ta")).await.unwrap();
    tokio::time::advance(10 * MIN).await;
    c.get(lookup(pod("b"), "tb")).await.unwrap();
    let left = c.soonest_expiry().unwrap();
    // a's hour, less the 10 minutes since (whole-second expiry, 50 ms calls).
    assert!(
        left > 49 * MIN && left <= 50 * MIN + Duration::from_secs(1),
        "{left:?}"
    );
    // EKS Auth down: nothing renews, the soonest expiry only comes closer.
    up.set(Behaviour::Fail(unavailable()));
    tokio::time::advance(25 * MIN).await;
    let later = c.soonest_expiry().unwrap();
    assert!(
        later < left && later <= 25 * MIN + Duration::from_secs(1),
        "{later:?}"
    );
}

/// A lookup as the handler makes it: the token parsed, its facts carried along.
fn parsed_lookup(uid: &str, token: &str) -> Lookup {
    let parsed = crate::token::Parsed::new(token).unwrap();
    Lookup {
        token_exp: parsed.facts.exp,
        subject: Some(parsed.facts.subject.clone()),
        facts: Some(parsed.facts),
        ..lookup(pod(uid), token)
    }
}

#[tokio::test(start_paused = true)]
async fn a_pods_entry_recalls_only_its_own_last_token_and_only_what_was_parsed_from_it() {
    let up = FakeUpstream::new(Behaviour::Issue(HOUR));
    let c = cache(&up, CacheConfig::default());
    let far = 4_000_000_000;
    let (a, b) = (
        crate::token::test_token("a", far),
        crate::token::test_token("b", far),
    );
    assert!(
        c.recall(&Arc::from("a"), a.as_bytes()).is_none(),
        "nothing cached yet"
    );
    let sent = parsed_lookup("a", &a);
    let facts = sent.facts.clone().unwrap();
    c.get(sent).await.unwrap();
    let got = c
        .recall(&Arc::from("a"), a.as_bytes())
        .expect("the pod's own token");
    // What the token says, rebuilt from the entry: the same as its parse.
    assert_eq!(*got.facts, *facts);
    assert_eq!(got.facts.pod_uid.as_deref(), Some("a"));
    // Pod b presenting a's token finds b's entry (none yet, then its own token): never a's
    // facts, so the handler parses and refuses the mismatch.
    assert!(c.recall(&Arc::from("b"), a.as_bytes()).is_none());
    c.get(parsed_lookup("b", &b)).await.unwrap();
    assert!(c.recall(&Arc::from("b"), a.as_bytes()).is_none());
    assert!(c.recall(&Arc::from("b"), b.as_bytes()).is_some());
    // Other bytes, even a prefix of the token, are not recalled.
    assert!(c
        .recall(&Arc::from("a"), &a.as_bytes()[..a.len() - 1])
        .is_none());
    // A rotated token replaces the old one and its facts.
    let rotated = crate::token::test_token("a", far + 1);
    c.get(parsed_lookup("a", &rotated)).await.unwrap();
    assert!(c.recall(&Arc::from("a"), a.as_bytes()).is_none());
    assert_eq!(
        c.recall(&Arc::from("a"), rotated.as_bytes())
            .unwrap()
            .facts
            .exp,
        Some(far + 1)
    );
    // A token that came without facts (an older agent's handover, the kubelet's file) is
    // recalled only once a request has parsed those same bytes.
    let plain = crate::token::test_token("c", far);
    let mut l = lookup(pod("c"), &plain);
    l.token_exp = Some(far);
    c.get(l).await.unwrap();
    assert!(c.recall(&Arc::from("c"), plain.as_bytes()).is_none());
    c.get(parsed_lookup("c", &plain)).await.unwrap();
    assert!(c.recall(&Arc::from("c"), plain.as_bytes()).is_some());
    // Facts that do not match the entry (a token naming pod e in pod d's entry: the handler
    // refuses that before the cache, which does not rely on it) are never recalled.
    let e = crate::token::test_token("e", far);
    c.get(parsed_lookup("d", &e)).await.unwrap();
    assert!(c.recall(&Arc::from("d"), e.as_bytes()).is_none());
    assert_eq!(up.calls(), 4, "one call per pod");
}

/// A fresh hit and what the cache handed out with it.
async fn held(c: &Arc<Cache>, l: Lookup) -> (Arc<Credentials>, Held) {
    c.get(l.clone()).await.unwrap();
    match c.find(l).unwrap() {
        Found::Ready(creds, Some(held)) => (creds, held),
        other => panic!("a fresh hit is held: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_held_hit_ends_when_its_credentials_are_replaced_stale_or_evicted() {
    let (up, c) = bounded(1);
    // Replaced by the refresh ahead of expiry; stale (past the refresh point) before that.
    let (first, mut h) = held(&c, lookup(pod("a"), "tok")).await;
    assert!(h.holds(Instant::now()));
    // A repeat keeps the entry's last use current (the LRU's clock), a stamp a millisecond.
    let used = || {
        c.entries
            .get(&pod("a"))
            .unwrap()
            .last_used
            .load(Ordering::Relaxed)
    };
    let before = used();
    tokio::time::sleep(Duration::from_millis(10)).await;
    c.reused(&mut h, Instant::now());
    assert_eq!(used(), before + 10);
    c.reused(&mut h, Instant::now());
    assert_eq!(used(), before + 10);
    let fresh_until = c
        .entries
        .get(&pod("a"))
        .unwrap()
        .state
        .lock()
        .unwrap()
        .creds
        .as_ref()
        .unwrap()
        .fresh_until;
    assert!(
        !h.holds(fresh_until),
        "not past the point the full path would refresh"
    );
    tokio::time::sleep(31 * MIN).await;
    assert_eq!(up.calls(), 2, "refreshed");
    assert!(!h.holds(Instant::now()), "the refresh ends it");
    let (second, h) = held(&c, lookup(pod("a"), "tok")).await;
    assert_ne!(first, second);
    assert!(
        h.holds(Instant::now()),
        "the new credentials are held again"
    );
    // Evicted: another pod's credentials push this entry out (the bound is 1).
    c.get(lookup(pod("b"), "b")).await.unwrap();
    assert!(!c.entries.contains_key(&pod("a")));
    assert!(!h.holds(Instant::now()), "an evicted entry is not held");
    // Cleared: EKS Auth says the association is gone.
    let (_, h) = held(&c, lookup(pod("b"), "b")).await;
    up.set(Behaviour::Fail(not_found()));
    tokio::time::sleep(31 * MIN).await;
    assert!(
        !h.holds(Instant::now()),
        "credentials EKS Auth took back are not held"
    );
    // A stale answer (served while a refresh runs) is never held.
    let (up, c) = bounded(4);
    c.get(lookup(pod("a"), "tok")).await.unwrap();
    *up.delay.lock().unwrap() = HOUR;
    tokio::time::sleep(31 * MIN).await;
    assert!(matches!(
        c.find(lookup(pod("a"), "tok")).unwrap(),
        Found::Ready(_, None)
    ));
}

//! `handle()` in process: a `State` without eBPF, a resolver over a temp-dir cgroup tree, a
//! fake EKS Auth; every refusal's status and code, and a served request.

use std::future::Future;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::BodyExt;

use super::*;
use crate::admission::Admission;
use crate::attribution::Resolver;
use crate::cache::{Cache, CacheConfig};
use crate::credentials::Credentials;
use crate::metrics::Metrics;
use crate::token::test_token;
use crate::upstream::Fetcher;

const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
const OTHER: &str = "11111111-2222-4333-8444-555555555555";

/// EKS Auth answering every call with one result.
struct Upstream(Mutex<Result<Credentials, UpstreamError>>);

impl Fetcher for Upstream {
    fn fetch(
        &self,
        _token: String,
    ) -> Pin<Box<dyn Future<Output = Result<Credentials, UpstreamError>> + Send>> {
        let result = self.0.lock().unwrap().clone();
        Box::pin(async move { result })
    }
}

/// A cgroup tree in a temp dir: the pod's cgroup, a non-pod cgroup, and a cgroup the pod's
/// container nested and named after another pod, by id.
struct Tree {
    root: PathBuf,
    pod: u64,
    not_a_pod: u64,
    nested: u64,
}

impl Tree {
    fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("handler-{name}-{}", std::process::id()));
        let pod = root.join(format!("kubepods/besteffort/pod{UID}"));
        let nested = pod.join(format!("ctr/pod{OTHER}"));
        let qos = root.join("kubepods/burstable");
        for d in [&nested, &qos] {
            std::fs::create_dir_all(d).unwrap();
        }
        let id = |p: &PathBuf| std::fs::metadata(p).unwrap().ino();
        Self {
            pod: id(&pod),
            not_a_pod: id(&qos),
            nested: id(&nested),
            root,
        }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn state(
    tree: &Tree,
    upstream: Result<Credentials, UpstreamError>,
    policy: UnattributedPolicy,
) -> State {
    let metrics = Arc::new(Metrics::default());
    let config = CacheConfig {
        request_retry_window: Duration::ZERO,
        ..CacheConfig::default()
    };
    State {
        cache: Cache::new(
            Arc::new(Upstream(Mutex::new(upstream))),
            config,
            metrics.clone(),
        ),
        steering: None,
        resolver: Some(Arc::new(Resolver::new(&tree.root.join("kubepods")))),
        node_addrs: Default::default(),
        admission: Admission::unlimited(),
        unattributed: policy,
        ready: AtomicBool::new(true),
        metrics,
    }
}

fn creds() -> Credentials {
    Credentials::new(
        "ASIAHANDLER".into(),
        "secret".into(),
        "session".into(),
        "123456789012".into(),
        (now() + 3600) as u64,
    )
}

fn request(method: &str, path: &str, host: Option<&str>, token: Option<&str>) -> Request<()> {
    let mut r = Request::builder().method(method).uri(path);
    if let Some(h) = host {
        r = r.header(header::HOST, h);
    }
    if let Some(t) = token {
        r = r.header(header::AUTHORIZATION, t);
    }
    r.body(()).unwrap()
}

/// Name, caller, request, and the (status, code) it must get.
type Case<'a> = (&'a str, &'a Caller, Request<()>, (u16, &'a str));

/// (status, body code) of one request.
async fn ask(state: &State, caller: &Caller, req: Request<()>) -> (u16, String) {
    ask_on(state, caller, &ConnMemo::default(), req).await
}

/// (status, body code) of one request on the connection whose memo is `memo`.
async fn ask_on(
    state: &State,
    caller: &Caller,
    memo: &ConnMemo,
    req: Request<()>,
) -> (u16, String) {
    let resp = handle(state, caller, memo, req).await;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let code = json["code"]
        .as_str()
        .or_else(|| json["AccessKeyId"].as_str())
        .unwrap_or_default()
        .to_owned();
    (status, code)
}

#[tokio::test]
async fn every_refusal_has_its_status_and_code_and_a_pod_is_served() {
    let tree = Tree::new("table");
    let st = state(&tree, Ok(creds()), UnattributedPolicy::Allow);
    let host = Some("169.254.170.23");
    let own = test_token(UID, now() + 3600);
    let other = test_token(OTHER, now() + 3600);
    let expired = test_token(UID, now() - 60);
    let forged = crate::token::test_token_for(UID, "admin", now() + 3600);
    let other_forged = crate::token::test_token_for(OTHER, "admin", now() + 3600);
    let pod = Caller::Pod(tree.pod);
    let peer = Caller::Plain("10.0.0.9".parse::<IpAddr>().unwrap());
    let node = Caller::Node("10.0.0.1".parse::<IpAddr>().unwrap());
    let (bypassed, not_a_pod, unknown, nested) = (
        Caller::Bypassed("10.0.0.7".parse::<IpAddr>().unwrap()),
        Caller::Pod(tree.not_a_pod),
        Caller::Pod(1),
        Caller::Pod(tree.nested),
    );
    let cases: Vec<Case> = vec![
        (
            "served",
            &pod,
            request("GET", CREDENTIALS_PATH, host, Some(&own)),
            (200, "ASIAHANDLER"),
        ),
        (
            "other path",
            &pod,
            request("GET", "/v2/x", host, Some(&own)),
            (404, "NotFound"),
        ),
        (
            "POST",
            &pod,
            request("POST", CREDENTIALS_PATH, host, Some(&own)),
            (405, "MethodNotAllowed"),
        ),
        (
            "no Host",
            &pod,
            request("GET", CREDENTIALS_PATH, None, Some(&own)),
            (400, "MissingHost"),
        ),
        (
            "wrong Host",
            &pod,
            request("GET", CREDENTIALS_PATH, Some("evil.example"), Some(&own)),
            (403, "AccessDenied"),
        ),
        (
            "no token",
            &pod,
            request("GET", CREDENTIALS_PATH, host, None),
            (400, "InvalidToken"),
        ),
        (
            "not a JWT",
            &pod,
            request("GET", CREDENTIALS_PATH, host, Some("abc")),
            (400, "InvalidToken"),
        ),
        (
            "expired",
            &pod,
            request("GET", CREDENTIALS_PATH, host, Some(&expired)),
            (400, "InvalidToken"),
        ),
        (
            "replayed",
            &pod,
            request("GET", CREDENTIALS_PATH, host, Some(&other)),
            (403, "TokenPodMismatch"),
        ),
        (
            "another service account for the same pod",
            &pod,
            request("GET", CREDENTIALS_PATH, host, Some(&forged)),
            (403, "TokenSubjectMismatch"),
        ),
        (
            "around the hook",
            &bypassed,
            request("GET", CREDENTIALS_PATH, host, Some(&own)),
            (403, "AttributionBypassed"),
        ),
        (
            "a nested cgroup named after another pod",
            &nested,
            request("GET", CREDENTIALS_PATH, host, Some(&other_forged)),
            (403, "NotAPod"),
        ),
        (
            "a node daemon, allowed",
            &node,
            request("GET", CREDENTIALS_PATH, host, Some(&other_forged)),
            (200, "ASIAHANDLER"),
        ),
        (
            "not a pod",
            &not_a_pod,
            request("GET", CREDENTIALS_PATH, host, Some(&own)),
            (403, "NotAPod"),
        ),
        (
            "unknown cgroup",
            &unknown,
            request("GET", CREDENTIALS_PATH, host, Some(&own)),
            (403, "NotAPod"),
        ),
        (
            "plain, allowed",
            &peer,
            request("GET", CREDENTIALS_PATH, host, Some(&own)),
            (200, "ASIAHANDLER"),
        ),
    ];
    for (name, caller, req, (status, code)) in cases {
        assert_eq!(
            ask(&st, caller, req).await,
            (status, code.to_owned()),
            "{name}"
        );
    }
    let deny = state(&tree, Ok(creds()), UnattributedPolicy::Deny);
    let req = request("GET", CREDENTIALS_PATH, host, Some(&own));
    assert_eq!(
        ask(&deny, &peer, req).await,
        (403, "Unattributed".to_owned())
    );
    let req = request("GET", CREDENTIALS_PATH, host, Some(&own));
    assert_eq!(
        ask(&deny, &node, req).await,
        (403, "Unattributed".to_owned())
    );
}

#[tokio::test]
async fn eks_auth_errors_keep_their_code_and_map_to_a_status() {
    let tree = Tree::new("upstream");
    let own = test_token(UID, now() + 3600);
    for (upstream, status) in [
        (
            UpstreamError::NotFound {
                code: "ResourceNotFoundException".into(),
                message: "m".into(),
            },
            404,
        ),
        (
            UpstreamError::Rejected {
                code: "AccessDeniedException".into(),
                message: "m".into(),
            },
            400,
        ),
        (
            UpstreamError::Unavailable {
                code: "ThrottlingException".into(),
                message: "m".into(),
            },
            503,
        ),
    ] {
        let code = upstream.code().to_owned();
        let st = state(&tree, Err(upstream), UnattributedPolicy::Allow);
        let req = request(
            "GET",
            CREDENTIALS_PATH,
            Some("[fd00:ec2::23]:80"),
            Some(&own),
        );
        assert_eq!(ask(&st, &Caller::Pod(tree.pod), req).await, (status, code));
    }
}

#[test]
fn every_spelling_of_the_credential_addresses_is_a_host_and_nothing_near_them_is() {
    let host = |h: &str| {
        let req = request("GET", CREDENTIALS_PATH, Some(h), None);
        check_host(&req, host_and_authorization(req.headers()).0)
    };
    for ok in [
        "169.254.170.23",
        "169.254.170.23:80",
        "[fd00:ec2::23]",
        "[fd00:ec2::23]:80",
        "[fd00:ec2:0:0::23]:80",
        "fd00:ec2::23",
    ] {
        assert!(host(ok).is_ok(), "{ok}");
    }
    for bad in [
        "169.254.170.230",
        "169.254.170.2",
        "169.254.170.23.evil.example",
        "[fd00:ec2::24]:80",
        "",
    ] {
        assert!(
            matches!(host(bad), Err(RequestError::BadHost { .. })),
            "{bad}"
        );
    }
}

#[test]
fn the_first_host_and_authorization_are_taken_as_a_lookup_would() {
    let req = Request::builder()
        .header("x-other", "1")
        .header("authorization", "first-token")
        .header("HOST", "169.254.170.23")
        .header("Authorization", "second-token")
        .header("host", "evil.example")
        .body(())
        .expect("valid request");
    let (host, authorization) = host_and_authorization(req.headers());
    assert_eq!(host, req.headers().get(header::HOST));
    assert_eq!(authorization, req.headers().get(header::AUTHORIZATION));
    assert_eq!(host.map(|h| h.as_bytes()), Some(&b"169.254.170.23"[..]));
    assert_eq!(
        authorization.map(|h| h.as_bytes()),
        Some(&b"first-token"[..])
    );
    assert_eq!(
        host_and_authorization(&HeaderMap::new()),
        (None, None),
        "none of either"
    );
}

#[tokio::test]
async fn a_connections_repeated_requests_get_what_the_full_path_would_give() {
    let tree = Tree::new("repeat");
    let mut st = state(&tree, Ok(creds()), UnattributedPolicy::Deny);
    let upstream = Arc::new(Upstream(Mutex::new(Ok(creds()))));
    let config = CacheConfig {
        request_retry_window: Duration::ZERO,
        // Fresh for 300 ms: the test sees a refresh.
        max_retention: Duration::from_millis(300),
        ..CacheConfig::default()
    };
    st.cache = Cache::new(upstream.clone(), config, st.metrics.clone());
    let (pod, memo, host) = (
        Caller::Pod(tree.pod),
        ConnMemo::default(),
        Some("169.254.170.23"),
    );
    let own = test_token(UID, now() + 3600);
    let good = || request("GET", CREDENTIALS_PATH, host, Some(&own));
    let hits = || {
        st.metrics
            .cache_requests
            .get_or_create(&crate::metrics::ResultLabel { result: "hit" })
            .get()
    };
    assert_eq!(
        ask_on(&st, &pod, &memo, good()).await,
        (200, "ASIAHANDLER".into())
    );
    let hits_before = hits();
    // Every refusal between repeats is the full path's, and leaves the repeat intact.
    let other = test_token(OTHER, now() + 3600);
    let expired = test_token(UID, now() - 60);
    let refusals = [
        (
            request("GET", CREDENTIALS_PATH, host, Some(&other)),
            (403, "TokenPodMismatch"),
        ),
        (
            request("GET", CREDENTIALS_PATH, host, Some(&expired)),
            (400, "InvalidToken"),
        ),
        (
            request("GET", CREDENTIALS_PATH, host, None),
            (400, "InvalidToken"),
        ),
        (
            request("GET", CREDENTIALS_PATH, Some("evil.example"), Some(&own)),
            (403, "AccessDenied"),
        ),
        (request("GET", "/v2/x", host, Some(&own)), (404, "NotFound")),
    ];
    for (req, (status, code)) in refusals {
        assert_eq!(ask_on(&st, &pod, &memo, req).await, (status, code.into()));
        assert_eq!(
            ask_on(&st, &pod, &memo, good()).await,
            (200, "ASIAHANDLER".into())
        );
    }
    assert_eq!(hits() - hits_before, 5, "each repeat is counted as a hit");

    // New credentials: once the entry holds them, the connection is answered with them.
    *upstream.0.lock().unwrap() = Ok(Credentials::new(
        "ASIANEW".into(),
        "secret".into(),
        "session".into(),
        "123456789012".into(),
        (now() + 3600) as u64,
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut seen = Vec::new();
    for _ in 0..50 {
        let (status, code) = ask_on(&st, &pod, &memo, good()).await;
        assert_eq!(status, 200);
        seen.push(code);
        if seen.last().is_some_and(|c| c == "ASIANEW") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.last().map(String::as_str), Some("ASIANEW"), "{seen:?}");

    // The pod's budget is charged on every repeat.
    st.admission = Admission::new(0.001, 2.0);
    for _ in 0..2 {
        assert_eq!(
            ask_on(&st, &pod, &memo, good()).await,
            (200, "ASIANEW".into())
        );
    }
    assert_eq!(
        ask_on(&st, &pod, &memo, good()).await,
        (503, "TooManyRequests".into())
    );
    let rejected = st
        .metrics
        .admission_rejected
        .get_or_create(&crate::metrics::ListenerLabel {
            listener: "attributed",
        })
        .get();
    assert_eq!(rejected, 1);
    st.admission = Admission::unlimited();

    // A token that expires on a live connection is refused there, repeat or not.
    let (short, memo2) = (test_token(UID, now() + 2), ConnMemo::default());
    let short_lived = || request("GET", CREDENTIALS_PATH, host, Some(&short));
    for _ in 0..2 {
        assert_eq!(ask_on(&st, &pod, &memo2, short_lived()).await.0, 200);
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        ask_on(&st, &pod, &memo2, short_lived()).await,
        (400, "InvalidToken".into())
    );

    // A pod whose cgroup is gone is refused on its live connection within the recheck.
    std::fs::remove_dir_all(tree.root.join(format!("kubepods/besteffort/pod{UID}"))).unwrap();
    tokio::time::sleep(RECHECK_AFTER + Duration::from_millis(100)).await;
    assert_eq!(
        ask_on(&st, &pod, &memo, good()).await,
        (403, "NotAPod".into())
    );
}

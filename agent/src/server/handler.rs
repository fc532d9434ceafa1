//! `GET /v1/credentials`: checks, the EKS Auth exchange, and the answer.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use super::memo::{ConnMemo, Repeated};
use super::State;
use crate::admission::Kept;
use crate::attribution::{Caller, Identity, Outcome, UnattributedPolicy, RECHECK_AFTER};
use crate::cache::{CacheError, Found, Held, Lookup, Waiting};
use crate::config::{CREDENTIAL_V4, CREDENTIAL_V6};
use crate::credentials::error_json;
use crate::metrics::ListenerLabel;
use crate::token::{self, TokenError};
use crate::upstream::UpstreamError;

/// The credentials path every SDK requests.
pub const CREDENTIALS_PATH: &str = "/v1/credentials";

/// Why a credentials request was not served; each maps to one status and one code.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Anything but `/v1/credentials`.
    #[error("no such path: only {CREDENTIALS_PATH} is served")]
    NotFound,
    /// Anything but GET or HEAD.
    #[error("method not allowed: use GET")]
    MethodNotAllowed,
    /// An HTTP/1.1 request without a Host header.
    #[error("Bad Request. HTTP/1.1 requests must carry a Host header")]
    MissingHost,
    /// Host header other than the credential addresses.
    #[error("Access Denied. Called agent through invalid address, please use either [{hosts}] address not {got}")]
    BadHost {
        /// The accepted hosts.
        hosts: String,
        /// What the client sent.
        got: String,
    },
    /// Missing, malformed or out-of-window token.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A connection the kernel has no record of, from an address that is not the node's: it
    /// reached the agent around the connect hook (a DNAT, a load balancer).
    #[error("Access Denied. This connection reached the agent around the kernel's attribution (from {0}, not a node address); connect to the credential address directly")]
    Bypassed(std::net::IpAddr),
    /// The kernel attributed the connection to a cgroup that is not a pod's.
    #[error("Access Denied. The calling process is not in a pod's cgroup")]
    NotAPod,
    /// The token names another pod than the one calling: a replayed token.
    #[error("Access Denied. The service account token does not belong to the calling pod")]
    Mismatch,
    /// A caller the kernel did not attribute to a pod while `--unattributed=deny`.
    #[error("Access Denied. This agent serves only callers the kernel attributes to a pod (--unattributed=deny)")]
    PlainDenied,
    /// The token names the calling pod but another namespace or service account than the
    /// pod's credentials are for.
    #[error("Access Denied. {0}")]
    SubjectChanged(String),
    /// The pod has started as many EKS Auth calls as its budget allows.
    #[error("this pod has made too many EKS Auth calls; retry later")]
    CallBudget,
    /// EKS Auth said no, or could not be reached.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The upstream call outlived the response deadline; it goes on and fills the cache.
    #[error("credentials are being fetched from EKS Auth; retry")]
    Pending,
    /// The calling pod is over its request budget.
    #[error("this pod is over its request budget ({rate}/s); retry later")]
    OverBudget {
        /// Requests per second allowed per pod.
        rate: f64,
    },
}

impl RequestError {
    /// HTTP status and the error code put in the body.
    pub fn status_and_code(&self) -> (StatusCode, &str) {
        match self {
            Self::NotFound => (StatusCode::NOT_FOUND, "NotFound"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
            Self::BadHost { .. } => (StatusCode::FORBIDDEN, "AccessDenied"),
            Self::MissingHost => (StatusCode::BAD_REQUEST, "MissingHost"),
            Self::PlainDenied => (StatusCode::FORBIDDEN, "Unattributed"),
            Self::Bypassed(_) => (StatusCode::FORBIDDEN, "AttributionBypassed"),
            Self::SubjectChanged(_) => (StatusCode::FORBIDDEN, "TokenSubjectMismatch"),
            Self::CallBudget => (StatusCode::SERVICE_UNAVAILABLE, "TooManyRequests"),
            Self::NotAPod => (StatusCode::FORBIDDEN, "NotAPod"),
            Self::Mismatch => (StatusCode::FORBIDDEN, "TokenPodMismatch"),
            Self::Token(_) => (StatusCode::BAD_REQUEST, "InvalidToken"),
            Self::Pending => (StatusCode::SERVICE_UNAVAILABLE, "CredentialsPending"),
            Self::OverBudget { .. } => (StatusCode::SERVICE_UNAVAILABLE, "TooManyRequests"),
            Self::Upstream(e) => match e {
                UpstreamError::Rejected { code, .. } => (StatusCode::BAD_REQUEST, code.as_str()),
                UpstreamError::NotFound { code, .. } => (StatusCode::NOT_FOUND, code.as_str()),
                UpstreamError::Unavailable { code, .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, code.as_str())
                }
                UpstreamError::Incomplete(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "IncompleteResponse")
                }
            },
        }
    }

    /// Metric label for this refusal.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::NotFound => "no_such_path",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BadHost { .. } | Self::MissingHost => "bad_host",
            Self::Token(_) => "bad_token",
            Self::PlainDenied => "unattributed",
            Self::Bypassed(_) => "bypassed",
            Self::SubjectChanged(_) => "subject_changed",
            Self::CallBudget => "call_budget",
            Self::NotAPod => "not_a_pod",
            Self::Mismatch => "mismatch",
            // The same labels the upstream call metrics use.
            Self::Upstream(e) => e.outcome(),
            Self::Pending => "pending",
            Self::OverBudget { .. } => "over_budget",
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let (status, code) = self.status_and_code();
        let mut resp = json_response(status, error_json(code, &self.to_string()));
        if status == StatusCode::METHOD_NOT_ALLOWED {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<CacheError> for RequestError {
    fn from(e: CacheError) -> Self {
        match e {
            CacheError::Upstream(u) => RequestError::Upstream(u),
            CacheError::Pending => RequestError::Pending,
            e @ CacheError::SubjectChanged { .. } => RequestError::SubjectChanged(e.to_string()),
            CacheError::CallBudget(_) => RequestError::CallBudget,
        }
    }
}

fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    // A constant: `from_static` outside a const context checks its bytes on every call.
    const JSON: HeaderValue = HeaderValue::from_static("application/json");
    resp.headers_mut().insert(header::CONTENT_TYPE, JSON);
    resp
}

/// Serves one request from `caller`, on a connection whose requests share `memo`.
pub async fn handle<B>(
    state: &State,
    caller: &Caller,
    memo: &ConnMemo,
    req: Request<B>,
) -> Response<Full<Bytes>> {
    match begin(state, caller, memo, req) {
        Answer::Ready(resp, _) => resp,
        Answer::Later(later) => later.answer(state, caller).await.0,
    }
}

/// A request's answer: ready at once (every refusal and every cache hit), or once EKS Auth
/// has answered.
pub enum Answer {
    /// The answer, and when it was ready.
    Ready(Response<Full<Bytes>>, Instant),
    /// A checked request waiting for EKS Auth.
    Later(Later),
}

/// A request checked and sent to wait for EKS Auth.
pub struct Later {
    request: Served,
    calling_pod: Option<Arc<str>>,
    waiting: Waiting,
}

/// What the answer's metrics and log line need of its request.
struct Served {
    started: Instant,
    head_only: bool,
    logged_path: Option<String>,
}

/// Everything that needs the request, done at once: every check, the cache lookup and, for a
/// hit or a refusal, the answer. No future is made for those (bench case 9: a large future
/// moved into hyper and polled there costs more than the lookup). The request is dropped
/// here too: it is a view into hyper's read buffer, and hyper reads on (the next request, or
/// the connection's end) before it polls an answer; dropped here, the buffer is hyper's alone
/// again and is reused instead of reallocated (two allocations a kept-alive request).
pub fn begin<B>(state: &State, caller: &Caller, memo: &ConnMemo, req: Request<B>) -> Answer {
    let started = Instant::now();
    let request = Served {
        started,
        head_only: req.method() == Method::HEAD,
        logged_path: tracing::enabled!(tracing::Level::DEBUG).then(|| req.uri().path().to_owned()),
    };
    match source(state, caller, memo, &req, started) {
        Source::Now(result) => {
            let (resp, ready) = respond(state, caller, request, result);
            Answer::Ready(resp, ready)
        }
        Source::Call {
            calling_pod,
            waiting,
        } => Answer::Later(Later {
            request,
            calling_pod,
            waiting,
        }),
    }
}

/// Where a request's answer comes from.
enum Source {
    /// A refusal or credentials, now.
    Now(Result<Bytes, RequestError>),
    /// The EKS Auth call to wait for, for this pod.
    Call {
        calling_pod: Option<Arc<str>>,
        waiting: Waiting,
    },
}

/// The request's checks and the cache's word, in order: a repeat of the connection's last
/// hit, else every check and the lookup (whose fresh hit the connection keeps).
fn source<B>(
    state: &State,
    caller: &Caller,
    memo: &ConnMemo,
    req: &Request<B>,
    started: Instant,
) -> Source {
    let authorization = match preflight(req) {
        Ok(authorization) => authorization,
        Err(e) => return Source::Now(Err(e)),
    };
    if let Some(result) = repeat(state, caller, memo, authorization, started) {
        return Source::Now(result);
    }
    let Checked {
        lookup,
        calling_pod,
    } = match check(state, caller, memo, authorization, started) {
        Ok(checked) => checked,
        Err(e) => return Source::Now(Err(e)),
    };
    let result = match state.cache.find(lookup) {
        Ok(Found::Waiting(waiting)) => {
            return Source::Call {
                calling_pod,
                waiting,
            }
        }
        Ok(Found::Ready(creds, held)) => {
            let body = creds.to_json();
            if let (Some(held), Some(_)) = (held, &calling_pod) {
                memo.remember(held, creds);
            }
            Ok(body)
        }
        Err(e) => Err(e),
    };
    Source::Now(settled(state, caller, calling_pod, result))
}

/// A request repeating the connection's last fresh hit (same pod, same token, the cache's
/// credentials unchanged): answered from the memo, with none of the node-wide locks and
/// shared counts the full path takes; `None` when anything it checks may have changed.
fn repeat(
    state: &State,
    caller: &Caller,
    memo: &ConnMemo,
    authorization: Option<&HeaderValue>,
    now: Instant,
) -> Option<Result<Bytes, RequestError>> {
    let Caller::Pod(_) = caller else {
        return None;
    };
    let admit = |uid: &str, kept: &mut Kept, held: &mut Held| {
        let admitted = state.admission.admit(|| uid, kept);
        if admitted {
            state
                .cache
                .reused(held, tokio::time::Instant::from_std(now));
        }
        admitted
    };
    let result = match memo.repeat(authorization, now, || token::epoch_secs() as i64, admit)? {
        Repeated::Answer(body) => Ok(body),
        Repeated::OverBudget => Err(over_budget(state, caller)),
    };
    if result.is_ok() {
        count_attribution(state, caller, Outcome::Attributed);
    }
    Some(result)
}

impl Later {
    /// The answer once EKS Auth has answered (or the response deadline has passed), and when
    /// it was ready.
    pub async fn answer(self, state: &State, caller: &Caller) -> (Response<Full<Bytes>>, Instant) {
        let result = self.waiting.wait().await.map(|creds| creds.to_json());
        let result = settled(state, caller, self.calling_pod, result);
        respond(state, caller, self.request, result)
    }
}

/// The cache's word on a checked request, counted for attribution.
fn settled(
    state: &State,
    caller: &Caller,
    calling_pod: Option<Arc<str>>,
    result: Result<Bytes, CacheError>,
) -> Result<Bytes, RequestError> {
    if caller.cgroup_id().is_some() {
        let outcome = match &result {
            Err(e @ CacheError::SubjectChanged { .. }) => {
                tracing::warn!(
                    calling_pod = calling_pod.as_deref().unwrap_or("none"),
                    error = %e,
                    "refused a token that names another service account than the pod's (TokenSubjectMismatch)"
                );
                Outcome::IdentityChanged
            }
            _ => Outcome::Attributed,
        };
        count_attribution(state, caller, outcome);
    }
    Ok(result?)
}

/// The response for `result`, counted, logged at debug, and when it was ready.
fn respond(
    state: &State,
    caller: &Caller,
    Served {
        started,
        head_only,
        logged_path,
    }: Served,
    result: Result<Bytes, RequestError>,
) -> (Response<Full<Bytes>>, Instant) {
    let (mut resp, outcome) = match result {
        Ok(body) => (json_response(StatusCode::OK, body), "success"),
        Err(e) => {
            tracing::info!(error = %e, "credentials request refused");
            let outcome = e.outcome();
            (e.into_response(), outcome)
        }
    };
    // One clock read: the latency and the connection's idle start (`drain::Progress`).
    let ready = Instant::now();
    state.metrics.record_response(
        resp.status().as_u16(),
        outcome,
        (ready - started).as_secs_f64(),
    );
    // `begin` kept the path only when the line is written.
    if let Some(path) = logged_path {
        // Resolved again only for the log line (cached).
        let pod = match caller {
            Caller::Pod(id) => state.resolver.as_ref().and_then(|r| r.resolve(*id)),
            _ => None,
        };
        tracing::debug!(
            path,
            status = resp.status().as_u16(),
            listener = caller.listener(),
            cgroup_id = caller.cgroup_id(),
            cgroup_path = pod.as_ref().map(|p| p.path.display().to_string()),
            pod_uid = pod.as_ref().and_then(|p| p.pod_uid.as_deref()),
            micros = (ready - started).as_micros() as u64,
            "request served"
        );
    }
    if head_only {
        *resp.body_mut() = Full::new(Bytes::new());
    }
    (resp, ready)
}

/// What the cache is asked once a request has passed every check, and the pod it is for.
struct Checked {
    lookup: Lookup,
    calling_pod: Option<Arc<str>>,
}

/// What needs only the request, in order: method, path and Host; then its `Authorization`.
fn preflight<B>(req: &Request<B>) -> Result<Option<&HeaderValue>, RequestError> {
    // The method first: CONNECT and friends have no path to match.
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(RequestError::MethodNotAllowed);
    }
    if req.uri().path() != CREDENTIALS_PATH {
        return Err(RequestError::NotFound);
    }
    let (host, authorization) = host_and_authorization(req.headers());
    check_host(req, host)?;
    Ok(authorization)
}

/// The rest of the checks, in order: the kernel's caller, admission, the token
/// (`authorization`) and the cross-check.
fn check(
    state: &State,
    caller: &Caller,
    memo: &ConnMemo,
    authorization: Option<&HeaderValue>,
    started: Instant,
) -> Result<Checked, RequestError> {
    // Who is calling, per the kernel, before the token is even looked at.
    let identity = identify(state, caller, memo, started)?;
    let admitted = memo.admit(|kept| match &identity {
        Identity::Pod { uid, .. } => state.admission.admit(|| uid.clone(), kept),
        Identity::Peer(ip) => state.admission.admit(|| ip.to_string(), kept),
    });
    if !admitted {
        return Err(over_budget(state, caller));
    }
    // A pod's new connection presenting the pod's last token finds it parsed in the pod's
    // cache entry; a pod presenting another pod's token finds its own there, and parses.
    let recall = |bytes: &[u8]| match &identity {
        Identity::Pod { uid, .. } => state.cache.recall(uid, bytes),
        Identity::Peer(_) => None,
    };
    let parsed = memo.token(authorization, token::epoch_secs() as i64, recall)?;
    let ((key, subject), cgroup, calling_pod) = match identity {
        Identity::Pod { uid, cgroup } => {
            if parsed.facts.pod_uid.as_deref() != Some(&*uid) {
                count_attribution(state, caller, Outcome::Mismatch);
                // Pod UIDs only: what an operator needs to find both pods (the alert's
                // runbook), nothing of the token itself.
                tracing::warn!(
                    calling_pod = %uid,
                    token_pod = parsed.facts.pod_uid.as_deref().unwrap_or("none"),
                    "refused a token that names another pod (TokenPodMismatch)"
                );
                return Err(RequestError::Mismatch);
            }
            // The kernel proved the pod; the token names its service account, which the
            // cache holds the pod to.
            (memo.key(&parsed, Some(&uid)), Some(cgroup), Some(uid))
        }
        Identity::Peer(_) => (memo.key(&parsed, None), None, None),
    };
    Ok(Checked {
        lookup: Lookup {
            key,
            token_exp: parsed.facts.exp,
            token: parsed.token,
            facts: Some(parsed.facts),
            cgroup,
            subject,
        },
        calling_pod,
    })
}

/// A request over its caller's budget, counted.
fn over_budget(state: &State, caller: &Caller) -> RequestError {
    state
        .metrics
        .admission_rejected
        .get_or_create(&ListenerLabel {
            listener: caller.listener(),
        })
        .inc();
    RequestError::OverBudget {
        rate: state.admission.rate(),
    }
}

/// Who is calling: the pod the kernel attributed the connection to, or the address of a
/// caller the kernel did not attribute when the policy allows it. Refusals are counted here.
fn identify(
    state: &State,
    caller: &Caller,
    memo: &ConnMemo,
    now: Instant,
) -> Result<Identity, RequestError> {
    match caller {
        Caller::Node(ip) | Caller::Plain(ip) => {
            count_attribution(state, caller, Outcome::Unattributed);
            match state.unattributed {
                UnattributedPolicy::Allow => Ok(Identity::Peer(*ip)),
                UnattributedPolicy::Deny => Err(RequestError::PlainDenied),
            }
        }
        Caller::Bypassed(ip) => {
            count_attribution(state, caller, Outcome::Bypassed);
            Err(RequestError::Bypassed(*ip))
        }
        Caller::Pod(id) => {
            // Once per connection (and per recheck), not per request: the node-wide
            // resolver is a lock every worker thread would take on every request.
            let pod = state
                .resolver
                .as_ref()
                .and_then(|r| memo.pod(now, RECHECK_AFTER, || r.resolve(*id)))
                .and_then(|cgroup| cgroup.identity());
            match pod {
                Some(pod) => Ok(pod),
                None => {
                    count_attribution(state, caller, Outcome::NotAPod);
                    // The kernel takes the pod's position from QoS cgroups it was told of; a
                    // QoS cgroup made since is taken for a pod until the config is rewritten.
                    if let Some(Err(e)) = state.steering.as_ref().map(|s| s.configure_budget()) {
                        tracing::warn!(error = %e, "cannot refresh the kernel's pod positions");
                    }
                    Err(RequestError::NotAPod)
                }
            }
        }
    }
}

fn count_attribution(state: &State, caller: &Caller, outcome: Outcome) {
    state
        .metrics
        .count_attribution(caller.listener(), outcome.label());
}

/// The first `Host` and `Authorization` values, in one pass over the few headers a request
/// has (two hashed lookups cost twice as much: bench case 9).
fn host_and_authorization(headers: &HeaderMap) -> (Option<&HeaderValue>, Option<&HeaderValue>) {
    let (mut host, mut authorization) = (None, None);
    for (name, value) in headers {
        if name == header::HOST {
            host.get_or_insert(value);
        } else if name == header::AUTHORIZATION {
            authorization.get_or_insert(value);
        }
    }
    (host, authorization)
}

/// Accepts the two credential addresses, with or without a port, as the reference agent does;
/// `host` is the request's `Host` header.
fn check_host<B>(req: &Request<B>, host: Option<&HeaderValue>) -> Result<(), RequestError> {
    // What every SDK sends, compared as bytes: parsing an address (or even checking the
    // header's text, or splitting off a port) on every request showed in the profiles.
    if host.is_some_and(|h| h.as_bytes() == CANONICAL_V4.as_bytes()) {
        return Ok(());
    }
    let raw = host
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host());
    let Some(raw) = raw else {
        // HTTP/1.1 requires Host (RFC 9112 §3.2); HTTP/1.0 falls through to the address check.
        if req.version() == http::Version::HTTP_11 {
            return Err(RequestError::MissingHost);
        }
        return Err(RequestError::BadHost {
            hosts: credential_hosts(),
            got: String::new(),
        });
    };
    // Other spellings are parsed.
    let host = host_without_port(raw);
    if host == CANONICAL_V4
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip == CREDENTIAL_V4 || ip == CREDENTIAL_V6)
    {
        Ok(())
    } else {
        Err(RequestError::BadHost {
            hosts: credential_hosts(),
            got: raw.to_owned(),
        })
    }
}

/// The IPv4 credential address as SDKs write it in `Host`.
const CANONICAL_V4: &str = "169.254.170.23";

/// The credential addresses, as the Host refusal names them.
fn credential_hosts() -> String {
    format!("{CREDENTIAL_V4} {CREDENTIAL_V6}")
}

/// `169.254.170.23:80` → `169.254.170.23`, `[fd00:ec2::23]:80` → `fd00:ec2::23`.
pub fn host_without_port(raw: &str) -> &str {
    if let Some(rest) = raw.strip_prefix('[') {
        return rest.split_once(']').map_or(raw, |(h, _)| h);
    }
    match raw.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => raw,
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod host_tests {
    use super::*;

    #[test]
    fn host_forms() {
        assert_eq!(host_without_port("169.254.170.23"), "169.254.170.23");
        assert_eq!(host_without_port("169.254.170.23:80"), "169.254.170.23");
        assert_eq!(host_without_port("[fd00:ec2::23]"), "fd00:ec2::23");
        assert_eq!(host_without_port("[fd00:ec2::23]:80"), "fd00:ec2::23");
        assert_eq!(host_without_port("fd00:ec2::23"), "fd00:ec2::23");
        assert_eq!(host_without_port("evil.example:80"), "evil.example");
    }
}

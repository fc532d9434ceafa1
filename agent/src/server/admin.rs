//! The small HTTP endpoints beside the credential listeners: `/healthz` and `/readyz` on
//! localhost (answered from state, never by a self-request that can time out, the reference
//! agent's bug #26) and Prometheus `/metrics`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::limits::{ConnLimits, Peer};
use super::State;
use crate::metrics::{EventLabel, ModeLabel, PodLabel};

/// What an admin listener answers.
pub type Router = fn(&State, &str) -> Response<Full<Bytes>>;

/// Serves `router` on `listener` until `stop` flips, within `limits`.
pub async fn serve(
    state: Arc<State>,
    listener: TcpListener,
    router: Router,
    limits: Arc<ConnLimits>,
    stop: watch::Receiver<bool>,
) {
    super::accept_until(&listener, stop, |stream, peer| {
        let place = match limits.admit(Peer::Ip(peer.ip())) {
            Ok(place) => place,
            Err(refusal) => return state.metrics.count_refused("admin", refusal.label()),
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _place = place;
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(router(&state, req.uri().path())) }
            });
            let _ = super::http1()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    })
    .await;
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// `/healthz` and `/readyz`.
pub fn probes(state: &State, path: &str) -> Response<Full<Bytes>> {
    let json = "application/json";
    match path {
        // Answering at all proves the event loop turns.
        "/healthz" => respond(StatusCode::OK, json, r#"{"status":"ok"}"#.into()),
        "/readyz" => {
            let (ready, reason) = readiness(state);
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::json!({
                "status": if ready { "ready" } else { "not ready" },
                "mode": state.mode(),
                "reason": reason,
            });
            respond(status, json, body.to_string())
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            json,
            r#"{"status":"no such probe"}"#.into(),
        ),
    }
}

/// Ready once listeners are bound and, with eBPF, while every program is in the pods
/// cgroup's effective set (re-checked on each probe: someone may detach us).
fn readiness(state: &State) -> (bool, Option<String>) {
    if !state.ready.load(Ordering::SeqCst) {
        return (false, Some("listeners are not serving".into()));
    }
    let Some(steering) = &state.steering else {
        return (true, None);
    };
    match steering.verify_effective(steering.cgroup()) {
        Ok(missing) if missing.is_empty() => (true, None),
        Ok(missing) => (
            false,
            Some(format!(
                "programs not in effect on {}: {missing:?}",
                steering.cgroup().display()
            )),
        ),
        Err(e) => (false, Some(e.to_string())),
    }
}

/// `/metrics`.
pub fn metrics(state: &State, path: &str) -> Response<Full<Bytes>> {
    if path != "/metrics" {
        return respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "only /metrics is served\n".into(),
        );
    }
    let m = &state.metrics;
    m.mode
        .get_or_create(&ModeLabel { mode: state.mode() })
        .set(1);
    m.cache_entries.set(state.cache.len() as u64);
    m.cache_capacity.set(state.cache.capacity() as u64);
    m.ready.set(u64::from(readiness(state).0));
    m.cache_soonest_expiry.clear();
    if let Some(left) = state.cache.soonest_expiry() {
        m.cache_soonest_expiry
            .get_or_create(&Vec::new())
            .set(left.as_secs_f64());
    }
    if let Some(steering) = &state.steering {
        m.ebpf_tuples.set(steering.live_tuples() as u64);
        for (feature, on) in steering.features().list() {
            m.ebpf_feature
                .get_or_create(&crate::metrics::FeatureLabel { feature })
                .set(u64::from(on));
        }
        for (counter, value) in steering.counters() {
            m.ebpf_events
                .get_or_create(&EventLabel {
                    event: counter.name(),
                })
                .set(value);
        }
        let budgets = steering.pod_budgets();
        m.ebpf_pod_budgets.set(budgets.len() as u64);
        // Pods gone since the last scrape drop out of the family.
        m.pod_connects_refused.clear();
        if budgets.iter().any(|(_, b)| b.refused > 0) {
            let cgroups = crate::cgroup::pod_level(steering.cgroup());
            for (id, b) in budgets.iter().filter(|(_, b)| b.refused > 0) {
                let uid = cgroups
                    .get(id)
                    .and_then(|p| p.file_name()?.to_str())
                    .and_then(crate::cgroup::pod_uid_from_name);
                if let Some(pod) = uid {
                    m.pod_connects_refused
                        .get_or_create(&PodLabel { pod })
                        .set(b.refused);
                }
            }
        }
    }
    respond(
        StatusCode::OK,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        m.encode(),
    )
}

//! `/healthz` and `/readyz` on localhost, answered from state (never by a self-request that
//! can time out, the reference agent's bug #26).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::State;

/// Serves the probe endpoints until `stop` flips.
pub async fn serve(state: Arc<State>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, req.uri().path())) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(state: &State, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        // Answering at all proves the event loop turns.
        "/healthz" => (StatusCode::OK, serde_json::json!({"status": "ok"})),
        "/readyz" => {
            let ready = state.ready.load(Ordering::SeqCst);
            let mode = if state.steering.is_some() {
                "ebpf"
            } else {
                "fallback"
            };
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (
                status,
                serde_json::json!({"status": if ready { "ready" } else { "not ready" }, "mode": mode}),
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            serde_json::json!({"status": "no such probe"}),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

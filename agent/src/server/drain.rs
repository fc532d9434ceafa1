//! How a credential connection ends when the agent stops (SIGTERM, or after a handover): a
//! request in flight finishes, an idle keep-alive connection closes, and a connection that
//! has not sent its first request yet gets that request answered. The last is a pod that
//! connected to ask for credentials; closing it unanswered breaks its call (a slow CPU took
//! longer than any fixed grace to deliver the request). hyper's header read timeout bounds
//! the wait for it.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper::server::conn::http1::Connection;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

/// Whether a connection's first request has reached the service yet.
#[derive(Debug, Default)]
pub struct FirstRequest {
    seen: AtomicBool,
    notify: Notify,
}

impl FirstRequest {
    /// Called by the service on every request; only the first one costs more than a load.
    pub fn seen(&self) {
        if !self.seen.load(Ordering::Relaxed) {
            self.seen.store(true, Ordering::Release);
            self.notify.notify_one();
        }
    }

    async fn wait(&self) {
        // notify_one keeps a permit when nobody waits yet: no lost wake-up.
        if !self.seen.load(Ordering::Acquire) {
            self.notify.notified().await;
        }
    }
}

/// Runs `conn` until it ends; once `stop` turns true, ends it as the module says.
pub async fn serve_until_stopped<S>(
    conn: Connection<TokioIo<TcpStream>, S>,
    first: &FirstRequest,
    mut stop: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    S: HttpService<hyper::body::Incoming>,
    S::ResBody: hyper::body::Body + Send + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Future + Send,
{
    tokio::pin!(conn);
    tokio::select! {
        ended = conn.as_mut() => return ended,
        // A dropped sender is a stop too (the server is gone).
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
    tokio::select! {
        ended = conn.as_mut() => return ended,
        _ = first.wait() => {}
    }
    // From here hyper finishes what is in flight (with `connection: close`) and closes.
    conn.as_mut().graceful_shutdown();
    conn.await
}

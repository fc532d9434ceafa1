//! How a credential connection ends when the agent stops (SIGTERM, or after a handover): a
//! request in flight finishes, an idle keep-alive connection closes, and a connection that
//! has not sent its first request yet gets that request answered. The last is a pod that
//! connected to ask for credentials; closing it unanswered breaks its call (a slow CPU took
//! longer than any fixed grace to deliver the request). hyper's header read timeout bounds
//! the wait for it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hyper::server::conn::http1::Connection;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};

/// Tells every live credential connection to stop, and knows when they all have ended. Each
/// connection gets a channel of its own: one shared `watch` (or hyper-util's graceful
/// watcher) takes a mutex all connections share on every wake-up of every connection.
#[derive(Debug, Default)]
pub struct Stopper {
    state: Mutex<Live>,
    emptied: Notify,
}

#[derive(Debug, Default)]
struct Live {
    stopped: bool,
    next_id: u64,
    /// Each live connection's id (ours, counted up) and, until the stop, its sender.
    conns: HashMap<u64, Option<oneshot::Sender<()>>, foldhash::fast::RandomState>,
}

/// One connection's end of the [`Stopper`]: resolves at the stop; leaving unregisters.
#[derive(Debug)]
pub struct StopSignal {
    stopper: Arc<Stopper>,
    id: u64,
    rx: oneshot::Receiver<()>,
}

impl Stopper {
    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection (at accept, before its task runs, so [`Stopper::stop`] counts
    /// it); after the stop its signal has fired already.
    pub fn register(self: &Arc<Self>) -> StopSignal {
        let (tx, rx) = oneshot::channel();
        let mut live = self.live();
        let id = live.next_id;
        live.next_id += 1;
        // After the stop the sender is dropped at once: the receiver resolves.
        let tx = (!live.stopped).then_some(tx);
        live.conns.insert(id, tx);
        StopSignal {
            stopper: self.clone(),
            id,
            rx,
        }
    }

    /// Signals every connection, then waits until all have ended.
    pub async fn stop(&self) {
        let senders: Vec<_> = {
            let mut live = self.live();
            live.stopped = true;
            live.conns.values_mut().filter_map(Option::take).collect()
        };
        for tx in senders {
            let _ = tx.send(());
        }
        // notify_one keeps a permit when nobody waits yet: the last leave is not missed.
        if !self.live().conns.is_empty() {
            self.emptied.notified().await;
        }
    }
}

impl Drop for StopSignal {
    fn drop(&mut self) {
        let mut live = self.stopper.live();
        live.conns.remove(&self.id);
        if live.stopped && live.conns.is_empty() {
            self.stopper.emptied.notify_one();
        }
    }
}

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

/// Runs `conn` until it ends; once `stop` fires, ends it as the module says.
pub async fn serve_until_stopped<S>(
    conn: Connection<TokioIo<TcpStream>, S>,
    first: &FirstRequest,
    mut stop: StopSignal,
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
        // A send or a dropped sender: either is the stop.
        _ = &mut stop.rx => {}
    }
    tokio::select! {
        ended = conn.as_mut() => return ended,
        _ = first.wait() => {}
    }
    // From here hyper finishes what is in flight (with `connection: close`) and closes.
    conn.as_mut().graceful_shutdown();
    conn.await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_stop_signals_every_connection_and_waits_for_the_last() {
        let stopper = Arc::new(Stopper::default());
        let (a, b) = (stopper.register(), stopper.register());
        let stopping = tokio::spawn({
            let stopper = stopper.clone();
            async move { stopper.stop().await }
        });
        // Both fire; the stop waits while one is still live.
        let a = tokio::time::timeout(Duration::from_secs(5), async move {
            let mut a = a;
            (&mut a.rx).await.expect("sent");
            a
        })
        .await
        .expect("a fired");
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!stopping.is_finished(), "b is still live");
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), stopping)
            .await
            .expect("the stop ends once the last connection has")
            .expect("no panic");
    }

    #[tokio::test]
    async fn a_connection_registered_after_the_stop_is_stopped_from_the_start() {
        let stopper = Arc::new(Stopper::default());
        // Nothing live: the stop returns at once.
        tokio::time::timeout(Duration::from_secs(5), stopper.stop())
            .await
            .expect("nothing to wait for");
        let mut late = stopper.register();
        tokio::time::timeout(Duration::from_secs(5), &mut late.rx)
            .await
            .expect("fired at once")
            .expect_err("its sender was dropped at registration");
    }

    #[tokio::test]
    async fn first_request_wakes_a_waiter_and_a_later_one_alike() {
        let first = Arc::new(FirstRequest::default());
        let waiting = tokio::spawn({
            let first = first.clone();
            async move { first.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.seen();
        first.seen();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("no panic");
        tokio::time::timeout(Duration::from_secs(5), first.wait())
            .await
            .expect("already seen");
    }
}

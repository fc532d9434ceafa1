//! How a credential connection ends when the agent stops (SIGTERM, or after a handover): a
//! request in flight finishes, an idle keep-alive connection closes, and a connection that
//! has not sent its first request yet gets that request answered. The last is a pod that
//! connected to ask for credentials; closing it unanswered breaks its call (a slow CPU took
//! longer than any fixed grace to deliver the request). The head timeout bounds the wait
//! for it.
//!
//! And how any connection ends that sends no complete request head within the head timeout
//! of its start or of its last answer: slow-head clients and idle keep-alive connections
//! alike (untrusted pods must not hold connections, and descriptors, for free). hyper's own
//! header read timeout does the same with a timer armed, boxed and cleared for every request
//! (bench case 9: 450 instructions and an extra turn of hyper's loop per request); here one
//! timer per connection reads what [`Progress`] counted when it fires.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// What a connection's requests have done: how many reached the service, how many were
/// answered and when the last answer was ready. Written by the service (plain stores: one
/// writer), read by the connection's own task when its head timer fires or at a stop.
#[derive(Debug)]
pub struct Progress {
    opened: Instant,
    begun: AtomicU64,
    answered: AtomicU64,
    /// When the last answer was ready, in milliseconds after `opened`.
    idle_from_ms: AtomicU64,
    first: Notify,
}

impl Default for Progress {
    fn default() -> Self {
        Self::since(Instant::now())
    }
}

impl Progress {
    /// A connection opened at `opened`.
    pub fn since(opened: Instant) -> Self {
        Self {
            opened,
            begun: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            idle_from_ms: AtomicU64::new(0),
            first: Notify::new(),
        }
    }

    /// Called by the service for every request; only the first one costs more than a store.
    pub fn begun(&self) {
        let n = self.begun.load(Ordering::Relaxed);
        self.begun.store(n + 1, Ordering::Release);
        if n == 0 {
            self.first.notify_one();
        }
    }

    /// Called by the service when a request's answer is ready (`at`): the connection is idle
    /// from then until the next request's head is complete.
    pub fn answered(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.opened).as_millis() as u64;
        self.idle_from_ms.store(ms, Ordering::Relaxed);
        let n = self.answered.load(Ordering::Relaxed);
        self.answered.store(n + 1, Ordering::Release);
    }

    /// When the connection must be ended if nothing happens before, asked at `now`: `timeout`
    /// after its last answer (or its start) while no request is being answered, `timeout`
    /// from `now` while one is (its answer restarts the clock). `None`: that time has passed.
    pub fn head_deadline(&self, now: Instant, timeout: Duration) -> Option<Instant> {
        let answered = self.answered.load(Ordering::Acquire);
        if self.begun.load(Ordering::Acquire) != answered {
            return Some(now + timeout);
        }
        let idle_from =
            self.opened + Duration::from_millis(self.idle_from_ms.load(Ordering::Relaxed));
        let deadline = idle_from + timeout;
        (deadline > now).then_some(deadline)
    }

    async fn first_request(&self) {
        // notify_one keeps a permit when nobody waits yet: no lost wake-up.
        if self.begun.load(Ordering::Acquire) == 0 {
            self.first.notified().await;
        }
    }
}

/// How a connection ended other than by itself.
#[derive(Debug, thiserror::Error)]
pub enum Ended {
    /// hyper's error (parse, I/O, an incomplete message).
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// No complete request head within the head timeout.
    #[error("no complete request head within {0:?}")]
    HeadTimeout(Duration),
}

/// Runs `conn` until it ends, ending it when no request head completes within
/// `head_timeout` (see [`Progress::head_deadline`]); once `stop` fires, ends it as the module
/// says.
pub async fn serve_until_stopped<S>(
    conn: Connection<TokioIo<TcpStream>, S>,
    progress: &Progress,
    head_timeout: Duration,
    mut stop: StopSignal,
) -> Result<(), Ended>
where
    S: HttpService<hyper::body::Incoming>,
    S::ResBody: hyper::body::Body + Send + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Future + Send,
{
    tokio::pin!(conn);
    let head_timer = tokio::time::sleep_until((progress.opened + head_timeout).into());
    tokio::pin!(head_timer);
    #[derive(PartialEq)]
    enum Phase {
        Serving,
        // Stopped, waiting for the first request (if it has not come yet).
        AwaitingFirst,
        Draining,
    }
    let mut phase = Phase::Serving;
    loop {
        // Biased: the connection first (it is what wakes almost always), and no random
        // start, which costs a thread-local RNG per poll.
        tokio::select! {
            biased;
            ended = conn.as_mut() => return Ok(ended?),
            // A send or a dropped sender: either is the stop.
            _ = &mut stop.rx, if phase == Phase::Serving => phase = Phase::AwaitingFirst,
            _ = progress.first_request(), if phase == Phase::AwaitingFirst => {
                // From here hyper finishes what is in flight (with `connection: close`) and
                // closes.
                conn.as_mut().graceful_shutdown();
                phase = Phase::Draining;
            }
            _ = head_timer.as_mut() => {
                match progress.head_deadline(Instant::now(), head_timeout) {
                    Some(next) => head_timer.as_mut().reset(next.into()),
                    None => return Err(Ended::HeadTimeout(head_timeout)),
                }
            }
        }
    }
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
        let progress = Arc::new(Progress::default());
        let waiting = tokio::spawn({
            let progress = progress.clone();
            async move { progress.first_request().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        progress.begun();
        progress.begun();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("no panic");
        tokio::time::timeout(Duration::from_secs(5), progress.first_request())
            .await
            .expect("already seen");
    }

    #[test]
    fn the_head_deadline_runs_from_the_last_answer_and_waits_for_one_in_flight() {
        let opened = Instant::now();
        let t = Duration::from_secs(5);
        let s = Duration::from_secs(1);
        let progress = Progress::since(opened);
        // Nothing yet: the head is due `t` after the start.
        assert_eq!(progress.head_deadline(opened + s, t), Some(opened + t));
        assert_eq!(progress.head_deadline(opened + t, t), None);
        // A request in flight (an EKS Auth call can outlast `t`): never due while it is.
        progress.begun();
        assert_eq!(
            progress.head_deadline(opened + 9 * s, t),
            Some(opened + 9 * s + t)
        );
        // Answered at 9 s: the next head is due at 14 s.
        progress.answered(opened + 9 * s);
        assert_eq!(
            progress.head_deadline(opened + 10 * s, t),
            Some(opened + 14 * s)
        );
        assert_eq!(progress.head_deadline(opened + 14 * s, t), None);
        // A pipelined pair: the second is in flight while the first's answer is written.
        progress.begun();
        progress.begun();
        progress.answered(opened + 15 * s);
        assert_eq!(
            progress.head_deadline(opened + 30 * s, t),
            Some(opened + 35 * s)
        );
    }

    /// A real hyper connection on loopback under a 200 ms head timeout, its service taking
    /// `answer_after` to answer; returns what the client read and when the server hung up.
    async fn exchange(answer_after: Duration, sent: &'static [u8]) -> (String, Duration) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let progress = Arc::new(Progress::default());
            let service = hyper::service::service_fn({
                let progress = progress.clone();
                move |_req| {
                    let progress = progress.clone();
                    progress.begun();
                    async move {
                        tokio::time::sleep(answer_after).await;
                        progress.answered(Instant::now());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                        ))
                    }
                }
            });
            let conn = super::super::http1()
                .header_read_timeout(None)
                .serve_connection(TokioIo::new(stream), service);
            let stop = Arc::new(Stopper::default()).register();
            serve_until_stopped(conn, &progress, Duration::from_millis(200), stop).await
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        let start = Instant::now();
        client.write_all(sent).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
            .await
            .expect("the server hangs up")
            .unwrap();
        let closed_after = start.elapsed();
        let _ = server.await.unwrap();
        (String::from_utf8_lossy(&got).into_owned(), closed_after)
    }

    #[tokio::test]
    async fn a_slow_answer_is_not_cut_and_an_idle_or_slow_head_connection_is() {
        let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        // An answer that takes twice the head timeout arrives; the kept-alive connection is
        // then closed one head timeout after it.
        let (got, closed) = exchange(Duration::from_millis(400), get).await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(
            closed >= Duration::from_millis(600) && closed < Duration::from_secs(3),
            "closed after {closed:?}"
        );
        // Half a head, never finished: closed one head timeout after the start, unanswered.
        let (got, closed) = exchange(Duration::ZERO, b"GET / HTTP/1.1\r\nHost: x\r\n").await;
        assert_eq!(got, "");
        assert!(
            closed >= Duration::from_millis(200) && closed < Duration::from_secs(3),
            "closed after {closed:?}"
        );
    }
}

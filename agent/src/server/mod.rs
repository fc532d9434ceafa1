//! Listeners, the accept loop (where each connection learns its caller from the kernel),
//! probes, and orderly shutdown.

mod admin;
pub mod drain;
pub mod handler;
pub mod limits;
pub mod listen;
pub mod memo;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{self, Either};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::attribution::{Caller, NodeAddresses, Resolver};
use crate::ebpf::Steering;
use limits::{ConnGuard, ConnLimits, Peer};

/// Bound on reading a request's head (from a connection's start or its last answer), so slow
/// or idle clients cannot hold connections.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head buffered (the token is at most 16 KiB).
const MAX_HEAD_BYTES: usize = 32 * 1024;
/// How long in-flight requests (and the first requests of connections accepted last) may
/// take to finish at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a request handler needs, shared by all connections.
#[derive(Debug)]
pub struct State {
    /// The credential cache in front of EKS Auth.
    pub cache: Arc<crate::cache::Cache>,
    /// Attached programs, when eBPF is on.
    pub steering: Option<Steering>,
    /// cgroup id resolver, when eBPF is on.
    pub resolver: Option<Arc<Resolver>>,
    /// The node's own addresses: where a connection the kernel did not record may come from.
    pub node_addrs: NodeAddresses,
    /// Per-pod (per-peer for unattributed callers) request budgets.
    pub admission: crate::admission::Admission,
    /// What to do with plain-listener callers.
    pub unattributed: crate::attribution::UnattributedPolicy,
    /// Set once every listener is bound and serving.
    pub ready: AtomicBool,
    /// Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl State {
    /// `ebpf` when the kernel attributes callers, else `fallback`.
    pub fn mode(&self) -> &'static str {
        if self.steering.is_some() {
            "ebpf"
        } else {
            "fallback"
        }
    }
}

/// A bound credential listener.
#[derive(Debug)]
pub struct Bound {
    /// The socket.
    pub listener: TcpListener,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener the agent cannot do without failed to bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Nothing could be bound at all.
    #[error("no credential listener could be bound")]
    NoListener,
}

/// One listener per host on `port`, each with an accept queue of `backlog`: the one
/// `inherited` holds for it, else a new one. IPv6 that the node does not have is skipped
/// with a warning (the reference agent crash-loops there); IPv4 failures are fatal.
pub fn bind_all(
    hosts: &[IpAddr],
    port: u16,
    backlog: u32,
    inherited: &mut listen::Inherited,
) -> Result<Vec<Bound>, ServeError> {
    let mut bound = Vec::new();
    for &host in hosts {
        let addr = SocketAddr::new(host, port);
        match inherited.open(addr, backlog) {
            Ok(listener) => bound.push(Bound { listener }),
            Err(source) if host.is_ipv6() && ipv6_unavailable(&source) => {
                tracing::warn!(%host, error = %source, "IPv6 credential address unavailable on this node; serving without it");
            }
            Err(source) => return Err(ServeError::Bind { addr, source }),
        }
    }
    if bound.is_empty() {
        return Err(ServeError::NoListener);
    }
    Ok(bound)
}

fn ipv6_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRNOTAVAIL) | Some(libc::EAFNOSUPPORT) | Some(libc::EPROTONOSUPPORT)
    )
}

/// Serves `listeners` (and the probe and metrics listeners) until `shutdown` resolves, then
/// drains in-flight requests; returns what `shutdown` said. `fds` is the process's
/// descriptor limit: the credential listeners' connection cap keeps some of it in reserve.
pub async fn serve<T>(
    state: Arc<State>,
    fds: usize,
    listeners: Vec<Bound>,
    probe_listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = T>,
) -> T {
    // Known label values are exported from the start (at 0): a dashboard or a test can tell
    // "none yet" from "not exported".
    for listener in ["attributed", "plain"] {
        for outcome in crate::attribution::Outcome::ALL {
            let labels = crate::metrics::AttributionLabels {
                listener,
                outcome: outcome.label(),
            };
            drop(state.metrics.attribution.get_or_create(&labels));
        }
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopper = Arc::new(drain::Stopper::default());
    let mut tasks = tokio::task::JoinSet::new();
    let credential_limits = ConnLimits::credentials(fds);
    for bound in listeners {
        tasks.spawn(accept_loop(
            state.clone(),
            bound,
            credential_limits.clone(),
            stop_rx.clone(),
            stopper.clone(),
        ));
    }
    let admin_limits = ConnLimits::admin();
    for (listener, router) in [
        (probe_listener, admin::probes as admin::Router),
        (metrics_listener, admin::metrics),
    ] {
        tasks.spawn(admin::serve(
            state.clone(),
            listener,
            router,
            admin_limits.clone(),
            stop_rx.clone(),
        ));
    }
    state.ready.store(true, Ordering::SeqCst);

    let stopped = shutdown.await;
    state.ready.store(false, Ordering::SeqCst);
    tracing::info!("shutting down: no longer accepting, draining in-flight requests");
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    // Every connection is registered by now (drain.rs says how each ends).
    if tokio::time::timeout(DRAIN_TIMEOUT, stopper.stop())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within {DRAIN_TIMEOUT:?}");
    }
    stopped
}

async fn accept_loop(
    state: Arc<State>,
    bound: Bound,
    limits: Arc<ConnLimits>,
    stop: watch::Receiver<bool>,
    stopper: Arc<drain::Stopper>,
) {
    let local = bound.listener.local_addr().ok();
    tracing::info!(addr = ?local, "listening");
    accept_until(&bound.listener, stop, |stream, peer| {
        let caller = caller_of(&state, &stream, peer);
        let key = match caller {
            Caller::Pod(id) => Peer::Pod(id),
            _ => Peer::Ip(peer.ip()),
        };
        match limits.admit(key) {
            Ok(place) => {
                tokio::spawn(serve_connection(
                    state.clone(),
                    stream,
                    peer,
                    caller,
                    place,
                    stopper.register(),
                ));
            }
            Err(refusal) => state
                .metrics
                .count_refused(caller.listener(), refusal.label()),
        }
    })
    .await;
}

/// Accepts on `listener` until `stop` flips, handing each connection to `dispatch`; backs off
/// on accept errors (EMFILE and friends) instead of spinning. At stop, what already sits in
/// the accept queue is still dispatched: closing the listener would reset it.
pub(crate) async fn accept_until(
    listener: &TcpListener,
    mut stop: watch::Receiver<bool>,
    mut dispatch: impl FnMut(TcpStream, SocketAddr),
) {
    // One wait for the stop across all accepts: a wait made per accept joins and leaves the
    // channel's waiter list (a lock each) for every connection.
    let stopped = stop.changed();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => {
                use std::os::fd::AsFd as _;
                while let Some(fd) = listen::waiting(listener.as_fd()) {
                    let stream = std::net::TcpStream::from(fd);
                    let (Ok(peer), Ok(stream)) = (stream.peer_addr(), TcpStream::from_std(stream))
                    else {
                        continue;
                    };
                    dispatch(stream, peer);
                }
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => dispatch(stream, peer),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// The HTTP/1 settings of every listener: a bound on reading a request head (slow clients
/// cannot hold connections) and on its size.
pub fn http1() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
}

/// The kernel's word on who opened this connection, read (and taken from the kernel's map)
/// before any byte of the request. Without a record, only the node's own addresses are
/// callers the kernel could not have seen (node daemons outside the pods cgroup); anything
/// else came around the hook.
fn caller_of(state: &State, stream: &TcpStream, peer: SocketAddr) -> Caller {
    let Some(steering) = &state.steering else {
        return Caller::Plain(peer.ip());
    };
    let recorded = stream
        .local_addr()
        .ok()
        .and_then(|local| steering.take(peer, local));
    match recorded {
        Some(pod) => Caller::Pod(pod),
        None if state.node_addrs.contains(peer.ip()) => Caller::Node(peer.ip()),
        None => Caller::Bypassed(peer.ip()),
    }
}

/// What the requests of one credential connection share.
struct Conn {
    state: Arc<State>,
    caller: Caller,
    memo: memo::ConnMemo,
    progress: drain::Progress,
}

async fn serve_connection(
    state: Arc<State>,
    stream: TcpStream,
    peer: SocketAddr,
    caller: Caller,
    _place: ConnGuard,
    stop: drain::StopSignal,
) {
    let _ = stream.set_nodelay(true);
    // One Arc per connection carries what its requests share: a request clones only it (the
    // node-wide `State` Arc, cloned per request, was a refcount every worker wrote).
    let shared = Arc::new(Conn {
        state: state.clone(),
        caller,
        memo: memo::ConnMemo::default(),
        progress: drain::Progress::default(),
    });
    let service = service_fn({
        let shared = shared.clone();
        move |req| {
            let c = &shared;
            c.progress.begun();
            // Checked (and the request dropped) before hyper reads on: see `handler::begin`.
            match handler::begin(&c.state, &c.caller, &c.memo, req) {
                handler::Answer::Ready(resp, at) => {
                    c.progress.answered(at);
                    Either::Left(future::ready(Ok::<_, Infallible>(resp)))
                }
                handler::Answer::Later(later) => {
                    let c = c.clone();
                    Either::Right(Box::pin(async move {
                        let (resp, at) = later.answer(&c.state, &c.caller).await;
                        c.progress.answered(at);
                        Ok(resp)
                    }))
                }
            }
        }
    });
    let conn = http1()
        .max_header_size(MAX_HEAD_BYTES)
        // Bounded by the connection's own timer instead (`drain::Progress`): hyper's is armed
        // for every request.
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service);
    let ended = drain::serve_until_stopped(conn, &shared.progress, HEADER_READ_TIMEOUT, stop).await;
    if let Err(e) = ended {
        let kind = match &e {
            drain::Ended::HeadTimeout(_) => "timeout",
            drain::Ended::Http(e) => hyper_error_kind(e),
        };
        state
            .metrics
            .connection_errors
            .get_or_create(&crate::metrics::KindLabel { kind })
            .inc();
        tracing::debug!(%peer, kind, error = %e, "connection ended with an error");
    }
}

/// The metric label of hyper's error on a credential connection (its only timeout, the
/// header read timer, is off there: `drain::Ended::HeadTimeout` is the "timeout").
fn hyper_error_kind(e: &hyper::Error) -> &'static str {
    if e.is_parse() || e.is_parse_too_large() || e.is_parse_status() {
        "parse"
    } else if e.is_incomplete_message() {
        "incomplete"
    } else {
        "io"
    }
}

//! EKS Pod Identity node agent: serves pods their IAM credentials, knowing from the kernel
//! which pod is calling.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod admission;
pub mod attribution;
pub mod bucket;
pub mod cache;
pub mod cgroup;
pub mod config;
pub mod credentials;
pub mod ebpf;
pub mod handover;
pub mod histogram;
pub mod logging;
pub mod metrics;
pub mod netsetup;
pub mod prewarm;
#[cfg(test)]
mod proptests;
pub mod server;
pub mod striped;
pub mod token;
pub mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context as _;

use crate::attribution::Resolver;
use crate::config::{ServerArgs, ServerConfig};
use crate::ebpf::{SteerTarget, Steering};
use crate::server::State;
use crate::upstream::{EksAuth, EksAuthOptions};

/// An error and its causes on one line, each cause once (typed errors often print their
/// source themselves, and anyhow's `{:#}` would print it again).
pub fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// How `server` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// SIGTERM or SIGINT: drained and done.
    Signal,
    /// The listeners and the cache went to the agent replacing this one, which serves now.
    HandedOver,
}

/// Runs `server` until SIGTERM or SIGINT, or until an agent replacing it has taken over.
pub async fn run_server(config: ServerConfig) -> anyhow::Result<Stopped> {
    let args = &config.flags;
    // First of all: during a surge the kubelet's readiness probe of this pod may be answered
    // by the agent serving (both use the probe port), and the old pod is then deleted; once
    // this agent has asked, a SIGTERM to the old one no longer loses the sockets (it finishes
    // the exchange it is in). The old agent goes on accepting until this one confirms.
    let handover = (!args.no_handover).then(|| args.handover_socket.clone());
    let knocked = std::time::Instant::now();
    let (inherited, taken) = take_over(handover.clone()).await;
    let eks = EksAuth::from_env(EksAuthOptions {
        cluster_name: args.cluster_name.clone(),
        endpoint: args.endpoint.clone(),
        operation_timeout: args.upstream_timeout,
        rotate_credentials: args
            .rotate_credentials
            .then_some(args.rotate_credentials_interval),
    })
    .await?;

    let steering = if args.no_ebpf {
        tracing::warn!("eBPF disabled by --no-ebpf: serving the plain listeners without kernel attribution (fallback mode)");
        None
    } else {
        match attach(args, config.pod_limits) {
            Ok(s) => Some(s),
            Err(e) => {
                // Serving without attribution beats leaving every pod of the node without credentials.
                tracing::error!(error = report(&e), "eBPF unavailable: serving the plain listeners without kernel attribution (fallback mode)");
                None
            }
        }
    };
    if args.attributed_port.is_some() {
        tracing::warn!("--attributed-port is ignored: pods' connects are not rewritten; one listener per credential address serves them");
    }
    if steering.is_none() {
        // Programs an earlier run pinned would go on charging pods' connects against limits
        // nobody sweeps now, or (before 0.2) steer them to a port nobody listens on.
        match ebpf::uninstall(&args.bpffs_dir) {
            Ok(0) => {}
            Ok(removed) => {
                tracing::warn!(pins = %args.bpffs_dir.display(), removed, "removed the eBPF programs an earlier run pinned")
            }
            Err(e) => {
                tracing::error!(pins = %args.bpffs_dir.display(), error = %e, "cannot remove the eBPF programs an earlier run pinned; pods may be steered to a closed port")
            }
        }
    }
    let resolver = steering
        .as_ref()
        .map(|s| Arc::new(Resolver::new(s.cgroup())));
    let backlog = server::listen::backlog(args.listen_backlog);
    let fds = server::limits::raise_fd_limit();
    let (mut sockets, entries, confirm) = match inherited {
        Some(mut i) => (
            server::listen::Inherited::new(std::mem::take(&mut i.listeners)),
            std::mem::take(&mut i.entries),
            Some(i),
        ),
        None => Default::default(),
    };
    let listeners = server::bind_all(&args.bind_hosts, args.port, backlog, &mut sockets)?;
    let (probe_addr, metrics_addr) = (config.probe_addr, config.metrics_addr);
    let probe = bind_admin(probe_addr, backlog, "probes", &mut sockets)?;
    let metrics_listener = bind_admin(metrics_addr, backlog, "metrics", &mut sockets)?;
    if !sockets.unused().is_empty() {
        tracing::info!(addrs = ?sockets.unused(), "closing listeners the replaced agent had and this one's flags do not name");
    }
    drop(sockets);
    // Copies of every listener, for the agent that will replace this one.
    let offered: Arc<[(SocketAddr, std::os::fd::OwnedFd)]> = listeners
        .iter()
        .map(|b| &b.listener)
        .chain([&probe, &metrics_listener])
        .filter_map(|l| {
            use std::os::fd::AsFd as _;
            Some((l.local_addr().ok()?, l.as_fd().try_clone_to_owned().ok()?))
        })
        .collect();

    let metrics = Arc::new(metrics::Metrics::default());
    let cache = cache::Cache::new(Arc::new(eks), config.cache.clone(), metrics.clone());
    let adopted = cache.import(entries);
    metrics
        .handovers
        .get_or_create(&metrics::HandoverLabels {
            direction: "taken",
            outcome: taken,
        })
        .inc();
    metrics.handover_entries.inc_by(adopted as u64);
    if let Some(from) = &confirm {
        tracing::info!(
            from_pid = from.from_pid,
            adopted,
            "took over the listeners and the cache of the agent serving this node"
        );
    }
    let state = Arc::new(State {
        cache,
        steering,
        resolver,
        node_addrs: Default::default(),
        unattributed: args.unattributed,
        admission: match config.pod_budget {
            Some((rate, burst)) => admission::Admission::new(rate, burst),
            None => admission::Admission::unlimited(),
        },
        ready: AtomicBool::new(false),
        metrics,
    });
    if state.steering.is_some() {
        tokio::spawn(sweep_budgets(
            Arc::downgrade(&state),
            args.cache_sweep_interval,
        ));
    }
    if let Some(kubelet_root) = &args.prewarm {
        let pods_root = match (&state.steering, &args.cgroup_root) {
            (Some(s), _) => Some(s.cgroup().to_path_buf()),
            (None, Some(root)) => Some(root.clone()),
            (None, None) => cgroup::default_pods_root()
                .map_err(|e| tracing::error!(error = %e, "pre-warm off: no pods cgroup"))
                .ok(),
        };
        if let Some(pods_root) = pods_root {
            prewarm::Prewarmer::new(
                state.cache.clone(),
                pods_root,
                kubelet_root.clone(),
                state.resolver.clone(),
            )
            .spawn();
        }
    }
    let addrs: Vec<String> = listeners
        .iter()
        .filter_map(|b| Some(b.listener.local_addr().ok()?.to_string()))
        .collect();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        mode = state.mode(),
        cgroup_root = state.steering.as_ref().map(|s| s.cgroup().display().to_string()),
        listeners = addrs.join(" "),
        backlog,
        fds,
        probes = %probe_addr,
        metrics = %metrics_addr,
        cluster = %args.cluster_name,
        "eks-pod-identity-agent started"
    );
    let until = stop_or_hand_over(handover, confirm.map(|c| (c, knocked)), offered, &state);
    let stopped = server::serve(
        state.clone(),
        fds,
        listeners,
        probe,
        metrics_listener,
        until,
    )
    .await;
    let pinned = state.steering.is_some() && !args.no_pin;
    // Dropping the last reference detaches unpinned programs.
    drop(state);
    if stopped == Stopped::HandedOver {
        tracing::info!("handed over: idle until stopped");
    } else if pinned {
        tracing::info!(pins = %args.bpffs_dir.display(), "stopped; eBPF programs stay attached through their pins for the next start (`uninstall` removes them)");
    } else {
        tracing::info!("stopped; eBPF programs detached");
    }
    Ok(stopped)
}

/// Takes over from the agent serving this node, if one is (`path`: its handover socket).
/// Whatever goes wrong, this agent starts cold; the outcome's metric label comes with it.
async fn take_over(
    path: Option<std::path::PathBuf>,
) -> (Option<handover::Inherited>, &'static str) {
    let Some(path) = path else {
        return (None, "off");
    };
    let shown = path.display().to_string();
    tracing::debug!(
        socket = shown,
        "asking the agent serving this node to hand over"
    );
    match tokio::task::spawn_blocking(move || handover::take(&path)).await {
        Ok(Ok(Some(inherited))) => match &inherited.cache_lost {
            None => (Some(inherited), "ok"),
            Some(e) => {
                tracing::warn!(socket = shown, error = %e, "took the listeners but not the cache of the agent serving this node; starting with an empty cache");
                (Some(inherited), "listeners_only")
            }
        },
        Ok(Ok(None)) => (None, "none"),
        Ok(Err(e)) => {
            tracing::warn!(socket = shown, error = %e, "could not take over from the agent serving this node; starting cold beside it");
            (None, e.label())
        }
        Err(e) => {
            tracing::warn!(error = %e, "handover task failed; starting cold");
            (None, "failed")
        }
    }
}

/// Resolves at SIGTERM or SIGINT, or once an agent replacing this one has taken its
/// listeners. Before that, tells the agent this one replaced (if any) that it accepts now,
/// then offers the same to the next.
async fn stop_or_hand_over(
    socket: Option<std::path::PathBuf>,
    confirm: Option<(handover::Inherited, std::time::Instant)>,
    offered: Arc<[(SocketAddr, std::os::fd::OwnedFd)]>,
    state: &Arc<State>,
) -> Stopped {
    if let Some((inherited, knocked)) = confirm {
        // The accept loops run: the old agent may stop accepting.
        match tokio::task::spawn_blocking(move || inherited.confirm()).await {
            Ok(Ok(())) => {
                tracing::info!(
                    after_ms = knocked.elapsed().as_millis() as u64,
                    "told the replaced agent this one accepts now"
                )
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the replaced agent did not hear it was taken over; it goes on accepting until it is stopped")
            }
            Err(e) => tracing::warn!(error = %e, "handover confirmation task failed"),
        }
    }
    let giver = socket.and_then(|path| {
        handover::Giver::bind(&path)
            .map_err(|e| tracing::error!(socket = %path.display(), error = %e, "no handover socket: the next upgrade starts cold"))
            .ok()
    });
    let Some(giver) = giver else {
        shutdown_signal().await;
        return Stopped::Signal;
    };
    let offering = handover::Offering {
        sockets: offered,
        cache: state.cache.clone(),
        metrics: state.metrics.clone(),
    };
    tokio::select! {
        _ = shutdown_signal() => {
            // An agent already knocking is given the sockets first: during a surge, its pod
            // may be why this one is stopped.
            if giver.serve_waiting(&offering).await {
                Stopped::HandedOver
            } else {
                Stopped::Signal
            }
        }
        _ = giver.serve(&offering) => Stopped::HandedOver,
    }
}

/// SIGTERM and SIGINT, recorded from the moment this is made until [`StopSignals::wait`]:
/// one that comes while an agent that handed over shuts its runtime down is not lost.
pub struct StopSignals(signal_hook::iterator::Signals);

impl StopSignals {
    /// Starts recording SIGTERM and SIGINT (alongside the runtime's own handlers).
    pub fn record() -> std::io::Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map(Self)
    }

    /// After a handover: waits for SIGTERM or SIGINT (or returns at once if one came
    /// already), holding nothing (no socket, no credentials). Exiting by itself would get
    /// the container restarted, and the restarted agent would take everything back.
    pub fn wait(mut self) {
        if let Some(signal) = self.0.forever().next() {
            tracing::info!(signal, "stop signal received after the handover");
        }
    }
}

/// Every `interval`, removes the kernel connect budgets of pods that are gone.
async fn sweep_budgets(state: std::sync::Weak<State>, interval: std::time::Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        let Some(steering) = &state.steering else {
            return;
        };
        match steering.sweep_budgets() {
            Ok(0) => {}
            Ok(removed) => tracing::debug!(removed, "connect budgets of gone pods removed"),
            Err(e) => tracing::warn!(error = %e, "sweeping connect budgets failed"),
        }
    }
}

fn bind_admin(
    addr: SocketAddr,
    backlog: u32,
    what: &str,
    inherited: &mut server::listen::Inherited,
) -> anyhow::Result<tokio::net::TcpListener> {
    inherited
        .open(addr, backlog)
        .with_context(|| format!("cannot listen on {addr} for {what}"))
}

/// Runs `uninstall`: detaches the programs and removes every pin.
pub fn run_uninstall(args: crate::config::UninstallArgs) -> anyhow::Result<()> {
    let removed = ebpf::uninstall(&args.bpffs_dir)
        .with_context(|| format!("removing pins under {}", args.bpffs_dir.display()))?;
    tracing::info!(dir = %args.bpffs_dir.display(), removed, "eBPF programs detached and pins removed");
    Ok(())
}

/// Runs `initialize`: sets up (or with `--remove`, deletes) the credential link.
pub async fn run_initialize(args: crate::config::InitializeArgs) -> anyhow::Result<()> {
    if args.remove {
        let existed = netsetup::remove().await?;
        tracing::info!(
            link = netsetup::LINK_NAME,
            existed,
            "credential link removed"
        );
        return Ok(());
    }
    let outcome = netsetup::initialize().await?;
    tracing::info!(
        link = netsetup::LINK_NAME,
        kind = %outcome.kind,
        addresses = ?outcome.addresses,
        skipped = outcome.skipped.len(),
        "credential link ready"
    );
    Ok(())
}

/// Loads and attaches the programs to the pods cgroup, and checks they are in effect.
fn attach(args: &ServerArgs, limits: crate::ebpf::PodLimits) -> anyhow::Result<Steering> {
    let root = match &args.cgroup_root {
        Some(p) => p.clone(),
        None => cgroup::default_pods_root()?,
    };
    let v4 = args.bind_hosts.iter().find_map(|h| match h {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    });
    let v6 = args.bind_hosts.iter().find_map(|h| match h {
        IpAddr::V6(a) => Some(*a),
        IpAddr::V4(_) => None,
    });
    let steering = Steering::attach(
        &root,
        SteerTarget {
            addr4: v4,
            addr6: v6,
            port: args.port,
        },
        limits,
        (!args.no_pin).then_some(args.bpffs_dir.as_path()),
    )
    .with_context(|| format!("attaching eBPF programs to {}", root.display()))?;
    let missing = steering.verify_effective(&root)?;
    anyhow::ensure!(
        missing.is_empty(),
        "programs attached to {} are not in its effective set: {missing:?}",
        root.display()
    );
    Ok(steering)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn report_names_each_cause_once() {
        let bind = crate::server::ServeError::Bind {
            addr: "10.9.9.9:80".parse().unwrap(),
            source: std::io::Error::from_raw_os_error(libc::EADDRNOTAVAIL),
        };
        let e = anyhow::Error::new(bind).context("starting listeners");
        let text = super::report(&e);
        assert!(
            text.starts_with("starting listeners: cannot listen on 10.9.9.9:80: "),
            "{text}"
        );
        assert_eq!(
            text.matches("Cannot assign requested address").count(),
            1,
            "{text}"
        );
    }
}

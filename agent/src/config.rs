//! Command line and environment, parsed once into [`ServerArgs`] and checked once into a
//! [`ServerConfig`] (contradicting flags exit 2 with a message naming both).
//!
//! Flag names, short names and defaults follow the reference agent
//! (`aws/eks-pod-identity-agent`); ours are added beside them. Every flag can also be set
//! through the environment variable named in its help.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The IPv4 credential address pods are given (defined once; everything else derives from it).
pub const CREDENTIAL_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 170, 23);
/// The IPv6 credential address pods are given.
pub const CREDENTIAL_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x23);

/// Where `server` pins its maps and links.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/eks-pod-identity-agent";

/// eks-pod-identity-agent: serves EKS Pod Identity credentials to the pods of this node.
#[derive(Debug, Parser)]
#[command(name = "eks-pod-identity-agent", version, about)]
pub struct Cli {
    /// Logging verbosity: panic, fatal, error, warn, info, debug or trace.
    #[arg(short = 'v', long = "verbosity", global = true, default_value = "info",
          env = "POD_IDENTITY_VERBOSITY", value_parser = parse_verbosity, overrides_with = "verbosity")]
    pub verbosity: tracing::Level,

    /// Log format: json lines (as the reference agent) or human-readable text.
    #[arg(
        long,
        global = true,
        default_value = "json",
        env = "POD_IDENTITY_LOG_FORMAT"
    )]
    pub log_format: LogFormat,

    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve credentials to pods (the DaemonSet's main container).
    Server(Box<ServerArgs>),
    /// Create the link holding the credential addresses (the DaemonSet's init container).
    Initialize(InitializeArgs),
    /// Detach the eBPF programs and remove their pins (before removing the agent from a node).
    Uninstall(UninstallArgs),
    /// Print the version.
    Version,
}

/// Flags of `initialize`.
#[derive(Debug, Args)]
pub struct InitializeArgs {
    /// Remove the link (and with it the addresses and routes) instead of creating it.
    #[arg(long)]
    pub remove: bool,
}

/// Flags of `uninstall`.
#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// The bpffs directory `server` pinned into.
    #[arg(long, default_value = DEFAULT_BPFFS_DIR, env = "POD_IDENTITY_BPFFS_DIR")]
    pub bpffs_dir: PathBuf,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

/// Flags of `server`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Name of the EKS cluster the agent runs in.
    #[arg(short = 'c', long, env = "POD_IDENTITY_CLUSTER_NAME")]
    pub cluster_name: String,

    /// Port of the plain credential listeners (what pods dial).
    #[arg(short = 'p', long, default_value_t = 80, env = "POD_IDENTITY_PORT")]
    pub port: u16,

    /// Hosts to listen on; IPv6 in brackets. Repeatable.
    #[arg(short = 'b', long = "bind-hosts", env = "POD_IDENTITY_BIND_HOSTS", value_delimiter = ',',
          default_values_t = [IpAddr::V4(CREDENTIAL_V4), IpAddr::V6(CREDENTIAL_V6)],
          value_parser = parse_bind_host)]
    pub bind_hosts: Vec<IpAddr>,

    /// Ignored: kept so DaemonSets that set it still start (pods' connects are no longer
    /// rewritten; one listener per address serves them all).
    #[arg(long, env = "POD_IDENTITY_ATTRIBUTED_PORT")]
    pub attributed_port: Option<u16>,

    /// Accept queue length of every listener (default: the node's net.core.somaxconn).
    #[arg(long, env = "POD_IDENTITY_LISTEN_BACKLOG", value_parser = clap::value_parser!(u32).range(1..))]
    pub listen_backlog: Option<u32>,

    /// Port of /healthz and /readyz on localhost.
    #[arg(long, default_value_t = 2703, env = "POD_IDENTITY_PROBE_PORT")]
    pub probe_port: u16,

    /// Address of the Prometheus /metrics listener.
    #[arg(long, default_value = "0.0.0.0", env = "POD_IDENTITY_METRICS_ADDRESS",
          value_parser = parse_bind_host)]
    pub metrics_address: IpAddr,

    /// Port of the Prometheus /metrics listener.
    #[arg(long, default_value_t = 2705, env = "POD_IDENTITY_METRICS_PORT")]
    pub metrics_port: u16,

    /// Longest time credentials are served before they are renewed (Go duration, e.g. 3h).
    #[arg(long, default_value = "3h", env = "POD_IDENTITY_MAX_CREDENTIAL_RETENTION_BEFORE_RENEWAL",
          value_parser = parse_duration)]
    pub max_credential_retention_before_renewal: Duration,

    /// Most identities whose credentials are cached.
    #[arg(long, default_value_t = 2000, env = "POD_IDENTITY_MAX_CACHE_SIZE")]
    pub max_cache_size: usize,

    /// Most EKS Auth calls per second spent on background refreshes.
    #[arg(long, default_value_t = 3, env = "POD_IDENTITY_MAX_SERVICE_QPS")]
    pub max_service_qps: u32,

    /// Renew cached credentials when less than this is left before they expire.
    #[arg(long, default_value = "30m", env = "POD_IDENTITY_REFRESH_BEFORE_EXPIRY", value_parser = parse_duration)]
    pub refresh_before_expiry: Duration,

    /// Never serve credentials with less than this left (stale credentials are served until then).
    #[arg(long, default_value = "5m", env = "POD_IDENTITY_MIN_CREDENTIAL_LIFETIME", value_parser = parse_duration)]
    pub min_credential_lifetime: Duration,

    /// How long a permanent EKS Auth error (no association, access denied, bad token) is remembered.
    #[arg(long, default_value = "10s", env = "POD_IDENTITY_NEGATIVE_CACHE_TTL", value_parser = parse_duration)]
    pub negative_cache_ttl: Duration,

    /// Longest a request waits for EKS Auth before a 503 "retry" (the call goes on and fills the cache).
    #[arg(long, default_value = "900ms", env = "POD_IDENTITY_RESPONSE_DEADLINE", value_parser = parse_duration)]
    pub response_deadline: Duration,

    /// Most EKS Auth calls in flight at once (refreshes may use half).
    #[arg(long, default_value_t = 32, env = "POD_IDENTITY_MAX_UPSTREAM_INFLIGHT")]
    pub max_upstream_inflight: usize,

    /// How often entries of deleted pods and expired tokens are swept.
    #[arg(long, default_value = "10s", env = "POD_IDENTITY_CACHE_SWEEP_INTERVAL", value_parser = parse_duration)]
    pub cache_sweep_interval: Duration,

    /// First retry delay after a failed background refresh (doubles up to 5m).
    #[arg(long, default_value = "1s", env = "POD_IDENTITY_REFRESH_RETRY_BACKOFF", value_parser = parse_duration)]
    pub refresh_retry_backoff: Duration,

    /// Requests per second each pod (or unattributed peer) may make; 0 for no limit.
    #[arg(long, default_value_t = 200.0, env = "POD_IDENTITY_POD_REQUEST_RATE")]
    pub pod_request_rate: f64,

    /// Burst each pod may make above its rate.
    #[arg(long, default_value_t = 400.0, env = "POD_IDENTITY_POD_REQUEST_BURST")]
    pub pod_request_burst: f64,

    /// New connections per second each pod may open to the credential addresses, enforced in
    /// the kernel (over it, the connect fails with ECONNREFUSED); 0 for no limit.
    #[arg(long, default_value_t = 100.0, env = "POD_IDENTITY_POD_CONNECT_RATE")]
    pub pod_connect_rate: f64,

    /// Connections each pod may open at once after being idle.
    #[arg(long, default_value_t = 200.0, env = "POD_IDENTITY_POD_CONNECT_BURST")]
    pub pod_connect_burst: f64,

    /// EKS Auth calls per second each pod's requests may start (refreshes have
    /// --max-service-qps); beyond, the pod gets EKS Auth's last error or a 503; 0 for no limit.
    #[arg(long, default_value_t = 0.2, env = "POD_IDENTITY_POD_UPSTREAM_RATE")]
    pub pod_upstream_rate: f64,

    /// EKS Auth calls each pod's requests may start at once.
    #[arg(long, default_value_t = 5.0, env = "POD_IDENTITY_POD_UPSTREAM_BURST")]
    pub pod_upstream_burst: f64,

    /// Most connections one pod may hold open to the credential addresses, enforced in the
    /// kernel (beyond, its connect fails with ECONNREFUSED); 0 for no cap.
    #[arg(long, default_value_t = 1024, env = "POD_IDENTITY_POD_MAX_CONNECTIONS")]
    pub pod_max_connections: u64,

    /// How long a request's EKS Auth call keeps retrying throttling and 5xx in the background
    /// (callers get a 503 "retry" at the response deadline and join it); 0 disables.
    #[arg(long, default_value = "10s", env = "POD_IDENTITY_UPSTREAM_RETRY_WINDOW", value_parser = parse_duration)]
    pub upstream_retry_window: Duration,

    /// Sign EKS Auth calls with the shared credentials file's default profile, re-read every
    /// minute (hybrid nodes without IMDS).
    #[arg(long, env = "POD_IDENTITY_ROTATE_CREDENTIALS", num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set, default_value_t = false)]
    pub rotate_credentials: bool,

    /// How often `--rotate-credentials` re-reads the shared credentials file.
    #[arg(long, default_value = "1m", env = "POD_IDENTITY_ROTATE_CREDENTIALS_INTERVAL",
          value_parser = parse_duration, hide = true)]
    pub rotate_credentials_interval: Duration,

    /// Override of the EKS Auth endpoint (otherwise AWS_ENDPOINT_URL_EKS_AUTH or the regional one).
    #[arg(long, env = "POD_IDENTITY_ENDPOINT")]
    pub endpoint: Option<String>,

    /// cgroup v2 directory the eBPF programs attach to (default: the kubelet's pods cgroup).
    #[arg(long, env = "POD_IDENTITY_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// Callers on the plain listener (not steered by the eBPF hook): allow (reference
    /// behaviour) or deny.
    #[arg(
        long,
        value_enum,
        default_value = "allow",
        env = "POD_IDENTITY_UNATTRIBUTED"
    )]
    pub unattributed: crate::attribution::UnattributedPolicy,

    /// bpffs directory for the pinned maps and links (mounted if needed); they survive
    /// restarts, so an upgrade swaps programs with no unsteered window.
    #[arg(long, default_value = DEFAULT_BPFFS_DIR, env = "POD_IDENTITY_BPFFS_DIR")]
    pub bpffs_dir: PathBuf,

    /// Pre-warm: fetch each pod's credentials before it asks, from the token the kubelet
    /// wrote under this directory (its root, e.g. /var/lib/kubelet); off when unset.
    #[arg(long, value_name = "KUBELET_ROOT", env = "POD_IDENTITY_PREWARM")]
    pub prewarm: Option<PathBuf>,

    /// Do not pin: the programs detach when the agent exits.
    #[arg(long, env = "POD_IDENTITY_NO_PIN", num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, default_value_t = false)]
    pub no_pin: bool,

    /// Unix socket through which this agent hands its listeners and cache to the agent that
    /// replaces it, and takes them from the one it replaces (its directory: root only).
    #[arg(long, default_value = crate::handover::DEFAULT_SOCKET, env = "POD_IDENTITY_HANDOVER_SOCKET")]
    pub handover_socket: PathBuf,

    /// Neither take over from an agent already serving nor hand over to the next one.
    #[arg(long, env = "POD_IDENTITY_NO_HANDOVER", num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, default_value_t = false)]
    pub no_handover: bool,

    /// Do not load eBPF: serve the plain listeners only, without kernel attribution.
    #[arg(long, env = "POD_IDENTITY_NO_EBPF", num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, default_value_t = false)]
    pub no_ebpf: bool,

    /// Upper bound of one EKS Auth call, all retries included (e.g. 5s, 800ms).
    #[arg(long, default_value = "5s", env = "POD_IDENTITY_UPSTREAM_TIMEOUT", value_parser = parse_duration)]
    pub upstream_timeout: Duration,
}

/// Flags that contradict each other or make no sense.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// Renewal would come after the point from which credentials are no longer served.
    #[error("--refresh-before-expiry ({refresh:?}) is shorter than --min-credential-lifetime ({floor:?}): credentials are never served inside the latter, so they must be renewed before it")]
    RefreshAfterFloor {
        /// `--refresh-before-expiry`.
        refresh: Duration,
        /// `--min-credential-lifetime`.
        floor: Duration,
    },
    /// A per-pod budget that is negative, NaN or infinite.
    #[error("{flag} must be a finite number >= 0, not {value}")]
    NotARate {
        /// The flag.
        flag: &'static str,
        /// Its value.
        value: f64,
    },
    /// A rate without room for one request or connect.
    #[error("{burst_flag} ({burst}) must be at least 1 when {rate_flag} ({rate}) limits")]
    BurstBelowOne {
        /// The rate flag.
        rate_flag: &'static str,
        /// Its value.
        rate: f64,
        /// The burst flag.
        burst_flag: &'static str,
        /// Its value.
        burst: f64,
    },
    /// Two listeners on one port.
    #[error("{a} and {b} are both {port}: each listener needs its own port")]
    SamePort {
        /// One flag.
        a: &'static str,
        /// The other.
        b: &'static str,
        /// The port.
        port: u16,
    },
    /// No upstream call could ever run.
    #[error("--max-upstream-inflight must be at least 1")]
    NoInflight,
}

/// `server`'s configuration: the flags, checked once for contradictions. The agent reads its
/// flags only through it.
#[derive(Debug)]
pub struct ServerConfig {
    /// The flags, every one checked.
    pub flags: ServerArgs,
    /// The cache tuning they describe.
    pub cache: crate::cache::CacheConfig,
    /// Requests per second and burst each pod may make; `None`: no limit.
    pub pod_budget: Option<(f64, f64)>,
    /// What each pod may connect, enforced in the kernel: rate and burst, open connections.
    pub pod_limits: crate::ebpf::PodLimits,
    /// Where `/healthz` and `/readyz` listen (localhost).
    pub probe_addr: SocketAddr,
    /// Where `/metrics` listens.
    pub metrics_addr: SocketAddr,
}

/// A checked (rate, burst) pair; `None` when the rate is 0 (no limit).
fn rate_and_burst(
    (rate_flag, rate): (&'static str, f64),
    (burst_flag, burst): (&'static str, f64),
) -> Result<Option<(f64, f64)>, ConfigError> {
    for (flag, value) in [(rate_flag, rate), (burst_flag, burst)] {
        if !value.is_finite() || value < 0.0 {
            return Err(ConfigError::NotARate { flag, value });
        }
    }
    if rate > 0.0 && burst < 1.0 {
        return Err(ConfigError::BurstBelowOne {
            rate_flag,
            rate,
            burst_flag,
            burst,
        });
    }
    Ok((rate > 0.0).then_some((rate, burst)))
}

impl TryFrom<ServerArgs> for ServerConfig {
    type Error = ConfigError;

    fn try_from(flags: ServerArgs) -> Result<Self, ConfigError> {
        if flags.refresh_before_expiry < flags.min_credential_lifetime {
            return Err(ConfigError::RefreshAfterFloor {
                refresh: flags.refresh_before_expiry,
                floor: flags.min_credential_lifetime,
            });
        }
        let pod_budget = rate_and_burst(
            ("--pod-request-rate", flags.pod_request_rate),
            ("--pod-request-burst", flags.pod_request_burst),
        )?;
        let connect_budget = rate_and_burst(
            ("--pod-connect-rate", flags.pod_connect_rate),
            ("--pod-connect-burst", flags.pod_connect_burst),
        )?
        .map(|(rate, burst)| crate::ebpf::ConnectBudget { rate, burst });
        let mut cache = flags.cache_config();
        cache.entry_call_rate = rate_and_burst(
            ("--pod-upstream-rate", flags.pod_upstream_rate),
            ("--pod-upstream-burst", flags.pod_upstream_burst),
        )?;
        let pod_limits = crate::ebpf::PodLimits {
            budget: connect_budget,
            max_connections: flags.pod_max_connections,
        };
        let ports = [
            ("--port", flags.port),
            ("--probe-port", flags.probe_port),
            ("--metrics-port", flags.metrics_port),
        ];
        for (i, (a, pa)) in ports.iter().enumerate() {
            if let Some((b, _)) = ports[i + 1..].iter().find(|(_, pb)| pb == pa) {
                return Err(ConfigError::SamePort { a, b, port: *pa });
            }
        }
        if flags.max_upstream_inflight == 0 {
            return Err(ConfigError::NoInflight);
        }
        Ok(Self {
            cache,
            pod_budget,
            pod_limits,
            probe_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), flags.probe_port),
            metrics_addr: SocketAddr::new(flags.metrics_address, flags.metrics_port),
            flags,
        })
    }
}

impl ServerArgs {
    /// The cache tuning these flags describe.
    fn cache_config(&self) -> crate::cache::CacheConfig {
        crate::cache::CacheConfig {
            max_entries: self.max_cache_size,
            max_retention: self.max_credential_retention_before_renewal,
            refresh_before_expiry: self.refresh_before_expiry,
            min_remaining: self.min_credential_lifetime,
            negative_ttl: self.negative_cache_ttl,
            response_deadline: self.response_deadline,
            refresh_qps: f64::from(self.max_service_qps),
            max_inflight: self.max_upstream_inflight,
            sweep_interval: self.cache_sweep_interval,
            retry_backoff: self.refresh_retry_backoff,
            request_retry_window: self.upstream_retry_window,
            entry_call_rate: None,
        }
    }
}

fn parse_verbosity(s: &str) -> Result<tracing::Level, String> {
    // The reference (logrus) also has panic and fatal; both mean "errors only" here.
    match s.to_ascii_lowercase().as_str() {
        "panic" | "fatal" | "error" => Ok(tracing::Level::ERROR),
        "warn" | "warning" => Ok(tracing::Level::WARN),
        "info" => Ok(tracing::Level::INFO),
        "debug" => Ok(tracing::Level::DEBUG),
        "trace" => Ok(tracing::Level::TRACE),
        _ => Err(format!(
            "unknown level {s:?}: use panic, fatal, error, warn, info, debug or trace"
        )),
    }
}

/// Parses `169.254.170.23`, `[fd00:ec2::23]` or a bare IPv6 address.
pub fn parse_bind_host(s: &str) -> Result<IpAddr, String> {
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse()
        .map_err(|_| format!("{s:?} is not an IP address (IPv6 may be written in brackets)"))
}

/// Parses a Go-style duration: `3h`, `90s`, `1h30m`, `250ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration like 3h, 15m, 90s or 250ms");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err(err());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(err)?;
        let value: f64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(err()),
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(value * unit).map_err(|_| err())?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("3h").unwrap(), Duration::from_secs(3 * 3600));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "3", "h", "3x", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn bind_hosts_accept_brackets() {
        assert_eq!(
            parse_bind_host("[fd00:ec2::23]").unwrap(),
            "fd00:ec2::23".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            parse_bind_host("169.254.170.23").unwrap(),
            "169.254.170.23".parse::<IpAddr>().unwrap()
        );
        assert!(parse_bind_host("[169.254.170.23").is_err());
        assert!(parse_bind_host("localhost").is_err());
    }

    #[test]
    fn reference_daemonset_arguments_parse() {
        let cli = Cli::try_parse_from([
            "eks-pod-identity-agent",
            "server",
            "--port",
            "80",
            "--cluster-name",
            "X",
            "--probe-port",
            "2703",
            "--metrics-port",
            "2705",
            "-v",
            "trace",
        ])
        .unwrap();
        assert_eq!(cli.verbosity, tracing::Level::TRACE);
        let Command::Server(args) = cli.command else {
            panic!("not server")
        };
        assert_eq!(args.cluster_name, "X");
        assert_eq!(args.bind_hosts.len(), 2);
        assert_eq!(args.attributed_port, None);
        assert_eq!(args.metrics_port, 2705);
        assert_eq!(
            args.max_credential_retention_before_renewal,
            Duration::from_secs(3 * 3600)
        );
        assert!(!args.rotate_credentials);
    }

    #[test]
    fn bool_flags_take_an_optional_value_like_cobra() {
        for (argv, want) in [
            (&["--rotate-credentials"][..], true),
            (&["--rotate-credentials=true"][..], true),
            (&["--rotate-credentials=false"][..], false),
            (&[][..], false),
        ] {
            let cli = Cli::try_parse_from(
                ["a", "server", "-c", "x"]
                    .iter()
                    .chain(argv.iter())
                    .copied(),
            )
            .unwrap();
            let Command::Server(args) = cli.command else {
                panic!()
            };
            assert_eq!(args.rotate_credentials, want, "{argv:?}");
        }
    }

    fn server(argv: &[&str]) -> ServerArgs {
        let cli = Cli::try_parse_from(["a", "server", "-c", "x"].iter().chain(argv)).unwrap();
        let Command::Server(args) = cli.command else {
            panic!("not server")
        };
        *args
    }

    #[test]
    fn contradicting_flags_are_refused_naming_both() {
        for (argv, names) in [
            (
                &[
                    "--refresh-before-expiry",
                    "1m",
                    "--min-credential-lifetime",
                    "5m",
                ][..],
                &["--refresh-before-expiry", "--min-credential-lifetime"][..],
            ),
            (&["--pod-request-rate=-1"][..], &["--pod-request-rate"][..]),
            (
                &["--pod-request-rate", "NaN"][..],
                &["--pod-request-rate"][..],
            ),
            (
                &["--pod-request-burst", "inf"][..],
                &["--pod-request-burst"][..],
            ),
            (
                &["--pod-request-rate", "5", "--pod-request-burst", "0.5"][..],
                &["--pod-request-burst", "--pod-request-rate"][..],
            ),
            (
                &["--pod-connect-rate", "5", "--pod-connect-burst", "0"][..],
                &["--pod-connect-burst", "--pod-connect-rate"][..],
            ),
            (&["--pod-connect-rate=-3"][..], &["--pod-connect-rate"][..]),
            (&["--port", "2705"][..], &["--port", "--metrics-port"][..]),
            (
                &["--metrics-port", "2703"][..],
                &["--probe-port", "--metrics-port"][..],
            ),
            (
                &["--max-upstream-inflight", "0"][..],
                &["--max-upstream-inflight"][..],
            ),
        ] {
            let err = ServerConfig::try_from(server(argv))
                .unwrap_err()
                .to_string();
            for name in names {
                assert!(err.contains(name), "{argv:?}: {err}");
            }
        }
    }

    #[test]
    fn the_defaults_are_consistent_and_a_zero_rate_means_no_budget() {
        let config = ServerConfig::try_from(server(&[])).unwrap();
        assert_eq!(config.pod_budget, Some((200.0, 400.0)));
        assert_eq!(config.probe_addr.to_string(), "127.0.0.1:2703");
        assert_eq!(
            config.pod_limits,
            crate::ebpf::PodLimits {
                budget: Some(crate::ebpf::ConnectBudget {
                    rate: 100.0,
                    burst: 200.0
                }),
                max_connections: 1024,
            }
        );
        let config = ServerConfig::try_from(server(&[
            "--pod-request-rate",
            "0",
            "--pod-connect-rate",
            "0",
        ]))
        .unwrap();
        assert_eq!(config.pod_budget, None);
        assert_eq!(config.pod_limits.budget, None);
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (argv, flag) in [
            (&["--port", "http"][..], "--port"),
            (
                &["--max-credential-retention-before-renewal", "3 hours"][..],
                "--max-credential-retention-before-renewal",
            ),
            (&["-b", "not-an-ip"][..], "--bind-hosts"),
            (&["--metrics-address", "x"][..], "--metrics-address"),
        ] {
            let err = Cli::try_parse_from(
                ["a", "server", "-c", "x"]
                    .iter()
                    .chain(argv.iter())
                    .copied(),
            )
            .unwrap_err();
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains(flag), "{err}");
        }
    }
}

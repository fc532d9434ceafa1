//! Prometheus metrics: the reference agent's series under their exact names and labels, so
//! existing dashboards keep working, plus latency histograms and the kernel's counters.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::histogram::AtomicHistogram;

/// A counter exposed under its bare name, as the Go client exposes the reference agent's
/// counters (`pod_identity_http_response`, not `..._total`): OpenMetrics counters must end in
/// `_total`, so it is typed `unknown`, which keeps the name. PromQL's `rate()` works the same.
#[derive(Debug, Default, Clone)]
pub struct ReferenceCounter(crate::striped::Counter);

impl ReferenceCounter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.inc();
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

impl TypedMetric for ReferenceCounter {
    const TYPE: MetricType = MetricType::Unknown;
}

impl EncodeMetric for ReferenceCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.0.get())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Unknown
    }
}

/// `code` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// HTTP status code.
    pub code: u16,
}

/// `state` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// Cache state: hit, miss, ...
    pub state: &'static str,
}

/// `type` and `code` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Error class.
    pub r#type: String,
    /// EKS Auth error code.
    pub code: String,
}

/// `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// What happened, e.g. `success`, `not_found`, `unavailable`.
    pub outcome: &'static str,
}

/// `listener` and `outcome` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttributionLabels {
    /// `attributed` or `plain`.
    pub listener: &'static str,
    /// `attributed`, `mismatch`, `unattributed`, `not_a_pod`.
    pub outcome: &'static str,
}

/// `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvictionLabel {
    /// Why: lru, pod_gone, token_expired, expired.
    pub reason: &'static str,
}

/// `result` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// hit, stale, miss, coalesced, negative.
    pub result: &'static str,
}

/// `purpose`, `outcome` and `code` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// request or refresh.
    pub purpose: String,
    /// success, rejected, not_found, unavailable.
    pub outcome: String,
    /// EKS Auth error code, empty on success.
    pub code: String,
}

/// `listener` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// `attributed` or `plain`.
    pub listener: &'static str,
}

/// `listener` and `reason` labels of a refused connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `attributed`, `plain` or `admin`.
    pub listener: &'static str,
    /// `listener_full` or `peer_full`.
    pub reason: &'static str,
}

/// `kind` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// parse, timeout, incomplete, io.
    pub kind: &'static str,
}

/// `mode` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    /// `ebpf` or `fallback`.
    pub mode: &'static str,
}

/// `event` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    /// Kernel counter name.
    pub event: &'static str,
}

/// `feature` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FeatureLabel {
    /// Kernel feature name.
    pub feature: &'static str,
}

/// `pod` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabel {
    /// Pod UID.
    pub pod: String,
}

/// `direction` and `outcome` labels of a handover.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandoverLabels {
    /// `taken` (this agent took over) or `given` (it handed over).
    pub direction: &'static str,
    /// `ok`, `none` (nobody to take from), `refused` (peer or directory not root's) or
    /// `failed` (broken or timed out).
    pub outcome: &'static str,
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    names: Vec<(&'static str, MetricType)>,
    family_names: Vec<&'static str>,
    /// `pod_identity_http_response{code}` (reference).
    pub http_response: Family<CodeLabel, ReferenceCounter>,
    /// `pod_identity_cache_state{state}` (reference).
    pub cache_state: Family<StateLabel, ReferenceCounter>,
    /// `pod_identity_cache_errors{type,code}` (reference).
    pub cache_errors: Family<ErrorLabels, ReferenceCounter>,
    /// Credentials request latency by outcome, seconds.
    pub request_seconds: Family<OutcomeLabel, AtomicHistogram>,
    /// EKS Auth call latency by outcome, seconds.
    pub upstream_seconds: Family<OutcomeLabel, AtomicHistogram>,
    /// 1 for the active mode.
    pub mode: Family<ModeLabel, Gauge>,
    /// Requests by listener and kernel attribution outcome.
    pub attribution: Family<AttributionLabels, crate::striped::Counter>,
    /// Requests refused because their pod was over its budget.
    pub admission_rejected: Family<ListenerLabel, Counter>,
    /// Connections that ended without a well-formed exchange, by kind.
    pub connection_errors: Family<KindLabel, Counter>,
    /// Connections closed at accept because their listener or peer was at its cap.
    pub connections_refused: Family<RefusedLabels, Counter>,
    /// Cache entries (set at scrape time).
    pub cache_entries: Gauge<u64, AtomicU64>,
    /// Request-path cache results.
    pub cache_requests: Family<ResultLabel, crate::striped::Counter>,
    /// Evictions by reason.
    pub cache_evictions: Family<EvictionLabel, Counter>,
    /// EKS Auth calls by purpose, outcome and code.
    pub upstream_calls: Family<UpstreamLabels, Counter>,
    /// EKS Auth calls in flight.
    pub upstream_inflight: Gauge,
    /// How late refreshes ran after they were due, seconds.
    pub refresh_lag: Histogram,
    /// Pods noticed by `--prewarm` whose credentials were fetched before they asked.
    pub prewarmed: Counter,
    /// First requests of a pod answered from a pre-warmed entry.
    pub prewarm_first_hits: Counter,
    /// Live entries in the kernel's tuple map (read at scrape time).
    pub ebpf_tuples: Gauge<u64, AtomicU64>,
    /// The eBPF programs' counters, read from the kernel at scrape time.
    pub ebpf_events: Family<EventLabel, Gauge<u64, AtomicU64>>,
    /// 1 for each kernel feature the loaded programs use, 0 for one the kernel lacks.
    pub ebpf_feature: Family<FeatureLabel, Gauge<u64, AtomicU64>>,
    /// Pods with a connect budget in the kernel (read at scrape time).
    pub ebpf_pod_budgets: Gauge<u64, AtomicU64>,
    /// Connects the kernel refused per pod over its connect budget (read at scrape time).
    pub pod_connects_refused: Family<PodLabel, Gauge<u64, AtomicU64>>,
    /// Handovers between an agent and the one replacing it, by direction and outcome.
    pub handovers: Family<HandoverLabels, Counter>,
    /// 1 while `/readyz` would answer 200 (set at scrape time).
    pub ready: Gauge<u64, AtomicU64>,
    /// `--max-cache-size`: what `cache_entries` is measured against.
    pub cache_capacity: Gauge<u64, AtomicU64>,
    /// Seconds until the soonest expiry among cached credentials (set at scrape time; no
    /// sample while none are cached).
    pub cache_soonest_expiry: Family<Vec<(String, String)>, Gauge<f64, AtomicU64>>,
    /// Cache entries this agent adopted from the agent it replaced.
    pub handover_entries: Counter,
    hot: Hot,
}

/// The warm path's series, looked up once: a family lookup hashes its labels under a lock on
/// every call. Made on first use, so the exposition is what it would be without them.
#[derive(Debug, Default)]
struct Hot {
    ok: OnceLock<(ReferenceCounter, AtomicHistogram)>,
    hit: OnceLock<(ReferenceCounter, crate::striped::Counter)>,
    attributed: OnceLock<crate::striped::Counter>,
}

fn register<M: prometheus_client::registry::Metric + TypedMetric>(
    registry: &mut Registry,
    names: &mut Vec<(&'static str, MetricType)>,
    name: &'static str,
    help: &str,
    metric: M,
) {
    names.push((name, M::TYPE));
    registry.register(name, help, metric);
}

fn latency_histogram() -> AtomicHistogram {
    // 50 µs .. ~6.5 s: a cache hit is tens of µs, an EKS Auth call tens to hundreds of ms.
    AtomicHistogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00005, 2.0, 18,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let mut names = Vec::new();
        let http_response = Family::default();
        let cache_state = Family::default();
        let cache_errors = Family::default();
        let request_seconds = Family::<OutcomeLabel, AtomicHistogram>::new_with_constructor(
            latency_histogram as fn() -> AtomicHistogram,
        );
        let upstream_seconds = Family::<OutcomeLabel, AtomicHistogram>::new_with_constructor(
            latency_histogram as fn() -> AtomicHistogram,
        );
        let mode = Family::default();
        let ebpf_events = Family::default();
        let ebpf_feature = Family::default();
        let attribution = Family::default();
        let ebpf_tuples = Gauge::default();
        let ebpf_pod_budgets = Gauge::default();
        let pod_connects_refused = Family::default();
        let cache_entries = Gauge::default();
        let connection_errors = Family::default();
        let admission_rejected = Family::default();
        let connections_refused = Family::default();
        register(
            &mut registry,
            &mut names,
            "pod_identity_connections_refused",
            "Connections closed at accept because their listener group or peer was at its cap",
            connections_refused.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_admission_rejected",
            "Requests refused with 503 because their pod was over its request budget",
            admission_rejected.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_connection_errors",
            "Connections that ended without a well-formed exchange (parse, timeout, incomplete, io)",
            connection_errors.clone(),
        );
        let cache_requests = Family::default();
        let cache_evictions = Family::default();
        let upstream_calls = Family::default();
        let upstream_inflight = Gauge::default();
        let prewarmed = Counter::default();
        let handovers = Family::default();
        let handover_entries = Counter::default();
        let ready = Gauge::default();
        let cache_capacity = Gauge::default();
        let cache_soonest_expiry = Family::default();
        register(
            &mut registry,
            &mut names,
            "pod_identity_ready",
            "1 while the agent is ready (listeners serving and, in eBPF mode, every program in effect)",
            ready.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_cache_capacity",
            "Most cached identities (--max-cache-size)",
            cache_capacity.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_cache_soonest_expiry_seconds",
            "Seconds until the soonest expiry among cached credentials",
            cache_soonest_expiry.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_handovers",
            "Handovers of the listeners and the cache between an agent and the one replacing it",
            handovers.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_handover_entries",
            "Cache entries adopted from the agent this one replaced",
            handover_entries.clone(),
        );
        let prewarm_first_hits = Counter::default();
        register(
            &mut registry,
            &mut names,
            "pod_identity_prewarm_entries",
            "Pods whose credentials --prewarm fetched before their first request",
            prewarmed.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_prewarm_first_hits",
            "First requests of a pod answered from a pre-warmed entry",
            prewarm_first_hits.clone(),
        );
        let refresh_lag = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 4.0, 10),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_cache_entries",
            "Identities with cached credentials",
            cache_entries.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_cache_requests",
            "Credentials requests by cache result (hit, stale, miss, coalesced, negative)",
            cache_requests.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_cache_evictions",
            "Cache evictions by reason",
            cache_evictions.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_upstream_calls",
            "EKS Auth calls by purpose, outcome and error code",
            upstream_calls.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_upstream_inflight",
            "EKS Auth calls in flight",
            upstream_inflight.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_refresh_lag_seconds",
            "How late background refreshes ran after they were due",
            refresh_lag.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_http_response",
            "Pod Identity http response code",
            http_response.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_cache_state",
            "The state of credential in cache",
            cache_state.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_cache_errors",
            "Removing credentials from cache, got non recoverable error",
            cache_errors.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_request_duration_seconds",
            "Credentials request latency by outcome",
            request_seconds.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_upstream_duration_seconds",
            "EKS Auth AssumeRoleForPodIdentity latency by outcome",
            upstream_seconds.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_agent_mode",
            "1 for the active attribution mode (ebpf or fallback)",
            mode.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_ebpf_events",
            "Counters of the kernel programs (attributed connects, recorded tuples, misses)",
            ebpf_events.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_ebpf_feature",
            "Kernel features the loaded programs use (1) or do without (0)",
            ebpf_feature.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_attribution",
            "Credentials requests by listener and kernel attribution outcome",
            attribution.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_ebpf_tuples",
            "Live connections in the kernel's attribution map",
            ebpf_tuples.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_ebpf_pod_budgets",
            "Pods with a connect budget in the kernel (entries go when the pod's cgroup does)",
            ebpf_pod_budgets.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "pod_identity_pod_connects_refused",
            "Connects to the credential addresses the kernel refused, per pod over --pod-connect-rate",
            pod_connects_refused.clone(),
        );
        Self {
            registry,
            family_names: names.iter().map(|(n, _)| *n).collect(),
            names,
            connection_errors,
            admission_rejected,
            connections_refused,
            cache_entries,
            cache_requests,
            cache_evictions,
            upstream_calls,
            upstream_inflight,
            refresh_lag,
            prewarmed,
            prewarm_first_hits,
            attribution,
            ebpf_tuples,
            ebpf_pod_budgets,
            pod_connects_refused,
            handovers,
            handover_entries,
            ready,
            cache_capacity,
            cache_soonest_expiry,
            hot: Hot::default(),
            http_response,
            cache_state,
            cache_errors,
            request_seconds,
            upstream_seconds,
            mode,
            ebpf_events,
            ebpf_feature,
        }
    }
}

impl Metrics {
    /// Every metric family's name (as registered; counters gain `_total` in the exposition).
    pub fn names(&self) -> &[&'static str] {
        &self.family_names
    }

    /// Every series name a scrape can hold (families without samples print nothing, so a
    /// scrape cannot tell): counters as `_total`, histograms as `_bucket`, `_sum` and
    /// `_count`, the rest as registered.
    pub fn series_names(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for (name, kind) in &self.names {
            let suffixes: &[&str] = match kind {
                MetricType::Counter => &["_total"],
                MetricType::Histogram => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            out.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
        out
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Counts a connection closed at accept because of a cap.
    pub fn count_refused(&self, listener: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&RefusedLabels { listener, reason })
            .inc();
    }

    /// Counts one answered credentials request.
    pub fn record_response(&self, status: u16, outcome: &'static str, seconds: f64) {
        if status == 200 && outcome == "success" {
            let (count, latency) = self.hot.ok.get_or_init(|| {
                (
                    self.http_response
                        .get_or_create(&CodeLabel { code: 200 })
                        .clone(),
                    self.request_seconds
                        .get_or_create(&OutcomeLabel { outcome })
                        .clone(),
                )
            });
            count.inc();
            latency.observe(seconds);
            return;
        }
        self.http_response
            .get_or_create(&CodeLabel { code: status })
            .inc();
        self.request_seconds
            .get_or_create(&OutcomeLabel { outcome })
            .observe(seconds);
    }
}

impl Metrics {
    /// Counts a cache hit (`cache_state{hit}` and `cache_requests{hit}`).
    pub fn count_cache_hit(&self) {
        let (state, result) = self.hot.hit.get_or_init(|| {
            (
                self.cache_state
                    .get_or_create(&StateLabel { state: "hit" })
                    .clone(),
                self.cache_requests
                    .get_or_create(&ResultLabel { result: "hit" })
                    .clone(),
            )
        });
        state.inc();
        result.inc();
    }

    /// Counts a request by listener and attribution outcome.
    pub fn count_attribution(&self, listener: &'static str, outcome: &'static str) {
        let labels = AttributionLabels { listener, outcome };
        if listener == "attributed" && outcome == "attributed" {
            let hot = self
                .hot
                .attributed
                .get_or_init(|| self.attribution.get_or_create(&labels).clone());
            hot.inc();
            return;
        }
        self.attribution.get_or_create(&labels).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_series_keep_their_names_and_labels() {
        let m = Metrics::default();
        m.record_response(200, "success", 0.001);
        m.cache_state
            .get_or_create(&StateLabel { state: "miss" })
            .inc();
        m.cache_errors
            .get_or_create(&ErrorLabels {
                r#type: "NonRecoverable".into(),
                code: "AccessDeniedException".into(),
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains("pod_identity_http_response{code=\"200\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("pod_identity_cache_state{state=\"miss\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("pod_identity_cache_errors{type=\"NonRecoverable\",code=\"AccessDeniedException\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("pod_identity_http_response_total"), "{text}");
        assert!(
            text.contains("pod_identity_request_duration_seconds_bucket{"),
            "{text}"
        );
    }

    /// Every `pod_identity_*` word of `text`.
    fn named_series(text: &str) -> std::collections::BTreeSet<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("pod_identity_"))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn every_series_the_alerts_and_the_dashboard_read_is_one_the_agent_exports() {
        let exported = Metrics::default().series_names();
        assert!(exported.contains("pod_identity_attribution_total"));
        assert!(exported.contains("pod_identity_upstream_duration_seconds_bucket"));
        for (file, text) in [
            (
                "alerts.yaml",
                include_str!("../../deploy/chart/files/alerts.yaml"),
            ),
            (
                "dashboard.json",
                include_str!("../../deploy/chart/files/dashboard.json"),
            ),
        ] {
            let named = named_series(text);
            assert!(named.len() > 10, "{file}: {named:?}");
            let unknown: Vec<_> = named.difference(&exported).collect();
            assert!(
                unknown.is_empty(),
                "{file} reads series the agent does not export: {unknown:?}"
            );
        }
    }
}

//! A Prometheus histogram whose `observe` takes no lock and writes no line another thread
//! writes. prometheus-client's `Histogram` keeps its buckets behind a mutex; every credential
//! request observes its latency, from every worker thread, and on the keep-alive path that
//! lock, and then the shared atomics that replaced it, were among the few things the agent
//! did per request that a bare server does not. Buckets and sum are per-thread [`Cells`]
//! here (the count is the buckets' sum), added up at scrape; the exposition is
//! prometheus-client's own (`encode_histogram`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

use crate::striped::Cells;

/// A histogram over fixed upper bounds, plus `+Inf`; clones share their counts.
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// Upper bounds, ascending; the last is `+Inf`.
    bounds: Vec<f64>,
    /// Observations per bucket (not cumulative; the count is their sum), then the sum's
    /// `f64` bits.
    cells: Cells,
}

impl AtomicHistogram {
    /// A histogram with these upper bounds (ascending) and `+Inf`.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Vec<f64> = bounds.into_iter().chain([f64::INFINITY]).collect();
        let cells = Cells::new(bounds.len() + 1);
        Self(Arc::new(Inner { bounds, cells }))
    }

    fn sum_cell(&self) -> usize {
        self.0.bounds.len()
    }

    /// Counts `v` in the first bucket whose bound is at least `v` (NaN in `+Inf`).
    pub fn observe(&self, v: f64) {
        let i = self
            .0
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.0.bounds.len() - 1);
        let cells = &self.0.cells;
        cells.add(i, 1);
        // Only this thread writes its stripe's sum: the update never retries in practice.
        let _ = cells.mine(self.sum_cell()).fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |bits| Some((f64::from_bits(bits) + v).to_bits()),
        );
    }

    /// (sum, count, buckets) as read now; a scrape racing observations may see a sum one
    /// observation ahead of the buckets, as any lock-free exposition can.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let cells = &self.0.cells;
        let buckets: Vec<(f64, u64)> = self
            .0
            .bounds
            .iter()
            .enumerate()
            .map(|(i, b)| (*b, cells.sum(i)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = cells.fold(self.sum_cell(), 0.0, |acc, bits| acc + f64::from_bits(bits));
        (sum, count, buckets)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    fn exposition(name: &str, metric: impl prometheus_client::registry::Metric) -> String {
        let mut registry = Registry::default();
        registry.register(name, "latency", metric);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn its_exposition_is_prometheus_clients_for_the_same_observations() {
        let bounds = [0.001, 0.01, 0.1];
        let ours = AtomicHistogram::new(bounds);
        let theirs = Histogram::new(bounds);
        for v in [0.0005, 0.001, 0.002, 0.05, 0.5, 7.0] {
            ours.observe(v);
            theirs.observe(v);
        }
        assert_eq!(exposition("h", ours), exposition("h", theirs));
    }

    #[test]
    fn threads_observing_at_once_lose_nothing() {
        let h = AtomicHistogram::new([1.0]);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let h = h.clone();
                std::thread::spawn(move || (0..10_000).for_each(|_| h.observe(0.5)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let (sum, count, buckets) = h.snapshot();
        assert_eq!((sum, count), (20_000.0, 40_000));
        assert_eq!(buckets, vec![(1.0, 40_000), (f64::INFINITY, 0)]);
    }
}

//! Counts every worker thread writes on every request, kept per thread and summed when read.
//! One shared atomic counted by two CPUs moves its cache line between them on every add; on
//! the keep-alive path the response, hit and attribution counts and the latency histogram
//! were such lines (docs/benchmarks.md, "Where the rest of the keep-alive gap is"). Here each
//! thread adds to its own stripe, a cache line no other running thread writes, and a scrape
//! adds the stripes up.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Cells in a line of 128 bytes: two 64-byte lines, as CPUs that fetch lines in pairs
/// (adjacent-line prefetch) would otherwise still share a stripe's neighbour.
const PER_LINE: usize = 16;

#[repr(align(128))]
#[derive(Debug, Default)]
struct Line([AtomicU64; PER_LINE]);

/// Stripes: twice the CPUs (threads beyond the workers, such as the blocking pool, rarely
/// count on the request path), a power of two, at least 4 and at most 256.
static STRIPES: LazyLock<usize> = LazyLock::new(|| {
    let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
    (2 * cpus).next_power_of_two().clamp(4, 256)
});

/// The calling thread's stripe: threads take the next one as they first count. A `const`
/// thread-local (no lazy-init state to check on every count), taken on first use.
#[inline]
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|s| match s.get() {
        usize::MAX => {
            let taken = NEXT.fetch_add(1, Ordering::Relaxed) % *STRIPES;
            s.set(taken);
            taken
        }
        taken => taken,
    })
}

/// `width` u64 cells, one copy per stripe.
#[derive(Debug)]
pub struct Cells {
    lines: Box<[Line]>,
    width: usize,
    lines_per_stripe: usize,
}

impl Cells {
    /// `width` cells at 0.
    pub fn new(width: usize) -> Self {
        let lines_per_stripe = width.div_ceil(PER_LINE).max(1);
        let lines = (0..lines_per_stripe * *STRIPES)
            .map(|_| Line::default())
            .collect();
        Self {
            lines,
            width,
            lines_per_stripe,
        }
    }

    /// Cell `i` of `stripe`.
    #[inline]
    fn at(&self, stripe: usize, i: usize) -> &AtomicU64 {
        debug_assert!(i < self.width);
        let line = stripe * self.lines_per_stripe + i / PER_LINE;
        &self.lines[line].0[i % PER_LINE]
    }

    /// The calling thread's copy of cell `i`.
    #[inline]
    pub fn mine(&self, i: usize) -> &AtomicU64 {
        self.at(stripe(), i)
    }

    /// Adds `v` to cell `i`.
    #[inline]
    pub fn add(&self, i: usize, v: u64) {
        self.mine(i).fetch_add(v, Ordering::Relaxed);
    }

    /// Cell `i`: every stripe's copy, combined by `fold` from `init`.
    pub fn fold<T>(&self, i: usize, init: T, fold: impl Fn(T, u64) -> T) -> T {
        (0..*STRIPES).fold(init, |acc, s| {
            fold(acc, self.at(s, i).load(Ordering::Relaxed))
        })
    }

    /// Cell `i` summed over the stripes.
    pub fn sum(&self, i: usize) -> u64 {
        self.fold(i, 0u64, u64::wrapping_add)
    }
}

/// A monotonic counter over [`Cells`], exposed as prometheus-client's `Counter` is; clones
/// share the count.
#[derive(Debug, Clone)]
pub struct Counter(Arc<Cells>);

impl Default for Counter {
    fn default() -> Self {
        Self(Arc::new(Cells::new(1)))
    }
}

impl Counter {
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.0.add(0, 1);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.0.sum(0)
    }
}

impl TypedMetric for Counter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for Counter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_counting_at_once_lose_nothing() {
        let c = Counter::default();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || (0..10_000).for_each(|_| c.inc()))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(c.get(), 80_000);
    }

    #[test]
    fn each_stripe_counts_in_its_own_line() {
        let c = Counter::default();
        let mut lines: Vec<usize> = (0..*STRIPES)
            .map(|s| c.0.at(s, 0) as *const AtomicU64 as usize / 128)
            .collect();
        lines.sort_unstable();
        lines.dedup();
        assert_eq!(lines.len(), *STRIPES);
        assert!(*STRIPES >= 4);
    }

    #[test]
    fn wide_cells_keep_each_stripe_in_its_own_lines() {
        let cells = Cells::new(21);
        assert_eq!(cells.lines_per_stripe, 2);
        let a = cells.at(0, 20) as *const AtomicU64 as usize;
        let b = cells.at(1, 0) as *const AtomicU64 as usize;
        assert!(
            b / 128 > a / 128,
            "stripe 1 starts on a line after stripe 0's last"
        );
        cells.add(20, 3);
        assert_eq!(cells.sum(20), 3);
        assert_eq!(cells.sum(0), 0);
    }
}

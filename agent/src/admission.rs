//! Per-caller admission control: each pod (or, for unattributed callers, each peer address)
//! gets its own token bucket, so one pod hammering the agent cannot crowd out the others (the
//! reference agent has one global limiter for everyone).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::bucket::TokenBucket;

/// Buckets kept before idle ones are pruned.
const PRUNE_ABOVE: usize = 50_000;

/// How long a bucket stays full before a prune may forget it.
const FULL_FOR: Duration = Duration::from_secs(1);

/// Token buckets by caller key.
#[derive(Debug)]
pub struct Admission {
    rate: f64,
    burst: f64,
    buckets: DashMap<String, Arc<Budget>>,
}

/// One caller's bucket.
#[derive(Debug)]
struct Budget {
    bucket: TokenBucket,
    /// Set when a prune forgets it: a connection keeping it looks its caller up again, so a
    /// caller never has two buckets at once.
    forgotten: AtomicBool,
}

/// The bucket a connection charges, kept between its requests: its caller never changes, so
/// the map (a lock and a hash every request) is asked once per connection.
#[derive(Debug, Default)]
pub struct Kept(Option<Arc<Budget>>);

impl Admission {
    /// `rate` requests per second per caller, bursts up to `burst`; a rate of 0 admits all.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst: burst.max(1.0),
            buckets: DashMap::new(),
        }
    }

    /// No limit for anyone.
    pub fn unlimited() -> Self {
        Self::new(0.0, 1.0)
    }

    /// The configured rate (0: unlimited).
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Takes one token from the caller's bucket: the one in `kept` while the map still holds
    /// it, else `key`'s (then kept); false when it is empty.
    pub fn admit<K: AsRef<str>>(&self, key: impl FnOnce() -> K, kept: &mut Kept) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        if let Some(budget) = kept.0.as_ref() {
            if !budget.forgotten.load(Ordering::Acquire) {
                return budget.bucket.try_take().is_ok();
            }
        }
        let budget = self.budget(key().as_ref());
        let admitted = budget.bucket.try_take().is_ok();
        kept.0 = Some(budget);
        admitted
    }

    /// `key`'s budget, made (full) if it has none.
    fn budget(&self, key: &str) -> Arc<Budget> {
        if let Some(budget) = self.buckets.get(key) {
            return budget.clone();
        }
        if self.buckets.len() > PRUNE_ABOVE {
            let now = Instant::now();
            self.buckets.retain(|_, b| {
                // Full for a while: what a new bucket would be.
                let keep = now.saturating_duration_since(b.bucket.full_since()) < FULL_FOR;
                if !keep {
                    b.forgotten.store(true, Ordering::Release);
                }
                keep
            });
        }
        self.buckets
            .entry(key.to_owned())
            .or_insert_with(|| {
                Arc::new(Budget {
                    bucket: TokenBucket::new(self.rate, self.burst),
                    forgotten: AtomicBool::new(false),
                })
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_has_its_own_budget() {
        let a = Admission::new(1.0, 5.0);
        let admitted = (0..20)
            .filter(|_| a.admit(|| "flooder", &mut Kept::default()))
            .count();
        assert_eq!(admitted, 5, "the burst, then nothing until tokens refill");
        assert!(
            a.admit(|| "quiet", &mut Kept::default()),
            "another caller is unaffected"
        );
        let unlimited = Admission::new(0.0, 1.0);
        assert!((0..1000).all(|_| unlimited.admit(|| "x", &mut Kept::default())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_bucket_is_the_callers_one_until_a_prune_forgets_it() {
        let a = Admission::new(1.0, 3.0);
        let (mut one, mut two) = (Kept::default(), Kept::default());
        // Two connections of one pod draw on one bucket.
        assert!(a.admit(|| "pod", &mut one));
        assert!(a.admit(|| "pod", &mut two));
        assert!(a.admit(|| "pod", &mut one));
        assert!(
            !a.admit(|| "pod", &mut two),
            "the pod's burst of 3 is spent"
        );
        assert!(!a.admit(|| "pod", &mut Kept::default()));
        // Idle and full: pruned once the map is over its bound; the kept bucket is dropped
        // with it, and the connection charges the pod's new one, shared with new connections.
        tokio::time::advance(Duration::from_secs(10)).await;
        for i in 0..=PRUNE_ABOVE {
            a.budget(&format!("filler-{i}"));
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        a.budget("trigger");
        assert!(!a.buckets.contains_key("pod"), "pruned");
        assert!(one.0.as_ref().unwrap().forgotten.load(Ordering::Acquire));
        assert!((0..3).all(|_| a.admit(|| "pod", &mut one)));
        assert!(!a.admit(|| "pod", &mut two), "one bucket for the pod again");
        assert!(Arc::ptr_eq(
            one.0.as_ref().unwrap(),
            two.0.as_ref().unwrap()
        ));
    }
}

//! Per-caller admission control: each pod (or, for unattributed callers, each peer address)
//! gets its own token bucket, so one pod hammering the agent cannot crowd out the others (the
//! reference agent has one global limiter for everyone).

use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::bucket::TokenBucket;

/// Buckets kept before idle ones are pruned.
const PRUNE_ABOVE: usize = 50_000;

/// Token buckets by caller key.
#[derive(Debug)]
pub struct Admission {
    rate: f64,
    burst: f64,
    buckets: DashMap<String, TokenBucket>,
}

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

    /// Takes one token from `key`'s bucket; false when it is empty.
    pub fn admit(&self, key: &str) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        if let Some(bucket) = self.buckets.get(key) {
            return bucket.try_take().is_ok();
        }
        if self.buckets.len() > PRUNE_ABOVE {
            let idle = Duration::from_secs_f64(self.burst / self.rate) + Duration::from_secs(1);
            let now = Instant::now();
            self.buckets
                .retain(|_, b| now.duration_since(b.last_used()) < idle);
        }
        let bucket = self
            .buckets
            .entry(key.to_owned())
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst));
        bucket.try_take().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_has_its_own_budget() {
        let a = Admission::new(1.0, 5.0);
        let admitted = (0..20).filter(|_| a.admit("flooder")).count();
        assert_eq!(admitted, 5, "the burst, then nothing until tokens refill");
        assert!(a.admit("quiet"), "another caller is unaffected");
        let unlimited = Admission::new(0.0, 1.0);
        assert!((0..1000).all(|_| unlimited.admit("x")));
    }
}

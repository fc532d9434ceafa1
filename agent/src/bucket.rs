//! The token bucket behind every budget: the refresh and pre-warm budget
//! (`--max-service-qps`) and each pod's request budget (`--pod-request-rate`).
//!
//! Kept as one atomic word (GCRA, the form the kernel's connect budget takes too): a pod's
//! request budget is charged on every request, from every worker thread, and a lock there
//! made the threads wait on each other on the warm path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// `rate` tokens per second, holding at most `burst`; starts full.
#[derive(Debug)]
pub struct TokenBucket {
    /// Nanoseconds per token.
    interval: u64,
    /// How far ahead of now the theoretical arrival time may run: `burst` tokens' worth.
    limit: u64,
    /// Time zero of the two clocks below.
    base: Instant,
    /// Theoretical arrival time of the next token, ns after `base`; `limit` ahead of now is
    /// an empty bucket, now or earlier a full one. The only word written per token: a pod's
    /// connections on every CPU charge it.
    tat: AtomicU64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64) -> Self {
        // A rate of 0 would never refill: callers turn such budgets off instead.
        let interval = (1e9 / rate).clamp(1.0, (u64::MAX / 4) as f64);
        Self {
            interval: interval as u64,
            limit: (interval * burst).clamp(0.0, (u64::MAX / 4) as f64) as u64,
            base: Instant::now(),
            tat: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Takes a token now, or says how long until one is there.
    pub fn try_take(&self) -> Result<(), Duration> {
        let now = self.now();
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let next = tat.max(now) + self.interval;
            let ahead = next - now;
            if ahead > self.limit {
                return Err(Duration::from_nanos(ahead - self.limit));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }

    /// Takes a token, waiting until one is there.
    pub async fn acquire(&self) {
        while let Err(wait) = self.try_take() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Since when the bucket has been full (later than now while it is not): a bucket full
    /// for a while is the one a new bucket would be, and can be forgotten.
    pub fn full_since(&self) -> Instant {
        self.base + Duration::from_nanos(self.tat.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_rate() {
        let b = TokenBucket::new(2.0, 3.0);
        assert!((0..3).all(|_| b.try_take().is_ok()));
        assert_eq!(b.try_take(), Err(Duration::from_millis(500)));
        let t = Instant::now();
        b.acquire().await;
        b.acquire().await;
        assert_eq!(t.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_refills_up_to_the_burst_and_no_further() {
        let b = TokenBucket::new(10.0, 5.0);
        let t = Instant::now();
        assert!((0..5).all(|_| b.try_take().is_ok()));
        assert!(b.try_take().is_err());
        // 5 tokens at 10/s: full again 500 ms on; the refused ask moved nothing.
        assert_eq!(b.full_since(), t + Duration::from_millis(500));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(b.full_since() < Instant::now(), "full for a minute");
        assert_eq!((0..20).filter(|_| b.try_take().is_ok()).count(), 5);
        // A fractional rate: one token every 5 s.
        let slow = TokenBucket::new(0.2, 1.0);
        assert!(slow.try_take().is_ok());
        assert_eq!(slow.try_take(), Err(Duration::from_secs(5)));
    }

    #[test]
    fn threads_charging_one_bucket_at_once_take_exactly_its_tokens() {
        // A rate so slow nothing refills during the test: exactly the burst is admitted.
        let b = std::sync::Arc::new(TokenBucket::new(1e-6, 1000.0));
        let taken: usize = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..1000).filter(|_| b.try_take().is_ok()).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(taken, 1000);
    }
}

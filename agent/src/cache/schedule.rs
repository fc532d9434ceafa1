//! Timing helpers of the cache: a refresh queue ordered soonest-first and a token bucket for
//! the refresh budget.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Keys due for refresh, soonest first. Stale items are filtered by the consumer.
#[derive(Debug)]
pub struct Queue<K> {
    heap: Mutex<BinaryHeap<Reverse<(Instant, u64, K)>>>,
    seq: std::sync::atomic::AtomicU64,
    notify: Notify,
}

impl<K: Ord + Clone> Queue<K> {
    /// An empty queue.
    pub fn new() -> Self {
        Self {
            heap: Mutex::new(BinaryHeap::new()),
            seq: std::sync::atomic::AtomicU64::new(0),
            notify: Notify::new(),
        }
    }

    /// Asks for `key` to come due at `at`.
    pub fn push(&self, key: K, at: Instant) {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.heap
            .lock()
            .expect("not poisoned")
            .push(Reverse((at, seq, key)));
        self.notify.notify_one();
    }

    /// Waits for the next due key; returns it with the time it was due.
    pub async fn next(&self) -> (K, Instant) {
        loop {
            let head = self
                .heap
                .lock()
                .expect("not poisoned")
                .peek()
                .map(|Reverse((at, _, _))| *at);
            match head {
                Some(at) if at <= Instant::now() => {
                    let Reverse((at, _, key)) = self
                        .heap
                        .lock()
                        .expect("not poisoned")
                        .pop()
                        .expect("peeked");
                    return (key, at);
                }
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.notify.notified() => {}
                    }
                }
                None => self.notify.notified().await,
            }
        }
    }
}

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes one token, waiting until one is available.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut st = self.state.lock().expect("not poisoned");
                let now = Instant::now();
                let refill = now.duration_since(st.1).as_secs_f64() * self.rate;
                st.0 = (st.0 + refill).min(self.burst);
                st.1 = now;
                if st.0 >= 1.0 {
                    st.0 -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - st.0) / self.rate)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn queue_yields_soonest_first() {
        let q = Queue::new();
        let now = Instant::now();
        q.push("late", now + Duration::from_secs(30));
        q.push("soon", now + Duration::from_secs(10));
        let (k, at) = q.next().await;
        assert_eq!((k, at), ("soon", now + Duration::from_secs(10)));
        assert!(Instant::now() >= now + Duration::from_secs(10));
        assert_eq!(q.next().await.0, "late");
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_paces_to_its_rate() {
        let b = TokenBucket::new(3.0, 3.0);
        let start = Instant::now();
        for _ in 0..9 {
            b.acquire().await;
        }
        // 3 from the burst, then 6 more at 3/s: 2 s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1990) && took <= Duration::from_millis(2010),
            "{took:?}"
        );
    }
}

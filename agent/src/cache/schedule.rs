//! The cache's refresh queue, ordered soonest-first.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
}

//! The token bucket behind every budget: the refresh and pre-warm budget
//! (`--max-service-qps`) and each pod's request budget (`--pod-request-rate`).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// `rate` tokens per second, holding at most `burst`; starts full.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// Tokens, and when they were counted.
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

    /// Takes a token now, or says how long until one is there.
    pub fn try_take(&self) -> Result<(), Duration> {
        let mut st = self.state.lock().expect("not poisoned");
        let now = Instant::now();
        st.0 = (st.0 + now.duration_since(st.1).as_secs_f64() * self.rate).min(self.burst);
        st.1 = now;
        if st.0 >= 1.0 {
            st.0 -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - st.0) / self.rate))
        }
    }

    /// Takes a token, waiting until one is there.
    pub async fn acquire(&self) {
        while let Err(wait) = self.try_take() {
            tokio::time::sleep(wait).await;
        }
    }

    /// When a token was last asked for.
    pub fn last_used(&self) -> Instant {
        self.state.lock().expect("not poisoned").1
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
}

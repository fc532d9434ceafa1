//! The one retry policy for EKS Auth calls, and an adaptive call rate: when EKS Auth says
//! "slow down" (throttling), the agent slows down to what it is being granted, and speeds up
//! again as calls succeed. The SDK itself does not retry (see `EksAuth::from_env`): two retry
//! layers multiply attempts exactly when the service asks for fewer.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::UpstreamError;

/// Backoff before retry `attempt` (0-based): `base` doubling per attempt, capped at `cap`,
/// shortened by up to half at random so that retries of many callers spread out.
pub fn backoff(base: Duration, attempt: u32, cap: Duration) -> Duration {
    let raw = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    jittered(raw, 0.5)
}

/// A random fraction in [0, 1).
pub fn random_fraction() -> f64 {
    let mut b = [0u8; 4];
    // Jitter needs no cryptographic quality; fall back to the midpoint if the RNG fails.
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_ne_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

/// `base` shortened by up to `fraction` of itself, at random: spreads refreshes out.
pub fn jittered(base: Duration, fraction: f64) -> Duration {
    base.mul_f64(1.0 - fraction * random_fraction())
}

/// First retry delay of a request-path call that met throttling or an outage, and its cap.
pub const REQUEST_RETRY: (Duration, Duration) =
    (Duration::from_millis(200), Duration::from_secs(2));

/// Whether `e` is EKS Auth asking for fewer calls.
pub fn is_throttling(e: &UpstreamError) -> bool {
    matches!(e, UpstreamError::Unavailable { code, .. }
        if code.contains("Throttl") || code.contains("TooManyRequests"))
}

/// The slowest pace: one call a second.
const MIN_RATE: f64 = 1.0;
/// Granted rate is re-estimated at most this often while throttled.
const CUT_EVERY: Duration = Duration::from_millis(250);
/// Without throttling for this long, the pace grows by half.
const GROW_EVERY: Duration = Duration::from_secs(1);
/// Without throttling for this long, calls go unpaced again.
const UNPACED_AFTER: Duration = Duration::from_secs(10);

/// Adaptive pacing of all EKS Auth calls: unpaced until the first throttling; then spaced at
/// 90% of the rate EKS Auth granted over the last second (its successful calls), growing by
/// half each quiet second, and unpaced again after 10 quiet seconds.
#[derive(Debug, Default)]
pub struct Pacer {
    state: Mutex<PacerState>,
}

#[derive(Debug, Default)]
struct PacerState {
    /// Calls per second while paced; `None`: unpaced.
    rate: Option<f64>,
    /// The earliest moment the next call may start.
    next: Option<Instant>,
    /// Successful calls of the last second.
    granted: VecDeque<Instant>,
    last_cut: Option<Instant>,
    last_change: Option<Instant>,
}

/// When a call was given its place in the pace: [`Pacer::record`] judges its result by the
/// pace it was given.
#[derive(Debug, Clone, Copy)]
pub struct Turn(Instant);

impl Pacer {
    /// Waits for this call's turn.
    pub async fn acquire(&self) -> Turn {
        let now = Instant::now();
        let slot = {
            let mut st = self.state.lock().expect("not poisoned");
            st.relax(now);
            let Some(rate) = st.rate else {
                return Turn(now);
            };
            let slot = st.next.map_or(now, |n| n.max(now));
            st.next = Some(slot + Duration::from_secs_f64(1.0 / rate));
            slot
        };
        tokio::time::sleep_until(slot).await;
        Turn(now)
    }

    /// Learns from the result of a call given its place at `turn`.
    pub fn record<T>(&self, turn: Turn, result: &Result<T, UpstreamError>) {
        let mut st = self.state.lock().expect("not poisoned");
        let now = Instant::now();
        while st
            .granted
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(1))
        {
            st.granted.pop_front();
        }
        match result {
            Ok(_) => st.granted.push_back(now),
            Err(e) if is_throttling(e) => {
                // One cut per pace: a call given its place before the last cut ran at the
                // old pace, and its throttle says nothing of the new one. Counting those cut
                // a pace that held again and again, below what EKS Auth granted (pods gave
                // up in 2 of 7 bench runs of the cold burst).
                if st
                    .last_cut
                    .is_none_or(|t| turn.0 >= t && now.duration_since(t) >= CUT_EVERY)
                {
                    // Re-estimated at each such throttle (an estimate made before all of a
                    // burst's answers were in is corrected by the next one), but never below half the
                    // current pace: a throttle met while paced slowly sees few grants, and
                    // taking that for the limit would spiral down.
                    let granted = st.granted.len() as f64 * 0.9;
                    let floor = st.rate.map_or(MIN_RATE, |r| (r * 0.5).max(MIN_RATE));
                    st.rate = Some(granted.max(floor));
                    st.last_cut = Some(now);
                    st.last_change = Some(now);
                    tracing::info!(rate = st.rate, "EKS Auth is throttling: pacing calls");
                }
            }
            Err(_) => {}
        }
    }

    /// The current pace (calls per second), `None` when unpaced.
    pub fn rate(&self) -> Option<f64> {
        self.state.lock().expect("not poisoned").rate
    }
}

impl PacerState {
    /// Quiet time since the last change: grow, and after long enough, stop pacing.
    fn relax(&mut self, now: Instant) {
        let (Some(rate), Some(changed)) = (self.rate, self.last_change) else {
            return;
        };
        let quiet = now.duration_since(changed);
        if self
            .last_cut
            .is_some_and(|t| now.duration_since(t) >= UNPACED_AFTER)
        {
            *self = PacerState::default();
        } else if quiet >= GROW_EVERY {
            self.rate = Some(rate * 1.5);
            self.last_change = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttled() -> Result<(), UpstreamError> {
        Err(UpstreamError::Unavailable {
            code: "ThrottlingException".into(),
            message: "slow down".into(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_paces_calls_at_the_granted_rate_then_recovers() {
        let p = Pacer::default();
        // Unpaced: 30 calls at once.
        let t0 = Instant::now();
        let mut turns = Vec::new();
        for _ in 0..30 {
            turns.push(p.acquire().await);
        }
        assert_eq!(t0.elapsed(), Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(10)).await;
        // EKS Auth granted 20 of them, then throttled.
        for &turn in &turns[..20] {
            p.record(turn, &Ok(()));
        }
        p.record(turns[20], &throttled());
        assert_eq!(p.rate(), Some(18.0));
        // A second throttle at once does not cut again (one estimate per 250 ms).
        p.record(turns[21], &throttled());
        assert_eq!(p.rate(), Some(18.0));
        let t1 = Instant::now();
        let mut paced = Vec::new();
        for _ in 0..18 {
            paced.push(p.acquire().await);
        }
        let spent = t1.elapsed();
        assert!(spent >= Duration::from_millis(900), "{spent:?}");
        // The burst's other throttles, answered late (the grants now over a second old), ran
        // at the old pace: no cut. A call paced at the new one that is throttled cuts again.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for &turn in &turns[22..] {
            p.record(turn, &throttled());
        }
        assert_eq!(p.rate(), Some(18.0));
        p.record(paced[17], &throttled());
        assert_eq!(
            p.rate(),
            Some(9.0),
            "half the pace: no grants in the last second"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        p.acquire().await;
        assert_eq!(p.rate(), Some(13.5));
        // Quiet seconds: faster, then unpaced.
        tokio::time::sleep(Duration::from_secs(1)).await;
        p.acquire().await;
        assert_eq!(p.rate(), Some(20.25));
        tokio::time::sleep(Duration::from_secs(10)).await;
        p.acquire().await;
        assert_eq!(p.rate(), None);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_is_jittered_down_only() {
        let (base, cap) = (Duration::from_millis(100), Duration::from_secs(1));
        for (attempt, full) in [(0, 100), (1, 200), (3, 800), (4, 1000), (30, 1000)] {
            let b = backoff(base, attempt, cap);
            let full = Duration::from_millis(full);
            assert!(b <= full && b >= full / 2, "{attempt}: {b:?}");
        }
    }
}

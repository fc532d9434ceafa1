//! The one upstream call per entry: started detached from callers, retried by the pacing
//! policy, measured, and settled into the entry.

use super::*;

impl Cache {
    /// Starts the one upstream call for this entry, detached from any caller.
    pub(super) fn start_fetch(
        self: &Arc<Self>,
        key: &Key,
        slot: &Arc<Slot>,
        st: &mut SlotState,
        purpose: Purpose,
        budget: Option<OwnedSemaphorePermit>,
    ) -> watch::Receiver<Outcome> {
        let (tx, rx) = watch::channel(None);
        st.inflight = Some(rx.clone());
        let (cache, slot, key) = (self.clone(), slot.clone(), key.clone());
        let token = st.token.clone();
        let fallback = st.accepted_token.clone().filter(|t| **t != *token);
        tokio::spawn(async move {
            let mut result = cache.call_upstream(token.clone(), purpose).await;
            if purpose == Purpose::Request {
                // Throttling or an outage: keep trying (within the window) rather than hand the
                // failure to every SDK retry, which would each start a new call. Waiters get a
                // 503 "retry" at their deadline and their retries join this call.
                let give_up = Instant::now() + cache.config.request_retry_window;
                let mut attempt = 0u32;
                while matches!(result, Err(UpstreamError::Unavailable { .. }))
                    && Instant::now() < give_up
                {
                    let (base, cap) = pacing::REQUEST_RETRY;
                    tokio::time::sleep(pacing::backoff(base, attempt, cap)).await;
                    attempt += 1;
                    result = cache.call_upstream(token.clone(), purpose).await;
                }
            }
            // A newer token EKS Auth refuses: the last accepted one may still work.
            let (result, token) = match (&result, fallback) {
                (Err(UpstreamError::Rejected { .. }), Some(old)) => {
                    (cache.call_upstream(old.clone(), purpose).await, old)
                }
                _ => (result, token),
            };
            drop(budget);
            let result = result.map(Arc::new);
            cache.settle(&key, &slot, token, &result, purpose);
            let _ = tx.send(Some(result));
        });
        rx
    }

    /// One upstream call within the budgets, measured.
    pub(super) async fn call_upstream(
        &self,
        token: Arc<str>,
        purpose: Purpose,
    ) -> Result<Credentials, UpstreamError> {
        let _refresh_permit = match purpose {
            Purpose::Refresh => {
                self.bucket.acquire().await;
                Some(self.inflight_refresh.acquire().await.expect("never closed"))
            }
            Purpose::Request | Purpose::Prewarm => None,
        };
        // The call's turn first (no permit held while waiting), then a permit.
        let turn = self.pacer.acquire().await;
        let _permit = self.inflight_all.acquire().await.expect("never closed");
        self.metrics.upstream_inflight.inc();
        let started = Instant::now();
        let result = self.fetcher.fetch(token.to_string()).await;
        self.metrics.upstream_inflight.dec();
        self.pacer.record(turn, &result);
        let (outcome, code) = match &result {
            Ok(_) => ("success", String::new()),
            Err(e) => (e.outcome(), e.code().to_owned()),
        };
        self.metrics
            .upstream_seconds
            .get_or_create(&OutcomeLabel { outcome })
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .upstream_calls
            .get_or_create(&UpstreamLabels {
                purpose: purpose.label().into(),
                outcome: outcome.into(),
                code,
            })
            .inc();
        result
    }

    /// Records an upstream result in the entry and schedules what comes next.
    pub(super) fn settle(
        &self,
        key: &Key,
        slot: &Arc<Slot>,
        token: Arc<str>,
        result: &Result<Arc<Credentials>, UpstreamError>,
        purpose: Purpose,
    ) {
        let mut st = slot.state.lock().expect("not poisoned");
        st.inflight = None;
        let now = Instant::now();
        if result.is_ok() {
            // Credentials may push another entry's credentials out; checked after this
            // entry's lock is given back (eviction looks at other entries' state).
            let cache_key = key.clone();
            let over = self.entries.len() > self.config.max_entries;
            if over {
                drop(st);
                self.trim(&cache_key);
                st = slot.state.lock().expect("not poisoned");
            }
        }
        match result {
            Ok(creds) => {
                let cached = self.cached(creds.clone(), now);
                let due = self.refresh_due(&cached);
                st.creds = Some(cached);
                slot.moved_on();
                st.accepted_token = Some(token);
                st.negative = None;
                st.last_error = None;
                st.failures = 0;
                st.next_refresh = Some(due);
                self.queue.push(key.clone(), due);
                if purpose == Purpose::Prewarm {
                    st.prewarmed = true;
                    self.metrics.prewarmed.inc();
                }
            }
            Err(e) if e.is_permanent() => {
                // The identity has no (valid) association: forget its credentials, remember why.
                st.creds = None;
                slot.moved_on();
                st.next_refresh = None;
                st.negative = Some((e.clone(), now + self.config.negative_ttl));
                self.metrics
                    .cache_errors
                    .get_or_create(&ErrorLabels {
                        r#type: "NonRecoverable".into(),
                        code: e.code().into(),
                    })
                    .inc();
            }
            Err(e) => {
                // Transient: keep serving what we have; retry with backoff while it is usable.
                st.last_error = Some(e.clone());
                st.failures += 1;
                if let Some(c) = st.creds.as_ref().filter(|c| self.usable(c, now)) {
                    let backoff = pacing::backoff(
                        self.config.retry_backoff,
                        st.failures - 1,
                        Duration::from_secs(300),
                    );
                    // Never back off past the last moment the credentials can be served.
                    let last_chance = c
                        .expires_at
                        .checked_sub(self.config.min_remaining)
                        .unwrap_or(now);
                    let due = (now + backoff).min(last_chance.max(now));
                    st.next_refresh = Some(due);
                    self.queue.push(key.clone(), due);
                }
            }
        }
    }
}

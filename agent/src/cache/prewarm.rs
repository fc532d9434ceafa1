//! Pre-warm: fetching a pod's credentials before it asks, within the refresh budget, and
//! refreshes that adopt the newest token the kubelet wrote.

use super::*;

impl Cache {
    /// Fetches credentials for a pod before it asks (`--prewarm`), with `budget` from
    /// [`Cache::prewarm_budget`], taken *before* the entry is marked in flight: a request never
    /// waits behind a pre-warm's budget. Does nothing when the entry is fresh, negative or in
    /// flight.
    /// `token_file` is where the kubelet keeps the pod's token. Returns the call's result, or
    /// `None` when no call was needed.
    pub async fn prewarm(
        self: &Arc<Self>,
        lookup: Lookup,
        token_file: Arc<Path>,
        budget: OwnedSemaphorePermit,
    ) -> Option<Result<Arc<Credentials>, UpstreamError>> {
        if self.disabled() {
            return None;
        }
        let slot = self.slot(&lookup.key);
        let mut rx = {
            let mut st = slot.state.lock().expect("not poisoned");
            if st.adopt_subject(&lookup).is_err() {
                return None;
            }
            st.token_file = Some(token_file);
            if st.token.is_empty() || lookup.token_exp > st.token_exp {
                st.hold_token(
                    &lookup.key,
                    lookup.token,
                    lookup.token_exp,
                    lookup.facts.as_deref(),
                );
            }
            if st.cgroup.is_none() {
                st.cgroup = lookup.cgroup;
            }
            if !self.needs_call_now(&st) {
                return None;
            }
            self.start_fetch(&lookup.key, &slot, &mut st, Purpose::Prewarm, Some(budget))
        };
        loop {
            if let Some(result) = rx.borrow_and_update().clone() {
                return Some(result);
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Waits for the refresh budget a pre-warm call spends: one `--max-service-qps` token
    /// and one of the in-flight permits refreshes may hold.
    pub async fn prewarm_budget(&self) -> OwnedSemaphorePermit {
        self.bucket.acquire().await;
        self.inflight_refresh
            .clone()
            .acquire_owned()
            .await
            .expect("never closed")
    }

    /// Whether `key` has neither fresh credentials, a remembered error nor a call in flight.
    pub fn needs_call(&self, key: &Key) -> bool {
        let Some(slot) = self.entries.get(key).map(|s| s.clone()) else {
            return true;
        };
        let st = slot.state.lock().expect("not poisoned");
        self.needs_call_now(&st)
    }

    pub(super) fn needs_call_now(&self, st: &SlotState) -> bool {
        let now = Instant::now();
        st.inflight.is_none()
            && st.creds.as_ref().is_none_or(|c| !self.fresh(c, now))
            && st.negative.as_ref().is_none_or(|(_, until)| now >= *until)
    }

    /// Adopts the token the kubelet last wrote to `file` if it is newer than the entry's and
    /// names the same pod (the kubelet rotates it at 80% of its life).
    pub(super) fn take_newer_token(&self, key: &Key, st: &mut SlotState, file: &Path) {
        let Some(token) = crate::prewarm::read_token(file) else {
            return;
        };
        let now = (self.epoch_at_start + self.started.elapsed().as_secs_f64()) as i64;
        let Ok(facts) = crate::token::parse(&token, now) else {
            return;
        };
        let same_pod = match key {
            Key::Pod { uid, .. } => facts.pod_uid.as_deref() == Some(&**uid),
            // Fallback entries are keyed by their token: a new token is another entry.
            Key::Token(_) => false,
        };
        if same_pod && facts.exp > st.token_exp {
            st.hold_token(key, Arc::from(token), facts.exp, Some(&facts));
        }
    }
}

//! Background work: refreshes when they come due, and sweeps of entries whose pod or token
//! is gone.

use super::*;

impl Cache {
    pub(super) async fn run_refreshes(cache: std::sync::Weak<Self>, queue: Arc<Queue<Key>>) {
        loop {
            let (key, due) = queue.next().await;
            // A weak reference: a dropped cache ends this task.
            let Some(cache) = cache.upgrade() else { return };
            cache.refresh(&key, due);
        }
    }

    pub(super) fn refresh(self: &Arc<Self>, key: &Key, due: Instant) {
        let Some(slot) = self.entries.get(key).map(|s| s.clone()) else {
            return;
        };
        let mut st = slot.state.lock().expect("not poisoned");
        if st.next_refresh != Some(due) || st.inflight.is_some() || st.creds.is_none() {
            return; // superseded, already running, or nothing to refresh
        }
        if let Some(reason) = self.gone(&st) {
            drop(st);
            self.evict(key, reason);
            return;
        }
        self.metrics
            .refresh_lag
            .observe(Instant::now().saturating_duration_since(due).as_secs_f64());
        if let Some(file) = st.token_file.clone() {
            self.take_newer_token(key, &mut st, &file);
        }
        let _ = self.start_fetch(key, &slot, &mut st, Purpose::Refresh, None);
    }

    /// Why an entry must go without another upstream call, if it must.
    pub(super) fn gone(&self, st: &SlotState) -> Option<&'static str> {
        if st.cgroup.as_ref().is_some_and(|c| !c.exists()) {
            return Some("pod_gone");
        }
        let now_epoch = self.epoch_at_start + self.started.elapsed().as_secs_f64();
        if st.token_exp.is_some_and(|exp| (exp as f64) <= now_epoch) {
            return Some("token_expired");
        }
        None
    }

    pub(super) async fn run_sweeps(cache: std::sync::Weak<Self>) {
        let interval = match cache.upgrade() {
            Some(c) => c.config.sweep_interval,
            None => return,
        };
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(c) = cache.upgrade() else { return };
            c.sweep();
        }
    }

    /// Drops entries of gone pods, expired tokens, and entries with nothing left to serve.
    pub(super) fn sweep(&self) {
        let now = Instant::now();
        let mut doomed = Vec::new();
        for e in self.entries.iter() {
            let st = e.value().state.lock().expect("not poisoned");
            if st.inflight.is_some() {
                continue;
            }
            if let Some(reason) = self.gone(&st) {
                doomed.push((e.key().clone(), reason));
                continue;
            }
            let nothing_to_serve = st.creds.as_ref().is_none_or(|c| c.expires_at <= now);
            let negative_over = st.negative.as_ref().is_none_or(|(_, until)| *until <= now);
            if nothing_to_serve && negative_over {
                doomed.push((e.key().clone(), "expired"));
            }
        }
        for (key, reason) in doomed {
            self.evict(&key, reason);
        }
    }
}

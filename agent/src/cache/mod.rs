//! The credential cache: sharded (`dashmap`), keyed by the proven pod identity (or, without
//! kernel attribution, by a hash of the token), with single-flight upstream calls detached
//! from callers, refresh-ahead within a budget, stale-serving through EKS Auth trouble,
//! negative caching of hard errors, and bounded size. A pod's entry also holds the pod's last
//! token with what it says ([`Cache::recall`]): a pod's new connection presenting it is not
//! parsed again.
//!
//! Time is `tokio::time` throughout, so tests run on a paused clock; credential expiry (wall
//! clock) is turned into an `Instant` once, when credentials arrive.

mod fetch;
mod handover;
mod prewarm;
mod schedule;
mod sweep;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::bucket::TokenBucket;
use crate::credentials::Credentials;
use crate::metrics::{
    ErrorLabels, EvictionLabel, Metrics, OutcomeLabel, ResultLabel, StateLabel, UpstreamLabels,
};
use crate::token::Facts;
pub use crate::token::Subject;
use crate::upstream::pacing::{self, jittered, Pacer};
use crate::upstream::{Fetcher, UpstreamError};
pub use handover::{CredentialsSnapshot, EntrySnapshot};
use schedule::Queue;

/// What identifies a cache entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// A pod proven by the kernel: one entry per pod, whatever its tokens claim (a pod's
    /// service account cannot change in its lifetime).
    Pod {
        /// Pod UID (from the caller's pod cgroup, equal to the token's; shared with it).
        uid: Arc<str>,
    },
    /// Callers the kernel did not attribute (node daemons, fallback mode): SHA-256 of the
    /// token (never unverified claims alone).
    Token([u8; 32]),
}

impl Key {
    /// The key of pod `uid` (proven by the kernel).
    pub fn for_pod(uid: impl Into<Arc<str>>) -> Self {
        Key::Pod { uid: uid.into() }
    }

    /// The fallback key for `token`.
    pub fn for_token(token: &str) -> Self {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        Key::Token(d.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }
}

/// Cache tuning; every duration is configurable so tests run in seconds.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Most entries (`--max-cache-size`); 0 disables caching.
    pub max_entries: usize,
    /// Renew at the latest this long after fetching (`--max-credential-retention-before-renewal`).
    pub max_retention: Duration,
    /// Renew when less than this is left before expiry.
    pub refresh_before_expiry: Duration,
    /// Never serve credentials with less than this left.
    pub min_remaining: Duration,
    /// How long a hard EKS Auth error is remembered.
    pub negative_ttl: Duration,
    /// Longest a request waits for an upstream call before getting a 503 "retry".
    pub response_deadline: Duration,
    /// Background refreshes per second (`--max-service-qps`).
    pub refresh_qps: f64,
    /// Most upstream calls in flight at once.
    pub max_inflight: usize,
    /// How often entries of gone pods and expired tokens are swept.
    pub sweep_interval: Duration,
    /// First retry delay after a transient refresh failure (doubles, capped at 5 min).
    pub retry_backoff: Duration,
    /// How long a request-path call keeps retrying throttling and 5xx (0: not at all).
    pub request_retry_window: Duration,
    /// EKS Auth calls one entry (one pod) may start from requests, per second and at once
    /// (`None`: no limit); beyond, a request that would need a call gets EKS Auth's last
    /// error or a 503 "retry".
    pub entry_call_rate: Option<(f64, f64)>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: 2000,
            max_retention: Duration::from_secs(3 * 3600),
            refresh_before_expiry: Duration::from_secs(30 * 60),
            min_remaining: Duration::from_secs(5 * 60),
            negative_ttl: Duration::from_secs(10),
            response_deadline: Duration::from_millis(900),
            refresh_qps: 3.0,
            max_inflight: 32,
            sweep_interval: Duration::from_secs(10),
            retry_backoff: Duration::from_secs(1),
            request_retry_window: Duration::from_secs(10),
            entry_call_rate: Some((0.2, 5.0)),
        }
    }
}

/// Why the cache could not produce credentials.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CacheError {
    /// EKS Auth's answer (possibly remembered from a recent call).
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The upstream call outlived the response deadline; it goes on and fills the cache.
    #[error("credentials are being fetched from EKS Auth; retry")]
    Pending,
    /// The pod's token names another namespace or service account than the one its cached
    /// credentials (or the call in flight) are for.
    #[error("the token names service account {claimed} but this pod's is {held}")]
    SubjectChanged {
        /// `namespace/service-account` the token names.
        claimed: String,
        /// `namespace/service-account` the entry holds.
        held: String,
    },
    /// The entry has started as many EKS Auth calls as its budget allows; retry later.
    #[error("this pod has made too many EKS Auth calls; retry in {0:?}")]
    CallBudget(Duration),
}

/// What a request brings besides its key.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The entry's identity (shared: a connection's requests present the same one).
    pub key: Arc<Key>,
    /// The token presented (the newest one becomes the entry's refresh token).
    pub token: Arc<str>,
    /// The token's `exp` (epoch seconds), if it has one.
    pub token_exp: Option<i64>,
    /// The caller's pod cgroup directory (attribution mode): the entry dies with it.
    pub cgroup: Option<Arc<Path>>,
    /// What the token names, for a pod's entry (`None` for token-keyed entries).
    pub subject: Option<Arc<Subject>>,
    /// What `token` says, when the caller parsed it: the entry keeps its `nbf` (the rest is
    /// the entry's own) so a pod's next connection presenting the same bytes need not parse
    /// them again ([`Cache::recall`]).
    pub facts: Option<Arc<Facts>>,
}

/// What [`Cache::find`] found.
#[derive(Debug)]
pub enum Found {
    /// Credentials to answer with now and, for fresh ones, what lets the same caller be
    /// answered again without the cache's locks while they stay the entry's.
    Ready(Arc<Credentials>, Option<Held>),
    /// A call to EKS Auth to wait for.
    Waiting(Waiting),
}

/// The last-use stamp's resolution (it counts milliseconds).
const STAMP_EVERY: Duration = Duration::from_millis(1);

/// Where a lookup ends once the entry's lock is given back.
enum Step {
    /// Fresh credentials, and the entry's generation and their freshness for [`Held`].
    Fresh {
        creds: Arc<Credentials>,
        generation: u64,
        fresh_until: Instant,
    },
    /// The entry's call to EKS Auth.
    Wait(watch::Receiver<Outcome>),
}

/// A fresh hit, kept by a connection so its next requests need neither the cache's map nor
/// the entry's lock (bench case 9: those locks and counts are lines every connection of the
/// pod writes). It holds while the entry keeps the same credentials and they are fresh.
#[derive(Debug)]
pub struct Held {
    slot: Arc<Slot>,
    generation: u64,
    fresh_until: Instant,
    /// When the entry's last-use stamp (ms) is next due: not worked out on every repeat.
    next_stamp: Instant,
}

impl Held {
    /// Whether the entry still holds these credentials, fresh, at `now` (the request's clock
    /// read): two reads, no write.
    pub fn holds(&self, now: Instant) -> bool {
        now < self.fresh_until && self.slot.generation.load(Ordering::Acquire) == self.generation
    }
}

/// A call to EKS Auth a lookup waits for, within the response deadline.
#[derive(Debug)]
pub struct Waiting(Wait);

#[derive(Debug)]
enum Wait {
    /// The entry's single-flight call.
    Call {
        rx: watch::Receiver<Outcome>,
        deadline: Instant,
    },
    /// No caching (`--max-cache-size 0` or no retention): a call of the caller's own.
    Uncached { cache: Arc<Cache>, token: Arc<str> },
}

impl Waiting {
    /// The call's credentials, or [`CacheError::Pending`] once the response deadline has
    /// passed (the call goes on and fills the entry).
    pub async fn wait(self) -> Result<Arc<Credentials>, CacheError> {
        match self.0 {
            Wait::Uncached { cache, token } => {
                Ok(Arc::new(cache.fetcher.fetch(token.to_string()).await?))
            }
            Wait::Call { mut rx, deadline } => loop {
                if let Some(result) = rx.borrow_and_update().clone() {
                    return result.map_err(CacheError::from);
                }
                match tokio::time::timeout_at(deadline, rx.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) | Err(_) => return Err(CacheError::Pending),
                }
            },
        }
    }
}

#[derive(Debug, Clone)]
struct Cached {
    creds: Arc<Credentials>,
    fetched_at: Instant,
    expires_at: Instant,
    /// Until when they are fresh (see [`Cache::fresh`]): worked out once, not per request.
    fresh_until: Instant,
}

type Outcome = Option<Result<Arc<Credentials>, UpstreamError>>;

#[derive(Debug, Default)]
struct SlotState {
    creds: Option<Cached>,
    /// Shared with `accepted_token` when they are the same: tokens are about 1 KiB each.
    token: Arc<str>,
    token_exp: Option<i64>,
    /// `Some(nbf)` when a request or pre-warm parsed `token` and it says what the entry holds:
    /// this pod, `subject`, `token_exp`, and this `nbf` (16 bytes, where keeping the parsed
    /// facts would cost an allocation or two per entry).
    parsed_nbf: Option<Option<i64>>,
    /// The last token EKS Auth accepted: retried when a newer one is refused.
    accepted_token: Option<Arc<str>>,
    negative: Option<(UpstreamError, Instant)>,
    inflight: Option<watch::Receiver<Outcome>>,
    cgroup: Option<Arc<Path>>,
    failures: u32,
    next_refresh: Option<Instant>,
    /// Where the kubelet writes this pod's token (pre-warmed entries): refreshes use the
    /// newest token there, so a pod that has not called for hours still gets renewed.
    token_file: Option<Arc<Path>>,
    /// Filled by pre-warm and not yet asked for.
    prewarmed: bool,
    /// The subject the credentials (or the call in flight) are for (pods' entries).
    subject: Option<Arc<Subject>>,
    /// The last transient EKS Auth error: what a caller over the entry's call budget is told
    /// (the answer a new call would most likely get).
    last_error: Option<UpstreamError>,
}

/// `Some(nbf)` when `facts` (what the entry's new token says) hold nothing beyond what the
/// entry `st` of `key` already holds but the token's `nbf`: its pod is `key`'s, its subject and
/// `exp` are the entry's. Then [`Cache::recall`] can say what the token says without keeping
/// the facts.
fn parsed_nbf(key: &Key, st: &SlotState, facts: Option<&Facts>) -> Option<Option<i64>> {
    let facts = facts?;
    let Key::Pod { uid } = key else {
        return None;
    };
    let same = facts.pod_uid.as_deref() == Some(&**uid)
        && facts.exp == st.token_exp
        && st
            .subject
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &facts.subject) || **s == *facts.subject);
    same.then_some(facts.nbf)
}

impl SlotState {
    /// Makes `token` (expiring at `exp`) the entry's token, with what it says when the caller
    /// parsed it (`facts`): the one place the three are written, so the recalled facts are
    /// always the held token's.
    fn hold_token(&mut self, key: &Key, token: Arc<str>, exp: Option<i64>, facts: Option<&Facts>) {
        self.token = token;
        self.token_exp = exp;
        self.parsed_nbf = parsed_nbf(key, self, facts);
    }

    /// Adopts `lookup`'s subject, or says why not: a pod's entry holding credentials, or with
    /// a call in flight, keeps its subject; one holding nothing or only an error is replaced
    /// (its error and tokens belonged to the old subject).
    fn adopt_subject(&mut self, lookup: &Lookup) -> Result<(), CacheError> {
        let Some(claimed) = &lookup.subject else {
            return Ok(());
        };
        match &self.subject {
            Some(held) if **held == **claimed => Ok(()),
            Some(held) if self.creds.is_some() || self.inflight.is_some() => {
                Err(CacheError::SubjectChanged {
                    claimed: format!("{}/{}", claimed.namespace, claimed.service_account),
                    held: format!("{}/{}", held.namespace, held.service_account),
                })
            }
            _ => {
                self.subject = Some(claimed.clone());
                self.negative = None;
                self.last_error = None;
                self.accepted_token = None;
                self.hold_token(
                    &lookup.key,
                    lookup.token.clone(),
                    lookup.token_exp,
                    lookup.facts.as_deref(),
                );
                Ok(())
            }
        }
    }
}

#[derive(Debug)]
struct Slot {
    state: Mutex<SlotState>,
    /// Milliseconds since the cache started, for LRU.
    last_used: AtomicU64,
    /// Moved on (under `state`'s lock) whenever the entry's credentials change and when the
    /// entry leaves the cache: a [`Held`] hit holds while it has not moved.
    generation: AtomicU64,
    /// Calls this entry may start from requests (refreshes have the node's budget).
    calls: Option<TokenBucket>,
}

impl Slot {
    /// Ends every [`Held`] hit of this entry.
    fn moved_on(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// Why an upstream call is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Request,
    Refresh,
    /// Fetched before the pod asks; the caller took the budget (QPS, in-flight) first.
    Prewarm,
}

impl Purpose {
    fn label(self) -> &'static str {
        match self {
            Purpose::Request => "request",
            Purpose::Refresh => "refresh",
            Purpose::Prewarm => "prewarm",
        }
    }
}

/// The cache. Create with [`Cache::new`], which also starts its background tasks.
pub struct Cache {
    /// Hashed with foldhash (per-process random seed): keys are pod UIDs the kubelet named
    /// and SHA-256 digests, nothing a pod chooses, so SipHash's flood resistance buys nothing
    /// here and cost a third of a warm lookup.
    entries: DashMap<Key, Arc<Slot>, foldhash::fast::RandomState>,
    fetcher: Arc<dyn Fetcher>,
    /// Paces every EKS Auth call to what EKS Auth grants while it throttles.
    pacer: Pacer,
    config: CacheConfig,
    metrics: Arc<Metrics>,
    queue: Arc<Queue<Key>>,
    bucket: TokenBucket,
    inflight_all: Semaphore,
    /// Refreshes and pre-warms may hold at most half the in-flight permits: request misses
    /// come first.
    inflight_refresh: Arc<Semaphore>,
    started: Instant,
    /// Wall-clock seconds at `started`, to turn expirations into `Instant`s.
    epoch_at_start: f64,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("entries", &self.entries.len())
            .field("config", &self.config)
            .finish()
    }
}

impl Cache {
    /// A cache over `fetcher`; spawns the refresh scheduler and the sweeper.
    pub fn new(fetcher: Arc<dyn Fetcher>, config: CacheConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        let cache = Arc::new(Self {
            entries: DashMap::default(),
            fetcher,
            pacer: Pacer::default(),
            bucket: TokenBucket::new(config.refresh_qps.max(0.01), config.refresh_qps.max(1.0)),
            inflight_all: Semaphore::new(config.max_inflight.max(2)),
            inflight_refresh: Arc::new(Semaphore::new((config.max_inflight / 2).max(1))),
            config,
            metrics,
            queue: Arc::new(Queue::new()),
            started: Instant::now(),
            epoch_at_start: crate::token::epoch_secs(),
        });
        tokio::spawn(Self::run_refreshes(
            Arc::downgrade(&cache),
            cache.queue.clone(),
        ));
        tokio::spawn(Self::run_sweeps(Arc::downgrade(&cache)));
        cache
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Most entries the cache keeps (`--max-cache-size`).
    pub fn capacity(&self) -> usize {
        self.config.max_entries
    }

    /// Time left until the soonest expiry among cached credentials (zero for expired ones
    /// not swept yet), `None` while none are cached. Locks each entry in turn: for scrapes.
    pub fn soonest_expiry(&self) -> Option<Duration> {
        let now = Instant::now();
        self.entries
            .iter()
            .filter_map(|e| {
                let st = e.value().state.lock().expect("not poisoned");
                st.creds
                    .as_ref()
                    .map(|c| c.expires_at.saturating_duration_since(now))
            })
            .min()
    }

    fn disabled(&self) -> bool {
        self.config.max_entries == 0 || self.config.max_retention.is_zero()
    }

    /// The entry's token and what it says, when pod `uid`'s entry holds exactly `token` and
    /// knows what it says: the pod's own last token, parsed when it was first presented. A
    /// pod presenting another pod's token finds its own entry's token, not that one.
    pub fn recall(&self, uid: &Arc<str>, token: &[u8]) -> Option<crate::token::Parsed> {
        let slot = self.entries.get(&Key::for_pod(uid.clone()))?.clone();
        let st = slot.state.lock().expect("not poisoned");
        let nbf = st.parsed_nbf?;
        let subject = st.subject.clone()?;
        (st.token.as_bytes() == token).then(|| crate::token::Parsed {
            token: st.token.clone(),
            facts: Arc::new(Facts {
                exp: st.token_exp,
                nbf,
                pod_uid: Some(uid.clone()),
                subject,
            }),
        })
    }

    /// Credentials for `lookup`, from memory when possible.
    pub async fn get(self: &Arc<Self>, lookup: Lookup) -> Result<Arc<Credentials>, CacheError> {
        match self.find(lookup)? {
            Found::Ready(creds, _) => Ok(creds),
            Found::Waiting(waiting) => waiting.wait().await,
        }
    }

    /// What the cache holds for `lookup`, without waiting: credentials (a hit, or stale ones
    /// while a refresh runs), a refusal, or the call to EKS Auth to wait for (started here on
    /// a miss). A hit is answered without a future: the request path's common case.
    pub fn find(self: &Arc<Self>, lookup: Lookup) -> Result<Found, CacheError> {
        if self.disabled() {
            self.count_state("miss");
            return Ok(Found::Waiting(Waiting(Wait::Uncached {
                cache: self.clone(),
                token: lookup.token,
            })));
        }
        let slot = self.slot(&lookup.key);
        // One clock read for the whole lookup.
        let now = Instant::now();
        self.stamp(&slot, now);
        let step = 'locked: {
            let mut st = slot.state.lock().expect("not poisoned");
            if let Err(e) = st.adopt_subject(&lookup) {
                self.count_result("subject_changed");
                return Err(e);
            }
            let newer = lookup.token_exp >= st.token_exp || st.token.is_empty();
            let unparsed = st.parsed_nbf.is_none();
            if (newer || unparsed) && !Arc::ptr_eq(&st.token, &lookup.token) {
                if *st.token != *lookup.token {
                    if newer {
                        st.hold_token(
                            &lookup.key,
                            lookup.token,
                            lookup.token_exp,
                            lookup.facts.as_deref(),
                        );
                    }
                } else if unparsed {
                    st.parsed_nbf = parsed_nbf(&lookup.key, &st, lookup.facts.as_deref());
                }
            }
            // The same directory as before (the common case): no write, no count dropped.
            if let Some(cgroup) = lookup.cgroup {
                if !st.cgroup.as_ref().is_some_and(|c| Arc::ptr_eq(c, &cgroup)) {
                    st.cgroup = Some(cgroup);
                }
            }
            if let Some(c) = st.creds.as_ref().filter(|c| self.fresh(c, now)) {
                self.metrics.count_cache_hit();
                let fresh = Step::Fresh {
                    creds: c.creds.clone(),
                    generation: slot.generation.load(Ordering::Relaxed),
                    fresh_until: c.fresh_until,
                };
                if std::mem::take(&mut st.prewarmed) {
                    self.metrics.prewarm_first_hits.inc();
                }
                break 'locked fresh;
            }
            if let Some((err, _)) = st.negative.as_ref().filter(|(_, until)| now < *until) {
                self.count_result("negative");
                return Err(err.clone().into());
            }
            let usable = st
                .creds
                .as_ref()
                .filter(|c| self.usable(c, now))
                .map(|c| c.creds.clone());
            if let Some(creds) = usable {
                // Not fresh but still valid: answer now. A refresh is on its way within the
                // budget, unless one runs already or a retry after a failure is scheduled.
                if st.inflight.is_none() && st.failures == 0 {
                    let _ = self.start_fetch(&lookup.key, &slot, &mut st, Purpose::Refresh, None);
                }
                self.count_state("hit");
                self.count_result("stale");
                return Ok(Found::Ready(creds, None));
            }
            let joined = st.inflight.is_some();
            let rx = match &st.inflight {
                Some(rx) => rx.clone(),
                None => {
                    if let Some(Err(wait)) = slot.calls.as_ref().map(TokenBucket::try_take) {
                        self.count_result("call_budget");
                        return Err(match st.last_error.clone() {
                            Some(e) => CacheError::Upstream(e),
                            None => CacheError::CallBudget(wait),
                        });
                    }
                    self.start_fetch(&lookup.key, &slot, &mut st, Purpose::Request, None)
                }
            };
            self.count_state("miss");
            self.count_result(if joined { "coalesced" } else { "miss" });
            Step::Wait(rx)
        };
        Ok(match step {
            // The lookup's own count of the entry goes to the hit: no count taken for it.
            Step::Fresh {
                creds,
                generation,
                fresh_until,
            } => Found::Ready(
                creds,
                Some(Held {
                    slot,
                    generation,
                    fresh_until,
                    next_stamp: now + STAMP_EVERY,
                }),
            ),
            Step::Wait(rx) => Found::Waiting(Waiting(Wait::Call {
                rx,
                deadline: now + self.config.response_deadline,
            })),
        })
    }

    /// A [`Held`] hit answered again at `now`: counted, and the entry's use stamped.
    pub fn reused(&self, held: &mut Held, now: Instant) {
        if now >= held.next_stamp {
            self.stamp(&held.slot, now);
            held.next_stamp = now + STAMP_EVERY;
        }
        self.metrics.count_cache_hit();
    }

    /// Stamps `slot`'s last use (the LRU's clock). Written only when it changes: the line is
    /// shared by every connection of the pod, and a write moves it away from the other CPUs
    /// (most hits fall in the same ms).
    fn stamp(&self, slot: &Slot, now: Instant) {
        let used = self.millis_at(now);
        if slot.last_used.load(Ordering::Relaxed) != used {
            slot.last_used.store(used, Ordering::Relaxed);
        }
    }

    /// The entry for `key`, created if needed. Beyond the bound, entries holding no
    /// credentials (errors, nothing yet) go first, least recently used first; an entry holding
    /// credentials is evicted only by another one's credentials ([`Cache::trim`]), never by an
    /// entry that may turn out to be an error.
    fn slot(&self, key: &Key) -> Arc<Slot> {
        if let Some(s) = self.entries.get(key) {
            return s.clone();
        }
        let slot = self
            .entries
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    state: Mutex::default(),
                    last_used: AtomicU64::new(self.millis_at(Instant::now())),
                    generation: AtomicU64::new(0),
                    calls: self
                        .config
                        .entry_call_rate
                        .map(|(rate, burst)| TokenBucket::new(rate, burst)),
                })
            })
            .clone();
        self.evict_beyond_bound(key, false);
        slot
    }

    /// Evicts least recently used entries (never `keep`) while the cache is over its bound:
    /// only those without credentials, unless `credentials_too`.
    fn evict_beyond_bound(&self, keep: &Key, credentials_too: bool) {
        while self.entries.len() > self.config.max_entries {
            let victim = self
                .entries
                .iter()
                .filter(|e| e.key() != keep)
                .filter(|e| {
                    credentials_too
                        || e.value()
                            .state
                            .try_lock()
                            .is_ok_and(|st| st.creds.is_none() && st.inflight.is_none())
                })
                .min_by_key(|e| e.value().last_used.load(Ordering::Relaxed))
                .map(|e| e.key().clone());
            match victim {
                Some(v) => self.evict(&v, "lru"),
                None => break,
            }
        }
    }

    /// After `key` got credentials: back within the bound, evicting other entries' credentials
    /// if nothing else is left to evict.
    fn trim(&self, keep: &Key) {
        self.evict_beyond_bound(keep, false);
        self.evict_beyond_bound(keep, true);
    }

    fn evict(&self, key: &Key, reason: &'static str) {
        if let Some((_, slot)) = self.entries.remove(key) {
            // A connection holding a hit of this entry looks it up again.
            slot.moved_on();
            self.metrics
                .cache_evictions
                .get_or_create(&EvictionLabel { reason })
                .inc();
        }
    }

    /// `now` in milliseconds since the cache started (the LRU's clock).
    fn millis_at(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_millis() as u64
    }

    /// Fresh: fetched within the retention and far enough from expiry not to need a refresh.
    fn fresh(&self, c: &Cached, now: Instant) -> bool {
        now < c.fresh_until
    }

    /// `creds` as held, fetched at `fetched_at`.
    fn cached(&self, creds: Arc<Credentials>, fetched_at: Instant) -> Cached {
        let expires_at = self.expires_at(&creds);
        // Never fresh when expiry is nearer than the refresh window (no instant that early).
        let by_expiry = expires_at
            .checked_sub(self.config.refresh_before_expiry)
            .unwrap_or(fetched_at);
        let fresh_until = fetched_at
            .checked_add(self.config.max_retention)
            .map_or(by_expiry, |by_retention| by_retention.min(by_expiry));
        Cached {
            creds,
            fetched_at,
            expires_at,
            fresh_until,
        }
    }

    /// Usable: still comfortably valid, so it may be served while a refresh runs or fails.
    fn usable(&self, c: &Cached, now: Instant) -> bool {
        now + self.config.min_remaining < c.expires_at
    }

    fn expires_at(&self, creds: &Credentials) -> Instant {
        let now_epoch = self.epoch_at_start + self.started.elapsed().as_secs_f64();
        let left = creds.expiration_epoch_secs as f64 - now_epoch;
        Instant::now() + Duration::from_secs_f64(left.max(0.0))
    }

    /// When to refresh credentials fetched now: the earlier of the retention bound and
    /// `refresh_before_expiry` ahead of expiry, shortened by up to 10% at random.
    fn refresh_due(&self, c: &Cached) -> Instant {
        let by_expiry = c
            .expires_at
            .checked_sub(self.config.refresh_before_expiry)
            .unwrap_or(c.fetched_at);
        let due = by_expiry.min(c.fetched_at + self.config.max_retention);
        c.fetched_at + jittered(due.saturating_duration_since(c.fetched_at), 0.1)
    }

    fn count_state(&self, state: &'static str) {
        self.metrics
            .cache_state
            .get_or_create(&StateLabel { state })
            .inc();
    }

    fn count_result(&self, result: &'static str) {
        self.metrics
            .cache_requests
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}

//! The cache's entries as one agent hands them to the next on the same node (over the
//! root-only handover socket, never to disk): credentials, the tokens that renew them, and
//! what ties each entry to its pod. Timers are carried as ages, not instants: each process
//! has its own clock origin.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::*;

/// One cache entry in transit. Holds secrets: its `Debug` shows none of them.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EntrySnapshot {
    /// `Some(uid)`: a pod's entry; `None`: a token-keyed one (`token_sha256`).
    pub pod_uid: Option<String>,
    /// SHA-256 of the token, hex, for token-keyed entries.
    pub token_sha256: Option<String>,
    /// `namespace`, `service account` the entry is held to (pods' entries).
    pub subject: Option<(String, String)>,
    /// The newest token seen, which renews the entry.
    pub token: String,
    /// Its `exp`.
    pub token_exp: Option<i64>,
    /// The last token EKS Auth accepted, when it differs from `token`.
    pub accepted_token: Option<String>,
    /// The pod's cgroup directory (the entry dies with it).
    pub cgroup: Option<PathBuf>,
    /// Where the kubelet writes the pod's token (pre-warmed entries).
    pub token_file: Option<PathBuf>,
    /// Pre-warmed and not yet asked for.
    pub prewarmed: bool,
    /// The credentials.
    pub creds: CredentialsSnapshot,
}

/// Credentials in transit, with how long ago they were fetched.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CredentialsSnapshot {
    /// Key id.
    pub access_key_id: String,
    /// Secret key.
    pub secret_access_key: String,
    /// Session token.
    pub session_token: String,
    /// Account of the role.
    pub account_id: String,
    /// Expiry, seconds since the epoch.
    pub expiration_epoch_secs: u64,
    /// Milliseconds since they were fetched (the retention bound counts from then).
    pub age_ms: u64,
}

impl std::fmt::Debug for EntrySnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntrySnapshot")
            .field("pod_uid", &self.pod_uid)
            .field("subject", &self.subject)
            .field("access_key_id", &self.creds.access_key_id)
            .field("expiration", &self.creds.expiration_epoch_secs)
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Cache {
    /// The entries holding credentials that can still be served, for the agent taking over.
    /// Entries holding only an error or a call in flight are left out: the next agent asks
    /// again.
    pub fn export(&self) -> Vec<EntrySnapshot> {
        let now = Instant::now();
        self.entries
            .iter()
            .filter_map(|entry| {
                let st = entry.value().state.lock().expect("not poisoned");
                let cached = st.creds.as_ref().filter(|c| self.usable(c, now))?;
                let (pod_uid, token_sha256) = match entry.key() {
                    Key::Pod { uid } => (Some(uid.to_string()), None),
                    Key::Token(digest) => (None, Some(hex(digest))),
                };
                let fields = cached.creds.fields();
                Some(EntrySnapshot {
                    pod_uid,
                    token_sha256,
                    subject: st
                        .subject
                        .as_ref()
                        .map(|s| (s.namespace.clone(), s.service_account.clone())),
                    token: st.token.to_string(),
                    token_exp: st.token_exp,
                    accepted_token: st
                        .accepted_token
                        .as_ref()
                        .filter(|t| !Arc::ptr_eq(t, &st.token) && ***t != *st.token)
                        .map(|t| t.to_string()),
                    cgroup: st.cgroup.as_ref().map(|p| p.to_path_buf()),
                    token_file: st.token_file.as_ref().map(|p| p.to_path_buf()),
                    prewarmed: st.prewarmed,
                    creds: CredentialsSnapshot {
                        access_key_id: fields.access_key_id,
                        secret_access_key: fields.secret_access_key,
                        session_token: fields.session_token,
                        account_id: fields.account_id,
                        expiration_epoch_secs: cached.creds.expiration_epoch_secs,
                        age_ms: now.saturating_duration_since(cached.fetched_at).as_millis() as u64,
                    },
                })
            })
            .collect()
    }

    /// Adopts entries an agent handed over: each is served and renewed as if this cache had
    /// fetched it. An entry this cache already has, one that cannot be served any more, one
    /// whose pod is gone, and any beyond the cache's bound are skipped. Returns how many
    /// were adopted.
    pub fn import(&self, entries: Vec<EntrySnapshot>) -> usize {
        if self.disabled() {
            return 0;
        }
        let now = Instant::now();
        let mut adopted = 0;
        for e in entries {
            if self.entries.len() >= self.config.max_entries {
                break;
            }
            let key = match (&e.pod_uid, e.token_sha256.as_deref().and_then(unhex)) {
                (Some(uid), _) => Key::for_pod(uid.as_str()),
                (None, Some(digest)) => Key::Token(digest),
                (None, None) => continue,
            };
            if self.entries.contains_key(&key) {
                continue;
            }
            let c = e.creds;
            let creds = Arc::new(Credentials::new(
                c.access_key_id,
                c.secret_access_key,
                c.session_token,
                c.account_id,
                c.expiration_epoch_secs,
            ));
            let fetched_at = now
                .checked_sub(Duration::from_millis(c.age_ms))
                .unwrap_or(now);
            let cached = self.cached(creds, fetched_at);
            if !self.usable(&cached, now) {
                continue;
            }
            let token: Arc<str> = e.token.into();
            let st = SlotState {
                accepted_token: Some(e.accepted_token.map(Arc::from).unwrap_or(token.clone())),
                token,
                token_exp: e.token_exp,
                cgroup: e.cgroup.map(Arc::from),
                token_file: e.token_file.map(Arc::from),
                prewarmed: e.prewarmed,
                subject: e.subject.map(|(namespace, service_account)| {
                    Arc::new(Subject {
                        namespace,
                        service_account,
                    })
                }),
                ..SlotState::default()
            };
            if self.gone(&st).is_some() {
                continue;
            }
            let due = self.refresh_due(&cached).max(now);
            let slot = self.slot(&key);
            let mut held = slot.state.lock().expect("not poisoned");
            *held = SlotState {
                creds: Some(cached),
                next_refresh: Some(due),
                ..st
            };
            slot.moved_on();
            self.queue.push(key, due);
            adopted += 1;
        }
        adopted
    }
}

//! What one connection's requests share. SDKs present the same token on every request of a
//! keep-alive connection (until the kubelet rotates it), so the token's claims and the cache
//! key they make are worked out once per connection instead of once per request (the JSON
//! answer is written once per set of credentials, in [`Credentials`]). A memo lives and dies
//! with its connection: nothing in it crosses to another caller, and it holds at most one
//! token (no memory per cached identity).
//!
//! [`Credentials`]: crate::credentials::Credentials

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;

use crate::admission::Kept;
use crate::attribution::PodCgroup;
use crate::cache::{Held, Key, Subject};
use crate::credentials::Credentials;
use crate::token::{Parsed, TokenError};

/// One connection's memo.
#[derive(Debug, Default)]
pub struct ConnMemo(Mutex<Memo>);

#[derive(Debug, Default)]
struct Memo {
    /// The calling pod's cgroup (a connection's caller never changes) and until when the
    /// shared resolver's word for it holds.
    pod: Option<(Arc<PodCgroup>, Instant)>,
    token: Option<Parsed>,
    key: Option<MadeKey>,
    repeat: Option<Repeat>,
    /// The caller's request budget.
    budget: Kept,
}

/// The connection's last fresh hit, for the token the memo holds: what its next requests,
/// presenting that token, are answered with while the cache holds the same credentials (see
/// [`ConnMemo::repeat`]). Dropped when the memo takes another token.
#[derive(Debug)]
struct Repeat {
    /// The cache's word that the credentials are still the entry's, and fresh.
    held: Held,
    /// The credentials answered.
    creds: Arc<Credentials>,
    /// Their JSON, this connection's own copy, made on the first repeat: a clone of the
    /// cache's shared document is a count every connection of the pod writes.
    body: Option<Bytes>,
}

/// What a repeated request gets.
#[derive(Debug, PartialEq)]
pub enum Repeated {
    /// The last answer again.
    Answer(Bytes),
    /// Nothing: the pod is over its request budget.
    OverBudget,
}

/// A cache key and what it was made from: (token, the pod's uid for a pod's key), the key and
/// the subject the token names (pods' keys).
type MadeKey = (Arc<str>, Option<Arc<str>>, CacheKey);

/// The cache key of a request and, for a pod's entry, the subject its token names.
pub type CacheKey = (Arc<Key>, Option<Arc<Subject>>);

impl ConnMemo {
    fn lock(&self) -> std::sync::MutexGuard<'_, Memo> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The calling pod's cgroup: from `resolve` (the node-wide resolver, behind its lock) on
    /// the first request and again once `recheck` has passed (a removed cgroup must stop
    /// resolving), from the memo in between.
    pub fn pod(
        &self,
        now: Instant,
        recheck: Duration,
        resolve: impl FnOnce() -> Option<Arc<PodCgroup>>,
    ) -> Option<Arc<PodCgroup>> {
        if let Some((pod, until)) = &self.lock().pod {
            if now < *until {
                return Some(pod.clone());
            }
        }
        let pod = resolve();
        self.lock().pod = pod.clone().map(|p| (p, now + recheck));
        pod
    }

    /// What the token in `header` (`Authorization`) says, checked and parsed once per
    /// connection: its bytes are compared with the connection's last token before anything
    /// else looks at them, then offered to `recall` (the calling pod's cache entry, which
    /// knows the pod's last token), and parsed only when neither knows them. Its time window
    /// is checked against `now` (epoch seconds) on every call, so an expired token is refused
    /// on a live connection.
    pub fn token(
        &self,
        header: Option<&HeaderValue>,
        now: i64,
        recall: impl FnOnce(&[u8]) -> Option<Parsed>,
    ) -> Result<Parsed, TokenError> {
        let bytes = header.map_or(&[][..], HeaderValue::as_bytes);
        let remembered = self
            .lock()
            .token
            .clone()
            .filter(|p| p.token.as_bytes() == bytes);
        let parsed = match remembered {
            Some(p) => p,
            None => {
                let p = match recall(bytes) {
                    Some(p) => p,
                    None => {
                        let token = header
                            .map(HeaderValue::to_str)
                            .transpose()
                            .map_err(|_| TokenError::Malformed("token is not ASCII"))?
                            .unwrap_or_default();
                        Parsed::new(token)?
                    }
                };
                let mut memo = self.lock();
                memo.token = Some(p.clone());
                // A hit is repeated only for the token it answered.
                memo.repeat = None;
                p
            }
        };
        parsed.facts.check_window(now)?;
        Ok(parsed)
    }

    /// `admit` with the caller's budget as the connection keeps it.
    pub fn admit(&self, admit: impl FnOnce(&mut Kept) -> bool) -> bool {
        admit(&mut self.lock().budget)
    }

    /// Keeps a fresh hit of the memo's token (`held`, `creds`) to answer the connection's
    /// next requests with.
    pub fn remember(&self, held: Held, creds: Arc<Credentials>) {
        self.lock().repeat = Some(Repeat {
            held,
            creds,
            body: None,
        });
    }

    /// The last answer again, for a request presenting the same token (`header`) while
    /// everything the full path would check still says what it said then: the pod's cgroup
    /// is within its recheck, the token within its window (`epoch` reads the wall clock, only
    /// when it is needed), the cache's credentials the same and fresh at `now`. Then `admit`
    /// charges the pod's budget (its uid, the kept bucket; with the hit, so the cache can
    /// count it) and decides. `None` (nothing charged) sends the request down the full path,
    /// which gives each refusal its own answer.
    pub fn repeat(
        &self,
        header: Option<&HeaderValue>,
        now: Instant,
        epoch: impl FnOnce() -> i64,
        admit: impl FnOnce(&str, &mut Kept, &mut Held) -> bool,
    ) -> Option<Repeated> {
        let mut memo = self.lock();
        let Memo {
            pod,
            token,
            repeat,
            budget,
            ..
        } = &mut *memo;
        let (repeat, parsed) = (repeat.as_mut()?, token.as_ref()?);
        let uid = match pod {
            Some((pod, until)) if now < *until => pod.pod_uid.as_deref()?,
            _ => return None,
        };
        let same_token = header.is_some_and(|h| h.as_bytes() == parsed.token.as_bytes());
        if !same_token
            || parsed.facts.check_window(epoch()).is_err()
            || !repeat.held.holds(tokio::time::Instant::from_std(now))
        {
            return None;
        }
        if !admit(uid, budget, &mut repeat.held) {
            return Some(Repeated::OverBudget);
        }
        let creds = &repeat.creds;
        let body = repeat
            .body
            .get_or_insert_with(|| Bytes::copy_from_slice(&creds.to_json()));
        Some(Repeated::Answer(body.clone()))
    }

    /// The cache key for `parsed` from pod `uid` (or, without one, the token's own key).
    pub fn key(&self, parsed: &Parsed, uid: Option<&Arc<str>>) -> CacheKey {
        if let Some((token, for_uid, key)) = &self.lock().key {
            if Arc::ptr_eq(token, &parsed.token) && for_uid.as_ref() == uid {
                return key.clone();
            }
        }
        let key: CacheKey = match uid {
            Some(uid) => (
                Arc::new(Key::for_pod(uid.clone())),
                Some(parsed.facts.subject.clone()),
            ),
            None => (Arc::new(Key::for_token(&parsed.token)), None),
        };
        self.lock().key = Some((parsed.token.clone(), uid.cloned(), key.clone()));
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::test_token;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    fn header(token: &[u8]) -> HeaderValue {
        HeaderValue::from_bytes(token).unwrap()
    }

    fn no_recall(_: &[u8]) -> Option<Parsed> {
        None
    }

    #[test]
    fn a_recalled_token_is_not_parsed_and_garbage_is_never_recalled_into_a_connection() {
        let token = test_token(UID, 1_000);
        let known = Parsed::new(&token).unwrap();
        let memo = ConnMemo::default();
        let recall = |bytes: &[u8]| (bytes == known.token.as_bytes()).then(|| known.clone());
        let got = memo
            .token(Some(&header(token.as_bytes())), 500, recall)
            .unwrap();
        assert!(
            Arc::ptr_eq(&got.facts, &known.facts),
            "recalled, not parsed"
        );
        assert!(
            Arc::ptr_eq(&got.token, &known.token),
            "the entry's bytes, shared"
        );
        // Recalled or not, the window is checked.
        assert_eq!(
            ConnMemo::default()
                .token(Some(&header(token.as_bytes())), 1_000, recall)
                .unwrap_err(),
            TokenError::Expired
        );
        // Bytes the recall does not know are parsed (and refused when they are garbage).
        let other = test_token("11111111-2222-3333-4444-555555555555", 1_000);
        let parsed = ConnMemo::default()
            .token(Some(&header(other.as_bytes())), 500, recall)
            .unwrap();
        assert_eq!(
            parsed.facts.pod_uid.as_deref(),
            Some("11111111-2222-3333-4444-555555555555")
        );
        assert!(ConnMemo::default()
            .token(Some(&header(b"x.y.z")), 500, recall)
            .is_err());
    }

    #[test]
    fn a_token_is_parsed_once_but_its_window_checked_every_time() {
        let memo = ConnMemo::default();
        let token = test_token(UID, 1_000);
        let a = memo
            .token(Some(&header(token.as_bytes())), 500, no_recall)
            .unwrap();
        let b = memo
            .token(Some(&header(token.as_bytes())), 600, no_recall)
            .unwrap();
        assert!(Arc::ptr_eq(&a.facts, &b.facts), "parsed once");
        assert_eq!(
            memo.token(Some(&header(token.as_bytes())), 1_000, no_recall)
                .unwrap_err(),
            TokenError::Expired
        );
        // A rotated token replaces it; garbage is refused and forgets nothing.
        let rotated = test_token(UID, 2_000);
        let c = memo
            .token(Some(&header(rotated.as_bytes())), 1_500, no_recall)
            .unwrap();
        assert_eq!(c.facts.exp, Some(2_000));
        assert!(memo
            .token(Some(&header(b"x.y.z")), 1_500, no_recall)
            .is_err());
        // Bytes that are not text: refused as before, whatever came earlier; no token at all
        // is a missing one.
        assert_eq!(
            memo.token(None, 1_500, no_recall).unwrap_err(),
            TokenError::Empty
        );
        for bad in [&b"a\x80.b.c"[..], b"a\xff.b.c"] {
            assert_eq!(
                memo.token(Some(&header(bad)), 1_500, no_recall)
                    .unwrap_err(),
                TokenError::Malformed("token is not ASCII")
            );
        }
        assert!(Arc::ptr_eq(
            &memo
                .token(Some(&header(rotated.as_bytes())), 1_500, no_recall)
                .unwrap()
                .facts,
            &c.facts
        ));
    }

    #[test]
    fn a_connections_pod_is_resolved_once_per_recheck() {
        let memo = ConnMemo::default();
        let calls = std::cell::Cell::new(0);
        let pod = Arc::new(PodCgroup {
            path: Arc::from(std::path::Path::new("/sys/fs/cgroup/kubepods/pod-a")),
            pod_uid: Some(Arc::from(UID)),
        });
        let resolve = || {
            calls.set(calls.get() + 1);
            Some(pod.clone())
        };
        let (t0, minute) = (Instant::now(), Duration::from_secs(60));
        for s in 0..3 {
            assert!(memo
                .pod(t0 + Duration::from_secs(s), minute, resolve)
                .is_some());
        }
        assert_eq!(calls.get(), 1, "the memo answered the later requests");
        // Past the recheck the resolver is asked again; a pod it no longer knows is gone.
        let later = t0 + minute;
        assert!(memo.pod(later, minute, || None).is_none());
        assert!(memo.pod(later, minute, || None).is_none());
        assert!(memo.pod(later, minute, resolve).is_some());
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn keys_follow_the_token_and_the_uid() {
        let memo = ConnMemo::default();
        let parsed = memo
            .token(
                Some(&header(test_token(UID, 1_000).as_bytes())),
                0,
                no_recall,
            )
            .unwrap();
        let uid: Arc<str> = Arc::from(UID);
        let (k1, subject) = memo.key(&parsed, Some(&uid));
        assert!(Arc::ptr_eq(&k1, &memo.key(&parsed, Some(&uid)).0));
        assert_eq!(*k1, Key::for_pod(UID));
        assert_eq!(subject.as_deref(), Some(&*parsed.facts.subject));
        let other: Arc<str> = Arc::from("11111111-2222-3333-4444-555555555555");
        assert_ne!(*memo.key(&parsed, Some(&other)).0, *k1);
        let (token_key, none) = memo.key(&parsed, None);
        assert_eq!((*token_key).clone(), Key::for_token(&parsed.token));
        assert_eq!(none, None);
    }
}

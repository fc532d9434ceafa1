//! The projected service-account token: shape checks and the (unverified) claims we use.
//!
//! The agent cannot verify the signature (EKS Auth does); the payload is untrusted input used
//! for expiry checks and, with kernel attribution, to name the pod the token claims to be.

use std::sync::Arc;

use base64::Engine as _;
use serde::Deserialize;

/// Largest token accepted; real projected tokens are about 1 KiB.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a token was refused before calling EKS Auth.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// No `Authorization` header, or an empty one.
    #[error("Service account token cannot be empty")]
    Empty,
    /// Over [`MAX_TOKEN_BYTES`].
    #[error("Service account token is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    /// Not three base64url segments with a JSON payload.
    #[error("Service account token cannot be parsed: {0}")]
    Malformed(&'static str),
    /// `exp` is in the past.
    #[error("Service account token failed basic claim validations: token is expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("Service account token failed basic claim validations: token is not valid yet")]
    NotYetValid,
}

/// Claims the agent reads from the token payload (serde skips every other claim without
/// building it).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Expiry, seconds since the epoch.
    pub exp: Option<i64>,
    /// Not-before, seconds since the epoch.
    pub nbf: Option<i64>,
    /// The Kubernetes block naming namespace, service account and pod.
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: Option<KubernetesClaims>,
}

/// The `kubernetes.io` claim.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct KubernetesClaims {
    /// Pod namespace.
    pub namespace: Option<String>,
    /// The pod the token was issued for.
    pub pod: Option<PodRef>,
    /// The service account.
    pub serviceaccount: Option<AccountRef>,
}

/// The `pod` object of the `kubernetes.io` claim.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct PodRef {
    /// Pod UID.
    pub uid: Option<String>,
}

/// The `serviceaccount` object of the `kubernetes.io` claim.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct AccountRef {
    /// Service account name.
    pub name: Option<String>,
}

/// The namespace and service account a pod's token names (unverified until EKS Auth
/// accepts it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Subject {
    /// Namespace from the token.
    pub namespace: String,
    /// Service account from the token.
    pub service_account: String,
}

impl Subject {
    /// The subject `claims` name.
    pub fn of(claims: &Claims) -> Self {
        let k8s = claims.kubernetes.as_ref();
        Subject {
            namespace: k8s.and_then(|k| k.namespace.clone()).unwrap_or_default(),
            service_account: k8s
                .and_then(|k| k.serviceaccount.as_ref()?.name.clone())
                .unwrap_or_default(),
        }
    }
}

/// What the agent keeps of a token once its shape is checked: its time window, the pod it
/// names and its subject (the rest of the claims is dropped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// Expiry, seconds since the epoch.
    pub exp: Option<i64>,
    /// Not-before, seconds since the epoch.
    pub nbf: Option<i64>,
    /// The pod UID the token names.
    pub pod_uid: Option<Arc<str>>,
    /// The namespace and service account it names.
    pub subject: Arc<Subject>,
}

impl From<Claims> for Facts {
    fn from(claims: Claims) -> Self {
        let subject = Arc::new(Subject::of(&claims));
        Facts {
            exp: claims.exp,
            nbf: claims.nbf,
            pod_uid: claims.kubernetes.and_then(|k| k.pod?.uid).map(Arc::from),
            subject,
        }
    }
}

impl Facts {
    /// Checks `exp` and `nbf` against `now` (epoch seconds).
    pub fn check_window(&self, now: i64) -> Result<(), TokenError> {
        if self.exp.is_some_and(|exp| exp <= now) {
            return Err(TokenError::Expired);
        }
        if self.nbf.is_some_and(|nbf| nbf > now) {
            return Err(TokenError::NotYetValid);
        }
        Ok(())
    }
}

/// A token's bytes and what they say, shared by whoever holds the same token (a
/// connection's requests, a pod's cache entry).
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The token as presented.
    pub token: Arc<str>,
    /// What its claims say (shape checked; the time window is checked on every use).
    pub facts: Arc<Facts>,
}

impl Parsed {
    /// Checks `token`'s shape and keeps what it says (no clock: see [`parse_shape`]).
    pub fn new(token: &str) -> Result<Self, TokenError> {
        Ok(Parsed {
            facts: Arc::new(parse_shape(token)?.into()),
            token: Arc::from(token),
        })
    }
}

/// Seconds since the Unix epoch by the wall clock (0 if the clock is before 1970): the one
/// place wall-clock time is read, for token windows and credential expiry.
pub fn epoch_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Checks the token's shape and time window (`now` in epoch seconds) and returns what it says.
pub fn parse(token: &str, now: i64) -> Result<Facts, TokenError> {
    let facts = Facts::from(parse_shape(token)?);
    facts.check_window(now)?;
    Ok(facts)
}

/// Checks the token's shape and returns its claims, without looking at the clock: what a
/// token's bytes say never changes, so this may be remembered per token.
pub fn parse_shape(token: &str) -> Result<Claims, TokenError> {
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "token contains an invalid number of segments",
        ));
    };
    if header.is_empty() || signature.is_empty() {
        return Err(TokenError::Malformed("token has an empty segment"));
    }
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = engine
        .decode(header)
        .map_err(|_| TokenError::Malformed("header is not base64url"))?;
    // Checked for shape only (valid JSON, an object), without building it: this is the hot path.
    let is_object = header.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if !is_object || serde_json::from_slice::<serde::de::IgnoredAny>(&header).is_err() {
        return Err(TokenError::Malformed("header is not a JSON object"));
    }
    let payload = engine
        .decode(payload)
        .map_err(|_| TokenError::Malformed("payload is not base64url"))?;
    serde_json::from_slice(&payload)
        .map_err(|_| TokenError::Malformed("payload is not a JSON object of claims"))
}

/// A projected-token-shaped JWT (unsigned) naming pod `uid` in `ns`/`sa`, expiring at `exp`:
/// for unit tests of code that reads claims.
#[cfg(test)]
pub(crate) fn test_token(uid: &str, exp: i64) -> String {
    test_token_for(uid, "sa", exp)
}

/// A token-shaped JWT for pod `uid` naming service account `sa` (in namespace `ns`).
#[cfg(test)]
pub(crate) fn test_token_for(uid: &str, sa: &str, exp: i64) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let payload = format!(
        r#"{{"exp":{exp},"kubernetes.io":{{"namespace":"ns","pod":{{"name":"p","uid":"{uid}"}},"serviceaccount":{{"name":"{sa}"}}}}}}"#
    );
    format!("{}.{}.c2ln", b64(r#"{"alg":"RS256"}"#), b64(&payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    fn jwt(payload: &str) -> String {
        format!("{}.{}.c2ln", b64(r#"{"alg":"RS256"}"#), b64(payload))
    }

    #[test]
    fn reads_pod_claims() {
        let t = jwt(r#"{"exp":200,"nbf":50,"sub":"system:serviceaccount:ns:sa",
            "kubernetes.io":{"namespace":"ns","pod":{"name":"p","uid":"u-1"},
            "serviceaccount":{"name":"sa","uid":"s-1"}}}"#);
        let c = parse(&t, 100).unwrap();
        assert_eq!(c.pod_uid.as_deref(), Some("u-1"));
        assert_eq!(c.subject.namespace, "ns");
        assert_eq!(c.subject.service_account, "sa");
    }

    #[test]
    fn refuses_bad_tokens_with_precise_errors() {
        let cases: &[(&str, TokenError)] = &[
            ("", TokenError::Empty),
            (
                "abc",
                TokenError::Malformed("token contains an invalid number of segments"),
            ),
            (
                "a.b.c.d",
                TokenError::Malformed("token contains an invalid number of segments"),
            ),
            (
                ".e30.c2ln",
                TokenError::Malformed("token has an empty segment"),
            ),
            (
                "!!.e30.c2ln",
                TokenError::Malformed("header is not base64url"),
            ),
        ];
        for (token, want) in cases {
            assert_eq!(parse(token, 100).as_ref(), Err(want), "{token:?}");
        }
        for header in ["[1]", "{", "nope", " {\"alg\":1"] {
            let t = format!("{}.{}.c2ln", b64(header), b64("{}"));
            assert_eq!(
                parse(&t, 100),
                Err(TokenError::Malformed("header is not a JSON object")),
                "{header}"
            );
        }
        assert_eq!(parse(&jwt(r#"{"exp":99}"#), 100), Err(TokenError::Expired));
        assert_eq!(
            parse(&jwt(r#"{"nbf":101}"#), 100),
            Err(TokenError::NotYetValid)
        );
        assert_eq!(
            parse(&jwt(r#"[1,2]"#), 100),
            Err(TokenError::Malformed(
                "payload is not a JSON object of claims"
            ))
        );
        assert_eq!(
            parse(&jwt(r#"{"exp":"soon"}"#), 100),
            Err(TokenError::Malformed(
                "payload is not a JSON object of claims"
            ))
        );
        assert_eq!(
            parse(&"a".repeat(MAX_TOKEN_BYTES + 1), 100),
            Err(TokenError::TooLarge)
        );
    }
}

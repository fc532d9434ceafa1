//! A token issuer standing in for the API server: mints projected-token-shaped RS256 JWTs
//! (claims per docs/protocol.md §3) with a key made for this run.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};

/// The audience EKS Pod Identity tokens carry.
pub const AUDIENCE: &str = "pods.eks.amazonaws.com";
/// The issuer URL put in `iss`.
pub const ISSUER: &str = "https://oidc.eks.sandbox.example/id/TEST";

/// Who a token is for.
#[derive(Debug, Clone)]
pub struct TokenSubject {
    /// Pod namespace.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
    /// Pod name.
    pub pod_name: String,
    /// Pod UID.
    pub pod_uid: String,
}

impl TokenSubject {
    /// The subject naming pod `pod_name` (`pod_uid`) of `namespace`, as `service_account`.
    pub fn new(namespace: &str, service_account: &str, pod_name: &str, pod_uid: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
            pod_name: pod_name.into(),
            pod_uid: pod_uid.into(),
        }
    }
}

/// Signs tokens; the fake EKS Auth verifies them with [`Issuer::decoding_key`].
pub struct Issuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issuer")
    }
}

impl Issuer {
    /// A fresh RSA-2048 key.
    pub fn new() -> Result<Self> {
        let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .map_err(|_| anyhow::anyhow!("RSA key generation failed"))?;
        let der = AsDer::<Pkcs8V1Der>::as_der(&kp).map_err(|_| anyhow::anyhow!("key DER"))?;
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(der.as_ref())
        );
        Ok(Self {
            encoding: EncodingKey::from_rsa_pem(pem.as_bytes()).context("encoding key")?,
            decoding: DecodingKey::from_rsa_der(kp.public_key().as_ref()),
        })
    }

    /// The public half, for verification.
    pub fn decoding_key(&self) -> DecodingKey {
        self.decoding.clone()
    }

    /// A token for `who`, valid from now for `lifetime`.
    pub fn mint(&self, who: &TokenSubject, lifetime: Duration) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        self.mint_window(who, now, now + lifetime.as_secs())
    }

    /// A token valid over `[nbf, exp)` (epoch seconds), e.g. an expired one.
    pub fn mint_window(&self, who: &TokenSubject, nbf: u64, exp: u64) -> String {
        let claims = serde_json::json!({
            "aud": [AUDIENCE],
            "exp": exp,
            "iat": nbf,
            "nbf": nbf,
            "iss": ISSUER,
            "jti": format!("{}-{nbf}", who.pod_uid),
            "sub": format!("system:serviceaccount:{}:{}", who.namespace, who.service_account),
            "kubernetes.io": {
                "namespace": who.namespace,
                "node": {"name": "sandbox-node", "uid": "00000000-0000-0000-0000-0000000000aa"},
                "pod": {"name": who.pod_name, "uid": who.pod_uid},
                "serviceaccount": {"name": who.service_account, "uid": "00000000-0000-0000-0000-0000000000bb"},
            },
        });
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("sandbox".into());
        jsonwebtoken::encode(&header, &claims, &self.encoding).expect("RS256 signing works")
    }
}

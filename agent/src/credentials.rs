//! What the agent hands to pods: the credentials document and the error document.

use aws_sdk_eksauth::primitives::{DateTime, DateTimeFormat};
use serde::{Deserialize, Serialize};

/// Temporary IAM credentials for one pod identity, held as the document pods are answered
/// with: serialised once when they arrive, so a request (and a new connection) only clones a
/// reference to it, and the credentials are in memory once.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The JSON answer (`AccessKeyId`, `SecretAccessKey`, `Token`, `AccountId`, `Expiration`).
    document: bytes::Bytes,
    /// Expiry, seconds since the epoch.
    pub expiration_epoch_secs: u64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key id only: the document holds the secret key and the session token.
        f.debug_struct("Credentials")
            .field("access_key_id", &self.fields().access_key_id)
            .field("expiration_epoch_secs", &self.expiration_epoch_secs)
            .finish_non_exhaustive()
    }
}

/// The success body every SDK accepts (exact key casing, UTC `Z` expiration).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialsDocument<'a> {
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    account_id: &'a str,
    expiration: String,
}

/// The credentials' parts, read back from the document (a handover, tests).
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct CredentialsFields {
    /// `ASIA…` key id.
    pub access_key_id: String,
    /// Secret key; never logged.
    pub secret_access_key: String,
    /// Session token; never logged.
    #[serde(rename = "Token")]
    pub session_token: String,
    /// Account of the assumed role ("" when the ARN has none).
    pub account_id: String,
}

impl Credentials {
    /// Credentials from their parts; the document is written here, once.
    pub fn new(
        access_key_id: String,
        secret_access_key: String,
        session_token: String,
        account_id: String,
        expiration_epoch_secs: u64,
    ) -> Self {
        let secs = i64::try_from(expiration_epoch_secs).unwrap_or(i64::MAX);
        let expiration = DateTime::from_secs(secs)
            .fmt(DateTimeFormat::DateTime)
            .unwrap_or_else(|_| "9999-12-31T23:59:59Z".to_owned());
        let document = serde_json::to_vec(&CredentialsDocument {
            access_key_id: &access_key_id,
            secret_access_key: &secret_access_key,
            token: &session_token,
            account_id: &account_id,
            expiration,
        })
        .expect("serialising strings cannot fail");
        Self {
            // Fitted: a `Vec` grown while serialising holds up to twice the document.
            document: document.into_boxed_slice().into(),
            expiration_epoch_secs,
        }
    }

    /// The JSON body pods are answered with (a reference, not a copy).
    pub fn to_json(&self) -> bytes::Bytes {
        self.document.clone()
    }

    /// The parts, parsed back from the document.
    pub fn fields(&self) -> CredentialsFields {
        serde_json::from_slice(&self.document).unwrap_or_default()
    }
}

/// The error body: both casings so Go, Java and JS SDKs all read it.
#[derive(Serialize)]
struct ErrorDocument<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(rename = "Code")]
    code_upper: &'a str,
    #[serde(rename = "Message")]
    message_upper: &'a str,
}

/// Serialises the JSON body of an error answer.
pub fn error_json(code: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&ErrorDocument {
        code,
        message,
        code_upper: code,
        message_upper: message,
    })
    .expect("serialising strings cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_has_sdk_casing_and_utc_expiration() {
        let c = Credentials::new(
            "ASIAX".into(),
            "s".into(),
            "t".into(),
            "123456789012".into(),
            1_767_247_200,
        );
        let v: serde_json::Value = serde_json::from_slice(&c.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"AccessKeyId":"ASIAX","SecretAccessKey":"s","Token":"t",
                "AccountId":"123456789012","Expiration":"2026-01-01T06:00:00Z"})
        );
        assert!(!format!("{c:?}").contains("\"s\""));
        assert!(!format!("{c:?}").contains("\"t\""));
        assert_eq!(
            c.fields(),
            CredentialsFields {
                access_key_id: "ASIAX".into(),
                secret_access_key: "s".into(),
                session_token: "t".into(),
                account_id: "123456789012".into(),
            }
        );
    }

    #[test]
    fn error_document_has_both_casings() {
        let v: serde_json::Value = serde_json::from_slice(&error_json("C", "m")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code":"C","message":"m","Code":"C","Message":"m"})
        );
    }
}

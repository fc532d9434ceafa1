//! What the agent hands to pods: the credentials document and the error document.

use aws_sdk_eksauth::primitives::{DateTime, DateTimeFormat};
use serde::Serialize;

/// Temporary IAM credentials for one pod identity.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `ASIA…` key id.
    pub access_key_id: String,
    /// Secret key; never logged.
    pub secret_access_key: String,
    /// Session token; never logged.
    pub session_token: String,
    /// Account of the assumed role ("" when the ARN has none).
    pub account_id: String,
    /// Expiry, seconds since the epoch.
    pub expiration_epoch_secs: u64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"** redacted **")
            .field("session_token", &"** redacted **")
            .field("account_id", &self.account_id)
            .field("expiration_epoch_secs", &self.expiration_epoch_secs)
            .finish()
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

impl Credentials {
    /// Credentials from their parts.
    pub fn new(
        access_key_id: String,
        secret_access_key: String,
        session_token: String,
        account_id: String,
        expiration_epoch_secs: u64,
    ) -> Self {
        Self {
            access_key_id,
            secret_access_key,
            session_token,
            account_id,
            expiration_epoch_secs,
        }
    }

    /// The JSON body of a 200 answer. Not memoised: at 10,000 cached identities the stored
    /// documents cost more memory (about 0.8 KiB each) than serialising costs time.
    pub fn to_json(&self) -> bytes::Bytes {
        bytes::Bytes::from(self.serialize())
    }

    fn serialize(&self) -> Vec<u8> {
        let secs = i64::try_from(self.expiration_epoch_secs).unwrap_or(i64::MAX);
        let expiration = DateTime::from_secs(secs)
            .fmt(DateTimeFormat::DateTime)
            .unwrap_or_else(|_| "9999-12-31T23:59:59Z".to_owned());
        serde_json::to_vec(&CredentialsDocument {
            access_key_id: &self.access_key_id,
            secret_access_key: &self.secret_access_key,
            token: &self.session_token,
            account_id: &self.account_id,
            expiration,
        })
        .expect("serialising strings cannot fail")
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

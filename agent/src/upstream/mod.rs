//! The EKS Auth client: `AssumeRoleForPodIdentity` through `aws-sdk-eksauth`.

pub mod pacing;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_credential_types::provider::{future, ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_eksauth::config::retry::RetryConfig;
use aws_sdk_eksauth::config::timeout::TimeoutConfig;
use aws_sdk_eksauth::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_eksauth::operation::assume_role_for_pod_identity::AssumeRoleForPodIdentityError;

use crate::credentials::Credentials;

/// How an EKS Auth call failed, classified for the pod.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// EKS Auth refused the request for good (bad token, access denied, bad parameter): 400.
    #[error("EKS Auth refused the request ({code}): {message}")]
    Rejected {
        /// EKS Auth's error code, e.g. `InvalidTokenException`.
        code: String,
        /// EKS Auth's message.
        message: String,
    },
    /// No Pod Identity association for the token's service account: 404.
    #[error("EKS Auth found no pod identity association ({code}): {message}")]
    NotFound {
        /// EKS Auth's error code.
        code: String,
        /// EKS Auth's message.
        message: String,
    },
    /// Throttling, 5xx, timeouts, connection failures: 503 so every SDK retries.
    #[error("EKS Auth is unavailable ({code}): {message}")]
    Unavailable {
        /// EKS Auth's error code, or a local one such as `Timeout`.
        code: String,
        /// What happened.
        message: String,
    },
    /// A 200 answer without the members the API promises.
    #[error("EKS Auth answered without {0}")]
    Incomplete(&'static str),
}

impl UpstreamError {
    /// EKS Auth's error code (or ours for local failures).
    pub fn code(&self) -> &str {
        match self {
            Self::Rejected { code, .. }
            | Self::NotFound { code, .. }
            | Self::Unavailable { code, .. } => code,
            Self::Incomplete(_) => "IncompleteResponse",
        }
    }

    /// Metric label.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Rejected { .. } => "rejected",
            Self::NotFound { .. } => "not_found",
            Self::Unavailable { .. } | Self::Incomplete(_) => "unavailable",
        }
    }

    /// Whether retrying the same token cannot help (drop cached credentials, cache the error).
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Rejected { .. } | Self::NotFound { .. })
    }
}

/// A configured EKS Auth client for one cluster.
#[derive(Clone, Debug)]
pub struct EksAuth {
    client: aws_sdk_eksauth::Client,
    cluster_name: String,
}

/// Options for [`EksAuth::from_env`].
#[derive(Debug, Clone)]
pub struct EksAuthOptions {
    /// The cluster the pods belong to.
    pub cluster_name: String,
    /// Endpoint override (`--endpoint`).
    pub endpoint: Option<String>,
    /// Bound of one operation, retries included.
    pub operation_timeout: Duration,
    /// Sign with the shared credentials file's default profile, re-read at this interval
    /// (`--rotate-credentials`, for hybrid nodes without IMDS).
    pub rotate_credentials: Option<Duration>,
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// No region in the environment or the default provider chain.
    #[error("no AWS region configured: set AWS_REGION")]
    NoRegion,
}

impl EksAuth {
    /// Builds the client from the default provider chains (region, signing credentials,
    /// `AWS_ENDPOINT_URL_EKS_AUTH`), with `--endpoint` taking precedence.
    pub async fn from_env(opts: EksAuthOptions) -> Result<Self, SetupError> {
        let sdk = aws_config::defaults(BehaviorVersion::latest()).load().await;
        if sdk.region().is_none() {
            return Err(SetupError::NoRegion);
        }
        // No SDK retries: the cache retries by one policy (`pacing`), paced to what EKS Auth
        // grants; a second layer here would multiply attempts when EKS Auth asks for fewer.
        let retry = RetryConfig::disabled();
        let mut builder = aws_sdk_eksauth::config::Builder::from(&sdk)
            .retry_config(retry)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(1))
                    .operation_timeout(opts.operation_timeout)
                    .build(),
            );
        if let Some(endpoint) = opts.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        if let Some(interval) = opts.rotate_credentials {
            tracing::info!(?interval, "credentials rotation enabled: signing with the shared credentials file's default profile");
            builder = builder.credentials_provider(SharedCredentialsProvider::new(
                RotatingSharedCredentials { interval },
            ));
        }
        Ok(Self {
            client: aws_sdk_eksauth::Client::from_conf(builder.build()),
            cluster_name: opts.cluster_name,
        })
    }

    /// Exchanges a pod's token for credentials.
    pub async fn assume_role(&self, token: &str) -> Result<Credentials, UpstreamError> {
        let out = self
            .client
            .assume_role_for_pod_identity()
            .cluster_name(&self.cluster_name)
            .token(token)
            .send()
            .await
            .map_err(classify)?;
        // The SDK fills absent required members with defaults: check what matters.
        let creds = out
            .credentials()
            .filter(|c| {
                !c.access_key_id().is_empty()
                    && !c.secret_access_key().is_empty()
                    && !c.session_token().is_empty()
            })
            .ok_or(UpstreamError::Incomplete("credentials"))?;
        let role_arn = out
            .assumed_role_user()
            .map(|u| u.arn())
            .ok_or(UpstreamError::Incomplete("assumedRoleUser"))?;
        let expiration = creds
            .expiration()
            .to_millis()
            .ok()
            .and_then(|ms| u64::try_from(ms / 1000).ok())
            .filter(|&exp| exp as f64 > crate::token::epoch_secs())
            .ok_or(UpstreamError::Incomplete("a valid expiration"))?;
        Ok(Credentials::new(
            creds.access_key_id().to_owned(),
            creds.secret_access_key().to_owned(),
            creds.session_token().to_owned(),
            account_from_arn(role_arn).unwrap_or_default().to_owned(),
            expiration,
        ))
    }
}

/// Exchanges a token for credentials (EKS Auth in production, fakes in tests).
pub trait Fetcher: Send + Sync + 'static {
    /// One upstream call.
    fn fetch(
        &self,
        token: String,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Credentials, UpstreamError>> + Send>,
    >;
}

impl Fetcher for EksAuth {
    fn fetch(
        &self,
        token: String,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Credentials, UpstreamError>> + Send>,
    > {
        let this = self.clone();
        Box::pin(async move { this.assume_role(&token).await })
    }
}

/// Signing credentials from the shared credentials file's `default` profile, handed out
/// with an expiry of `interval` so the SDK's identity cache re-reads the file that often
/// (the reference agent's RotatingSharedCredentialsProvider).
#[derive(Debug)]
struct RotatingSharedCredentials {
    interval: Duration,
}

impl ProvideCredentials for RotatingSharedCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            // A new provider each time: it parses the file afresh.
            let from_file = aws_config::profile::ProfileFileCredentialsProvider::builder()
                .profile_name("default")
                .build()
                .provide_credentials()
                .await?;
            Ok(aws_credential_types::Credentials::new(
                from_file.access_key_id(),
                from_file.secret_access_key(),
                from_file.session_token().map(str::to_owned),
                Some(std::time::SystemTime::now() + self.interval),
                "RotatingSharedCredentials",
            ))
        })
    }
}

/// The account of an ARN (`arn:partition:service:region:account:resource`).
pub fn account_from_arn(arn: &str) -> Option<&str> {
    let account = arn.split(':').nth(4)?;
    (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit())).then_some(account)
}

fn classify(err: SdkError<AssumeRoleForPodIdentityError>) -> UpstreamError {
    match &err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            let e = ctx.err();
            let code = e.code().unwrap_or("UnknownError").to_owned();
            let message = e.message().unwrap_or("no message").to_owned();
            match (status, code.as_str()) {
                // A success status with a body the SDK could not read: the service misbehaved.
                (..400, _) => UpstreamError::Unavailable {
                    code: "InvalidResponse".into(),
                    message: format!("EKS Auth answered {status} with an unreadable body"),
                },
                (404, _) | (_, "ResourceNotFoundException") => {
                    UpstreamError::NotFound { code, message }
                }
                (429, _) | (_, "ThrottlingException") | (500.., _) => {
                    UpstreamError::Unavailable { code, message }
                }
                _ => UpstreamError::Rejected { code, message },
            }
        }
        SdkError::TimeoutError(_) => UpstreamError::Unavailable {
            code: "Timeout".into(),
            message: "EKS Auth did not answer in time".into(),
        },
        other => UpstreamError::Unavailable {
            code: "RequestFailed".into(),
            message: aws_sdk_eksauth::error::DisplayErrorContext(other).to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What classify makes of EKS Auth answering `status` with error `code`.
    fn service_error(status: u16, code: &str) -> UpstreamError {
        use aws_sdk_eksauth::config::http::HttpResponse;
        use aws_sdk_eksauth::error::ErrorMetadata;
        let err = AssumeRoleForPodIdentityError::generic(
            ErrorMetadata::builder().code(code).message("m").build(),
        );
        let raw = HttpResponse::new(
            status.try_into().unwrap(),
            aws_smithy_types::body::SdkBody::empty(),
        );
        classify(SdkError::service_error(err, raw))
    }

    #[test]
    fn eks_auth_errors_are_classified_by_status_and_code() {
        for (status, code, outcome, kept) in [
            (
                404,
                "ResourceNotFoundException",
                "not_found",
                "ResourceNotFoundException",
            ),
            (
                400,
                "ResourceNotFoundException",
                "not_found",
                "ResourceNotFoundException",
            ),
            (
                400,
                "InvalidTokenException",
                "rejected",
                "InvalidTokenException",
            ),
            (
                403,
                "AccessDeniedException",
                "rejected",
                "AccessDeniedException",
            ),
            (
                400,
                "InvalidParameterException",
                "rejected",
                "InvalidParameterException",
            ),
            (429, "TooManyRequests", "unavailable", "TooManyRequests"),
            (
                400,
                "ThrottlingException",
                "unavailable",
                "ThrottlingException",
            ),
            (
                500,
                "InternalServerException",
                "unavailable",
                "InternalServerException",
            ),
            (
                503,
                "ServiceUnavailableException",
                "unavailable",
                "ServiceUnavailableException",
            ),
            (200, "Whatever", "unavailable", "InvalidResponse"),
        ] {
            let e = service_error(status, code);
            assert_eq!((e.outcome(), e.code()), (outcome, kept), "{status} {code}");
            assert_eq!(
                e.is_permanent(),
                outcome != "unavailable",
                "{status} {code}"
            );
        }
        let timeout = classify(SdkError::timeout_error("slow"));
        assert_eq!(
            (timeout.outcome(), timeout.code()),
            ("unavailable", "Timeout")
        );
        let failed = classify(SdkError::construction_failure("no endpoint"));
        assert_eq!(
            (failed.outcome(), failed.code()),
            ("unavailable", "RequestFailed")
        );
    }

    #[test]
    fn account_comes_from_the_role_arn() {
        assert_eq!(
            account_from_arn("arn:aws:sts::123456789012:assumed-role/R/s"),
            Some("123456789012")
        );
        assert_eq!(account_from_arn("arn:aws:sts::12:assumed-role/R/s"), None);
        assert_eq!(account_from_arn("nonsense"), None);
    }
}

//! Resolves credentials exactly as an application pod would: the Rust SDK's container
//! credentials provider, configured by AWS_CONTAINER_CREDENTIALS_FULL_URI and
//! AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE. Prints what it got as JSON, or the SDK's error.

use std::error::Error as _;
use std::process::ExitCode;

use aws_config::ecs::EcsCredentialsProvider;
use aws_credential_types::provider::ProvideCredentials;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let provider = EcsCredentialsProvider::builder().build();
    match provider.provide_credentials().await {
        Ok(c) => {
            let expiry = c
                .expiry()
                .and_then(|e| e.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            println!(
                "{}",
                serde_json::json!({
                    "access_key_id": c.access_key_id(),
                    "secret_access_key": c.secret_access_key(),
                    "session_token": c.session_token(),
                    "account_id": c.account_id().map(|a| a.as_str()),
                    "expiry": expiry,
                })
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            // The whole chain, as an application's log would show it.
            let mut msg = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

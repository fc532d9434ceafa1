//! Real clients run inside pods: curl and the Rust SDK's container credentials provider.

use std::process::Output;

use anyhow::{Context, Result};

use crate::sandbox::Sandbox;

/// The credential URL for IPv4 or IPv6.
pub fn credentials_url(ipv6: bool) -> &'static str {
    if ipv6 {
        "http://[fd00:ec2::23]/v1/credentials"
    } else {
        "http://169.254.170.23/v1/credentials"
    }
}

/// What curl got: status, body, and the peer port its socket reported.
#[derive(Debug)]
pub struct CurlResult {
    /// HTTP status (0 if none).
    pub status: u16,
    /// Response body.
    pub body: String,
    /// `%{remote_port}`: what `getpeername()` said the server's port was (0 if unconnected).
    pub peer_port: u16,
}

impl CurlResult {
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("body is not JSON: {}", self.body))
    }
}

/// curl from container `c` of pod `i`, with the pod's token and optional extra arguments.
pub fn curl(sb: &Sandbox, i: usize, c: usize, url: &str, extra: &[&str]) -> Result<CurlResult> {
    let token = std::fs::read_to_string(&sb.pods()[i].token_file)?;
    let out = sb
        .pod_command(i, c, "curl")?
        .args([
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code} %{remote_port}",
            "-H",
        ])
        .arg(format!("Authorization: {token}"))
        .args(extra)
        .arg(url)
        .output()
        .context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, trailer) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut trailer = trailer.split_whitespace().map(|n| n.parse().unwrap_or(0));
    Ok(CurlResult {
        status: trailer.next().unwrap_or(0),
        peer_port: trailer.next().unwrap_or(0),
        body: body.to_owned(),
    })
}

/// The `sdk-client` binary built beside the test binaries.
pub fn sdk_client_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/sdk-client
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("target dir");
    dir.join("sdk-client")
}

/// Runs the Rust SDK's container credentials provider in pod `i` against `url`.
pub fn sdk_client(sb: &Sandbox, i: usize, url: &str) -> Result<Output> {
    sb.pod_command(i, 0, sdk_client_bin())?
        .env_clear()
        .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", url)
        .env(
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            &sb.pods()[i].token_file,
        )
        .output()
        .context("running sdk-client")
}

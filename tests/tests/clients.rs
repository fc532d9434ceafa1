//! The client matrix: real SDK credential providers (Rust `aws-config`, botocore) and curl,
//! inside pod namespaces, over IPv4 and IPv6, against success, no association (404) and
//! EKS Auth failing (503). Asserts what each client itself reports, and how often it asked.

use std::process::Output;

use anyhow::{Context, Result};
use tests::agent::{scrape, Agent, CLUSTER};
use tests::cgroups::Driver;
use tests::clients::{credentials_url, curl, sdk_client};
use tests::fake_eks::{FakeEksAuth, Fault};
use tests::sandbox::{PodSpec, Sandbox};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    Rust,
    Botocore,
    Curl,
}

/// The virtualenv python `cargo xtask setup` made.
fn botocore_python() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python")
}

/// Runs `client` in pod `i`: Ok(credentials JSON) or Err(what the client reported).
fn fetch(
    sb: &Sandbox,
    i: usize,
    client: Client,
    ipv6: bool,
) -> Result<Result<serde_json::Value, String>> {
    let url = credentials_url(ipv6);
    let out: Output = match client {
        Client::Rust => sdk_client(sb, i, url)?,
        Client::Botocore => sb
            .pod_command(i, 0, botocore_python())?
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/clients/botocore_client.py"
            ))
            .env_clear()
            .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", url)
            .env(
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                &sb.pods()[i].token_file,
            )
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .context("running botocore")?,
        Client::Curl => {
            let got = curl(sb, i, 0, url, &[])?;
            return Ok(if got.status == 200 {
                let v = got.json()?;
                Ok(serde_json::json!({
                    "access_key_id": v["AccessKeyId"],
                    "secret_access_key": v["SecretAccessKey"],
                    "session_token": v["Token"],
                }))
            } else {
                Err(format!("HTTP {}: {}", got.status, got.body))
            });
        }
    };
    Ok(if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).context("client output")?)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

/// How many answers with `code` the agent has given so far.
fn answered(sb: &Sandbox, code: u16) -> Result<u64> {
    let text = scrape(sb)?;
    let prefix = format!("pod_identity_http_response{{code=\"{code}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0))
}

#[test]
fn every_client_resolves_credentials_and_reports_failures_over_both_families() -> Result<()> {
    let mut sb = Sandbox::new(Driver::Systemd)?;
    let fake = FakeEksAuth::start(sb.node(), CLUSTER, sb.issuer().decoding_key())?;
    fake.associate("app", "reader", "ReaderRole");
    let reader = sb.add_pod(PodSpec::new("app", "reader"))?;
    let stranger = sb.add_pod(PodSpec::new("app", "stranger"))?;
    // Asked only while EKS Auth fails, so it never has cached credentials to fall back on.
    let unlucky = sb.add_pod(PodSpec::new("app", "reader"))?;
    let _agent = Agent::start(
        &sb,
        &fake,
        &["--upstream-timeout", "1s", "--upstream-retry-window", "0s"],
    )?;

    for client in [Client::Rust, Client::Botocore, Client::Curl] {
        for ipv6 in [false, true] {
            let case = format!("{client:?} ipv6={ipv6}");
            // Success: the credentials EKS Auth issued, exactly.
            fake.set_fault(Fault::None);
            let got =
                fetch(&sb, reader, client, ipv6)?.map_err(|e| anyhow::anyhow!("{case}: {e}"))?;
            let want = fake.issued().last().cloned().context("nothing issued")?;
            assert_eq!(got["access_key_id"], want.access_key_id.as_str(), "{case}");
            assert_eq!(
                got["secret_access_key"],
                want.secret_access_key.as_str(),
                "{case}"
            );
            assert_eq!(got["session_token"], want.session_token.as_str(), "{case}");

            // No association: a 404 the client reports (botocore and curl show the reason).
            let before = answered(&sb, 404)?;
            let err = fetch(&sb, stranger, client, ipv6)?.expect_err("stranger got credentials");
            let asked = answered(&sb, 404)? - before;
            match client {
                Client::Rust => assert!(err.contains("StatusCode(404)"), "{case}: {err}"),
                Client::Botocore => assert!(
                    err.contains("404")
                        && err.contains(
                            "no Pod Identity association for service account app/stranger"
                        ),
                    "{case}: {err}"
                ),
                Client::Curl => assert!(
                    err.starts_with("HTTP 404") && err.contains("ResourceNotFoundException"),
                    "{case}: {err}"
                ),
            }
            // Retries as each client does them (botocore retries everything; Rust only 5xx).
            let want_asks = match client {
                Client::Botocore => 3,
                Client::Rust | Client::Curl => 1,
            };
            assert_eq!(asked, want_asks, "{case}: requests for one 404");

            // EKS Auth failing: 503, which every SDK retries.
            fake.set_fault(Fault::Status(500));
            let before = answered(&sb, 503)?;
            let err = fetch(&sb, unlucky, client, ipv6)?
                .expect_err("got credentials while EKS Auth fails");
            let asked = answered(&sb, 503)? - before;
            match client {
                Client::Rust => assert!(err.contains("503"), "{case}: {err}"),
                Client::Botocore => assert!(
                    err.contains("503") && err.contains("InternalServerException"),
                    "{case}: {err}"
                ),
                Client::Curl => assert!(err.starts_with("HTTP 503"), "{case}: {err}"),
            }
            let want_asks = match client {
                Client::Rust | Client::Botocore => 3,
                Client::Curl => 1,
            };
            assert_eq!(asked, want_asks, "{case}: requests for one 503");
        }
    }
    Ok(())
}

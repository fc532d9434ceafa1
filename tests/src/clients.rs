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

/// curl from container `c` of pod `i`, with the pod's token (unless `extra` sets an
/// `Authorization` header itself) and `extra` arguments.
pub fn curl(sb: &Sandbox, i: usize, c: usize, url: &str, extra: &[&str]) -> Result<CurlResult> {
    let token = std::fs::read_to_string(&sb.pods()[i].token_file)?;
    curl_in(sb.pod_command(i, c, "curl")?, &token, url, extra)
}

/// curl as `cmd` (a `curl` command placed in some cgroup and namespace), with `token`
/// (unless `extra` sets an `Authorization` header itself) and `extra` arguments.
pub fn curl_in(
    mut cmd: std::process::Command,
    token: &str,
    url: &str,
    extra: &[&str],
) -> Result<CurlResult> {
    let max_time = crate::slow::scaled(std::time::Duration::from_secs(10));
    cmd.args(["-sS", "--max-time", &max_time.as_secs().to_string()]);
    cmd.args(["-w", "\n%{http_code} %{remote_port}"]);
    if !extra.iter().any(|a| a.starts_with("Authorization")) {
        cmd.arg("-H").arg(format!("Authorization: {token}"));
    }
    let out = cmd.args(extra).arg(url).output().context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, trailer) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut trailer = trailer.split_whitespace().map(|n| n.parse().unwrap_or(0));
    Ok(CurlResult {
        status: trailer.next().unwrap_or(0),
        peer_port: trailer.next().unwrap_or(0),
        body: body.to_owned(),
    })
}

/// A binary of this crate built beside the running one (`sdk-client`, `raw-http`, `load`…);
/// an error naming the build command when it is missing.
pub fn helper_bin(name: &str) -> Result<std::path::PathBuf> {
    let exe = std::env::current_exe().context("path of the running binary")?;
    // target/<profile>/deps/<test> or target/<profile>/<bin> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .context("no target directory above the running binary")?;
    let path = dir.join(name);
    anyhow::ensure!(
        path.is_file(),
        "helper binary {} is missing: build the harness with `cargo build -p tests --bins` \
         (`cargo xtask demo`, `test` and `bench` do)",
        path.display()
    );
    Ok(path)
}

/// A helper process (a flood, a relay) killed and reaped on drop; `line` is the first line it
/// printed (its "ready" or its result).
#[derive(Debug)]
pub struct Helper {
    child: std::process::Child,
    /// The first line of its standard output.
    pub line: String,
}

impl Helper {
    /// Spawns `cmd` and waits for its first line of output.
    pub fn spawn(cmd: &mut std::process::Command) -> Result<Self> {
        use std::io::BufRead as _;
        let mut child = cmd.stdout(std::process::Stdio::piped()).spawn()?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        Ok(Self { child, line })
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `raw-http` saw.
#[derive(Debug, serde::Deserialize)]
pub struct RawResult {
    /// Status of the first response (0 if none).
    pub status: u16,
    /// Everything the server sent.
    pub response: String,
    /// Milliseconds from connect until the server closed.
    pub closed_after_ms: u64,
}

/// Sends `request` verbatim from pod `i` to `addr`; `flags` are raw-http's (`--drip SECONDS`,
/// `--half-close`).
pub fn raw_http(
    sb: &Sandbox,
    i: usize,
    addr: &str,
    request: &[u8],
    flags: &[&str],
) -> Result<RawResult> {
    raw_http_result(spawn_raw_http(sb, i, addr, request, flags)?)
}

/// Starts `raw-http` in pod `i` (stdout and stderr piped); [`raw_http_result`] collects it.
pub fn spawn_raw_http(
    sb: &Sandbox,
    i: usize,
    addr: &str,
    request: &[u8],
    flags: &[&str],
) -> Result<std::process::Child> {
    use std::io::Write as _;
    let mut cmd = sb.pod_command(i, 0, helper_bin("raw-http")?)?;
    cmd.arg(addr).args(flags);
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running raw-http")?;
    child.stdin.take().expect("piped").write_all(request)?;
    Ok(child)
}

/// What a `raw-http` started by [`spawn_raw_http`] got back.
pub fn raw_http_result(child: std::process::Child) -> Result<RawResult> {
    let out = child.wait_with_output()?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "raw-http output: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Runs the Rust SDK's container credentials provider in pod `i` against `url`.
pub fn sdk_client(sb: &Sandbox, i: usize, url: &str) -> Result<Output> {
    sb.pod_command(i, 0, helper_bin("sdk-client")?)?
        .env_clear()
        .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", url)
        .env(
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            &sb.pods()[i].token_file,
        )
        .output()
        .context("running sdk-client")
}

/// What the `load` client measured.
#[derive(Debug, serde::Deserialize)]
pub struct LoadResult {
    /// Responses by status code.
    pub statuses: std::collections::BTreeMap<String, u64>,
    /// Requests that got no HTTP answer.
    pub errors: u64,
    /// Of those, connects that failed (nothing listening, or the kernel's budget).
    pub refused: u64,
    /// The failed connects by error kind (`ConnectionRefused`, ...).
    #[serde(default)]
    pub connect_errors: std::collections::BTreeMap<String, u64>,
    /// Of those, connections that broke without an answer.
    pub broken: u64,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
    /// Wall time, ms.
    pub elapsed_ms: u64,
}

impl LoadResult {
    /// Responses with `status`.
    pub fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status.to_string()).copied().unwrap_or(0)
    }

    /// Whether all `requests` were answered 200, none refused, none broken.
    pub fn all_answered(&self, requests: u64) -> bool {
        self.count(200) == requests && (self.refused, self.broken, self.errors) == (0, 0, 0)
    }
}

/// Starts `count` requests for `path` (new connection each, `concurrency` at a time) from
/// container `c` of pod `i` to `addr`; returns the running child (its stdout is the result).
pub fn spawn_load(
    sb: &Sandbox,
    i: usize,
    c: usize,
    addr: &str,
    path: &str,
    count: usize,
    concurrency: usize,
) -> Result<std::process::Child> {
    spawn_load_with(sb, i, c, addr, path, count, concurrency, &[])
}

/// Like [`spawn_load`], with the load client's environment options (`LOAD_KEEPALIVE`,
/// `LOAD_TOKENS`, `LOAD_RETRIES`, `LOAD_EXPECT`: see `src/bin/load.rs`).
#[allow(clippy::too_many_arguments)] // reason: a test helper mirroring the load client's argv
pub fn spawn_load_with(
    sb: &Sandbox,
    i: usize,
    c: usize,
    addr: &str,
    path: &str,
    count: usize,
    concurrency: usize,
    env: &[(&str, &str)],
) -> Result<std::process::Child> {
    let host = if addr.starts_with('[') {
        "[fd00:ec2::23]"
    } else {
        "169.254.170.23"
    };
    sb.pod_command(i, c, helper_bin("load")?)?
        .arg(addr)
        .arg(host)
        .arg(&sb.pods()[i].token_file)
        .arg(count.to_string())
        .arg(concurrency.to_string())
        .arg(path)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting load")
}

/// A cold burst: each of the first `pods` pods asks 10 times at once (new connections), and
/// retries a 5xx or a failed connect `retries` times, 1 s apart, as SDKs do.
pub fn spawn_cold_burst(
    sb: &Sandbox,
    pods: usize,
    retries: u32,
) -> Result<Vec<std::process::Child>> {
    let retries = retries.to_string();
    (0..pods)
        .map(|pod| {
            spawn_load_with(
                sb,
                pod,
                0,
                "169.254.170.23:80",
                "/v1/credentials",
                10,
                10,
                &[("LOAD_RETRIES", retries.as_str())],
            )
        })
        .collect()
}

/// Waits for a `spawn_load` child and parses its result.
pub fn load_result(child: std::process::Child) -> Result<LoadResult> {
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("load output")
}

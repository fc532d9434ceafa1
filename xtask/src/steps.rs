//! The commands: test, demo, bench, image, kind-e2e.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::compile::{build, build_ebpf, harness_bins, Profile};
use crate::exec::{cargo, root, run, step};
use crate::setup;
use crate::supervise::Supervised;

/// Outcome of the test binaries of one `cargo test` run.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    lines: Vec<String>,
}

/// Runs `cargo test` with `args`, echoing its output and collecting the "test result:" lines.
fn cargo_test(name: &str, args: &[&str], env: &[(&str, &str)], tally: &mut Tally) -> Result<()> {
    step(name, || {
        let mut cmd = cargo();
        cmd.arg("test").args(args).stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = Supervised::spawn(&mut cmd)?;
        let stdout = child.child().stdout.take().expect("piped");
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| {
                    rest.split(';')
                        .find_map(|part| {
                            part.trim()
                                .strip_suffix(word)?
                                .trim()
                                .rsplit(' ')
                                .next()?
                                .parse::<u64>()
                                .ok()
                        })
                        .unwrap_or(0)
                };
                tally.passed += count("passed");
                tally.failed += count("failed");
                tally.lines.push(format!("{name}: {rest}"));
            }
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("cargo test {args:?} failed: {status}");
        }
        Ok(())
    })
}

/// The harness's own unit tests and the end-to-end test binaries of the `tests` crate (the
/// leak check runs after them).
const E2E_SUITES: [&str; 33] = [
    "-p",
    "tests",
    "--lib",
    "--test",
    "chart",
    "--test",
    "monitoring",
    "--test",
    "e2e",
    "--test",
    "dropin",
    "--test",
    "clients",
    "--test",
    "attribution",
    "--test",
    "cache",
    "--test",
    "deploy",
    "--test",
    "hardening",
    "--test",
    "accept",
    "--test",
    "teardown",
    "--test",
    "prewarm",
    "--test",
    "realnode",
    "--test",
    "adversary",
    "--test",
    "upgrade",
];

/// The full suite, as CI runs it.
pub fn test() -> Result<()> {
    setup::all()?;
    build_ebpf()?;
    step("cargo fmt --check", || {
        run(cargo().args(["fmt", "--all", "--", "--check"]))?;
        run(cargo().args([
            "fmt",
            "--manifest-path",
            "agent-ebpf/Cargo.toml",
            "--",
            "--check",
        ]))
    })?;
    step("cargo clippy -D warnings", || {
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    step(
        "manifests: yamllint, kubernetes-validate",
        validate_manifests,
    )?;
    let agent = build()?;
    let arm64 = crate::cross::build_agent()?;
    let bins = harness_bins(Profile::Debug)?;
    step("leftovers of dead runs", || {
        run(Command::new(bins.join("reap")).arg("--dead"))
    })?;
    let run_id = run_prefix("");
    let agent_bin = agent.to_string_lossy().into_owned();
    let arm64_bin = arm64.to_string_lossy().into_owned();
    let env = [
        ("PIA_RUN", run_id.as_str()),
        ("AGENT_BIN", agent_bin.as_str()),
        ("AGENT_BIN_ARM64", arm64_bin.as_str()),
    ];
    let mut tally = Tally::default();
    let result = cargo_test(
        "unit tests",
        &["--workspace", "--exclude", "tests"],
        &[],
        &mut tally,
    )
    .and_then(|()| {
        cargo_test(
            "end-to-end suite (node sandbox)",
            &E2E_SUITES,
            &env,
            &mut tally,
        )
    });
    // The leak check runs even when the suite failed: failures must clean up too.
    let leaks = cargo_test(
        "leak check",
        &["-p", "tests", "--test", "leaks"],
        &env,
        &mut tally,
    );
    sweep(&bins, &run_id);
    let demo = result
        .and(leaks)
        // The programs must load and attach on every kernel family nodes run, not only this
        // machine's (docs/kernel-notes.md, "Older kernels").
        .and_then(|()| crate::kernels::run_all(&agent, &arm64).map(drop))
        .and_then(|()| step("demo, from a clean harness build", || demo_fresh(&agent)));
    println!("\n==== summary ====");
    for line in tally
        .lines
        .iter()
        .filter(|l| !l.contains(" 0 passed; 0 failed"))
    {
        println!("{line}");
    }
    println!("total: {} passed, {} failed", tally.passed, tally.failed);
    demo
}

/// Runs harness binary `name` from `bins` as run `prefix`, then removes whatever the run left
/// (also when it failed or xtask was interrupted).
fn run_harness(bins: &Path, name: &str, prefix: &str, agent: &Path) -> Result<()> {
    let result = step(name, || {
        run(Command::new(bins.join(name))
            .env("AGENT_BIN", agent)
            .env("PIA_RUN", prefix))
    });
    sweep(bins, prefix);
    result
}

/// Removes everything of run `prefix` (a safety net: harnesses clean up after themselves,
/// and the leak check fails when they do not).
fn sweep(bins: &Path, prefix: &str) {
    let status = Command::new(bins.join("reap"))
        .args(["--run", prefix])
        .status();
    if !status.as_ref().is_ok_and(|s| s.success()) {
        eprintln!("xtask: removing the leftovers of run {prefix} failed: {status:?}");
    }
}

/// The demo as a newcomer's first command meets it: harness binaries deleted first, so it
/// passes only if `cargo xtask demo` builds everything the demo starts; then nothing of the
/// demo's run may be left.
fn demo_fresh(agent: &Path) -> Result<()> {
    let dir = Profile::Debug.dir();
    for name in harness_bin_names()? {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let prefix = run_prefix("demo");
    let bins = harness_bins(Profile::Debug)?;
    run_harness(&bins, "demo", &prefix, agent)?;
    run(cargo()
        .args(["test", "--quiet", "-p", "tests", "--test", "leaks"])
        .env("PIA_RUN", &prefix))
    .context("the demo left something behind")
}

/// The binary targets of the `tests` crate (from `cargo metadata`).
fn harness_bin_names() -> Result<Vec<String>> {
    let out = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("cargo metadata")?;
    anyhow::ensure!(out.status.success(), "cargo metadata failed");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let names: Vec<String> = meta["packages"]
        .as_array()
        .context("cargo metadata: no packages")?
        .iter()
        .filter(|p| p["name"] == "tests")
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    anyhow::ensure!(
        !names.is_empty(),
        "cargo metadata lists no binaries of tests"
    );
    Ok(names)
}

/// Kubernetes versions the manifests are validated against.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.33.0"];

/// Kubernetes resources (kustomizations, patches and kind's own config are linted only).
const MANIFESTS: [&str; 4] = [
    "deploy/serviceaccount.yaml",
    "deploy/daemonset.yaml",
    "deploy/kind/fake-eks-auth.yaml",
    "deploy/kind/sample-pod.yaml",
];

/// yamllint over deploy/, then every resource against each Kubernetes version (strict).
fn validate_manifests() -> Result<()> {
    let bin = setup::venv().join("bin");
    run(Command::new(bin.join("yamllint"))
        .current_dir(root())
        .args(["--strict", "-c", ".yamllint", "deploy"]))?;
    for version in KUBERNETES_VERSIONS {
        run(Command::new(bin.join("kubernetes-validate"))
            .current_dir(root())
            .args(["--strict", "--quiet", "-k", version])
            .args(MANIFESTS))?;
        println!(
            "  {} manifests valid for Kubernetes {version}",
            MANIFESTS.len()
        );
    }
    Ok(())
}

/// The kind recipe: images, cluster, the agent and a sample pod. Skipped, and said so, where
/// no Docker engine or kind exists (as on the development machines).
pub fn kind_e2e() -> Result<()> {
    let docker = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    let kind = Command::new("kind")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !docker || !kind {
        println!(
            "kind-e2e SKIPPED: needs a running Docker engine ({}) and kind ({}); nothing was run.",
            if docker { "found" } else { "missing" },
            if kind { "found" } else { "missing" }
        );
        return Ok(());
    }
    let cluster = "pod-identity";
    step("images", || {
        run(Command::new("docker").current_dir(root()).args([
            "build",
            "-t",
            "eks-pod-identity-agent:kind",
            ".",
        ]))?;
        run(Command::new("docker").current_dir(root()).args([
            "build",
            "--target",
            "fake-eks-auth",
            "-t",
            "fake-eks-auth:kind",
            ".",
        ]))
    })?;
    let result = step("kind flow", || {
        run(Command::new("kind").current_dir(root()).args([
            "create",
            "cluster",
            "--config",
            "deploy/kind/cluster.yaml",
        ]))?;
        for image in ["eks-pod-identity-agent:kind", "fake-eks-auth:kind"] {
            run(Command::new("kind").args(["load", "docker-image", image, "--name", cluster]))?;
        }
        run(Command::new("kubectl")
            .current_dir(root())
            .args(["apply", "-k", "deploy/kind"]))?;
        run(Command::new("kubectl").args([
            "-n",
            "default",
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            "pod/pod-identity-sample",
            "--timeout=180s",
        ]))?;
        let logs = Command::new("kubectl")
            .args(["-n", "default", "logs", "pod-identity-sample"])
            .output()?;
        let logs = String::from_utf8_lossy(&logs.stdout);
        anyhow::ensure!(
            logs.contains("\"AccessKeyId\""),
            "the sample pod got no credentials: {logs}"
        );
        println!("  the sample pod got credentials");
        Ok(())
    });
    let _ = Command::new("kind")
        .args(["delete", "cluster", "--name", cluster])
        .status();
    result
}

/// The run prefix of harness `name` started by this xtask (`piademo<pid>`, `piabench<pid>`).
fn run_prefix(name: &str) -> String {
    format!("pia{name}{}", std::process::id())
}

/// Sets up, builds the agent and the harness in `profile`, and runs harness `name`.
fn build_and_run(name: &str, profile: Profile) -> Result<()> {
    setup::all()?;
    let agent = build()?;
    let bins = harness_bins(profile)?;
    run_harness(&bins, name, &run_prefix(name), &agent)
}

/// Builds the release agent and its OCI image (umoci, no Docker engine); returns the archive.
pub fn image(push: Option<&str>, plain_http: bool) -> Result<PathBuf> {
    setup::all()?;
    let agent = build()?;
    let arm64 = crate::cross::build_agent()?;
    let bins = harness_bins(Profile::Release)?;
    let out = root().join("target/image");
    step("agent image (OCI archive, amd64 + arm64)", || {
        let mut cmd = Command::new(bins.join("image"));
        cmd.arg(&agent).arg(&out).arg(env!("CARGO_PKG_VERSION"));
        cmd.arg("--arm64").arg(&arm64);
        if let Some(reference) = push {
            cmd.args(["--push", reference]);
        }
        if plain_http {
            cmd.arg("--plain-http");
        }
        run(&mut cmd)
    })?;
    Ok(out.join("image.tar"))
}

/// Builds everything and runs the demo binary (a sandbox, two pods, the real agent).
pub fn demo() -> Result<()> {
    build_and_run("demo", Profile::Debug)
}

/// Builds the agent and the bench tools in release mode and runs the bench.
pub fn bench() -> Result<()> {
    build_and_run("bench", Profile::Release)
}

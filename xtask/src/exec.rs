//! Where the workspace is and how xtask runs commands: each as a named, timed step, under
//! supervision (a signal to xtask reaches it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::supervise;

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Where `cargo install` puts binaries.
pub fn cargo_bin_dir() -> Result<PathBuf> {
    let home = match std::env::var_os("CARGO_HOME") {
        Some(h) => PathBuf::from(h),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cargo"),
    };
    Ok(home.join("bin"))
}

/// Runs a command with inherited output (under supervision: a signal to xtask reaches it and
/// stops the steps after it); fails with its status.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = supervise::status(cmd)?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs `f` as a named step, printing its duration.
pub fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    println!("==> {name}");
    let t = Instant::now();
    let out = f().with_context(|| format!("step '{name}' failed"))?;
    println!("<== {name} ({:.1?})", t.elapsed());
    Ok(out)
}

/// cargo in the workspace; the agent it builds must embed the BPF object (xtask builds it
/// first), so a missing object fails instead of building a fallback-only agent.
pub fn cargo() -> Command {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root()).env("AGENT_EBPF_REQUIRED", "1");
    cmd
}

//! arm64 (Graviton) builds on an amd64 machine: rustup's aarch64 standard library, Debian's
//! cross gcc and arm64 glibc (the linker and the C parts of aws-lc), the same BPF object.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::exec::{root, run, step};

/// The Rust target of arm64 nodes.
pub const TARGET: &str = "aarch64-unknown-linux-gnu";

/// Adds rustup's aarch64 standard library unless it is there.
pub fn rust_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup (the machine's Rust comes from rustup)")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        println!("  {TARGET} present");
        return Ok(());
    }
    run(Command::new("rustup").args(["target", "add", TARGET]))
}

/// cargo with Debian's cross linker and C compiler for [`TARGET`].
pub fn cargo() -> Command {
    let mut cmd = crate::exec::cargo();
    cmd.env(
        "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
        "aarch64-linux-gnu-gcc",
    )
    .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
    .env("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar");
    cmd
}

/// The release agent for arm64, with the same embedded BPF object as the amd64 build.
pub fn build_agent() -> Result<PathBuf> {
    crate::compile::build_ebpf()?;
    step("build agent (release, arm64)", || {
        run(cargo().args([
            "build",
            "--release",
            "--target",
            TARGET,
            "-p",
            "agent",
            "--bin",
            "eks-pod-identity-agent",
        ]))
    })?;
    Ok(root().join(format!("target/{TARGET}/release/eks-pod-identity-agent")))
}

//! What xtask builds: the BPF object, the release agent, and the harness binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use crate::exec::{cargo, cargo_bin_dir, root, run, step};

/// The BPF object `build-ebpf` produces (the agent's build script embeds it from here).
pub fn ebpf_object() -> PathBuf {
    root().join("agent-ebpf/target/bpfel-unknown-none/release/agent-ebpf")
}

/// Builds the BPF object with Debian's rustc and its prebuilt `core` for bpfel (docs/toolchain.md).
pub fn build_ebpf() -> Result<()> {
    for tool in ["/usr/bin/rustc", "/usr/bin/cargo"] {
        if !Path::new(tool).exists() {
            bail!("{tool} is missing: run `cargo xtask setup` (as root) first");
        }
    }
    let bin_dir = cargo_bin_dir()?;
    if !bin_dir.join("bpf-linker").exists() {
        bail!("bpf-linker is missing: run `cargo xtask setup` (as root) first");
    }
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    step("build-ebpf", || {
        run(Command::new("/usr/bin/cargo")
            .current_dir(root().join("agent-ebpf"))
            .args([
                "build",
                "--release",
                "--locked",
                "--target",
                "bpfel-unknown-none",
            ])
            // aya-ebpf uses #![feature(asm_experimental_arch)].
            .env("RUSTC_BOOTSTRAP", "1")
            .env("RUSTC", "/usr/bin/rustc")
            // BTF is required for the sk_storage map (#[btf_map]).
            .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
            .env("PATH", path)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"))?;
        let size = std::fs::metadata(ebpf_object())?.len();
        println!("  {} ({size} bytes)", ebpf_object().display());
        Ok(())
    })
}

/// Builds the BPF object and the release agent; returns the agent's path.
pub fn build() -> Result<PathBuf> {
    build_ebpf()?;
    step("build agent (release)", || {
        run(cargo().args([
            "build",
            "--release",
            "-p",
            "agent",
            "--bin",
            "eks-pod-identity-agent",
        ]))
    })?;
    Ok(root().join("target/release/eks-pod-identity-agent"))
}

/// Which cargo profile the harness binaries are built in.
#[derive(Clone, Copy)]
pub enum Profile {
    /// Unoptimised (tests and the demo).
    Debug,
    /// Optimised (the bench: the load clients must not be the bottleneck).
    Release,
}

impl Profile {
    /// Where cargo puts this profile's binaries.
    pub fn dir(self) -> PathBuf {
        root().join(match self {
            Profile::Debug => "target/debug",
            Profile::Release => "target/release",
        })
    }
}

/// Builds every binary of the `tests` crate (the demo, the bench, and the helpers they start
/// inside pods); returns the directory they are in.
pub fn harness_bins(profile: Profile) -> Result<PathBuf> {
    step("build the harness binaries", || {
        let mut cmd = cargo();
        cmd.args(["build", "-p", "tests", "--bins"]);
        if let Profile::Release = profile {
            cmd.arg("--release");
        }
        run(&mut cmd)
    })?;
    Ok(profile.dir())
}

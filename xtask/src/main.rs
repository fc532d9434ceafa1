//! `cargo xtask`: the one entry point a person or CI needs. Every step does its own set-up,
//! idempotently, so a fresh machine with only rustup's stable Rust gets everything it needs.

mod compile;
mod cross;
mod exec;
mod kernels;
mod setup;
mod steps;
mod supervise;

use std::time::Instant;

use clap::{Parser, Subcommand};

/// Project automation.
#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (Debian packages, bpf-linker, the Python test
    /// clients, bpffs); skips what is there.
    Setup {
        /// Only what building needs (for image builds): no test clients, no bpffs mount.
        #[arg(long)]
        toolchain_only: bool,
    },
    /// Build the BPF object with Debian's toolchain (release).
    BuildEbpf,
    /// Build the agent (release, BPF object embedded): target/release/eks-pod-identity-agent.
    Build,
    /// Set up, lint, build, and run the unit and end-to-end suites.
    Test,
    /// Run the agent for real in a node sandbox; a pod gets credentials.
    Demo,
    /// Benchmarks in the node sandbox: ratios against baselines measured in the same run,
    /// written to target/bench/.
    Bench,
    /// Build the agent's OCI image without a Docker engine, amd64 + arm64 (an image index):
    /// target/image/image.tar (`ctr images import`, `skopeo copy --all oci-archive:…`).
    Image {
        /// Then push it to this reference (`registry.example.com/eks-pod-identity-agent:0.1.0`)
        /// with skopeo, using skopeo's credentials (`skopeo login`, `REGISTRY_AUTH_FILE`).
        #[arg(long, value_name = "REF")]
        push: Option<String>,
        /// The registry speaks plain HTTP (no TLS).
        #[arg(long, requires = "push")]
        plain_http: bool,
    },
    /// Build the images and run the kind recipe (deploy/kind) where docker and kind exist.
    KindE2e,
    /// Boot Debian's 5.10, 6.1 and 6.12 cloud kernels and the arm64 6.1 one under qemu and run
    /// the kernel suite (the sandbox's kernel-path tests, the agent from its image) in each;
    /// writes docs/kernels.md.
    Kernels,
}

fn main() -> std::process::ExitCode {
    let started = Instant::now();
    let result = match Cli::parse().command {
        Cmd::Setup { toolchain_only } => setup::run(toolchain_only),
        Cmd::BuildEbpf => compile::build_ebpf(),
        Cmd::Build => compile::build().map(|_| ()),
        Cmd::Test => steps::test(),
        Cmd::Demo => steps::demo(),
        Cmd::Image { push, plain_http } => steps::image(push.as_deref(), plain_http).map(|_| ()),
        Cmd::KindE2e => steps::kind_e2e(),
        Cmd::Bench => steps::bench(),
        Cmd::Kernels => setup::all()
            .and_then(|()| compile::build())
            .and_then(|agent| Ok((agent, cross::build_agent()?)))
            .and_then(|(amd64, arm64)| kernels::run_all(&amd64, &arm64))
            .map(drop),
    };
    println!("xtask: finished in {:.1?}", started.elapsed());
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

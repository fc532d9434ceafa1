//! `image AGENT_BINARY OUT_DIR [TAG] [--arm64 BINARY] [--push REF] [--plain-http]`: builds the
//! agent's OCI image without a Docker engine (what `cargo xtask image` runs): the binary plus
//! exactly the shared libraries it loads, entrypoint and default command as the Dockerfile's
//! agent stage; with `--arm64`, an image index of both architectures. Prints the archive's
//! path; with `--push`, sends the image (every architecture) to a registry with skopeo.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use clap::Parser;
use tests::image::Arch;

#[derive(Parser)]
struct Args {
    /// The release agent binary.
    agent: PathBuf,
    /// Where the image is built (its archive: OUT_DIR/image.tar).
    out: PathBuf,
    /// The image's tag in the archive.
    #[arg(default_value = env!("CARGO_PKG_VERSION"))]
    tag: String,
    /// The arm64 release binary: the archive is then an image index (amd64 + arm64).
    #[arg(long, value_name = "BINARY")]
    arm64: Option<PathBuf>,
    /// Push the image to this reference (`registry/repository:tag`) with skopeo.
    #[arg(long, value_name = "REF")]
    push: Option<String>,
    /// The registry speaks plain HTTP (no TLS), as a registry on a node's loopback.
    #[arg(long, requires = "push")]
    plain_http: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.agent.is_file(),
        "{} is not a file",
        args.agent.display()
    );
    let mut builds = vec![(Arch::Amd64, args.agent.as_path())];
    if let Some(arm64) = &args.arm64 {
        builds.push((Arch::Arm64, arm64.as_path()));
    }
    let tar = tests::image::agent_image_for(&builds, &args.out, &args.tag)
        .context("building the agent image")?;
    for (arch, agent) in &builds {
        for (source, at) in tests::image::agent_files_for(agent, *arch)? {
            eprintln!("  {}: {} <- {}", arch.oci(), at.display(), source.display());
        }
    }
    for (arch, size) in tests::image::compressed_sizes(&tar)? {
        eprintln!(
            "  {arch}: {:.1} MiB compressed (layers gzip), debug info kept beside the archive",
            size as f64 / (1 << 20) as f64
        );
    }
    if let Some(reference) = &args.push {
        tests::image::push(Command::new("skopeo"), &tar, reference, args.plain_http)?;
        eprintln!("  pushed to {reference}");
    }
    println!("{}", tar.display());
    Ok(())
}

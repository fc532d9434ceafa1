//! `image AGENT_BINARY OUT_DIR [TAG] [--push REF] [--plain-http]`: builds the agent's OCI
//! image without a Docker engine (what `cargo xtask image` runs): the binary plus exactly the
//! shared libraries it loads, entrypoint and default command as the Dockerfile's agent stage.
//! Prints the archive's path; with `--push`, sends the image to a registry with skopeo.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The release agent binary.
    agent: PathBuf,
    /// Where the image is built (its archive: OUT_DIR/image.tar).
    out: PathBuf,
    /// The image's tag in the archive.
    #[arg(default_value = env!("CARGO_PKG_VERSION"))]
    tag: String,
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
    let tar = tests::image::agent_image(&args.agent, &args.out, &args.tag)
        .context("building the agent image")?;
    for (source, at) in tests::image::agent_files(&args.agent)? {
        eprintln!("  {} <- {}", at.display(), source.display());
    }
    let size = std::fs::metadata(&tar)?.len();
    eprintln!(
        "  image archive {:.1} MiB (layers gzip-compressed); debug info kept in {}",
        size as f64 / (1 << 20) as f64,
        tar.with_file_name(tests::image::DEBUG_FILE).display()
    );
    if let Some(reference) = &args.push {
        tests::image::push(Command::new("skopeo"), &tar, reference, args.plain_http)?;
        eprintln!("  pushed to {reference}");
    }
    println!("{}", tar.display());
    Ok(())
}

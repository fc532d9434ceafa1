//! `image AGENT_BINARY OUT_DIR [TAG]`: builds the agent's OCI image without a Docker engine
//! (what `cargo xtask image` runs): the binary plus exactly the shared libraries it loads,
//! entrypoint and default command as the Dockerfile's agent stage. Prints the archive's path.

use std::path::PathBuf;

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (agent, out, tag) = match &args[..] {
        [a, o] => (a, o, env!("CARGO_PKG_VERSION").to_owned()),
        [a, o, t] => (a, o, t.clone()),
        _ => anyhow::bail!("usage: image AGENT_BINARY OUT_DIR [TAG]"),
    };
    let agent = PathBuf::from(agent);
    anyhow::ensure!(agent.is_file(), "{} is not a file", agent.display());
    let tar = tests::image::agent_image(&agent, &PathBuf::from(out), &tag)
        .context("building the agent image")?;
    for (source, at) in tests::image::agent_files(&agent)? {
        eprintln!("  {} <- {}", at.display(), source.display());
    }
    let size = std::fs::metadata(&tar)?.len();
    eprintln!(
        "  image archive {:.1} MiB (layers gzip-compressed); debug info kept in {}",
        size as f64 / (1 << 20) as f64,
        tar.with_file_name(tests::image::DEBUG_FILE).display()
    );
    println!("{}", tar.display());
    Ok(())
}

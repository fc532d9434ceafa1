//! OCI images built without a Docker engine: `umoci` (Debian) makes the layout, layers and
//! config; `tar` packs the layout as the archive `ctr images import` and registries take.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

/// Where the agent's binary sits in its image (as in the Dockerfile's agent stage).
pub const AGENT_PATH: &str = "/eks-pod-identity-agent";
/// The agent image's entrypoint and default command (as in the Dockerfile).
pub const AGENT_ENTRYPOINT: [&str; 1] = [AGENT_PATH];
/// The agent image's default arguments.
pub const AGENT_CMD: [&str; 2] = ["server", "--help"];

fn umoci(args: &[&str]) -> Result<()> {
    let out = Command::new("umoci")
        .args(args)
        .output()
        .context("umoci (Debian package umoci; `cargo xtask setup` installs it)")?;
    anyhow::ensure!(
        out.status.success(),
        "umoci {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Builds an image tagged `tag` in `work` (emptied first) whose root file system `fill`
/// writes, with `config` as extra `umoci config` arguments; returns the OCI archive's path.
pub fn build(
    work: &Path,
    tag: &str,
    fill: &dyn Fn(&Path) -> Result<()>,
    config: &[&str],
) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    let layout = work.join("layout");
    let bundle = work.join("bundle");
    let (layout_s, bundle_s) = (layout.display().to_string(), bundle.display().to_string());
    let image = format!("{layout_s}:{tag}");
    umoci(&["init", "--layout", &layout_s])?;
    umoci(&["new", "--image", &image])?;
    umoci(&["unpack", "--image", &image, &bundle_s])?;
    fill(&bundle.join("rootfs"))?;
    umoci(&["repack", "--image", &image, &bundle_s])?;
    let mut args = vec!["config", "--image", &image];
    args.extend_from_slice(config);
    umoci(&args)?;
    umoci(&["gc", "--layout", &layout_s])?;
    let tar = work.join("image.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()?;
    anyhow::ensure!(status.success(), "tar of {}", layout.display());
    let _ = std::fs::remove_dir_all(&bundle);
    Ok(tar)
}

/// The shared libraries `binary` loads (and the loader), from `ldd`.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output()?;
    anyhow::ensure!(out.status.success(), "ldd {}", binary.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux… (0x…)"
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Copies `file` into `root` at the same absolute path (symlinks followed).
fn install(root: &Path, file: &Path, at: &Path) -> Result<()> {
    let dest = root.join(at.strip_prefix("/").unwrap_or(at));
    std::fs::create_dir_all(dest.parent().context("a file has a parent")?)?;
    std::fs::copy(file, &dest).with_context(|| format!("copying {}", file.display()))?;
    Ok(())
}

/// The files the agent image ships: the binary at [`AGENT_PATH`] and exactly the shared
/// libraries it loads, at their paths. Returns them as (source, path in the image).
pub fn agent_files(agent: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut files = vec![(agent.to_path_buf(), PathBuf::from(AGENT_PATH))];
    for lib in shared_libraries(agent)? {
        files.push((lib.clone(), lib));
    }
    Ok(files)
}

/// The name of the debug-info file kept beside the image (the shipped binary names it in its
/// `.gnu_debuglink`, so `gdb` and `perf` find it when it is put beside the binary).
pub const DEBUG_FILE: &str = "eks-pod-identity-agent.debug";

/// Splits the debug info out of `agent` into `dir`: the binary to ship (symbols kept, debug
/// sections gone, a `.gnu_debuglink` to the other) and [`DEBUG_FILE`]. Returns both paths.
pub fn split_debug(agent: &Path, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let (shipped, debug) = (dir.join("eks-pod-identity-agent"), dir.join(DEBUG_FILE));
    let objcopy = |args: &[&std::ffi::OsStr]| -> Result<()> {
        let out = Command::new("objcopy")
            .args(args)
            .output()
            .context("objcopy (binutils)")?;
        anyhow::ensure!(
            out.status.success(),
            "objcopy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    objcopy(&[
        "--only-keep-debug".as_ref(),
        agent.as_os_str(),
        debug.as_os_str(),
    ])?;
    let link = format!("--add-gnu-debuglink={}", debug.display());
    objcopy(&[
        "--strip-debug".as_ref(),
        link.as_ref(),
        agent.as_os_str(),
        shipped.as_os_str(),
    ])?;
    Ok((shipped, debug))
}

/// Builds the agent's image (tag `tag`) from the release binary `agent` in `work`; returns
/// the OCI archive. The image ships the binary without its debug info, which stays beside
/// the archive as [`DEBUG_FILE`].
pub fn agent_image(agent: &Path, work: &Path, tag: &str) -> Result<PathBuf> {
    let files = agent_files(agent)?;
    let mut config = vec![
        "--config.entrypoint",
        AGENT_ENTRYPOINT[0],
        "--config.user",
        "0:0",
    ];
    for c in AGENT_CMD {
        config.extend(["--config.cmd", c]);
    }
    build(
        work,
        tag,
        &|root| {
            let (shipped, _) = split_debug(agent, work)?;
            for (source, at) in &files {
                let source = if at == Path::new(AGENT_PATH) {
                    &shipped
                } else {
                    source
                };
                install(root, source, at)?;
            }
            Ok(())
        },
        &config,
    )
}

/// Pushes the OCI archive `tar` (every image in it) to `reference` with `skopeo`, the command
/// given (plain, or run inside a namespace); `plain_http`: the registry has no TLS. Credentials
/// are skopeo's own (`REGISTRY_AUTH_FILE`, `~/.docker/config.json`, `skopeo login`).
pub fn push(mut skopeo: Command, tar: &Path, reference: &str, plain_http: bool) -> Result<()> {
    // The policy file decides what may be *pulled*; pushing our own build needs none.
    skopeo.args(["--insecure-policy", "copy", "--all", "--quiet"]);
    if plain_http {
        skopeo.arg("--dest-tls-verify=false");
    }
    let out = skopeo
        .arg(format!("oci-archive:{}", tar.display()))
        .arg(format!("docker://{reference}"))
        .output()
        .context("skopeo (Debian package skopeo; `cargo xtask setup` installs it)")?;
    anyhow::ensure!(
        out.status.success(),
        "skopeo copy to {reference}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

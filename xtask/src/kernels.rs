//! `cargo xtask kernels`: boots the kernel families EKS nodes run, from Debian's own cloud
//! kernel packages (5.10 standing in for the pre-5.18 family, 6.1, 6.12, and 6.1 on arm64),
//! under qemu (TCG, no network device) from an initramfs per architecture holding busybox, the
//! agent as its image ships it (the multi-architecture image, unpacked for that architecture
//! as a runtime does), and the sandbox's own kernel tests with the tools they run (arm64's
//! cross-built, its tools from Debian's arm64 packages). In each VM the agent first starts alone (eBPF mode,
//! kernel features, programs attached), then the tests run against it; docs/kernels.md is
//! written from what each kernel showed. A kernel that does not boot, a VM that does not
//! finish, or a failed test fails the step with the console log.
//!
//! Packages come through a private apt configuration under `target/kernels/` (its own sources,
//! lists and cache: the machine's apt sources are left alone) and are kept there. Each family
//! prefers the pinned package; when the mirror has dropped it, the newest of the family is used
//! and the report says so. apt checks every download against the suite's signed index.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::exec::{root, run, step};

/// A CPU architecture the matrix boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// Debian's (and OCI's) name.
    fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The emulator and the machine it emulates. arm64: `max` with the cheap pointer
    /// authentication (QEMU's architected one costs TCG a lot).
    fn qemu(self) -> (&'static str, &'static [&'static str], &'static str) {
        match self {
            Arch::Amd64 => ("qemu-system-x86_64", &["-machine", "q35"], "ttyS0"),
            Arch::Arm64 => (
                "qemu-system-aarch64",
                &["-machine", "virt", "-cpu", "max,pauth-impdef=on"],
                "ttyAMA0",
            ),
        }
    }

    /// Where this architecture's libraries live on a Debian system (the program
    /// interpreter aside).
    fn lib_dir(self) -> &'static str {
        match self {
            Arch::Amd64 => "lib/x86_64-linux-gnu",
            Arch::Arm64 => "lib/aarch64-linux-gnu",
        }
    }
}

/// One kernel family: Debian suite, package name pattern, and the package preferred.
struct Family {
    /// Short name (`5.10`).
    name: &'static str,
    /// The architecture it runs on.
    arch: Arch,
    /// Debian suite whose index lists it.
    suite: &'static str,
    /// `apt-cache search` pattern of the family's cloud kernels.
    pattern: &'static str,
    /// The package this was last run with.
    pinned: &'static str,
}

const FAMILIES: [Family; 4] = [
    Family {
        name: "5.10",
        arch: Arch::Amd64,
        suite: "bullseye",
        pattern: "^linux-image-5\\.10\\.0-[0-9]+-cloud-amd64-unsigned$",
        pinned: "linux-image-5.10.0-32-cloud-amd64-unsigned",
    },
    Family {
        name: "6.1",
        arch: Arch::Amd64,
        suite: "bookworm",
        pattern: "^linux-image-6\\.1\\.0-[0-9]+-cloud-amd64-unsigned$",
        pinned: "linux-image-6.1.0-57-cloud-amd64-unsigned",
    },
    Family {
        name: "6.12",
        arch: Arch::Amd64,
        suite: "bookworm",
        pattern: "^linux-image-6\\.12\\.[0-9]+\\+deb12-cloud-amd64-unsigned$",
        pinned: "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
    },
    // Graviton nodes: the same programs, verified by the arm64 kernel's own verifier and JIT.
    Family {
        name: "6.1 arm64",
        arch: Arch::Arm64,
        suite: "bookworm",
        pattern: "^linux-image-6\\.1\\.0-[0-9]+-cloud-arm64-unsigned$",
        pinned: "linux-image-6.1.0-57-cloud-arm64-unsigned",
    },
];

/// How long one VM may take from start to power-off (TCG: boot 10–15 s, then the suite).
const VM_TIMEOUT: Duration = Duration::from_secs(480);

/// What one kernel showed.
#[derive(Debug)]
pub struct Outcome {
    family: &'static str,
    package: String,
    uname: String,
    mode: String,
    features: String,
    programs: String,
    tests: Vec<TestRun>,
    /// What tests reported of themselves (`PIA-NOTE` lines).
    notes: Vec<String>,
    seconds: f64,
}

fn dir() -> PathBuf {
    root().join("target/kernels")
}

/// A private apt configuration for `suite` and `arch` under target/kernels/apt-<suite>[-arm64].
fn apt_config(suite: &str, arch: Arch) -> Result<PathBuf> {
    let base = match arch {
        Arch::Amd64 => dir().join(format!("apt-{suite}")),
        Arch::Arm64 => dir().join(format!("apt-{suite}-{}", arch.name())),
    };
    for sub in ["lists/partial", "cache/archives/partial", "etc"] {
        std::fs::create_dir_all(base.join(sub))?;
    }
    // bullseye's kernels are in main and its security suite; bookworm's 6.12 comes through
    // its updates and backports.
    let extra = if suite == "bookworm" {
        format!(
            "deb http://deb.debian.org/debian {suite}-updates main\n\
             deb http://deb.debian.org/debian {suite}-backports main\n"
        )
    } else {
        String::new()
    };
    std::fs::write(
        base.join("etc/sources.list"),
        format!(
            "deb http://deb.debian.org/debian {suite} main\n\
             deb http://deb.debian.org/debian-security {suite}-security main\n{extra}"
        ),
    )?;
    let status = base.join("status");
    if !status.exists() {
        std::fs::write(&status, "")?;
    }
    let conf = base.join("apt.conf");
    let b = base.display();
    std::fs::write(
        &conf,
        format!(
            "Dir::Etc::SourceList \"{b}/etc/sources.list\";\n\
             Dir::Etc::SourceParts \"/nonexistent\";\n\
             Dir::State::Lists \"{b}/lists\";\n\
             Dir::Cache \"{b}/cache\";\n\
             Dir::State::status \"{b}/status\";\n\
             APT::Architecture \"{arch}\";\n\
             APT::Architectures {{ \"{arch}\"; }};\n\
             APT::Install-Recommends \"false\";\n\
             APT::Sandbox::User \"root\";\n",
            arch = arch.name()
        ),
    )?;
    Ok(conf)
}

fn apt(conf: &Path, program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("APT_CONFIG", conf);
    cmd
}

/// The package to boot for `family`: the pinned one if the index has it, else the newest.
fn resolve(family: &Family, conf: &Path) -> Result<String> {
    let lists = conf.parent().context("apt dir")?.join("lists");
    let fresh = std::fs::read_dir(&lists)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with("Packages"))
        })
        .unwrap_or(false);
    if !fresh {
        run(apt(conf, "apt-get").args(["update", "-qq"]))?;
    }
    let out = apt(conf, "apt-cache")
        .args(["search", "--names-only", family.pattern])
        .output()
        .context("apt-cache search")?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    if names.iter().any(|n| n == family.pinned) {
        return Ok(family.pinned.to_owned());
    }
    // Newest ABI: compare the numbers in the name.
    let key = |n: &String| -> Vec<u64> {
        n.split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    names.sort_by_key(key);
    let newest = names
        .pop()
        .with_context(|| format!("no {} kernel in {}'s index", family.name, family.suite))?;
    println!(
        "  {} is gone from {}'s index; using {newest}",
        family.pinned, family.suite
    );
    Ok(newest)
}

/// Downloads `package` (once) and unpacks it; returns the unpacked tree.
fn fetch(package: &str, conf: &Path) -> Result<PathBuf> {
    let tree = dir().join(package);
    if tree.join("boot").is_dir() {
        return Ok(tree);
    }
    let debs = dir().join("debs");
    std::fs::create_dir_all(&debs)?;
    run(apt(conf, "apt-get")
        .current_dir(&debs)
        .args(["download", "-qq", package]))?;
    let deb = std::fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .with_context(|| format!("{package}: no .deb after download"))?;
    let partial = tree.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    std::fs::rename(&partial, &tree)?;
    Ok(tree)
}

/// One test of the kernel suite run inside each VM: its test binary, its name, and the column
/// of docs/kernels.md it fills. These are the sandbox's own tests, unchanged.
struct SuiteTest {
    binary: &'static str,
    name: &'static str,
    column: &'static str,
}

const SUITE: [SuiteTest; 7] = [
    SuiteTest {
        binary: "e2e",
        name: "the_kernel_attributes_each_connection_to_the_callers_pod_on_port_80",
        column: "attribution, v4 and v6",
    },
    SuiteTest {
        binary: "attribution",
        name: "a_token_replayed_from_another_pod_is_refused_and_eks_auth_is_not_called",
        column: "cross-check (replay: 403)",
    },
    SuiteTest {
        binary: "attribution",
        name: "a_host_network_pod_is_steered_attributed_and_served",
        column: "hostNetwork",
    },
    SuiteTest {
        binary: "adversary",
        name: "a_cgroup_a_container_nests_and_names_after_another_pod_proves_nothing",
        column: "nested cgroup named after another pod",
    },
    SuiteTest {
        binary: "hardening",
        name: "a_pod_over_its_connect_budget_is_refused_in_the_kernel_and_the_others_are_not",
        column: "connect budget; a gone pod's budget swept",
    },
    SuiteTest {
        binary: "e2e",
        name: "pinned_programs_outlive_the_agent_until_uninstall",
        column: "pinned links kept across a restart",
    },
    SuiteTest {
        binary: "upgrade",
        name: "an_upgrade_under_load_refuses_nothing_breaks_nothing_and_calls_eks_auth_never",
        column: "upgrade under load (handover): 0 refused, 0 broken",
    },
];

/// Harness binaries the suite's tests start inside pods (found beside the test binaries).
const HELPERS: [&str; 1] = ["load"];

/// Debian's arm64 packages holding [`TOOLS`] and busybox.
const ARM64_PACKAGES: [&str; 4] = ["busybox-static", "iproute2", "bpftool", "curl"];

/// The harness helpers cross-built for arm64; their directory.
fn cross_helpers() -> Result<PathBuf> {
    let mut cmd = crate::cross::cargo();
    cmd.args(["build", "-p", "tests", "--target", crate::cross::TARGET]);
    for helper in HELPERS {
        cmd.args(["--bin", helper]);
    }
    run(&mut cmd)?;
    Ok(root().join(format!("target/{}/debug", crate::cross::TARGET)))
}

/// Host tools the sandbox runs (Debian's, installed by setup), with where they go in the VM.
const TOOLS: [(&str, &str); 4] = [
    ("ip", "usr/sbin/ip"),
    ("bpftool", "usr/sbin/bpftool"),
    ("curl", "usr/bin/curl"),
    ("ss", "usr/bin/ss"),
];

/// What one test did in one VM.
#[derive(Debug)]
struct TestRun {
    name: String,
    passed: bool,
    seconds: u64,
}

/// The init script. First the agent alone (its mode, features and the programs it attached),
/// then each test of the suite against the same agent binary; markers `PIA-…` for the host.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /sys/fs/cgroup /sys/fs/bpf /tmp /run /var
mount -t tmpfs run /run; ln -s /run /var/run
mount -t cgroup2 none /sys/fs/cgroup; mount -t bpf bpf /sys/fs/bpf
insmod /modules/$(uname -r)/veth.ko || echo "PIA-ERROR veth.ko did not load"
ip link set lo up
echo "PIA-UNAME $(uname -r)"
mkdir -p /sys/fs/cgroup/kubepods/besteffort /sys/fs/cgroup/kubepods/burstable
ip addr add 169.254.170.23/32 dev lo
AWS_REGION=us-west-2 AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=y /bin/agent server \
  -c kernels --cgroup-root /sys/fs/cgroup/kubepods -b 169.254.170.23 --no-pin > /tmp/agent.log 2>&1 &
agent=$!
i=0
while [ $i -lt 60 ] && ! grep -q '"eks-pod-identity-agent started"' /tmp/agent.log; do sleep 1; i=$((i+1)); done
echo "PIA-MODE $(grep -o '"mode":"[a-z]*"' /tmp/agent.log | head -1 | cut -d'"' -f4)"
echo "PIA-FEATURES $(grep -o '"features":"[^"]*"' /tmp/agent.log | head -1 | cut -d'"' -f4)"
# Through the links (bookworm's bpftool fails `cgroup show` on 5.10).
for id in $(bpftool link show | grep -o 'prog [0-9]*' | cut -d' ' -f2); do
  bpftool prog show id $id | grep -o 'name [a-z0-9_]*' | cut -d' ' -f2
done | sort | tr '\n' ' ' > /tmp/programs
echo "PIA-PROGRAMS $(cat /tmp/programs)"
grep -o 'eBPF unavailable.*' /tmp/agent.log | tail -c 3000
kill $agent; wait $agent
ip addr del 169.254.170.23/32 dev lo
rmdir /sys/fs/cgroup/kubepods/besteffort /sys/fs/cgroup/kubepods/burstable /sys/fs/cgroup/kubepods
export AGENT_BIN=/bin/agent PIA_RUN=pia1 RUST_BACKTRACE=1
# TCG runs many times slower than the host: a first request's EKS Auth call may outlast the
# default 900 ms response deadline (a 503 the tests do not expect of a real node).
export POD_IDENTITY_RESPONSE_DEADLINE=10s
# and a busy host slows it further: the tests' waits (an agent's start, curl's limit) are
# stretched threefold there; what they assert is the same.
export PIA_WAIT_SCALE=3
while read binary name; do
  s=$(date +%s)
  /suite/deps/$binary --exact $name --test-threads=1 --nocapture > /tmp/test.log 2>&1
  rc=$?
  echo "PIA-TEST $name $rc $(( $(date +%s) - s ))"
  # What a test reports of itself (the upgrade: when the handover came).
  grep -a -o 'PIA-NOTE .*' /tmp/test.log | head -5
  # Why it failed first: the agent logs an error carries would push it out of the tail.
  [ $rc = 0 ] || { grep -a -E '^Error: |panicked at' /tmp/test.log | cut -c1-600; tail -c 3000 /tmp/test.log; }
done < /suite/list
echo PIA-DONE
poweroff -f
"#;

/// Builds the suite's test binaries for `arch` (as `cargo xtask test` does) and returns
/// (name, path).
fn suite_binaries(arch: Arch) -> Result<Vec<(String, PathBuf)>> {
    let mut names: Vec<&str> = SUITE.iter().map(|t| t.binary).collect();
    names.sort_unstable();
    names.dedup();
    let mut cmd = match arch {
        Arch::Amd64 => crate::exec::cargo(),
        Arch::Arm64 => crate::cross::cargo(),
    };
    cmd.args([
        "test",
        "-p",
        "tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    if arch == Arch::Arm64 {
        cmd.args(["--target", crate::cross::TARGET]);
    }
    for name in &names {
        cmd.args(["--test", name]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    anyhow::ensure!(
        out.status.success(),
        "building the kernel suite failed: {}",
        out.status
    );
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && names.contains(&name) {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    anyhow::ensure!(
        found.len() == names.len(),
        "cargo built {found:?}, wanted {names:?}"
    );
    Ok(found)
}

/// Where an architecture's programs and libraries come from: this machine's for amd64; for
/// arm64, Debian's arm64 packages unpacked under `target/kernels` and the cross glibc.
struct Sysroot {
    arch: Arch,
    /// Searched for programs (`usr/sbin`, `usr/bin`, `sbin`, `bin` below it).
    root: PathBuf,
    /// Searched for libraries, in order.
    lib_dirs: Vec<PathBuf>,
}

impl Sysroot {
    fn host() -> Self {
        Self {
            arch: Arch::Amd64,
            root: PathBuf::from("/"),
            lib_dirs: ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"]
                .map(PathBuf::from)
                .to_vec(),
        }
    }

    /// Debian's arm64 `packages` with their dependencies, downloaded through the private
    /// apt configuration (checked against the signed index) and unpacked, once.
    fn arm64(packages: &[&str]) -> Result<Self> {
        let root = dir().join("sysroot-arm64");
        let stamp = root.join(".packages");
        let wanted = packages.join(" ");
        if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
            let conf = apt_config("bookworm", Arch::Arm64)?;
            let lists = conf.parent().context("apt dir")?.join("lists");
            if !std::fs::read_dir(&lists)?
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with("Packages"))
            {
                run(apt(&conf, "apt-get").args(["update", "-qq"]))?;
            }
            let debs = dir().join("debs-arm64");
            std::fs::create_dir_all(debs.join("partial"))?;
            run(apt(&conf, "apt-get")
                .args(["install", "--download-only", "-y", "-qq"])
                .arg(format!("-oDir::Cache::archives={}", debs.display()))
                .args(packages))?;
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root)?;
            for deb in std::fs::read_dir(&debs)?.flatten().map(|e| e.path()) {
                if deb.extension().is_some_and(|e| e == "deb") {
                    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
                }
            }
            std::fs::write(&stamp, &wanted)?;
        }
        let lib_dirs = vec![
            root.join("lib/aarch64-linux-gnu"),
            root.join("usr/lib/aarch64-linux-gnu"),
            PathBuf::from("/usr/aarch64-linux-gnu/lib"),
        ];
        Ok(Self {
            arch: Arch::Arm64,
            root,
            lib_dirs,
        })
    }

    /// `path` with its symbolic links followed inside the root (Debian's packages link
    /// `/usr/sbin/ip` to `/bin/ip`: on this machine that would be its own).
    fn resolve(&self, mut path: PathBuf) -> PathBuf {
        for _ in 0..8 {
            let Ok(target) = std::fs::read_link(&path) else {
                break;
            };
            path = match target.strip_prefix("/") {
                Ok(inside) => self.root.join(inside),
                Err(_) => path.parent().map_or(target.clone(), |d| d.join(&target)),
            };
        }
        path
    }

    /// A program by name.
    fn program(&self, name: &str) -> Result<PathBuf> {
        ["usr/sbin", "usr/bin", "sbin", "bin"]
            .iter()
            .map(|d| self.resolve(self.root.join(d).join(name)))
            .find(|p| p.is_file())
            .with_context(|| {
                format!(
                    "{name} is not in {} (`cargo xtask setup` installs this machine's)",
                    self.root.display()
                )
            })
    }

    /// A library by file name.
    fn library(&self, name: &str) -> Result<PathBuf> {
        self.lib_dirs
            .iter()
            .map(|d| self.resolve(d.join(name)))
            .find(|p| p.is_file())
            .with_context(|| format!("{} library {name} not found", self.arch.name()))
    }

    /// Copies `binary` to `dest` under `tree`, and the libraries it needs (transitively, by
    /// its ELF `NEEDED` entries) and its program interpreter, where a Debian system of the
    /// architecture has them.
    fn pack(&self, tree: &Path, binary: &Path, dest: &str) -> Result<()> {
        let readelf = |args: &[&str], file: &Path| -> Result<String> {
            let out = Command::new("readelf").args(args).arg(file).output()?;
            anyhow::ensure!(out.status.success(), "readelf {}", file.display());
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let install = |source: &Path, at: &Path| -> Result<()> {
            if at.exists() {
                return Ok(());
            }
            std::fs::create_dir_all(at.parent().context("a file has a parent")?)?;
            std::fs::copy(source, at).with_context(|| format!("copying {}", source.display()))?;
            Ok(())
        };
        install(binary, &tree.join(dest))?;
        let strip = match self.arch {
            Arch::Amd64 => "strip",
            Arch::Arm64 => "aarch64-linux-gnu-strip",
        };
        run(Command::new(strip).arg(tree.join(dest)))?;
        let mut todo = vec![binary.to_path_buf()];
        while let Some(file) = todo.pop() {
            let dynamic = readelf(&["-d", "--wide"], &file)?;
            for name in dynamic
                .lines()
                .filter(|l| l.contains("(NEEDED)"))
                .filter_map(|l| l.split_once('[')?.1.split_once(']').map(|(n, _)| n))
            {
                let at = tree.join(self.arch.lib_dir()).join(name);
                if !at.exists() {
                    let source = self.library(name)?;
                    install(&source, &at)?;
                    todo.push(source);
                }
            }
        }
        let headers = readelf(&["-l", "--wide"], binary)?;
        if let Some(interp) = headers.lines().find_map(|l| {
            let (_, rest) = l.split_once("Requesting program interpreter: ")?;
            Some(rest.trim_end_matches(']').trim().to_owned())
        }) {
            let name = Path::new(&interp).file_name().context("interpreter")?;
            let source = self.library(&name.to_string_lossy())?;
            install(&source, &tree.join(interp.trim_start_matches('/')))?;
        }
        Ok(())
    }
}

/// Each kernel's veth module (the sandbox joins pods to the node with veth pairs; Debian
/// builds it as a module), uncompressed, at `modules/<release>/veth.ko`.
fn pack_modules(tree: &Path, kernels: &[PathBuf]) -> Result<()> {
    for kernel in kernels {
        for release in std::fs::read_dir(kernel.join("lib/modules"))?.flatten() {
            let base = release.path().join("kernel/drivers/net");
            let dest = tree
                .join("modules")
                .join(release.file_name())
                .join("veth.ko");
            std::fs::create_dir_all(dest.parent().context("module dir")?)?;
            let plain = base.join("veth.ko");
            if plain.is_file() {
                std::fs::copy(&plain, &dest)?;
                continue;
            }
            let (packed, tool) = [("veth.ko.xz", "xz"), ("veth.ko.zst", "zstd")]
                .iter()
                .map(|(f, t)| (base.join(f), *t))
                .find(|(p, _)| p.is_file())
                .with_context(|| format!("no veth module in {}", base.display()))?;
            let out = Command::new(tool).arg("-dc").arg(&packed).output()?;
            anyhow::ensure!(out.status.success(), "{tool} -dc {}", packed.display());
            std::fs::write(&dest, out.stdout)?;
        }
    }
    Ok(())
}

/// The agent's image for `arch`, unpacked as a runtime does: the platform's manifest picked
/// from the image index (skopeo), its layers applied (umoci). Returns the root file system.
fn unpack_image(archive: &Path, arch: Arch) -> Result<PathBuf> {
    let work = dir().join(format!("image-{}", arch.name()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    run(Command::new("skopeo")
        .args(["--insecure-policy", "--override-os", "linux"])
        .args(["--override-arch", arch.name(), "copy", "--quiet"])
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("oci:{}:agent", work.join("layout").display())))?;
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:agent", work.join("layout").display()))
        .arg(work.join("bundle")))?;
    let rootfs = work.join("bundle/rootfs");
    let header = Command::new("readelf")
        .arg("-h")
        .arg(rootfs.join("eks-pod-identity-agent"))
        .output()?;
    let machine = match arch {
        Arch::Amd64 => "X86-64",
        Arch::Arm64 => "AArch64",
    };
    anyhow::ensure!(
        String::from_utf8_lossy(&header.stdout).contains(machine),
        "the image's {} entry holds no {machine} agent",
        arch.name()
    );
    Ok(rootfs)
}

/// What goes into one architecture's initramfs.
struct Payload<'a> {
    /// The agent image's root file system (the agent at /eks-pod-identity-agent).
    image_root: &'a Path,
    /// Programs and libraries.
    sysroot: &'a Sysroot,
    /// The kernel suite's test binaries, by name.
    suite: &'a [(String, PathBuf)],
    /// Where the harness helpers were built.
    helpers: &'a Path,
}

/// Builds an initramfs: busybox, the agent's image, the kernel suite with its helpers and
/// tools and the libraries they link, each kernel's veth module, and the init script.
fn initramfs(arch: Arch, payload: &Payload, kernels: &[PathBuf]) -> Result<PathBuf> {
    let tree = dir().join(format!("initramfs-{}", arch.name()));
    let _ = std::fs::remove_dir_all(&tree);
    for sub in ["bin", "proc", "sys", "dev", "tmp", "suite/deps"] {
        std::fs::create_dir_all(tree.join(sub))?;
    }
    let sysroot = payload.sysroot;
    sysroot.pack(&tree, &sysroot.program("busybox")?, "bin/busybox")?;
    // The image's files as they are (binary, libraries), the agent named as the suite expects.
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", payload.image_root.display()))
        .arg(&tree))?;
    std::os::unix::fs::symlink("/eks-pod-identity-agent", tree.join("bin/agent"))?;
    for (name, exe) in payload.suite {
        sysroot.pack(&tree, exe, &format!("suite/deps/{name}"))?;
    }
    for helper in HELPERS {
        sysroot.pack(
            &tree,
            &payload.helpers.join(helper),
            &format!("suite/{helper}"),
        )?;
    }
    for (tool, dest) in TOOLS {
        sysroot.pack(&tree, &sysroot.program(tool)?, dest)?;
    }
    pack_modules(&tree, kernels)?;
    let list: String = SUITE
        .iter()
        .map(|t| format!("{} {}\n", t.binary, t.name))
        .collect();
    std::fs::write(tree.join("suite/list"), list)?;
    std::fs::write(tree.join("init"), INIT)?;
    run(Command::new("chmod").arg("+x").arg(tree.join("init")))?;
    let image = dir().join(format!("initramfs-{}.cpio.gz", arch.name()));
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > {}",
            tree.display(),
            image.display()
        ))
        .status()?;
    anyhow::ensure!(status.success(), "building the initramfs failed");
    Ok(image)
}

/// Boots `vmlinuz` with `initrd` on an emulated `arch` machine; returns the console output.
fn boot(arch: Arch, vmlinuz: &Path, initrd: &Path, log: &Path) -> Result<String> {
    let (qemu, machine, console) = arch.qemu();
    let mut child = Command::new(qemu)
        .args(machine)
        .args(["-m", "2048", "-smp", "1", "-nographic"])
        .args(["-nic", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &format!("console={console} panic=-1 quiet")])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log)?)
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {qemu}"))?;
    let started = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > VM_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            let text = std::fs::read_to_string(log).unwrap_or_default();
            bail!(
                "the VM did not finish within {VM_TIMEOUT:?}; console:\n{}",
                tail(&text, 3000)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(String::from_utf8_lossy(&std::fs::read(log)?).into_owned())
}

fn tail(text: &str, n: usize) -> &str {
    let start = text.len().saturating_sub(n);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}

/// The lines that say why a test failed (its error or panic, first line of each, capped),
/// which the agent logs a failed test prints would push out of a tail.
fn failures(console: &str) -> String {
    console
        .lines()
        .filter(|l| {
            l.starts_with("Error: ") || l.contains("panicked at") || l.contains("PIA-TEST ")
        })
        .map(|l| l.chars().take(400).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}

fn marker(console: &str, name: &str) -> String {
    console
        .lines()
        .find_map(|l| l.split_once(&format!("PIA-{name} ")).map(|(_, v)| v.trim()))
        .unwrap_or("")
        .to_owned()
}

/// The `PIA-TEST <name> <rc> <seconds>` lines of a console.
fn test_runs(console: &str) -> Vec<TestRun> {
    console
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once("PIA-TEST ")?;
            let mut words = rest.split_whitespace();
            Some(TestRun {
                name: words.next()?.to_owned(),
                passed: words.next()? == "0",
                seconds: words.next()?.parse().ok()?,
            })
        })
        .collect()
}

/// Fetches `family`'s kernel; returns (package, unpacked tree, vmlinuz).
fn kernel(family: &Family) -> Result<(String, PathBuf, PathBuf)> {
    let conf = apt_config(family.suite, family.arch)?;
    let package = resolve(family, &conf)?;
    let tree = fetch(&package, &conf)?;
    let vmlinuz = std::fs::read_dir(tree.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
        })
        .with_context(|| format!("{package}: no vmlinuz"))?;
    Ok((package, tree, vmlinuz))
}

/// Boots one family and reads what it showed; the report lists each test.
fn run_one(family: &Family, package: String, vmlinuz: &Path, initrd: &Path) -> Result<Outcome> {
    let log = dir().join(format!("console-{}.log", family.name.replace(' ', "-")));
    let started = Instant::now();
    let console = boot(family.arch, vmlinuz, initrd, &log)?;
    let outcome = Outcome {
        family: family.name,
        package,
        uname: marker(&console, "UNAME"),
        mode: marker(&console, "MODE"),
        features: marker(&console, "FEATURES"),
        programs: marker(&console, "PROGRAMS"),
        tests: test_runs(&console),
        notes: console
            .lines()
            .filter_map(|l| Some(l.split_once("PIA-NOTE ")?.1.trim().to_owned()))
            .collect(),
        seconds: started.elapsed().as_secs_f64(),
    };
    let complete = console.contains("PIA-DONE") && outcome.tests.len() == SUITE.len();
    if !complete || outcome.mode != "ebpf" || outcome.tests.iter().any(|t| !t.passed) {
        bail!(
            "kernel {}: mode {:?}, {} of {} tests passed ({}); what failed:\n{}\nconsole ({}):\n{}",
            family.name,
            outcome.mode,
            outcome.tests.iter().filter(|t| t.passed).count(),
            SUITE.len(),
            outcome
                .tests
                .iter()
                .filter(|t| !t.passed)
                .map(|t| format!("FAILED {}", t.name))
                .collect::<Vec<_>>()
                .join(", "),
            failures(&console),
            log.display(),
            tail(&console, 3000)
        );
    }
    Ok(outcome)
}

/// Boots each family with `agent` and runs the kernel suite there, all VMs at once; fails
/// unless every one ran in eBPF mode and passed every test. Writes docs/kernels.md from what
/// the kernels showed.
pub fn run_all(amd64: &Path, arm64: &Path) -> Result<Vec<Outcome>> {
    for arch in [Arch::Amd64, Arch::Arm64] {
        let (qemu, _, _) = arch.qemu();
        let found = Command::new(qemu).arg("--version").output();
        if !found.is_ok_and(|o| o.status.success()) {
            bail!("{qemu} is missing: `cargo xtask setup` installs Debian's qemu-system-x86 and qemu-system-arm");
        }
    }
    let started = Instant::now();
    let kernels = step("kernels: fetch", || {
        FAMILIES.iter().map(kernel).collect::<Result<Vec<_>>>()
    })?;
    // The agent as it ships: the two-architecture image, unpacked per architecture.
    let bins = crate::compile::harness_bins(crate::compile::Profile::Debug)?;
    let archive = step("kernels: the agent's image (amd64 + arm64)", || {
        let out = dir().join("image");
        run(Command::new(bins.join("image"))
            .arg(amd64)
            .arg(&out)
            .arg("--arm64")
            .arg(arm64))?;
        Ok(out.join("image.tar"))
    })?;
    let mut initrds = Vec::new();
    for arch in [Arch::Amd64, Arch::Arm64] {
        let label = arch.name();
        let image_root = step(&format!("kernels: unpack the {label} image"), || {
            unpack_image(&archive, arch)
        })?;
        let suite = step(
            &format!("kernels: build the kernel suite ({label})"),
            || suite_binaries(arch),
        )?;
        let (sysroot, helpers) = match arch {
            Arch::Amd64 => (Sysroot::host(), bins.clone()),
            Arch::Arm64 => (
                step("kernels: Debian's arm64 tools", || {
                    Sysroot::arm64(&ARM64_PACKAGES)
                })?,
                step("kernels: harness helpers (arm64)", cross_helpers)?,
            ),
        };
        let trees: Vec<PathBuf> = FAMILIES
            .iter()
            .zip(&kernels)
            .filter(|(f, _)| f.arch == arch)
            .map(|(_, (_, t, _))| t.clone())
            .collect();
        let payload = Payload {
            image_root: &image_root,
            sysroot: &sysroot,
            suite: &suite,
            helpers: &helpers,
        };
        let initrd = step(&format!("kernels: initramfs ({label})"), || {
            initramfs(arch, &payload, &trees)
        })?;
        initrds.push((arch, initrd));
    }
    let names: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
    let results = step(
        &format!("kernels: {} (two VMs at a time)", names.join(", ")),
        || {
            // Two VMs at a time, one emulated CPU per core: four at once broke connections in
            // the amd64 upgrade test (3 of 3,000), and three at once did too, once.
            let all: Vec<_> = FAMILIES.iter().zip(kernels.clone()).collect();
            let mut results = Vec::new();
            for wave in all.chunks(2) {
                results.extend(std::thread::scope(|s| {
                    let vms: Vec<_> = wave
                        .iter()
                        .cloned()
                        .map(|(family, (package, _, vmlinuz))| {
                            let initrd = &initrds
                                .iter()
                                .find(|(a, _)| *a == family.arch)
                                .expect("an initramfs per architecture")
                                .1;
                            s.spawn(move || run_one(family, package, &vmlinuz, initrd))
                        })
                        .collect();
                    vms.into_iter()
                        .map(|vm| vm.join().expect("VM thread panicked"))
                        .collect::<Vec<_>>()
                }));
            }
            Ok(results)
        },
    )?;
    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(o) => {
                println!(
                    "  {} ({}): mode {}, features {}, programs {}, {:.0} s",
                    o.uname, o.package, o.mode, o.features, o.programs, o.seconds
                );
                for t in &o.tests {
                    println!("    ok {} ({} s)", t.name, t.seconds);
                }
                outcomes.push(o);
            }
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n\n"));
    }
    let table = table(&outcomes, started.elapsed());
    std::fs::write(root().join("docs/kernels.md"), &table)?;
    println!("\n{table}");
    Ok(outcomes)
}

/// docs/kernels.md: kernel × feature, from the run.
fn table(outcomes: &[Outcome], took: Duration) -> String {
    let mut md = String::from(
        "# Kernels\n\n\
         Written by `cargo xtask kernels` (a step of `cargo xtask test`) from its last run: each \
         kernel is Debian's own cloud kernel package, booted under qemu (TCG, no network \
         device) from an initramfs holding the agent as its image ships it (the amd64 + arm64 \
         image index `cargo xtask image` builds, unpacked for the VM's architecture as a \
         runtime does), the sandbox's test binaries and the tools they run. In each VM the \
         agent starts alone (mode, features, the programs it attached), then the tests below \
         run against it, unchanged from the host's suite. On arm64 (`qemu-system-aarch64 -M \
         virt -cpu max`) the suite is cross-built and its tools are Debian's arm64 packages.\n\n\
         5.10 stands in for the pre-5.18 family (Amazon Linux 2's 5.10, Ubuntu 22.04's 5.15, \
         which Debian does not package): it lacks `bpf_set_retval`, so a connect over the \
         pod's budget fails with `EPERM` there instead of `ECONNREFUSED`; it also lacks \
         `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on hash maps (5.14), so the agent takes an accepted \
         connection's record in two `bpf(2)` calls instead of one. Everything else holds the \
         same on every kernel listed.\n\n",
    );
    let mut header = String::from("| | ");
    let mut rule = String::from("|---|");
    header.push_str(
        &outcomes
            .iter()
            .map(|o| o.family.to_owned())
            .collect::<Vec<_>>()
            .join(" | "),
    );
    header.push_str(" |\n");
    for _ in outcomes {
        rule.push_str("---|");
    }
    md.push_str(&header);
    md.push_str(&rule);
    md.push('\n');
    let mut row = |label: &str, cell: &dyn Fn(&Outcome) -> String| {
        md.push_str(&format!(
            "| {label} | {} |\n",
            outcomes.iter().map(cell).collect::<Vec<_>>().join(" | ")
        ));
    };
    row("package", &|o| format!("`{}`", o.package));
    row("`uname -r`", &|o| o.uname.clone());
    row("agent mode", &|o| o.mode.clone());
    row("features", &|o| format!("`{}`", o.features));
    row("programs attached", &|o| {
        o.programs
            .split_whitespace()
            .map(|p| format!("`{p}`"))
            .collect::<Vec<_>>()
            .join(", ")
    });
    for test in &SUITE {
        row(test.column, &|o| {
            o.tests
                .iter()
                .find(|r| r.name == test.name)
                .map(|r| {
                    let how = if test.binary == "hardening" && r.passed {
                        if o.features.contains("set_retval=yes") {
                            " (ECONNREFUSED)"
                        } else {
                            " (EPERM)"
                        }
                    } else {
                        ""
                    };
                    format!(
                        "{}{how}, {} s",
                        if r.passed { "pass" } else { "FAIL" },
                        r.seconds
                    )
                })
                .unwrap_or_else(|| "not run".into())
        });
    }
    row("tests' notes", &|o| o.notes.join("; "));
    row("VM seconds (boot to power-off)", &|o| {
        format!("{:.0}", o.seconds)
    });
    md.push_str("\nThe tests, by row (`tests/tests/<binary>.rs`):\n");
    for t in &SUITE {
        md.push_str(&format!("- {}: `{}::{}`\n", t.column, t.binary, t.name));
    }
    md.push_str(&format!(
        "\nThe matrix took {:.0} s (fetch, build, two VMs at a time, 1 vCPU and 2 GiB each).\n",
        took.as_secs_f64()
    ));
    md
}

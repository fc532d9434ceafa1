//! `cargo xtask kernels`: boots the kernel families EKS nodes run, from Debian's own cloud
//! kernel packages (5.10 standing in for the pre-5.18 family, 6.1, 6.12), under qemu (TCG, no
//! network device) from an initramfs holding busybox and the release agent, and reports per
//! kernel whether the agent attached its programs (eBPF mode) and which kernel features they
//! use. A kernel that does not boot, or a VM that does not finish, fails with its console log.
//!
//! Packages come through a private apt configuration under `target/kernels/` (its own sources,
//! lists and cache: the machine's apt sources are left alone) and are kept there. Each family
//! prefers the pinned package; when the mirror has dropped it, the newest of the family is used
//! and the report says so. apt checks every download against the suite's signed index.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::steps::{root, run, step};

/// One kernel family: Debian suite, package name pattern, and the package preferred.
struct Family {
    /// Short name (`5.10`).
    name: &'static str,
    /// Debian suite whose index lists it.
    suite: &'static str,
    /// `apt-cache search` pattern of the family's cloud kernels.
    pattern: &'static str,
    /// The package this was last run with.
    pinned: &'static str,
}

const FAMILIES: [Family; 3] = [
    Family {
        name: "5.10",
        suite: "bullseye",
        pattern: "^linux-image-5\\.10\\.0-[0-9]+-cloud-amd64-unsigned$",
        pinned: "linux-image-5.10.0-32-cloud-amd64-unsigned",
    },
    Family {
        name: "6.1",
        suite: "bookworm",
        pattern: "^linux-image-6\\.1\\.0-[0-9]+-cloud-amd64-unsigned$",
        pinned: "linux-image-6.1.0-57-cloud-amd64-unsigned",
    },
    Family {
        name: "6.12",
        suite: "bookworm",
        pattern: "^linux-image-6\\.12\\.[0-9]+\\+deb12-cloud-amd64-unsigned$",
        pinned: "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
    },
];

/// How long one VM may take from start to power-off (TCG: boot 10–15 s, the agent 12 s).
const VM_TIMEOUT: Duration = Duration::from_secs(120);

/// What one kernel showed.
#[derive(Debug)]
pub struct Outcome {
    family: &'static str,
    package: String,
    uname: String,
    mode: String,
    features: String,
    seconds: f64,
}

fn dir() -> PathBuf {
    root().join("target/kernels")
}

/// A private apt configuration for `suite` under target/kernels/apt-<suite>.
fn apt_config(suite: &str) -> Result<PathBuf> {
    let base = dir().join(format!("apt-{suite}"));
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
             APT::Architecture \"amd64\";\n\
             APT::Sandbox::User \"root\";\n"
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

/// The init script: mount what the agent needs, make a pods cgroup, run the agent for a few
/// seconds, print what it said, power off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /sys/fs/cgroup /sys/fs/bpf /tmp
mount -t cgroup2 none /sys/fs/cgroup; mount -t bpf bpf /sys/fs/bpf
mkdir -p /sys/fs/cgroup/kubepods/besteffort /sys/fs/cgroup/kubepods/burstable
ip link set lo up; ip addr add 169.254.170.23/32 dev lo
echo "PIA-UNAME $(uname -r)"
AWS_REGION=us-west-2 AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=y timeout 15 /bin/agent server \
  -c kernels --cgroup-root /sys/fs/cgroup/kubepods -b 169.254.170.23 --no-pin > /tmp/log 2>&1 &
i=0
while [ $i -lt 30 ] && ! grep -q '"eks-pod-identity-agent started"' /tmp/log; do sleep 1; i=$((i+1)); done
echo "PIA-MODE $(grep -o '"mode":"[a-z]*"' /tmp/log | head -1 | cut -d'"' -f4)"
echo "PIA-FEATURES $(grep -o '"features":"[^"]*"' /tmp/log | head -1 | cut -d'"' -f4)"
grep -o 'eBPF unavailable.*' /tmp/log | tail -c 3000
echo PIA-DONE
poweroff -f
"#;

/// Builds the initramfs: busybox, the agent and the libraries it links.
fn initramfs(agent: &Path) -> Result<PathBuf> {
    let tree = dir().join("initramfs");
    let _ = std::fs::remove_dir_all(&tree);
    for sub in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(tree.join(sub))?;
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox"))
        .context("busybox (Debian's busybox-static)")?;
    std::fs::copy(agent, tree.join("bin/agent"))?;
    run(Command::new("strip").arg(tree.join("bin/agent")))?;
    let ldd = Command::new("ldd").arg(agent).output().context("ldd")?;
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let dest = tree.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().context("lib dir")?)?;
        std::fs::copy(lib, &dest).with_context(|| format!("copying {lib}"))?;
    }
    std::fs::write(tree.join("init"), INIT)?;
    run(Command::new("chmod").arg("+x").arg(tree.join("init")))?;
    let image = dir().join("initramfs.cpio.gz");
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

/// Boots `vmlinuz` with `initrd`; returns the console output.
fn boot(vmlinuz: &Path, initrd: &Path, log: &Path) -> Result<String> {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-m", "1024", "-smp", "1", "-nographic"])
        .args(["-nic", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log)?)
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
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

fn marker(console: &str, name: &str) -> String {
    console
        .lines()
        .find_map(|l| l.split_once(&format!("PIA-{name} ")).map(|(_, v)| v.trim()))
        .unwrap_or("")
        .to_owned()
}

/// Boots each family with `agent`; fails unless every one ran in eBPF mode.
pub fn run_all(agent: &Path) -> Result<Vec<Outcome>> {
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        bail!(
            "qemu-system-x86_64 is missing: `cargo xtask setup` installs Debian's qemu-system-x86"
        );
    }
    let initrd = step("kernels: initramfs", || initramfs(agent))?;
    let mut outcomes = Vec::new();
    for family in &FAMILIES {
        let outcome = step(&format!("kernel {}", family.name), || {
            let conf = apt_config(family.suite)?;
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
            let log = dir().join(format!("console-{}.log", family.name));
            let started = Instant::now();
            let console = boot(&vmlinuz, &initrd, &log)?;
            let outcome = Outcome {
                family: family.name,
                package,
                uname: marker(&console, "UNAME"),
                mode: marker(&console, "MODE"),
                features: marker(&console, "FEATURES"),
                seconds: started.elapsed().as_secs_f64(),
            };
            if !console.contains("PIA-DONE") || outcome.mode != "ebpf" {
                bail!(
                    "kernel {}: {:?}; console ({}):\n{}",
                    family.name,
                    outcome,
                    log.display(),
                    tail(&console, 4000)
                );
            }
            println!(
                "  {} ({}): mode {}, features {}, {:.0} s",
                outcome.uname, outcome.package, outcome.mode, outcome.features, outcome.seconds
            );
            Ok(outcome)
        })?;
        outcomes.push(outcome);
    }
    println!("\n| kernel | package | uname | mode | features | VM seconds |");
    println!("|---|---|---|---|---|---|");
    for o in &outcomes {
        println!(
            "| {} | {} | {} | {} | {} | {:.0} |",
            o.family, o.package, o.uname, o.mode, o.features, o.seconds
        );
    }
    Ok(outcomes)
}

//! `cargo xtask kernels`: boots the kernel families EKS nodes run, from Debian's own cloud
//! kernel packages (5.10 standing in for the pre-5.18 family, 6.1, 6.12), under qemu (TCG, no
//! network device) from an initramfs holding busybox, the release agent, and the sandbox's own
//! kernel tests with the tools they run. In each VM the agent first starts alone (eBPF mode,
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

/// Builds the suite's test binaries (as `cargo xtask test` does) and returns (name, path).
fn suite_binaries() -> Result<Vec<(String, PathBuf)>> {
    let mut names: Vec<&str> = SUITE.iter().map(|t| t.binary).collect();
    names.sort_unstable();
    names.dedup();
    let mut cmd = crate::steps::cargo();
    cmd.args([
        "test",
        "-p",
        "tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
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

/// Copies `binary` to `dest` under `tree`, stripped, with the shared libraries it links.
fn pack(tree: &Path, binary: &Path, dest: &str) -> Result<()> {
    let to = tree.join(dest);
    std::fs::create_dir_all(to.parent().context("dest dir")?)?;
    std::fs::copy(binary, &to).with_context(|| format!("copying {}", binary.display()))?;
    run(Command::new("strip").arg(&to))?;
    let ldd = Command::new("ldd").arg(binary).output().context("ldd")?;
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let dest = tree.join(lib.trim_start_matches('/'));
        if dest.exists() {
            continue;
        }
        std::fs::create_dir_all(dest.parent().context("lib dir")?)?;
        std::fs::copy(lib, &dest).with_context(|| format!("copying {lib}"))?;
    }
    Ok(())
}

/// A host tool by name, from the directories Debian installs them in.
fn host_tool(name: &str) -> Result<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} is missing: `cargo xtask setup` installs it"))
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

/// Builds the initramfs: busybox, the agent, the kernel suite with its helpers and tools and
/// the libraries they link, each kernel's veth module, and the init script.
fn initramfs(
    agent: &Path,
    suite: &[(String, PathBuf)],
    bins: &Path,
    kernels: &[PathBuf],
) -> Result<PathBuf> {
    let tree = dir().join("initramfs");
    let _ = std::fs::remove_dir_all(&tree);
    for sub in ["bin", "proc", "sys", "dev", "tmp", "suite/deps"] {
        std::fs::create_dir_all(tree.join(sub))?;
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox"))
        .context("busybox (Debian's busybox-static)")?;
    pack(&tree, agent, "bin/agent")?;
    for (name, exe) in suite {
        pack(&tree, exe, &format!("suite/deps/{name}"))?;
    }
    for helper in HELPERS {
        pack(&tree, &bins.join(helper), &format!("suite/{helper}"))?;
    }
    for (tool, dest) in TOOLS {
        pack(&tree, &host_tool(tool)?, dest)?;
    }
    pack_modules(&tree, kernels)?;
    let list: String = SUITE
        .iter()
        .map(|t| format!("{} {}\n", t.binary, t.name))
        .collect();
    std::fs::write(tree.join("suite/list"), list)?;
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
        .args(["-machine", "q35", "-m", "2048", "-smp", "1", "-nographic"])
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
    Ok((package, tree, vmlinuz))
}

/// Boots one family and reads what it showed; the report lists each test.
fn run_one(family: &Family, package: String, vmlinuz: &Path, initrd: &Path) -> Result<Outcome> {
    let log = dir().join(format!("console-{}.log", family.name));
    let started = Instant::now();
    let console = boot(vmlinuz, initrd, &log)?;
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
pub fn run_all(agent: &Path) -> Result<Vec<Outcome>> {
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        bail!(
            "qemu-system-x86_64 is missing: `cargo xtask setup` installs Debian's qemu-system-x86"
        );
    }
    let started = Instant::now();
    let kernels = step("kernels: fetch", || {
        FAMILIES.iter().map(kernel).collect::<Result<Vec<_>>>()
    })?;
    let bins = crate::steps::harness_bins(crate::steps::Profile::Debug)?;
    let suite = step("kernels: build the kernel suite", suite_binaries)?;
    let trees: Vec<PathBuf> = kernels.iter().map(|(_, t, _)| t.clone()).collect();
    let initrd = step("kernels: initramfs", || {
        initramfs(agent, &suite, &bins, &trees)
    })?;
    let names: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
    let results = step(&format!("kernels: {} at once", names.join(", ")), || {
        Ok(std::thread::scope(|s| {
            let vms: Vec<_> = FAMILIES
                .iter()
                .zip(kernels)
                .map(|(family, (package, _, vmlinuz))| {
                    let initrd = &initrd;
                    s.spawn(move || run_one(family, package, &vmlinuz, initrd))
                })
                .collect();
            vms.into_iter()
                .map(|vm| vm.join().expect("VM thread panicked"))
                .collect::<Vec<_>>()
        }))
    })?;
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
         device) from an initramfs holding the release agent, the sandbox's test binaries and \
         the tools they run. In each VM the agent starts alone (mode, features, the programs it \
         attached), then the tests below run against it, unchanged from the host's suite.\n\n\
         5.10 stands in for the pre-5.18 family (Amazon Linux 2's 5.10, Ubuntu 22.04's 5.15, \
         which Debian does not package): it lacks `bpf_set_retval`, so a connect over the \
         pod's budget fails with `EPERM` there instead of `ECONNREFUSED`. Everything else \
         holds the same on every kernel listed.\n\n",
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
        "\nThe matrix took {:.0} s (fetch, build, the three VMs at once, 1 vCPU and 2 GiB \
         each).\n",
        took.as_secs_f64()
    ));
    md
}

//! Network namespaces made by the test, removed on drop.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A named network namespace (`ip netns add`), deleted when dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace and brings its loopback up.
    pub fn create(name: &str) -> Result<Self> {
        crate::teardown::check_not_stopping()?;
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its bind-mount under /run/netns.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Opens the namespace file (for `setns`).
    pub fn open(&self) -> Result<File> {
        File::open(self.path()).with_context(|| format!("opening netns {}", self.name))
    }

    /// Runs `ip -n <ns> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs inside this namespace (in the caller's cgroup).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        command_in(program, self.open()?, None)
    }

    /// The kernel's network counters of this namespace (`/proc/net/netstat` and
    /// `/proc/net/snmp` read from inside it), keyed `Group:Name` (`TcpExt:ListenOverflows`).
    pub fn counters(&self) -> Result<std::collections::HashMap<String, u64>> {
        let out = self
            .command("cat")?
            .args(["/proc/net/netstat", "/proc/net/snmp"])
            .output()
            .context("reading /proc/net/netstat")?;
        anyhow::ensure!(out.status.success(), "cat /proc/net/netstat failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        let mut counters = std::collections::HashMap::new();
        // Each group is a header line of names followed by a line of values.
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let (Some((group, names)), Some((_, values))) =
                (names.split_once(':'), values.split_once(':'))
            else {
                continue;
            };
            for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
                if let Ok(v) = value.parse() {
                    counters.insert(format!("{group}:{name}"), v);
                }
            }
        }
        anyhow::ensure!(
            counters.contains_key("TcpExt:ListenOverflows"),
            "no TcpExt:ListenOverflows in /proc/net/netstat"
        );
        Ok(counters)
    }

    /// Runs `f` on a thread that has joined this namespace (sockets made there stay in it).
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let ns = self.open()?;
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(&ns)?;
                Ok(f())
            })
            .join()
            .expect("netns thread panicked")
        })
    }
}

/// Moves the calling thread into the network namespace `ns`.
pub fn enter(ns: &File) -> Result<()> {
    // SAFETY: plain syscall on an open namespace fd; only this thread changes namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a command, failing with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A command that, between fork and exec, joins `cgroup` (if any) and then the network
/// namespace `netns`. Unlike `ip netns exec`, it does not remount /sys, so the cgroup2
/// mount and bpffs stay visible (docs/kernel-notes.md).
pub fn command_in(
    program: impl AsRef<std::ffi::OsStr>,
    netns: File,
    cgroup: Option<&Path>,
) -> Result<Command> {
    let procs = cgroup
        .map(|c| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(c.join("cgroup.procs"))
                .with_context(|| format!("opening {}/cgroup.procs", c.display()))
        })
        .transpose()?;
    let mut cmd = Command::new(program);
    // SAFETY: between fork and exec only write(2) and setns(2) run, both async-signal-safe;
    // the fds are owned by the closure, which the Command keeps alive until spawn.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                // "0" moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

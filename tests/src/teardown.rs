//! Removing a run's leftovers by its name prefix: what a harness does on SIGINT/SIGTERM, what
//! `reap` does for runs whose owner died, and what xtask does after every harness as a
//! safety net.
//!
//! Every object a run makes carries its prefix (`names::run_prefix`): network namespaces,
//! cgroups, scratch directories, bpffs pin directories. Processes are found by the network
//! namespace they run in, the cgroup they are in, or a prefixed path on their command line.
//! The prefix also names the run's owner: `pia[demo|bench]<pid>`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use crate::cgroups::{cgroup2_mount, remove_tree};

/// Where each kind of named object lives.
fn places() -> Vec<(&'static str, PathBuf)> {
    let mut places = vec![("network namespace", PathBuf::from("/run/netns"))];
    if let Ok(cg) = cgroup2_mount() {
        places.push(("cgroup", cg));
    }
    for v1 in crate::cgroups::v1_mounts() {
        places.push(("cgroup", v1));
    }
    places.push(("scratch directory", std::env::temp_dir()));
    places.push(("bpffs pin directory", PathBuf::from("/sys/fs/bpf")));
    // What CNI caches per pod, under the network's name (the run's).
    places.push(("CNI result", PathBuf::from("/var/lib/cni/results")));
    places
}

/// Whether `name` belongs to run `prefix` (`prefix` itself or `prefix-…`).
pub fn owned_by(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
}

/// The run prefix of a harness-made name (`pia123-4-node` → `pia123`), if it is one.
pub fn run_of(name: &str) -> Option<&str> {
    let head = name.split('-').next()?;
    let digits = head
        .strip_prefix("piademo")
        .or_else(|| head.strip_prefix("piabench"))
        .or_else(|| head.strip_prefix("pia"))?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then_some(head)
}

/// The process that owns run `prefix` (the pid in its name).
pub fn owner(prefix: &str) -> Option<u32> {
    prefix
        .trim_start_matches(|c: char| c.is_ascii_alphabetic())
        .parse()
        .ok()
}

/// Whether the owner of run `prefix` is gone.
pub fn owner_dead(prefix: &str) -> bool {
    owner(prefix).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Every run with something on this machine, by prefix (sorted, unique).
pub fn runs_present() -> Vec<String> {
    let mut runs: Vec<String> = places()
        .into_iter()
        .filter_map(|(_, dir)| std::fs::read_dir(dir).ok())
        .flat_map(|rd| rd.flatten())
        .filter_map(|e| run_of(&e.file_name().to_string_lossy()).map(str::to_owned))
        .collect();
    runs.sort();
    runs.dedup();
    runs
}

/// The named objects of run `prefix`: (kind, path).
pub fn objects(prefix: &str) -> Vec<(&'static str, PathBuf)> {
    let mut found = Vec::new();
    for (what, dir) in places() {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if owned_by(&e.file_name().to_string_lossy(), prefix) {
                    found.push((what, e.path()));
                }
            }
        }
    }
    found
}

/// Live processes of run `prefix` (never this process, nor zombies): those in its network
/// namespaces, in its cgroups, or with one of its paths on their command line.
pub fn processes(prefix: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let netns: Vec<String> = objects(prefix)
        .iter()
        .filter(|(what, _)| *what == "network namespace")
        .filter_map(|(_, p)| std::fs::metadata(p).ok())
        .map(|m| format!("net:[{}]", m.ino()))
        .collect();
    let marker = format!("/{prefix}-");
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let dir = e.path();
        // A zombie holds nothing (no fds, no namespaces) and waits only for its reaper.
        let state = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        let state = state
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        if matches!(state, None | Some('Z' | 'X')) {
            continue;
        }
        let ns = std::fs::read_link(dir.join("ns/net"))
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cgroups = std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
        let cmdline = std::fs::read(dir.join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let in_cgroup = cgroups
            .lines()
            .filter_map(|l| l.rsplit(':').next())
            .any(|path| path.split('/').any(|seg| owned_by(seg, prefix)));
        if netns.contains(&ns) || in_cgroup || cmdline.contains(&marker) {
            found.push((pid, cmdline.trim().to_owned()));
        }
    }
    found
}

/// Removes everything of run `prefix`; returns what was there, described.
pub fn remove_run(prefix: &str) -> Vec<String> {
    let mut removed = Vec::new();
    // Processes first: they hold namespaces, cgroups and BPF links.
    for _ in 0..50 {
        let procs = processes(prefix);
        if procs.is_empty() {
            break;
        }
        for (pid, cmdline) in procs {
            // SAFETY: kill(2) of a process this run started; no memory is involved.
            if unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0 {
                removed.push(format!("process {pid}: {cmdline}"));
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    removed.sort();
    removed.dedup();
    for (what, path) in objects(prefix) {
        match what {
            "network namespace" => {
                let name = path.file_name().unwrap_or_default();
                let _ = Command::new("ip")
                    .arg("netns")
                    .arg("del")
                    .arg(name)
                    .status();
            }
            "cgroup" => remove_tree(&path),
            "scratch directory" => {
                // A real node's containerd mounts container root file systems and pod
                // network namespaces under it; its shims' sockets live outside it.
                for socket in shim_sockets(&path) {
                    let _ = std::fs::remove_file(socket);
                }
                unmount_under(&path);
                let _ = std::fs::remove_dir_all(&path);
            }
            "CNI result" => {
                // `<network>-<container id>-eth0`; the loopback's entry has the same id.
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                if let Some(id) = name.rsplit('-').nth(1) {
                    let _ =
                        std::fs::remove_file(path.with_file_name(format!("cni-loopback-{id}-lo")));
                }
                let _ = std::fs::remove_file(&path);
            }
            // Unlinking the pins detaches links no process holds any more.
            _ => {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
        removed.push(format!("{what} {}", path.display()));
    }
    removed
}

/// Unmounts (lazily, deepest first) everything mounted at or below `dir`.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = procfs::process::Process::myself().and_then(|p| p.mountinfo()) else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .0
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 with a valid C string; MNT_DETACH never blocks.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The sockets containerd 1.6's shims made for the tasks of the runtime whose directory is
/// under `dir`: `/run/containerd/s/<sha256(socket/namespace/task)>` (a path containerd fixes;
/// a shim removes its socket when it exits, not when it is killed).
fn shim_sockets(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for runtime in [dir.to_path_buf(), dir.join("containerd")] {
        let socket = runtime.join("containerd.sock");
        let tasks = runtime.join("state/io.containerd.runtime.v2.task");
        for ns in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
            for task in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                let key = socket.join(ns.file_name()).join(task.file_name());
                let digest = aws_lc_rs::digest::digest(
                    &aws_lc_rs::digest::SHA256,
                    key.as_os_str().as_encoded_bytes(),
                );
                let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
                found.push(PathBuf::from("/run/containerd/s").join(hex));
            }
        }
    }
    found
}

/// What a real node's runtime leaves once containerd is stopped: its shims (their command
/// line names the run's socket), their sockets, and the mounts under its directory.
pub fn remove_runtime_leftovers(dir: &Path) {
    let marker = dir.display().to_string();
    for _ in 0..50 {
        let shims = procs_with(&marker);
        if shims.is_empty() {
            break;
        }
        for pid in shims {
            // SAFETY: kill(2) of a process started for this run (its command line names it).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for socket in shim_sockets(dir) {
        let _ = std::fs::remove_file(socket);
    }
    unmount_under(dir);
}

/// Live processes whose command line contains `text`.
fn procs_with(text: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
                .filter(|&pid| pid != me)
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(text))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the leftovers of every run whose owner is gone; returns (prefix, what) pairs.
pub fn remove_dead_runs() -> Vec<(String, Vec<String>)> {
    runs_present()
        .into_iter()
        .filter(|run| owner_dead(run))
        .map(|run| {
            let removed = remove_run(&run);
            (run, removed)
        })
        .collect()
}

/// Set once a signal started tearing this run down: nothing new may be made.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Fails once a signal started tearing this run down (checked before making anything, so a
/// harness thread does not create objects behind the teardown).
pub fn check_not_stopping() -> anyhow::Result<()> {
    anyhow::ensure!(
        !STOPPING.load(Ordering::SeqCst),
        "the run is being torn down after a signal"
    );
    Ok(())
}

/// From now on, SIGINT or SIGTERM removes everything of this process's run, then exits with
/// 128 + the signal (as the default action would). Called by every harness entry point.
pub fn on_signal_remove_run() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .expect("signal handlers install");
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                STOPPING.store(true, Ordering::SeqCst);
                let prefix = crate::names::run_prefix();
                let mut removed = remove_run(&prefix);
                // A second pass for what threads were making while the first ran.
                std::thread::sleep(std::time::Duration::from_millis(100));
                removed.extend(remove_run(&prefix));
                eprintln!(
                    "signal {sig}: removed {} leftovers of run {prefix}",
                    removed.len()
                );
                std::process::exit(128 + sig);
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_their_runs() {
        assert_eq!(run_of("pia123-4-node"), Some("pia123"));
        assert_eq!(run_of("piademo77-0"), Some("piademo77"));
        assert_eq!(run_of("piabench9-12-pod3"), Some("piabench9"));
        assert_eq!(run_of("pia55"), Some("pia55"));
        assert_eq!(run_of("piano-1"), None);
        assert_eq!(run_of("pia-1"), None);
        assert_eq!(run_of("systemd"), None);
        assert_eq!(owner("piabench9"), Some(9));
        assert!(owned_by("pia12-3", "pia12"));
        assert!(owned_by("pia12", "pia12"));
        assert!(!owned_by("pia123-3", "pia12"));
    }
}
